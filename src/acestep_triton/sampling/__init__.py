"""The one sampling implementation (schedules, schedulers, guidance, tasks, loop).

It knows nothing of Triton: it sees a denoiser (see ``denoiser.py``).
"""

"""The one sampling implementation (schedules, schedulers, guidance, tasks, loop).

It knows nothing of Triton: it sees a backend (see ``backend.py``). Modules:

- ``schedule``: sigma schedules (plain, oss_steps, audio2audio)
- ``schedulers``: euler / heun / pingpong steppers with the omega mean shift
- ``guidance``: cfg / apg / cfg_star / double condition, the guidance interval and decay
- ``erg``: per-layer query-scale vectors
- ``noise``: seeds and per-item noise exactly as upstream draws them
- ``conditions``: encoder states of the guidance branches
- ``config``: ``SamplerConfig``
- ``hooks``: ``SamplingHooks`` (progress, cancellation, step observer, per-row query scales)
- ``loop``: the sampling loop (``integrate``, ``run_sampling``, ``sample_text2music``)
- ``tasks``: retake, audio2audio, repaint, extend, edit (FlowEdit)
"""

from .backend import ComponentBackend
from .conditions import (
    EncodedConditions,
    PromptTokens,
    build_conditions,
    encode_branches,
    encode_prompt,
    lyric_inputs,
)
from .config import SamplerConfig
from .hooks import NO_HOOKS, SamplingHooks, StepTrace
from .loop import GuidedVelocity, SamplingCancelled, integrate, run_sampling, sample_text2music
from .noise import SeededNoise, latent_frames, mix_retake_noise, resolve_request_seeds, resolve_seeds
from .schedule import Schedule, audio2audio_schedule, flow_match_schedule, oss_schedule
from .tasks import (
    EDIT_PRESETS,
    EditSteps,
    RepaintWindow,
    edit_preset,
    encode_edit_conditions,
    sample_audio2audio,
    sample_edit,
    sample_extend,
    sample_repaint,
    sample_retake,
)

__all__ = [
    "EDIT_PRESETS",
    "NO_HOOKS",
    "ComponentBackend",
    "EditSteps",
    "EncodedConditions",
    "GuidedVelocity",
    "PromptTokens",
    "RepaintWindow",
    "SamplerConfig",
    "SamplingCancelled",
    "SamplingHooks",
    "Schedule",
    "SeededNoise",
    "StepTrace",
    "audio2audio_schedule",
    "build_conditions",
    "edit_preset",
    "encode_branches",
    "encode_edit_conditions",
    "encode_prompt",
    "flow_match_schedule",
    "integrate",
    "latent_frames",
    "lyric_inputs",
    "mix_retake_noise",
    "oss_schedule",
    "resolve_request_seeds",
    "resolve_seeds",
    "run_sampling",
    "sample_audio2audio",
    "sample_edit",
    "sample_extend",
    "sample_repaint",
    "sample_retake",
    "sample_text2music",
]

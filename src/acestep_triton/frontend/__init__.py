"""Gradio front end (port 7865) with upstream ACE-Step's UI and API, backed by the Triton endpoints.

Torch-free: it reaches the model only through :mod:`acestep_client`, so it can run in a slim
container next to (or far from) tritonserver. Start it with ``acestep-frontend`` or
``python -m acestep_triton.frontend``; build it in-process with
:func:`acestep_triton.frontend.app.build_demo`. Importing this package loads nothing heavy.
"""

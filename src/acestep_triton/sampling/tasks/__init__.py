"""The task variants, all driven by the one loop (``loop.integrate``) and ``GuidedVelocity``.

- ``retake``: retake (text2music from mixed seed noise) and audio2audio (from the noised
  reference latents): only the start and the schedule differ from text2music.
- ``repaint``: repaint and extend (regenerate a window of the source latents, or padding
  around them), with upstream's own Euler update and the source re-imposed outside the window.
- ``edit``: FlowEdit from source to target conditions.
- ``steps``: the Euler-on-σ = t/1000 update rule the repaint and edit loops use.

Each module's docstring lists where and why it departs from upstream.
"""

from .edit import EDIT_PRESETS, EditSteps, edit_preset, encode_edit_conditions, sample_edit
from .repaint import RepaintWindow, sample_extend, sample_repaint, sample_window
from .retake import sample_audio2audio, sample_retake

__all__ = [
    "EDIT_PRESETS",
    "EditSteps",
    "RepaintWindow",
    "edit_preset",
    "encode_edit_conditions",
    "sample_audio2audio",
    "sample_edit",
    "sample_extend",
    "sample_repaint",
    "sample_retake",
    "sample_window",
]

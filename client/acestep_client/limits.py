"""The limits and constants that client, server and export all depend on: one home, torch-free.

Each is a fact of the served model or of the request contract, written once here so the client
(installable alone), the sampling code, the component runtimes and the TensorRT engine profiles
cannot drift apart. Derived sizes are computed, not restated.
"""

from __future__ import annotations

from collections.abc import Callable

MODEL_SAMPLE_RATE = 44100
"""The DCAE and the vocoder work at 44.1 kHz."""
OUTPUT_SAMPLE_RATE = 48000
"""Every endpoint returns 48 kHz audio (upstream resamples its output to it)."""
LATENT_HOP_SAMPLES = 512 * 8
"""Samples per latent frame: mel hop 512 × DCAE time compression 8."""
LATENT_FRAME_S = LATENT_HOP_SAMPLES / MODEL_SAMPLE_RATE
"""One latent frame (0.0929 s): a generation has ``int(duration·44100/512/8)`` of them."""
MAX_DURATION_S = 240.0
"""Upstream's longest generation (and the longest source audio served)."""
MAX_FRAMES = int(MAX_DURATION_S / LATENT_FRAME_S)
"""Latent frames of 240 s: 2583."""

PROMPT_MAX_TOKENS = 256
"""Upstream truncates prompts to 256 UMT5 tokens."""
LYRIC_MAX_TOKENS = 4096
"""The longest lyric token sequence served (a clear error past it, naming ``lyrics``)."""

OVERLAP_MIN_DURATION_S = 48.0
"""Songs longer than this decode in windows (upstream's ``overlapped_decode``) ..."""
DCAE_WINDOW_FRAMES = 512
"""... of 512 latent frames per DCAE decoder call, so no component call sees more than 48 s."""

MAX_AUDIO_BYTES = 128 * 1024 * 1024
"""Largest audio upload by default: a 240 s float WAV at 48 kHz stereo (our own output) is ~92 MB.
The client refuses larger files before sending; a server's own limit is :data:`MAX_UPLOAD_ENV`."""
MAX_UPLOAD_ENV = "ACESTEP_MAX_UPLOAD_MB"
"""Deployment setting: the largest ``src_audio``/``ref_audio`` upload a server's endpoints accept,
in MiB (default :data:`MAX_AUDIO_BYTES`). ``acestep-triton serve --max-upload-mb`` sets it."""

EDIT_PRESETS: dict[str, tuple[float, float]] = {"only_lyrics": (0.6, 1.0), "remix": (0.2, 0.4)}
"""Upstream UI presets (edit_n_min, edit_n_max) per edit type."""

CancelFn = Callable[[], bool]
"""Polled between steps and windows: True means the caller gave up, stop the work."""

"""Engine optimisation profiles: the (min, opt, max) shape of every input a TensorRT engine accepts.

A dynamic profile per component (:func:`profile_shapes`) spans batch 1 … ``max_items`` ×
``rows_per_item`` (items × CFG branches for the DiT: what the renderer's ``--max-items`` writes as
``max_batch_size``), latent frames 1 … 2583 (240 s), and text and lyric tokens up to the served
limits; it is tuned (``opt``) for one request of 60 s with two guidance branches. ERG query scales
are ordinary graph inputs ``[B, layers]``. :func:`fixed_profile` pins the lengths instead (quicker
builds, the fastest kernels for one shape: benchmarks). Pure shape arithmetic, no TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping

from acestep_client.limits import DCAE_WINDOW_FRAMES as LIMITS_DCAE_WINDOW_FRAMES
from acestep_client.limits import LYRIC_MAX_TOKENS as LIMITS_LYRIC_MAX_TOKENS
from acestep_client.limits import MAX_FRAMES, OVERLAP_MIN_DURATION_S, PROMPT_MAX_TOKENS

from . import specs
from .specs import ComponentSpec

DEFAULT_MAX_ITEMS = 4
"""Songs per request the engines are sized for by default (the DiT profile then goes to 12 rows)."""

DEFAULT_MAX_FRAMES = MAX_FRAMES
"""Latent frames of 240 s (``int(240 · 44100 / 4096)``), the longest song served."""

OPT_FRAMES = 645
"""Latent frames of 60 s: where the DiT's profile is tuned."""

TEXT_MAX_TOKENS = PROMPT_MAX_TOKENS
LYRIC_MAX_TOKENS = LIMITS_LYRIC_MAX_TOKENS
DCAE_WINDOW_FRAMES = LIMITS_DCAE_WINDOW_FRAMES
"""Engine profiles follow the served limits (``acestep_client.limits``, torch-free, so building
engines does not import transformers): songs past ``OVERLAP_MIN_DURATION_S`` decode in windows
of ``DCAE_WINDOW_FRAMES`` latent frames, so the DCAE decoder and the vocoder never see more
than a 48 s song at once."""

MEL_PER_LATENT = 8
"""Mel frames per latent frame (the DCAE's time compression)."""

OPT_ROWS = {"dit_decoder": 2, "condition_encoder": 2, "text_encoder": 2}
"""Typical batch of one request: conditional + unconditional branch (text-only is rare)."""

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def latent_frames(seconds: float) -> int:
    """Latent frames of ``seconds`` of audio (``sampling.noise.latent_frames``)."""
    return int(seconds * 44100 / 512 / 8)


def decode_max_frames(max_frames: int = DEFAULT_MAX_FRAMES) -> int:
    """Largest latent window the DCAE decoder gets: a whole song up to 48 s, else 512-frame windows."""
    return min(max_frames, max(latent_frames(OVERLAP_MIN_DURATION_S), DCAE_WINDOW_FRAMES))


def dynamic_ranges(spec: ComponentSpec, max_items: int = DEFAULT_MAX_ITEMS,
                   max_frames: int = DEFAULT_MAX_FRAMES) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic symbol ``spec`` uses, for engines serving requests of up
    to ``max_items`` songs and ``max_frames`` latent frames."""
    if max_items < 1 or max_frames < 1:
        raise ValueError(f"max_items and max_frames must be >= 1 (got {max_items}, {max_frames})")
    rows = spec.max_batch(max_items)
    batch = (1, min(rows, OPT_ROWS.get(spec.name, spec.rows_per_item)), rows)
    text = (1, 64, TEXT_MAX_TOKENS)
    lyric = (1, 256, LYRIC_MAX_TOKENS)
    # The decoders only ever see one window or a song of at most 48 s (overlapped decode).
    windowed = spec.name in ("dcae_decoder", "vocoder")
    longest = decode_max_frames(max_frames) if windowed else max_frames
    if spec.name == "dcae_encoder":
        longest += 1  # a source of the longest duration pads to one more frame (then cut, pipeline.py)
    frames = (1, min(OPT_FRAMES, longest), longest)
    mel = tuple(MEL_PER_LATENT * f for f in frames)
    ranges = {"B": batch, "T": text, "Tl": lyric, "S": tuple(1 + t + ly for t, ly in zip(text, lyric, strict=True)),
              "W": frames, "F": mel}
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    return {k: v for k, v in ranges.items() if k in used}  # type: ignore[misc]


def profile_shapes(spec: ComponentSpec, sizes: Mapping[str, int], max_items: int = DEFAULT_MAX_ITEMS,
                   max_frames: int = DEFAULT_MAX_FRAMES) -> ProfileShapes:
    """The optimisation profile: input name → (min, opt, max) shapes.

    ``sizes`` gives the checkpoint-fixed symbols (``D``, ``Ld``...; read from the ONNX file with
    :func:`acestep_triton.export.specs.read_onnx_sizes`).
    """
    ranges = dynamic_ranges(spec, max_items, max_frames)
    out: ProfileShapes = {}
    for tensor in spec.inputs:
        bounds: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if isinstance(dim, int):
                values = (dim, dim, dim)
            elif dim in ranges:
                values = ranges[dim]
            elif dim in sizes:
                values = (int(sizes[dim]),) * 3
            else:
                raise ValueError(f"{spec.name}.{tensor.name}: size of {dim!r} unknown (sizes: {dict(sizes)})")
            for bound, value in zip(bounds, values, strict=True):
                bound.append(int(value))
        out[tensor.name] = (tuple(bounds[0]), tuple(bounds[1]), tuple(bounds[2]))
    return out


def fixed_profile(spec: ComponentSpec, sizes: Mapping[str, int], *, batch: tuple[int, int, int],
                  lengths: Mapping[str, int]) -> ProfileShapes:
    """A profile with fixed lengths (``{"W": 645, "S": 300}``) and a batch range: quicker to build
    and the fastest kernels for one shape (benchmarks, CUDA-graph deployments)."""
    fixed = {**{k: int(v) for k, v in sizes.items()}, **{k: int(v) for k, v in lengths.items()}}
    out: ProfileShapes = {}
    for tensor in spec.inputs:
        bounds: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if dim == specs.BATCH:
                values = batch
            elif isinstance(dim, int):
                values = (dim,) * 3
            elif dim in fixed:
                values = (fixed[dim],) * 3
            else:
                raise ValueError(f"{spec.name}.{tensor.name}: give a length for {dim!r}")
            for bound, value in zip(bounds, values, strict=True):
                bound.append(int(value))
        out[tensor.name] = (tuple(bounds[0]), tuple(bounds[1]), tuple(bounds[2]))
    return out

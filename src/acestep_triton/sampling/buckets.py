"""Shape buckets for the DiT decoder: pad each call up to one of a few fixed shapes.

Why: Triton batches concurrent ``dit_decoder`` requests only when their shapes agree, and every
distinct shape costs a CUDA graph (or a TensorRT profile slot) and its activation memory. Song
lengths (latent frames W) and condition lengths (encoder tokens S = 1 + T + Tl) vary per
request, so unbucketed traffic almost never merges. Rounding W and S up to a short ladder of
sizes makes requests of similar length share one shape.

Why it is exact: ``ACEStepTransformer.decode`` makes padded frames and tokens invisible to
valid ones (masked GroupNorm statistics in the patch embedding, masked depthwise conv input in
the feed-forward, masked q/k/v in the linear self-attention, key bias in the cross-attention,
RoPE positions from 0). Zero padding on the right with mask 0 therefore gives the unpadded
velocity on the first W frames, to float rounding (measured about 4e-7 relative in fp32).

Pure torch; nothing here knows about Triton. The endpoint config parameters ``frame_buckets``
and ``token_buckets`` select the ladders (:meth:`ShapeBuckets.from_parameters`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from acestep_client.limits import PROMPT_MAX_TOKENS

from ..lyrics import MAX_LYRIC_TOKENS
from .backend import BackendWrapper
from .noise import MAX_FRAMES

MAX_ENCODER_TOKENS = 1 + PROMPT_MAX_TOKENS + MAX_LYRIC_TOKENS
"""Longest condition sequence: speaker token + prompt tokens + lyric tokens (4353)."""

DEFAULT_FRAME_BUCKETS: tuple[int, ...] = (
    32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, MAX_FRAMES)
"""Latent-frame ladder: powers of two and their 1.5 multiples, capped by MAX_FRAMES (240 s).

Consecutive sizes grow by 1.5 or 4/3, so a request is padded by at most 50% of its frames
(on average about 20%); the decoder's cost is linear in W (linear self-attention, per-frame
feed-forward, cross-attention W x S), so that is also the bound on wasted compute. A finer
ladder wastes less per call but splits traffic over more shapes (less merging, more CUDA graphs
and engine profiles); 14 sizes cover 3 s to 240 s. The common song lengths land reasonably:
30 s (322 frames) -> 384, 60 s (645) -> 768, 120 s (1291) -> 1536, 180 s (1937) -> 2048, and
240 s is its own bucket instead of being padded to 3072. All sizes but the last are multiples
of 16 (friendly to GPU kernels). Shorter requests than 32 frames (3 s) are padded to 32."""

DEFAULT_TOKEN_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, MAX_ENCODER_TOKENS)
"""Encoder-token ladder: powers of two from 64, plus the maximum S (4353).

Coarser than the frame ladder (ratio 2) because tokens are cheap: they enter only the
cross-attention's keys/values, while frames drive every part of every block, so merging more
requests matters more than the padded token work. 64 covers a short prompt without lyrics;
longer lyrics dominate S."""

FRAME_PARAMETER = "frame_buckets"
TOKEN_PARAMETER = "token_buckets"
WARMUP_PARAMETER = "warmup"


def _validate(values: tuple[int, ...], name: str) -> None:
    """Raise ``ValueError("<name>: ...")`` unless ``values`` are strictly ascending positive ints."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: bucket sizes must be ints, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name}: bucket sizes must be positive, got {v}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name}: bucket sizes must be strictly ascending, got {list(values)}")


def _parse_ladder(text: str, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """``"default"`` -> ``default``; ``"none"`` / ``""`` -> ``()``; ``"64,128"`` -> ``(64, 128)``.

    A comma list is sorted and de-duplicated (the order a size is written in means nothing);
    anything that is not a positive int raises ``ValueError`` naming ``name``.
    """
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, got {text!r}")
    spec = text.strip()
    if spec.lower() == "default":
        return default
    if spec.lower() in ("", "none"):
        return ()
    sizes = []
    for part in spec.split(","):
        try:
            sizes.append(int(part.strip()))
        except ValueError:
            raise ValueError(f"{name}: expected 'default', 'none' or comma-separated positive "
                             f"integers, got {text!r}") from None
    ladder = tuple(sorted(set(sizes)))
    _validate(ladder, name)
    return ladder


def _smallest_at_least(ladder: tuple[int, ...], n: int) -> int:
    """The smallest size of ``ladder`` that holds ``n``; ``n`` itself when none does."""
    i = bisect.bisect_left(ladder, n)
    return ladder[i] if i < len(ladder) else n


@dataclass(frozen=True)
class ShapeBuckets:
    """The frame and token ladders of one endpoint; an empty ladder turns that axis off.

    ``frames`` and ``tokens`` are strictly ascending positive ints (checked on construction,
    errors name the config parameter).
    """

    frames: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept any sequence (a list from a caller) but store tuples: the dataclass is frozen
        # and hashable, and equality must not depend on the container type.
        object.__setattr__(self, "frames", tuple(self.frames))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        _validate(self.frames, FRAME_PARAMETER)
        _validate(self.tokens, TOKEN_PARAMETER)

    def frame_bucket(self, w: int) -> int:
        """Frames to pad ``w`` to: the smallest bucket >= ``w``, or ``w`` above the largest."""
        return _smallest_at_least(self.frames, int(w))

    def token_bucket(self, s: int) -> int:
        """Tokens to pad ``s`` to: the smallest bucket >= ``s``, or ``s`` above the largest."""
        return _smallest_at_least(self.tokens, int(s))

    @property
    def enabled(self) -> bool:
        """Whether either axis is bucketed (otherwise wrapping a backend changes nothing)."""
        return bool(self.frames or self.tokens)

    @classmethod
    def default(cls) -> ShapeBuckets:
        """:data:`DEFAULT_FRAME_BUCKETS` and :data:`DEFAULT_TOKEN_BUCKETS`."""
        return cls(DEFAULT_FRAME_BUCKETS, DEFAULT_TOKEN_BUCKETS)

    @classmethod
    def parse(cls, frames: str, tokens: str) -> ShapeBuckets:
        """Each string: ``"default"``, ``"none"`` or ``""`` (off), or a comma list of ints.

        Raises ``ValueError("frame_buckets: ...")`` / ``ValueError("token_buckets: ...")``.
        """
        return cls(_parse_ladder(frames, FRAME_PARAMETER, DEFAULT_FRAME_BUCKETS),
                   _parse_ladder(tokens, TOKEN_PARAMETER, DEFAULT_TOKEN_BUCKETS))

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ShapeBuckets:
        """From an endpoint's flat config parameters (keys ``frame_buckets``, ``token_buckets``;
        :func:`acestep_triton.serving.config_params.model_parameters` flattens Triton's form).

        A missing key means ``"default"``: bucketing is on unless a deployment turns it off.
        """
        return cls.parse(parameters.get(FRAME_PARAMETER, "default"), parameters.get(TOKEN_PARAMETER, "default"))

    def as_parameters(self) -> dict[str, str]:
        """The config parameters that :meth:`from_parameters` turns back into ``self``."""
        def text(ladder: tuple[int, ...]) -> str:
            return ",".join(str(v) for v in ladder) if ladder else "none"

        return {FRAME_PARAMETER: text(self.frames), TOKEN_PARAMETER: text(self.tokens)}


class BucketedBackend(BackendWrapper):
    """A :class:`~acestep_triton.sampling.ComponentBackend` whose decoder calls are padded to buckets.

    ``predict_velocity`` pads ``latents`` / ``latent_mask`` on the right of W to
    ``buckets.frame_bucket(W)`` and ``encoder_states`` / ``encoder_mask`` on the right of S to
    ``buckets.token_bucket(S)`` (zeros; mask 0, so the model ignores them), calls ``inner``, and
    returns ``velocity[..., :W]`` (a view). Padding keeps the inputs' dtype and device, so a
    sampling loop on CUDA stays there; an input already at its bucket size is passed through
    uncopied. Every other method and attribute is ``inner``'s, unchanged: only the decoder runs
    every step and needs batching across requests.

    ``calls`` counts ``predict_velocity`` calls and ``padded_calls`` those that padded either
    axis (for tests and benchmarks).
    """

    def __init__(self, inner: Any, buckets: ShapeBuckets) -> None:
        super().__init__(inner)
        self.buckets = buckets
        self.calls = 0
        self.padded_calls = 0

    def predict_velocity(self, latents: torch.Tensor, latent_mask: torch.Tensor,
                         encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                         timestep: torch.Tensor, query_scale: torch.Tensor) -> torch.Tensor:
        """``dit_decoder`` at the bucketed shape; the velocity of the caller's W frames."""
        self.calls += 1
        width, tokens = latents.shape[-1], encoder_states.shape[1]
        pad_w = self.buckets.frame_bucket(width) - width
        pad_s = self.buckets.token_bucket(tokens) - tokens
        if pad_w or pad_s:
            self.padded_calls += 1
        if pad_w:
            latents = F.pad(latents, (0, pad_w))
            latent_mask = F.pad(latent_mask, (0, pad_w))
        if pad_s:
            encoder_states = F.pad(encoder_states, (0, 0, 0, pad_s))
            encoder_mask = F.pad(encoder_mask, (0, pad_s))
        velocity = self.inner.predict_velocity(latents, latent_mask, encoder_states, encoder_mask,
                                               timestep, query_scale)
        return velocity[..., :width] if pad_w else velocity


@dataclass(frozen=True)
class WarmupShape:
    """One ``dit_decoder`` call shape to compile and capture before a model reports ready:
    ``batch`` rows (items x guidance branches, merged requests included), ``frames`` latent
    frames W and ``tokens`` encoder tokens S, normally sizes of the endpoints' bucket ladders."""

    batch: int
    frames: int
    tokens: int

    def __post_init__(self) -> None:
        for name in ("batch", "frames", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{WARMUP_PARAMETER}: {name} must be a positive int, got {value!r}")

    def __str__(self) -> str:
        return f"{self.batch}:{self.frames}:{self.tokens}"


DEFAULT_WARMUP: tuple[WarmupShape, ...] = tuple(
    WarmupShape(batch, frames, 512) for frames in (384, 768, 1536, MAX_FRAMES) for batch in (1, 2))
"""What ``warmup`` = ``default`` compiles and captures: one song at 30, 60, 120 and 240 s
(frame buckets 384, 768, 1536, 2583), guided (2 rows: conditional + unconditional, the default
``apg`` request) and conditional-only (1 row, outside the guidance interval), with prompt and
lyrics up to 511 encoder tokens. Eight shapes: half the default ``max_graphs`` (16), leaving
room for the shapes real traffic adds. A deployment whose traffic differs lists its own."""


def parse_warmup(text: str | None, default: tuple[WarmupShape, ...] = DEFAULT_WARMUP) -> tuple[WarmupShape, ...]:
    """The ``warmup`` config parameter: ``"default"`` (:data:`DEFAULT_WARMUP`, or ``default``),
    ``"none"`` / ``""`` (no warm-up), or ``"batch:frames:tokens,..."`` (e.g. ``"2:768:512"``).

    Duplicates are dropped, the order is kept (the first shapes are compiled first). Raises
    ``ValueError("warmup: ...")`` for anything else.
    """
    spec = (text or "").strip()
    if spec.lower() == "default":
        return tuple(default)
    if spec.lower() in ("", "none"):
        return ()
    shapes: list[WarmupShape] = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            shape = WarmupShape(*(int(f) for f in fields))
        except ValueError:
            raise ValueError(f"{WARMUP_PARAMETER}: expected 'default', 'none' or comma-separated "
                             f"batch:frames:tokens with positive integers, got {part.strip()!r} "
                             f"in {text!r}") from None
        if shape not in shapes:
            shapes.append(shape)
    return tuple(shapes)

"""Classifier-free guidance variants of ACE-Step and the guidance-interval schedule.

All functions take per-branch velocities shaped [B, C, H, W] (B = items of the request) and
return the guided velocity. Formulas (see ACE_STEP_FACTS.md):

- cfg: ``u + s·(c − u)``
- apg (adaptive projected guidance): ``d = c − u`` smoothed by a momentum buffer
  (``r ← d + μ·r``, μ = −0.75), clipped to an L2 norm ≤ 2.5 over the last two dims per (B, C),
  then only its component orthogonal to ``c`` is kept (projection in float64):
  ``c + (s − 1)·d_⊥``.
- cfg_star (CFG-Zero*): ``α = ⟨c, u⟩ / (‖u‖² + 1e-8)`` per item, ``α·u + s·(c − α·u)``; at the
  first steps (global step index ≤ zero_steps) the output is zero ("zero init").
- double condition: ``(1 − g_t)·u + (g_t − g_l)·c_text + g_l·c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CFG_TYPES = ("apg", "cfg", "cfg_star")
#: APG's reductions run over the last two dims (height 16 and the frame axis) per (item, channel).
APG_DIMS = (-1, -2)


class MomentumBuffer:
    """APG's running average of the guidance difference: ``r ← d + momentum·r`` (starts at 0).

    One buffer lives for a whole generation and is updated at every guided model evaluation
    (heun's predictor and corrector each count).
    """

    def __init__(self, momentum: float = -0.75) -> None:
        self.momentum = momentum
        self.average: torch.Tensor | None = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        if self.average is None:
            self.average = diff + self.momentum * 0.0
        else:
            self.average = diff + self.momentum * self.average
        return self.average


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classic classifier-free guidance."""
    return uncond + scale * (cond - uncond)


def project(
    vector: torch.Tensor, direction: torch.Tensor, dims: tuple[int, ...] = APG_DIMS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``vector`` into components parallel and orthogonal to ``direction`` over ``dims``.

    Done in float64 (as upstream) because the orthogonal part is a small difference of large
    numbers; results come back in ``vector``'s dtype.
    """
    dtype = vector.dtype
    v = vector.double()
    unit = torch.nn.functional.normalize(direction.double(), dim=dims)
    parallel = (v * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = v - parallel
    return parallel.to(dtype), orthogonal.to(dtype)


def apg(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    momentum: MomentumBuffer | None = None,
    norm_threshold: float = 2.5,
    eta: float = 0.0,
    dims: tuple[int, ...] = APG_DIMS,
) -> torch.Tensor:
    """Adaptive projected guidance (momentum, norm clip, orthogonal projection)."""
    diff = cond - uncond
    if momentum is not None:
        diff = momentum.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    parallel, orthogonal = project(diff, cond, dims)
    return cond + (scale - 1) * (orthogonal + eta * parallel)


def cfg_star(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    step_index: int,
    zero_steps: int = 1,
    use_zero_init: bool = True,
) -> torch.Tensor:
    """CFG-Zero*: optimised unconditional scale ``α`` per item, zero output at the first steps.

    ``step_index`` is the global loop index (not the index inside the guidance interval), so
    zero init only triggers when the interval starts at 0 — as upstream.
    """
    if use_zero_init and step_index <= zero_steps:
        return cond * 0.0
    items = cond.shape[0]
    c = cond.reshape(items, -1)
    u = uncond.reshape(items, -1)
    alpha = (c * u).sum(dim=1, keepdim=True) / ((u**2).sum(dim=1, keepdim=True) + 1e-8)
    alpha = alpha.view(items, *([1] * (cond.dim() - 1)))
    return uncond * alpha + scale * (cond - uncond * alpha)


def double_condition(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    text_only: torch.Tensor,
    scale_text: float,
    scale_lyric: float,
) -> torch.Tensor:
    """Separate text and lyric guidance strengths (needs the text-only branch)."""
    return (1 - scale_text) * uncond + (scale_text - scale_lyric) * text_only + scale_lyric * cond


@dataclass(frozen=True)
class GuidanceInterval:
    """The loop indices ``start ≤ i < end`` where guidance (several branches) is applied.

    Sized from ``num_steps`` (upstream's ``num_inference_steps``) even when the loop runs
    longer (heun's 2N − 1 evaluations), which is upstream's behaviour.
    """

    start: int
    end: int

    @classmethod
    def from_fraction(cls, num_steps: int, guidance_interval: float) -> GuidanceInterval:
        return cls(
            start=int(num_steps * ((1 - guidance_interval) / 2)),
            end=int(num_steps * (guidance_interval / 2 + 0.5)),
        )

    def __contains__(self, step_index: int) -> bool:
        return self.start <= step_index < self.end


def scale_at(
    step_index: int,
    interval: GuidanceInterval,
    guidance_scale: float,
    min_guidance_scale: float,
    decay: float,
) -> float:
    """Guidance scale at a step inside the interval, decaying linearly towards the minimum.

    ``s − (s − s_min)·progress·decay`` with ``progress = (i − start)/(end − start − 1)``. An
    interval of a single step (where upstream divides by zero) uses progress 0.
    """
    if decay <= 0:
        return guidance_scale
    span = interval.end - interval.start - 1
    progress = (step_index - interval.start) / span if span > 0 else 0.0
    return guidance_scale - (guidance_scale - min_guidance_scale) * progress * decay

"""What a caller plugs into a sampling run besides the request's numbers.

Every sampler (``loop.sample_text2music``, ``run_sampling``, the ``tasks``) takes one
``SamplingHooks`` and hands it down unchanged to ``loop.integrate`` (and its ``row_query_scale``
to ``loop.GuidedVelocity``). One object instead of four keyword arguments: a new hook is added
here, not to every sampler's signature, and no sampler can forget to pass one on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from acestep_client.limits import CancelFn

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: called after each loop iteration of a sampling run."""


@dataclass(frozen=True)
class StepTrace:
    """One loop iteration, for observers (debugging against upstream traces)."""

    index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    velocity: torch.Tensor
    next_sample: torch.Tensor


@dataclass(frozen=True)
class SamplingHooks:
    """Observers, cancellation and the backend's call style for one sampling run.

    ``progress(done, total)`` after every loop iteration; ``should_cancel()`` before each
    (True: ``loop.SamplingCancelled``); ``on_step(StepTrace)`` after each step (tests compare
    every step with upstream's trace). None: not called.

    ``row_query_scale``: the backend takes a per-row DiT query scale [B, Ld], so every guided
    step is one ``predict_velocity`` call, ERG-weakened rows included. Every served backend
    and the in-process pipeline do (``pipeline.MusicGenerator`` sets it). The default False
    is what the ``ComponentBackend`` protocol promises, one [Ld] vector per call (one call per
    distinct vector); tests keep it to check that grouping and their toy backends rely on it.
    Results agree either way up to the backend's batch-size-dependent rounding.
    """

    progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None
    on_step: Callable[[StepTrace], None] | None = None
    row_query_scale: bool = False


NO_HOOKS = SamplingHooks()
"""The default of every sampler: nothing observed, never cancelled, one query scale per call."""

"""Sigma schedules of ACE-Step's flow-matching samplers.

Flow matching here means ``x_σ = (1 − σ)·x0 + σ·ε``; the DiT is fed ``t = σ·1000``. The numbers
must match upstream to the last float32 bit where we can, because users compare outputs for a
fixed seed. That is why the dtype of every intermediate is chosen deliberately below:

1. The training range: 1000 points ``linspace(1, 1000·σ_max)`` in float32, divided by 1000 and
   shifted with ``σ' = 3σ / (1 + 2σ)`` in float32. Its ends are ``σ_hi`` (1.0 for text2music)
   and ``σ_lo`` = shift(0.001) = 0.002994.
2. The inference schedule: ``linspace(1000·σ_hi, 1000·σ_lo, N) / 1000`` in float64, shifted
   *again* (upstream applies the shift twice), cast to float32; then a final 0 is appended.
   27 steps: 1.0, 0.9869, …, 0.00893.
3. ``oss_steps`` ("optimal steps"): build the schedule for N = max(oss_steps), keep the given
   1-based step indices, and shift those sigmas a third time (float32), as upstream does.
4. audio2audio: the training range is built with ``σ_max = 1 − ref_audio_strength``; the
   reference latents are noised to the *shifted* ``σ_hi`` (``Schedule.noise_level``) while the
   first sampling step sits at shift(σ_hi). Both quirks are upstream's and are kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Timestep shift of the released model's schedulers.
SHIFT = 3.0
#: The DiT's timestep unit: t = σ · NUM_TRAIN_TIMESTEPS.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Schedule:
    """The σ points of one sampling run.

    ``sigmas`` has ``num_steps + 1`` float32 entries ending with 0; ``timesteps`` are the
    float32 ``σ·1000`` values of the first ``num_steps`` (what the DiT sees). ``num_steps`` is
    what upstream calls ``num_inference_steps``: it sizes the guidance interval even when a
    scheduler (heun) evaluates the model more often. ``noise_level`` is the σ a clean
    reference is noised to before sampling (audio2audio; 1.0 for pure noise).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    noise_level: float = 1.0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float = SHIFT) -> np.ndarray | torch.Tensor:
    """The resolution shift ``σ' = s·σ / (1 + (s − 1)·σ)``, evaluated in the input's own dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigma_range(sigma_max: float = 1.0, shift: float = SHIFT) -> tuple[float, float]:
    """(σ_hi, σ_lo): the shifted ends of the 1000-point training range, computed in float32.

    Only the two ends matter, and float32 ``linspace`` sets its endpoints exactly, so the
    full 1000-point grid is not needed.
    """
    ends = np.array([NUM_TRAIN_TIMESTEPS * sigma_max, 1.0], dtype=np.float64).astype(np.float32)
    sig = torch.from_numpy(ends) / NUM_TRAIN_TIMESTEPS
    sig = shift_sigmas(sig, shift)
    return float(sig[0].item()), float(sig[1].item())


def _from_float32_sigmas(sigmas: torch.Tensor, noise_level: float) -> Schedule:
    sigmas = sigmas.to(torch.float32)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return Schedule(
        sigmas=torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)]),
        timesteps=timesteps,
        noise_level=noise_level,
    )


def flow_match_schedule(num_steps: int, sigma_max: float = 1.0, shift: float = SHIFT) -> Schedule:
    """The standard N-step schedule (``sigma_max`` < 1 only for audio2audio)."""
    if num_steps < 0:
        raise ValueError(f"infer_step: must be >= 0, got {num_steps}")
    hi, lo = training_sigma_range(sigma_max, shift)
    sig = np.linspace(hi * NUM_TRAIN_TIMESTEPS, lo * NUM_TRAIN_TIMESTEPS, num_steps) / NUM_TRAIN_TIMESTEPS
    sig = shift_sigmas(sig, shift)
    return _from_float32_sigmas(torch.from_numpy(sig), noise_level=hi)


def parse_oss_steps(spec: str | Sequence[int] | None) -> tuple[int, ...]:
    """Parse ``oss_steps`` ("1,3,5,8", a list of ints, or None/"" for none).

    Upstream accepts anything ``int()`` parses and silently wraps index 0 to the last step;
    we reject indices < 1 and non-increasing lists, which upstream turns into a meaningless
    schedule.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return ()
        try:
            steps = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"oss_steps: expected comma-separated integers, got {spec!r}") from None
    else:
        steps = tuple(int(s) for s in spec)
    if any(s < 1 for s in steps):
        raise ValueError(f"oss_steps: step indices are 1-based, got {list(steps)}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"oss_steps: step indices must be strictly increasing, got {list(steps)}")
    return steps


def oss_schedule(oss_steps: Sequence[int], shift: float = SHIFT) -> Schedule:
    """Custom schedule from 1-based step indices into the max(oss_steps)-step schedule."""
    steps = parse_oss_steps(oss_steps)
    if not steps:
        raise ValueError("oss_steps: empty")
    base = flow_match_schedule(max(steps), shift=shift)
    picked = base.timesteps[[s - 1 for s in steps]]
    sig = (picked / NUM_TRAIN_TIMESTEPS).numpy()  # float32, as upstream hands it back to numpy
    sig = shift_sigmas(sig, shift)  # float32 numpy: the third shift
    return _from_float32_sigmas(torch.from_numpy(np.asarray(sig, dtype=np.float32)), base.noise_level)


def audio2audio_steps(ref_audio_strength: float, infer_step: int) -> int:
    """Number of steps audio2audio runs: ``int((1 − strength)·infer_step)``."""
    return int((1.0 - ref_audio_strength) * infer_step)


def audio2audio_schedule(ref_audio_strength: float, infer_step: int, shift: float = SHIFT) -> Schedule:
    """Schedule for audio2audio: σ_max = 1 − strength, int(σ_max·N) steps.

    ``noise_level`` is the (shifted) σ the reference latents are mixed with noise at.
    """
    sigma_max = 1.0 - ref_audio_strength
    if not 0.0 < sigma_max <= 1.0:
        raise ValueError(f"ref_audio_strength: must be in [0, 1), got {ref_audio_strength}")
    steps = audio2audio_steps(ref_audio_strength, infer_step)
    if steps < 1:
        raise ValueError(
            f"ref_audio_strength: {ref_audio_strength} with infer_step {infer_step} leaves no denoising step"
        )
    return flow_match_schedule(steps, sigma_max=sigma_max, shift=shift)


def heun_points(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Heun's evaluation grid: timesteps t0, t1, t1, t2, t2, … (2N − 1) and the matching sigmas.

    Every interior point is visited twice (predictor then corrector), the last step is a
    plain Euler step to σ = 0.
    """
    ts, sig = schedule.timesteps, schedule.sigmas
    timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    return timesteps, sigmas

"""The three flow-matching ODE/SDE steppers of ACE-Step: euler, heun and pingpong.

Each scheduler owns its evaluation grid (``timesteps``: where the model is queried, in order)
and a step counter, and turns the guided velocity ``v = dx/dσ`` at the current point into the
next sample. Arithmetic is float32 and follows upstream's order of operations so results
match it to rounding.

omega ("mean shift"): euler and heun scale the deviation of each update from its mean,
``dx' = (dx − mean(dx))·ω' + mean(dx)`` with ``ω' = 0.9 + 0.2 / (1 + exp(−0.1·omega_scale))``.
The mean is over the *whole* tensor, batch included, so items of one batch influence each
other slightly (upstream behaviour, kept so batched results match upstream's).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .schedule import Schedule, heun_points

SCHEDULER_TYPES = ("euler", "heun", "pingpong")


def omega_rescale(omega_scale: float) -> float:
    """Map the user's ``omega_scale`` to the mean-shift factor: a logistic curve in (0.9, 1.1)."""
    return 0.9 + 0.2 / (1.0 + math.exp(-0.1 * float(omega_scale)))


def mean_shifted_update(sample: torch.Tensor, dx: torch.Tensor, omega: float) -> torch.Tensor:
    """``sample + (dx − m)·ω + m`` with ``m`` the mean of ``dx`` over every element."""
    m = dx.mean()
    return sample + ((dx - m) * omega + m)


class Scheduler(Protocol):
    """What the sampling loop needs from a stepper."""

    @property
    def timesteps(self) -> torch.Tensor:
        """float32 [K]: the DiT timesteps (σ·1000) to evaluate, in order (K = len of the loop)."""
        ...

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` by one grid point with the guided ``velocity`` evaluated at it."""
        ...


class _Stepper:
    """Shared bookkeeping: the sigma grid and the index of the next step."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self._timesteps = timesteps
        self._sigmas = sigmas
        self._index = 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @property
    def step_index(self) -> int:
        return self._index

    def _sigma(self, index: int, like: torch.Tensor) -> torch.Tensor:
        return self._sigmas[index].to(like.device)

    def _check_not_done(self) -> None:
        if self._index >= self._timesteps.shape[0]:
            raise RuntimeError("scheduler stepped past the end of its schedule")

    def _advance(self) -> None:
        self._index += 1

    def _take_step(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ_next) of the step being taken, on ``sample``'s device; moves on to the next one."""
        self._check_not_done()
        sigma = self._sigma(self._index, sample)
        sigma_next = self._sigma(self._index + 1, sample)
        self._advance()
        return sigma, sigma_next


class EulerScheduler(_Stepper):
    """First-order step ``dx = (σ_next − σ)·v`` with the omega mean shift."""

    def __init__(self, schedule: Schedule, omega_scale: float) -> None:
        super().__init__(schedule.timesteps, schedule.sigmas)
        self.omega = omega_rescale(omega_scale)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sample = sample.to(torch.float32)
        sigma, sigma_next = self._take_step(sample)
        return mean_shifted_update(sample, (sigma_next - sigma) * velocity, self.omega)


class HeunScheduler(_Stepper):
    """Second-order Heun: predictor at σ_i, corrector at σ_{i+1}, averaged derivative.

    The grid is t0, t1, t1, t2, t2, …, t_{N−1}, t_{N−1} (2N − 1 model calls); the final visit
    takes a plain Euler step to σ = 0. The derivative is formed as ``(x − (x − σ·v)) / σ``
    exactly as upstream writes it (a no-churn Karras step), which is v up to float32 rounding.
    """

    def __init__(self, schedule: Schedule, omega_scale: float) -> None:
        timesteps, sigmas = heun_points(schedule)
        super().__init__(timesteps, sigmas)
        self.omega = omega_rescale(omega_scale)
        self._first_derivative: torch.Tensor | None = None
        self._dt: torch.Tensor | None = None
        self._origin: torch.Tensor | None = None

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self._check_not_done()
        sample = sample.to(torch.float32)
        i = self._index
        if self._dt is None:  # predictor (first-order) half
            sigma = self._sigma(i, sample)
            sigma_next = self._sigma(i + 1, sample)
            denoised = sample - velocity * sigma
            derivative = (sample - denoised) / sigma
            dt = sigma_next - sigma
            self._first_derivative, self._dt, self._origin = derivative, dt, sample
        else:  # corrector half: re-evaluated at σ_next, restart from the stored sample
            sigma_next = self._sigma(i, sample)
            denoised = sample - velocity * sigma_next
            derivative = 0.5 * (self._first_derivative + (sample - denoised) / sigma_next)
            dt, sample = self._dt, self._origin
            self._first_derivative = self._dt = self._origin = None
        self._advance()
        return mean_shifted_update(sample, derivative * dt, self.omega)


class PingPongScheduler(_Stepper):
    """Stochastic step: predict x0 = x − σ·v, re-noise it to σ_next with fresh noise.

    The fresh noise comes from ``generator`` (upstream: the first item's seed generator,
    continuing after the initial noise draw), drawn on the generator's device in float32
    with the whole batch's shape. omega is ignored, as upstream does.
    """

    def __init__(self, schedule: Schedule, generator: torch.Generator | None = None) -> None:
        super().__init__(schedule.timesteps, schedule.sigmas)
        self.generator = generator

    def _fresh_noise(self, like: torch.Tensor) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else like.device
        noise = torch.empty(like.shape, dtype=torch.float32, device=device)
        return noise.normal_(generator=self.generator).to(like.device)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sample = sample.to(torch.float32)
        sigma, sigma_next = self._take_step(sample)
        denoised = sample - sigma * velocity
        return (1 - sigma_next) * denoised + sigma_next * self._fresh_noise(sample)


def make_scheduler(
    scheduler_type: str,
    schedule: Schedule,
    omega_scale: float,
    generator: torch.Generator | None = None,
) -> Scheduler:
    """Build the stepper named by ``scheduler_type`` (euler | heun | pingpong)."""
    if scheduler_type == "euler":
        return EulerScheduler(schedule, omega_scale)
    if scheduler_type == "heun":
        return HeunScheduler(schedule, omega_scale)
    if scheduler_type == "pingpong":
        return PingPongScheduler(schedule, generator)
    raise ValueError(f"scheduler_type: must be one of {', '.join(SCHEDULER_TYPES)}, got {scheduler_type!r}")

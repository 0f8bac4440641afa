"""The update rule of the repaint/extend and edit loops: Euler on σ = t/1000.

Upstream's task loops (repaint, extend, FlowEdit) do not call the configured scheduler. They
step ``x ← x + (σ_next − σ)·v`` themselves, with ``σ = t/1000`` recomputed from the DiT
timestep (float32; this can differ from the scheduler's own σ in the last bit, so we use
exactly this) and ``σ_next = 0`` after the last point; no omega mean shift, no heun
corrector. Only FlowEdit's ordinary-sampling phase has a pingpong variant.

``TimestepEuler`` is such a stepper for ``loop.integrate`` (it satisfies the ``Scheduler``
protocol); repaint and edit subclass it for what they do around the update.
"""

from __future__ import annotations

import torch

from ..schedule import NUM_TRAIN_TIMESTEPS


def timestep_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
    """float32 [K + 1]: ``t/1000`` at each of the K timesteps, then 0."""
    zero = torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)
    return torch.cat([timesteps / NUM_TRAIN_TIMESTEPS, zero])


def euler_update(
    sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """``x + (σ_next − σ)·v`` in float32 (upstream's order of operations)."""
    dt = (sigma_next - sigma).to(sample.device)
    return sample.to(torch.float32) + dt * velocity


def pingpong_update(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Predict x0 = x − σ·v and re-noise it to σ_next with fresh whole-batch noise.

    The noise is drawn like the pingpong scheduler's (float32, on the generator's device).
    """
    sigma, sigma_next = sigma.to(sample.device), sigma_next.to(sample.device)
    denoised = sample.to(torch.float32) - sigma * velocity
    device = generator.device if generator is not None else sample.device
    noise = torch.empty(sample.shape, dtype=torch.float32, device=device).normal_(generator=generator)
    return (1 - sigma_next) * denoised + sigma_next * noise.to(sample.device)


def noised(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching path point ``(1 − σ)·x0 + σ·ε``."""
    sigma = sigma.to(clean.device)
    return (1 - sigma) * clean + sigma * noise


class TimestepEuler:
    """Euler steps over ``timesteps[first:]`` with σ = t/1000 (a ``Scheduler`` for ``integrate``).

    ``index`` is the global index of the next step (``first`` before the first one).
    """

    def __init__(self, timesteps: torch.Tensor, first: int = 0) -> None:
        if not 0 <= first <= timesteps.shape[0]:
            raise ValueError(f"first step {first} outside a {timesteps.shape[0]}-step schedule")
        self._grid = timesteps
        self.sigmas = timestep_sigmas(timesteps)
        self.first = first
        self.index = first

    @property
    def timesteps(self) -> torch.Tensor:
        return self._grid[self.first :]

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ_next) of the step being taken; moves ``index`` on."""
        i = self.index
        if i >= self._grid.shape[0]:
            raise RuntimeError("stepped past the end of the schedule")
        self.index = i + 1
        return self.sigmas[i], self.sigmas[i + 1]

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.advance()
        return euler_update(sample, velocity, sigma, sigma_next)

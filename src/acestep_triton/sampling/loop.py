"""The sampling loop: guided velocity at each grid point, then a scheduler step.

Differences from upstream that do not change results:

- Guidance branches (conditional, text-only, unconditional) of a step are stacked along the
  batch axis into one ``predict_velocity`` call instead of one call each. The DiT treats rows
  independently, so each row's velocity equals upstream's separate call (up to the backend's
  batch-size-dependent rounding).
- Upstream's ERG-diffusion branch runs the DiT with queries of blocks 15–19 scaled by 0.01,
  which the component contract expresses as a query-scale vector [Ld] per call. Rows that need
  different vectors therefore go into separate calls (two per guided step with ERG diffusion:
  conditional + text-only, then unconditional), unless the backend takes a per-row scale
  [B, Ld] (``SamplingHooks.row_query_scale``): then every step is exactly one call.

Extension points for the other tasks: ``GuidedVelocity`` is the complete "model + guidance"
evaluation at one loop index; ``integrate`` is the loop itself, driving any velocity function
with any stepper (repaint/extend/edit plug in their own update rules, see ``tasks/``);
``run_sampling`` runs any schedule from any starting latents with the configured scheduler
(retake and audio2audio only change those two).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from .backend import ComponentBackend
from .conditions import EncodedConditions
from .config import SamplerConfig
from .erg import dit_query_scale
from .guidance import GuidanceInterval, MomentumBuffer, apg, cfg, cfg_star, double_condition, scale_at
from .hooks import NO_HOOKS, SamplingHooks, StepTrace
from .schedule import Schedule
from .schedulers import Scheduler, make_scheduler

#: ``(latents, global step index, DiT timestep) -> guided velocity`` (``GuidedVelocity`` is one).
VelocityFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class SamplingCancelled(Exception):  # noqa: N818 (name fixed by the orchestrator contract)
    """Raised between steps when ``should_cancel()`` returns True (the client went away)."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"sampling cancelled before step {step + 1} of {total}")
        self.step = step
        self.total = total


class Branch(enum.Enum):
    """The guidance branches, in upstream's evaluation order."""

    COND = "cond"
    TEXT_ONLY = "text_only"
    UNCOND = "uncond"


class GuidedVelocity:
    """Model evaluation plus guidance at one loop index; owns APG's momentum buffer.

    Create one per generation (the momentum buffer carries state across steps).
    ``num_steps`` sizes the guidance interval (``Schedule.num_steps``).
    """

    def __init__(
        self,
        backend: ComponentBackend,
        conditions: EncodedConditions,
        config: SamplerConfig,
        num_steps: int,
        items: int,
        latent_mask: torch.Tensor,
        row_query_scale: bool = False,
    ) -> None:
        self.backend = backend
        self.config = config
        self.items = items
        self.interval = GuidanceInterval.from_fraction(num_steps, config.guidance_interval)
        self.momentum = MomentumBuffer(config.apg_momentum)
        self.row_query_scale = row_query_scale
        self.latent_mask = latent_mask
        conditions = conditions.expand(items)
        device = conditions.cond.device
        normal = dit_query_scale(backend.dit_layers, False, device)
        weakened = dit_query_scale(backend.dit_layers, config.use_erg_diffusion, device)
        self._states: dict[Branch, torch.Tensor | None] = {
            Branch.COND: conditions.cond.contiguous(),
            Branch.TEXT_ONLY: None if conditions.text_only is None else conditions.text_only.contiguous(),
            Branch.UNCOND: None if conditions.uncond is None else conditions.uncond.contiguous(),
        }
        mask = conditions.mask.contiguous()
        uncond_mask = mask if conditions.uncond_mask is None else conditions.uncond_mask.contiguous()
        self._masks = {Branch.COND: mask, Branch.TEXT_ONLY: mask, Branch.UNCOND: uncond_mask}
        self._scales = {Branch.COND: normal, Branch.TEXT_ONLY: normal, Branch.UNCOND: weakened}

    def branches(self, step_index: int) -> tuple[Branch, ...]:
        """The branches evaluated at ``step_index`` (one outside the guidance interval)."""
        if not (self.config.do_guidance and step_index in self.interval):
            return (Branch.COND,)
        if self.config.double_condition:
            return (Branch.COND, Branch.TEXT_ONLY, Branch.UNCOND)
        return (Branch.COND, Branch.UNCOND)

    def _calls(self, branches: tuple[Branch, ...]) -> list[tuple[Branch, ...]]:
        """Group branches into DiT calls: one call per distinct query-scale vector (or one)."""
        if self.row_query_scale:
            return [branches]
        groups: list[tuple[Branch, ...]] = []
        for branch in branches:
            for g, group in enumerate(groups):
                if torch.equal(self._scales[group[0]], self._scales[branch]):
                    groups[g] = (*group, branch)
                    break
            else:
                groups.append((branch,))
        return groups

    def _run_call(
        self, group: tuple[Branch, ...], latents: torch.Tensor, timestep: torch.Tensor
    ) -> dict[Branch, torch.Tensor]:
        states = []
        masks = [self._masks[branch] for branch in group]
        for branch in group:
            s = self._states[branch]
            if s is None:
                raise ValueError(f"guidance needs the {branch.value} encoder states, which were not built")
            states.append(s)
        k = len(group)
        rows = k * self.items
        if self.row_query_scale:
            scale = torch.cat([self._scales[b].unsqueeze(0).expand(self.items, -1) for b in group])
        else:
            scale = self._scales[group[0]]
        velocity = self.backend.predict_velocity(
            latents if k == 1 else torch.cat([latents] * k),
            self.latent_mask if k == 1 else torch.cat([self.latent_mask] * k),
            states[0] if k == 1 else torch.cat(states),
            masks[0] if k == 1 else torch.cat(masks),
            timestep.reshape(1).to(device=latents.device, dtype=torch.float32).repeat(rows),
            scale.contiguous(),
        )
        return dict(zip(group, velocity.split(self.items), strict=True))

    def __call__(self, latents: torch.Tensor, step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        branches = self.branches(step_index)
        out: dict[Branch, torch.Tensor] = {}
        for group in self._calls(branches):
            out.update(self._run_call(group, latents, timestep))
        if len(branches) == 1:
            return out[Branch.COND]
        conf = self.config
        cond, uncond = out[Branch.COND], out[Branch.UNCOND]
        if conf.double_condition:
            return double_condition(
                cond, uncond, out[Branch.TEXT_ONLY], conf.guidance_scale_text, conf.guidance_scale_lyric
            )
        scale = scale_at(
            step_index,
            self.interval,
            conf.guidance_scale,
            conf.min_guidance_scale,
            conf.guidance_interval_decay,
        )
        if conf.cfg_type == "apg":
            return apg(cond, uncond, scale, self.momentum, conf.apg_norm_threshold)
        if conf.cfg_type == "cfg":
            return cfg(cond, uncond, scale)
        return cfg_star(cond, uncond, scale, step_index, conf.zero_steps, conf.use_zero_init)


def integrate(
    velocity: VelocityFn,
    stepper: Scheduler,
    latents: torch.Tensor,
    *,
    first_index: int = 0,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """The one sampling loop: at each of ``stepper.timesteps`` evaluate, then step.

    ``velocity(latents, i, t)`` is the guided velocity at global loop index ``i`` (what the
    guidance interval is keyed on) and DiT timestep ``t``; ``stepper`` turns it into the next
    sample (any ``Scheduler``: the text2music schedulers, or a task's own update rule).
    ``first_index`` is the global index of ``stepper.timesteps[0]``: tasks that skip the
    first steps of a schedule (repaint, edit) start later but keep upstream's indices.
    ``hooks.progress(done, total)`` and ``SamplingCancelled`` count the iterations of this call.
    """
    timesteps = stepper.timesteps
    total = int(timesteps.shape[0])
    for k in range(total):
        if hooks.should_cancel is not None and hooks.should_cancel():
            raise SamplingCancelled(k, total)
        i = first_index + k
        t = timesteps[k]
        v = velocity(latents, i, t)
        next_latents = stepper.step(v, latents)
        if hooks.on_step is not None:
            hooks.on_step(StepTrace(i, t, latents, v, next_latents))
        latents = next_latents
        if hooks.progress is not None:
            hooks.progress(k + 1, total)
    return latents


def run_sampling(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    latents: torch.Tensor,
    schedule: Schedule,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    latent_mask: torch.Tensor | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """Integrate from ``latents`` (at σ = schedule's first point) down to σ = 0.

    ``generator`` feeds pingpong's per-step noise (upstream: the first item's seed
    generator after the initial draw, i.e. ``SeededNoise.step_generator``).
    ``hooks.progress(done, total)`` is called after every loop iteration (total = model
    evaluation points: N, or 2N − 1 for heun); ``hooks.should_cancel()`` is checked before each.
    """
    items, frames = latents.shape[0], latents.shape[-1]
    if latent_mask is None:
        latent_mask = torch.ones(items, frames, dtype=torch.float32, device=latents.device)
    scheduler = make_scheduler(config.scheduler_type, schedule, config.omega_scale, generator)
    guided = GuidedVelocity(
        backend, conditions, config, schedule.num_steps, items, latent_mask, hooks.row_query_scale
    )
    return integrate(guided, scheduler, latents, hooks=hooks)


def sample_text2music(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    noise: torch.Tensor,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    latent_mask: torch.Tensor | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """text2music: sample final latents [B,8,16,W] from initial ``noise`` [B,8,16,W].

    ``conditions`` come from ``conditions.build_conditions`` (batch 1 or B). For pingpong pass
    ``generator=SeededNoise.step_generator`` to reproduce upstream.
    """
    return run_sampling(backend, conditions, noise, config.schedule(), config, generator=generator,
                        latent_mask=latent_mask, hooks=hooks)

"""edit (FlowEdit): move the source latents from the source conditions towards the target ones.

FlowEdit integrates the *difference* of two velocity fields along the path between the
source and the edit, without inverting the source. With N = ``infer_step`` (upstream builds
the plain N-step schedule here: ``oss_steps`` are ignored), ``n_min = int(N·edit_n_min)``,
``n_max = int(N·edit_n_max)`` and ``z_edit = x_src`` at first:

- steps ``i < n_min`` are skipped;
- steps ``n_min ≤ i < n_max`` (FlowEdit): ``edit_n_avg`` times, draw ε from the retake
  generators, ``z_src = (1 − σ)·x_src + σ·ε``, ``z_tar = z_edit + z_src − x_src``, and average
  ``V_tar(z_tar) − V_src(z_src)`` (σ = t/1000); then ``z_edit += (σ_next − σ)·ΔV``;
- at ``i = n_max`` (if < N): draw ε once more and hand over to ordinary sampling of
  ``x = z_edit + (σ·ε + (1 − σ)·x_src) − x_src`` (σ = the scheduler's σ_{n_max}) with the
  target conditions alone, Euler on σ = t/1000 (heun too; omega_scale unused) or pingpong;
- the result is ``x`` if that phase ran, else ``z_edit``.

Guidance is upstream's ``calc_v``, not text2music's: for each of source and target one DiT
call on [conditional; unconditional] rows, combined by APG at *every* step with the full
``guidance_scale`` (no guidance interval, no decay, ``cfg_type`` ignored), no ERG anywhere.
The unconditional rows have zero text states (text mask kept), zero speaker, zero lyric ids
*and a zero lyric mask* (``encode_edit_conditions``). APG momentum: the source velocity keeps
one buffer through the FlowEdit steps, the target velocity has none there, and the
ordinary-sampling phase starts a fresh target buffer (all as upstream).

Noise: every ε above, in order, is ``SeededNoise.draw_latents`` of the *retake* seeds;
pingpong's step noise comes from the retake generator of item 0.

Deliberate differences from upstream:

- pingpong during the FlowEdit steps: upstream computes a pingpong update but never assigns
  it (``z_edit`` stays the source; the draw still advances the generator). Re-noising
  ``z_edit`` would be wrong anyway: it is an offset between two paths, not a sample at σ. We
  take the FlowEdit ODE step for every scheduler there; pingpong applies to the
  ordinary-sampling phase only (where upstream's works).
- batches: upstream's edit only runs with one item (its noise and condition batches
  disagree otherwise); we broadcast the source to every item, each item drawing from its own
  retake generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from acestep_client.limits import EDIT_PRESETS

from ..backend import ComponentBackend
from ..conditions import EncodedConditions, PromptTokens, encode_prompt, speaker_or_zeros
from ..config import SamplerConfig
from ..erg import lyric_query_scale
from ..hooks import NO_HOOKS, SamplingHooks
from ..loop import GuidedVelocity, integrate
from ..noise import SeededNoise
from ..schedule import flow_match_schedule
from .steps import TimestepEuler, euler_update, pingpong_update


@dataclass(frozen=True)
class EditSteps:
    """FlowEdit runs at ``n_min ≤ i < n_max`` of ``num_steps``, ordinary sampling after."""

    num_steps: int
    n_min: int
    n_max: int
    n_avg: int = 1

    @classmethod
    def from_request(
        cls, edit_n_min: float, edit_n_max: float, edit_n_avg: int, infer_step: int
    ) -> EditSteps:
        """Upstream's ``int(N·edit_n_min)``, ``int(N·edit_n_max)``, validated."""
        if infer_step < 1:
            raise ValueError(f"infer_step: must be >= 1, got {infer_step}")
        for name, value in (("edit_n_min", edit_n_min), ("edit_n_max", edit_n_max)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value}")
        if edit_n_min > edit_n_max:
            raise ValueError(f"edit_n_min: must be <= edit_n_max ({edit_n_max}), got {edit_n_min}")
        if isinstance(edit_n_avg, bool) or int(edit_n_avg) != edit_n_avg or edit_n_avg < 1:
            raise ValueError(f"edit_n_avg: must be an integer >= 1, got {edit_n_avg}")
        return cls(infer_step, int(infer_step * edit_n_min), int(infer_step * edit_n_max), int(edit_n_avg))

    @property
    def samples_after(self) -> bool:
        """Whether ordinary sampling follows the FlowEdit steps (``n_max < N``)."""
        return self.n_max < self.num_steps


def edit_preset(name: str) -> tuple[float, float]:
    """(edit_n_min, edit_n_max) of an upstream UI preset ("only_lyrics" or "remix")."""
    try:
        return EDIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"edit_type: must be one of {', '.join(EDIT_PRESETS)}, got {name!r}") from None


def edit_guidance_config(config: SamplerConfig) -> SamplerConfig:
    """``config`` as upstream's ``calc_v`` applies it: APG at every step, full scale, no ERG."""
    return replace(
        config,
        cfg_type="apg",
        guidance_interval=1.0,
        guidance_interval_decay=0.0,
        use_erg_diffusion=False,
        guidance_scale_text=0.0,
        guidance_scale_lyric=0.0,
        oss_steps=(),
    )


def encode_edit_conditions(
    backend: ComponentBackend, tokens: PromptTokens, config: SamplerConfig, speaker: torch.Tensor | None = None
) -> EncodedConditions:
    """Encoder states of one side of an edit (call once for source, once for target).

    Conditional: the prompt through the normal text encoder, zero speaker, the lyrics. The
    unconditional branch (only when guiding) is upstream's edit null condition: zero text
    states with the prompt's mask, zero speaker, zero lyric ids with a zero lyric mask; its
    encoder mask therefore differs and travels as ``uncond_mask``.
    """
    attention_mask, lyric_ids, lyric_mask = tokens.attention_mask, tokens.lyric_ids, tokens.lyric_mask
    text = encode_prompt(backend, tokens.input_ids, attention_mask, with_erg=False).states
    speaker = speaker_or_zeros(speaker, text)
    normal = lyric_query_scale(backend.lyric_layers, False, text.device)
    cond, mask = backend.encode_conditions(text, attention_mask, speaker, lyric_ids, lyric_mask, normal)
    if not config.do_guidance:
        return EncodedConditions(cond=cond, mask=mask)
    uncond, uncond_mask = backend.encode_conditions(
        torch.zeros_like(text),
        attention_mask,
        torch.zeros_like(speaker),
        torch.zeros_like(lyric_ids),
        torch.zeros_like(lyric_mask),
        normal,
    )
    return EncodedConditions(cond=cond, mask=mask, uncond=uncond, uncond_mask=uncond_mask)


class _FlowEditVelocity:
    """The velocity the loop integrates: ΔV during FlowEdit, V_tar during ordinary sampling."""

    def __init__(
        self,
        steps: EditSteps,
        source: torch.Tensor,
        noise: SeededNoise,
        v_src: GuidedVelocity,
        v_tar_edit: GuidedVelocity,
        v_tar_sample: GuidedVelocity,
        sigmas: torch.Tensor,
    ) -> None:
        self.steps, self.source, self.noise = steps, source, noise
        self.v_src, self.v_tar_edit, self.v_tar_sample = v_src, v_tar_edit, v_tar_sample
        self.sigmas = sigmas

    def __call__(self, latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        if i >= self.steps.n_max:
            return self.v_tar_sample(latents, i, t)
        x_src = self.source
        sigma = self.sigmas[i].to(x_src.device)
        n_avg = self.steps.n_avg
        delta = torch.zeros_like(x_src)
        for _ in range(n_avg):
            eps = self.noise.draw_latents(x_src.shape[-1]).to(x_src.device)
            z_src = (1 - sigma) * x_src + sigma * eps
            z_tar = latents + z_src - x_src
            v_src = self.v_src(z_src, i, t)
            v_tar = self.v_tar_edit(z_tar, i, t)
            delta += (1 / n_avg) * (v_tar - v_src)
        return delta


class _FlowEditStepper(TimestepEuler):
    """FlowEdit's ODE step on ``z_edit``; hands over to ordinary sampling after step n_max − 1."""

    def __init__(
        self,
        timesteps: torch.Tensor,
        steps: EditSteps,
        enter_sampling: Callable[[torch.Tensor], torch.Tensor],
        pingpong: torch.Generator | None,
        use_pingpong: bool,
    ) -> None:
        super().__init__(timesteps, steps.n_min)
        self.steps = steps
        self.enter_sampling = enter_sampling
        self.pingpong, self.use_pingpong = pingpong, use_pingpong

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.index
        sigma, sigma_next = self.advance()
        if i < self.steps.n_max:
            z_edit = euler_update(sample, velocity, sigma, sigma_next)
            if self.index == self.steps.n_max and self.steps.samples_after:
                return self.enter_sampling(z_edit)
            return z_edit
        if self.use_pingpong:
            return pingpong_update(sample, velocity, sigma, sigma_next, self.pingpong)
        return euler_update(sample, velocity, sigma, sigma_next)


def sample_edit(
    backend: ComponentBackend,
    source_conditions: EncodedConditions,
    target_conditions: EncodedConditions,
    source: torch.Tensor,
    noise: SeededNoise,
    config: SamplerConfig,
    *,
    edit_n_min: float = 0.0,
    edit_n_max: float = 1.0,
    edit_n_avg: int = 1,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """edit: FlowEdit ``source`` latents [1 or B, 8, 16, W] from the source to the target conditions.

    Both conditions come from ``encode_edit_conditions`` (source: the original prompt and
    lyrics; target: ``edit_target_prompt``/``edit_target_lyrics``). ``noise`` is the request's
    *retake*-seed ``SeededNoise`` (B = its batch size); it is drawn from as the edit goes.
    ``config`` supplies ``infer_step``, ``guidance_scale`` and ``scheduler_type`` (pingpong
    or not); the other guidance fields do not apply to edit (see the module docstring).
    ``hooks.progress``/``hooks.should_cancel`` count the N − n_min loop steps. Returns [B, 8, 16, W].
    """
    steps = EditSteps.from_request(edit_n_min, edit_n_max, edit_n_avg, config.infer_step)
    items, frames = noise.batch_size, source.shape[-1]
    if source.dim() != 4 or source.shape[0] not in (1, items):
        raise ValueError(f"source latents: expected [1 or {items}, 8, 16, W], got {list(source.shape)}")
    x_src = source.to(torch.float32).expand(items, -1, -1, -1)
    schedule = flow_match_schedule(steps.num_steps)
    guide = edit_guidance_config(config)
    latent_mask = torch.ones(items, frames, dtype=torch.float32, device=x_src.device)

    def guided(conditions: EncodedConditions, momentum: bool) -> GuidedVelocity:
        conf = guide if momentum else replace(guide, apg_momentum=0.0)  # 0: no running average
        return GuidedVelocity(backend, conditions, conf, steps.num_steps, items, latent_mask,
                              hooks.row_query_scale)

    def enter_sampling(z_edit: torch.Tensor) -> torch.Tensor:
        sigma = schedule.sigmas[steps.n_max].to(x_src.device)
        eps = noise.draw_latents(frames).to(x_src.device)
        x_noised = sigma * eps + (1.0 - sigma) * x_src
        return z_edit + x_noised - x_src

    stepper = _FlowEditStepper(
        schedule.timesteps, steps, enter_sampling, noise.step_generator,
        use_pingpong=config.scheduler_type == "pingpong",
    )
    velocity = _FlowEditVelocity(
        steps, x_src, noise,
        v_src=guided(source_conditions, momentum=True),
        v_tar_edit=guided(target_conditions, momentum=False),
        v_tar_sample=guided(target_conditions, momentum=True),
        sigmas=stepper.sigmas,
    )
    start = x_src.clone()
    if steps.n_min == steps.n_max and steps.samples_after:
        start = enter_sampling(start)
    return integrate(velocity, stepper, start, first_index=steps.n_min, hooks=hooks)

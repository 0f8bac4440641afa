"""Loop behaviour the upstream traces do not cover, with analytic stand-in backends."""

from __future__ import annotations

import pytest
import torch

from acestep_triton.sampling import (
    EncodedConditions,
    SamplerConfig,
    sample_audio2audio,
    sample_text2music,
)
from acestep_triton.sampling.erg import dit_query_scale
from acestep_triton.sampling.loop import Branch, GuidedVelocity

TOL = 1e-5
SHAPE = (2, 8, 16, 5)


class FlowBackend:
    """The exact velocity field of a straight path from ``x0`` to ``eps``: v = eps − x0.

    Euler with ω' = 1 integrates it exactly, so final latents are known in closed form.
    """

    text_layers, lyric_layers, dit_layers = 12, 6, 24

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor) -> None:
        self.v = eps - x0
        self.timesteps: list[float] = []

    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        assert latents.shape[0] % self.v.shape[0] == 0
        self.timesteps.append(float(timestep[0]))
        return self.v.repeat(latents.shape[0] // self.v.shape[0], 1, 1, 1)


class PointMassBackend(FlowBackend):
    """The exact field towards a single data point: v(x, σ) = (x − x0)/σ, so x − σ·v = x0.

    Every scheduler (pingpong's re-noising included) lands exactly on x0.
    """

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__(x0, x0)
        self.x0 = x0

    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        self.timesteps.append(float(timestep[0]))
        sigma = (timestep / 1000).view(-1, 1, 1, 1)
        return (latents - self.x0.repeat(latents.shape[0] // self.x0.shape[0], 1, 1, 1)) / sigma


class BranchBackend:
    """Velocity = the row's encoder-state value (1 cond, 2 uncond, 3 text-only) + 10·(query ERG)."""

    text_layers, lyric_layers, dit_layers = 12, 6, 24

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        erg = bool((query_scale != 1).any())
        self.calls.append((latents.shape[0], erg))
        per_row = encoder_states[:, 0, 0] + (10.0 if erg else 0.0)
        return per_row.view(-1, 1, 1, 1).expand_as(latents).clone()


def _conditions(items: int = 1) -> EncodedConditions:
    def s(v: float) -> torch.Tensor:
        return torch.full((items, 3, 4), v)

    return EncodedConditions(cond=s(1.0), mask=torch.ones(items, 3), uncond=s(2.0), text_only=s(3.0))


def test_exact_flow_text2music_recovers_x0():
    torch.manual_seed(0)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    d = FlowBackend(x0, eps)
    config = SamplerConfig(infer_step=7, guidance_scale=1.0, omega_scale=0.0)
    out = sample_text2music(d, _conditions(2), eps, config)
    err = float((out - x0).abs().max())
    assert err <= TOL, f"max abs error {err:.2e}"
    assert d.timesteps[0] == 1000.0 and len(d.timesteps) == 7


@pytest.mark.parametrize("scheduler", ["euler", "heun", "pingpong"])
def test_point_mass_field_lands_on_x0(scheduler):
    torch.manual_seed(1)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    config = SamplerConfig(infer_step=6, guidance_scale=1.0, omega_scale=0.0, scheduler_type=scheduler)
    gen = torch.Generator().manual_seed(3)
    out = sample_text2music(PointMassBackend(x0), _conditions(2), eps, config, generator=gen)
    err = float((out - x0).abs().max())
    assert err <= TOL, f"{scheduler}: max abs error {err:.2e}"


def test_heun_with_oss_steps_runs():
    """Upstream crashes on heun + oss_steps; we run heun over the oss sigmas."""
    torch.manual_seed(2)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    d = FlowBackend(x0, eps)
    config = SamplerConfig(oss_steps="1,3,5,8", guidance_scale=1.0, omega_scale=0.0, scheduler_type="heun")
    out = sample_text2music(d, _conditions(2), eps, config)
    assert len(d.timesteps) == 2 * 4 - 1
    assert float((out - x0).abs().max()) <= TOL


def test_audio2audio_starts_at_shifted_levels():
    """Reference noised to σ 0.75 but integrated from σ 0.9 (upstream's double shift):
    x = 0.25·ref + 0.75·ε, then − 0.9·(ε − ref) → 1.15·ref − 0.15·ε."""
    torch.manual_seed(3)
    ref, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    d = FlowBackend(ref, eps)
    config = SamplerConfig(infer_step=10, guidance_scale=1.0, omega_scale=0.0)
    out = sample_audio2audio(d, _conditions(2), ref, eps, 0.5, config)
    assert len(d.timesteps) == 5 and abs(d.timesteps[0] - 900.0) < 1e-3
    err = float((out - (1.15 * ref - 0.15 * eps)).abs().max())
    assert err <= TOL, f"max abs error {err:.2e}"


def test_double_condition_guidance_and_call_grouping():
    d = BranchBackend()
    config = SamplerConfig(
        infer_step=4, guidance_interval=1.0, guidance_scale_text=5.0, guidance_scale_lyric=2.0
    )
    guided = GuidedVelocity(d, _conditions(), config, 4, 1, torch.ones(1, 5))
    assert guided.branches(0) == (Branch.COND, Branch.TEXT_ONLY, Branch.UNCOND)
    v = guided(torch.zeros(1, 8, 16, 5), 0, torch.tensor(1000.0))
    # cond 1, text-only 3, uncond 2 + 10 (ERG diffusion): (1−5)·12 + (5−2)·3 + 2·1 = −37
    assert torch.allclose(v, torch.full_like(v, -37.0))
    assert d.calls == [(2, False), (1, True)]  # cond + text-only together, ERG uncond alone


def test_without_erg_diffusion_all_branches_share_one_call():
    d = BranchBackend()
    config = SamplerConfig(infer_step=4, guidance_interval=1.0, cfg_type="cfg", use_erg_diffusion=False)
    guided = GuidedVelocity(d, _conditions(3), config, 4, 3, torch.ones(3, 5))
    v = guided(torch.zeros(3, 8, 16, 5), 1, torch.tensor(1000.0))
    assert d.calls == [(6, False)]
    assert torch.allclose(v, torch.full_like(v, 2 + 15 * (1 - 2)))  # u + s(c − u)


def test_row_query_scale_gives_per_row_vectors():
    seen = []

    class RowBackend(BranchBackend):
        def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
            seen.append(query_scale)
            return torch.zeros_like(latents)

    config = SamplerConfig(infer_step=4, guidance_interval=1.0)
    guided = GuidedVelocity(
        RowBackend(), _conditions(2), config, 4, 2, torch.ones(2, 5), row_query_scale=True
    )
    guided(torch.zeros(2, 8, 16, 5), 0, torch.tensor(1000.0))
    assert len(seen) == 1 and seen[0].shape == (4, 24)
    assert torch.equal(seen[0][:2], torch.ones(2, 24))
    assert torch.equal(seen[0][2:], dit_query_scale(24, True).expand(2, -1))


def test_guided_steps_outside_interval_use_one_branch():
    d = BranchBackend()
    config = SamplerConfig(infer_step=10)  # interval [2, 7)
    guided = GuidedVelocity(d, _conditions(), config, 10, 1, torch.ones(1, 5))
    assert [len(guided.branches(i)) for i in range(10)] == [1, 1, 2, 2, 2, 2, 2, 1, 1, 1]
    no_cfg = GuidedVelocity(d, _conditions(), SamplerConfig(guidance_scale=1.0), 10, 1, torch.ones(1, 5))
    assert all(len(no_cfg.branches(i)) == 1 for i in range(10))


def test_config_validation_names_fields():
    for kwargs, field in [
        (dict(scheduler_type="ddim"), "scheduler_type"),
        (dict(cfg_type="x"), "cfg_type"),
        (dict(infer_step=0), "infer_step"),
        (dict(guidance_interval=1.5), "guidance_interval"),
        (dict(oss_steps="3,2"), "oss_steps"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            SamplerConfig(**kwargs)

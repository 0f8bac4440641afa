"""Sigma schedules: hand-derived values and upstream's recorded arrays (components.npz)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from acestep_triton.sampling.config import SamplerConfig
from acestep_triton.sampling.schedule import (
    audio2audio_schedule,
    audio2audio_steps,
    flow_match_schedule,
    heun_points,
    oss_schedule,
    parse_oss_steps,
    training_sigma_range,
)

TOL = 1e-6


def _shift(s: float) -> float:
    return 3 * s / (1 + 2 * s)


def test_27_step_schedule_by_hand():
    """σ_lo = shift(0.001); linspace(1, σ_lo, 27) shifted again; 0 appended."""
    lo = _shift(0.001)  # 0.0029940
    second = _shift(1 - (1 - lo) / 26)
    last = _shift(lo)
    s = flow_match_schedule(27)
    got = s.sigmas.tolist()
    assert len(got) == 28 and got[-1] == 0.0
    assert abs(got[0] - 1.0) < TOL
    assert abs(got[1] - second) < TOL and abs(second - 0.98688) < 1e-5, got[1]
    assert abs(got[-2] - last) < TOL and abs(last - 0.0089286) < 1e-6, got[-2]
    assert torch.equal(s.timesteps, s.sigmas[:-1] * 1000)
    assert s.timesteps.dtype == torch.float32 and s.num_steps == 27


def test_training_range_ends():
    hi, lo = training_sigma_range()
    assert hi == 1.0 and abs(lo - 0.003 / 1.002) < 1e-9
    hi_a2a, _ = training_sigma_range(0.5)
    assert hi_a2a == 0.75  # shift(0.5) = 1.5 / 2


@pytest.mark.parametrize("n", [10, 27, 60])
@pytest.mark.parametrize("kind", ["euler", "heun", "pingpong"])
def test_matches_upstream_arrays(golden_components, kind, n):
    s = flow_match_schedule(n)
    timesteps, sigmas = heun_points(s) if kind == "heun" else (s.timesteps, s.sigmas)
    ref_t = golden_components[f"sched_{kind}_N{n}_timesteps"]
    ref_s = golden_components[f"sched_{kind}_N{n}_sigmas"]
    assert timesteps.shape == ref_t.shape and sigmas.shape == ref_s.shape
    err_t = float(np.abs(timesteps.numpy() - ref_t).max())
    err_s = float(np.abs(sigmas.numpy() - ref_s).max())
    assert err_t <= 1e-6 * 1000 and err_s <= TOL, f"timesteps err {err_t:.2e}, sigmas err {err_s:.2e}"


@pytest.mark.parametrize("kind", ["euler", "pingpong"])
def test_oss_steps_match_upstream(golden_components, kind):
    s = oss_schedule(parse_oss_steps("1,3,5,8"))
    ref_t = golden_components[f"sched_{kind}_oss_1_3_5_8_timesteps"]
    ref_s = golden_components[f"sched_{kind}_oss_1_3_5_8_sigmas"]
    err_t = float(np.abs(s.timesteps.numpy() - ref_t).max())
    err_s = float(np.abs(s.sigmas.numpy() - ref_s).max())
    assert err_t <= 1e-3 and err_s <= TOL, f"timesteps err {err_t:.2e}, sigmas err {err_s:.2e}"


def test_oss_steps_shift_the_picked_sigmas_again():
    """Upstream re-shifts the chosen sigmas: step 8 of 8 (0.00893) becomes shift(0.00893)."""
    base = flow_match_schedule(8)
    s = oss_schedule((1, 3, 5, 8))
    for got, idx in zip(s.sigmas[:-1].tolist(), (1, 3, 5, 8), strict=True):
        assert abs(got - _shift(float(base.sigmas[idx - 1]))) < TOL
    assert abs(float(s.sigmas[3]) - 0.0263158) < 1e-6


def test_parse_oss_steps():
    assert parse_oss_steps(None) == () and parse_oss_steps("") == () and parse_oss_steps(" ") == ()
    assert parse_oss_steps("1, 3,5") == (1, 3, 5) and parse_oss_steps([2, 4]) == (2, 4)
    for bad in ("0,2", "3,1", "1,1", "a,b"):
        with pytest.raises(ValueError, match=r"^oss_steps: "):
            parse_oss_steps(bad)


def test_config_uses_oss_schedule():
    config = SamplerConfig(oss_steps="1,3,5,8")
    assert config.oss_steps == (1, 3, 5, 8) and config.num_steps == 8
    assert torch.equal(config.schedule().sigmas, oss_schedule((1, 3, 5, 8)).sigmas)
    assert config.schedule().num_steps == 4


def test_audio2audio_schedule_matches_upstream(golden_components):
    s = audio2audio_schedule(0.5, 10)  # σ_max 0.5 → int(0.5·10) = 5 steps
    ref_t = golden_components["sched_euler_sigma_max0.5_N5_timesteps"]
    ref_s = golden_components["sched_euler_sigma_max0.5_N5_sigmas"]
    err_t = float(np.abs(s.timesteps.numpy() - ref_t).max())
    err_s = float(np.abs(s.sigmas.numpy() - ref_s).max())
    assert err_t <= 1e-3 and err_s <= TOL, f"timesteps err {err_t:.2e}, sigmas err {err_s:.2e}"
    # The reference is noised to shift(0.5) = 0.75; sampling starts at shift(0.75) = 0.9.
    assert s.noise_level == 0.75
    assert abs(float(s.sigmas[0]) - 0.9) < TOL


def test_audio2audio_step_count_and_errors():
    assert audio2audio_steps(0.5, 60) == 30 and audio2audio_steps(0.25, 27) == math.floor(0.75 * 27)
    with pytest.raises(ValueError, match=r"^ref_audio_strength: "):
        audio2audio_schedule(1.0, 10)
    with pytest.raises(ValueError, match=r"^ref_audio_strength: "):
        audio2audio_schedule(0.95, 10)  # int(0.05 · 10) = 0 steps


def test_heun_points_by_hand():
    s = flow_match_schedule(3)
    t, sig = heun_points(s)
    t3 = s.timesteps.tolist()
    assert t.tolist() == [t3[0], t3[1], t3[1], t3[2], t3[2]]
    s3 = s.sigmas.tolist()
    assert sig.tolist() == [s3[0], s3[1], s3[1], s3[2], s3[2], 0.0]

"""euler / heun / pingpong steps on tiny tensors, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from acestep_triton.sampling.schedule import Schedule
from acestep_triton.sampling.schedulers import (
    EulerScheduler,
    HeunScheduler,
    PingPongScheduler,
    make_scheduler,
    omega_rescale,
)

TOL = 1e-6
# σ: 1.0 → 0.5 → 0 (two steps), timesteps 1000, 500
TWO_STEPS = Schedule(sigmas=torch.tensor([1.0, 0.5, 0.0]), timesteps=torch.tensor([1000.0, 500.0]))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = float((a - b).abs().max())
    assert err <= TOL, f"max abs error {err:.2e}: {a.flatten().tolist()} vs {b.flatten().tolist()}"


def test_omega_rescale():
    assert abs(omega_rescale(10) - 1.0462117) < 1e-6  # 0.9 + 0.2 / (1 + e^-1)
    assert omega_rescale(0) == 1.0
    assert 0.9 < omega_rescale(-100) < 0.9001 and 1.0999 < omega_rescale(100) < 1.1


def test_euler_without_omega_is_plain_euler():
    s = EulerScheduler(TWO_STEPS, omega_scale=0.0)
    x = s.step(_t(1.0, 3.0), _t(0.0, 0.0))  # dx = (0.5 − 1)·v
    _close(x, _t(-0.5, -1.5))
    x = s.step(_t(2.0, 2.0), x)  # dx = (0 − 0.5)·v
    _close(x, _t(-1.5, -2.5))
    with pytest.raises(RuntimeError):
        s.step(_t(0.0, 0.0), x)


def test_euler_mean_shift():
    """dx = [−0.5, −1.5], mean −1: deviations ±0.5 scaled by ω' = 1.0462117."""
    w = 0.9 + 0.2 / (1 + math.exp(-1))
    x = EulerScheduler(TWO_STEPS, omega_scale=10.0).step(_t(1.0, 3.0), _t(0.0, 0.0))
    _close(x, _t(0.5 * w - 1, -0.5 * w - 1))


def test_euler_mean_is_over_the_whole_batch():
    """Upstream's mean includes every item: item 0 alone would get a different update."""
    w = omega_rescale(10.0)
    v = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)  # two items, one element each
    x = EulerScheduler(TWO_STEPS, omega_scale=10.0).step(v, torch.zeros(2, 1, 1, 1))
    _close(x.flatten(), torch.tensor([0.5 * w - 1, -0.5 * w - 1]))


def test_heun_by_hand():
    s = HeunScheduler(TWO_STEPS, omega_scale=0.0)
    assert s.timesteps.tolist() == [1000.0, 500.0, 500.0]
    x0 = _t(0.0, 0.0)
    x_pred = s.step(_t(1.0, 3.0), x0)  # predictor: x0 − 0.5·v1
    _close(x_pred, _t(-0.5, -1.5))
    x1 = s.step(_t(3.0, 1.0), x_pred)  # corrector: x0 − 0.5·(v1 + v2)/2 = x0 − 0.5·[2, 2]
    _close(x1, _t(-1.0, -1.0))
    x2 = s.step(_t(1.0, 1.0), x1)  # last point: Euler to 0
    _close(x2, _t(-1.5, -1.5))


def test_heun_corrector_uses_mean_shift():
    w = omega_rescale(10.0)
    s = HeunScheduler(TWO_STEPS, omega_scale=10.0)
    x_pred = s.step(_t(1.0, 1.0), _t(0.0, 0.0))
    x1 = s.step(_t(1.0, 5.0), x_pred)  # averaged derivative [1, 3] → dx [−0.5, −1.5]
    _close(x1, _t(0.5 * w - 1, -0.5 * w - 1))


def test_pingpong_by_hand():
    """x0̂ = x − σ·v, then re-noised to σ_next with the generator's next normal draw."""
    gen = torch.Generator().manual_seed(7)
    fresh = torch.randn((1, 1, 1, 2), generator=torch.Generator().manual_seed(7))
    s = PingPongScheduler(TWO_STEPS, generator=gen)
    x = s.step(_t(0.5, -1.0), _t(1.0, 1.0))  # x0̂ = [0.5, 2.0]
    _close(x, 0.5 * _t(0.5, 2.0) + 0.5 * fresh)
    # omega is ignored by pingpong: the same step with another omega is identical
    again = PingPongScheduler(TWO_STEPS, generator=torch.Generator().manual_seed(7))
    _close(again.step(_t(0.5, -1.0), _t(1.0, 1.0)), x)


def test_pingpong_last_step_is_the_prediction():
    s = PingPongScheduler(TWO_STEPS, generator=torch.Generator().manual_seed(0))
    s.step(_t(0.0, 0.0), _t(0.0, 0.0))
    x = s.step(_t(2.0, -2.0), _t(1.0, 1.0))  # σ = 0.5 → 0: x − 0.5·v
    _close(x, _t(0.0, 2.0))


def test_make_scheduler():
    assert isinstance(make_scheduler("euler", TWO_STEPS, 10.0), EulerScheduler)
    assert isinstance(make_scheduler("heun", TWO_STEPS, 10.0), HeunScheduler)
    assert isinstance(make_scheduler("pingpong", TWO_STEPS, 10.0), PingPongScheduler)
    with pytest.raises(ValueError, match=r"^scheduler_type: "):
        make_scheduler("ddim", TWO_STEPS, 10.0)

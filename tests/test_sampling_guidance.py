"""Guidance formulas on tiny hand-computed cases, the interval and the decay."""

from __future__ import annotations

import math

import pytest
import torch

from acestep_triton.sampling.guidance import (
    GuidanceInterval,
    MomentumBuffer,
    apg,
    cfg,
    cfg_star,
    double_condition,
    project,
    scale_at,
)

TOL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = float((a - b).abs().max())
    assert err <= TOL, f"max abs error {err:.2e}: {a.flatten().tolist()} vs {b.flatten().tolist()}"


def _m(rows: list[list[float]]) -> torch.Tensor:
    """A [1, 1, 2, 2] tensor: one item, one channel, a 2×2 (height × frames) plane."""
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, 2, 2)


COND = _m([[1.0, 0.0], [0.0, 0.0]])
UNCOND = _m([[-2.0, -3.0], [0.0, 0.0]])


def test_cfg():
    _close(cfg(COND, UNCOND, 3.0), _m([[7.0, 6.0], [0.0, 0.0]]))  # u + 3(c − u)


def test_apg_clip_and_projection_by_hand():
    """d = c − u = [[3, 3], [0, 0]], ‖d‖ = 3√2 > 2.5 → d·2.5/(3√2) = [[1.7678, 1.7678], …].

    c is along the first element, so the orthogonal part is [[0, 1.7678], …] and
    out = c + (3 − 1)·d⊥ = [[1, 5/√2], [0, 0]].
    """
    out = apg(COND, UNCOND, 3.0, momentum=None)
    _close(out, _m([[1.0, 5 / math.sqrt(2)], [0.0, 0.0]]))


def test_apg_without_clip():
    """Small difference: no clipping; d = [[0.5, 0.5], …] → d⊥ = [[0, 0.5], …]."""
    out = apg(COND, _m([[0.5, -0.5], [0.0, 0.0]]), 3.0, momentum=None)
    _close(out, _m([[1.0, 1.0], [0.0, 0.0]]))


def test_apg_momentum_by_hand():
    """Second call: r = d + (−0.75)·d = [[0.75, 0.75], …] (‖r‖ < 2.5, no clip) → out [[1, 1.5], …]."""
    buffer = MomentumBuffer()
    apg(COND, UNCOND, 3.0, momentum=buffer)
    _close(buffer.average, _m([[3.0, 3.0], [0.0, 0.0]]))  # the raw difference, stored unclipped
    out = apg(COND, UNCOND, 3.0, momentum=buffer)
    _close(buffer.average, _m([[0.75, 0.75], [0.0, 0.0]]))
    _close(out, _m([[1.0, 1.5], [0.0, 0.0]]))


def test_apg_norms_are_per_item_and_channel():
    """Clipping is per (item, channel): a large channel does not shrink a small one."""
    c = torch.cat([COND, COND], dim=1)  # [1, 2, 2, 2]
    u = torch.cat([UNCOND, _m([[0.5, -0.5], [0.0, 0.0]])], dim=1)
    out = apg(c, u, 3.0)
    _close(out[:, :1], _m([[1.0, 5 / math.sqrt(2)], [0.0, 0.0]]))
    _close(out[:, 1:], _m([[1.0, 1.0], [0.0, 0.0]]))


def test_project_splits_parallel_and_orthogonal():
    par, orth = project(_m([[3.0, 4.0], [0.0, 0.0]]), _m([[2.0, 0.0], [0.0, 0.0]]))
    _close(par, _m([[3.0, 0.0], [0.0, 0.0]]))
    _close(orth, _m([[0.0, 4.0], [0.0, 0.0]]))
    assert par.dtype == torch.float32


def test_cfg_star_zero_init_and_alpha():
    c = torch.tensor([[1.0, 2.0]]).reshape(1, 1, 1, 2)
    u = torch.tensor([[1.0, 0.0]]).reshape(1, 1, 1, 2)
    for step in (0, 1):  # global step index ≤ zero_steps → 0
        out = cfg_star(c, u, 2.0, step_index=step)
        assert out.shape == c.shape and not out.any()
    # α = ⟨c, u⟩ / ‖u‖² = 1 → u + 2·(c − u) = [1, 4]
    expected = torch.tensor([1.0, 4.0]).reshape(1, 1, 1, 2)
    _close(cfg_star(c, u, 2.0, step_index=2), expected)
    _close(cfg_star(c, u, 2.0, step_index=0, use_zero_init=False), expected)


def test_cfg_star_alpha_per_item():
    """Item 1 has α = ⟨[2, 2], [1, 0]⟩ / 1 = 2: α·u + 3(c − α·u) = [2, 0] + 3·[0, 2] = [2, 6]."""
    c = torch.tensor([[1.0, 2.0], [2.0, 2.0]]).reshape(2, 1, 1, 2)
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    out = cfg_star(c, u, 3.0, step_index=5)
    _close(out.flatten(), torch.tensor([1.0, 6.0, 2.0, 6.0]))


def test_double_condition():
    c, u, t = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5])
    # (1 − 5)·0 + (5 − 2)·0.5 + 2·1 = 3.5
    _close(double_condition(c, u, t, 5.0, 2.0), torch.tensor([3.5]))


@pytest.mark.parametrize(
    ("n", "interval", "start", "end"),
    [
        (10, 0.5, 2, 7), (27, 0.5, 6, 20), (60, 0.5, 15, 45),
        (10, 1.0, 0, 10), (10, 0.0, 5, 5), (60, 0.3, 21, 39),
    ],
)
def test_guidance_interval(n, interval, start, end):
    gi = GuidanceInterval.from_fraction(n, interval)
    assert (gi.start, gi.end) == (start, end)
    assert [i for i in range(n) if i in gi] == list(range(start, end))


def test_decay():
    gi = GuidanceInterval(2, 7)
    assert scale_at(4, gi, 15.0, 3.0, decay=0.0) == 15.0
    assert [scale_at(i, gi, 15.0, 3.0, decay=1.0) for i in range(2, 7)] == [15.0, 12.0, 9.0, 6.0, 3.0]
    assert scale_at(6, gi, 15.0, 3.0, decay=0.5) == 9.0
    assert scale_at(3, GuidanceInterval(3, 4), 15.0, 3.0, decay=1.0) == 15.0  # one-step interval

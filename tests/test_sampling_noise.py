"""Seeds and noise: upstream's parsing rules and bit-exact noise for the golden cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from acestep_triton.sampling.noise import (
    MAX_FRAMES,
    SeededNoise,
    latent_frames,
    mix_retake_noise,
    noise_reference,
    resolve_duration,
    resolve_request_seeds,
    resolve_seeds,
)
from acestep_triton.sampling.schedule import audio2audio_schedule


def _case_npz(golden_dir, name):
    with np.load(golden_dir / "cases" / f"case_{name}.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["a_text2music_apg", "j_batch2", "l_retake"])
def test_initial_noise_is_bit_exact(golden_dir, golden_cases, name):
    kwargs = golden_cases[name]["call_kwargs"]
    noise = SeededNoise.from_spec(kwargs["manual_seeds"], kwargs["batch_size"])
    assert noise.seeds == golden_cases[name]["actual_seeds"]
    drawn = noise.draw_latents(latent_frames(kwargs["audio_duration"]))
    ref = _case_npz(golden_dir, name)["init_noise"]
    assert drawn.dtype == torch.float32 and drawn.shape == ref.shape
    err = float(np.abs(drawn.numpy() - ref).max())
    assert err == 0.0, f"init noise max abs error {err}"


def test_retake_noise_is_bit_exact(golden_dir, golden_cases):
    kwargs = golden_cases["l_retake"]["call_kwargs"]
    _, retake = resolve_request_seeds(kwargs["manual_seeds"], kwargs["retake_seeds"], 1)
    assert retake.seeds == [67890] == golden_cases["l_retake"]["actual_retake_seeds"]
    ref = _case_npz(golden_dir, "l_retake")["retake_noise"]
    err = float(np.abs(retake.draw_latents(32).numpy() - ref).max())
    assert err == 0.0, f"retake noise max abs error {err}"


def test_unset_retake_seeds_come_from_the_global_torch_generator(golden_cases):
    """The golden harness seeded torch's global RNG with 0: random seeds are randint(0, 2**32)."""
    rng = torch.Generator().manual_seed(0)
    seeds, retake = resolve_request_seeds("1,2", None, 2, rng)
    assert seeds.seeds == [1, 2]
    assert retake.seeds == golden_cases["j_batch2"]["actual_retake_seeds"] == [2546248239, 3626093760]
    # manual seeds are resolved first: with both unset, manual takes the first draws
    rng = torch.Generator().manual_seed(0)
    seeds, retake = resolve_request_seeds(None, None, 1, rng)
    assert seeds.seeds == [2546248239] and retake.seeds == [3626093760]


def test_seed_spec_rules():
    rng = torch.Generator().manual_seed(0)
    assert resolve_seeds(7, 3) == [7, 7, 7]
    assert resolve_seeds("12345", 2) == [12345, 12345]
    assert resolve_seeds("1,2", 3) == [1, 2, 2]  # missing items repeat the last
    assert resolve_seeds("1, 2,3", 2) == [1, 2]
    assert resolve_seeds([4, 5], 2) == [4, 5]
    assert resolve_seeds(" 12 ", 1) == [12]  # we strip whitespace (upstream: random)
    for random_spec in (None, "", "-1", "abc", []):
        first = resolve_seeds(random_spec, 2, torch.Generator().manual_seed(0))
        assert first == [2546248239, 3626093760], random_spec
    assert resolve_seeds("-5,3", 2, rng) == [-5, 3]  # torch accepts negative seeds in lists


@pytest.mark.parametrize("bad", ["1,x", "1,,2", [1, "2"], True, 2**64])
def test_bad_seed_specs_name_the_field(bad):
    with pytest.raises(ValueError, match=r"^retake_seeds: "):
        resolve_seeds(bad, 1, field="retake_seeds")


def test_generators_continue_after_the_initial_draw():
    """pingpong draws its per-step noise from item 0's generator after the initial noise."""
    noise = SeededNoise.from_seeds([3, 4])
    noise.draw((2,))
    expected = torch.Generator().manual_seed(3)
    torch.randn((1, 2), generator=expected)
    assert torch.equal(torch.randn(5, generator=noise.step_generator), torch.randn(5, generator=expected))


def test_mix_retake_noise():
    a, b = torch.ones(2), torch.full((2,), 2.0)
    assert torch.equal(mix_retake_noise(a, b, 0.0), a)
    mixed = mix_retake_noise(a, b, 0.3)
    angle = 0.3 * math.pi / 2
    assert float((mixed - (math.cos(angle) + 2 * math.sin(angle))).abs().max()) < 1e-6
    assert float((mix_retake_noise(a, b, 1.0) - b).abs().max()) < 1e-6


def test_noise_reference_uses_the_shifted_level():
    schedule = audio2audio_schedule(0.5, 10)
    out = noise_reference(torch.ones(1, 2), torch.zeros(1, 2), schedule)
    assert torch.allclose(out, torch.full((1, 2), 0.25))  # 1·(1 − 0.75) + 0·0.75


def test_frames_and_duration():
    assert latent_frames(3.0) == 32 and latent_frames(60.0) == 645 and MAX_FRAMES == 2583
    assert resolve_duration(12.5) == 12.5
    import random

    d = resolve_duration(-1, random.Random(1))
    assert 30.0 <= d <= 240.0

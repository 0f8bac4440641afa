"""repaint, extend and edit (FlowEdit): upstream's golden runs replayed, and their properties.

The golden cases m_repaint and o_edit are replayed like the text2music cases in
``test_sampling_cases.py``: the DiT answers with upstream's recorded velocities and checks that
it is asked with upstream's latents, timesteps, branches and query scales. The property tests
use a small deterministic toy backend instead (velocity = a smooth function of the latents,
the timestep and the encoder states), which is enough to tell every branch and step apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampling_helpers import WithoutCodec
from test_sampling_cases import (
    LYRIC_IDS,
    LYRIC_MASK,
    PROMPT,
    PROMPT_IDS,
    PROMPT_MASK,
    STATE_DIM,
    TOL,
    ReplayBackend,
    _golden,
)

from acestep_triton.sampling import (
    EDIT_PRESETS,
    EditSteps,
    EncodedConditions,
    GuidedVelocity,
    PromptTokens,
    RepaintWindow,
    SamplerConfig,
    SamplingCancelled,
    SamplingHooks,
    SeededNoise,
    build_conditions,
    edit_preset,
    encode_edit_conditions,
    lyric_inputs,
    resolve_request_seeds,
    sample_edit,
    sample_extend,
    sample_repaint,
    sample_retake,
)
from acestep_triton.sampling.noise import MAX_FRAMES, latent_frames

# --- golden replay: repaint ----------------------------------------------------------------


def test_repaint_reproduces_upstream(golden_dir, golden_cases):
    meta, kwargs, case, trace, config = _golden(golden_dir, golden_cases, "m_repaint")
    seeds, retake = resolve_request_seeds(kwargs["manual_seeds"], kwargs["retake_seeds"], 1)
    assert (seeds.seeds, retake.seeds) == (meta["actual_seeds"], meta["actual_retake_seeds"])
    source = torch.from_numpy(case["src_or_ref_latents"])
    frames = source.shape[-1]
    noise, retake_noise = seeds.draw_latents(frames), retake.draw_latents(frames)
    noise_err = max(float(np.abs(noise.numpy() - case["init_noise"]).max()),
                    float(np.abs(retake_noise.numpy() - case["retake_noise"]).max()))
    assert noise_err == 0.0, f"noise differs from upstream by {noise_err}"

    backend = ReplayBackend(trace, 1)
    conditions = build_conditions(backend, PROMPT, config)
    final = sample_repaint(
        backend, conditions, source, noise, retake_noise,
        kwargs["repaint_start"], kwargs["repaint_end"], kwargs["retake_variance"], config,
    )
    assert backend.pos == len(trace["dit_v_out"]) == 7, f"made {backend.pos} DiT evaluations"
    final_err = float(np.abs(final.numpy() - case["final_latents"]).max())
    assert final_err <= TOL, (
        f"final latents max abs error {final_err:.2e} (DiT inputs {backend.max_hidden_err:.2e})"
    )
    start, end = latent_frames(kwargs["repaint_start"]), latent_frames(kwargs["repaint_end"])
    outside = torch.ones(frames, dtype=torch.bool)
    outside[start:end] = False
    assert torch.equal(final[..., outside], source[..., outside]), "frames outside the window changed"


# --- golden replay: edit ---------------------------------------------------------------------

TARGET_IDS = torch.tensor([[9, 8, 1]], dtype=torch.int64)
TARGET_MASK = torch.ones_like(TARGET_IDS)
TARGET_LYRIC_IDS, TARGET_LYRIC_MASK = lyric_inputs([261, 911, 77, 2])
TARGET = PromptTokens(TARGET_IDS, TARGET_MASK, TARGET_LYRIC_IDS, TARGET_LYRIC_MASK)


class EditReplayBackend(WithoutCodec):
    """Replays upstream's edit trace: one DiT call per side and step, rows [cond; uncond].

    The stand-in encoders check they get upstream's edit inputs (normal text encoder; null
    condition = zero text, zero lyric ids, zero lyric mask) and return states filled with +c
    (conditional) or −c (unconditional), c chosen so the call's states have the recorded L2
    norm (source ≈ 29.2, target ≈ 17.3), and the mask the real condition encoder returns
    (speaker, text mask, lyric mask).
    """

    text_layers, lyric_layers, dit_layers = 12, 6, 24

    def __init__(self, trace: dict[str, np.ndarray]) -> None:
        self.timestep = torch.from_numpy(trace["dit_timestep"])
        self.hidden_in = torch.from_numpy(trace["dit_hidden_in"])
        self.v_out = torch.from_numpy(trace["dit_v_out"])
        self.norms = trace["dit_encoder_states_l2norm"]
        self.side_norm = {"source": float(self.norms[0]), "target": float(self.norms[1])}
        self.pos = 0
        self.max_hidden_err = 0.0
        self.sides: list[str] = []

    def encode_text(self, input_ids, attention_mask, query_scale):
        assert torch.equal(query_scale, torch.ones(12)), "edit never uses ERG"
        if torch.equal(input_ids, PROMPT_IDS):
            fill = 1.0
        elif torch.equal(input_ids, TARGET_IDS):
            fill = 3.0
        else:
            raise AssertionError(f"unexpected prompt ids {input_ids}")
        return torch.full((*input_ids.shape, 4), fill)

    def encode_conditions(self, text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale):
        assert torch.equal(lyric_query_scale, torch.ones(6)) and not speaker.any()
        side = "source" if text_mask.shape == PROMPT_MASK.shape else "target"
        ids, lmask, fill = (
            (LYRIC_IDS, LYRIC_MASK, 1.0) if side == "source" else (TARGET_LYRIC_IDS, TARGET_LYRIC_MASK, 3.0)
        )
        assert torch.equal(text_mask, torch.ones_like(text_mask)), "the text mask is kept in both branches"
        if bool((text_states == fill).all()):
            assert torch.equal(lyric_ids, ids) and torch.equal(lyric_mask, lmask)
            sign = 1.0
        else:
            assert not text_states.any() and not lyric_ids.any() and not lyric_mask.any(), (
                "edit's null condition: zero text states, zero lyric ids, zero lyric mask"
            )
            sign = -1.0
        s = 1 + text_states.shape[1] + lyric_ids.shape[1]
        value = sign * self.side_norm[side] / math.sqrt(2 * s * STATE_DIM)
        mask = torch.cat([torch.ones(1, 1), text_mask.float(), lyric_mask.float()], dim=1)
        return torch.full((1, s, STATE_DIM), value, dtype=torch.float64).float(), mask

    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        k = self.pos
        assert k < len(self.norms), "more DiT calls than upstream made"
        assert latents.shape[0] == 2, "each call is [cond; uncond] of one side"
        norm = float(encoder_states.double().norm())
        side = min(self.side_norm, key=lambda name: abs(self.side_norm[name] - norm))
        assert abs(norm - self.norms[k]) <= 1e-5 * self.norms[k], f"call {k}: {side} states, upstream differs"
        assert bool((encoder_states[0] > 0).all() and (encoder_states[1] < 0).all()), "not [cond; uncond]"
        lyric_len = (LYRIC_IDS if side == "source" else TARGET_LYRIC_IDS).shape[1]
        assert bool((encoder_mask[0] == 1).all()), "conditional mask"
        uncond_mask = encoder_mask[1]
        assert bool((uncond_mask[:-lyric_len] == 1).all() and (uncond_mask[-lyric_len:] == 0).all()), (
            "unconditional rows must use the null condition's mask (lyrics masked out)"
        )
        assert bool((latent_mask == 1).all()) and torch.equal(query_scale, torch.ones(24))
        assert torch.equal(timestep, self.timestep[k]), f"call {k}: timestep differs from upstream"
        err = float((latents - self.hidden_in[k]).abs().max())
        self.max_hidden_err = max(self.max_hidden_err, err)
        assert err <= TOL, f"call {k}: DiT input latents differ from upstream by {err:.3g}"
        self.sides.append(side)
        self.pos += 1
        return self.v_out[k]


class RecordingNoise(SeededNoise):
    """SeededNoise that keeps every draw (to compare with upstream's ``edit_fwd_noise_k``)."""

    def draw_latents(self, frames: int) -> torch.Tensor:
        out = super().draw_latents(frames)
        self.__dict__.setdefault("draws", []).append(out)
        return out


def test_edit_reproduces_upstream(golden_dir, golden_cases):
    _, kwargs, case, trace, config = _golden(golden_dir, golden_cases, "o_edit")
    _, retake = resolve_request_seeds(kwargs["manual_seeds"], kwargs["retake_seeds"], 1)
    noise = RecordingNoise.from_seeds(retake.seeds)
    source = torch.from_numpy(case["src_or_ref_latents"])

    backend = EditReplayBackend(trace)
    src = encode_edit_conditions(backend, PROMPT, config)
    tar = encode_edit_conditions(backend, TARGET, config)
    final = sample_edit(
        backend, src, tar, source, noise, config,
        edit_n_min=kwargs["edit_n_min"], edit_n_max=kwargs["edit_n_max"], edit_n_avg=kwargs["edit_n_avg"],
    )
    expected_draws = sorted(k for k in case if k.startswith("edit_fwd_noise_"))
    assert len(noise.draws) == len(expected_draws) == 3
    for k, drawn in enumerate(noise.draws):
        err = float(np.abs(drawn.numpy() - case[f"edit_fwd_noise_{k}"]).max())
        assert err == 0.0, f"noise draw {k} differs from upstream by {err}"
    assert backend.pos == len(trace["dit_v_out"]) == 10
    assert backend.sides == ["source", "target"] * 2 + ["target"] * 6
    final_err = float(np.abs(final.numpy() - case["final_latents"]).max())
    assert final_err <= TOL, (
        f"final latents max abs error {final_err:.2e} (DiT inputs {backend.max_hidden_err:.2e})"
    )


# --- a toy backend for the properties --------------------------------------------------------


class ToyBackend(WithoutCodec):
    """Deterministic stand-in: velocity depends smoothly on latents, timestep and conditions."""

    text_layers, lyric_layers, dit_layers = 12, 6, 24

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def encode_text(self, input_ids, attention_mask, query_scale):
        base = input_ids.float().unsqueeze(-1) * torch.linspace(0.1, 0.4, 4)
        return torch.sin(base) * query_scale.mean()

    def encode_conditions(self, text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale):
        b = text_states.shape[0]
        lyr = torch.cos(lyric_ids.float().unsqueeze(-1) * 0.01 * torch.arange(1, 5))
        lyr = lyr * lyric_query_scale.mean()
        states = torch.cat([torch.zeros(b, 1, 4), text_states, lyr], dim=1)
        mask = torch.cat([torch.ones(b, 1), text_mask.float(), lyric_mask.float()], dim=1)
        return states, mask

    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        self.calls.append({"rows": latents.shape[0], "mask": encoder_mask.clone()})
        pooled = (encoder_states * encoder_mask.unsqueeze(-1)).sum(dim=(1, 2)) / encoder_mask.sum(dim=1)
        shift = (pooled + timestep / 1000 + query_scale.mean() - 1).view(-1, 1, 1, 1)
        return torch.tanh(latents) * 0.7 - 0.3 * latents + shift


def _toy_setup(config: SamplerConfig, frames: int = 40, items: int = 1, seed: int = 3):
    toy = ToyBackend()
    ids, mask = lyric_inputs([5, 17, 33])
    conds = build_conditions(toy, PromptTokens(PROMPT_IDS, PROMPT_MASK, ids, mask), config)
    source = torch.randn(1, 8, 16, frames, generator=torch.Generator().manual_seed(seed))
    seeds = SeededNoise.from_seeds(list(range(11, 11 + items)))
    retake = SeededNoise.from_seeds(list(range(21, 21 + items)))
    return toy, conds, source, seeds, retake


# --- repaint / extend properties ---------------------------------------------------------------

FPS = 44100 / 512 / 8


@pytest.mark.parametrize("scheduler_type", ["euler", "heun", "pingpong"])
def test_repaint_keeps_outside_exactly_and_ignores_the_scheduler(scheduler_type):
    config = SamplerConfig(infer_step=12, scheduler_type=scheduler_type, omega_scale=3.0)
    toy, conds, source, seeds, retake = _toy_setup(config, items=2)
    noise, rnoise = seeds.draw_latents(40), retake.draw_latents(40)
    out = sample_repaint(toy, conds, source, noise, rnoise, 1.0, 2.5, 0.4, config,
                         generator=seeds.step_generator)
    start, end = latent_frames(1.0), latent_frames(2.5)
    assert out.shape == (2, 8, 16, 40)
    keep = torch.ones(40, dtype=torch.bool)
    keep[start:end] = False
    outside_err = float((out[..., keep] - source[..., keep]).abs().max())
    assert outside_err == 0.0, f"outside the window differs from the source by {outside_err}"
    inside_change = float((out[..., ~keep] - source[..., ~keep]).abs().min())
    assert inside_change > 0, "the window was not regenerated"
    # plain Euler on the N-point grid whatever the scheduler: euler gives the same numbers
    reference = sample_repaint(ToyBackend(), conds, source, noise, rnoise, 1.0, 2.5, 0.4,
                               SamplerConfig(infer_step=12))
    assert torch.equal(out, reference)
    n_min = int(12 * (1 - 0.4))
    assert len(toy.calls) == (12 - n_min) + sum(1 for i in range(n_min, 12) if 3 <= i < 9)


def test_repaint_progress_counts_the_steps_run():
    config = SamplerConfig(infer_step=10)
    toy, conds, source, seeds, retake = _toy_setup(config)
    seen: list[tuple[int, int]] = []
    sample_repaint(toy, conds, source, seeds.draw_latents(40), retake.draw_latents(40), 0.5, 1.5, 0.3,
                   config, hooks=SamplingHooks(progress=lambda i, n: seen.append((i, n))))
    assert seen == [(i, 3) for i in range(1, 4)]  # n_min = int(10·0.7) = 7: steps 7, 8, 9
    with pytest.raises(SamplingCancelled):
        sample_repaint(toy, conds, source, seeds.draw_latents(40), retake.draw_latents(40), 0.5, 1.5,
                       0.3, config, hooks=SamplingHooks(should_cancel=lambda: True))


def test_repaint_variance_zero_returns_the_source():
    """No step left: the source comes back (upstream would return raw noise)."""
    config = SamplerConfig(infer_step=10)
    toy, conds, source, seeds, retake = _toy_setup(config)
    out = sample_repaint(toy, conds, source, seeds.draw_latents(40), retake.draw_latents(40), 0.5, 1.5,
                         0.0, config)
    assert torch.equal(out, source) and not toy.calls


def test_repaint_of_the_whole_clip_is_a_retake():
    config = SamplerConfig(infer_step=6)
    toy, conds, source, seeds, retake = _toy_setup(config, frames=latent_frames(3.0))
    frames = source.shape[-1]
    noise, rnoise = seeds.draw_latents(frames), retake.draw_latents(frames)
    out = sample_repaint(toy, conds, source, noise, rnoise, 0.0, 3.0, 0.3, config)
    assert torch.equal(out, sample_retake(ToyBackend(), conds, noise, rnoise, 0.3, config))


@pytest.mark.parametrize(
    ("start", "end", "variance", "message"),
    [
        (2.0, 1.0, 0.5, "repaint_end: must be greater"),
        (1.0, 1.02, 0.5, "repaint_end: the window"),
        (1.0, 2.0, 1.5, "retake_variance: must be in [0, 1]"),
        (-250.0, 1.0, 0.5, "repaint_start: the result would be"),
        (float("nan"), 1.0, 0.5, "repaint_start: must be a finite number"),
    ],
)
def test_repaint_validation(start, end, variance, message):
    config = SamplerConfig(infer_step=4)
    toy, conds, source, seeds, retake = _toy_setup(config)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sample_repaint(toy, conds, source, seeds.draw_latents(40), retake.draw_latents(40), start, end,
                       variance, config)


@pytest.mark.parametrize(("left", "right"), [(1.0, 0.0), (0.0, 2.0), (1.5, 2.0), (5.0, 0.0)])
def test_extend_preserves_the_source(left, right):
    """Frames L:L+W are the source exactly; the padding is generated from the retake noise."""
    config = SamplerConfig(infer_step=8)
    frames, duration = 33, 3.0  # a 3.0 s source re-encodes to 33 frames
    toy, conds, source, seeds, retake = _toy_setup(config, frames=frames)
    window = RepaintWindow.for_extension(left, right, duration, frames)
    lpad = -latent_frames(-left)
    rpad = max(latent_frames(duration + right) - frames, 0)
    assert (window.left_pad, window.right_pad) == (lpad, rpad)  # both sides: R = end − W (fixed)
    assert window.retake_noise_frames == max(frames, lpad, rpad)
    noise, rnoise = seeds.draw_latents(frames), retake.draw_latents(window.retake_noise_frames)
    first: list[torch.Tensor] = []
    out = sample_extend(toy, conds, source, noise, rnoise, left, right, duration, config,
                        hooks=SamplingHooks(on_step=lambda s: first.append(s.sample) if not first else None))
    assert out.shape == (1, 8, 16, lpad + frames + rpad)
    err = float((out[..., lpad:lpad + frames] - source).abs().max())
    assert err == 0.0, f"the source part differs by {err}"
    # variance 1: start at σ = 1 from the retake noise in the padding (no cos/sin mix there)
    start = first[0]
    assert torch.equal(start[..., :lpad], rnoise[..., :lpad])
    assert torch.equal(start[..., lpad + frames:], rnoise[..., rnoise.shape[-1] - rpad:])
    assert float((start[..., lpad:lpad + frames] - noise).abs().max()) < 1e-5
    new = torch.ones(out.shape[-1], dtype=torch.bool)
    new[lpad:lpad + frames] = False
    assert float((out[..., new] - start[..., new]).abs().max()) > 0.1, "the padding was not generated"


def test_extend_is_repaint_with_upstreams_window():
    """extend(left, right) = repaint(−left, duration + right), as upstream's UI calls it."""
    config = SamplerConfig(infer_step=6)
    toy, conds, source, seeds, retake = _toy_setup(config, frames=33)
    noise, rnoise = seeds.draw_latents(33), retake.draw_latents(33)
    a = sample_extend(toy, conds, source, noise, rnoise, 0.0, 2.0, 3.0, config, retake_variance=0.7)
    b = sample_repaint(ToyBackend(), conds, source, noise, rnoise, 0.0, 5.0, 0.7, config)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("left", "right", "message"),
    [
        (-1.0, 1.0, "left_extend_length: must be >= 0"),
        (0.0, -1.0, "right_extend_length: must be >= 0"),
        (0.0, 0.0, "right_extend_length: the extension adds no latent frame"),
        (0.05, 0.0, "left_extend_length: the extension adds no latent frame"),
        (239.0, 0.0, "left_extend_length: the result would be 2606 latent frames"),
        (0.0, 239.0, "right_extend_length: the result would be"),
        (0.0, float("inf"), "right_extend_length: must be a finite number"),
    ],
)
def test_extend_validation(left, right, message):
    with pytest.raises(ValueError, match=message):
        RepaintWindow.for_extension(left, right, 3.0, 33)


def test_extend_up_to_the_cap_is_allowed():
    window = RepaintWindow.for_extension(0.0, 240.0 - 3.07, 3.0, 33)
    assert window.frames <= MAX_FRAMES and window.right_pad > window.source_frames


# --- edit properties --------------------------------------------------------------------------


def _edit_setup(config: SamplerConfig, items: int = 1):
    toy = ToyBackend()
    src = encode_edit_conditions(toy, PROMPT, config)
    tar = encode_edit_conditions(toy, TARGET, config)
    source = torch.randn(1, 8, 16, 24, generator=torch.Generator().manual_seed(5))
    return toy, src, tar, source, RecordingNoise.from_seeds(list(range(31, 31 + items)))


def test_edit_with_nothing_to_do_returns_the_source():
    """edit_n_min = edit_n_max = 1: no FlowEdit step and no sampling after: the source itself."""
    config = SamplerConfig(infer_step=10)
    toy, src, tar, source, noise = _edit_setup(config)
    out = sample_edit(toy, src, tar, source, noise, config, edit_n_min=1.0, edit_n_max=1.0)
    assert torch.equal(out, source) and not toy.calls and "draws" not in noise.__dict__


def test_edit_with_equal_bounds_below_one_resamples_from_the_noised_source():
    """edit_n_min = edit_n_max < 1: no FlowEdit step, ordinary target sampling from step n_max."""
    config = SamplerConfig(infer_step=10)
    toy, src, tar, source, noise = _edit_setup(config)
    out = sample_edit(toy, src, tar, source, noise, config, edit_n_min=0.6, edit_n_max=0.6)
    assert len(toy.calls) == 4 and len(noise.draws) == 1  # steps 6..9, target only
    tar_len = 1 + TARGET_IDS.shape[1] + TARGET_LYRIC_IDS.shape[1]
    assert all(c["mask"].shape[1] == tar_len for c in toy.calls)
    assert not torch.equal(out, source)


def test_edit_identical_conditions_leave_the_source():
    """Same source and target conditions, no guidance: ΔV ≈ 0 and z_edit stays the source."""
    config = SamplerConfig(infer_step=10, guidance_scale=1.0)
    toy, src, _, source, noise = _edit_setup(config)
    out = sample_edit(toy, src, src, source, noise, config, edit_n_min=0.2, edit_n_max=1.0)
    err = float((out - source).abs().max())
    assert err < 1e-5, f"identical conditions moved the source by {err}"
    assert len(toy.calls) == 2 * 8 and all(c["rows"] == 1 for c in toy.calls)


@pytest.mark.parametrize("n_avg", [1, 3])
def test_edit_draws_and_calls(n_avg):
    config = SamplerConfig(infer_step=10, scheduler_type="pingpong")
    toy, src, tar, source, noise = _edit_setup(config, items=2)
    out = sample_edit(toy, src, tar, source, noise, config, edit_n_min=0.2, edit_n_max=0.5,
                      edit_n_avg=n_avg)
    assert out.shape == (2, 8, 16, 24)
    assert len(noise.draws) == 3 * n_avg + 1 and all(d.shape == (2, 8, 16, 24) for d in noise.draws)
    assert len(toy.calls) == 3 * 2 * n_avg + 5 and all(c["rows"] == 4 for c in toy.calls)
    uncond_mask = toy.calls[0]["mask"][2:]
    assert bool((uncond_mask[:, -LYRIC_IDS.shape[1]:] == 0).all()), "null condition masks the lyrics"
    assert torch.equal(toy.calls[0]["mask"][:2], torch.ones_like(toy.calls[0]["mask"][:2]))


def test_edit_pingpong_still_edits():
    """Upstream's pingpong never updates z_edit during FlowEdit; ours takes the ODE step."""
    euler = SamplerConfig(infer_step=10)
    toy, src, tar, source, noise = _edit_setup(euler)
    a = sample_edit(toy, src, tar, source, noise, euler, edit_n_min=0.6, edit_n_max=1.0)
    _, _, _, _, noise2 = _edit_setup(euler)
    pingpong = SamplerConfig(infer_step=10, scheduler_type="pingpong")
    b = sample_edit(ToyBackend(), src, tar, source, noise2, pingpong, edit_n_min=0.6, edit_n_max=1.0)
    assert torch.equal(a, b)
    assert float((a - source).abs().max()) > 1e-3


def test_edit_progress_and_cancel():
    config = SamplerConfig(infer_step=10)
    toy, src, tar, source, noise = _edit_setup(config)
    seen: list[tuple[int, int]] = []
    sample_edit(toy, src, tar, source, noise, config, edit_n_min=0.2, edit_n_max=0.4,
                hooks=SamplingHooks(progress=lambda i, n: seen.append((i, n))))
    assert seen == [(i, 8) for i in range(1, 9)]
    with pytest.raises(SamplingCancelled):
        sample_edit(toy, src, tar, source, noise, config, edit_n_min=0.2, edit_n_max=0.4,
                    hooks=SamplingHooks(should_cancel=lambda: len(toy.calls) > 3))


@pytest.mark.parametrize(
    ("n_min", "n_max", "n_avg", "message"),
    [
        (0.5, 0.4, 1, "edit_n_min: must be <= edit_n_max"),
        (-0.1, 0.4, 1, "edit_n_min: must be in"),
        (0.1, 1.2, 1, "edit_n_max: must be in"),
        (0.1, 0.4, 0, "edit_n_avg: must be an integer >= 1"),
        (0.1, 0.4, 1.5, "edit_n_avg: must be an integer >= 1"),
    ],
)
def test_edit_validation(n_min, n_max, n_avg, message):
    with pytest.raises(ValueError, match=message):
        EditSteps.from_request(n_min, n_max, n_avg, 10)


def test_edit_presets_and_step_indices():
    assert EDIT_PRESETS == {"only_lyrics": (0.6, 1.0), "remix": (0.2, 0.4)}
    assert EditSteps.from_request(*edit_preset("remix"), 1, 27) == EditSteps(27, 5, 10, 1)
    assert EditSteps.from_request(*edit_preset("only_lyrics"), 1, 60) == EditSteps(60, 36, 60, 1)
    with pytest.raises(ValueError, match="edit_type: must be one of"):
        edit_preset("karaoke")


def test_uncond_mask_reaches_the_unconditional_rows():
    """GuidedVelocity batches [cond; uncond] with each branch's own encoder mask."""
    toy = ToyBackend()
    states = torch.ones(1, 5, 4)
    conds = EncodedConditions(cond=states, mask=torch.ones(1, 5), uncond=-states,
                              uncond_mask=torch.tensor([[1.0, 1, 1, 0, 0]]))
    guided = GuidedVelocity(toy, conds, SamplerConfig(use_erg_diffusion=False), 10, 2, torch.ones(2, 7))
    guided(torch.zeros(2, 8, 16, 7), 4, torch.tensor(500.0))
    mask = toy.calls[0]["mask"]
    assert toy.calls[0]["rows"] == 4 and torch.equal(mask[:2], torch.ones(2, 5))
    assert torch.equal(mask[2:], torch.tensor([[1.0, 1, 1, 0, 0]] * 2))

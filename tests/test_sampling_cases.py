"""Replay upstream's text2music runs through our loop, without the real models.

Each golden trace records every DiT decode call upstream made (timestep, input latents, output
velocity, and the L2 norm of the encoder states, which tells the guidance branches apart) and
every scheduler step (input sample, guided velocity, next sample). ``ReplayBackend`` answers
our batched ``predict_velocity`` calls with the recorded velocities of the matching upstream
calls and checks that we ask with the same latents, timesteps, branches and query scales. The
encoders are stand-ins that check their inputs are exactly the branch inputs upstream builds
(see ``acestep_triton.sampling.conditions``) and return constant states whose norm identifies
the branch. Then schedulers + guidance + loop must reproduce ``sched_model_output``,
``sched_prev_sample`` and ``final_latents``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from sampling_helpers import WithoutCodec

from acestep_triton.sampling import (
    PromptTokens,
    SamplerConfig,
    SamplingCancelled,
    SamplingHooks,
    SeededNoise,
    StepTrace,
    build_conditions,
    latent_frames,
    lyric_inputs,
    resolve_request_seeds,
    sample_retake,
    sample_text2music,
)
from acestep_triton.sampling.erg import DIT_ERG_LAYERS, LYRIC_ERG_LAYERS, TEXT_ERG_LAYERS

TOL = 1e-4
TEXT_LAYERS, LYRIC_LAYERS, DIT_LAYERS = 12, 6, 24
PROMPT_IDS = torch.tensor([[5, 6, 7, 1]], dtype=torch.int64)
PROMPT_MASK = torch.ones_like(PROMPT_IDS)
LYRIC_IDS, LYRIC_MASK = lyric_inputs([261, 6683, 2, 5023, 40, 2])
PROMPT = PromptTokens(PROMPT_IDS, PROMPT_MASK, LYRIC_IDS, LYRIC_MASK)
STATE_DIM = 8


def _erg_vector(layers: int, weakened: range) -> torch.Tensor:
    v = torch.ones(layers)
    v[list(weakened)] = 0.01
    return v


class ReplayBackend(WithoutCodec):
    """A ComponentBackend that replays one upstream trace (see the module docstring)."""

    text_layers = TEXT_LAYERS
    lyric_layers = LYRIC_LAYERS
    dit_layers = DIT_LAYERS

    def __init__(self, trace: dict[str, np.ndarray], items: int, erg_diffusion: bool = True) -> None:
        self.timestep = torch.from_numpy(trace["dit_timestep"])
        self.hidden_in = torch.from_numpy(trace["dit_hidden_in"])
        self.v_out = torch.from_numpy(trace["dit_v_out"])
        self.norms = trace["dit_encoder_states_l2norm"]
        self.items = items
        self.erg_diffusion = erg_diffusion
        # Call 0 is always the conditional branch; the other distinct norm is the unconditional.
        self.cond_norm = float(self.norms[0])
        others = sorted({round(float(n), 6) for n in self.norms} - {round(self.cond_norm, 6)})
        assert len(others) <= 1, f"expected at most two branch norms, got {others}"
        self.uncond_norm = others[0] if others else None
        self.pos = 0
        self.dit_calls = 0
        self.max_hidden_err = 0.0

    # --- encoders: check the inputs are upstream's branch inputs ---------------------------
    def encode_text(self, input_ids, attention_mask, query_scale):
        assert torch.equal(input_ids, PROMPT_IDS) and torch.equal(attention_mask, PROMPT_MASK)
        if torch.equal(query_scale, torch.ones(TEXT_LAYERS)):
            fill = 1.0
        elif torch.equal(query_scale, _erg_vector(TEXT_LAYERS, TEXT_ERG_LAYERS)):
            fill = 2.0
        else:
            raise AssertionError(f"unexpected text query scale {query_scale}")
        return torch.full((*input_ids.shape, 4), fill)

    def encode_conditions(self, text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale):
        assert torch.equal(text_mask, PROMPT_MASK) and torch.equal(lyric_mask, LYRIC_MASK)
        assert speaker.shape == (1, 512) and not speaker.any(), "speaker must be zeros"
        assert torch.equal(lyric_ids, LYRIC_IDS), "all case branches use the real lyric ids (ERG lyric)"
        weakened = _erg_vector(LYRIC_LAYERS, LYRIC_ERG_LAYERS)
        if bool((text_states == 1.0).all()) and torch.equal(lyric_query_scale, torch.ones(LYRIC_LAYERS)):
            norm = self.cond_norm
        elif bool((text_states == 2.0).all()) and torch.equal(lyric_query_scale, weakened):
            assert self.uncond_norm is not None, "unconditional branch built but never used upstream"
            norm = self.uncond_norm
        else:
            raise AssertionError("condition inputs match no upstream branch (ERG tag + ERG lyric)")
        s = 1 + text_states.shape[1] + lyric_ids.shape[1]
        value = norm / math.sqrt(self.items) / math.sqrt(s * STATE_DIM)
        return torch.full((1, s, STATE_DIM), value, dtype=torch.float64).float(), torch.ones(1, s)

    # --- the DiT: answer with the recorded velocities --------------------------------------
    def predict_velocity(self, latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale):
        self.dit_calls += 1
        rows = latents.shape[0]
        assert rows % self.items == 0
        groups = rows // self.items
        assert latent_mask.shape == (rows, latents.shape[-1]) and bool((latent_mask == 1).all())
        assert encoder_mask.shape == encoder_states.shape[:2] and timestep.shape == (rows,)
        candidates = list(range(self.pos, self.pos + groups))
        assert candidates[-1] < len(self.norms), "more DiT evaluations than upstream made"
        outputs = []
        for g in range(groups):
            sl = slice(g * self.items, (g + 1) * self.items)
            norm = float(encoder_states[sl].double().norm())
            match = next(
                (c for c in candidates if abs(norm - self.norms[c]) <= 1e-5 * self.norms[c]), None
            )
            assert match is not None, f"no upstream call at {self.pos} with encoder norm {norm}"
            candidates.remove(match)
            is_uncond = abs(norm - self.cond_norm) > 1e-5 * self.cond_norm
            expected_scale = (
                _erg_vector(DIT_LAYERS, DIT_ERG_LAYERS) if is_uncond and self.erg_diffusion
                else torch.ones(DIT_LAYERS)
            )
            scale_rows = query_scale[sl] if query_scale.dim() == 2 else query_scale.unsqueeze(0)
            assert bool((scale_rows == expected_scale).all()), f"wrong query scale for call {match}"
            assert torch.equal(timestep[sl], self.timestep[match]), "timestep differs from upstream"
            err = float((latents[sl] - self.hidden_in[match]).abs().max())
            self.max_hidden_err = max(self.max_hidden_err, err)
            assert err <= TOL, f"DiT input latents differ from upstream call {match} by {err:.3g}"
            outputs.append(self.v_out[match])
        self.pos += groups
        return torch.cat(outputs)


def _config(kwargs: dict) -> SamplerConfig:
    return SamplerConfig(
        infer_step=kwargs["infer_step"],
        guidance_scale=kwargs["guidance_scale"],
        scheduler_type=kwargs["scheduler_type"],
        cfg_type=kwargs["cfg_type"],
        omega_scale=kwargs["omega_scale"],
        guidance_interval=kwargs["guidance_interval"],
        guidance_interval_decay=kwargs["guidance_interval_decay"],
        min_guidance_scale=kwargs["min_guidance_scale"],
        use_erg_tag=kwargs["use_erg_tag"],
        use_erg_lyric=kwargs["use_erg_lyric"],
        use_erg_diffusion=kwargs["use_erg_diffusion"],
        oss_steps=kwargs["oss_steps"],
        guidance_scale_text=kwargs["guidance_scale_text"],
        guidance_scale_lyric=kwargs["guidance_scale_lyric"],
    )


class Golden(NamedTuple):
    """One golden case: its metadata, upstream's call arguments, recorded arrays and trace."""

    meta: dict
    kwargs: dict
    case: dict[str, np.ndarray]
    trace: dict[str, np.ndarray]
    config: SamplerConfig


def _golden(golden_dir: Path, golden_cases: dict, name: str) -> Golden:
    with np.load(golden_dir / "cases" / f"case_{name}.npz") as z:
        case = {k: z[k] for k in z.files}
    with np.load(golden_dir / "cases" / f"case_{name}_trace.npz") as z:
        trace = {k: z[k] for k in z.files}
    meta = golden_cases[name]
    return Golden(meta, meta["call_kwargs"], case, trace, _config(meta["call_kwargs"]))


class StepChecker:
    """Compares every loop iteration with upstream's recorded scheduler step."""

    def __init__(self, trace: dict[str, np.ndarray]) -> None:
        self.trace = trace
        self.errors = {"sample_in": 0.0, "model_output": 0.0, "prev_sample": 0.0, "timestep": 0.0}
        self.steps = 0

    def __call__(self, step: StepTrace) -> None:
        i = step.index
        pairs = {
            "timestep": (step.timestep, self.trace["sched_timestep"][i]),
            "sample_in": (step.sample, self.trace["sched_sample_in"][i]),
            "model_output": (step.velocity, self.trace["sched_model_output"][i]),
            "prev_sample": (step.next_sample, self.trace["sched_prev_sample"][i]),
        }
        for key, (ours, ref) in pairs.items():
            err = float(np.abs(ours.numpy() - ref).max())
            self.errors[key] = max(self.errors[key], err)
        self.steps += 1


def _run_case(golden_dir, golden_cases, name, row_query_scale=False, progress=None):
    meta, kwargs, case, trace, config = _golden(golden_dir, golden_cases, name)
    items = kwargs["batch_size"]
    seeds, retake_seeds = resolve_request_seeds(kwargs["manual_seeds"], kwargs["retake_seeds"], items)
    assert seeds.seeds == meta["actual_seeds"]
    frames = latent_frames(kwargs["audio_duration"])
    noise = seeds.draw_latents(frames)
    noise_err = float(np.abs(noise.numpy() - case["init_noise"]).max())
    assert noise_err == 0.0, f"initial noise differs from upstream by {noise_err}"

    backend = ReplayBackend(trace, items, erg_diffusion=config.use_erg_diffusion)
    conditions = build_conditions(backend, PROMPT, config)
    checker = StepChecker(trace)
    hooks = SamplingHooks(progress=progress, on_step=checker, row_query_scale=row_query_scale)
    if kwargs["task"] == "retake":
        retake_noise = retake_seeds.draw_latents(frames)
        assert retake_seeds.seeds == meta["actual_retake_seeds"]
        r_err = float(np.abs(retake_noise.numpy() - case["retake_noise"]).max())
        assert r_err == 0.0, f"retake noise differs from upstream by {r_err}"
        final = _retake_with_observer(
            backend, conditions, noise, retake_noise, kwargs, config, seeds.step_generator, hooks
        )
    else:
        final = sample_text2music(backend, conditions, noise, config, generator=seeds.step_generator, hooks=hooks)
    assert backend.pos == len(trace["dit_v_out"]), (
        f"made {backend.pos} of upstream's {len(trace['dit_v_out'])} DiT evaluations"
    )
    assert checker.steps == len(trace["sched_timestep"])
    final_err = float(np.abs(final.numpy() - case["final_latents"]).max())
    return checker.errors, final_err, backend


def _retake_with_observer(backend, conditions, noise, retake_noise, kwargs, config, generator, hooks):
    # The checker counts one pass: sample_retake runs unobserved, then the per-step trace is
    # checked through run_sampling from the same start (identical by construction).
    from acestep_triton.sampling import mix_retake_noise, run_sampling

    final = sample_retake(
        backend, conditions, noise, retake_noise, kwargs["retake_variance"], config, generator=generator,
        hooks=replace(hooks, on_step=None),
    )
    backend.pos = 0
    start = mix_retake_noise(noise, retake_noise, kwargs["retake_variance"])
    replayed = run_sampling(backend, conditions, start, config.schedule(), config, generator=generator, hooks=hooks)
    assert torch.equal(final, replayed)
    return final


CASES = ["a_text2music_apg", "b_cfg", "c_cfg_star", "d_heun", "e_pingpong", "j_batch2", "l_retake"]


@pytest.mark.parametrize("name", CASES)
def test_loop_reproduces_upstream_trace(golden_dir, golden_cases, name):
    errors, final_err, _ = _run_case(golden_dir, golden_cases, name)
    summary = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    assert errors["timestep"] == 0.0, summary
    assert max(errors.values()) <= TOL, f"{name}: max abs errors per step: {summary}"
    assert final_err <= TOL, f"{name}: final latents max abs error {final_err:.2e} ({summary})"


def test_branches_share_one_call_per_query_scale(golden_dir, golden_cases):
    """With ERG diffusion the uncond rows need another query scale: 2 calls per guided step."""
    _, _, backend = _run_case(golden_dir, golden_cases, "j_batch2")
    guided_steps = 5  # N = 10, guidance interval 0.5 → steps 2..6
    assert backend.dit_calls == 10 + guided_steps


def test_row_query_scale_merges_all_branches(golden_dir, golden_cases):
    """A backend with a per-row query scale gets exactly one DiT call per step, same numbers."""
    errors, final_err, backend = _run_case(golden_dir, golden_cases, "j_batch2", row_query_scale=True)
    assert backend.dit_calls == 10
    assert max(errors.values()) <= TOL and final_err <= TOL, f"{errors}, final {final_err:.2e}"


def test_progress_reports_each_step(golden_dir, golden_cases):
    seen: list[tuple[int, int]] = []
    _run_case(golden_dir, golden_cases, "d_heun", progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 19) for i in range(1, 20)]


def test_cancel_between_steps(golden_dir, golden_cases):
    _, _, _, trace, config = _golden(golden_dir, golden_cases, "a_text2music_apg")
    backend = ReplayBackend(trace, 1)
    conditions = build_conditions(backend, PROMPT, config)
    noise = SeededNoise.from_seeds([12345]).draw_latents(32)
    done: list[int] = []
    with pytest.raises(SamplingCancelled) as info:
        sample_text2music(
            backend, conditions, noise, config,
            hooks=SamplingHooks(progress=lambda i, n: done.append(i), should_cancel=lambda: len(done) >= 3),
        )
    assert (info.value.step, info.value.total) == (3, 10)
    assert done == [1, 2, 3] and backend.pos == 4  # steps 0, 1: one eval each; step 2 guided: two

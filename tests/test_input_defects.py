"""Inputs a hostile-but-fair probe found mishandled (issue 13 items 1, 4, 6; issue 9 item 5).

Each defect is checked through a real tritonserver (the tiny deployment), with unit tests of
the pieces beside it:

- odd upload sample rates: resampling costs memory proportional to the audio (a 2 KB WAV at
  1999 Hz used to build a 3.9 GiB kernel), rates outside 8–192 kHz are refused naming the field,
  and undecodable uploads say why without leaking ``<_io.BytesIO object at 0x…>``;
- in-schema values that gave internal errors: an ``audio_duration`` shorter than one latent
  frame, a repaint window reaching further past the source's end than the source is long;
- one schema, one verdict: a table of bad values is refused by the client's validation and by
  the server naming the same field (and the seeds the server uses are the ones validated);
- extend honours ``retake_variance`` like upstream's pipeline (the loop starts at
  ``n_min = int(N·(1 − retake_variance))``), checked on the golden checkpoint and through Triton.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_client.audio_io import audio_file_bytes
from acestep_client.client import AceStepClient, ServerError
from acestep_client.params import LATENT_FRAME_S, GenerationParams, ParamError
from acestep_triton.audio import (
    EXACT_KERNEL_MAX_TAPS,
    _resample_compact,
    _resample_exact,
    decode_audio_bytes,
    exact_kernel_taps,
    resample,
    resampled_length,
)
from acestep_triton.frontend.upstream import extend_params
from acestep_triton.pipeline import MusicGenerator
from acestep_triton.sampling.noise import latent_frames

BASE = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird", "infer_step": 2,
        "manual_seeds": "7", "retake_seeds": "9"}
SAMPLES_PER_FRAME = 512 * 8


def params(**overrides: object) -> GenerationParams:
    return GenerationParams(**{**BASE, **overrides})


def wav_bytes(audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.ascontiguousarray(np.atleast_2d(audio).T), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def tone(rate: int, seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def names_field(message: str, field: str) -> bool:
    """Whether an error message names ``field`` as the schema does (``"<field>: reason"``)."""
    return re.search(rf"(?<![\w.]){re.escape(field)}: ", message) is not None


@pytest.fixture(scope="module")
def source(tiny_local: MusicGenerator) -> bytes:
    """A 2 s song from the tiny model (22 latent frames), as the float WAV a user would upload."""
    out = tiny_local.generate(params(audio_duration=2.0))
    return wav_bytes(out.audio[0].numpy(), out.sample_rate)


# ------------------------------------------------------------------------------ 13.1 resampling
MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from acestep_triton.audio import resample, to_stereo_44k
    resample(torch.zeros(2, 4800), 48000, 44100)  # warm up the allocator and the import-time mappings
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for rate in (1999, 44101, 8001, 191999, 96001):
        out = to_stereo_44k(torch.randn(1, rate // 2), rate)  # 0.5 s mono, as the probe's upload
        assert out.shape == (2, -(-44100 * (rate // 2) // rate)), out.shape
    long = to_stereo_44k(torch.randn(1, 44101 * 30), 44101)  # 30 s at a rate sharing nothing with 44.1 kHz
    print("ok", long.shape[-1])
""")


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_odd_sample_rates_resample_in_memory_proportional_to_the_audio() -> None:
    """Five odd rates and 30 s at 44101 Hz within 256 MiB of address space beyond the imports.

    Before: 1999 Hz alone built a 44100 × 2013 float64 kernel (3.4 GiB peak), 44101 Hz one of
    15.6 GB; each failed this limit.
    """
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "256"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-2000:]


@pytest.mark.parametrize(("orig", "new"), [(48000, 44100), (16000, 44100), (44100, 48000), (192000, 44100)])
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_common_rates_keep_the_exact_method_and_the_compact_one_agrees(orig: int, new: int) -> None:
    """Common rates stay on torchaudio's exact kernel (goldens bit-identical); the compact method
    is the same filter (differences: torchaudio's float32 phase rounding, ~1e-5 on a unit signal)."""
    assert exact_kernel_taps(orig, new) <= EXACT_KERNEL_MAX_TAPS
    wave = torch.randn(2, 9000, generator=torch.Generator().manual_seed(1)) * 0.3
    g = math.gcd(orig, new)
    out = resample(wave, orig, new)
    assert torch.equal(out, _resample_exact(wave, orig // g, new // g, 6, 0.99)[:, : out.shape[-1]])
    compact = _resample_compact(wave, orig // g, new // g, 6, 0.99)[:, : out.shape[-1]]
    err = (compact - out).abs().max().item()
    assert err < 2e-5, f"{orig} -> {new}: compact vs exact {err:.3g}"


@pytest.mark.parametrize("orig", [1999, 44101, 191999])
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_odd_rates_take_the_compact_path_and_keep_a_tone(orig: int) -> None:
    assert exact_kernel_taps(orig, 44100) > EXACT_KERNEL_MAX_TAPS
    wave = torch.from_numpy(tone(orig, 0.5, hz=440.0))[None]
    out = resample(wave, orig, 44100)
    assert out.shape[-1] == resampled_length(wave.shape[-1], orig, 44100) == math.ceil(wave.shape[-1] * 44100 / orig)
    expected = torch.from_numpy(tone(44100, 0.5, hz=440.0))[: out.shape[-1]]
    inner = slice(2000, out.shape[-1] - 2000)  # away from the zero-padded edges
    err = (out[0, inner] - expected[inner]).abs().max().item()
    assert err < 2e-3, f"{orig} Hz: a 440 Hz tone moved by {err:.3g}"


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_compact_weights_per_chunk_equal_the_cached_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the table's bound the weights are computed per chunk: the same numbers (chunks of a
    few outputs, so chunk edges are crossed too)."""
    import acestep_triton.audio as audio

    wave = torch.randn(2, 3000, generator=torch.Generator().manual_seed(2))
    cached = audio._resample_compact(wave, 1999, 44100, 6, 0.99)
    monkeypatch.setattr(audio, "_COMPACT_TABLE_MAX_WEIGHTS", 0)
    monkeypatch.setattr(audio, "_CHUNK_ELEMENTS", 1000)
    assert torch.equal(audio._resample_compact(wave, 1999, 44100, 6, 0.99), cached)


@pytest.mark.parametrize("rate", [7999, 192001])
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_rates_outside_8_to_192_khz_are_refused_naming_the_field(rate: int) -> None:
    for field in ("src_audio", "ref_audio"):
        with pytest.raises(ParamError, match=rf"^{field}: sample rate {rate} Hz is outside the supported 8000–192000"):
            decode_audio_bytes(wav_bytes(tone(rate, 0.1), rate), field)


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_undecodable_audio_names_the_field_and_the_reason() -> None:
    with pytest.raises(ParamError) as info:
        decode_audio_bytes(b"RIFF\x00\x00not really audio", "ref_audio")
    assert info.value.field == "ref_audio"
    assert "Format not recognised" in str(info.value)
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value), str(info.value)


def test_uploads_at_odd_and_bad_rates_through_triton(tiny_client: AceStepClient) -> None:
    """44101 Hz (no factor shared with 44.1 kHz: a 15.6 GB kernel before) is served; the probe's
    1999 Hz and 192001 Hz are refused naming ``src_audio`` / ``ref_audio``; an undecodable upload
    says why without an object repr."""
    odd = wav_bytes(tone(44101, 0.5), 44101, "PCM_16")
    out = tiny_client.generate(params(task="repaint", repaint_start=0.0, repaint_end=0.3), src_audio=odd)
    assert out.audio.shape[:2] == (1, 2) and np.isfinite(out.audio).all()
    for rate in (1999, 192001):
        bad = wav_bytes(tone(rate, 0.2), rate, "PCM_16")
        with pytest.raises(ServerError, match=rf"src_audio: sample rate {rate} Hz is outside"):
            tiny_client.generate(params(task="repaint", repaint_start=0.0, repaint_end=0.1), src_audio=bad)
        with pytest.raises(ServerError, match=rf"ref_audio: sample rate {rate} Hz is outside"):
            tiny_client.generate(params(task="audio2audio"), ref_audio=bad)
    with pytest.raises(ServerError, match=r"src_audio: cannot decode") as info:
        tiny_client.generate(params(task="repaint", repaint_start=0.0, repaint_end=1.0), src_audio=b"RIFF\x00\x00junk")
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value), str(info.value)


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_client_encodes_arrays_only_at_rates_the_server_accepts() -> None:
    """The client's own WAV encoding of ``(audio, rate)`` gives the server's verdict, without the
    ``<_io.BytesIO …>`` repr libsndfile puts in its messages."""
    for rate in (0, 1999, 192001):
        with pytest.raises(ParamError, match=rf"^ref_audio: sample rate {rate} Hz is outside the supported"):
            audio_file_bytes((tone(44100, 0.1), rate), "ref_audio")
    with pytest.raises(ParamError, match=r"^src_audio: audio must be \[channels, samples\] with both > 0"):
        audio_file_bytes((np.zeros((0, 10), np.float32), 44100), "src_audio")
    assert decode_audio_bytes(audio_file_bytes((tone(8000, 0.1), 8000), "src_audio"), "src_audio")[1] == 8000


# ------------------------------------------------------------------------------ 13.4 in-schema values
def test_audio_duration_below_one_frame_is_refused_and_one_frame_is_served(tiny_client: AceStepClient) -> None:
    """(0, 0.0929) s gave "internal error … DLPack tensor is not contiguous" (zero latent frames)."""
    with pytest.raises(ServerError) as info:
        tiny_client.generate(params(audio_duration=0.05), validate=False)
    assert names_field(str(info.value), "audio_duration") and "0.0929" in str(info.value), str(info.value)
    shortest = math.ceil(LATENT_FRAME_S * 1e4) / 1e4
    assert latent_frames(shortest) == 1
    out = tiny_client.generate(params(audio_duration=shortest))
    assert out.audio.shape[-1] == resampled_length(SAMPLES_PER_FRAME, 44100, 48000)


def test_repaint_window_far_past_the_source_end_extends_it(tiny_client: AceStepClient, tiny_local: MusicGenerator,
                                                           source: bytes) -> None:
    """[0, 8) s on a 2 s (22-frame) source: 64 new frames, more than the source's 22. It was
    ``request: retake_noise: expected [1, 8, 16, 64] latents, got [1, 8, 16, 22]``; now it is the
    extension upstream's repaint makes (as ``task="extend"`` does), the source kept exactly."""
    request = params(task="repaint", repaint_start=0.0, repaint_end=8.0)
    served = tiny_client.generate(request, src_audio=source)
    local = tiny_local.generate(params(task="repaint", repaint_start=0.0, repaint_end=8.0), src_audio=source)
    frames = latent_frames(8.0)
    assert local.latents.shape[-1] == frames
    src_latents, _ = tiny_local.encode_audio(source, "src_audio")
    width = src_latents.shape[-1]
    assert frames - width > width, "the test needs an extension longer than the source"
    assert torch.equal(local.latents[..., :width], src_latents.expand_as(local.latents[..., :width]))
    assert served.audio.shape == local.audio.shape
    assert float(np.abs(served.audio - local.audio.numpy()).max()) <= 1e-4


# ------------------------------------------------------------------------------ 13.6 one verdict
BAD_VALUES = [
    ("manual_seeds", {"manual_seeds": "1,,2"}),
    ("manual_seeds", {"manual_seeds": "4,5,"}),
    ("retake_seeds", {"task": "retake", "retake_seeds": "1,,2"}),
    ("oss_steps", {"oss_steps": "1,,2"}),
    ("ref_audio_strength", {"task": "audio2audio", "ref_audio_strength": 1.0}),
    ("ref_audio_strength", {"task": "audio2audio", "ref_audio_strength": 0.9, "infer_step": 5}),
    ("audio_duration", {"audio_duration": 0.05}),
    ("audio_duration", {"task": "retake", "audio_duration": 0.09}),
    ("repaint_end", {"task": "repaint", "repaint_start": 2.0, "repaint_end": 1.0}),
    ("edit_n_min", {"task": "edit", "edit_n_min": 0.8, "edit_n_max": 0.3}),
]


def _bad_request(bad: dict) -> GenerationParams:
    request = params(audio_duration=1.0)
    for key, value in bad.items():  # unvalidated: what a careless client sends
        setattr(request, key, value)
    return request


@pytest.mark.parametrize(("field", "bad"), BAD_VALUES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES)])
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_client_validation_refuses_what_the_server_refuses(field: str, bad: dict) -> None:
    with pytest.raises(ParamError) as info:
        _bad_request(bad).validate()
    assert info.value.field == field, str(info.value)


def test_client_and_server_name_the_same_field(tiny_client: AceStepClient, source: bytes) -> None:
    """The table through both sides: the client's validation and the real server agree."""
    verdicts = {}
    for field, bad in BAD_VALUES:
        request = _bad_request(bad)
        audio = {"audio2audio": {"ref_audio": source}, "repaint": {"src_audio": source},
                 "edit": {"src_audio": source}}.get(request.task, {})
        try:
            _bad_request(bad).validate()
            client_field = None
        except ParamError as exc:
            client_field = exc.field
        try:
            tiny_client.generate(request, validate=False, **audio)
            server_field = None
        except ServerError as exc:
            server_field = field if names_field(str(exc), field) else str(exc)
        verdicts[f"{field} {bad}"] = (client_field, server_field)
    assert all(c == s for c, s in verdicts.values()), verdicts
    assert all(c is not None for c, _ in verdicts.values()), verdicts


def test_the_seeds_used_are_the_seeds_validated(tiny_client: AceStepClient) -> None:
    """The schema reads "5 6" as two seeds; the server's sampling code used to read the raw string
    and draw random seeds instead."""
    assert params(manual_seeds="5 6").validate().seed_list() == [5, 6]
    out = tiny_client.generate(params(audio_duration=0.5, batch_size=2, manual_seeds="5 6", retake_seeds="8, 9"))
    assert out.params["actual_seeds"] == [5, 6] and out.params["retake_seeds"] == [8, 9]


# ------------------------------------------------------------------------------ 9.5 extend variance
def upstream_first_step(infer_step: int, retake_variance: float) -> int:
    """Upstream's ``n_min = int(infer_steps * (1 - retake_variance))`` (pipeline_ace_step.py)."""
    return int(infer_step * (1 - retake_variance))


EXTEND_STEPS = 10


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_extend_honours_retake_variance_with_the_golden_checkpoint(golden_local: MusicGenerator,
                                                                   golden_dir: Path) -> None:
    """Steps run = N − n_min, and extend(right R, v) = repaint(0, duration + R, v) exactly: upstream's
    extend is its repaint with that window. v = 1.0 (every step) is what extend always used."""
    song, rate = sf.read(golden_dir / "cases" / "case_a_text2music_apg_48k_float.wav", dtype="float32",
                         always_2d=True)
    src = wav_bytes(song[: rate * 3 // 2].T, rate)  # its first 1.5 s: the test needs no more
    _, duration = golden_local.encode_audio(src, "src_audio")
    steps_total = 6
    for variance in (0.35, 1.0):
        seen: list[tuple[int, int]] = []
        fields = {**BASE, "infer_step": steps_total, "retake_variance": variance}
        extended = golden_local.generate(GenerationParams(**fields, task="extend", right_extend_length=0.5),
                                         src_audio=src, progress=lambda s, t, seen=seen: seen.append((s, t)))
        steps = steps_total - upstream_first_step(steps_total, variance)
        assert seen == [(k + 1, steps) for k in range(steps)], f"v={variance}: {seen}"
        repainted = golden_local.generate(GenerationParams(**fields, task="repaint", repaint_start=0.0,
                                                           repaint_end=duration + 0.5), src_audio=src)
        assert torch.equal(extended.latents, repainted.latents), f"v={variance}: extend != repaint window"
        assert extended.record["retake_variance"] == variance


def test_extend_honours_retake_variance_through_triton(tiny_client: AceStepClient, tiny_local: MusicGenerator,
                                                       source: bytes) -> None:
    for variance in (0.5, 1.0):
        seen: list[tuple[int, int]] = []
        request = params(task="extend", left_extend_length=0.5, right_extend_length=1.0, infer_step=EXTEND_STEPS,
                         retake_variance=variance)
        served = tiny_client.generate(request, src_audio=source,
                                      on_progress=lambda s, t, seen=seen: seen.append((s, t)))
        steps = EXTEND_STEPS - upstream_first_step(EXTEND_STEPS, variance)
        assert seen and seen[-1] == (steps, steps) and len(seen) == steps, f"v={variance}: {seen}"
        local = tiny_local.generate(params(task="extend", left_extend_length=0.5, right_extend_length=1.0,
                                           infer_step=EXTEND_STEPS, retake_variance=variance), src_audio=source)
        assert float(np.abs(served.audio - local.audio.numpy()).max()) <= 1e-4, f"v={variance}"


def test_front_end_extend_runs_every_step_as_upstreams_ui() -> None:
    """The Gradio Extend tab passes retake_variance 1.0, as upstream's UI (it has no slider)."""
    p = extend_params({}, extend_seeds=None, left_extend_length=0.0, right_extend_length=5.0, format="wav",
                      lora_name_or_path=None, lora_weight=1.0)
    assert p.retake_variance == 1.0

"""Every ACE-Step task (retake, repaint, extend, edit, audio2audio) in-process and through Triton.

Fidelity: upstream's golden cases l_retake, m_repaint and o_edit within 1e-4 absolute, both
in-process and through the real tritonserver. Then each task's defining property, Triton ==
in-process for the same seeds (1e-4), batches with per-item seeds, audio inputs in every
format, and bad input per task rejected with the field's name while the server keeps serving.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_pipeline_golden import case_params

from acestep_client.client import AceStepClient, ServerError
from acestep_client.params import OUTPUT_SAMPLE_RATE, GenerationParams, ParamError
from acestep_triton.pipeline import MusicGenerator
from acestep_triton.sampling.noise import MAX_FRAMES
from acestep_triton.serving.server import TritonServer

TOL = 1e-4
GOLDEN_TASK_CASES = ("l_retake", "m_repaint", "o_edit")
BASE = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird\n[chorus]\nsing",
        "infer_step": 6, "manual_seeds": "7", "retake_seeds": "9"}


def params(**overrides: object) -> GenerationParams:
    return GenerationParams(**{**BASE, **overrides})


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


def wav_bytes(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.ascontiguousarray(audio.T), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(tiny_local: MusicGenerator) -> bytes:
    """A 3 s song from the tiny model, as the float WAV a user would upload."""
    out = tiny_local.generate(params(audio_duration=3.0))
    return wav_bytes(out.audio[0].numpy(), out.sample_rate)


# ------------------------------------------------------------------------------ upstream's numbers
@pytest.mark.parametrize("name", GOLDEN_TASK_CASES)
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_golden_task_cases_in_process(name: str, golden_local: MusicGenerator, golden_cases: dict,
                                      golden_dir: Path) -> None:
    case = golden_cases[name]
    expected = np.load(golden_dir / "cases" / case["file"])
    src = (golden_dir / "cases" / "case_a_text2music_apg_48k_float.wav").read_bytes()
    out = golden_local.generate(case_params(case), src_audio=src)
    err = max_err(out.latents.numpy(), expected["final_latents"])
    assert err <= TOL, f"{name}: final latents differ from upstream by {err:.3g}"
    err = max_err(out.audio.numpy(), expected["audio_48k"])
    assert err <= TOL, f"{name}: audio differs from upstream by {err:.3g}"
    assert out.record["retake_seeds"] == case["actual_retake_seeds"]


@pytest.mark.parametrize("name", GOLDEN_TASK_CASES)
def test_golden_task_cases_through_triton(name: str, golden_server: TritonServer, golden_cases: dict,
                                          golden_dir: Path) -> None:
    case = golden_cases[name]
    expected = np.load(golden_dir / "cases" / case["file"])["audio_48k"]
    src = golden_dir / "cases" / "case_a_text2music_apg_48k_float.wav"
    p = case_params(case)
    result = AceStepClient(golden_server.grpc_url).generate(p, src_audio=src if p.task != "retake" else None)
    err = max_err(result.audio, expected)
    assert err <= TOL, f"{name} through Triton differs from upstream by {err:.3g}"


# ------------------------------------------------------------------------------ each task's property
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_retake_variance_zero_reproduces_the_original(tiny_local: MusicGenerator) -> None:
    original = tiny_local.generate(params(audio_duration=2.0))
    retake = tiny_local.generate(params(task="retake", audio_duration=2.0, retake_variance=0.0,
                                        retake_seeds="1234"))
    assert np.array_equal(original.audio.numpy(), retake.audio.numpy())
    moved = tiny_local.generate(params(task="retake", audio_duration=2.0, retake_variance=0.5))
    assert max_err(original.audio.numpy(), moved.audio.numpy()) > 1e-3


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_retake_from_a_parameters_json(tiny_local: MusicGenerator) -> None:
    """The upstream workflow: json_data of a result + retake_variance + retake_seeds."""
    first = tiny_local.generate(params(audio_duration=2.0, manual_seeds=""))
    again = GenerationParams.from_mapping({**first.record, "task": "retake", "retake_variance": 0.0,
                                           "retake_seeds": "5"})
    assert np.array_equal(tiny_local.generate(again).audio.numpy(), first.audio.numpy())


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_repaint_keeps_the_source_outside_the_window(tiny_local: MusicGenerator, source: bytes) -> None:
    src_latents, _ = tiny_local.encode_audio(source, "src_audio")
    out = tiny_local.generate(params(task="repaint", repaint_start=1.0, repaint_end=2.0, retake_variance=0.7),
                              src_audio=source)
    start, end = int(1.0 * 44100 / 4096), int(2.0 * 44100 / 4096)
    got, ref = out.latents.numpy(), src_latents.numpy()
    assert np.array_equal(got[..., :start], ref[..., :start]) and np.array_equal(got[..., end:], ref[..., end:])
    assert max_err(got[..., start:end], ref[..., start:end]) > 1e-3, "the window was not repainted"


@pytest.mark.parametrize(("left", "right"), [(1.0, 0.0), (0.0, 1.5), (1.0, 1.0)])
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_extend_preserves_the_original_and_adds_time(left: float, right: float, tiny_local: MusicGenerator,
                                                     source: bytes) -> None:
    src_latents, _ = tiny_local.encode_audio(source, "src_audio")
    width = src_latents.shape[-1]
    out = tiny_local.generate(params(task="extend", left_extend_length=left, right_extend_length=right),
                              src_audio=source)
    pad_left = int(left * 44100 / 4096)
    assert out.latents.shape[-1] > width
    kept = out.latents.numpy()[..., pad_left:pad_left + width]
    assert np.array_equal(kept, src_latents.numpy()), "extend changed the original part"
    assert out.record["audio_duration"] == pytest.approx(out.latents.shape[-1] * 4096 / 44100)


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_extend_beyond_240_s_is_refused(tiny_local: MusicGenerator, source: bytes) -> None:
    with pytest.raises(ParamError, match=r"^right_extend_length: "):
        tiny_local.generate(params(task="extend", right_extend_length=239.0), src_audio=source)


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_edit_with_equal_bounds_leaves_the_source_unchanged(tiny_local: MusicGenerator, source: bytes) -> None:
    src_latents, _ = tiny_local.encode_audio(source, "src_audio")
    out = tiny_local.generate(params(task="edit", edit_target_prompt="rock, electric guitar", edit_n_min=1.0,
                                     edit_n_max=1.0), src_audio=source)
    assert np.array_equal(out.latents.numpy(), src_latents.numpy())
    edited = tiny_local.generate(params(task="edit", edit_type="remix", edit_target_prompt="rock, metal",
                                        edit_target_lyrics="[chorus]\nnew words"), src_audio=source)
    assert edited.record["edit_n_min"] == 0.2 and edited.record["edit_n_max"] == 0.4
    assert edited.latents.shape == src_latents.shape
    assert max_err(edited.latents.numpy(), src_latents.numpy()) > 1e-3


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_audio2audio_strength_pulls_towards_the_reference(tiny_local: MusicGenerator, source: bytes) -> None:
    ref_latents, _ = tiny_local.encode_audio(source, "ref_audio")
    near = tiny_local.generate(params(task="audio2audio", ref_audio_strength=0.8, infer_step=20), ref_audio=source)
    far = tiny_local.generate(params(task="audio2audio", ref_audio_strength=0.1, infer_step=20), ref_audio=source)
    d_near = max_err(near.latents.numpy(), ref_latents.numpy())
    d_far = max_err(far.latents.numpy(), ref_latents.numpy())
    assert d_near < d_far, f"strength 0.8 moved {d_near:.3g}, 0.1 moved {d_far:.3g}"
    with pytest.raises(ParamError, match=r"^ref_audio_strength: "):
        tiny_local.generate(params(task="audio2audio", ref_audio_strength=1.0), ref_audio=source)


# ------------------------------------------------------------------------------ Triton == in-process
TASK_REQUESTS = {
    "retake": ({"task": "retake", "audio_duration": 2.0, "retake_variance": 0.4}, None),
    "repaint": ({"task": "repaint", "repaint_start": 0.5, "repaint_end": 2.0, "retake_variance": 0.6}, "src"),
    "extend": ({"task": "extend", "left_extend_length": 0.5, "right_extend_length": 1.0}, "src"),
    "edit": ({"task": "edit", "edit_type": "remix", "edit_target_prompt": "rock"}, "src"),
    "audio2audio": ({"task": "audio2audio", "ref_audio_strength": 0.4}, "ref"),
}


@pytest.mark.parametrize("task", sorted(TASK_REQUESTS))
def test_triton_matches_in_process_with_a_batch(task: str, tiny_client: AceStepClient, tiny_local: MusicGenerator,
                                                 source: bytes) -> None:
    fields, audio = TASK_REQUESTS[task]
    request = params(**fields, batch_size=2, manual_seeds="3,4", retake_seeds="5,6")
    kwargs = {} if audio is None else {"src_audio" if audio == "src" else "ref_audio": source}
    served = tiny_client.generate(request, **kwargs)
    local = tiny_local.generate(params(**fields, batch_size=2, manual_seeds="3,4", retake_seeds="5,6"), **kwargs)
    err = max_err(served.audio, local.audio.numpy())
    assert err <= TOL, f"{task}: Triton vs in-process {err:.3g}"
    assert served.params["actual_seeds"] == [3, 4] and served.params["retake_seeds"] == [5, 6]
    assert max_err(served.audio[0], served.audio[1]) > 1e-4, "batch items with different seeds are identical"


def test_progress_streams_for_every_task(tiny_client: AceStepClient, source: bytes) -> None:
    for task, (fields, audio) in TASK_REQUESTS.items():
        seen: list[tuple[int, int]] = []
        kwargs = {} if audio is None else {"src_audio" if audio == "src" else "ref_audio": source}
        tiny_client.generate(params(**fields), on_progress=lambda s, t, seen=seen: seen.append((s, t)), **kwargs)
        assert seen and [s for s, _ in seen] == sorted(s for s, _ in seen), f"{task}: {seen}"


# ------------------------------------------------------------------------------ audio inputs
@pytest.mark.parametrize(("fmt", "subtype", "channels", "rate"), [
    ("WAV", "PCM_16", 1, 22050), ("FLAC", "PCM_24", 2, 44100), ("OGG", "VORBIS", 2, 32000),
    ("MP3", "MPEG_LAYER_III", 1, 48000)])
def test_source_audio_in_every_format(fmt: str, subtype: str, channels: int, rate: int,
                                      tiny_client: AceStepClient) -> None:
    t = np.arange(int(1.5 * rate)) / rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)]).astype(np.float32)
    out = tiny_client.generate(params(task="repaint", repaint_start=0.2, repaint_end=1.0),
                          src_audio=wav_bytes(audio, rate, fmt, subtype))
    assert out.audio.shape[:2] == (1, 2) and np.isfinite(out.audio).all()


def _nan_wav() -> bytes:
    audio = np.zeros((2, 4410), dtype=np.float32)
    audio[0, 10] = np.nan
    return wav_bytes(audio, 44100)


BAD_AUDIO = {
    "empty": (b"", "empty"),
    "broken": (b"RIFF\x00\x00not really audio", "cannot decode"),
    "nan": (_nan_wav(), "NaN"),
    "too long": (wav_bytes(np.zeros((1, 8000 * 241), np.float32), 8000, "WAV", "PCM_16"), "limit is 240"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_files_are_rejected_naming_the_field(case: str, tiny_client: AceStepClient) -> None:
    data, reason = BAD_AUDIO[case]
    with pytest.raises(ServerError, match=rf"src_audio: .*{reason}"):
        tiny_client.generate(params(task="repaint", repaint_start=0.0, repaint_end=1.0), src_audio=data)
    with pytest.raises(ServerError, match=rf"ref_audio: .*{reason}"):
        tiny_client.generate(params(task="audio2audio"), ref_audio=data)
    assert tiny_client.generate(params(audio_duration=1.0, infer_step=1)).audio.shape[0] == 1


BAD_FIELDS = [
    ("repaint_end", {"task": "repaint", "repaint_start": 2.0, "repaint_end": 1.0}),
    ("retake_variance", {"task": "retake", "retake_variance": 1.5}),
    ("right_extend_length", {"task": "extend"}),
    ("edit_n_min", {"task": "edit", "edit_n_min": 0.8, "edit_n_max": 0.3}),
    ("edit_type", {"task": "edit", "edit_type": "karaoke"}),
    ("ref_audio_strength", {"task": "audio2audio", "ref_audio_strength": 2.0}),
    ("retake_seeds", {"task": "retake", "retake_seeds": "a,b"}),
]


@pytest.mark.parametrize(("field", "bad"), BAD_FIELDS, ids=[f for f, _ in BAD_FIELDS])
def test_bad_task_fields_are_rejected_by_the_server(field: str, bad: dict, tiny_client: AceStepClient,
                                                    source: bytes) -> None:
    request = params(audio_duration=1.0)
    for key, value in bad.items():
        setattr(request, key, value)
    audio = {"ref_audio": source} if request.task == "audio2audio" else {"src_audio": source}
    if request.task == "retake":
        audio = {}
    with pytest.raises(ServerError) as info:
        tiny_client.generate(request, validate=False, **audio)
    assert str(info.value).find(field) >= 0, str(info.value)


def test_missing_source_audio_names_the_input(tiny_client: AceStepClient) -> None:
    with pytest.raises(ServerError, match="src_audio"):
        tiny_client.generate(params(task="repaint", repaint_start=0.0, repaint_end=1.0))


def test_task_sent_to_the_wrong_endpoint_is_refused(tiny_client: AceStepClient) -> None:
    with pytest.raises(ServerError, match=r"task: .retake. sent to the .text2music. endpoint"):
        tiny_client.generate(params(task="retake", audio_duration=1.0), endpoint="text2music")


def test_a_full_length_float_upload_is_served(tiny_client: AceStepClient) -> None:
    """240 s of 48 kHz stereo float WAV (~92 MB: the largest source the schema accepts, as our own
    output files are) crosses gRPC, Triton and the Python backend's shared memory intact."""
    t = np.arange(240 * OUTPUT_SAMPLE_RATE, dtype=np.float64) / OUTPUT_SAMPLE_RATE
    wave = (0.2 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)])).astype(np.float32)
    data = wav_bytes(wave, OUTPUT_SAMPLE_RATE)
    assert len(data) > 92e6
    params = GenerationParams(task="repaint", repaint_start=100.0, repaint_end=101.0, infer_step=1,
                              manual_seeds="1")
    result = tiny_client.generate(params, src_audio=data)
    assert result.params["src_audio_duration"] == pytest.approx(240.0)
    # It pads to 2584 frames; the frame past the 2583 a generation holds (240 s) is dropped.
    # (Songs past 48 s are decoded in windows and cut to floor(frames x 4096 x 48000 / 44100).)
    assert result.audio.shape == (1, 2, MAX_FRAMES * 4096 * 160 // 147)

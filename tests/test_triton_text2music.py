"""text2music through a real tritonserver, over gRPC, against the in-process pipeline and upstream.

Every request goes through the thin client (or raw tritonclient for malformed input) to the
``text2music`` orchestrator, which drives the six ONNX components by BLS. Tolerances: 1e-4
absolute on latents-derived audio (measured in the messages).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc as grpcclient
from test_pipeline_golden import TEXT2MUSIC_CASES, case_params

from acestep_client.client import AceStepClient, GenerationCancelled, InvalidRequest
from acestep_client.errors import ErrorCategory
from acestep_client.params import GenerationParams
from acestep_triton.pipeline import MusicGenerator
from acestep_triton.serving.server import TritonServer

TOL = 1e-4
FAST = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird\n[chorus]\nsing",
        "audio_duration": 2.0, "infer_step": 6, "manual_seeds": "7"}


def fast(**overrides: object) -> GenerationParams:
    return GenerationParams(**{**FAST, **overrides})


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def client(tiny_server: TritonServer) -> AceStepClient:
    return AceStepClient(tiny_server.grpc_url)


# ------------------------------------------------------------------------------ fidelity
def test_same_seed_same_audio_as_in_process(client: AceStepClient, tiny_local: MusicGenerator) -> None:
    params = fast(batch_size=2, manual_seeds="3,4")
    served = client.generate(params)
    local = tiny_local.generate(fast(batch_size=2, manual_seeds="3,4"))
    err = max_err(served.audio, local.audio.numpy())
    assert err <= TOL, f"Triton vs in-process: {err:.3g}"
    assert served.sample_rate == 48000 and served.audio.shape[:2] == (2, 2)
    assert served.params["actual_seeds"] == [3, 4]
    assert np.abs(served.audio).max() > 1e-3, "silent audio"


def test_different_seeds_differ_and_same_seed_repeats(client: AceStepClient) -> None:
    a = client.generate(fast(manual_seeds="11")).audio
    b = client.generate(fast(manual_seeds="12")).audio
    again = client.generate(fast(manual_seeds="11")).audio
    assert np.array_equal(a, again)
    assert max_err(a, b) > 1e-3


@pytest.mark.parametrize("name", TEXT2MUSIC_CASES)
def test_golden_cases_through_triton(name: str, golden_server: TritonServer, golden_cases: dict,
                                     golden_dir: Path) -> None:
    case = golden_cases[name]
    expected = np.load(golden_dir / "cases" / case["file"])["audio_48k"]
    result = AceStepClient(golden_server.grpc_url).generate(case_params(case))
    err = max_err(result.audio, expected)
    assert err <= TOL, f"{name} through Triton vs upstream: {err:.3g}"
    assert result.params["actual_seeds"] == case["actual_seeds"]


# ------------------------------------------------------------------------------ every parameter matters
CHANGES = {
    "prompt": "jazz, piano, slow",
    "lyrics": "[chorus]\nla la la la",
    "audio_duration": 3.0,
    "infer_step": 5,
    "guidance_scale": 4.0,
    "scheduler_type": "heun",
    "cfg_type": "cfg",
    "omega_scale": -30.0,
    "guidance_interval": 1.0,
    "guidance_interval_decay": 1.0,
    "use_erg_tag": False,
    "use_erg_lyric": False,
    "use_erg_diffusion": False,
    "oss_steps": "1,2,4,6",
    "guidance_scale_text": 5.0,
    "manual_seeds": "8",
    "batch_size": 2,
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_parameter_reaches_the_sampler(field: str, client: AceStepClient) -> None:
    base_kwargs: dict[str, object] = {}
    change: dict[str, object] = {field: CHANGES[field]}
    if field == "guidance_interval_decay":
        base_kwargs["guidance_interval"] = 1.0  # decay acts inside the interval only
        change["guidance_interval"] = 1.0
    if field == "guidance_scale_text":  # double condition needs both scales > 1
        change["guidance_scale_lyric"] = 3.0
    base = client.generate(fast(**base_kwargs)).audio
    changed = client.generate(fast(**change)).audio
    n = min(base.shape[-1], changed.shape[-1])
    assert base.shape != changed.shape or max_err(base[0, :, :n], changed[0, :, :n]) > 1e-5, (
        f"changing {field} did not change the audio")


def test_min_guidance_scale_reaches_the_sampler(client: AceStepClient) -> None:
    decayed = {"guidance_interval": 1.0, "guidance_interval_decay": 1.0}
    a = client.generate(fast(**decayed, min_guidance_scale=3.0)).audio
    b = client.generate(fast(**decayed, min_guidance_scale=10.0)).audio
    assert max_err(a, b) > 1e-5


# ------------------------------------------------------------------------------ streaming
def test_progress_arrives_in_order(client: AceStepClient) -> None:
    seen: list[tuple[int, int]] = []
    client.generate(fast(infer_step=5), on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_heun_progress_counts_model_evaluations(client: AceStepClient) -> None:
    seen: list[tuple[int, int]] = []
    client.generate(fast(infer_step=4, scheduler_type="heun"), on_progress=lambda s, t: seen.append((s, t)))
    assert seen == [(i, 7) for i in range(1, 8)]


def test_cancel_stops_the_server_side_loop(tiny_server: TritonServer, client: AceStepClient) -> None:
    steps: list[int] = []
    cancel_at = 2

    def on_progress(step: int, total: int) -> None:
        steps.append(step)
        if step == cancel_at:
            threading.Thread(target=client.cancel).start()

    with pytest.raises(GenerationCancelled):
        client.generate(fast(infer_step=400, audio_duration=20.0), on_progress=on_progress)
    deadline = time.monotonic() + 30
    while "cancelled at step" not in tiny_server.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = tiny_server.log_text()
    assert "cancelled at step" in log, "the orchestrator did not report stopping its loop"
    assert max(steps) < 400
    # the server keeps serving
    assert client.generate(fast(infer_step=2)).audio.shape[0] == 1


# ------------------------------------------------------------------------------ bad input
BAD = [
    ("scheduler_type", {"scheduler_type": "ddim"}),
    ("cfg_type", {"cfg_type": "magic"}),
    ("infer_step", {"infer_step": 0}),
    ("infer_step", {"infer_step": 1001}),
    ("audio_duration", {"audio_duration": 241.0}),
    ("guidance_scale", {"guidance_scale": float("nan")}),
    ("manual_seeds", {"manual_seeds": "1,x"}),
    ("oss_steps", {"oss_steps": "3,1"}),
    ("batch_size", {"batch_size": 0}),
    ("lyrics", {"lyrics": "la " * 3000}),
]


@pytest.mark.parametrize(("field", "bad"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_field_is_rejected_by_the_server(field: str, bad: dict, client: AceStepClient) -> None:
    params = fast()
    for key, value in bad.items():
        setattr(params, key, value)  # bypass client-side validation: the server must check too
    with pytest.raises(InvalidRequest) as info:  # tagged [invalid_argument]: the client will not retry it
        client.generate(params, validate=False)
    assert info.value.field == field and field in str(info.value), str(info.value)
    assert info.value.category is ErrorCategory.INVALID_ARGUMENT
    assert client.generate(fast(infer_step=1)).audio.shape[0] == 1  # still serving


def _raw_infer(url: str, inputs: list[grpcclient.InferInput]) -> str:
    """Send raw tensors on the stream; return the error message."""
    errors: list[str] = []
    done = threading.Event()

    def callback(result: object = None, error: object = None) -> None:
        if error is not None:
            errors.append(str(error))
            done.set()
        elif result is not None and result.get_response().parameters.get("triton_final_response"):
            done.set()

    raw = grpcclient.InferenceServerClient(url)
    raw.start_stream(callback=callback)
    raw.async_stream_infer("text2music", inputs, enable_empty_final_response=True)
    done.wait(60)
    raw.stop_stream()
    raw.close()
    assert errors, "the server accepted a malformed request"
    return errors[0]


def test_wrong_dtype_names_the_input(tiny_server: TritonServer, client: AceStepClient) -> None:
    steps = grpcclient.InferInput("infer_step", [1], "FP32")
    steps.set_data_from_numpy(np.array([5.0], dtype=np.float32))
    message = _raw_infer(tiny_server.grpc_url, [steps])
    assert "infer_step" in message, message
    assert client.generate(fast(infer_step=1)).audio.shape[0] == 1


def test_wrong_shape_names_the_input(tiny_server: TritonServer, client: AceStepClient) -> None:
    steps = grpcclient.InferInput("infer_step", [2], "INT32")
    steps.set_data_from_numpy(np.array([5, 6], dtype=np.int32))
    message = _raw_infer(tiny_server.grpc_url, [steps])
    assert "infer_step" in message, message
    assert client.generate(fast(infer_step=1)).audio.shape[0] == 1


# ------------------------------------------------------------------------------ files
def test_audio_files_and_params_json_round_trip(client: AceStepClient, tmp_path: Path) -> None:
    result = client.generate(fast())
    for fmt in ("wav", "flac", "ogg", "mp3"):
        paths = result.save(tmp_path / fmt, fmt, stem="song")
        audio, rate = sf.read(str(paths[0]), always_2d=True)
        assert rate == 48000 and audio.shape[1] == 2 and audio.shape[0] > 0.9 * result.audio.shape[-1]
    replay = GenerationParams.from_json(result.params_json)
    again = client.generate(replay)
    assert np.array_equal(again.audio, result.audio), "the parameters JSON does not reproduce the audio"

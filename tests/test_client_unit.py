"""The thin client without a server: dependencies, typed inputs, errors, audio files, the CLI.

The streaming behaviour against a real server is tested in test_serving_infra.py (one server
per session); everything here runs in milliseconds.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from tritonclient.utils import InferenceServerException

from acestep_client import cli
from acestep_client.audio_io import ENCODINGS, format_from_path, read_audio, write_audio
from acestep_client.client import (
    AceStepClient,
    GenerationCancelled,
    GenerationResult,
    InvalidRequest,
    ServerError,
    ServerUnavailable,
    _translate,
    field_of,
)
from acestep_client.errors import ErrorCategory, parse_message, tag_message
from acestep_client.params import AUDIO_FORMATS, GenerationParams, ParamError
from acestep_client.retry import NO_RETRY, RetryPolicy

RATE = 48000


def test_client_imports_without_torch_or_the_server_package() -> None:
    """The client must install alone: only tritonclient[grpc], numpy, soundfile and the stdlib."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = {"torch", "onnxruntime", "onnx", "acestep_triton", "transformers", "diffusers",
                   "triton_python_backend_utils", "pytriton"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import: {name}")
                return None
        sys.meta_path.insert(0, Block())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import hook does not work")
        import acestep_client, acestep_client.params, acestep_client.client, acestep_client.audio_io
        import acestep_client.cli
        from acestep_client.client import AceStepClient
        from acestep_client.params import GenerationParams
        AceStepClient.build_inputs(GenerationParams())
        acestep_client.cli.build_parser()
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("leaked:", leaked)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaked: []" in proc.stdout, proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_unavailable_when_nothing_listens_after_the_retries() -> None:
    client = AceStepClient(f"localhost:{_free_port()}", connect_timeout=5,
                           retry=RetryPolicy(attempts=3, backoff_s=0.01))
    retries: list[tuple[int, int]] = []
    with pytest.raises(ServerUnavailable, match="no Triton server answers"):
        client.generate(GenerationParams(infer_step=2), on_retry=lambda a, n, e, d: retries.append((a, n)))
    assert retries == [(1, 3), (2, 3)]
    assert client.is_ready() is False
    retries.clear()
    with pytest.raises(ServerUnavailable):
        client.generate(GenerationParams(infer_step=2), retry=NO_RETRY, on_retry=lambda *a: retries.append(a))
    assert retries == []


def test_the_deadline_bounds_retries_and_waits() -> None:
    """A wait that would end past ``timeout_s`` is not started: the last failure is raised at once."""
    client = AceStepClient(f"localhost:{_free_port()}", connect_timeout=5,
                           retry=RetryPolicy(attempts=5, backoff_s=30.0, jitter=0.0))
    started = time.monotonic()
    with pytest.raises(ServerUnavailable):
        client.generate(GenerationParams(infer_step=2), timeout_s=2.0)
    assert time.monotonic() - started < 10.0


def test_without_a_deadline_retries_stop_max_elapsed_s_after_the_first_failure() -> None:
    """No ``timeout_s``: the policy's ``max_elapsed_s`` bounds the resends (a wait that would end
    past it is not started), so a request never retries forever."""
    client = AceStepClient(f"localhost:{_free_port()}", connect_timeout=5,
                           retry=RetryPolicy(attempts=50, backoff_s=0.2, max_backoff_s=0.2, jitter=0.0,
                                             max_elapsed_s=1.0))
    retries: list[int] = []
    started = time.monotonic()
    with pytest.raises(ServerUnavailable):
        client.generate(GenerationParams(infer_step=2), on_retry=lambda a, *_: retries.append(a))
    assert 1 <= len(retries) < 49 and time.monotonic() - started < 30.0


def test_default_policy_outlasts_a_reload() -> None:
    """Issue 19 item 7: a dead endpoint's reload took 15-18 s (40 s on a busy machine); the old
    default gave up after about 7 s of waits. The default now keeps resending for 2 minutes."""
    from acestep_client.retry import DEFAULT_RETRY

    waits = list(DEFAULT_RETRY.delays())
    assert sum(waits) >= 60 and max(waits) <= 4.0 * (1 + DEFAULT_RETRY.jitter)
    assert DEFAULT_RETRY.max_elapsed_s is not None and DEFAULT_RETRY.max_elapsed_s >= 60


def test_cancel_interrupts_a_retry_wait() -> None:
    client = AceStepClient(f"localhost:{_free_port()}", connect_timeout=5,
                           retry=RetryPolicy(attempts=2, backoff_s=30.0, jitter=0.0))
    started = time.monotonic()
    with pytest.raises(GenerationCancelled, match="waiting to retry"):
        client.generate(GenerationParams(infer_step=2),
                        on_retry=lambda *a: threading.Timer(0.2, client.cancel).start())
    assert time.monotonic() - started < 10.0


def test_retry_policy_waits_grow_and_are_validated() -> None:
    import random

    delays = list(RetryPolicy(attempts=5, backoff_s=1.0, multiplier=2.0, max_backoff_s=5.0,
                              jitter=0.0).delays(random.Random(0)))
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert list(NO_RETRY.delays()) == []
    jittered = list(RetryPolicy(attempts=3, backoff_s=1.0, jitter=0.1).delays(random.Random(1)))
    assert all(0.9 <= d / b <= 1.1 for d, b in zip(jittered, [1.0, 2.0], strict=True))
    for bad in ({"attempts": 0}, {"backoff_s": -1.0}, {"multiplier": 0.5}, {"jitter": 1.0}, {"max_elapsed_s": -1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_error_tags_round_trip() -> None:
    text = tag_message(ErrorCategory.INVALID_ARGUMENT, "audio_duration: too short")
    assert text == "[invalid_argument] audio_duration: too short"
    assert parse_message(text) == (ErrorCategory.INVALID_ARGUMENT, "audio_duration: too short")
    assert tag_message(ErrorCategory.INTERNAL, text) == text  # already tagged: kept
    assert parse_message("[nonsense] x") == (None, "[nonsense] x")
    assert parse_message("plain") == (None, "plain")
    assert [c for c in ErrorCategory if c.retryable] == [ErrorCategory.UNAVAILABLE]


def test_local_validation_names_the_field_before_any_network() -> None:
    client = AceStepClient(f"localhost:{_free_port()}")
    with pytest.raises(ParamError, match=r"^guidance_scale: "):
        client.generate(GenerationParams(guidance_scale=-1.0))


def test_a_request_whose_caller_already_left_is_never_sent() -> None:
    client = AceStepClient(f"localhost:{_free_port()}")  # nothing listens: sending would fail otherwise
    with pytest.raises(GenerationCancelled, match="cancelled before it was sent"):
        client.generate(GenerationParams(infer_step=2), should_cancel=lambda: True)


def test_typed_inputs_follow_the_schema() -> None:
    params = GenerationParams(prompt="jazz", infer_step=7, use_erg_tag=False, manual_seeds="1,2")
    inputs = AceStepClient.build_inputs(params, {"src_audio": np.zeros((1, 2, 10), np.float32)})
    wire = GenerationParams.wire_specs()
    typed = [(i.name(), i.datatype(), i.shape()) for i in inputs[:-1]]
    assert typed == [(s.name, s.triton_dtype, [1]) for s in wire]
    assert (inputs[-1].name(), inputs[-1].datatype(), inputs[-1].shape()) == ("src_audio", "FP32", [1, 2, 10])
    assert "format" not in [i.name() for i in inputs]


def test_field_of_finds_the_schema_field() -> None:
    assert field_of("infer_step: 0 is below the minimum 1") == "infer_step"
    assert field_of("Failed for model 'x': manual_seeds: 'a' is not an integer") == "manual_seeds"
    assert field_of("reason: something unrelated") is None
    assert field_of("model.py: crashed") is None


@pytest.mark.parametrize(("status", "kind"), [("StatusCode.UNAVAILABLE", ServerUnavailable),
                                              ("StatusCode.CANCELLED", GenerationCancelled),
                                              ("StatusCode.INTERNAL", ServerError), (None, ServerError)])
def test_stream_errors_map_to_client_exceptions(status: str | None, kind: type) -> None:
    error = _translate(InferenceServerException("lyrics: too long", status=status), "host:1")
    assert type(error) is kind
    if kind is ServerError:
        assert error.field == "lyrics" and "too long" in str(error)


def test_triton_s_own_stub_errors_are_retryable() -> None:
    """When the endpoint's own stub dies, Triton answers in its place, untagged."""
    error = _translate(InferenceServerException("Stub process 'text2music_0_0' is not healthy.", status=None),
                       "host:1")
    assert type(error) is ServerUnavailable and "text2music_0_0" in str(error)
    for queue_refusal in ("Exceeds maximum queue size", "Request timeout expired"):
        assert type(_translate(InferenceServerException(queue_refusal, status=None), "h:1")) is ServerUnavailable


@pytest.mark.parametrize(("category", "kind"), [("invalid_argument", InvalidRequest),
                                                ("unavailable", ServerUnavailable),
                                                ("cancelled", GenerationCancelled),
                                                ("internal", ServerError)])
def test_tagged_stream_errors_map_by_category(category: str, kind: type) -> None:
    """The endpoint's tag decides, whatever gRPC status the stream reported."""
    error = _translate(InferenceServerException(f"[{category}] lyrics: too long", status=None), "host:1",
                       audio_started=True)
    assert type(error) is kind
    assert "[" not in str(error) and "too long" in str(error)
    if kind is InvalidRequest:
        assert error.field == "lyrics" and error.category is ErrorCategory.INVALID_ARGUMENT
    if kind is ServerError:
        assert error.field is None and error.category is ErrorCategory.INTERNAL
    if kind is ServerUnavailable:
        assert error.audio_started


def _result(batch: int = 2, n: int = 4800) -> GenerationResult:
    t = np.arange(n) / RATE
    audio = np.stack([np.stack([np.sin(2 * np.pi * 440 * (b + 1) * t)] * 2) for b in range(batch)]) * 0.5
    params = {**GenerationParams(batch_size=batch).to_dict(), "actual_seeds": list(range(batch))}
    return GenerationResult(audio=audio.astype(np.float32), sample_rate=RATE, params=params,
                            params_json=json.dumps(params))


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_save_writes_each_item_and_its_params(tmp_path: Path, fmt: str) -> None:
    result = _result()
    paths = result.save(tmp_path, fmt, stem="x")
    assert [p.name for p in paths] == [f"x_0.{fmt}", f"x_1.{fmt}"]
    for i, path in enumerate(paths):
        audio, rate = read_audio(path)
        assert rate == RATE and audio.shape[0] == 2
        if fmt == "wav":
            err = float(np.abs(audio - result.audio[i]).max())
            assert err == 0.0, f"float WAV max abs error {err}"
        elif fmt == "flac":
            err = float(np.abs(audio - result.audio[i]).max())
            assert err <= 2.0**-23 + 1e-7, f"24-bit FLAC max abs error {err}"
        else:  # lossy: the tone survives
            peak = np.fft.rfftfreq(audio.shape[1], 1 / rate)[np.abs(np.fft.rfft(audio[0])).argmax()]
            assert abs(peak - 440 * (i + 1)) < 15, f"{fmt}: dominant frequency {peak:.1f} Hz"
        meta = json.loads((tmp_path / f"x_{i}_params.json").read_text())
        assert meta["audio_path"] == str(path) and meta["batch_index"] == i and meta["actual_seeds"] == [0, 1]


def test_save_to_a_file_name(tmp_path: Path) -> None:
    assert _result(batch=1).save(tmp_path / "song.flac") == [tmp_path / "song.flac"]
    assert sf.info(str(tmp_path / "song.flac")).format == "FLAC"
    assert (tmp_path / "song_params.json").is_file()
    paths = _result(batch=2).save(tmp_path / "two.ogg")
    assert [p.name for p in paths] == ["two_0.ogg", "two_1.ogg"]
    with pytest.raises(ValueError, match=r"^format: "):
        _result().save(tmp_path, "aiff")


def test_lossless_integer_formats_clip_instead_of_wrapping(tmp_path: Path) -> None:
    loud = np.array([[1.5, -1.5, 0.5]] * 2, np.float32)
    write_audio(tmp_path / "a.flac", loud, RATE)
    audio, _ = read_audio(tmp_path / "a.flac")
    assert audio[0, 0] > 0.99 and audio[0, 1] < -0.99, audio[0]
    assert format_from_path("x.MP3") == "mp3" and format_from_path("x.txt") == "wav"
    assert set(ENCODINGS) == set(AUDIO_FORMATS)


def test_cli_has_a_flag_for_every_schema_field() -> None:
    parser = cli.build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"]
    flags = {opt for action in gen._actions for opt in action.option_strings}
    for spec in GenerationParams.specs():
        assert "--" + spec.name.replace("_", "-") in flags, spec.name
    assert {"--duration", "--steps", "--seeds", "--params-json", "--out", "--url"} <= flags


def test_cli_parameters_precedence(tmp_path: Path) -> None:
    saved = {**GenerationParams(prompt="old", infer_step=9, guidance_scale=4.0).to_dict(), "timecosts": {}}
    (tmp_path / "p.json").write_text(json.dumps(saved))
    argv = ["generate", "--params-json", str(tmp_path / "p.json"), "--steps", "3", "--no-use-erg-tag",
            "--seeds", "4,5", "--duration", "12"]
    args = cli.build_parser().parse_args(argv)
    params = cli.params_from_args(args)
    assert (params.prompt, params.infer_step, params.guidance_scale) == ("old", 3, 4.0)
    assert (params.use_erg_tag, params.use_erg_lyric, params.manual_seeds, params.audio_duration) == (
        False, True, "4,5", 12.0)
    defaults = cli.params_from_args(cli.build_parser().parse_args(["generate"]))
    assert defaults.to_dict() == GenerationParams().to_dict()


def test_cli_reports_bad_parameters_and_unavailable_server(tmp_path: Path) -> None:
    err = io.StringIO()
    args = cli.build_parser().parse_args(["generate", "--steps", "0"])
    assert cli.run_generate(args, stderr=err) == 2 and "infer_step" in err.getvalue()
    err = io.StringIO()
    args = cli.build_parser().parse_args(["generate", "--url", f"localhost:{_free_port()}", "--steps", "2",
                                          "--out", str(tmp_path), "--retries", "1", "--timeout-s", "30"])
    assert cli.run_generate(args, stderr=err) == 3 and "unavailable" in err.getvalue()
    assert err.getvalue().count("retrying in") == 1 and "(attempt 2 of 2)" in err.getvalue(), err.getvalue()
    err = io.StringIO()
    args = cli.build_parser().parse_args(["generate", "--retries", "-1"])
    assert cli.run_generate(args, stderr=err) == 2 and "retries" in err.getvalue()


def test_progress_printer_plain_text() -> None:
    out = io.StringIO()
    printer = cli.ProgressPrinter(out)
    for step in range(1, 101):
        printer(step, 100)
    lines = out.getvalue().splitlines()
    # The first step, then one line per tenth: readable in CI logs.
    assert len(lines) == 11 and " 1/100 steps" in lines[0], lines
    assert lines[-1].startswith("[" + "#" * 30 + "] 100/100 steps"), lines
    assert "\r" not in out.getvalue()


def test_oversized_audio_upload_is_refused_before_sending(tmp_path) -> None:
    from acestep_client.audio_io import audio_file_bytes
    from acestep_client.limits import MAX_AUDIO_BYTES

    with pytest.raises(ValueError, match=r"^src_audio: .*the limit is"):
        audio_file_bytes(b"\0" * (MAX_AUDIO_BYTES + 1), "src_audio")
    with pytest.raises(ValueError, match=r"^ref_audio: .* is not a file"):
        audio_file_bytes(tmp_path / "missing.wav", "ref_audio")


def test_fp32_fields_are_validated_as_sent() -> None:
    """Issue 19: the client validated doubles, the server their float32: ``repaint_end``
    1.00000001 passed here and was refused there (float32 makes it 1.0 = repaint_start). Now the
    client checks the value the tensor carries, so both sides give one verdict."""
    from acestep_client.params import params_from_wire, params_to_wire, to_float32

    with pytest.raises(ParamError) as info:
        GenerationParams(task="repaint", repaint_start=1.0, repaint_end=1.00000001).validate()
    assert info.value.field == "repaint_end"
    for value in (0.7, 1 / 3, 240.00001, 1.00000001, 1e-8, 123.456789):
        params = GenerationParams(guidance_interval=min(value, 1.0), audio_duration=min(value + 1, 240.0)).validate()
        server = params_from_wire(params_to_wire(params))
        assert (server.guidance_interval, server.audio_duration) == (params.guidance_interval, params.audio_duration)
    assert to_float32(0.7) == 0.7 and to_float32(1.00000001) == 1.0
    assert GenerationParams(guidance_interval=1.00000001).validate().guidance_interval == 1.0
    with pytest.raises(ParamError, match="32-bit float"):
        GenerationParams(omega_scale=1e300).validate()


def test_errors_echo_only_the_start_of_a_long_value() -> None:
    with pytest.raises(ParamError) as info:
        GenerationParams(task="x" * 20_000).validate()
    assert len(str(info.value)) < 300 and "20000 characters" in str(info.value)
    with pytest.raises(ParamError, match="lora_name_or_path: is 20000 characters long"):
        GenerationParams(lora_name_or_path="y" * 20_000).validate()


def test_keys_are_checked_and_compared_in_constant_time() -> None:
    from acestep_client.auth import check_key, grpc_headers, keys_match, means_refused

    assert check_key("api_key", None) is None and check_key("api_key", "  ") is None
    assert check_key("api_key", " " + "k" * 16 + " ") == "k" * 16
    for bad in ("short", "has space " + "k" * 16, "a:b=c," + "k" * 16):
        with pytest.raises(ValueError, match="api_key"):
            check_key("api_key", bad)
    assert keys_match("k" * 16, "k" * 16) and not keys_match("k" * 16, "j" * 16)
    assert not keys_match(None, None) and not keys_match("", "")
    assert grpc_headers(None) is None and grpc_headers("k") == {"triton-grpc-protocol-acestep-api-key": "k"}
    assert means_refused("This protocol is restricted, expecting header 'triton-grpc-protocol-x'")
    assert means_refused("This API is restricted, expecting header 'x'") and not means_refused("unavailable")


def test_server_restricts_the_admin_protocols_always_and_inference_with_a_key(tmp_path: Path) -> None:
    """The tritonserver command line (no server started here; test_access_control.py serves it)."""
    from acestep_triton.serving.server import TritonInstall, TritonServer

    install = TritonInstall.from_root(tmp_path)
    open_server = TritonServer(tmp_path, grpc_port=1, http_port=2, metrics_port=3)
    args = open_server.command(install)
    admin = f"model-repository,shared-memory,logging,trace:acestep-model-control={open_server.admin_key}"
    assert f"--grpc-restricted-protocol={admin}" in args and f"--http-restricted-api={admin}" in args
    assert not any("inference:" in a for a in args), "no key: inference stays open"
    keyed = TritonServer(tmp_path, grpc_port=1, http_port=2, metrics_port=3, api_key="k" * 16, admin_key="a" * 16)
    args = keyed.command(install)
    assert "--grpc-restricted-protocol=inference:acestep-api-key=" + "k" * 16 in args
    assert "--http-restricted-api=inference:acestep-api-key=" + "k" * 16 in args
    assert keyed.admin_key == "a" * 16 and open_server.admin_key != TritonServer(tmp_path).admin_key

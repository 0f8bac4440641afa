"""Access control through a real tritonserver (issue 19, items 1, 2 and 9).

One server for the module: the tiny checkpoint's ``text2music`` and ``retake`` endpoints (onnx
runtime, CPU), started by :class:`TritonServer` with an API key. On it:

* the admin protocols (shared memory, logging, trace, model repository) refuse every request
  without the per-start admin secret, gRPC and HTTP alike: a client can neither register a
  ``/dev/shm`` key (the server's own Python-backend regions included) nor raise the log level;
  health, metadata, model config, statistics and metrics stay open;
* inference needs the API key: without it, or with a wrong one, the client raises the
  never-retried :class:`AccessDenied` saying which; the CLI exits 5; the front end forwards
  its own key (``ACESTEP_API_KEY``) and asks its users to log in when ``ACESTEP_FRONTEND_AUTH``
  is set;
* a request naming another endpoint's task is refused naming ``task``;
* ``memory_budget_mb auto`` admits on the CPU target too: ``retake`` is rendered with a margin
  larger than any host's memory and answers ``[unavailable]`` quoting ``MemAvailable``.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fixtures_onnx import single_thread
from triton_harness import require_tritonserver
from tritonclient.utils import InferenceServerException

from acestep_client.auth import API_KEY_ENV, API_KEY_HEADER
from acestep_client.cli import main as client_main
from acestep_client.client import AccessDenied, AceStepClient, InvalidRequest, ServerUnavailable
from acestep_client.params import GenerationParams
from acestep_client.retry import NO_RETRY
from acestep_triton.checkpoint import Components
from acestep_triton.serving.deploy import build_deployment
from acestep_triton.serving.server import TritonServer, free_ports

API_KEY = secrets.token_hex(16)
SMALL = {"prompt": "pop", "audio_duration": 2.0, "infer_step": 2, "manual_seeds": "1"}
HUGE_MARGIN_MB = "1000000000"  # 1 PiB: more than any host has, so `auto` finds nothing to admit


@pytest.fixture(scope="module")
def server(tiny_onnx_ckpt: Path, tiny_onnx_dir: Path, tiny_onnx_components: Components,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with single_thread():
        deployment = build_deployment(tiny_onnx_ckpt, tmp_path_factory.mktemp("access_deploy"),
                                      onnx_dir=tiny_onnx_dir, components=tiny_onnx_components,
                                      endpoints=["text2music", "retake"], intra_op_threads=1)
    config = deployment.repository / "retake" / "config.pbtxt"
    text = config.read_text()
    assert "memory_margin_mb" not in text and "parameters [\n" in text
    config.write_text(text.replace("parameters [\n", "parameters [\n  {\n    key: \"memory_margin_mb\"\n"
                                   f"    value: {{ string_value: \"{HUGE_MARGIN_MB}\" }}\n  }},\n", 1))

    require_tritonserver()
    started = TritonServer(deployment.repository, log_path=tmp_path_factory.mktemp("access_log") / "tritonserver.log",
                           startup_timeout=300, api_key=API_KEY)
    started.start()
    try:
        yield started
    finally:
        started.stop()


def _refused(call: object) -> str:
    """The message of the InferenceServerException that ``call()`` raises."""
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    return info.value.message() or str(info.value)


# ------------------------------------------------------------------------------ item 1: admin APIs
def test_shared_memory_logging_and_trace_need_the_admin_secret(server: TritonServer) -> None:
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    key_only = {f"triton-grpc-protocol-{API_KEY_HEADER}": API_KEY}  # the inference key is not enough
    # a region of another process, and the server's own Python-backend regions
    probe = f"/acestep_probe_{secrets.token_hex(4)}"
    fd = os.open(f"/dev/shm{probe}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 4096)
        with mmap.mmap(fd, 4096) as region:
            region[:4] = b"TOPS"
            own = sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(server.shm_prefix))
            assert own, "the server's Python backend has shared-memory regions"
            for key in (probe, f"/{own[0]}"):
                for headers in (None, key_only):
                    message = _refused(lambda k=key, h=headers: grpc.register_system_shared_memory(
                        "probe", k, 4096, headers=h))
                    assert "restricted" in message, message
                message = _refused(lambda k=key: http.register_system_shared_memory("probe", k, 4096))
                assert "restricted" in message, message
            assert region[:4] == b"TOPS"
        for call in (lambda: grpc.get_system_shared_memory_status(),
                     lambda: grpc.update_log_settings({"log_verbose_level": 1}),
                     lambda: grpc.get_log_settings(),
                     lambda: grpc.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
                     lambda: grpc.get_model_repository_index(),
                     lambda: http.update_log_settings({"log_verbose_level": 1}),
                     lambda: http.get_trace_settings()):
            assert "restricted" in _refused(call)
        # restricted, not disabled: the server's own secret unlocks them (and nothing was registered)
        status = grpc.get_system_shared_memory_status(headers=server.grpc_admin_headers, as_json=True)
        assert not status.get("regions"), status
        assert grpc.get_log_settings(headers=server.grpc_admin_headers, as_json=True)["settings"]
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm{probe}")
    # open for probes, Prometheus and model discovery
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("text2music")
    assert grpc.get_model_metadata("text2music").name == "text2music"
    assert grpc.get_model_config("text2music").config.name == "text2music"
    assert grpc.get_inference_statistics("text2music") is not None
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200 and b"nv_inference_request_success" in response.read()
    grpc.close()
    http.close()


# ------------------------------------------------------------------------------ item 2: API key
def test_inference_needs_the_api_key_and_a_refusal_is_never_retried(
        server: TritonServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    retries: list[int] = []
    for key, said in (("", "sent none"), ("wrong-" + "0" * 16, "was refused")):
        client = AceStepClient(server.grpc_url, api_key=key)  # default retry policy (retries for minutes)
        started = time.monotonic()
        with pytest.raises(AccessDenied) as info:
            client.generate(GenerationParams(**SMALL), on_retry=lambda *a: retries.append(1))
        assert time.monotonic() - started < 1.0 and not retries, "an access refusal is never retried"
        assert info.value.credential == "api_key" and said in info.value.message, info.value.message
        with pytest.raises(AccessDenied):
            client.list_loras()
    http = httpclient.InferenceServerClient(server.http_url)
    assert "restricted" in _refused(lambda: http.infer("text2music", []))
    http.close()

    monkeypatch.setenv(API_KEY_ENV, API_KEY)  # the client's default: the environment
    result = AceStepClient(server.grpc_url).generate(GenerationParams(**SMALL))
    assert result.audio.shape[0] == 1 and np.isfinite(result.audio).all()

    monkeypatch.delenv(API_KEY_ENV)
    args = ["generate", "--url", server.grpc_url, "--prompt", "pop", "--duration", "2", "--steps", "2", "--quiet"]
    assert client_main(args) == 5
    assert "access denied" in capsys.readouterr().err


def test_frontend_forwards_its_key_and_asks_for_its_own_login(
        server: TritonServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio_client import Client

    from acestep_triton.frontend.app import AUTH_ENV, build_parser, create_service, launch, parse_auth

    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    monkeypatch.setenv(AUTH_ENV, "alice:correct-horse")
    service = create_service(build_parser().parse_args(["--url", server.grpc_url, "--output-dir", str(tmp_path)]))
    assert service.client.api_key == API_KEY
    port = free_ports(1)[0]
    demo = launch(service, port=port, block=False, auth=parse_auth(os.environ[AUTH_ENV]))
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error types vary by version
            Client(url, verbose=False)
        api = Client(url, auth=("alice", "correct-horse"), verbose=False)
        audio_path, _ = api.predict(format="wav", audio_duration=2.0, prompt="pop", lyrics="", infer_step=2,
                                    manual_seeds="1", api_name="/__call__")
        assert Path(audio_path).is_file()
    finally:
        demo.close()
    with pytest.raises(ValueError, match=AUTH_ENV):
        parse_auth("alice")


# ------------------------------------------------------------------------------ item 9
def test_a_request_for_another_endpoints_task_is_refused_naming_task(server: TritonServer) -> None:
    client = AceStepClient(server.grpc_url, api_key=API_KEY, retry=NO_RETRY)
    for task in ("repaint", "extend", "retake"):  # repaint_end / right_extend_length would fail first
        with pytest.raises(InvalidRequest) as info:
            client.generate(GenerationParams(**SMALL, task=task), endpoint="text2music", validate=False)
        assert info.value.field == "task", info.value.message
        assert f"'{task}' sent to the 'text2music' endpoint" in info.value.message


def test_auto_memory_budget_admits_on_the_cpu_target(server: TritonServer) -> None:
    client = AceStepClient(server.grpc_url, api_key=API_KEY, retry=NO_RETRY)
    with pytest.raises(ServerUnavailable, match=r"memory_budget_mb auto: the host \(MemAvailable\)"):
        client.generate(GenerationParams(**SMALL, task="retake"))

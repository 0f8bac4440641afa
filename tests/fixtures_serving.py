"""Session fixtures for end-to-end tests: real tritonserver processes serving our repositories.

Two deployments, each built with the production code path
(:func:`acestep_triton.serving.deploy.build_deployment`: ONNX export with parity, assets,
rendered repository) and served by a real ``tritonserver`` on free loopback ports, started once
per test session and always stopped:

* ``tiny_server``: the project's tiny random checkpoint (fast; most behaviour tests);
* ``golden_server``: upstream's golden checkpoint (fidelity to upstream's numbers).

Each comes with its in-process twin (``tiny_local`` / ``golden_local``) so a test can ask both
backends for the same request. Import the fixtures you use into the test module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures_onnx import single_thread
from triton_harness import require_tritonserver

from acestep_client.client import AceStepClient
from acestep_triton.checkpoint import Components, load_components
from acestep_triton.export.model_configs import load_endpoints
from acestep_triton.export.repository import render_repository
from acestep_triton.lora import SERVING_FILE
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.serving.deploy import Deployment, build_deployment
from acestep_triton.serving.server import TritonServer
from acestep_triton.synthetic.tiny_lora import write_tiny_lora


def local_generator_for(components: Components) -> MusicGenerator:
    return MusicGenerator(TorchBackend(components), components.text_tokenizer, components.lyric_tokenizer,
                          components.vocoder.mel_transform)


def one_instance_repository(ckpt: Path, onnx_dir: Path, components: Components, workdir: Path,
                            endpoint_name: str) -> Path:
    """A repository of one endpoint with ONE instance (the shipped definitions have two) and the
    six ONNX components, from the session's exported tiny checkpoint: for tests that watch or
    replace that endpoint's stub process."""
    with single_thread():
        deployment = build_deployment(ckpt, workdir, onnx_dir=onnx_dir, components=components,
                                      endpoints=[endpoint_name], intra_op_threads=1)
    endpoint = replace(load_endpoints([endpoint_name])[0], instance_count=1)
    return render_repository(workdir / "one_instance", "cpu", deployment.onnx_dir, [endpoint],
                             assets=deployment.assets, intra_op_threads=1)


# ----------------------------------------------------------------------------------- lifetimes
SHARED_SERVERS = ("tiny_server", "golden_server", "torch_server", "golden_torch_server")
"""The session servers that several modules share."""
_LAST_USER = pytest.StashKey[dict[str, pytest.Item]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note the last test (in run order) that uses each shared session server."""
    last: dict[str, pytest.Item] = {}
    for item in session.items:
        for name in SHARED_SERVERS:
            if name in item.fixturenames:
                last[name] = item
    session.config.stash[_LAST_USER] = last


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A shared server stops right after the last test that uses it, not at the session's end:
    each holds ~20 stub processes (2.5-5 GB), four of them 12 GB, which the other test worker
    needs. Its session finalizer then finds it stopped (``stop`` is idempotent)."""
    last = item.config.stash.get(_LAST_USER, {})
    funcargs = getattr(item, "funcargs", None) or {}
    done = [funcargs[name] for name, user in last.items() if user is item and name in funcargs]
    yield
    for server in done:
        server.stop()


def serve_deployment(deployment: Deployment, log: Path) -> Iterator[TritonServer]:
    require_tritonserver()
    server = TritonServer(deployment.repository, log_path=log, startup_timeout=300)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- tiny
TINY_LORA = "tiny"
TINY_LORA_WEIGHT = 0.5


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA registry with one adapter (``tiny``), served fused at strength 0.5."""
    root = tmp_path_factory.mktemp("loras")
    write_tiny_lora(tiny_onnx_ckpt, root / TINY_LORA)
    (root / TINY_LORA / SERVING_FILE).write_text(json.dumps({"lora_weight": TINY_LORA_WEIGHT}))
    return root


@pytest.fixture(scope="session")
def tiny_deployment(tiny_onnx_ckpt: Path, tiny_onnx_dir: Path, tiny_onnx_components: Components,
                    tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """Every endpoint, plus the tiny LoRA's fused component variants."""
    with single_thread():
        return build_deployment(tiny_onnx_ckpt, tmp_path_factory.mktemp("tiny_deploy"),
                                    onnx_dir=tiny_onnx_dir, components=tiny_onnx_components,
                                    lora_dir=tiny_lora_dir, intra_op_threads=1)


@pytest.fixture(scope="session")
def tiny_server(tiny_deployment: Deployment,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve_deployment(tiny_deployment, tmp_path_factory.mktemp("tiny_log") / "tritonserver.log")


@pytest.fixture(scope="session")
def tiny_client(tiny_server: TritonServer) -> AceStepClient:
    """A client of ``tiny_server`` with the default settings."""
    return AceStepClient(tiny_server.grpc_url)


@pytest.fixture(scope="session")
def tiny_local(tiny_onnx_components: Components) -> MusicGenerator:
    return local_generator_for(tiny_onnx_components)


# ----------------------------------------------------------------------------------- golden
@pytest.fixture(scope="session")
def golden_models(golden_ckpt: Path, golden_dir: Path) -> Components:
    return load_components(golden_ckpt, golden_dir / "lyrics_vocab.json")


@pytest.fixture(scope="session")
def golden_local(golden_models: Components) -> MusicGenerator:
    return local_generator_for(golden_models)


@pytest.fixture(scope="session")
def golden_deployment(golden_ckpt: Path, golden_dir: Path, golden_models: Components,
                      tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    with single_thread():
        return build_deployment(golden_ckpt, tmp_path_factory.mktemp("golden_deploy"),
                                    vocab_path=golden_dir / "lyrics_vocab.json", components=golden_models,
                                    endpoints=["text2music", "retake", "repaint", "edit"], intra_op_threads=1)


@pytest.fixture(scope="session")
def golden_server(golden_deployment: Deployment,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve_deployment(golden_deployment, tmp_path_factory.mktemp("golden_log") / "tritonserver.log")


# ----------------------------------------------------------------------------------- torch runtime
@pytest.fixture(scope="session")
def torch_lora_dir(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torch deployment's own LoRA registry (a copy of ``tiny_lora_dir``): tests add and
    remove adapters in it at runtime without touching the fused-variant deployments' folder."""
    root = tmp_path_factory.mktemp("torch_loras") / "registry"
    shutil.copytree(tiny_lora_dir, root)
    return root


@pytest.fixture(scope="session")
def torch_deployment(tiny_onnx_ckpt: Path, tiny_onnx_components: Components, torch_lora_dir: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """The tiny checkpoint with the ``torch`` component runtime (fp32 CPU), every endpoint and
    the tiny LoRA as a live adapter (any strength, plus the ``lora_registry`` control model):
    the GPU target's runtime, served here on the CPU."""
    return build_deployment(tiny_onnx_ckpt, tmp_path_factory.mktemp("torch_deploy"), runtime="torch",
                            components=tiny_onnx_components, lora_dir=torch_lora_dir, intra_op_threads=1)


@pytest.fixture(scope="session")
def torch_server(torch_deployment: Deployment,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    yield from serve_deployment(torch_deployment, tmp_path_factory.mktemp("torch_log") / "tritonserver.log")


@pytest.fixture(scope="session")
def golden_torch_server(golden_ckpt: Path, golden_dir: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Upstream's golden checkpoint served by the ``torch`` runtime (text2music and repaint)."""
    deployment = build_deployment(golden_ckpt, tmp_path_factory.mktemp("golden_torch_deploy"),
                                  vocab_path=golden_dir / "lyrics_vocab.json", runtime="torch",
                                  endpoints=["text2music", "repaint"], intra_op_threads=1)
    yield from serve_deployment(deployment, tmp_path_factory.mktemp("golden_torch_log") / "tritonserver.log")

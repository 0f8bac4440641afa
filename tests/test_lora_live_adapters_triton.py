"""Live LoRA adapters through a real tritonserver (``torch`` runtime, fp32 CPU).

One server for the module: text2music, the ``lora_registry`` control model, and a DiT batcher
that waits (up to 10 s) for six rows, i.e. three concurrent single-song requests with two
guidance rows each. On it: an adapter added to the registry folder while the server runs is
loaded through the client, and three concurrent requests (adapter ``tiny`` at 0.8, the new
adapter at 1.3, no adapter) are served by ONE ``dit_decoder`` execution per step (Triton's own
statistics), each with the audio of the in-process pipeline with its adapter fused at its
strength (1e-4 absolute). Refusals (unknown adapter, keys that do not fit the checkpoint,
an unloaded adapter) name ``lora_name_or_path`` and leave the server serving.

The registry is an admin API (issue 19): load, unload and reload need the server's admin key
(listing is open); malformed adapter files, links out of the registry and over-long names are
refused naming ``lora_name_or_path`` and the folder, reload loads every good folder past bad
ones, and the state file keeps only the last few refusals.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_onnx import single_thread
from fixtures_serving import TINY_LORA, serve_deployment
from safetensors import safe_open
from safetensors.torch import save_file
from test_torch_runtime_batching import dit_stats

from acestep_client.auth import ADMIN_KEY_ENV
from acestep_client.cli import main as client_main
from acestep_client.client import AccessDenied, AceStepClient, GenerationResult, InvalidRequest
from acestep_client.params import GenerationParams
from acestep_triton.checkpoint import Components
from acestep_triton.export.triton_config import DynamicBatching
from acestep_triton.lora import LORA_WEIGHTS_FILE, InProcessLoras, LoraRegistry
from acestep_triton.pipeline import MusicGenerator, TorchBackend
from acestep_triton.serving.deploy import build_deployment
from acestep_triton.serving.server import TritonServer
from acestep_triton.synthetic.tiny_lora import write_tiny_lora

TOL = 1e-4
STEPS = 3
ROWS = 2  # conditional + unconditional at every step (guidance_interval 1)
REQUEST = {"prompt": "pop, upbeat, guitar, 120 BPM", "lyrics": "[verse]\nfree as a bird", "audio_duration": 2.0,
           "infer_step": STEPS, "guidance_interval": 1.0, "cfg_type": "cfg"}
NEW = "fresh"


@pytest.fixture(scope="module")
def registry(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rt_loras") / "registry"
    shutil.copytree(tiny_lora_dir, root)
    return root


@pytest.fixture(scope="module")
def server(tiny_onnx_ckpt: Path, registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    deployment = build_deployment(
        tiny_onnx_ckpt, tmp_path_factory.mktemp("rt_lora_deploy"), runtime="torch", endpoints=["text2music"],
        lora_dir=registry, intra_op_threads=1,
        batching={"dit_decoder": DynamicBatching(max_queue_delay_us=10_000_000, preferred_batch_sizes=(3 * ROWS,))})
    # three endpoint instances, so the three concurrent requests sample side by side
    config = deployment.repository / "text2music" / "config.pbtxt"
    text, count = re.subn(r"(instance_group\s*\[\s*\{[^}]*?count:\s*)\d+", r"\g<1>3", config.read_text())
    assert count == 1, "no instance count in the endpoint config"
    config.write_text(text)
    yield from serve_deployment(deployment, tmp_path_factory.mktemp("rt_lora_log") / "tritonserver.log")


def _local(components: Components, registry: Path) -> MusicGenerator:
    c = components
    return MusicGenerator(TorchBackend(c), c.text_tokenizer, c.lyric_tokenizer, c.vocoder.mel_transform,
                          lora_scope=InProcessLoras(c.transformer, LoraRegistry.from_dir(registry)))


def _generate_all(url: str, requests: list[GenerationParams]) -> list[GenerationResult | BaseException]:
    results: list[GenerationResult | BaseException] = [RuntimeError("not run")] * len(requests)

    def run(i: int) -> None:
        try:
            results[i] = AceStepClient(url).generate(requests[i])
        except BaseException as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return results


def test_adapter_added_at_runtime_batches_with_others_and_matches_fused(
        server: TritonServer, registry: Path, tiny_onnx_ckpt: Path, tiny_onnx_components: Components,
        capsys: pytest.CaptureFixture[str]) -> None:
    client = AceStepClient(server.grpc_url, admin_key=server.admin_key)
    listing = client.list_loras()
    assert [a["name"] for a in listing["loaded"]] == [TINY_LORA] and listing["available"] == []

    write_tiny_lora(tiny_onnx_ckpt, registry / NEW, seed=7, rank=6)  # appears while the server runs
    assert client.list_loras()["available"] == [NEW], "a new folder is not served until it is loaded"
    loaded = client.load_lora(NEW)["loaded"]
    assert [a["name"] for a in loaded] == [TINY_LORA, NEW] and loaded[1]["ranks"] == [6]

    requests = [GenerationParams(**REQUEST, manual_seeds="3", lora_name_or_path=TINY_LORA, lora_weight=0.8),
                GenerationParams(**REQUEST, manual_seeds="4", lora_name_or_path=NEW, lora_weight=1.3),
                GenerationParams(**REQUEST, manual_seeds="5")]
    before = dit_stats(server.grpc_url)
    results = _generate_all(server.grpc_url, requests)
    calls, rows, executions = (a - b for a, b in zip(dit_stats(server.grpc_url), before, strict=True))
    assert calls == 3 * STEPS and rows == 3 * STEPS * ROWS, (calls, rows)
    assert executions == STEPS, f"{calls} DiT requests ran in {executions} executions, expected {STEPS} merged"

    local = _local(tiny_onnx_components, registry)
    with single_thread():
        expected = [local.generate(r).audio.numpy() for r in requests]
        base = local.generate(GenerationParams(**REQUEST, manual_seeds="3")).audio.numpy()
    for request, result, audio in zip(requests, results, expected, strict=True):
        assert isinstance(result, GenerationResult), result
        err = float(np.abs(result.audio - audio).max())
        assert err <= TOL, f"{request.lora_name_or_path} at {request.lora_weight}: served vs fused {err:.3g}"
    assert float(np.abs(expected[0] - base).max()) > 1e-3, "the adapter barely changes the audio"

    instances = client.list_loras()["instances"]
    dit = [s for name, s in instances.items() if name.startswith("dit_decoder.")]
    assert dit and set(dit[0]["resident"]) == {TINY_LORA, NEW}, instances

    assert client_main(["loras", "--url", server.grpc_url]) == 0
    assert f"{NEW}: rank [6]" in capsys.readouterr().out


def test_refused_adapters_name_the_field_and_the_server_keeps_serving(server: TritonServer, registry: Path,
                                                                      tiny_lora_dir: Path, tiny_onnx_ckpt: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = AceStepClient(server.grpc_url, admin_key=server.admin_key)
    if not (registry / NEW).exists():  # also when run on its own
        write_tiny_lora(tiny_onnx_ckpt, registry / NEW, seed=7, rank=6)
    bad = registry / "misfit"
    bad.mkdir()
    with safe_open(str(tiny_lora_dir / TINY_LORA / LORA_WEIGHTS_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 31)
    save_file(tensors, str(bad / LORA_WEIGHTS_FILE))
    with pytest.raises(InvalidRequest, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A") as info:
        client.load_lora("misfit")
    assert info.value.field == "lora_name_or_path"
    assert "misfit" in client.list_loras()["failed"]

    cases = [("misfit", "could not be loaded"), ("jazz", "unknown LoRA adapter")]
    client.load_lora(NEW)  # whatever the order the tests ran in
    client.unload_lora(NEW)
    cases.append((NEW, "unknown LoRA adapter"))
    for name, reason in cases:
        with pytest.raises(InvalidRequest, match=reason) as info:
            client.generate(GenerationParams(**REQUEST, batch_size=3, lora_name_or_path=name))
        assert info.value.field == "lora_name_or_path"
    with pytest.raises(InvalidRequest) as info:
        client.unload_lora("jazz")
    assert info.value.field == "lora_name_or_path"
    monkeypatch.setenv(ADMIN_KEY_ENV, server.admin_key)  # the CLI takes the key from the environment only
    assert client_main(["loras", "load", "jazz", "--url", server.grpc_url]) == 2

    shutil.rmtree(bad)  # reload: serve every folder there is (NEW again), forget what vanished
    listing = client.reload_loras()
    assert [a["name"] for a in listing["loaded"]] == [TINY_LORA, NEW] and listing["failed"] == {}

    # still serving, adapters included (3 items x 2 rows = the batcher's preferred size: no wait)
    result = client.generate(GenerationParams(**REQUEST, batch_size=3, manual_seeds="1,2,3",
                                              lora_name_or_path=TINY_LORA, lora_weight=-0.5))
    assert result.audio.shape[0] == 3 and np.isfinite(result.audio).all()


# ------------------------------------------------------------------------------ issue 19: an admin API
def _state_file(server: TritonServer) -> Path:
    (state,) = server.repository.parent.glob("lora_runtime/lora_state.json")
    return state


def test_load_unload_reload_need_the_admin_key(server: TritonServer, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    before = _state_file(server).read_bytes()
    for key, said in (("", "none was sent"), ("wrong-" + "0" * 16, "the key sent is wrong")):
        anyone = AceStepClient(server.grpc_url, admin_key=key)
        assert TINY_LORA in [a["name"] for a in anyone.list_loras()["loaded"]], "listing stays open"
        for call in (lambda c=anyone: c.unload_lora(TINY_LORA), lambda c=anyone: c.load_lora(NEW),
                     lambda c=anyone: c.reload_loras()):
            with pytest.raises(AccessDenied) as info:
                call()
            assert info.value.credential == "admin_key" and said in info.value.message, info.value.message
    assert _state_file(server).read_bytes() == before, "a refused command changed nothing"
    assert client_main(["loras", "unload", TINY_LORA, "--url", server.grpc_url]) == 5
    assert "access denied" in capsys.readouterr().err
    # 3 items x 2 rows = the batcher's preferred size: no 10 s queue delay at each step
    result = AceStepClient(server.grpc_url).generate(GenerationParams(**REQUEST, batch_size=3, manual_seeds="2,3,4",
                                                                      lora_name_or_path=TINY_LORA))
    assert np.isfinite(result.audio).all(), "the adapter is still served"


def test_bad_names_and_files_are_refused_naming_the_field_and_reload_loads_the_good_ones(
        server: TritonServer, registry: Path, tiny_lora_dir: Path, tmp_path: Path) -> None:
    client = AceStepClient(server.grpc_url, admin_key=server.admin_key)
    state = _state_file(server)

    # names: too long for a file name, and far beyond gRPC's 16 KiB of error metadata
    for name in ("a" * 300, "b" * 20_000):
        with pytest.raises(InvalidRequest) as info:
            client.load_lora(name)
        assert info.value.field == "lora_name_or_path" and "too long" in info.value.message
        assert len(info.value.message) < 1000, "the error echoes only the start of the name"
    with pytest.raises(InvalidRequest) as info:
        client.unload_lora("c" * 20_000)
    assert info.value.field == "lora_name_or_path" and len(info.value.message) < 1000
    for i in range(40):  # refused loads of (valid) unknown names: the state keeps the last few
        with pytest.raises(InvalidRequest):
            client.load_lora(f"missing-{i:03d}-" + "x" * 80)
    failed = client.list_loras()["failed"]
    assert 0 < len(failed) <= 16 and f"missing-039-{'x' * 80}" in failed
    assert state.stat().st_size < 64 * 1024, state.stat().st_size

    # malformed adapter files, and links out of the registry
    good = tiny_lora_dir / TINY_LORA / LORA_WEIGHTS_FILE
    outside = tmp_path / "outside"
    shutil.copytree(tiny_lora_dir / TINY_LORA, outside)
    bad: dict[str, str] = {}

    def folder(name: str) -> Path:
        bad[name] = ""
        (registry / name).mkdir()
        return registry / name / LORA_WEIGHTS_FILE

    folder("aa-empty").write_bytes(b"")
    folder("ab-random").write_bytes(np.random.default_rng(0).bytes(4096))
    folder("ac-passwd").symlink_to("/etc/passwd")
    folder("ad-huge-header").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    folder("ae-outside-file").symlink_to(good)
    (registry / "af-outside-folder").symlink_to(outside, target_is_directory=True)
    bad["af-outside-folder"] = ""
    shutil.copytree(tiny_lora_dir / TINY_LORA, registry / "zz-good")  # sorted after every bad one
    try:
        for name in bad:
            with pytest.raises(InvalidRequest) as info:
                client.load_lora(name)
            assert info.value.field == "lora_name_or_path", (name, info.value.message)
            assert info.value.category is not None and "internal" not in info.value.message
            assert f"{registry / name}" in info.value.message, (name, info.value.message)
            assert "outside" in info.value.message or "not a readable adapter file" in info.value.message, \
                info.value.message
        listing = client.reload_loras()
        assert "zz-good" in [a["name"] for a in listing["loaded"]], "one bad folder aborted the reload"
        assert set(bad) <= set(listing["failed"]), listing["failed"]
        result = client.generate(GenerationParams(**REQUEST, batch_size=3, manual_seeds="4,5,6",
                                                  lora_name_or_path="zz-good"))  # the preferred batch: no wait
        assert np.isfinite(result.audio).all()
    finally:
        for name in [*bad, "zz-good"]:
            path = registry / name
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
    listing = client.reload_loras()
    assert "zz-good" not in [a["name"] for a in listing["loaded"]] and listing["failed"] == {}

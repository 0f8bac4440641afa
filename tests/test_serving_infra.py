"""Serving infrastructure: the config renderer, the repository writer, the tritonserver process,
the generic ONNX component model and the client against a real (pip-bundled) tritonserver.

One server serves every ``triton``-marked test here (session fixture, always stopped); it loads
two tiny ONNX components, constant stand-ins for the six contract components (so the real
rendered configs are loaded by Triton itself) and the test-only endpoint in tests/fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from test_metrics import scrape, value
from triton_harness import (
    FAKE_ENDPOINT,
    LINEAR,
    SCALED,
    build_test_repository,
    fake_endpoint,
    linear_weights,
    make_contract_onnx,
    make_linear_onnx,
    require_tritonserver,
    running_server,
)

from acestep_client.client import AceStepClient, GenerationCancelled, GenerationTimeout, ServerError
from acestep_client.params import MAX_BATCH, OUTPUT_SAMPLE_RATE, GenerationParams
from acestep_triton.export import render_cli
from acestep_triton.export.model_configs import (
    OrchestratorSpec,
    component_config,
    load_endpoints,
    orchestrator_config,
)
from acestep_triton.export.repository import render_repository
from acestep_triton.export.specs import COMPONENTS, ComponentSpec, TensorSpec, read_onnx_sizes
from acestep_triton.export.triton_config import (
    DynamicBatching,
    ModelConfigSpec,
    TensorConfig,
    check_config,
    render_config,
)
from acestep_triton.serving import component_model, onnx_component
from acestep_triton.serving.orchestrator import preferred_memory, sampling_device
from acestep_triton.serving.server import TritonServer, TritonServerError

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"Ct": 8, "D": 16, "Lt": 2, "Ll": 3, "Ld": 4}
TYPE = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL",
        "BYTES": "TYPE_STRING"}


# ============================================================================ renderer (no server)
def _io(config, key: str) -> list[tuple[str, str, list[int], bool]]:
    from tritonclient.grpc import model_config_pb2

    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims), getattr(t, "optional", False))
            for t in getattr(config, key)]


def _kind(config) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_component_configs_parse_and_match_contract_on_both_targets(name: str) -> None:
    spec = COMPONENTS[name]
    parsed = {t: check_config(render_config(component_config(spec, t, sizes=SIZES, runtime=r)))
              for t, r in (("cpu", "onnx"), ("gpu", "tensorrt"))}
    cpu, gpu = parsed["cpu"], parsed["gpu"]
    assert cpu.backend == "python" and not cpu.platform
    assert gpu.platform == "tensorrt_plan" and not gpu.backend and gpu.default_model_filename == "model.plan"
    assert (_kind(cpu), _kind(gpu)) == ("KIND_CPU", "KIND_GPU")
    for key in ("input", "output"):
        assert _io(cpu, key) == _io(gpu, key), f"{name}: {key} differs between targets"
    assert spec.batchable, "every contract tensor leads with B"

    def dims(t: TensorSpec) -> list[int]:  # batch dim stripped; a [B] tensor is written dims [1]
        return list(t.resolve(SIZES))[1:] or [1]

    expected_in = [(t.name, TYPE[t.dtype], dims(t), False) for t in spec.inputs]
    expected_out = [(t.name, TYPE[t.dtype], dims(t), False) for t in spec.outputs]
    assert _io(cpu, "input") == expected_in
    assert _io(cpu, "output") == expected_out
    assert cpu.max_batch_size == gpu.max_batch_size == MAX_BATCH * spec.rows_per_item
    assert cpu.HasField("dynamic_batching") and gpu.HasField("dynamic_batching")
    reshaped = [t.name for t in cpu.input if t.HasField("reshape")]
    assert reshaped == [t.name for t in spec.inputs if t.shape == ("B",)]
    for t in cpu.input:
        if t.HasField("reshape"):
            assert list(t.reshape.shape) == [] and spec.request_shape(t.name, (5,)) == (5, 1)


def test_contract_table_matches_architecture_doc() -> None:
    """Every tensor name in docs/ARCHITECTURE.md's component table is in specs.py, in order."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for spec in COMPONENTS.values():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{spec.name}` |"))
        cells = row.split("|")
        for names, cell in ((spec.input_names, cells[2]), (spec.output_names, cells[3])):
            positions = [cell.index(f"`{n}`") for n in names]
            assert positions == sorted(positions), f"{spec.name}: order of {names} differs from the doc"
    assert COMPONENTS["dit_decoder"].tensor("velocity").dims == (-1, 8, 16, -1)
    assert COMPONENTS["condition_encoder"].dynamic_axes()["encoder_states"] == {0: "B", 1: "S"}


def test_config_round_trip_keeps_every_field() -> None:
    model = ModelConfigSpec(
        name="m", backend="python", max_batch_size=4,
        inputs=(TensorConfig("a", "FP32", (3, -1)), TensorConfig("t", "FP32", (1,), reshape=()),
                TensorConfig("s", "BYTES", (1,), optional=True)),
        outputs=(TensorConfig("o", "INT64", (-1,)),), instance_kind="KIND_GPU", instance_count=2,
        instance_gpus=(0, 1), dynamic_batching=DynamicBatching(500, (2, 4)), decoupled=True,
        parameters={"path": 'C:\\dir "q"\nx', "n": "3"})
    config = check_config(render_config(model))
    assert _io(config, "input") == [("a", "TYPE_FP32", [3, -1], False), ("t", "TYPE_FP32", [1], False),
                                    ("s", "TYPE_STRING", [1], True)]
    assert config.input[1].HasField("reshape") and list(config.input[1].reshape.shape) == []
    assert list(config.instance_group[0].gpus) == [0, 1] and config.instance_group[0].count == 2
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.model_transaction_policy.decoupled
    assert config.parameters["path"].string_value == 'C:\\dir "q"\nx'


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="dynamic batching needs max_batch_size"):
        ModelConfigSpec(name="m", backend="python", inputs=(), outputs=(), dynamic_batching=DynamicBatching())
    with pytest.raises(ValueError, match="exactly one of backend or platform"):
        ModelConfigSpec(name="m", inputs=(), outputs=())
    with pytest.raises(ValueError, match="duplicate"):
        ModelConfigSpec(name="m", backend="python", inputs=(TensorConfig("a", "FP32", (1,)),),
                        outputs=(TensorConfig("a", "FP32", (1,)),))
    with pytest.raises(ValueError, match="invalid config"):
        check_config('name: "m"\nbackend: "python"\nnot_a_field: 1\n')
    with pytest.raises(ValueError, match="exactly one of backend/platform"):
        check_config('name: "m"\n')
    with pytest.raises(ValueError, match="batch dim must lead"):
        TensorSpec("x", "FP32", (4, "B"))


def test_orchestrator_config_has_one_optional_input_per_wire_field(tmp_path: Path) -> None:
    spec = OrchestratorSpec.from_json(ROOT / "ensemble_configs" / "text2music.json")
    config = check_config(render_config(orchestrator_config(spec, tmp_path)))
    wire = GenerationParams.wire_specs()
    assert _io(config, "input") == [(s.name, TYPE[s.triton_dtype], [1], True) for s in wire]
    assert "format" not in [s.name for s in wire]  # client-side only
    assert _io(config, "output") == [("progress", "TYPE_INT32", [2], False),
                                     ("audio", "TYPE_FP32", [-1, 2, -1], False),
                                     ("sample_rate", "TYPE_INT32", [1], False),
                                     ("params_json", "TYPE_STRING", [1], False)]
    assert config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    assert config.parameters["task"].string_value == "text2music"
    assert config.parameters["assets_dir"].string_value == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="assets_dir"):
        orchestrator_config(spec, None)  # {assets} without --assets


def test_orchestrators_sample_on_the_gpu_of_the_gpu_target(tmp_path: Path) -> None:
    spec = OrchestratorSpec.from_json(ROOT / "ensemble_configs" / "text2music.json")
    cpu = check_config(render_config(orchestrator_config(spec, tmp_path)))
    gpu = check_config(render_config(orchestrator_config(spec, tmp_path, "gpu", gpus=[1])))
    assert (_kind(cpu), cpu.parameters["sampling_device"].string_value) == ("KIND_CPU", "cpu")
    assert (_kind(gpu), gpu.parameters["sampling_device"].string_value) == ("KIND_GPU", "cuda")
    assert list(gpu.instance_group[0].gpus) == [1]
    # An endpoint definition may keep its loop on the host even on the gpu target, but only
    # with a device the orchestrator knows.
    host = OrchestratorSpec(name="t", source="s", task="text2music", parameters={"sampling_device": "cpu"})
    assert _kind(check_config(render_config(orchestrator_config(host, None, "gpu")))) == "KIND_CPU"
    odd = OrchestratorSpec(name="t", source="s", task="text2music", parameters={"sampling_device": "gpu"})
    with pytest.raises(ValueError, match="sampling_device must be 'cpu' or 'cuda', got 'gpu'"):
        orchestrator_config(odd, None, "gpu")


def test_bls_outputs_are_asked_for_where_the_loop_samples() -> None:
    class FakePb:
        TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_GPU = "cpu-memory", "gpu-memory"

        @staticmethod
        def PreferredMemory(kind: str, device_id: int) -> tuple[str, int]:  # noqa: N802 (pb_utils' name)
            return kind, device_id

    assert preferred_memory(FakePb, torch.device("cpu")) == {"preferred_memory": ("cpu-memory", 0)}
    assert preferred_memory(FakePb, torch.device("cuda", 1)) == {"preferred_memory": ("gpu-memory", 1)}
    assert preferred_memory(object(), torch.device("cuda", 1)) == {}  # stubs older than PreferredMemory


def test_sampling_device_parameter() -> None:
    assert sampling_device("cpu", "3") == torch.device("cpu")
    with pytest.raises(ValueError, match="sampling_device must be 'cpu' or 'cuda', got 'gpu'"):
        sampling_device("gpu")
    if torch.cuda.is_available():
        assert sampling_device("cuda", "0") == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="sampling_device is 'cuda' but torch sees no CUDA device"):
            sampling_device("cuda", "0")


def test_render_repository_cpu_layout(tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    for spec in COMPONENTS.values():
        make_contract_onnx(onnx_dir / f"{spec.name}.onnx", spec, SIZES)
    make_linear_onnx(onnx_dir / f"{SCALED.name}.onnx", SCALED, scaled=True, external_data=True)
    sources = tmp_path / "sources"
    (sources / "orchestrator").mkdir(parents=True)
    (sources / "orchestrator" / "model.py").write_text("# placeholder orchestrator\n")
    (sources / "onnx_component").mkdir()
    (sources / "onnx_component" / "model.py").write_bytes(
        (ROOT / "model_repository" / "onnx_component" / "model.py").read_bytes())
    endpoints = load_endpoints(["text2music"])
    out = render_repository(tmp_path / "repo", "cpu", onnx_dir, endpoints, assets=tmp_path / "assets",
                            components=[*COMPONENTS, SCALED], sources_root=sources)

    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert models == sorted([*COMPONENTS, SCALED.name, "text2music"])
    for name in [*COMPONENTS, SCALED.name]:
        version = out / name / "1"
        assert (version / "model.py").read_bytes() == (sources / "onnx_component" / "model.py").read_bytes()
        assert (version / "model.onnx").read_bytes() == (onnx_dir / f"{name}.onnx").read_bytes()
        check_config((out / name / "config.pbtxt").read_text())
    assert (out / SCALED.name / "1" / f"{SCALED.name}.onnx.data").is_file(), "external weights not carried"
    dit = check_config((out / "dit_decoder" / "config.pbtxt").read_text())
    assert [list(t.dims) for t in dit.input] == [[8, 16, -1], [-1], [-1, 16], [-1], [1], [4]]
    assert (out / "text2music" / "1" / "model.py").read_text() == "# placeholder orchestrator\n"

    # A re-render replaces the previous one; a folder we did not render is never cleared.
    render_repository(out, "cpu", onnx_dir, [], components=["vocoder"], sources_root=sources)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["vocoder"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        render_repository(foreign, "cpu", onnx_dir, [], components=["vocoder"], sources_root=sources)
    assert (foreign / "keep.txt").is_file()


def test_render_repository_gpu_layout(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    for name in COMPONENTS:
        write_fake_engine(engines / f"{name}.plan", max_batch=3 * MAX_BATCH)
    out = render_repository(tmp_path / "repo", "gpu", runtime="tensorrt", engine_dir=engines, sizes=SIZES, gpus=[0, 1],
                            instance_count=2, orchestrators=load_endpoints(), assets=tmp_path)
    for endpoint in load_endpoints():  # every task endpoint samples on the GPUs it serves
        config = check_config((out / endpoint.name / "config.pbtxt").read_text())
        assert (_kind(config), list(config.instance_group[0].gpus)) == ("KIND_GPU", [0, 1])
        assert config.parameters["sampling_device"].string_value == "cuda"
    for name, spec in COMPONENTS.items():
        config = check_config((out / name / "config.pbtxt").read_text())
        assert config.platform == "tensorrt_plan"
        assert (_kind(config), list(config.instance_group[0].gpus)) == ("KIND_GPU", [0, 1])
        assert config.HasField("dynamic_batching") == spec.batchable
        assert (out / name / "1" / "model.plan").read_bytes() == name.encode()
    text = check_config((out / "text_encoder" / "config.pbtxt").read_text())
    assert list(text.output[0].dims) == [-1, SIZES["Ct"]] and text.max_batch_size == 2 * MAX_BATCH


def write_fake_engine(plan: Path, max_batch: int) -> None:
    """A stand-in plan (its component's name as bytes) with the sidecar the builder writes."""
    from acestep_triton.export.engine_meta import EngineMeta

    plan.write_bytes(plan.stem.encode())
    EngineMeta(component=plan.stem, tensorrt="11.4.0", gpu="test", compute_capability="9.0", precision="bf16",
               profile={}, max_batch=max_batch, onnx="", onnx_sha256="").write(plan)


def test_render_refuses_a_batch_above_the_engine_profile(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    write_fake_engine(engines / "dit_decoder.plan", max_batch=4)
    with pytest.raises(ValueError, match=r"dit_decoder.plan: built for batches up to 4, .*max_batch_size"):
        render_repository(tmp_path / "repo", "gpu", runtime="tensorrt", engine_dir=engines, sizes=SIZES,
                          components=["dit_decoder"], max_items=16)
    out = render_repository(tmp_path / "repo", "gpu", runtime="tensorrt", engine_dir=engines, sizes=SIZES,
                            components=["dit_decoder"], max_items=1)
    assert check_config((out / "dit_decoder" / "config.pbtxt").read_text()).max_batch_size <= 4


def test_read_onnx_sizes_catches_contract_drift(tmp_path: Path) -> None:
    spec = COMPONENTS["dit_decoder"]
    good = make_contract_onnx(tmp_path / "good.onnx", spec, SIZES)
    assert read_onnx_sizes(spec, good) == {"D": 16, "Ld": 4}
    qscale = TensorSpec("qscale", "FP32", ("Ld",))
    renamed = ComponentSpec(spec.name, (*spec.inputs[:-1], qscale), spec.outputs)
    with pytest.raises(ValueError, match="query_scale"):
        read_onnx_sizes(spec, make_contract_onnx(tmp_path / "renamed.onnx", renamed, SIZES))
    with pytest.raises(ValueError, match="dynamic dim W"):  # W exported as a fixed size
        read_onnx_sizes(spec, make_contract_onnx(tmp_path / "fixed.onnx", spec, {**SIZES, "W": 7}))


def test_render_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_linear_onnx(tmp_path / "onnx" / "vocoder.onnx", LINEAR)  # wrong tensors for the vocoder
    code = render_cli.main(["render", "--out", str(tmp_path / "r"), "--onnx-dir", str(tmp_path / "onnx"),
                        "--target", "cpu", "--endpoints", "", "--components", "vocoder"])
    assert code == 1 and "vocoder.onnx" in capsys.readouterr().err
    code = render_cli.main(["render", "--out", str(tmp_path / "g"), "--target", "gpu", "--runtime", "tensorrt",
                        "--endpoints", "", "--max-items", "4"])
    assert code == 0, capsys.readouterr().err
    vocoder = check_config((tmp_path / "g" / "vocoder" / "config.pbtxt").read_text())
    assert vocoder.max_batch_size == 8, "the vocoder takes one row per stereo channel"


# ============================================================================ ONNX model body (no server)
class _FakePb:
    """Just enough of triton_python_backend_utils to run the model body in-process."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: Exception | None = None) -> None:
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str):
        return request.get(name)


def _model_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: ComponentSpec, **kw):
    monkeypatch.setattr(component_model, "pb_utils", _FakePb)
    version = tmp_path / "1"
    make_linear_onnx(version / "model.onnx", spec, **kw)
    config = render_config(component_config(spec, "cpu", max_items=8))
    from google.protobuf import json_format

    model_config = json_format.MessageToJson(check_config(config), preserving_proto_field_name=True)
    model = onnx_component.OnnxComponentModel()
    model.initialize({"model_config": model_config, "model_repository": str(tmp_path), "model_version": "1"})
    return model


def test_model_body_merges_compatible_requests_and_isolates_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_body(tmp_path, monkeypatch, LINEAR)
    runs = []
    real_run = model.session.run

    def spy(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runs.append({k: v.shape for k, v in feeds.items()})
        return real_run(names, feeds)

    model.session.run = spy
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2)]
    ts = [rng.standard_normal(n).astype(np.float32) for n in (1, 3, 2)]  # [B] as the model sees it
    requests = [{"x": xs[0], "t": ts[0]}, {"x": xs[1], "t": ts[1]}, {"t": ts[0]}, {"x": xs[2], "t": ts[2]}]
    responses = model.execute(requests)  # the third request lacks x
    weight, bias = linear_weights()
    for response, x, t in zip([responses[0], responses[1], responses[3]], xs, ts, strict=True):
        assert response.error is None
        err = np.abs(response.outputs["y"] - (x @ weight + bias + t[:, None])).max()
        assert err < 1e-5, f"merged batch split wrongly: max error {err}"
    assert "tiny_linear: input 'x' is missing" in str(responses[2].error)
    assert runs == [{"x": (6, 4), "t": (6,)}], f"compatible requests should run as one batch, ran {runs}"


def test_model_body_rejects_graph_that_disagrees_with_config(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = ComponentSpec(LINEAR.name, LINEAR.inputs,
                          (TensorSpec("y", "FP32", ("B", 3)), TensorSpec("z", "FP32", ("B", 3))))
    monkeypatch.setattr(component_model, "pb_utils", _FakePb)
    make_linear_onnx(tmp_path / "1" / "model.onnx", LINEAR)
    from google.protobuf import json_format

    config = json_format.MessageToJson(check_config(render_config(component_config(wrong, "cpu"))),
                                       preserving_proto_field_name=True)
    with pytest.raises(ValueError, match="has no tensor 'z'"):
        onnx_component.OnnxComponentModel().initialize(
            {"model_config": config, "model_repository": str(tmp_path), "model_version": "1"})


# ============================================================================ live server
@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One tritonserver for this module's live tests; stopped even when a test fails."""
    require_tritonserver()
    root = tmp_path_factory.mktemp("triton")
    repo = build_test_repository(root, contract_sizes=SIZES)
    with running_server(repo, log_path=root / "tritonserver.log") as server:
        yield SimpleNamespace(server=server, repo=repo, onnx=root / "onnx")


@pytest.fixture
def triton_client(served):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    yield client
    client.close()


def _infer(client, model: str, **arrays: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs).as_numpy("y")


def _ort(path: Path, **feeds: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]


@pytest.mark.triton
def test_rendered_models_load_as_rendered(served, triton_client) -> None:
    assert served.server.is_ready()
    for folder in sorted(p for p in served.repo.iterdir() if p.is_dir()):
        assert triton_client.is_model_ready(folder.name), f"{folder.name} not ready"
        rendered = check_config((folder / "config.pbtxt").read_text())
        loaded = triton_client.get_model_config(folder.name).config
        for key in ("input", "output"):
            assert _io(loaded, key) == _io(rendered, key), f"{folder.name}: Triton read other {key}s"
        assert loaded.max_batch_size == rendered.max_batch_size
        assert loaded.model_transaction_policy.decoupled == rendered.model_transaction_policy.decoupled


@pytest.mark.triton
def test_onnx_component_matches_onnxruntime(served, triton_client) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    t = rng.standard_normal(5).astype(np.float32)
    got = _infer(triton_client, LINEAR.name, x=x, t=t.reshape(LINEAR.request_shape("t", t.shape)))
    want = _ort(served.onnx / f"{LINEAR.name}.onnx", x=x, t=t)
    err = float(np.abs(got - want).max())
    assert got.shape == (5, 3) and err <= 1e-6, f"tiny_linear vs onnxruntime: max abs error {err}"

    x3 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    scale = np.array([0.5, 2.0, -1.0], np.float32)
    got = _infer(triton_client, SCALED.name, x=x3, scale=scale)
    want = _ort(served.onnx / f"{SCALED.name}.onnx", x=x3, scale=scale)
    err = float(np.abs(got - want).max())
    assert got.shape == (2, 3, 3) and err <= 1e-6, f"tiny_scaled vs onnxruntime: max abs error {err}"


@pytest.mark.triton
def test_onnx_component_concurrent_requests_each_get_their_rows(served, triton_client) -> None:
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 2, 3, 1, 2, 1)]
    results: dict[int, np.ndarray] = {}

    def call(i: int, x: np.ndarray) -> None:
        results[i] = _infer(triton_client, LINEAR.name, x=x, t=np.full((len(x), 1), i, np.float32))

    threads = [threading.Thread(target=call, args=(i, x)) for i, x in enumerate(xs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    weight, bias = linear_weights()
    errors = [float(np.abs(results[i] - (x @ weight + bias + i)).max()) for i, x in enumerate(xs)]
    assert max(errors) < 1e-5, f"per-request max abs errors {errors}"


@pytest.mark.triton
def test_contract_component_accepts_contract_shaped_requests(served, triton_client) -> None:
    """A dit_decoder call shaped as the Triton backend will send it (timestep as [B, 1])."""
    import tritonclient.grpc as grpcclient

    spec, batch, frames, tokens = COMPONENTS["dit_decoder"], 3, 5, 7
    model_shapes = {"latents": (batch, 8, 16, frames), "latent_mask": (batch, frames),
                    "encoder_states": (batch, tokens, SIZES["D"]), "encoder_mask": (batch, tokens),
                    "timestep": (batch,), "query_scale": (batch, SIZES["Ld"])}
    inputs = []
    for name in spec.input_names:
        shape = spec.request_shape(name, model_shapes[name])
        tensor = grpcclient.InferInput(name, list(shape), "FP32")
        tensor.set_data_from_numpy(np.zeros(shape, np.float32))
        inputs.append(tensor)
    velocity = triton_client.infer("dit_decoder", inputs).as_numpy("velocity")
    assert velocity.shape[1:3] == (8, 16), velocity.shape  # the stand-in returns a constant


@pytest.mark.triton
def test_onnx_component_error_is_a_response_and_server_survives(served, triton_client) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.ones((1, 2, 4), np.float32)
    with pytest.raises(InferenceServerException, match=r"tiny_scaled: .*Mul"):
        _infer(triton_client, SCALED.name, x=x, scale=np.ones(5, np.float32))  # cannot broadcast 3 by 5
    assert _infer(triton_client, SCALED.name, x=x, scale=np.ones(3, np.float32)).shape == (1, 2, 3)


def _expected_tones(seeds: list[int], n: int) -> np.ndarray:
    t = np.arange(n) / OUTPUT_SAMPLE_RATE
    out = []
    for b, seed in enumerate(seeds):
        f, phase = 220.0 * (b + 1), np.deg2rad(seed % 360)
        out.append([np.sin(2 * np.pi * f * t + phase), np.sin(2 * np.pi * 1.5 * f * t + phase)])
    return 0.25 * np.asarray(out, np.float32)


@pytest.mark.triton
def test_client_streams_progress_then_audio_and_saves_every_format(served, tmp_path: Path) -> None:
    client = AceStepClient(served.server.grpc_url)
    seen: list[tuple[int, int]] = []
    params = GenerationParams(prompt="pop, piano", infer_step=6, audio_duration=0.25, manual_seeds="30,200",
                              batch_size=2)
    result = client.generate(params, endpoint=FAKE_ENDPOINT, on_progress=lambda s, t: seen.append((s, t)))
    assert seen == [(i, 6) for i in range(1, 7)]
    assert result.sample_rate == OUTPUT_SAMPLE_RATE and result.audio.shape == (2, 2, 12000)
    err = float(np.abs(result.audio - _expected_tones([30, 200], 12000)).max())
    assert err < 1e-6, f"streamed audio differs from the endpoint's tones: max abs error {err}"
    assert result.params["actual_seeds"] == [30, 200] and result.params["prompt"] == "pop, piano"

    for fmt in ("wav", "flac", "ogg", "mp3"):
        paths = result.save(tmp_path / fmt, fmt, stem="song")
        assert [p.name for p in paths] == [f"song_0.{fmt}", f"song_1.{fmt}"]
        for i, path in enumerate(paths):
            audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
            assert rate == OUTPUT_SAMPLE_RATE and audio.shape[1] == 2, f"{path.name}: {audio.shape} @ {rate}"
            peak = np.fft.rfftfreq(audio.shape[0], 1 / rate)[np.abs(np.fft.rfft(audio[:, 0])).argmax()]
            assert abs(peak - 220.0 * (i + 1)) < 10, f"{path.name}: dominant frequency {peak:.1f} Hz"
            saved = json.loads(path.with_name(f"song_{i}_params.json").read_text())
            assert saved["actual_seeds"] == [30, 200] and saved["audio_path"] == str(path)
    wav, _ = sf.read(str(tmp_path / "wav" / "song_1.wav"), dtype="float32", always_2d=True)
    assert np.abs(wav.T - result.audio[1]).max() == 0.0, "float WAV must keep the samples exactly"
    retake = GenerationParams.from_json((tmp_path / "wav" / "song_0_params.json").read_text())
    assert retake.manual_seeds == "30,200" and retake.infer_step == 6


@pytest.mark.triton
def test_server_side_validation_error_names_the_field(served) -> None:
    client = AceStepClient(served.server.grpc_url)
    with pytest.raises(ServerError) as info:
        client.generate(GenerationParams(infer_step=0), endpoint=FAKE_ENDPOINT, validate=False)
    assert info.value.field == "infer_step", str(info.value)
    assert "infer_step" in str(info.value) and "minimum" in str(info.value)


@pytest.mark.triton
def test_cancel_and_timeout_stop_the_request_on_the_server(served) -> None:
    client = AceStepClient(served.server.grpc_url)
    long = GenerationParams(infer_step=400, audio_duration=0.1)  # 400 x 20 ms = 8 s if never cancelled
    seen: list[int] = []

    def cancel_at_three(step: int, total: int) -> None:
        seen.append(step)
        if step == 3:
            client.cancel()

    before = steps_run(served.server)
    with pytest.raises(GenerationCancelled):
        client.generate(long, endpoint=FAKE_ENDPOINT, on_progress=cancel_at_three)
    assert seen[:3] == [1, 2, 3] and len(seen) <= 4, seen
    with pytest.raises(GenerationTimeout):
        client.generate(long, endpoint=FAKE_ENDPOINT, timeout_s=0.3)
    # The endpoint has one instance, so this short request runs only after both long loops have
    # returned; the step counter then tells how far they went (each would run 400 steps if the
    # server ignored the cancellation).
    result = client.generate(GenerationParams(infer_step=2, audio_duration=0.1), endpoint=FAKE_ENDPOINT)
    assert result.audio.shape == (1, 2, 4800)
    ran = steps_run(served.server) - before - 2
    assert 3 <= ran < long.infer_step, f"the two cancelled requests ran {ran} steps"


def steps_run(server) -> float:
    """The fake endpoint's ``fake_steps_total`` counter (0 until it has counted something)."""
    return value(scrape(server), "fake_steps_total", model=FAKE_ENDPOINT)


@pytest.mark.triton
def test_client_cli_generate(served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from acestep_client import cli

    url = served.server.grpc_url
    code = cli.main(["generate", "--url", url, "--endpoint", FAKE_ENDPOINT, "--prompt", "rock",
                     "--steps", "3", "--duration", "0.2", "--seeds", "5", "--format", "flac",
                     "--name", "take", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.split() == [str(tmp_path / "take_0.flac")]
    assert "3/3 steps" in err
    saved = json.loads((tmp_path / "take_0_params.json").read_text())
    assert saved["prompt"] == "rock" and saved["actual_seeds"] == [5] and saved["format"] == "flac"
    # Start again from the saved parameters, overriding one field.
    code = cli.main(["generate", "--url", url, "--endpoint", FAKE_ENDPOINT, "--quiet", "--params-json",
                     str(tmp_path / "take_0_params.json"), "--steps", "0", "--out", str(tmp_path)])
    assert code == 2 and "infer_step" in capsys.readouterr().err


# ============================================================================ process management
@pytest.mark.triton
def test_server_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    install = require_tritonserver()
    repo = tmp_path / "repo"
    bad = ModelConfigSpec(name="broken", backend="no_such_backend", inputs=(TensorConfig("x", "FP32", (1,)),),
                          outputs=(TensorConfig("y", "FP32", (1,)),))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(render_config(bad))
    server = TritonServer(repo, install=install, startup_timeout=60, log_path=tmp_path / "log")
    with pytest.raises(TritonServerError, match="no_such_backend"):
        server.start()
    assert not server.running


@pytest.mark.triton
def test_server_context_manager_and_cli_stop_cleanly(tmp_path: Path) -> None:
    """An empty repository starts in seconds: enough to check start, readiness, SIGTERM and the CLI."""
    install = require_tritonserver()
    repo = tmp_path / "empty"
    repo.mkdir()
    with TritonServer(repo, install=install, startup_timeout=60) as server:
        pid, log = server.pid, server.log_path
        assert server.is_ready() and log is not None and log.is_file()
        assert install.python_stub.is_file()
    assert server.pid is None and not _alive(pid)
    assert not log.exists(), "a clean stop removes the temporary log"

    from acestep_triton.serving.server import free_ports

    grpc, http, metrics = free_ports(3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acestep_triton.serving.server", "serve", "--repository",
                             str(repo), "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port",
                             str(metrics), "--log-file", str(tmp_path / "cli.log")],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert f"grpc localhost:{grpc}" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Signal (15) received" in (tmp_path / "cli.log").read_text()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_fake_endpoint_spec_renders(tmp_path: Path) -> None:
    out = render_repository(tmp_path / "repo", "cpu", None, [fake_endpoint(0.5)], components=[])
    config = check_config((out / FAKE_ENDPOINT / "config.pbtxt").read_text())
    assert config.parameters["step_delay_s"].string_value == "0.5"


def test_install_copies_the_stub_once_and_builds_the_environment(tmp_path: Path) -> None:
    import sysconfig

    from acestep_triton.serving.server import TritonInstall

    root = tmp_path / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (root / "python_backend_stubs" / version).mkdir(parents=True)
    (root / "python_backend_stubs" / "3.99").mkdir()
    (root / "backends" / "python").mkdir(parents=True)
    source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    source.write_bytes(b"stub-v1")
    source.chmod(0o755)
    install = TritonInstall.from_root(root, libs_dir=tmp_path / "libs")
    target = install.ensure_python_stub()
    assert target.read_bytes() == b"stub-v1" and os.access(target, os.X_OK)
    stamp = target.stat().st_mtime_ns
    install.ensure_python_stub()
    assert target.stat().st_mtime_ns == stamp, "an identical stub must be left alone"
    source.write_bytes(b"stub-v2")
    assert install.ensure_python_stub().read_bytes() == b"stub-v2"
    with pytest.raises(TritonServerError, match=r"Python 3\.1 in .*available: .*3\.99"):
        install.ensure_python_stub("3.1")

    env = install.environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"})
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == str(tmp_path / "libs") and libs[-1] == "/opt/x"
    assert libs[1] == sysconfig.get_config_var("LIBDIR")
    assert env["PATH"].split(os.pathsep) == [sysconfig.get_path("scripts"), "/usr/bin"]
    assert env["MALLOC_ARENA_MAX"] == "1"  # a refused upload's memory comes back (test_uploads)
    assert install.environment({"MALLOC_ARENA_MAX": "4"})["MALLOC_ARENA_MAX"] == "4"  # an operator's choice stays


def test_failed_render_leaves_the_previous_repository(tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    make_contract_onnx(onnx_dir / "vocoder.onnx", COMPONENTS["vocoder"], SIZES)
    out = render_repository(tmp_path / "repo", "cpu", onnx_dir, [], components=["vocoder"])
    before = (out / "vocoder" / "config.pbtxt").read_text()
    missing = OrchestratorSpec(name="ghost", source=tmp_path / "nowhere", task="text2music")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        render_repository(out, "cpu", onnx_dir, [missing], components=["vocoder"])
    assert (out / "vocoder" / "config.pbtxt").read_text() == before and not (out / "ghost").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "repo"], "staging folder left behind"


def test_every_model_reads_its_name_config_and_parameters_in_one_call() -> None:
    from acestep_triton.serving.config_params import read_model_config

    config = {"name": "text2music", "max_batch_size": 0,
              "parameters": {"task": {"string_value": "retake"}, "assets_dir": {"string_value": "/a"}}}
    name, read, params = read_model_config({"model_config": json.dumps(config)})
    assert (name, read, params) == ("text2music", config, {"task": "retake", "assets_dir": "/a"})
    assert read_model_config({"model_config": json.dumps({"name": "x"})})[2] == {}

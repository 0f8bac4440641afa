"""The GPU production path, checked on a CPU: TensorRT engine building, CUDA-graph decoding and
full-size random checkpoints.

TensorRT itself needs a GPU, so the builder and runner are driven through a fake ``tensorrt``
module that records what they ask for (flags, profiles, timing cache) and "runs" an engine on
CPU memory. What does not need TensorRT runs for real: the mixed-precision ONNX rewrite is
executed by onnxruntime (fp16) and compared with torch fp32 (tolerance: relative 2e-3, the
rounding of fp16 weights; measured errors in the messages), profiles are checked against the
renderer's ``max_batch_size`` and the codec's window sizes, and the CUDA-graph decoder runs with
a stand-in graph backend against eager ``decode`` (exact).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from acestep_triton.checkpoint import (
    Components,
    load_components,
)
from acestep_triton.component_graphs import component_sources, export_graph
from acestep_triton.export import engine_cli, specs
from acestep_triton.export.engine_build import BuildOptions, build_engine, build_engines, fused_transformer_modules
from acestep_triton.export.engine_meta import (
    EngineBuildError,
    EngineMeta,
    EngineMismatchError,
    RuntimeInfo,
    check_engine,
)
from acestep_triton.export.engine_profiles import DEFAULT_MAX_FRAMES, OPT_FRAMES, dynamic_ranges, profile_shapes
from acestep_triton.export.engine_runner import TensorRTDecoder, TensorRTEngine
from acestep_triton.export.mixed_precision import (
    HEAVY_OPS,
    component_precision,
    convert_to_mixed_precision,
    keeps_fp32,
    write_mixed_precision,
)
from acestep_triton.export.model_configs import component_config
from acestep_triton.export.specs import read_onnx_sizes
from acestep_triton.gpu import CUDAGraphDecoder, GraphedBackend, static_rope
from acestep_triton.synthetic.full_size import (
    DCAE_CONFIG,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    VOCODER_CONFIG,
    FullSizeConfigs,
    build_random_models,
    write_full_random_checkpoint,
)
from acestep_triton.synthetic.tiny_checkpoint import (
    tiny_dcae_config,
    tiny_text_encoder_config,
    tiny_transformer_config,
    tiny_vocoder_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HALF_RTOL = 2e-3
HERE = RuntimeInfo(tensorrt="10.99.1", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")


# ------------------------------------------------------------------------------- profiles
def test_dit_profile_covers_items_times_cfg_branches_and_240_s() -> None:
    ranges = dynamic_ranges(specs.DIT_DECODER, max_items=4)
    assert ranges["B"] == (1, 2, 12), ranges
    assert ranges["W"] == (1, 645, 2583), ranges
    assert ranges["S"] == (3, 1 + 64 + 256, 1 + 256 + 4096), ranges
    assert set(ranges) == {"B", "W", "S"}


def test_decoder_profiles_stop_at_the_overlap_window() -> None:
    """Past 48 s the codec decodes in 512-frame windows, so the DCAE decoder never sees more than
    a 48 s song (516 frames) and the vocoder 8x that many mel frames."""
    assert dynamic_ranges(specs.DCAE_DECODER)["W"] == (1, 516, 516)
    assert dynamic_ranges(specs.VOCODER)["F"] == (8, 8 * 516, 8 * 516)
    # The encoder takes a whole source: 240 s pads to 2584 frames (the pipeline then keeps 2583).
    assert dynamic_ranges(specs.DCAE_ENCODER)["F"] == (8, 8 * 645, 8 * 2584)
    assert -(-(240 * 44100) // 4096) == 2584
    assert dynamic_ranges(specs.VOCODER, max_items=3)["B"] == (1, 2, 6)


def test_profile_frame_counts_are_the_sampler_s() -> None:
    from acestep_triton.sampling import latent_frames

    assert latent_frames(240.0) == DEFAULT_MAX_FRAMES
    assert latent_frames(60.0) == OPT_FRAMES


@pytest.mark.parametrize("name", list(specs.COMPONENTS))
def test_profile_batch_equals_the_rendered_max_batch_size(name: str, tiny_onnx_paths: dict[str, Path]) -> None:
    """Triton refuses a plan whose profile allows fewer rows than the config's max_batch_size."""
    spec = specs.component(name)
    sizes = read_onnx_sizes(spec, tiny_onnx_paths[name])
    shapes = profile_shapes(spec, sizes, max_items=3)
    config = component_config(spec, "gpu", sizes=sizes, max_items=3, runtime="tensorrt")
    assert {s[2][0] for s in shapes.values()} == {config.max_batch_size}
    for tensor in spec.inputs:  # every input present, right rank, min <= opt <= max
        low, opt, high = shapes[tensor.name]
        assert len(low) == len(tensor.shape)
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)), (tensor.name, shapes[tensor.name])


def test_profile_needs_every_checkpoint_size() -> None:
    with pytest.raises(ValueError, match="'D'"):
        profile_shapes(specs.DIT_DECODER, {"Ld": 24})


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(("node", "kept"), [
    ("/transformer_blocks.0/attn/MatMul", True),
    ("/transformer_blocks.23/attn/MatMul_1", True),
    ("/transformer_blocks.0/attn/to_q/MatMul", False),
    ("/transformer_blocks.0/cross_attn/MatMul", False),
    ("/transformer_blocks.0/ff/MatMul", False),
    ("/decoder/decoder/up_blocks.3/up_blocks.3.0/attn/MatMul_1", True),
    ("/decoder/decoder/up_blocks.3/up_blocks.3.0/attn/to_qkv_multiscale.0/proj_in/Conv", False),
    ("/lyric_encoder/encoders.0/self_attn/MatMul", False),
])
def test_fp32_patterns_keep_only_the_linear_attention_products(node: str, kept: bool) -> None:
    assert keeps_fp32(node) is kept


def _heavy_input_types(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return {n.name: [types.get(x, 0) for x in n.input if x] for n in inferred.graph.node
            if n.op_type in HEAVY_OPS}


def test_mixed_precision_puts_heavy_ops_in_half_except_linear_attention(tiny_onnx_paths: dict[str, Path]) -> None:
    model = onnx.load(str(tiny_onnx_paths["dit_decoder"]))
    report = convert_to_mixed_precision(model, "fp16")
    heavy = _heavy_input_types(model)
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    kept = {name for name in heavy if keeps_fp32(name)}
    assert len(kept) == 2 * 24 == len(report.fp32_heavy_nodes), sorted(kept)[:4]
    wrong = {n: t for n, t in heavy.items() if set(t) != ({fp32} if n in kept else {fp16})}
    assert not wrong, f"heavy nodes with unexpected input types: {list(wrong.items())[:5]}"
    assert report.half_nodes == len(heavy) - len(kept)
    # the contract is untouched: same graph inputs and outputs, all FP32/INT64 as before
    original = onnx.load(str(tiny_onnx_paths["dit_decoder"]), load_external_data=False)
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in original.graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output] == \
        [(v.name, v.type.tensor_type.elem_type) for v in original.graph.output]
    onnx.checker.check_model(model)


def test_bf16_conversion_stores_weights_as_bfloat16(tiny_onnx_paths: dict[str, Path]) -> None:
    model = onnx.load(str(tiny_onnx_paths["dit_decoder"]))
    report = convert_to_mixed_precision(model, "bf16")
    by_name = {t.name: t for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.name == "/transformer_blocks.0/attn/to_q/MatMul")
    weight = by_name[gemm.input[1]]
    assert weight.data_type == onnx.TensorProto.BFLOAT16
    assert report.half_initializers > 0 and report.fp32_heavy_nodes
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == gemm.output[0]]
    assert casts and casts[0].attribute[0].i == onnx.TensorProto.FLOAT
    # bf16 values are the fp32 weights rounded to 8 mantissa bits
    original = {t.name: t for t in onnx.load(str(tiny_onnx_paths["dit_decoder"])).graph.initializer}
    source = onnx.numpy_helper.to_array(original[weight.name.rsplit("__", 1)[0]])
    bits = np.frombuffer(weight.raw_data, dtype=np.uint16).astype(np.uint32) << 16
    restored = bits.view(np.float32).reshape(source.shape)
    err = float(np.abs(restored - source).max() / np.abs(source).max())
    assert err <= 2**-8, f"bf16 weight error {err:.3g}"


@pytest.mark.parametrize("name", ["dit_decoder", "dcae_decoder", "vocoder", "condition_encoder"])
def test_fp16_graph_runs_and_matches_torch(name: str, tiny_onnx_paths: dict[str, Path],
                                           tiny_onnx_components: Components, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.fp16.onnx"
    report = write_mixed_precision(tiny_onnx_paths[name], out, "fp16")
    assert report.half_nodes > 0
    graph = export_graph(name, component_sources(tiny_onnx_components)[name])
    inputs = graph.example_inputs(3, 7, seed=1)
    with torch.no_grad():
        reference = graph(*inputs.values())
    reference = reference if isinstance(reference, tuple) else (reference,)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    for got, want in zip(outputs, reference, strict=True):
        want = want.numpy()
        assert got.dtype == want.dtype
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= HALF_RTOL, f"{name}: fp16 graph vs torch fp32, relative error {err:.3g}"


def test_identity_shared_weights_are_read_directly(tiny_onnx_paths: dict[str, Path]) -> None:
    """The exporter deduplicates equal weights through Identity nodes (the vocoder's convs);
    TensorRT needs conv weights as initializers, so the rewrite follows Identity chains."""
    model = onnx.load(str(tiny_onnx_paths["vocoder"]))
    identities = sum(n.op_type == "Identity" for n in model.graph.node)
    convert_to_mixed_precision(model, "fp16")
    initializers = {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and all(n.input[1] in initializers for n in convs)
    assert sum(n.op_type == "Identity" for n in model.graph.node) < identities


def test_text_encoder_stays_fp32_under_fp16() -> None:
    assert component_precision("text_encoder", "fp16") == "fp32"
    assert component_precision("text_encoder", "bf16") == "bf16"
    assert component_precision("dit_decoder", "fp16") == "fp16"
    with pytest.raises(ValueError, match="precision"):
        component_precision("dit_decoder", "int8")


# ------------------------------------------------------------------------------- sidecar
def _meta(**changes: Any) -> EngineMeta:
    fields = {"component": "dit_decoder", "tensorrt": HERE.tensorrt, "gpu": HERE.gpu,
              "compute_capability": HERE.compute_capability, "precision": "bf16", "profile": {},
              "max_batch": 12, "onnx": "dit_decoder.onnx", "onnx_sha256": "0" * 64}
    return EngineMeta(**{**fields, **changes})


def test_sidecar_round_trip_and_check(tmp_path: Path) -> None:
    plan = tmp_path / "dit_decoder.plan"
    plan.write_bytes(b"plan")
    _meta().write(plan)
    assert EngineMeta.read(plan) == _meta()
    assert check_engine(plan, HERE).precision == "bf16"


def test_engine_from_another_tensorrt_or_gpu_is_refused_naming_the_difference(tmp_path: Path) -> None:
    plan = tmp_path / "dit_decoder.plan"
    plan.write_bytes(b"plan")
    _meta(tensorrt="10.3.0", gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0").write(plan)
    with pytest.raises(EngineMismatchError) as info:
        check_engine(plan, HERE)
    message = str(info.value)
    for expected in ("TensorRT 10.3.0 (engine) vs 10.99.1 (here)", "compute capability 8.0 (engine) vs 9.0",
                     "'NVIDIA A100-SXM4-80GB' (engine)", "--precision bf16"):
        assert expected in message, message
    _meta(gpu="NVIDIA H100 PCIe").write(plan)  # same chip family: allowed only when asked
    with pytest.raises(EngineMismatchError, match="H100 PCIe"):
        check_engine(plan, HERE)
    assert check_engine(plan, HERE, strict_gpu_name=False).gpu == "NVIDIA H100 PCIe"


def test_engine_without_sidecar_is_refused(tmp_path: Path) -> None:
    plan = tmp_path / "vocoder.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(EngineMismatchError, match="no sidecar"):
        check_engine(plan, HERE)


# ------------------------------------------------------------------------------- fake TensorRT
class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+"


class _Config:
    def __init__(self) -> None:
        self.pools: dict[Any, int] = {}
        self.profiles: list[dict[str, tuple]] = []
        self.cache: _Cache | None = None
        self.cache_seen: bytes | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _Cache:
        self.cache_seen = bytes(data)
        return _Cache(data)

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        assert self.cache is not None
        return self.cache


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[str] = []
        self.source: str = ""
        self.half_initializers = 0

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(name=self.inputs[i])


class FakeTensorRT:
    """The slice of the ``tensorrt`` API the builder and the runner use, recording every call."""

    DataType = SimpleNamespace(FLOAT="float32", HALF="float16", BF16="bfloat16", INT32="int32",
                               INT64="int64", BOOL="bool", INT8="int8", UINT8="uint8")
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level: int = 2) -> None:
            self.level = level

    def __init__(self, version: str = HERE.tensorrt, parse_ok: bool = True) -> None:
        self.__version__ = version
        self.parse_ok = parse_ok
        self.builds: list[dict[str, Any]] = []

    # builder side
    def Builder(self, logger: Any) -> Any:  # noqa: N802 (the real API's name)
        fake = self

        class Builder:
            def create_network(self, flags: int) -> _Network:
                return _Network(flags)

            def create_builder_config(self) -> _Config:
                return _Config()

            def create_optimization_profile(self) -> _Profile:
                return _Profile()

            def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
                record = {"flags": network.flags, "inputs": network.inputs, "source": network.source,
                          "half_initializers": network.half_initializers, "profile": config.profiles[0],
                          "pools": config.pools, "cache_seen": config.cache_seen,
                          "opt_level": config.builder_optimization_level}
                fake.builds.append(record)
                return json.dumps({"inputs": network.inputs, "outputs": ["velocity"]}).encode()

        return Builder()

    def OnnxParser(self, network: _Network, logger: Any) -> Any:  # noqa: N802
        fake = self

        class Parser:
            num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                model = onnx.load(path, load_external_data=False)
                network.inputs = [v.name for v in model.graph.input]
                network.source = path
                network.half_initializers = sum(t.data_type in (10, 16) for t in model.graph.initializer)
                return fake.parse_ok

            def get_error(self, i: int) -> Any:
                return SimpleNamespace(desc=lambda: "Unsupported ONNX op: FancyOp")

        return Parser()

    # runtime side: an "engine" computing velocity = 2 * latents on CPU memory
    def Runtime(self, logger: Any) -> Any:  # noqa: N802
        fake = self

        class Runtime:
            def deserialize_cuda_engine(self, data: bytes) -> Any:
                return _Engine(fake, json.loads(bytes(data)))

        return Runtime()


class _Engine:
    def __init__(self, trt: FakeTensorRT, layout: dict[str, Any]) -> None:
        self.trt = trt
        self.names = layout["inputs"] + layout["outputs"]
        self.inputs = set(layout["inputs"])
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return self.trt.DataType.FLOAT

    def create_execution_context(self) -> _Context:
        return _Context()


class _Context:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes["latents"]

    def execute_async_v3(self, stream: int) -> bool:
        self.streams.append(stream)
        count = int(np.prod(self.shapes["latents"]))
        source = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["latents"]))
        target = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["velocity"]))
        target[:] = 2.0 * source
        return True


def test_build_engine_uses_strong_typing_profile_and_timing_cache(tiny_onnx_paths: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    fake = FakeTensorRT()
    cache = tmp_path / "timing.cache"
    options = BuildOptions(precision="bf16", max_items=2, timing_cache=cache, workspace_gib=2.0,
                           optimization_level=5)
    plan = tmp_path / "engines" / "dit_decoder.plan"
    meta = build_engine(tiny_onnx_paths["dit_decoder"], plan, "dit_decoder", options=options, runtime=HERE,
                        trt=fake)
    build = fake.builds[0]
    assert build["flags"] == 1 << 5, "the network must be strongly typed (TensorRT 11 has no other kind)"
    assert build["half_initializers"] > 0, "the parser must get the mixed-precision graph"
    assert build["inputs"] == list(specs.DIT_DECODER.input_names)
    sizes = read_onnx_sizes(specs.DIT_DECODER, tiny_onnx_paths["dit_decoder"])
    assert build["profile"] == profile_shapes(specs.DIT_DECODER, sizes, max_items=2)
    assert build["profile"]["latents"][2] == (6, 8, 16, 2583)
    assert build["pools"] == {"workspace": 2 * 2**30} and build["opt_level"] == 5
    assert build["cache_seen"] == b"" and cache.read_bytes() == b"+"
    assert plan.is_file() and EngineMeta.path_for(plan).is_file()
    assert (meta.component, meta.precision, meta.max_batch, meta.tensorrt) == ("dit_decoder", "bf16", 6, "10.99.1")
    assert meta.precision_report["fp32_heavy_nodes"] == 48
    assert EngineMeta.read(plan) == meta
    build_engine(tiny_onnx_paths["dit_decoder"], plan, "dit_decoder", options=options, runtime=HERE, trt=fake)
    assert fake.builds[1]["cache_seen"] == b"+", "the second build must start from the saved timing cache"


def test_fp32_build_parses_the_exported_graph_unchanged(tiny_onnx_paths: dict[str, Path], tmp_path: Path) -> None:
    fake = FakeTensorRT()
    meta = build_engine(tiny_onnx_paths["text_encoder"], tmp_path / "text_encoder.plan", "text_encoder",
                        options=BuildOptions(precision="fp16"), runtime=HERE, trt=fake)
    assert meta.precision == "fp32"
    assert fake.builds[0]["source"] == str(tiny_onnx_paths["text_encoder"])


def test_build_engines_reports_parser_errors_per_component(tiny_onnx_paths: dict[str, Path], tmp_path: Path) -> None:
    onnx_dir = tiny_onnx_paths["vocoder"].parent
    with pytest.raises(EngineBuildError, match=r"vocoder: (.|\n)*Unsupported ONNX op: FancyOp"):
        build_engines(onnx_dir, tmp_path, BuildOptions(precision="fp16"), names=["vocoder"], runtime=HERE,
                      trt=FakeTensorRT(parse_ok=False), progress=False)
    metas = build_engines(onnx_dir, tmp_path, BuildOptions(precision="fp16"), names=["vocoder", "dcae_decoder"],
                          runtime=HERE, trt=FakeTensorRT(), progress=False)
    assert sorted(metas) == ["dcae_decoder", "vocoder"]
    assert (tmp_path / "timing.cache").is_file()


def test_lora_hook_reexports_the_given_module(tiny_onnx_components: Components, tmp_path: Path) -> None:
    """A LoRA-fused transformer is passed as a module: its components are exported from it."""
    fake = FakeTensorRT()
    fused = fused_transformer_modules(tiny_onnx_components.transformer)
    metas = build_engines(None, tmp_path, BuildOptions(precision="bf16", lora="rap-lora@0.8"),
                          names=["dit_decoder"], modules=fused, runtime=HERE, trt=fake, progress=False)
    assert (tmp_path / "onnx" / "dit_decoder.onnx").is_file()
    assert metas["dit_decoder"].lora == "rap-lora@0.8"
    with pytest.raises(ValueError, match="no onnx_dir"):
        build_engines(None, tmp_path, names=["vocoder"], runtime=HERE, trt=fake, progress=False)


def test_runner_feeds_shapes_and_addresses_and_returns_outputs(tiny_onnx_paths: dict[str, Path],
                                                               tmp_path: Path) -> None:
    fake = FakeTensorRT()
    plan = tmp_path / "dit_decoder.plan"
    build_engine(tiny_onnx_paths["dit_decoder"], plan, "dit_decoder", runtime=HERE, trt=fake)
    engine = TensorRTEngine(plan, device="cpu", trt=fake, runtime=HERE)
    assert engine.input_names == list(specs.DIT_DECODER.input_names) and engine.output_names == ["velocity"]
    decoder = TensorRTDecoder(engine)
    latents = torch.randn(2, 8, 16, 5)
    velocity = decoder(latents, torch.ones(2, 5), torch.randn(2, 4, 32), torch.ones(2, 4),
                       torch.tensor([500.0]), torch.ones(24))
    assert torch.equal(velocity, 2 * latents)
    assert engine.context.shapes["query_scale"] == (2, 24), "a shared [L] scale goes in as one row per item"
    assert engine.context.shapes["timestep"] == (2,)


def test_runner_refuses_a_plan_from_another_machine(tiny_onnx_paths: dict[str, Path], tmp_path: Path) -> None:
    fake = FakeTensorRT()
    plan = tmp_path / "dit_decoder.plan"
    build_engine(tiny_onnx_paths["dit_decoder"], plan, "dit_decoder", runtime=HERE, trt=fake)
    elsewhere = RuntimeInfo(tensorrt="11.4.0", gpu=HERE.gpu, compute_capability="9.0")
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.99\.1 \(engine\) vs 11\.4\.0"):
        TensorRTEngine(plan, device="cpu", trt=fake, runtime=elsewhere)


def test_cli_builds_and_checks(tiny_onnx_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(RuntimeInfo, "current", classmethod(lambda cls, trt=None, device=0: HERE))
    onnx_dir = tiny_onnx_paths["dit_decoder"].parent
    code = engine_cli.main(["--onnx-dir", str(onnx_dir), "--out", str(tmp_path), "--precision", "fp16",
                            "--max-batch", "2", "--max-frames", "1000", "--only", "dit_decoder"])
    assert code == 0
    assert fake.builds[0]["profile"]["latents"][2] == (6, 8, 16, 1000)
    assert engine_cli.main(["--check", str(tmp_path)]) == 0
    assert "dit_decoder: ok" in capsys.readouterr().out
    other = RuntimeInfo(tensorrt="10.99.1", gpu="NVIDIA L4", compute_capability="8.9")
    monkeypatch.setattr(RuntimeInfo, "current", classmethod(lambda cls, trt=None, device=0: other))
    assert engine_cli.main(["--check", str(tmp_path)]) == 1
    assert "compute capability 9.0 (engine) vs 8.9 (here)" in capsys.readouterr().err


# ------------------------------------------------------------------------------- CUDA graphs
class EagerGraphs:
    """Stand-in graph backend: "capture" runs the function once; "replay" reruns it into the same
    output tensor (what a CUDA graph replay does, without a GPU)."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, fn: Any, device: torch.device) -> Any:
        self.captures += 1
        output = fn()

        def replay() -> torch.Tensor:
            output.copy_(fn())
            return output

        return replay


def test_graph_decoder_replays_with_new_inputs_and_one_graph_per_shape(
        tiny_onnx_components: Components) -> None:
    transformer = tiny_onnx_components.transformer
    backend = EagerGraphs()
    decoder = CUDAGraphDecoder(transformer, backend=backend)
    graph = export_graph("dit_decoder", transformer)
    outputs = []
    for seed in range(3):  # same shape, new values each time: replays read the static buffers
        with torch.inference_mode():  # inference tensors in, as inside the sampling loop
            inputs = {k: v.clone() for k, v in graph.example_inputs(2, 9, seed=seed).items()}
            got, want = decoder(*inputs.values()), transformer.decode(*inputs.values())
        assert torch.equal(got, want), f"seed {seed}: {float((got - want).abs().max()):.3g}"
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1]), "each call must return its own result, not the buffer"
    inputs = graph.example_inputs(1, 5, seed=0)
    with torch.inference_mode():
        assert torch.equal(decoder(*inputs.values()), transformer.decode(*inputs.values()))
    assert backend.captures == 2 and len(decoder.captured_shapes) == 2


def test_graph_decoder_never_builds_rope_tables_while_capturing(tiny_onnx_components: Components,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``rope_tables`` copies a constant from the host, which a CUDA graph cannot capture: the
    decoder must hand precomputed tables to the model instead."""
    from acestep_triton.models import transformer as transformer_module

    def host_copy(*args: Any) -> Any:
        raise AssertionError("rope_tables called during capture/replay")

    monkeypatch.setattr(transformer_module, "rope_tables", host_copy)
    transformer = tiny_onnx_components.transformer
    decoder = CUDAGraphDecoder(transformer, backend=EagerGraphs())
    inputs = export_graph("dit_decoder", transformer).example_inputs(2, 6, seed=3)
    with torch.inference_mode():
        got = decoder(*inputs.values())
        monkeypatch.undo()
        want = transformer.decode(*inputs.values())
    assert torch.equal(got, want)


class ForgetfulGraphs(EagerGraphs):
    """Like ``TorchCUDAGraphs``, keeps only the graph's output after capture, not the function."""

    def capture(self, fn: Any, device: torch.device) -> Any:
        output = fn()
        return lambda: output


def test_graph_decoder_keeps_tensors_the_graph_reads_alive(tiny_onnx_components: Components,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph reads the RoPE tables by address; if they were freed, their memory would be
    reused and replays would read garbage."""
    import gc
    import weakref

    from acestep_triton import gpu

    made: list[weakref.ref] = []
    original = gpu.rope_tables_for

    def tracked(*args: Any) -> Any:
        tables = original(*args)
        made.extend(weakref.ref(t) for pair in tables.values() for t in pair)
        return tables

    monkeypatch.setattr(gpu, "rope_tables_for", tracked)
    transformer = tiny_onnx_components.transformer
    decoder = CUDAGraphDecoder(transformer, backend=ForgetfulGraphs())
    with torch.inference_mode():
        decoder(*export_graph("dit_decoder", transformer).example_inputs(1, 4, seed=0).values())
    gc.collect()
    assert made and all(ref() is not None for ref in made), "RoPE tables were freed after capture"


def test_static_rope_refuses_unknown_lengths() -> None:
    with static_rope({}), pytest.raises(KeyError, match="no table for 7 positions"):
        from acestep_triton.models import transformer as transformer_module

        transformer_module.rope_tables(torch.arange(7), 16, 1e6)


def test_graph_decoder_falls_back_to_eager_beyond_max_graphs(tiny_onnx_components: Components) -> None:
    transformer = tiny_onnx_components.transformer
    decoder = CUDAGraphDecoder(transformer, backend=EagerGraphs(), max_graphs=1)
    graph = export_graph("dit_decoder", transformer)
    with torch.inference_mode():
        for batch, length in ((1, 4), (2, 4)):
            inputs = graph.example_inputs(batch, length, seed=0)
            assert torch.equal(decoder(*inputs.values()), transformer.decode(*inputs.values()))
    assert len(decoder.captured_shapes) == 1 and decoder.eager_calls == 1


def test_graph_backend_routes_only_predict_velocity(tiny_onnx_components: Components) -> None:
    from acestep_triton.pipeline import TorchBackend

    inner = TorchBackend(tiny_onnx_components)
    backend = GraphedBackend(inner, decoder=CUDAGraphDecoder(inner.c.transformer, backend=EagerGraphs()))
    assert (backend.dit_layers, backend.text_layers) == (inner.dit_layers, inner.text_layers)
    inputs = export_graph("dit_decoder", inner.c.transformer).example_inputs(2, 3, seed=0)
    mel = export_graph("vocoder", inner.c.vocoder).example_inputs(1, 5, seed=0)["mel"]
    with torch.inference_mode():
        assert torch.equal(backend.vocode(mel), inner.vocode(mel))  # passed through, no graph
        assert not backend.decoder.captured_shapes
        assert torch.equal(backend.predict_velocity(*inputs.values()), inner.predict_velocity(*inputs.values()))
    assert len(backend.decoder.captured_shapes) == 1


# ------------------------------------------------------------------------------- full-size random
def test_official_configs_are_the_published_sizes() -> None:
    from acestep_triton.models.transformer import ACEStepTransformer

    assert (TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_attention_heads"],
            TRANSFORMER_CONFIG["attention_head_dim"]) == (24, 20, 128)
    assert (TEXT_ENCODER_CONFIG["d_model"], TEXT_ENCODER_CONFIG["num_layers"], TEXT_ENCODER_CONFIG["num_heads"],
            TEXT_ENCODER_CONFIG["vocab_size"]) == (768, 12, 12, 256384)
    assert DCAE_CONFIG["decoder_block_out_channels"] == [128, 256, 512, 1024]
    assert (DCAE_CONFIG["encoder_layers_per_block"], DCAE_CONFIG["decoder_layers_per_block"]) == \
        ([2, 2, 3, 3], [3, 3, 3, 3])
    assert VOCODER_CONFIG["upsample_rates"] == [4, 4, 2, 2, 2, 2, 2] and VOCODER_CONFIG["num_mels"] == 512
    with torch.device("meta"):
        model = ACEStepTransformer.from_config(TRANSFORMER_CONFIG)
    assert model.config.inner_dim == 2560 and model.config.ff_hidden == 6400
    count = sum(p.numel() for p in model.parameters())
    # 3.5B as published, minus the ~0.63B of unused cross-attention "add" projections and the
    # training-only REPA projectors, which the model does not build.
    assert 2.5e9 < count < 2.7e9, f"DiT parameters: {count / 1e9:.3f} B"


def _small_configs() -> FullSizeConfigs:
    text = {k: v for k, v in tiny_text_encoder_config(0).items() if k != "vocab_size"}
    return FullSizeConfigs(tiny_transformer_config(), tiny_dcae_config(), tiny_vocoder_config(), text)


def test_random_checkpoint_has_the_official_layout_and_loads_strictly(tmp_path: Path) -> None:
    path = write_full_random_checkpoint(tmp_path / "a", layers=3, configs=_small_configs(), seed=1)
    components = load_components(path)
    assert components.transformer.num_layers == 3
    assert components.configs["ace_step_transformer"]["num_layers"] == 3
    ids, mask = components.text_tokenizer(["pop, guitar"])
    with torch.no_grad():
        states = components.text_encoder(ids, mask)
    assert torch.isfinite(states).all()
    again = write_full_random_checkpoint(tmp_path / "b", layers=3, configs=_small_configs(), seed=1)
    weights = "ace_step_transformer/diffusion_pytorch_model.safetensors"
    assert (path / weights).read_bytes() == (again / weights).read_bytes(), "same seed, same bytes"


def test_in_memory_models_are_built_on_the_device_in_the_dtype() -> None:
    models = build_random_models("cpu", torch.bfloat16, layers=2, configs=_small_configs(),
                                 parts=("transformer", "vocoder"))
    assert models.transformer.num_layers == 2 and models.dcae_decoder is None
    assert {p.dtype for p in models.transformer.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in models.vocoder.parameters())
    assert not any(name.endswith("weight_g") for name, _ in models.vocoder.named_parameters()), "folded"
    assert all(p.any() for p in models.transformer.parameters() if p.ndim >= 2), "no all-zero matrices"
    with pytest.raises(ValueError, match="unknown parts"):
        build_random_models("cpu", parts=("unet",))

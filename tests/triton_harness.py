"""Helpers for tests that need a real tritonserver: tiny ONNX models, a rendered repository, a server.

The server comes from the nvidia-pytriton wheel (see ../shared/TRITON_ON_CPU.md); tests start
one per session through :func:`start_server` and must stop it in a ``finally``. Repositories
are always rendered with :func:`acestep_triton.export.repository.render_repository`, the same code
production uses, never written by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from acestep_triton.export.model_configs import OrchestratorSpec
from acestep_triton.export.repository import render_repository
from acestep_triton.export.specs import COMPONENTS, ComponentSpec, TensorSpec
from acestep_triton.serving.server import TritonInstall, TritonServer, TritonServerError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAKE_ENDPOINT = "fake_text2music"

LINEAR = ComponentSpec(  # batchable like the contract: max_batch_size > 0, dynamic batching, and a
    name="tiny_linear",  # [B]-only input (like timestep) that travels as [B, 1]
    inputs=(TensorSpec("x", "FP32", ("B", 4)), TensorSpec("t", "FP32", ("B",))),
    outputs=(TensorSpec("y", "FP32", ("B", 3)),),
)
SCALED = ComponentSpec(  # a per-call input (like query_scale): rendered with max_batch_size 0
    name="tiny_scaled",
    inputs=(TensorSpec("x", "FP32", ("B", "T", 4)), TensorSpec("scale", "FP32", ("Lt",))),
    outputs=(TensorSpec("y", "FP32", ("B", "T", 3)),),
)


def linear_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def make_linear_onnx(path: Path, spec: ComponentSpec, *, scaled: bool = False,
                     external_data: bool = False, seed: int = 0) -> Path:
    """``y = x @ W + b`` (+ ``t`` per row when the spec has ``t``, times ``scale`` when ``scaled``)
    as an ONNX file named after ``spec``.

    Built with ``onnx.helper`` (instant, no exporter involved); dynamic dims carry the spec's
    symbols. ``external_data`` stores the weights beside the model, as big exports do.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = linear_weights(seed)
    shifted = "t" in spec.input_names
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["lin"])]
    if shifted:  # y = lin + t[:, None]
        nodes += [helper.make_node("Unsqueeze", ["t", "axis1"], ["t_col"]),
                  helper.make_node("Add", ["lin", "t_col"], ["lin_t"])]
    last = "lin_t" if shifted else "lin"
    nodes.append(helper.make_node("Mul", [last, "scale"], ["y"]) if scaled
                 else helper.make_node("Identity", [last], ["y"]))

    def value(t: TensorSpec) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))

    weights = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
               numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    graph = helper.make_graph(nodes, spec.name, [value(t) for t in spec.inputs],
                              [value(t) for t in spec.outputs], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def make_contract_onnx(path: Path, spec: ComponentSpec, sizes: dict[str, int]) -> Path:
    """A loadable stand-in for a real component export: the contract's inputs and outputs
    (checkpoint symbols fixed to ``sizes``, the rest dynamic), each output a constant.
    It lets the rendered component configs load in a real server without a checkpoint."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    types = {"FP32": TensorProto.FLOAT, "INT64": TensorProto.INT64}

    def shape(t: TensorSpec) -> list[int | str]:
        return [sizes.get(d, d) if isinstance(d, str) else d for d in t.shape]

    inputs = [helper.make_tensor_value_info(t.name, types[t.dtype], shape(t)) for t in spec.inputs]
    outputs = [helper.make_tensor_value_info(t.name, types[t.dtype], shape(t)) for t in spec.outputs]
    consts = [numpy_helper.from_array(np.zeros([d if isinstance(d, int) else 1 for d in shape(t)],
                                               np.float32), f"{t.name}_const") for t in spec.outputs]
    nodes = [helper.make_node("Identity", [f"{t.name}_const"], [t.name]) for t in spec.outputs]
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def fake_endpoint(step_delay_s: float = 0.0, name: str = FAKE_ENDPOINT) -> OrchestratorSpec:
    """The test-only endpoint (tests/fixtures/fake_endpoint) rendered like a real one."""
    return OrchestratorSpec(name=name, source=FIXTURES / "fake_endpoint", task="text2music",
                            parameters={"step_delay_s": str(step_delay_s)})


def build_test_repository(root: Path, *, contract_sizes: dict[str, int] | None = None,
                          step_delay_s: float = 0.02) -> Path:
    """Render the test repository into ``root/repo`` (ONNX files in ``root/onnx``).

    Models: ``tiny_linear`` (batchable), ``tiny_scaled`` (per-call input, external weights),
    the fake endpoint, and - when ``contract_sizes`` is given - the six contract components as
    constant stand-ins, so the real rendered configs are loaded by the server.
    """
    onnx_dir = root / "onnx"
    make_linear_onnx(onnx_dir / f"{LINEAR.name}.onnx", LINEAR)
    make_linear_onnx(onnx_dir / f"{SCALED.name}.onnx", SCALED, scaled=True, external_data=True)
    components: list[ComponentSpec] = [LINEAR, SCALED]
    if contract_sizes is not None:
        for spec in COMPONENTS.values():
            make_contract_onnx(onnx_dir / f"{spec.name}.onnx", spec, contract_sizes)
        components += list(COMPONENTS.values())
    return render_repository(root / "repo", "cpu", onnx_dir, [fake_endpoint(step_delay_s)],
                             components=components, max_items=8, max_queue_delay_us=20_000,
                             intra_op_threads=1)


def require_tritonserver() -> TritonInstall:
    """The installed tritonserver, or skip: serving is an optional extra (``[serve]``)."""
    try:
        return TritonInstall.locate()
    except TritonServerError as exc:
        pytest.skip(f"tritonserver not installed: {exc}")


@contextlib.contextmanager
def running_server(repository: Path, log_path: Path | None = None,
                   extra_args: Sequence[str] = ()) -> Iterator[TritonServer]:
    """A started server on free ports, always stopped on exit (also when the body raises)."""
    server = TritonServer(repository, log_path=log_path, startup_timeout=180, stop_timeout=20,
                          install=require_tritonserver(), extra_args=extra_args)
    try:
        server.start()
        yield server
    finally:
        server.stop()

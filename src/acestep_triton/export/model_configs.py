"""What each served model's ``config.pbtxt`` says: the six components and the task endpoints.

Nobody writes a ``config.pbtxt`` by hand: component configs come from the contract in
:mod:`acestep_triton.export.specs`, endpoint (orchestrator) configs from
``ensemble_configs/<task>.json`` (:class:`OrchestratorSpec`) plus the request schema in
:mod:`acestep_client.params`; both are :class:`~acestep_triton.export.triton_config.ModelConfigSpec`
values that :mod:`acestep_triton.export.repository` writes into a repository.

A repository is rendered for a *target* and a *runtime* of its components:

* target ``cpu`` (tests, the embedded demo): runtime ``onnx`` (default), a Python-backend model
  running the exported ONNX file with onnxruntime (``model_repository/onnx_component``), because
  no onnxruntime/TensorRT backend runs on a pip-installed CPU tritonserver; or ``torch``;
* target ``gpu`` (production, NGC image): runtime ``torch`` (default), a Python-backend model
  (``model_repository/torch_component``) on ``KIND_GPU`` instances running the checkpoint's own
  torch modules, with TorchInductor-compiled DiT blocks and one CUDA graph per shape bucket; or
  ``tensorrt``, a ``tensorrt_plan`` model serving an engine built on the target GPU
  (:mod:`acestep_triton.export.engine_build`). ``torch`` is the gpu default because it is the
  runtime measured fastest on a GPU (3.2x eager in-process on an H200,
  ``benchmarks/RESULTS.md``), while no TensorRT engine has been built on hardware yet.

Every target and runtime gives a component the same name, tensor names, dtypes and shapes, so the
endpoints (identical for all of them) cannot tell them apart. On the gpu target the endpoints
sample on their GPU too (``sampling_device: cuda``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from acestep_client.params import MAX_BATCH, GenerationParams
from acestep_triton.export.project_files import default_endpoints_dir
from acestep_triton.export.specs import SAMPLING_DEVICES, ComponentSpec, TensorSpec
from acestep_triton.export.triton_config import DynamicBatching, ModelConfigSpec, QueuePolicy, TensorConfig

TARGETS = ("cpu", "gpu")
RUNTIMES: dict[str, tuple[str, ...]] = {"cpu": ("onnx", "torch"), "gpu": ("torch", "tensorrt")}
"""Component runtimes each target can render; the first is the target's default."""
FORCE_CPU_ONLY_INPUT_TENSORS = "FORCE_CPU_ONLY_INPUT_TENSORS"
"""The Python backend's own config parameter: ``no`` hands a model its inputs where they lie (a
GPU tensor stays on the GPU); its default ``yes`` copies every input to the host first."""
DEFAULT_MAX_ITEMS = MAX_BATCH
"""Songs per request the components are sized for (the schema's largest ``batch_size``); a
component's ``max_batch_size`` is this times its ``rows_per_item``."""


# ------------------------------------------------------------------------------- components
def _tensor_config(t: TensorSpec, sizes: Mapping[str, int], batched: bool) -> TensorConfig:
    dims = t.resolve(sizes)
    if batched:
        dims = dims[1:]
        if not dims:  # a [B] tensor: Triton wants dims [1] and a reshape to a scalar per item
            return TensorConfig(t.name, t.dtype, (1,), t.optional, reshape=())
    return TensorConfig(t.name, t.dtype, dims, t.optional)


def check_runtime(target: str, runtime: str | None) -> str:
    """``runtime`` checked against ``target`` (None: the target's default)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if runtime is None:
        return RUNTIMES[target][0]
    if runtime not in RUNTIMES[target]:
        raise ValueError(f"runtime {runtime!r} is not available for target {target!r} "
                         f"(choose {' or '.join(RUNTIMES[target])})")
    return runtime


def component_config(spec: ComponentSpec, target: str = "cpu", *, sizes: Mapping[str, int] | None = None,
                     max_items: int = DEFAULT_MAX_ITEMS, instance_count: int = 1,
                     gpus: Sequence[int] = (), max_queue_delay_us: int = 1000,
                     intra_op_threads: int = 0, inter_op_threads: int = 0, runtime: str | None = None,
                     batching: DynamicBatching | None = None,
                     parameters: Mapping[str, str] | None = None) -> ModelConfigSpec:
    """A component's config for ``target`` and ``runtime``: identical tensors everywhere.

    Batchable components (every tensor leads with B) get ``max_batch_size`` =
    ``spec.max_batch(max_items)`` and dynamic batching (``batching``, default: no preferred
    sizes and ``max_queue_delay_us``); the others keep B as an explicit ``-1`` dim with
    ``max_batch_size: 0`` (the caller already batches CFG branches and items into one call).
    ``max_items=0`` turns Triton batching off everywhere. ``parameters`` are added to the
    runtime's own (the torch runtime needs ``component`` and ``checkpoint_dir`` there).
    """
    runtime = check_runtime(target, runtime)
    max_batch_size = spec.max_batch(max_items)
    batched = spec.batchable and max_batch_size > 0
    sizes = sizes or {}
    common: dict[str, Any] = {
        "name": spec.name,
        "inputs": tuple(_tensor_config(t, sizes, batched) for t in spec.inputs),
        "outputs": tuple(_tensor_config(t, sizes, batched) for t in spec.outputs),
        "max_batch_size": max_batch_size if batched else 0,
        "instance_count": instance_count,
        "dynamic_batching": (batching or DynamicBatching(max_queue_delay_us)) if batched else None,
    }
    if runtime == "torch":
        on_gpu = target == "gpu"
        # The Python backend copies every input to the host unless told otherwise; the endpoints
        # send GPU tensors, so on a GPU that would be a device→host→device trip per DiT call.
        device_inputs = {FORCE_CPU_ONLY_INPUT_TENSORS: "no"} if on_gpu else {}
        return ModelConfigSpec(backend="python", instance_kind="KIND_GPU" if on_gpu else "KIND_CPU",
                               instance_gpus=tuple(gpus) if on_gpu else (),
                               parameters={"component": spec.name, "precision": "auto", "compile": "auto",
                                           "cuda_graphs": "auto",
                                           # shapes run at load, before ready (torch_runtime.RuntimeOptions)
                                           "warmup": "auto",
                                           "torch_threads": str(intra_op_threads),
                                           **device_inputs, **(parameters or {})},
                               **common)
    if target == "cpu":
        return ModelConfigSpec(backend="python", instance_kind="KIND_CPU",
                               parameters={"onnx_file": "model.onnx",
                                           "intra_op_threads": str(intra_op_threads),
                                           "inter_op_threads": str(inter_op_threads)},
                               **common)
    return ModelConfigSpec(platform="tensorrt_plan", instance_kind="KIND_GPU", instance_gpus=tuple(gpus),
                           default_model_filename="model.plan", **common)


def checkpoint_sizes(ckpt_dir: str | Path) -> dict[str, int]:
    """The checkpoint-fixed contract sizes (``Ct``, ``D``, ``Lt``, ``Ll``, ``Ld``) from a
    checkpoint's (or an assets folder's) config files: what the torch runtime renders with,
    having no ONNX file to read them from."""
    # Function-local: these modules import torch (heavy), which rendering the onnx or tensorrt
    # runtime never needs.
    from acestep_triton.checkpoint import TEXT_ENCODER_DIR, TRANSFORMER_DIR, CheckpointLayout
    from acestep_triton.models.transformer import TransformerConfig

    layout = CheckpointLayout(Path(ckpt_dir))
    transformer = TransformerConfig.from_dict(layout.read_config(TRANSFORMER_DIR))
    text = layout.read_config(TEXT_ENCODER_DIR)
    return {"Ct": int(text["d_model"]), "Lt": int(text["num_layers"]), "D": transformer.inner_dim,
            "Ll": int(transformer.lyric_encoder_num_blocks), "Ld": int(transformer.num_layers)}



# ------------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class OrchestratorSpec:
    """One endpoint: a decoupled Python-backend model streaming progress then the audio.

    Inputs are one optional ``[1]`` tensor per wire field of the request schema, plus
    ``extra_inputs`` for task data that is not a scalar field (e.g. reference audio).
    ``parameters`` reach the model as config parameters; ``{assets}`` in a value is replaced
    by the assets folder given to the renderer (checkpoint, vocab).
    """

    name: str
    source: str | Path
    task: str
    description: str = ""
    instance_count: int = 1
    extra_inputs: tuple[TensorConfig, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)
    queue: QueuePolicy | None = None
    """Admission to the endpoint's queue (JSON ``"queue": {"max_queue_size", "timeout_s"}``)."""

    @classmethod
    def from_json(cls, path: Path) -> OrchestratorSpec:
        """Read an endpoint definition (``ensemble_configs/<task>.json``)."""
        data = json.loads(Path(path).read_text())
        known = {"name", "source", "task", "description", "instance_count", "extra_inputs", "parameters",
                 "queue"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
        extra = tuple(TensorConfig(name=e["name"], data_type=e["data_type"], dims=tuple(e["dims"]),
                                   optional=bool(e.get("optional", True)))
                      for e in data.get("extra_inputs", []))
        parameters = {str(k): str(v) for k, v in data.get("parameters", {}).items()}
        return cls(name=data["name"], source=data.get("source", data["name"]),
                   task=data.get("task", data["name"]), description=data.get("description", ""),
                   instance_count=int(data.get("instance_count", 1)), extra_inputs=extra,
                   parameters=parameters,
                   queue=QueuePolicy.from_json(data["queue"], str(path)) if "queue" in data else None)


ORCHESTRATOR_OUTPUTS = (
    TensorConfig("progress", "INT32", (2,)),
    TensorConfig("audio", "FP32", (-1, 2, -1)),
    TensorConfig("sample_rate", "INT32", (1,)),
    TensorConfig("params_json", "BYTES", (1,)),
)
"""What every endpoint streams: ``progress`` (step, total) responses, then audio + parameters."""


def orchestrator_config(spec: OrchestratorSpec, assets: Path | None = None, target: str = "cpu",
                        gpus: Sequence[int] = ()) -> ModelConfigSpec:
    """An endpoint's config. On the ``gpu`` target its instances are ``KIND_GPU`` and sample on
    their GPU (``sampling_device: cuda``), beside the components they call (whatever their
    runtime); an endpoint definition may still set ``sampling_device`` itself."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")

    wire = tuple(TensorConfig(s.name, s.triton_dtype, (1,), optional=True)
                 for s in GenerationParams.wire_specs())
    clashes = {t.name for t in wire} & {t.name for t in spec.extra_inputs}
    if clashes:
        raise ValueError(f"{spec.name}: extra_inputs {sorted(clashes)} clash with schema fields")
    parameters = {"task": spec.task, "sampling_device": "cuda" if target == "gpu" else "cpu"}
    for key, value in spec.parameters.items():
        if "{assets}" in value:
            if assets is None:
                raise ValueError(f"{spec.name}: parameter {key!r} needs the assets folder (--assets)")
            value = value.replace("{assets}", str(Path(assets).resolve()))
        parameters[key] = value
    if parameters["sampling_device"] not in SAMPLING_DEVICES:
        raise ValueError(f"{spec.name}: parameter sampling_device must be 'cpu' or 'cuda', "
                         f"got {parameters['sampling_device']!r}")
    return ModelConfigSpec(name=spec.name, backend="python", max_batch_size=0,
                           inputs=wire + spec.extra_inputs, outputs=ORCHESTRATOR_OUTPUTS,
                           instance_kind="KIND_GPU" if parameters["sampling_device"] == "cuda" else "KIND_CPU",
                           instance_gpus=tuple(gpus) if parameters["sampling_device"] == "cuda" else (),
                           instance_count=spec.instance_count, decoupled=True, parameters=parameters,
                           queue_policy=spec.queue)


def load_endpoints(names: Sequence[str] | None = None,
                   endpoints_dir: str | Path | None = None) -> list[OrchestratorSpec]:
    """Endpoint definitions from ``endpoints_dir`` (all of them when ``names`` is None).

    ``endpoints_dir`` defaults to the project's ``ensemble_configs/``
    (:func:`~acestep_triton.export.project_files.default_endpoints_dir`), looked up only when a
    definition is read, so ``names=[]`` (endpoints left out) needs no project folder.
    """
    if names is not None and not names:
        return []
    folder = Path(endpoints_dir) if endpoints_dir is not None else default_endpoints_dir()
    paths = sorted(folder.glob("*.json")) if names is None else [folder / f"{n}.json" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"endpoint definitions not found: {missing}")
    return [OrchestratorSpec.from_json(p) for p in paths]


def with_endpoint_instances(orchestrators: Sequence[OrchestratorSpec],
                            instances: int | Mapping[str, int] | None) -> list[OrchestratorSpec]:
    """``orchestrators`` with their instance counts overridden (parsed by
    :func:`~acestep_triton.export.render_cli.parse_endpoint_instances`);
    a name that is not among them is an error, not a silently ignored typo."""
    if instances is None:
        return list(orchestrators)
    if isinstance(instances, int):
        if instances < 1:
            raise ValueError(f"--endpoint-instances: the count must be >= 1, got {instances}")
        return [replace(o, instance_count=instances) for o in orchestrators]
    names = {o.name for o in orchestrators}
    unknown = sorted(set(instances) - names)
    if unknown:
        raise ValueError(f"--endpoint-instances names endpoints that are not rendered: {unknown} "
                         f"(rendered: {sorted(names) or 'none'})")
    return [replace(o, instance_count=instances[o.name]) if o.name in instances else o for o in orchestrators]

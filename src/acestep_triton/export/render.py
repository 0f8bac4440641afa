"""The one ``config.pbtxt`` renderer and model-repository writer.

Nobody writes a ``config.pbtxt`` by hand: component configs come from the contract in
:mod:`acestep_triton.export.specs`, endpoint (orchestrator) configs from
``ensemble_configs/<task>.json`` plus the request schema in :mod:`acestep_client.params`.
A repository is rendered for a *target*:

* ``cpu`` (tests, the embedded demo): each component is a Python-backend model running its ONNX
  file with onnxruntime (``model_repository/onnx_component``), because no onnxruntime/TensorRT
  backend runs on a pip-installed CPU tritonserver;
* ``gpu`` (production, NGC image): each component is a ``tensorrt_plan`` model on GPU instances.

and for a *runtime* of its components: ``onnx`` (cpu only, the above), ``tensorrt`` (gpu only,
the above) or ``torch`` (either target): a Python-backend model (``model_repository/
torch_component``) running the checkpoint's own torch modules on the instance's device, with
TorchInductor-compiled DiT blocks and CUDA graphs per shape bucket on a GPU. The gpu default is
``torch``: it is the runtime measured fastest on a GPU (3.2x eager in-process on an H200,
``benchmarks/RESULTS.md``), while no TensorRT engine has been built on hardware yet.

Every target and runtime gives a component the same name, tensor names, dtypes and shapes, so the
orchestrators (identical on both) cannot tell them apart. Every rendered text is parsed with
Triton's own ``ModelConfig`` protobuf before it is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from acestep_client.params import MAX_BATCH
from acestep_triton.export.engine_meta import EngineMeta
from acestep_triton.export.specs import (  # read_onnx_sizes re-exported: its old home
    COMPONENTS,
    SAMPLING_DEVICES,
    TRITON_DTYPES,
    ComponentSpec,
    TensorSpec,
    component,
    read_onnx_sizes,
)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
SOURCES_ROOT = PROJECT_ROOT / "model_repository"
"""Python-backend model sources (``<source>/model.py``); copied into ``<name>/1/``."""
ENDPOINTS_DIR = PROJECT_ROOT / "ensemble_configs"
"""One endpoint definition per task (``<task>.json``)."""
ONNX_COMPONENT_SOURCE = "onnx_component"
TORCH_COMPONENT_SOURCE = "torch_component"
RENDER_MARKER = ".acestep-rendered"
"""Written into every rendered repository; only such a folder is ever cleared by a re-render."""
TARGETS = ("cpu", "gpu")
RUNTIMES: dict[str, tuple[str, ...]] = {"cpu": ("onnx", "torch"), "gpu": ("torch", "tensorrt")}
"""Component runtimes each target can render; the first is the target's default."""
FORCE_CPU_ONLY_INPUT_TENSORS = "FORCE_CPU_ONLY_INPUT_TENSORS"
"""The Python backend's own config parameter: ``no`` hands a model its inputs where they lie (a
GPU tensor stays on the GPU); its default ``yes`` copies every input to the host first."""
DEFAULT_MAX_ITEMS = MAX_BATCH
"""Songs per request the components are sized for (the schema's largest ``batch_size``); a
component's ``max_batch_size`` is this times its ``rows_per_item``."""


# ------------------------------------------------------------------------------- config model
@dataclass(frozen=True)
class TensorConfig:
    """One ``input``/``output`` entry as written: dims exclude the batch dim when batching."""

    name: str
    data_type: str  # Triton dtype without TYPE_ ("BYTES" is written TYPE_STRING)
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.data_type not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unknown Triton dtype {self.data_type!r}")
        if not self.dims:
            raise ValueError(f"{self.name}: Triton needs at least one dim (use [1] + reshape [])")


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``default_queue_policy``: how many requests may wait for a free instance and for
    how long. Past either, Triton refuses the request at once ("Exceeds maximum queue size",
    "Request timeout expired") instead of letting a burst pile up into client timeouts.

    Rendered as ``dynamic_batching { default_queue_policy { ... } }``, which tritonserver 2.51
    accepts (and enforces) on a ``max_batch_size: 0`` decoupled Python model too: it then only
    queues, it never merges requests. 0 means unlimited for both numbers.
    """

    max_queue_size: int = 0
    timeout_us: int = 0
    """Longest wait in the queue (microseconds); then ``timeout_action``."""
    timeout_action: str = "REJECT"

    def __post_init__(self) -> None:
        if self.max_queue_size < 0 or self.timeout_us < 0:
            raise ValueError("queue policy: max_queue_size and timeout_us must be >= 0")
        if self.timeout_action not in ("REJECT", "DELAY"):
            raise ValueError(f"queue policy: timeout_action must be REJECT or DELAY, got {self.timeout_action!r}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> QueuePolicy:
        """``{"max_queue_size": 8, "timeout_s": 120}`` (an endpoint definition's ``queue``)."""
        known = {"max_queue_size", "timeout_s", "timeout_action"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown queue keys {unknown} (known: {sorted(known)})")
        return cls(max_queue_size=int(data.get("max_queue_size", 0)),
                   timeout_us=round(float(data.get("timeout_s", 0)) * 1_000_000),
                   timeout_action=str(data.get("timeout_action", "REJECT")))


@dataclass(frozen=True)
class ModelConfigSpec:
    """Everything our configs say; :func:`render_config` turns it into ``config.pbtxt`` text."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None
    platform: str | None = None
    max_batch_size: int = 0
    instance_kind: str = "KIND_CPU"
    instance_count: int = 1
    instance_gpus: tuple[int, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    decoupled: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None
    queue_policy: QueuePolicy | None = None
    """Allowed without batching (``max_batch_size: 0``): see :class:`QueuePolicy`."""

    def __post_init__(self) -> None:
        if (self.backend is None) == (self.platform is None):
            raise ValueError(f"{self.name}: give exactly one of backend or platform")
        if self.max_batch_size < 0 or self.instance_count < 1:
            raise ValueError(f"{self.name}: max_batch_size must be >= 0 and instance_count >= 1")
        if self.dynamic_batching is not None and self.max_batch_size == 0:
            # Triton silently drops dynamic_batching when max_batch_size is 0 (seen on 2.51):
            # refuse it here so a config never claims batching it does not get.
            raise ValueError(f"{self.name}: dynamic batching needs max_batch_size > 0")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU", "KIND_MODEL", "KIND_AUTO"):
            raise ValueError(f"{self.name}: unknown instance kind {self.instance_kind!r}")
        names = [t.name for t in self.inputs + self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{self.name}: duplicate tensor names {dupes}")


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _ints(values: Iterable[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _render_tensors(key: str, tensors: Sequence[TensorConfig]) -> list[str]:
    if not tensors:
        return []
    blocks = []
    for t in tensors:
        lines = [f"    name: {_quote(t.name)}",
                 f"    data_type: TYPE_{'STRING' if t.data_type == 'BYTES' else t.data_type}",
                 f"    dims: {_ints(t.dims)}"]
        if t.reshape is not None:
            lines.append(f"    reshape: {{ shape: {_ints(t.reshape)} }}")
        if t.optional:
            lines.append("    optional: true")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return [f"{key} [\n" + ",\n".join(blocks) + "\n]"]


def render_config(model: ModelConfigSpec, *, comment: str | None = None) -> str:
    """The ``config.pbtxt`` text for ``model`` (checked with :func:`check_config`)."""
    out = [f"# {line}" for line in (comment or "Rendered by acestep_triton.export.render; "
                                                "edit the specs and re-render.").splitlines()]
    out.append(f"name: {_quote(model.name)}")
    if model.backend is not None:
        out.append(f"backend: {_quote(model.backend)}")
    else:
        out.append(f"platform: {_quote(str(model.platform))}")
    if model.default_model_filename:
        out.append(f"default_model_filename: {_quote(model.default_model_filename)}")
    out.append(f"max_batch_size: {model.max_batch_size}")
    out += _render_tensors("input", model.inputs)
    out += _render_tensors("output", model.outputs)
    group = [f"    kind: {model.instance_kind}", f"    count: {model.instance_count}"]
    if model.instance_gpus:
        group.append(f"    gpus: {_ints(model.instance_gpus)}")
    out.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    if model.dynamic_batching is not None or model.queue_policy is not None:
        db = model.dynamic_batching
        lines = []
        if db is not None and db.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_ints(db.preferred_batch_sizes)}")
        if db is not None:
            lines.append(f"  max_queue_delay_microseconds: {db.max_queue_delay_us}")
        if model.queue_policy is not None:
            qp = model.queue_policy
            lines.append(f"  default_queue_policy {{\n    timeout_action: {qp.timeout_action}\n"
                         f"    default_timeout_microseconds: {qp.timeout_us}\n"
                         f"    max_queue_size: {qp.max_queue_size}\n  }}")
        out.append("dynamic_batching {\n" + "\n".join(lines) + "\n}")
    if model.decoupled:
        out.append("model_transaction_policy {\n  decoupled: true\n}")
    if model.parameters:
        entries = [f"  {{\n    key: {_quote(k)}\n    value: {{ string_value: {_quote(str(v))} }}\n  }}"
                   for k, v in model.parameters.items()]
        out.append("parameters [\n" + ",\n".join(entries) + "\n]")
    text = "\n".join(out) + "\n"
    check_config(text)
    return text


def check_config(text: str) -> Any:
    """Parse ``text`` with Triton's ``ModelConfig`` protobuf; raise ``ValueError`` on any error.

    Returns the parsed message, so tests can compare what Triton will read with what was meant.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid config.pbtxt: {exc}") from exc
    if not config.name:
        raise ValueError("invalid config.pbtxt: no model name")
    if bool(config.backend) == bool(config.platform):
        raise ValueError(f"invalid config.pbtxt for {config.name}: needs exactly one of backend/platform")
    return config


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
    from acestep_triton.checkpoint import TEXT_ENCODER_DIR, TRANSFORMER_DIR, CheckpointLayout
    from acestep_triton.models.text_encoder import read_text_encoder_config
    from acestep_triton.models.transformer import TransformerConfig

    layout = CheckpointLayout(Path(ckpt_dir))
    transformer = TransformerConfig.from_dict(layout.read_config(TRANSFORMER_DIR))
    text = read_text_encoder_config(layout.folder(TEXT_ENCODER_DIR))
    return {"Ct": int(text["d_model"]), "Lt": int(text["num_layers"]), "D": transformer.inner_dim,
            "Ll": int(transformer.lyric_encoder_num_blocks), "Ld": int(transformer.num_layers)}


def _onnx_files(path: Path) -> list[Path]:
    """The ONNX file and the external-data files it names (they must keep their names)."""
    import onnx

    from .onnx_graph import all_tensors

    model = onnx.load(str(path), load_external_data=False)
    names = {entry.value for t in all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return [path] + [path.parent / n for n in sorted(names)]


def _check_engine_batch(plan: Path, model: ModelConfigSpec) -> None:
    """Triton refuses a ``max_batch_size`` above the engine profile's: say so at render time,
    naming the engine and both numbers, instead of a model that fails to load."""
    meta = EngineMeta.read(plan)
    if model.max_batch_size > meta.max_batch:
        raise ValueError(f"{plan}: built for batches up to {meta.max_batch}, but {model.name} is rendered with "
                         f"max_batch_size {model.max_batch_size}; render with a smaller --max-items or rebuild "
                         f"the engine with a larger --max-batch")


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (instant, no extra disk for multi-GB weights), or copy across file systems."""
    if not source.is_file():
        raise FileNotFoundError(f"missing file {source}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ------------------------------------------------------------------------------- orchestrators
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
    their GPU (``sampling_device: cuda``), beside the engines they call; an endpoint definition
    may still set ``sampling_device`` itself."""
    from acestep_client.params import GenerationParams

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
                   endpoints_dir: Path = ENDPOINTS_DIR) -> list[OrchestratorSpec]:
    """Endpoint definitions from ``endpoints_dir`` (all of them when ``names`` is None)."""
    if names is None:
        paths = sorted(Path(endpoints_dir).glob("*.json"))
    else:
        paths = [Path(endpoints_dir) / f"{n}.json" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"endpoint definitions not found: {missing}")
    return [OrchestratorSpec.from_json(p) for p in paths]


def _copy_sources(source: Path, version_dir: Path) -> None:
    if not (source / "model.py").is_file():
        raise FileNotFoundError(f"Python-backend model source {source}/model.py not found")
    version_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and not item.name.startswith(".") and item.suffix != ".pyc":
            shutil.copy2(item, version_dir / item.name)


def _write_model(out_dir: Path, model: ModelConfigSpec, target: str) -> Path:
    folder = out_dir / model.name
    folder.mkdir(parents=True, exist_ok=False)
    comment = (f"Rendered by acestep_triton.export.render for target {target!r}; "
               "edit the specs / ensemble_configs and re-render.")
    (folder / "config.pbtxt").write_text(render_config(model, comment=comment))
    return folder


# ------------------------------------------------------------------------------- repository
def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / RENDER_MARKER).is_file():
        raise FileExistsError(f"{out_dir} is not empty and was not rendered by us; refusing to clear it")


def render_repository(out_dir: str | Path, target: str = "cpu", onnx_dir: str | Path | None = None,
                      orchestrators: Sequence[OrchestratorSpec] = (), *,
                      components: Sequence[str | ComponentSpec] | None = None,
                      assets: str | Path | None = None, sizes: Mapping[str, int] | None = None,
                      engine_dir: str | Path | None = None, sources_root: str | Path = SOURCES_ROOT,
                      max_items: int = DEFAULT_MAX_ITEMS, instance_count: int = 1,
                      gpus: Sequence[int] = (), max_queue_delay_us: int = 1000,
                      intra_op_threads: int = 0, inter_op_threads: int = 0, runtime: str | None = None,
                      checkpoint: str | Path | None = None,
                      batching: Mapping[str, DynamicBatching] | None = None,
                      component_parameters: Mapping[str, Mapping[str, str]] | None = None,
                      endpoint_parameters: Mapping[str, str] | None = None,
                      endpoint_instances: int | Mapping[str, int] | None = None) -> Path:
    """Write a runnable model repository into ``out_dir`` (replacing one we rendered before; it
    is built in a staging folder beside it and swapped in only when complete).

    Runtime ``onnx`` (cpu): ``<component>/{config.pbtxt, 1/model.py, 1/model.onnx}`` from
    ``onnx_dir/<component>.onnx`` (hard-linked with its external-data files). Runtime ``tensorrt``
    (gpu): ``<component>/{config.pbtxt, 1/model.plan}``, the engine taken from
    ``engine_dir/<component>.plan`` when given (built elsewhere), and the checkpoint sizes read
    from ``onnx_dir`` when given. Runtime ``torch`` (either target): ``<component>/{config.pbtxt,
    1/model.py}`` loading its weights from ``checkpoint`` (required) at start-up.
    ``components=[]`` renders endpoints only. ``batching`` overrides the dynamic batching of
    the named components, ``component_parameters`` adds config parameters per model name (LoRA
    variants of the torch runtime), ``endpoint_parameters`` overrides parameters of every
    endpoint (e.g. ``frame_buckets``), ``endpoint_instances`` the instance count of every
    endpoint (an int) or of the named ones (``{"text2music": 8}``; see
    :func:`parse_endpoint_instances`). Returns ``out_dir``.
    """
    runtime = check_runtime(target, runtime)
    out_dir = Path(out_dir)
    chosen = COMPONENTS if components is None else components
    specs = [component(c) if isinstance(c, str) else c for c in chosen]
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
    if specs and runtime == "onnx" and onnx_dir is None:
        raise ValueError("runtime onnx needs onnx_dir (the exported <component>.onnx files)")
    if specs and runtime == "torch":
        if checkpoint is None:
            raise ValueError("runtime torch needs the checkpoint folder (--checkpoint)")
        sizes = {**checkpoint_sizes(checkpoint), **(sizes or {})}
        onnx_dir = None  # the torch runtime reads no ONNX file
    orchestrators = with_endpoint_instances(orchestrators, endpoint_instances)
    for spec in specs:  # check every input before touching out_dir
        if onnx_dir is not None and not (onnx_dir / f"{spec.name}.onnx").is_file():
            raise FileNotFoundError(f"{onnx_dir / (spec.name + '.onnx')} not found")
    _check_out_dir(out_dir)
    # Render beside the target and swap at the end: a failure never leaves half a repository.
    staging = out_dir.parent / f".{out_dir.name}.rendering"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _render_into(staging, target, specs, onnx_dir, orchestrators, assets=assets, sizes=sizes,
                     engine_dir=engine_dir, sources_root=Path(sources_root), max_items=max_items,
                     instance_count=instance_count, gpus=gpus, max_queue_delay_us=max_queue_delay_us,
                     intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, runtime=runtime,
                     checkpoint=checkpoint, batching=batching or {},
                     component_parameters=component_parameters or {},
                     endpoint_parameters=endpoint_parameters or {})
        (staging / RENDER_MARKER).write_text("acestep_triton.export.render output; replaced on re-render\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _render_into(out_dir: Path, target: str, specs: Sequence[ComponentSpec], onnx_dir: Path | None,
                 orchestrators: Sequence[OrchestratorSpec], *, assets: str | Path | None,
                 sizes: Mapping[str, int] | None, engine_dir: str | Path | None, sources_root: Path,
                 max_items: int, instance_count: int, gpus: Sequence[int], max_queue_delay_us: int,
                 intra_op_threads: int, inter_op_threads: int, runtime: str, checkpoint: str | Path | None,
                 batching: Mapping[str, DynamicBatching], component_parameters: Mapping[str, Mapping[str, str]],
                 endpoint_parameters: Mapping[str, str]) -> None:
    from acestep_triton.lora import base_component

    for spec in specs:
        onnx_path = onnx_dir / f"{spec.name}.onnx" if onnx_dir is not None else None
        spec_sizes = dict(sizes or {})
        if onnx_path is not None:
            spec_sizes = {**read_onnx_sizes(spec, onnx_path), **spec_sizes}
        extra: dict[str, str] = {}
        if runtime == "torch":
            extra = {"component": base_component(spec.name), "checkpoint_dir": str(Path(checkpoint).resolve())}
        extra.update(component_parameters.get(spec.name, {}))
        model = component_config(spec, target, sizes=spec_sizes, max_items=max_items,
                                 instance_count=instance_count, gpus=gpus,
                                 max_queue_delay_us=max_queue_delay_us, intra_op_threads=intra_op_threads,
                                 inter_op_threads=inter_op_threads, runtime=runtime,
                                 batching=batching.get(spec.name), parameters=extra)
        version = _write_model(out_dir, model, target) / "1"
        if runtime == "torch":
            _copy_sources(sources_root / TORCH_COMPONENT_SOURCE, version)
        elif runtime == "onnx":
            assert onnx_path is not None
            _copy_sources(sources_root / ONNX_COMPONENT_SOURCE, version)
            files = _onnx_files(onnx_path)
            _link_or_copy(files[0], version / "model.onnx")
            for data in files[1:]:
                _link_or_copy(data, version / data.name)
        else:
            version.mkdir()
            if engine_dir is not None:
                plan = Path(engine_dir) / f"{spec.name}.plan"
                _check_engine_batch(plan, model)
                _link_or_copy(plan, version / "model.plan")

    for orch in orchestrators:
        if endpoint_parameters:
            orch = replace(orch, parameters={**orch.parameters, **endpoint_parameters})
        model = orchestrator_config(orch, Path(assets) if assets is not None else None, target, gpus)
        source = Path(orch.source)
        source = source if source.is_absolute() else sources_root / source
        _copy_sources(source, _write_model(out_dir, model, target) / "1")


# ------------------------------------------------------------------------------- CLI
def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``render`` options (shared with the top-level ``acestep-triton`` command)."""
    parser.add_argument("--out", required=True, type=Path, help="repository folder to (re)write")
    parser.add_argument("--target", choices=TARGETS, default="cpu")
    parser.add_argument("--runtime", choices=sorted({r for rs in RUNTIMES.values() for r in rs}), default=None,
                        help="component runtime: cpu onnx (default) | torch; gpu torch (default) | tensorrt")
    parser.add_argument("--checkpoint", type=Path, default=None, help="runtime torch: the checkpoint folder")
    parser.add_argument("--onnx-dir", type=Path, default=None, help="exported <component>.onnx files")
    parser.add_argument("--engine-dir", type=Path, default=None, help="gpu: built <component>.plan files")
    parser.add_argument("--assets", type=Path, default=None,
                        help="folder with the checkpoint and vocab, substituted for {assets} in endpoints")
    parser.add_argument("--endpoints", default=None,
                        help="comma-separated endpoint names (default: every ensemble_configs/*.json)")
    parser.add_argument("--endpoints-dir", type=Path, default=ENDPOINTS_DIR)
    parser.add_argument("--sources", type=Path, default=SOURCES_ROOT, help="model_repository/ sources")
    parser.add_argument("--components", default=None,
                        help="comma-separated component names (default: all six; '' for endpoints only)")
    parser.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS,
                        help="songs per request the components are sized for (0: no Triton batching)")
    parser.add_argument("--instances", type=int, default=1, help="instances per component")
    parser.add_argument("--gpus", default="", help="gpu: comma-separated GPU ids for the instances")
    parser.add_argument("--queue-delay-us", type=int, default=1000,
                        help="dynamic batching: how long a batch may wait for more requests")
    parser.add_argument("--threads", type=int, default=0, help="cpu: onnxruntime intra-op threads (0: all)")
    parser.add_argument("--endpoint-instances", default=None, type=parse_endpoint_instances,
                        help="instances per endpoint: one count for all (8), or per endpoint "
                             "(text2music=8,repaint=2); a decoupled endpoint instance serves one request at a time. "
                             "Default: each ensemble_configs/*.json's instance_count")
    parser.add_argument("--memory-budget-mb", default=None,
                        help="endpoints' admission budget per instance: auto (free memory at the first request "
                             "minus memory_margin_mb: GPU cudaMemGetInfo, CPU MemAvailable), off, or MiB "
                             "(see serving/admission.py)")


def parse_endpoint_instances(text: str | int | None) -> int | dict[str, int] | None:
    """``--endpoint-instances``: ``"8"`` → 8 (every endpoint), ``"text2music=8,repaint=2"`` →
    ``{"text2music": 8, "repaint": 2}`` (the others keep their definition's count), None/'' → None.

    Why an option: a decoupled endpoint instance runs one request at a time, so the concurrency
    a deployment serves is its endpoint instance count; it depends on the GPU, not the task.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None

    def count(value: str | int, where: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--endpoint-instances: {where} must be a whole number, got {value!r}") from None
        if number < 1:
            raise ValueError(f"--endpoint-instances: {where} must be >= 1, got {number}")
        return number

    if isinstance(text, int) or "=" not in text:
        return count(text.strip() if isinstance(text, str) else text, "the count")
    counts: dict[str, int] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--endpoint-instances: expected NAME=COUNT, got {item!r}")
        counts[name.strip()] = count(value.strip(), name.strip())
    return counts


def with_endpoint_instances(orchestrators: Sequence[OrchestratorSpec],
                            instances: int | Mapping[str, int] | None) -> list[OrchestratorSpec]:
    """``orchestrators`` with their instance counts overridden (see :func:`parse_endpoint_instances`);
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


def memory_parameters(budget_mb: str | None) -> dict[str, str]:
    """``--memory-budget-mb`` as endpoint parameters, checked now rather than at server load."""
    if budget_mb is None:
        return {}
    value = str(budget_mb).strip().lower()
    if value not in ("auto", "off"):
        try:
            if float(value) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--memory-budget-mb must be auto, off or MiB >= 0, got {budget_mb!r}") from None
    return {"memory_budget_mb": value}


def run_render(args: argparse.Namespace) -> int:
    names = [n for n in args.endpoints.split(",") if n] if args.endpoints is not None else None
    out = render_repository(
        args.out, args.target, args.onnx_dir, load_endpoints(names, args.endpoints_dir),
        components=None if args.components is None else [c for c in args.components.split(",") if c],
        assets=args.assets, engine_dir=args.engine_dir,
        sources_root=args.sources, max_items=args.max_items, instance_count=args.instances,
        gpus=[int(g) for g in args.gpus.split(",") if g], max_queue_delay_us=args.queue_delay_us,
        intra_op_threads=args.threads, runtime=args.runtime, checkpoint=args.checkpoint,
        endpoint_parameters=memory_parameters(getattr(args, "memory_budget_mb", None)),
        endpoint_instances=getattr(args, "endpoint_instances", None))
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    print(f"rendered {len(models)} models for target {args.target} into {out}: {', '.join(models)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``render --onnx-dir D --out R --target cpu|gpu --assets A``."""
    parser = argparse.ArgumentParser(prog="acestep-triton-render", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_render_arguments(sub.add_parser("render", help="render a model repository"))
    args = parser.parse_args(argv)
    try:
        return run_render(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

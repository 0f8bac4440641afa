"""Export stage: the six served components → ONNX files, each checked against torch.

For every component of ``export/specs.py`` this writes ``<component>.onnx`` with the contract's
input/output names and dynamic batch and length axes, then runs it with onnxruntime (CPU) on
inputs of a *different* batch and length than the traced example and compares with the torch
model in fp32 (:func:`check_parity`). A graph that baked in a traced size fails there, loudly,
instead of serving wrong audio.

Choices, and why:

* The legacy TorchScript exporter (``dynamo=False``). In torch 2.13 the ``torch.export``-based
  exporter takes minutes for the 24-block DiT (about 300 s for the tiny one on a CPU, against
  about 15 s) and gains nothing here: the models are written to trace cleanly (no data-dependent
  control flow; positions from ``arange`` over runtime lengths). Its DeprecationWarning is
  silenced locally.
* ERG is data, not a graph variant: every query scale is a graph input, so one file serves both
  the normal and the weakened branch (the parity inputs mix 1.0 and 0.01 entries).
* The vocoder is exported from a copy with weight norm folded into plain weights.
* Files over protobuf's 2 GB limit (the real 3.5B DiT) keep their weights in one external file
  ``<component>.onnx.data`` next to the graph (torch writes one file per tensor; they are merged
  here, streaming, without loading the weights twice). The renderer links both files.

Command line: ``python -m acestep_triton.export.onnx_export --checkpoint DIR --out DIR``
(also ``acestep-triton onnx ...`` when the project CLI delegates to :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from .. import models as models_pkg
from ..checkpoint import CheckpointError, load_components
from ..command_line import add_checkpoint_arguments
from ..component_graphs import component_graph, component_sources, export_graph
from . import specs
from .onnx_graph import all_tensors

DEFAULT_OPSET = 17
"""ONNX opset of the exported graphs (TensorRT 10 and onnxruntime 1.2x both take it)."""

EXPORT_EXAMPLE = (2, 12)
"""(batch, length) of the example that is traced. Length is in each component's own unit
(tokens, latent frames W, mel frames F); see :meth:`ComponentGraph.dynamic_sizes`."""

PARITY_EXAMPLE = (3, 7)
"""(batch, length) of the parity check run by :func:`export_all`: deliberately different from
:data:`EXPORT_EXAMPLE` in both, so a traced-in size shows up as an error or a mismatch."""

FP32_RTOL = 1e-4
"""Parity tolerance for fp32 graphs: ``max|onnx - torch| / max|torch|`` per output."""

EXTERNAL_DATA_LIMIT = 2**31 - 2**26
"""Weights above this many bytes go to an external data file. Protobuf cannot serialise 2 GiB;
the margin leaves room for the graph itself."""

EXTERNAL_ALIGNMENT = 4096
"""Offsets of tensors in the external data file are page aligned, so runtimes can mmap them."""

MANIFEST = "export_manifest.json"
"""Written into the output folder: files, checkpoint sizes, parity numbers, versions."""

_ONNX_DTYPES = {"FP32": 1, "UINT8": 2, "INT8": 3, "INT16": 5, "INT32": 6, "INT64": 7, "BOOL": 9,
                "FP16": 10, "FP64": 11, "BF16": 16}
"""Contract (Triton) dtype names → ``onnx.TensorProto`` element types."""


class ParityError(AssertionError):
    """An exported graph disagrees with its torch model beyond the tolerance."""


class ContractError(ValueError):
    """An exported graph's inputs/outputs differ from ``export/specs.py``."""


def onnx_dtype(triton_dtype: str) -> int:
    """The ``onnx.TensorProto`` element type of a contract dtype name (``"FP32"`` → 1)."""
    return _ONNX_DTYPES[triton_dtype]


# ------------------------------------------------------------------------------------- export


def _movedim_symbolic(g: Any, self: Any, source: Any, destination: Any) -> Any:
    """``aten::movedim`` as one ONNX Transpose, with negative dims normalised.

    torch 2.13's own symbolic writes the negative dim into the permutation (``movedim(-1, 1)``
    on a 4-D tensor becomes ``perm=[0, -1, 1, 2]``), which no ONNX runtime accepts; diffusers'
    DCAE blocks use exactly that form (channels-last norms). Semantics are ``torch.movedim``'s.
    """
    # torch.onnx (the TorchScript exporter) loads only when exporting: serving imports this
    # module too (through lora.variants)
    from torch.onnx import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(self)
    if rank is None:
        raise RuntimeError("movedim: the exporter does not know the input's rank")

    def dims(value: Any) -> list[int]:
        const = symbolic_helper._maybe_get_const(value, "t")  # an int or a list of ints
        return [int(d) % rank for d in torch.as_tensor(const).view(-1).tolist()]

    src, dst = dims(source), dims(destination)
    perm: list[int | None] = [None] * rank
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    rest = iter(i for i in range(rank) if i not in src)
    order = [p if p is not None else next(rest) for p in perm]
    if order == list(range(rank)):
        return self
    return g.op("Transpose", self, perm_i=order)


@contextlib.contextmanager
def _legacy_exporter(opset: int) -> Iterator[None]:
    """Context for one legacy export: the :func:`_movedim_symbolic` fix registered (and removed
    afterwards), and its expected warnings silenced for this block only.

    Silenced: the DeprecationWarning of the legacy exporter (its use is deliberate, see the module
    docstring), TracerWarnings (library code converts shapes to Python values, e.g. diffusers'
    "sequence longer than head dim" choice, whose two branches compute the same function), and
    constant-folding and advanced-indexing notes. What guards against a traced-in size is not a
    warning but the parity check at another batch and length.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        # Index tensors in our models and in transformers' masks come from arange (never negative).
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.register_custom_op_symbolic("aten::movedim", _movedim_symbolic, opset)
        try:
            yield
        finally:
            torch.onnx.unregister_custom_op_symbolic("aten::movedim", opset)


def _ordered_args(spec: specs.ComponentSpec,
                  inputs: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Inputs in contract order, from a name → tensor mapping or an already ordered sequence."""
    if isinstance(inputs, Mapping):
        missing = [n for n in spec.input_names if n not in inputs]
        extra = sorted(set(inputs) - set(spec.input_names))
        if missing or extra:
            raise KeyError(f"{spec.name}: inputs missing {missing}, unexpected {extra}")
        return tuple(inputs[n] for n in spec.input_names)
    args = tuple(inputs)
    if len(args) != len(spec.inputs):
        raise ValueError(f"{spec.name}: {len(args)} inputs given, the contract has {len(spec.inputs)}")
    return args


def _parameter_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (an upper bound of what the graph will carry)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def export_component(name: str, module: nn.Module, out_path: str | Path, *, opset: int = DEFAULT_OPSET,
                     example_inputs: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
                     external_data: bool | None = None) -> Path:
    """Export the served component ``name`` of ``module`` to ``out_path`` and return the path.

    ``module`` is the torch model the component is cut from (the whole transformer for
    ``condition_encoder`` and ``dit_decoder``) or its adapter. ``example_inputs`` (contract names
    → tensors, default :data:`EXPORT_EXAMPLE`) is what gets traced; its sizes are not baked in.
    ``external_data``: True puts the weights in ``<out_path>.data``, False forbids it, None
    (default) decides by size (needed above 2 GB). The graph's inputs and outputs are checked
    against the contract before returning.
    """
    spec = specs.component(name)
    graph = export_graph(spec.name, module)
    if example_inputs is None:
        example_inputs = graph.example_inputs(*EXPORT_EXAMPLE, seed=0)
    args = _ordered_args(spec, example_inputs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is False and _parameter_bytes(graph) > EXTERNAL_DATA_LIMIT:
        raise ValueError(f"{name}: weights exceed 2 GB, which needs external data")

    # torch writes one file per tensor next to the model when it exceeds 2 GB: export into a
    # private folder on the same file system, then publish the graph and one data file.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.stem}.") as tmp:
        traced = Path(tmp) / out_path.name
        with _legacy_exporter(opset), torch.no_grad():
            torch.onnx.export(
                graph, args, str(traced), dynamo=False, opset_version=opset,
                input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
        _publish(traced, out_path, spec, external_data, sizes=graph.checkpoint_sizes())
    check_contract(spec.name, out_path, sizes=graph.checkpoint_sizes())
    return out_path


def data_file(onnx_path: str | Path) -> Path:
    """The external data file that belongs to ``onnx_path`` (``<name>.onnx.data``)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".data")


def _stamp_output_shapes(model: Any, spec: specs.ComponentSpec, sizes: Mapping[str, int]) -> None:
    """Declare each output's shape as the contract states it.

    The exporter's shape inference loses some static dims on the way (the DCAE encoder's latent
    height 16 comes out as ``Mullatents_dim_2``) and invents names for dynamic ones. Numbers the
    contract fixes, and checkpoint sizes known from the model, become fixed dims; every other
    symbol becomes a named dynamic dim. The parity check confirms the real shapes.
    """
    for value, tensor in zip(model.graph.output, spec.outputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            continue  # left for check_contract to report
        for dim, symbol in zip(dims, tensor.shape, strict=True):
            size = symbol if isinstance(symbol, int) else sizes.get(symbol)
            if size is not None:
                dim.dim_value = int(size)
            else:
                dim.dim_param = str(symbol)


def _publish(traced: Path, out_path: Path, spec: specs.ComponentSpec, external_data: bool | None,
             sizes: Mapping[str, int] | None = None) -> None:
    """Move the exported model to ``out_path``; gather external weights into one data file.

    Tensors torch already wrote outside the proto are copied (one at a time, streaming) into
    ``<out_path>.data``; with ``external_data=True`` inline weights of 1 KiB or more go there too.
    Output shapes are declared from the contract (:func:`_stamp_output_shapes`).
    """
    import onnx  # optional heavy dependency (the export extra)

    model = onnx.load(str(traced), load_external_data=False)
    model.doc_string = spec.description
    if len(model.graph.output) == len(spec.outputs):
        _stamp_output_shapes(model, spec, sizes or {})
    tensors = list(all_tensors(model.graph))
    already_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)
    target_data = data_file(out_path)
    for stale in (out_path, target_data):
        stale.unlink(missing_ok=True)
    if not already_external and not external_data:
        onnx.save(model, str(out_path))
        return

    with open(target_data, "wb") as out:
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                with open(traced.parent / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    data = src.read(int(info["length"])) if "length" in info else src.read()
            elif external_data and tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                data = tensor.raw_data
            else:
                continue
            offset = -out.tell() % EXTERNAL_ALIGNMENT
            out.write(b"\0" * offset)
            offset = out.tell()
            out.write(data)
            del tensor.external_data[:]
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", target_data.name), ("offset", offset), ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save(model, str(out_path))


# ----------------------------------------------------------------------------------- contract


def check_contract(name: str, onnx_path: str | Path, sizes: Mapping[str, int] | None = None) -> None:
    """Raise :class:`ContractError` unless the graph's inputs and outputs are exactly the
    contract's: same names in the same order, same dtypes and ranks, fixed dims where the
    contract has numbers (or known checkpoint ``sizes``), symbolic dims for every dynamic axis."""
    import onnx  # optional heavy dependency (the export extra)

    spec = specs.component(name)
    model = onnx.load(str(onnx_path), load_external_data=False)
    problems: list[str] = []
    for kind, wanted, values in (("inputs", spec.inputs, model.graph.input),
                                 ("outputs", spec.outputs, model.graph.output)):
        names = [v.name for v in values]
        if names != [t.name for t in wanted]:
            problems.append(f"{kind} are {names}, the contract says {[t.name for t in wanted]}")
            continue
        for t, value in zip(wanted, values, strict=True):
            ttype = value.type.tensor_type
            if ttype.elem_type != onnx_dtype(t.dtype):
                problems.append(f"{t.name}: element type {onnx.TensorProto.DataType.Name(ttype.elem_type)}, "
                                f"the contract says {t.dtype}")
            dims = list(ttype.shape.dim)
            if len(dims) != len(t.shape):
                problems.append(f"{t.name}: rank {len(dims)}, the contract says {list(t.shape)}")
                continue
            for axis, (symbol, dim) in enumerate(zip(t.shape, dims, strict=True)):
                fixed = dim.dim_value if dim.HasField("dim_value") else None
                expected = symbol if isinstance(symbol, int) else (sizes or {}).get(symbol)
                if symbol in specs.DYNAMIC_SYMBOLS and fixed is not None:
                    problems.append(f"{t.name}: axis {axis} ({symbol}) exported with fixed size {fixed}")
                elif expected is not None and fixed is not None and fixed != expected:
                    problems.append(f"{t.name}: axis {axis} is {fixed}, expected {symbol} = {expected}")
    if problems:
        raise ContractError(f"{Path(onnx_path).name} breaks the {name} contract:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class OutputError:
    """Error of one output: ``max_rel`` is ``max|a - b| / max|b|`` (``b`` = torch)."""

    max_abs: float
    max_rel: float
    max_ref: float
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs torch fp32 on one set of inputs, per output and overall (worst output)."""

    name: str
    input_shapes: dict[str, tuple[int, ...]]
    outputs: dict[str, OutputError]
    rtol: float = FP32_RTOL
    notes: tuple[str, ...] = field(default=())

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.outputs.values()), default=math.nan)

    @property
    def max_rel(self) -> float:
        return max((e.max_rel for e in self.outputs.values()), default=math.nan)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.outputs.items()}

    @property
    def ok(self) -> bool:
        """Within tolerance, no shape mismatch and no NaN (NaN compares false, so it fails)."""
        return not self.notes and all(e.max_rel <= self.rtol for e in self.outputs.values())

    def summary(self) -> str:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in self.input_shapes.items())
        per_output = "; ".join(f"{k}{list(e.shape)}: max abs {e.max_abs:.3g}, max rel {e.max_rel:.3g}"
                               for k, e in self.outputs.items())
        verdict = "ok" if self.ok else f"FAILED (tolerance rel {self.rtol:g})"
        notes = "".join(f"; {n}" for n in self.notes)
        return f"{self.name} [{shapes}] -> {per_output}{notes}: {verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok,
                "rtol": self.rtol, "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "outputs": {k: {**asdict(e), "shape": list(e.shape)} for k, e in self.outputs.items()},
                "notes": list(self.notes)}


def _session(onnx_path: Path) -> Any:
    """A CPU onnxruntime session with default graph optimisations (as served on the CPU target)."""
    import onnxruntime as ort  # optional heavy dependency (the export and serve extras)

    options = ort.SessionOptions()
    # No busy-waiting between ops: on a shared CPU spinning threads starve the torch reference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def compare_outputs(expected: Tensor, got: np.ndarray) -> OutputError:
    """Max abs and relative (to the reference's max magnitude) error of one output."""
    ref = expected.detach().to(torch.float64).cpu().numpy()
    out = np.asarray(got, dtype=np.float64)
    if ref.shape != out.shape:
        return OutputError(math.inf, math.inf, math.nan, tuple(out.shape))
    if ref.size == 0:
        return OutputError(0.0, 0.0, 0.0, tuple(out.shape))
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if not np.isnan(diff).any() else math.nan
    max_ref = float(np.abs(ref).max())
    max_rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else math.inf)
    return OutputError(max_abs, max_rel, max_ref, tuple(out.shape))


def check_parity(name: str, module: nn.Module, onnx_path: str | Path,
                 inputs: Mapping[str, Tensor] | None = None, *, rtol: float = FP32_RTOL,
                 session: Any = None) -> ParityReport:
    """Run ``onnx_path`` with onnxruntime (CPU) and the torch ``module`` in fp32 on ``inputs``
    (default: :data:`PARITY_EXAMPLE`, another size than the export) and compare every output.

    ``module`` is the original model (for the vocoder: with weight norm unfolded, so folding is
    covered too). Never raises on a mismatch: inspect :attr:`ParityReport.ok`.
    """
    spec = specs.component(name)
    graph = component_graph(spec.name, module)
    if inputs is None:
        inputs = graph.example_inputs(*PARITY_EXAMPLE, seed=1)
    args = _ordered_args(spec, inputs)
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(spec.input_names, args, strict=True)}
    with torch.no_grad():
        expected = graph(*args)
    expected = (expected,) if isinstance(expected, Tensor) else tuple(expected)
    session = session if session is not None else _session(Path(onnx_path))
    got = session.run(list(spec.output_names), feeds)
    outputs = {n: compare_outputs(e, g) for n, e, g in zip(spec.output_names, expected, got, strict=True)}
    notes = tuple(f"{n}: onnx shape {list(e.shape)} != torch {list(t.shape)}"
                  for (n, e), t in zip(outputs.items(), expected, strict=True) if tuple(t.shape) != e.shape)
    notes += tuple(f"{n}: NaN in the onnx output" for n, e in outputs.items() if math.isnan(e.max_abs))
    shapes = {n: tuple(a.shape) for n, a in zip(spec.input_names, args, strict=True)}
    return ParityReport(name=spec.name, input_shapes=shapes, outputs=outputs, rtol=rtol, notes=notes)


# ----------------------------------------------------------------------------------- pipeline


class _Progress:
    """One line per event on stderr: ``[onnx i/n] component: what (elapsed)``."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()

    def __call__(self, index: int, name: str, message: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            print(f"[onnx {index}/{self.total}] {name}: {message} ({elapsed:.1f} s elapsed)",
                  file=self.stream, flush=True)


def export_all(components: Any, out_dir: str | Path, *, progress: bool = True,
               names: Iterable[str] | None = None, parity: bool = True, opset: int = DEFAULT_OPSET,
               rtol: float = FP32_RTOL, external_data: bool | None = None) -> dict[str, Path]:
    """Export every served component (or those in ``names``) into ``out_dir/<component>.onnx``.

    ``components`` is a ``checkpoint.Components`` (all six) or a mapping of component name →
    torch model (the components it names).
    With ``parity`` (default) each file is checked right after its export on
    :data:`PARITY_EXAMPLE` inputs, and a :class:`ParityError` naming the component and its
    errors is raised above ``rtol``. Progress (component i of n, elapsed time) goes to stderr.
    Writes :data:`MANIFEST` (files, checkpoint sizes, parity numbers) beside the files.
    """
    sources = component_sources(components)
    wanted = list(sources) if names is None else [specs.component(n).name for n in names]
    missing = [n for n in wanted if n not in sources]
    if missing:
        raise KeyError(f"no torch model for {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    show = _Progress(len(wanted), progress)
    paths: dict[str, Path] = {}
    manifest: dict[str, Any] = {"opset": opset, "torch": torch.__version__, "components": {}}
    failures: list[str] = []
    for i, name in enumerate(wanted, start=1):
        module = sources[name]
        show(i, name, "exporting")
        started = time.monotonic()
        path = export_component(name, module, out_dir / f"{name}.onnx", opset=opset,
                                external_data=external_data)
        size_mb = sum(p.stat().st_size for p in (path, data_file(path)) if p.exists()) / 1e6
        entry: dict[str, Any] = {"file": path.name, "export_s": round(time.monotonic() - started, 2),
                                 "size_mb": round(size_mb, 3),
                                 "sizes": component_graph(name, module).checkpoint_sizes()}
        if data_file(path).exists():
            entry["external_data"] = data_file(path).name
        message = f"exported in {entry['export_s']:.1f} s, {size_mb:.1f} MB"
        if parity:
            report = check_parity(name, module, path, rtol=rtol)
            entry["parity"] = report.as_dict()
            message += f"; parity max abs {report.max_abs:.2e}, max rel {report.max_rel:.2e}"
            if not report.ok:
                failures.append(report.summary())
                message += " FAILED"
        show(i, name, message)
        manifest["components"][name] = entry
        paths[name] = path
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if failures:
        raise ParityError("ONNX export does not match torch:\n  " + "\n  ".join(failures))
    return paths


# -------------------------------------------------------------------------------------- cache


def _code_fingerprint() -> str:
    """Hash of what determines an export besides the weights: the model, checkpoint-loading and
    export sources, the opset and the versions of the libraries that trace and run the graphs."""
    libraries = ("torch", "transformers", "diffusers", "onnx", "onnxruntime")
    stamp = f"opset {DEFAULT_OPSET} " + " ".join(f"{n} {version(n)}" for n in libraries)
    digest = hashlib.sha256(stamp.encode())
    package = Path(models_pkg.__file__).parent.parent
    sources = [*sorted((package / "models").glob("*.py")), *sorted(Path(__file__).parent.glob("*.py")),
               package / "checkpoint.py"]
    for path in sources:
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoint_fingerprint(ckpt_dir: str | Path) -> str:
    """SHA-256 over every file of a checkpoint folder (relative names and contents)."""
    root = Path(ckpt_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def export_cached(ckpt_dir: str | Path, cache_dir: str | Path, *, vocab_path: str | Path | None = None,
                  components: Any = None, progress: bool = False) -> dict[str, Path]:
    """All six ONNX files of a checkpoint, exported (with parity) once per checkpoint content and
    export code into ``cache_dir/<fingerprint>/``, then reused.

    For test fixtures and demos that need the files of the tiny checkpoint repeatedly.
    ``components`` may pass already loaded models of that checkpoint (saves loading them again).
    A folder is only published complete (exported into a temporary one, then renamed).
    """
    key = hashlib.sha256((checkpoint_fingerprint(ckpt_dir) + _code_fingerprint()).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if not (final / MANIFEST).is_file():
        if components is None:
            components = load_components(ckpt_dir, vocab_path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}."))
        try:
            export_all(components, staging, progress=progress)
            with contextlib.suppress(OSError):  # another process published it meanwhile
                os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return {name: final / f"{name}.onnx" for name in specs.COMPONENTS}


# ---------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``onnx --checkpoint DIR [--vocab PATH] --out DIR [--only a,b] [--skip-parity]``."""
    parser = argparse.ArgumentParser(
        prog="acestep-triton onnx",
        description="Export the served components of an ACE-Step checkpoint to ONNX, each checked "
                    "against torch (fp32, onnxruntime CPU) at another batch and length than traced.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for <component>.onnx files")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of: {', '.join(specs.COMPONENTS)}")
    parser.add_argument("--skip-parity", action="store_true", help="do not run the onnxruntime check")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)

    names = None
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in specs.COMPONENTS]
        if unknown:
            parser.error(f"--only: unknown component(s) {', '.join(unknown)}; "
                         f"known: {', '.join(specs.COMPONENTS)}")

    try:
        components = load_components(args.checkpoint, args.vocab)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        paths = export_all(components, args.out, names=names, parity=not args.skip_parity, opset=args.opset)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

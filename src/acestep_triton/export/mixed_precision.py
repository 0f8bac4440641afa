"""Mixed precision written into an ONNX graph, before TensorRT parses it.

TensorRT 11 builds only strongly typed networks (the fp16/bf16 builder flags and per-layer
precision constraints of 10.x are gone), so the precision is written into the graph itself
(:func:`convert_to_mixed_precision`): every matrix product and convolution (:data:`HEAVY_OPS`:
the FLOPs) runs in fp16 or bf16 with its weights stored in that type, while everything else
(norms, softmax, residual adds, RoPE, timestep features, masks) stays fp32, with ``Cast`` nodes at
the boundaries. Kept in fp32 on purpose, because upstream computes them in fp32: the products of
the linear attention (the DiT's self-attention and the DCAE's EfficientViT attention: ReLU-kernel
sums over thousands of frames overflow fp16), see :data:`KEEP_FP32_PATTERNS`. The UMT5 text
encoder stays fp32 in fp16 builds (:data:`FP32_UNDER_FP16`: T5 activations overflow fp16; it runs
once per request). Graph inputs and outputs keep the contract's FP32.

``onnx`` (the export/gpu extras) is imported where it is used, so the precision rules
(:func:`component_precision`, :func:`keeps_fp32`) import without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16")
"""Engine precisions: fp32 everywhere, or the heavy ops in fp16 / bf16 (see the module docstring)."""

HEAVY_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
"""ONNX ops that run in the reduced precision (they hold the FLOPs and the weights)."""

KEEP_FP32_PATTERNS: tuple[str, ...] = (r"(^|/)attn/[^/]+$",)
"""Regexes (``re.search`` on ONNX node names) of heavy ops kept in fp32.

``/attn/<op>`` are the ops directly inside an ``attn`` module, not inside its projections
(``attn/to_q/MatMul``): the DiT's linear self-attention (``transformer_blocks.N/attn/MatMul``,
the k^T·v and q·(k^T·v) products) and the DCAE's EfficientViT linear attention, which upstream
and diffusers both compute in fp32. The softmax cross-attention (``cross_attn``) and the
Conformer's ``self_attn`` are not matched: upstream runs them in bf16."""

FP32_UNDER_FP16 = ("text_encoder",)
"""Components built entirely in fp32 when fp16 is asked for: UMT5 (a T5) overflows fp16."""

_HALF_ONNX = {"fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16
_FLOAT_ONNX = 1
EXTERNAL_DATA_LIMIT = 2**31 - 2**26
"""Weights above this many bytes go to an external data file (protobuf's 2 GiB limit)."""


def component_precision(component: str, precision: str) -> str:
    """The precision a component is actually built in (see :data:`FP32_UNDER_FP16`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and component in FP32_UNDER_FP16:
        return "fp32"
    return precision


@dataclass
class PrecisionReport:
    """What :func:`convert_to_mixed_precision` did."""

    precision: str
    half_nodes: int = 0
    fp32_heavy_nodes: list[str] = field(default_factory=list)
    casts: int = 0
    half_initializers: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The counts, as recorded in the engine's JSON sidecar (``precision_report``)."""
        return {"precision": self.precision, "half_nodes": self.half_nodes, "casts": self.casts,
                "half_initializers": self.half_initializers,
                "fp32_heavy_nodes": len(self.fp32_heavy_nodes)}


def keeps_fp32(node_name: str, patterns: Iterable[str] = KEEP_FP32_PATTERNS) -> bool:
    """Whether a heavy node stays fp32 under ``patterns``."""
    return any(re.search(p, node_name) for p in patterns)


def _half_tensor(array: Any, name: str, precision: str) -> Any:
    """An ONNX initializer holding ``array`` (fp32 numpy) in fp16 or bf16."""
    from onnx import TensorProto, numpy_helper  # function-local: optional heavy dependency (onnx)

    array = np.asarray(array, dtype=np.float32)
    if precision == "fp16":
        finite = np.finfo(np.float16).max
        return numpy_helper.from_array(np.clip(array, -finite, finite).astype(np.float16), name)
    import torch  # function-local: heavy, and numpy has no bfloat16 to round with

    bits = torch.from_numpy(np.array(array, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.BFLOAT16
    tensor.dims.extend(array.shape)
    tensor.raw_data = bits.tobytes()
    return tensor


@dataclass
class _Conversion:
    """One graph's rewrite in progress. The lookups are taken from the graph as it was before the
    rewrite; the half copies are remembered so each weight and activation is converted once and
    shared by every heavy node that reads it."""

    graph: Any
    precision: str
    report: PrecisionReport
    initializers: dict[str, Any]
    producer: dict[str, Any]
    taken: set[str]
    half_weights: dict[str, str] = field(default_factory=dict)
    half_activations: dict[str, str] = field(default_factory=dict)
    new_nodes: list[Any] = field(default_factory=list)

    @classmethod
    def of(cls, graph: Any, precision: str) -> _Conversion:
        initializers = {t.name: t for t in graph.initializer}
        producer = {out: node for node in graph.node for out in node.output}
        taken = set(initializers) | set(producer) | {v.name for v in graph.input}
        return cls(graph, precision, PrecisionReport(precision=precision), initializers, producer, taken)


def _known_types(graph: Any) -> dict[str, int]:
    """ONNX element type of every tensor whose type the graph states (inputs, value infos, weights)."""
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _fresh_name(conv: _Conversion, base: str) -> str:
    """``base``, or ``base_<k>`` when taken: a new tensor or node name unique in the graph."""
    name, k = base, 1
    while name in conv.taken:
        name, k = f"{base}_{k}", k + 1
    conv.taken.add(name)
    return name


def _source_initializer(conv: _Conversion, name: str) -> str | None:
    """The initializer ``name`` is, or reaches through a chain of ``Identity`` nodes (the exporter
    puts shared weights behind them); None for an activation."""
    seen = 0
    while name not in conv.initializers:
        node = conv.producer.get(name)
        if node is None or node.op_type != "Identity" or seen > 64:
            return None
        name, seen = node.input[0], seen + 1
    return name


def _half_weight(conv: _Conversion, name: str) -> str:
    """The half copy of initializer ``name`` (added to the graph on first use)."""
    from onnx import numpy_helper  # function-local: optional heavy dependency (onnx)

    if name not in conv.half_weights:
        array = numpy_helper.to_array(conv.initializers[name])
        half_name = _fresh_name(conv, f"{name}__{conv.precision}")
        conv.graph.initializer.append(_half_tensor(array, half_name, conv.precision))
        conv.half_weights[name] = half_name
        conv.report.half_initializers += 1
    return conv.half_weights[name]


def _half_activation(conv: _Conversion, name: str) -> str:
    """The half version of activation ``name``: a ``Cast`` added on first use, or the half output
    of the heavy node that produced it."""
    from onnx import helper  # function-local: optional heavy dependency (onnx)

    if name not in conv.half_activations:
        half_name = _fresh_name(conv, f"{name}__{conv.precision}")
        conv.new_nodes.append(helper.make_node("Cast", [name], [half_name], to=_HALF_ONNX[conv.precision],
                                               name=_fresh_name(conv, f"{name}/cast_to_{conv.precision}")))
        conv.half_activations[name] = half_name
        conv.report.casts += 1
    return conv.half_activations[name]


def _convert_heavy_node(conv: _Conversion, node: Any) -> None:
    """Make ``node`` read half inputs and write half outputs, each cast back to fp32 under its
    original name so that every other reader sees what it saw before."""
    from onnx import helper  # function-local: optional heavy dependency (onnx)

    for i, name in enumerate(node.input):
        if not name:
            continue
        source = _source_initializer(conv, name)
        node.input[i] = _half_weight(conv, source) if source is not None else _half_activation(conv, name)
    conv.new_nodes.append(node)
    for j, out in enumerate(node.output):
        half_out = _fresh_name(conv, f"{out}__{conv.precision}")
        node.output[j] = half_out
        conv.new_nodes.append(helper.make_node("Cast", [half_out], [out], to=_FLOAT_ONNX,
                                               name=_fresh_name(conv, f"{node.name}/cast_to_fp32")))
        conv.half_activations[out] = half_out
        conv.report.casts += 1
    conv.report.half_nodes += 1


def _stays_fp32(node: Any, patterns: Iterable[str], known_types: dict[str, int]) -> bool:
    """A heavy node kept in fp32: matched by ``patterns``, or reading a tensor that is not fp32."""
    return keeps_fp32(node.name, patterns) or any(
        known_types.get(x, _FLOAT_ONNX) not in (_FLOAT_ONNX, 0) for x in node.input if x)


def convert_to_mixed_precision(model: Any, precision: str,
                               keep_fp32: Iterable[str] = KEEP_FP32_PATTERNS) -> PrecisionReport:
    """Rewrite ``model`` (an ``onnx.ModelProto`` with its weights loaded) in place so its heavy ops
    run in ``precision`` ("fp16"/"bf16") and everything else in fp32.

    For every heavy node not matched by ``keep_fp32``: its weight initializers get a half copy
    (the fp32 original is dropped when nothing else reads it; ``Identity`` chains over an
    initializer are followed), activations are cast to half once per tensor (shared by every
    heavy consumer), and its output is cast back to fp32 under the original name, so the rest of
    the graph and the graph's inputs and outputs are unchanged. A heavy node reading another
    heavy node's output takes the half tensor directly.
    """
    if precision not in _HALF_ONNX:
        raise ValueError(f"convert_to_mixed_precision: precision must be fp16 or bf16, got {precision!r}")
    patterns = tuple(keep_fp32)
    graph = model.graph
    known_types = _known_types(graph)
    conv = _Conversion.of(graph, precision)
    for node in list(graph.node):
        if node.op_type not in HEAVY_OPS:
            conv.new_nodes.append(node)
        elif _stays_fp32(node, patterns, known_types):
            conv.report.fp32_heavy_nodes.append(node.name)
            conv.new_nodes.append(node)
        else:
            _convert_heavy_node(conv, node)
    del graph.node[:]
    graph.node.extend(_prune_dead_identities(conv.new_nodes, {o.name for o in graph.output}))
    _drop_unread_initializers(graph)
    return conv.report


def _drop_unread_initializers(graph: Any) -> None:
    """Remove the initializers no node and no graph output reads (fp32 weights now read in half)."""
    used = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _prune_dead_identities(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop ``Identity`` nodes nobody reads any more (weights now read in half directly)."""
    while True:
        used = {x for node in nodes for x in node.input} | outputs
        alive = [n for n in nodes if n.op_type != "Identity" or any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def write_mixed_precision(onnx_path: str | Path, out_path: str | Path, precision: str,
                          keep_fp32: Iterable[str] = KEEP_FP32_PATTERNS) -> PrecisionReport:
    """Read ``onnx_path`` (with its external data), convert (:func:`convert_to_mixed_precision`)
    and write ``out_path`` (weights in ``<out_path>.data`` when over 2 GiB)."""
    import onnx  # function-local: onnx is an optional heavy dependency (the export/gpu extras)

    model = onnx.load(str(onnx_path))
    report = convert_to_mixed_precision(model, precision, keep_fp32)
    out_path = Path(out_path)
    data = out_path.with_name(out_path.name + ".data")
    for stale in (out_path, data):
        stale.unlink(missing_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_LIMIT:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out_path))
    return report

"""TensorRT engines for the GPU target: exported ONNX → mixed-precision ONNX → ``<component>.plan``.

Steps for each served component (``export/specs.py``):

1. **Mixed precision in the graph.** TensorRT 11 builds only strongly typed networks (the
   fp16/bf16 builder flags and per-layer precision constraints of 10.x are gone), so the
   precision is written into the ONNX graph before parsing (:func:`convert_to_mixed_precision`):
   every matrix product and convolution (``MatMul``/``Gemm``/``Conv``/``ConvTranspose``: the
   FLOPs) runs in fp16 or bf16 with its weights stored in that type, while everything else
   (norms, softmax, residual adds, RoPE, timestep features, masks) stays fp32, with ``Cast``
   nodes at the boundaries. Kept in fp32 on purpose, because upstream computes them in fp32:
   the products of the linear attention (the DiT's self-attention and the DCAE's EfficientViT
   attention: ReLU-kernel sums over thousands of frames overflow fp16), see
   :data:`KEEP_FP32_PATTERNS`. The UMT5 text encoder stays fp32 in fp16 builds (T5 activations
   overflow fp16; it runs once per request). Graph inputs and outputs keep the contract's FP32.
2. **Dynamic profile** per component (:func:`profile_shapes`): batch 1 … ``max_items`` ×
   ``rows_per_item`` (items × CFG branches for the DiT, what the renderer's ``--max-items``
   writes as ``max_batch_size``), latent frames 1 … 2583 (240 s), text and lyric tokens up to
   the served limits. ERG query scales are ordinary graph inputs ``[B, layers]``.
3. **Build** with a shared timing cache, and write a JSON sidecar ``<component>.plan.json``
   (TensorRT version, GPU, compute capability, precision, profile). :func:`check_engine`
   compares it with the running machine and names every difference, because a plan built by
   another TensorRT or for another GPU otherwise fails with an opaque deserialisation error.

LoRA: engines are built from weights, so an adapter is fused into the torch transformer first
(by the LoRA code) and that module is passed to :func:`build_engines` (``modules=``), which
re-exports it.

Command line (``acestep-triton trt ...``)::

    trt --onnx-dir D --out E --precision fp16|bf16 [--max-batch N] [--max-frames 2583]
    trt --check E        # do the engines in E fit this machine?

``tensorrt`` is imported lazily (the ``gpu`` extra), so this module imports and most of it runs
(profiles, precision conversion, sidecars) on machines without it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from acestep_client.limits import DCAE_WINDOW_FRAMES as LIMITS_DCAE_WINDOW_FRAMES
from acestep_client.limits import LYRIC_MAX_TOKENS as LIMITS_LYRIC_MAX_TOKENS
from acestep_client.limits import MAX_FRAMES, OVERLAP_MIN_DURATION_S, PROMPT_MAX_TOKENS

from . import specs
from .engine_meta import (  # noqa: F401 (re-exported: the engine API)
    SIDECAR_SUFFIX,
    EngineBuildError,
    EngineMeta,
    EngineMismatchError,
    RuntimeInfo,
    check_engine,
    import_tensorrt,
)
from .specs import ComponentSpec, read_onnx_sizes

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

DEFAULT_MAX_ITEMS = 4
"""Songs per request the engines are sized for by default (the DiT profile then goes to 12 rows)."""

DEFAULT_MAX_FRAMES = MAX_FRAMES
"""Latent frames of 240 s (``int(240 · 44100 / 4096)``), the longest song served."""

OPT_FRAMES = 645
"""Latent frames of 60 s: where the DiT's profile is tuned."""

TEXT_MAX_TOKENS = PROMPT_MAX_TOKENS
LYRIC_MAX_TOKENS = LIMITS_LYRIC_MAX_TOKENS
DCAE_WINDOW_FRAMES = LIMITS_DCAE_WINDOW_FRAMES
"""Engine profiles follow the served limits (``acestep_client.limits``, torch-free, so building
engines does not import transformers): songs past ``OVERLAP_MIN_DURATION_S`` decode in windows
of ``DCAE_WINDOW_FRAMES`` latent frames, so the DCAE decoder and the vocoder never see more
than a 48 s song at once."""

MEL_PER_LATENT = 8
"""Mel frames per latent frame (the DCAE's time compression)."""

OPT_ROWS = {"dit_decoder": 2, "condition_encoder": 2, "text_encoder": 2}
"""Typical batch of one request: conditional + unconditional branch (text-only is rare)."""

TIMING_CACHE = "timing.cache"

_HALF_ONNX = {"fp16": 10, "bf16": 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16
_FLOAT_ONNX = 1



# ------------------------------------------------------------------------------- profiles
Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


def latent_frames(seconds: float) -> int:
    """Latent frames of ``seconds`` of audio (``sampling.noise.latent_frames``)."""
    return int(seconds * 44100 / 512 / 8)


def decode_max_frames(max_frames: int = DEFAULT_MAX_FRAMES) -> int:
    """Largest latent window the DCAE decoder gets: a whole song up to 48 s, else 512-frame windows."""
    return min(max_frames, max(latent_frames(OVERLAP_MIN_DURATION_S), DCAE_WINDOW_FRAMES))


def dynamic_ranges(spec: ComponentSpec, max_items: int = DEFAULT_MAX_ITEMS,
                   max_frames: int = DEFAULT_MAX_FRAMES) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic symbol ``spec`` uses, for engines serving requests of up
    to ``max_items`` songs and ``max_frames`` latent frames."""
    if max_items < 1 or max_frames < 1:
        raise ValueError(f"max_items and max_frames must be >= 1 (got {max_items}, {max_frames})")
    rows = spec.max_batch(max_items)
    batch = (1, min(rows, OPT_ROWS.get(spec.name, spec.rows_per_item)), rows)
    text = (1, 64, TEXT_MAX_TOKENS)
    lyric = (1, 256, LYRIC_MAX_TOKENS)
    # The decoders only ever see one window or a song of at most 48 s (overlapped decode).
    windowed = spec.name in ("dcae_decoder", "vocoder")
    longest = decode_max_frames(max_frames) if windowed else max_frames
    if spec.name == "dcae_encoder":
        longest += 1  # a source of the longest duration pads to one more frame (then cut, pipeline.py)
    frames = (1, min(OPT_FRAMES, longest), longest)
    mel = tuple(MEL_PER_LATENT * f for f in frames)
    ranges = {"B": batch, "T": text, "Tl": lyric, "S": tuple(1 + t + ly for t, ly in zip(text, lyric, strict=True)),
              "W": frames, "F": mel}
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    return {k: v for k, v in ranges.items() if k in used}  # type: ignore[misc]


def profile_shapes(spec: ComponentSpec, sizes: Mapping[str, int], max_items: int = DEFAULT_MAX_ITEMS,
                   max_frames: int = DEFAULT_MAX_FRAMES) -> ProfileShapes:
    """The optimisation profile: input name → (min, opt, max) shapes.

    ``sizes`` gives the checkpoint-fixed symbols (``D``, ``Ld``...; read from the ONNX file with
    :func:`acestep_triton.export.render.read_onnx_sizes`).
    """
    ranges = dynamic_ranges(spec, max_items, max_frames)
    out: ProfileShapes = {}
    for tensor in spec.inputs:
        bounds: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if isinstance(dim, int):
                values = (dim, dim, dim)
            elif dim in ranges:
                values = ranges[dim]
            elif dim in sizes:
                values = (int(sizes[dim]),) * 3
            else:
                raise ValueError(f"{spec.name}.{tensor.name}: size of {dim!r} unknown (sizes: {dict(sizes)})")
            for bound, value in zip(bounds, values, strict=True):
                bound.append(int(value))
        out[tensor.name] = (tuple(bounds[0]), tuple(bounds[1]), tuple(bounds[2]))
    return out


def fixed_profile(spec: ComponentSpec, sizes: Mapping[str, int], *, batch: tuple[int, int, int],
                  lengths: Mapping[str, int]) -> ProfileShapes:
    """A profile with fixed lengths (``{"W": 645, "S": 300}``) and a batch range: quicker to build
    and the fastest kernels for one shape (benchmarks, CUDA-graph deployments)."""
    fixed = {**{k: int(v) for k, v in sizes.items()}, **{k: int(v) for k, v in lengths.items()}}
    out: ProfileShapes = {}
    for tensor in spec.inputs:
        bounds: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if dim == specs.BATCH:
                values = batch
            elif isinstance(dim, int):
                values = (dim,) * 3
            elif dim in fixed:
                values = (fixed[dim],) * 3
            else:
                raise ValueError(f"{spec.name}.{tensor.name}: give a length for {dim!r}")
            for bound, value in zip(bounds, values, strict=True):
                bound.append(int(value))
        out[tensor.name] = (tuple(bounds[0]), tuple(bounds[1]), tuple(bounds[2]))
    return out


# ------------------------------------------------------------------------------- precision
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
        return {"precision": self.precision, "half_nodes": self.half_nodes, "casts": self.casts,
                "half_initializers": self.half_initializers,
                "fp32_heavy_nodes": len(self.fp32_heavy_nodes)}


def keeps_fp32(node_name: str, patterns: Iterable[str] = KEEP_FP32_PATTERNS) -> bool:
    """Whether a heavy node stays fp32 under ``patterns``."""
    return any(re.search(p, node_name) for p in patterns)


def _half_tensor(array: Any, name: str, precision: str) -> Any:
    """An ONNX initializer holding ``array`` (fp32 numpy) in fp16 or bf16."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    array = np.asarray(array, dtype=np.float32)
    if precision == "fp16":
        finite = np.finfo(np.float16).max
        return numpy_helper.from_array(np.clip(array, -finite, finite).astype(np.float16), name)
    import torch

    bits = torch.from_numpy(np.array(array, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = TensorProto.BFLOAT16
    tensor.dims.extend(array.shape)
    tensor.raw_data = bits.tobytes()
    return tensor


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
    from onnx import helper, numpy_helper

    if precision not in _HALF_ONNX:
        raise ValueError(f"convert_to_mixed_precision: precision must be fp16 or bf16, got {precision!r}")
    half_type = _HALF_ONNX[precision]
    patterns = tuple(keep_fp32)
    graph = model.graph
    report = PrecisionReport(precision=precision)
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    known_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    known_types.update({name: t.data_type for name, t in initializers.items()})
    taken = set(initializers) | set(producer) | {v.name for v in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def source_initializer(name: str) -> str | None:
        seen = 0
        while name not in initializers:
            node = producer.get(name)
            if node is None or node.op_type != "Identity" or seen > 64:
                return None
            name, seen = node.input[0], seen + 1
        return name

    half_weights: dict[str, str] = {}
    half_activations: dict[str, str] = {}
    new_nodes: list[Any] = []

    def half_weight(name: str) -> str:
        if name not in half_weights:
            array = numpy_helper.to_array(initializers[name])
            half_name = fresh(f"{name}__{precision}")
            graph.initializer.append(_half_tensor(array, half_name, precision))
            half_weights[name] = half_name
            report.half_initializers += 1
        return half_weights[name]

    def half_activation(name: str) -> str:
        if name not in half_activations:
            half_name = fresh(f"{name}__{precision}")
            new_nodes.append(helper.make_node("Cast", [name], [half_name], to=half_type,
                                              name=fresh(f"{name}/cast_to_{precision}")))
            half_activations[name] = half_name
            report.casts += 1
        return half_activations[name]

    for node in list(graph.node):
        heavy = node.op_type in HEAVY_OPS
        if not heavy:
            new_nodes.append(node)
            continue
        if keeps_fp32(node.name, patterns) or any(
                known_types.get(x, _FLOAT_ONNX) not in (_FLOAT_ONNX, 0) for x in node.input if x):
            report.fp32_heavy_nodes.append(node.name)
            new_nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            source = source_initializer(name)
            node.input[i] = half_weight(source) if source is not None else half_activation(name)
        new_nodes.append(node)
        for j, out in enumerate(node.output):
            half_out = fresh(f"{out}__{precision}")
            node.output[j] = half_out
            new_nodes.append(helper.make_node("Cast", [half_out], [out], to=_FLOAT_ONNX,
                                              name=fresh(f"{node.name}/cast_to_fp32")))
            half_activations[out] = half_out
            report.casts += 1
        report.half_nodes += 1

    del graph.node[:]
    graph.node.extend(_prune_dead_identities(new_nodes, {o.name for o in graph.output}))
    used = {x for node in graph.node for x in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return report


def _prune_dead_identities(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop ``Identity`` nodes nobody reads any more (weights now read in half directly)."""
    while True:
        used = {x for node in nodes for x in node.input} | outputs
        alive = [n for n in nodes if n.op_type != "Identity" or any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


EXTERNAL_DATA_LIMIT = 2**31 - 2**26
"""Weights above this many bytes go to an external data file (protobuf's 2 GiB limit)."""


def write_mixed_precision(onnx_path: str | Path, out_path: str | Path, precision: str,
                          keep_fp32: Iterable[str] = KEEP_FP32_PATTERNS) -> PrecisionReport:
    """Read ``onnx_path`` (with its external data), convert (:func:`convert_to_mixed_precision`)
    and write ``out_path`` (weights in ``<out_path>.data`` when over 2 GiB)."""
    import onnx

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


# ------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildOptions:
    """How engines are built (defaults: bf16, 4 songs per request, up to 240 s)."""

    precision: str = "bf16"
    max_items: int = DEFAULT_MAX_ITEMS
    max_frames: int = DEFAULT_MAX_FRAMES
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    keep_fp32: tuple[str, ...] = KEEP_FP32_PATTERNS
    optimization_level: int | None = None
    lora: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def _strongly_typed_flags(trt: Any) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks; "
                               "TensorRT >= 10 is needed")
    return 1 << int(flag)


def _parser_errors(parser: Any) -> str:
    lines = []
    for i in range(int(parser.num_errors)):
        error = parser.get_error(i)
        desc = error.desc() if hasattr(error, "desc") else str(error)
        lines.append(str(desc))
    return "\n  ".join(lines) or "(no parser message)"


def build_engine(onnx_path: str | Path, plan_path: str | Path, component: str | ComponentSpec, *,
                 options: BuildOptions = BuildOptions(), shapes: ProfileShapes | None = None,
                 runtime: RuntimeInfo | None = None, trt: Any = None) -> EngineMeta:
    """Build one component's engine from its exported (fp32) ONNX file; write the plan and its
    sidecar; return the metadata.

    ``shapes`` overrides the profile (default :func:`profile_shapes` from ``options``).
    ``runtime`` is recorded in the sidecar (default: this machine). The timing cache in
    ``options.timing_cache`` is read when present and written back after the build.
    """

    trt = trt or import_tensorrt()
    spec = specs.component(component) if isinstance(component, str) else component
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    sizes = read_onnx_sizes(spec, onnx_path)
    shapes = shapes or profile_shapes(spec, sizes, options.max_items, options.max_frames)
    missing = [t.name for t in spec.inputs if t.name not in shapes]
    if missing:
        raise ValueError(f"{spec.name}: the profile lacks inputs {missing}")
    precision = component_precision(spec.name, options.precision)
    runtime = runtime or RuntimeInfo.current(trt)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=plan_path.parent, prefix=f".{spec.name}.") as tmp:
        source, report = onnx_path, PrecisionReport(precision="fp32")
        if precision != "fp32":
            source = Path(tmp) / f"{spec.name}.{precision}.onnx"
            report = write_mixed_precision(onnx_path, source, precision, options.keep_fp32)
        logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(_strongly_typed_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            raise EngineBuildError(f"{spec.name}: TensorRT could not parse {onnx_path.name}:\n  "
                                   f"{_parser_errors(parser)}")
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        if inputs != list(spec.input_names):
            raise EngineBuildError(f"{spec.name}: network inputs {inputs} differ from the contract "
                                   f"{list(spec.input_names)}")
        config = builder.create_builder_config()
        if options.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
        if options.optimization_level is not None:
            config.builder_optimization_level = int(options.optimization_level)
        profile = builder.create_optimization_profile()
        for name in spec.input_names:
            low, opt, high = shapes[name]
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        cache_path = Path(options.timing_cache) if options.timing_cache else None
        cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(f"{spec.name}: TensorRT failed to build the engine (see its log above)")
        staged = Path(tmp) / "engine.plan"
        staged.write_bytes(bytes(memoryview(plan)))
        os.replace(staged, plan_path)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    from ..weights import file_sha256  # imports torch: this module stays importable without it

    meta = EngineMeta(
        component=spec.name, tensorrt=runtime.tensorrt, gpu=runtime.gpu,
        compute_capability=runtime.compute_capability, precision=precision,
        profile={k: [list(s) for s in v] for k, v in shapes.items()},
        max_batch=max(v[2][0] for v in shapes.values()) if spec.batchable else 0,
        onnx=onnx_path.name, onnx_sha256=file_sha256(onnx_path),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_s=round(time.monotonic() - started, 1), lora=options.lora,
        precision_report=report.as_dict(), keep_fp32=list(options.keep_fp32))
    meta.write(plan_path)
    return meta


def fused_transformer_modules(transformer: Any) -> dict[str, Any]:
    """``modules=`` for :func:`build_engines` from a transformer with a LoRA already fused into
    its weights: both transformer components are re-exported from it."""
    return {"condition_encoder": transformer, "dit_decoder": transformer}


def export_modules(modules: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Export torch modules (e.g. a LoRA-fused transformer) to ``out_dir/<component>.onnx``,
    tracing on the module's own device."""
    from ..component_graphs import export_graph
    from .onnx_export import EXPORT_EXAMPLE, export_component

    paths = {}
    for name, module in modules.items():
        device = next(module.parameters()).device
        example = export_graph(name, module).example_inputs(*EXPORT_EXAMPLE, seed=0)
        example = {k: v.to(device) for k, v in example.items()}
        paths[name] = export_component(name, module, Path(out_dir) / f"{name}.onnx", example_inputs=example)
    return paths


def build_engines(onnx_dir: str | Path | None, out_dir: str | Path, options: BuildOptions = BuildOptions(), *,
                  names: Sequence[str] | None = None, modules: Mapping[str, Any] | None = None,
                  runtime: RuntimeInfo | None = None, trt: Any = None,
                  progress: bool = True) -> dict[str, EngineMeta]:
    """Build ``out_dir/<component>.plan`` (+ sidecar) for every component (or ``names``).

    ``modules`` maps component names to torch modules to export first instead of reading
    ``onnx_dir/<component>.onnx`` (the LoRA hook: pass :func:`fused_transformer_modules`).
    All builds share one timing cache (``options.timing_cache``, default ``out_dir/timing.cache``).
    Every component is attempted; failures are raised together at the end.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(names) if names is not None else list(specs.COMPONENTS)
    for name in wanted:
        specs.component(name)
    if options.timing_cache is None:
        options = replace(options, timing_cache=out_dir / TIMING_CACHE)
    sources: dict[str, Path] = {}
    if modules:
        sources.update(export_modules({k: v for k, v in modules.items() if k in wanted}, out_dir / "onnx"))
    for name in wanted:
        if name not in sources:
            if onnx_dir is None:
                raise ValueError(f"{name}: no onnx_dir and no module to export")
            sources[name] = Path(onnx_dir) / f"{name}.onnx"
            if not sources[name].is_file():
                raise FileNotFoundError(f"{sources[name]} not found (export it with `acestep-triton onnx`)")
    results: dict[str, EngineMeta] = {}
    failures: list[str] = []
    for i, name in enumerate(wanted, start=1):
        if progress:
            print(f"[{i}/{len(wanted)}] {name}: building ({options.precision})", file=sys.stderr, flush=True)
        try:
            meta = build_engine(sources[name], out_dir / f"{name}.plan", name, options=options,
                                runtime=runtime, trt=trt)
        except (EngineBuildError, ValueError) as exc:
            failures.append(f"{name}: {exc}")
            continue
        results[name] = meta
        if progress:
            size = (out_dir / f"{name}.plan").stat().st_size / 1e6
            print(f"[{i}/{len(wanted)}] {name}: {meta.precision}, {size:.1f} MB, {meta.build_s:.0f} s, "
                  f"{meta.precision_report.get('half_nodes', 0)} half / "
                  f"{meta.precision_report.get('fp32_heavy_nodes', 0)} fp32 heavy ops", file=sys.stderr,
                  flush=True)
    if failures:
        raise EngineBuildError("engine builds failed:\n  " + "\n  ".join(failures))
    return results


def check_engine_dir(engine_dir: str | Path, runtime: RuntimeInfo | None = None, *,
                     strict_gpu_name: bool = True) -> dict[str, EngineMeta]:
    """:func:`check_engine` for every ``*.plan`` in ``engine_dir``; all problems reported together."""
    plans = sorted(Path(engine_dir).glob("*.plan"))
    if not plans:
        raise EngineMismatchError(f"no *.plan files in {engine_dir}")
    runtime = runtime or RuntimeInfo.current()
    metas, problems = {}, []
    for plan in plans:
        try:
            metas[plan.stem] = check_engine(plan, runtime, strict_gpu_name=strict_gpu_name)
        except EngineMismatchError as exc:
            problems.append(str(exc))
    if problems:
        raise EngineMismatchError("\n".join(problems))
    return metas


# ------------------------------------------------------------------------------- runtime
def _torch_dtypes(trt: Any) -> dict[Any, Any]:
    import torch

    pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in pairs.items() if hasattr(trt.DataType, k)}


class TensorRTEngine:
    """Runs a plan on torch tensors (in-process GPU path and benchmarks).

    Inputs are moved to the engine's device and dtype; outputs are allocated by torch on the
    current CUDA stream, so the call composes with torch code without extra synchronisation.
    """

    def __init__(self, plan: str | Path, *, device: Any = "cuda", check: bool = True, trt: Any = None,
                 runtime: RuntimeInfo | None = None) -> None:
        import torch

        self.trt = trt or import_tensorrt()
        self.device = torch.device(device)
        self.plan = Path(plan)
        self.meta = check_engine(self.plan, runtime) if check else None
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"{self.plan}: TensorRT could not deserialise the plan (built by another "
                                      f"TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        dtypes = _torch_dtypes(self.trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def _stream(self) -> int:
        import torch

        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on ``{input name: tensor}``; return ``{output name: tensor}``."""
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.plan.name}: missing inputs {missing}")
        feeds = []
        for name in self.input_names:
            tensor = inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            feeds.append(tensor)  # keep alive until the launch is queued
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{self.plan.name}: input {name} shape {tuple(tensor.shape)} is outside the "
                                 f"engine's profile {self.meta.profile.get(name) if self.meta else ''}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not self.context.execute_async_v3(self._stream()):
            raise RuntimeError(f"{self.plan.name}: TensorRT execution failed")
        return outputs


class TensorRTDecoder:
    """``transformer.decode``'s signature over a ``dit_decoder`` engine (per-row query scales)."""

    def __init__(self, engine: TensorRTEngine) -> None:
        self.engine = engine

    def __call__(self, latents: Any, latent_mask: Any, encoder_states: Any, encoder_mask: Any, timestep: Any,
                 query_scale: Any) -> Any:
        rows = latents.shape[0]
        if query_scale.dim() == 1:
            query_scale = query_scale.unsqueeze(0).expand(rows, -1)
        out = self.engine({"latents": latents, "latent_mask": latent_mask, "encoder_states": encoder_states,
                           "encoder_mask": encoder_mask, "timestep": timestep.reshape(-1).expand(rows),
                           "query_scale": query_scale})
        return out["velocity"]


# ------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``--onnx-dir D --out E --precision fp16|bf16 [--max-batch N] [--max-frames F]`` or ``--check E``."""
    parser = argparse.ArgumentParser(
        prog="acestep-triton trt",
        description="Build TensorRT engines (mixed precision, dynamic batch/length profile, timing cache, "
                    "JSON sidecar) for the served components, or check built engines against this machine.")
    parser.add_argument("--onnx-dir", type=Path, help="exported <component>.onnx files (acestep-triton onnx)")
    parser.add_argument("--out", type=Path, help="folder for <component>.plan (+ .plan.json, timing.cache)")
    parser.add_argument("--check", type=Path, metavar="ENGINE_DIR",
                        help="only check the engines in ENGINE_DIR against this TensorRT and GPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--max-batch", "--max-items", dest="max_items", type=int, default=DEFAULT_MAX_ITEMS,
                        help="songs per request the engines serve; each profile goes up to this times the "
                             "component's rows per song (DiT: 3 CFG branches). Render the repository with "
                             "the same --max-items")
    parser.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                        help="longest song in latent frames (2583 = 240 s)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(specs.COMPONENTS)}")
    parser.add_argument("--timing-cache", type=Path, default=None, help="default: OUT/timing.cache")
    parser.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit")
    parser.add_argument("--opt-level", type=int, default=None, help="builder optimisation level (0-5)")
    parser.add_argument("--keep-fp32", action="append", default=None, metavar="REGEX",
                        help="heavy ONNX nodes to keep in fp32 (default: the linear-attention products)")
    parser.add_argument("--any-gpu-model", action="store_true",
                        help="--check: accept another GPU model of the same compute capability")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.check is not None:
            metas = check_engine_dir(args.check, strict_gpu_name=not args.any_gpu_model)
            for name, meta in metas.items():
                print(f"{name}: ok ({meta.precision}, TensorRT {meta.tensorrt}, {meta.gpu})")
            return 0
        if args.onnx_dir is None or args.out is None:
            parser.error("give --onnx-dir and --out (or --check ENGINE_DIR)")
        names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        options = BuildOptions(precision=args.precision, max_items=args.max_items, max_frames=args.max_frames,
                               workspace_gib=args.workspace_gib, timing_cache=args.timing_cache,
                               keep_fp32=tuple(args.keep_fp32) if args.keep_fp32 else KEEP_FP32_PATTERNS,
                               optimization_level=args.opt_level, verbose=args.verbose)
        metas = build_engines(args.onnx_dir, args.out, options, names=names)
    except (EngineBuildError, EngineMismatchError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1
    for name in metas:
        print(args.out / f"{name}.plan")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TensorRT engines for the ``tensorrt`` runtime of the gpu target: exported ONNX → ``<component>.plan``.

The gpu target's default runtime is ``torch`` (the checkpoint's own modules, measured fastest);
``acestep-triton build --target gpu --runtime tensorrt`` serves ``tensorrt_plan`` models instead,
built here for each served component (``export/specs.py``):

1. **Mixed precision in the graph** (:mod:`acestep_triton.export.mixed_precision`): TensorRT 11
   builds only strongly typed networks, so the heavy ops are rewritten to fp16/bf16 in the ONNX
   graph before parsing, the precision-sensitive ones kept fp32.
2. **Dynamic profile** per component (:mod:`acestep_triton.export.engine_profiles`): batch up to
   ``max_items`` × ``rows_per_item``, latent frames up to 240 s, tokens up to the served limits.
3. **Build** with a shared timing cache (:func:`build_engine`), and write a JSON sidecar
   ``<component>.plan.json`` (TensorRT version, GPU, compute capability, precision, profile;
   :mod:`acestep_triton.export.engine_meta`), because a plan built by another TensorRT or for
   another GPU otherwise fails with an opaque deserialisation error.

LoRA: engines are built from weights. A deployment's fused variants (``<component>__<adapter>``)
are ONNX files the LoRA code exports with the adapter fused in (``lora.prepare_lora_onnx_dir``);
:func:`build_engine` builds each under its base component's contract. :func:`build_engines` can
also take torch modules with an adapter already fused (``modules=``, see
:func:`fused_transformer_modules`) and export them first.

``tensorrt`` (the ``gpu`` extra) is imported when a build starts (:func:`import_tensorrt`), so this
module imports, and profiles, precision conversion and sidecars work, on machines without it.
The command line is :mod:`acestep_triton.export.engine_cli`; running a plan in process is
:mod:`acestep_triton.export.engine_runner`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import specs
from .engine_meta import EngineBuildError, EngineMeta, RuntimeInfo, import_tensorrt
from .engine_profiles import DEFAULT_MAX_FRAMES, DEFAULT_MAX_ITEMS, ProfileShapes, profile_shapes
from .mixed_precision import (
    KEEP_FP32_PATTERNS,
    PRECISIONS,
    PrecisionReport,
    component_precision,
    write_mixed_precision,
)
from .specs import ComponentSpec, read_onnx_sizes

TIMING_CACHE = "timing.cache"
"""File name of the timing cache every build of a folder shares (tactic timings, reused)."""


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
    """Network creation flags of a strongly typed network: the precision is the graph's own."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no strongly typed networks; "
                               "TensorRT >= 10 is needed")
    return 1 << int(flag)


def _parser_errors(parser: Any) -> str:
    """Every error the ONNX parser recorded, one per line (what a failed build is explained by)."""
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
        _build_plan(trt, spec, source, onnx_path.name, plan_path, Path(tmp), shapes, options)
    from ..weights import file_sha256  # function-local: imports torch (heavy), which importing this must not need

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


def _build_plan(trt: Any, spec: ComponentSpec, source: Path, onnx_name: str, plan_path: Path, tmp: Path,
                shapes: ProfileShapes, options: BuildOptions) -> None:
    """Parse ``source`` into a strongly typed network, build it for ``shapes`` with the shared
    timing cache, and move the plan into ``plan_path`` only once it is complete."""
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)  # owns the weights the network refers to: alive until built
    if not parser.parse_from_file(str(source)):
        raise EngineBuildError(f"{spec.name}: TensorRT could not parse {onnx_name}:\n  "
                               f"{_parser_errors(parser)}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != list(spec.input_names):
        raise EngineBuildError(f"{spec.name}: network inputs {inputs} differ from the contract "
                               f"{list(spec.input_names)}")
    config = _builder_config(trt, builder, spec, shapes, options)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{spec.name}: TensorRT failed to build the engine (see its log above)")
    staged = tmp / "engine.plan"
    staged.write_bytes(bytes(memoryview(plan)))
    os.replace(staged, plan_path)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))


def _builder_config(trt: Any, builder: Any, spec: ComponentSpec, shapes: ProfileShapes,
                    options: BuildOptions) -> Any:
    """The builder configuration: ``options``' workspace and optimisation level, and one
    optimisation profile with ``shapes`` for every contract input."""
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
    return config


def fused_transformer_modules(transformer: Any) -> dict[str, Any]:
    """``modules=`` for :func:`build_engines` from a transformer with a LoRA already fused into
    its weights: both transformer components are re-exported from it."""
    return {"condition_encoder": transformer, "dit_decoder": transformer}


def export_modules(modules: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Export torch modules (e.g. a LoRA-fused transformer) to ``out_dir/<component>.onnx``,
    tracing on the module's own device."""
    # Function-local: the exporter imports torch and onnx (heavy); building from files needs neither.
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

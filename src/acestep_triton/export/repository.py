"""The model-repository writer: a runnable Triton repository from the configs and the files.

:func:`render_repository` writes every component (its ``config.pbtxt`` from
:mod:`acestep_triton.export.model_configs` and what its runtime serves: the Python-backend source
from ``model_repository/``, plus the ONNX file for ``onnx`` or the engine for ``tensorrt``) and
every endpoint (``config.pbtxt`` + the orchestrator source) into a folder. It renders into a
staging folder beside the target and swaps it in only when complete, and it only ever clears a
folder that carries its :data:`RENDER_MARKER`, so a failed or mistaken render never destroys
anything else. Where ``model_repository/`` is found when not given:
:mod:`acestep_triton.export.project_files`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from acestep_triton.export.engine_meta import EngineMeta
from acestep_triton.export.model_configs import (
    DEFAULT_MAX_ITEMS,
    OrchestratorSpec,
    check_runtime,
    checkpoint_sizes,
    component_config,
    orchestrator_config,
    with_endpoint_instances,
)
from acestep_triton.export.onnx_graph import all_tensors
from acestep_triton.export.project_files import default_sources_root
from acestep_triton.export.specs import COMPONENTS, ComponentSpec, component, read_onnx_sizes
from acestep_triton.export.triton_config import DynamicBatching, ModelConfigSpec, render_config

ONNX_COMPONENT_SOURCE = "onnx_component"
"""Source folder (under ``model_repository/``) of the onnxruntime component model."""
TORCH_COMPONENT_SOURCE = "torch_component"
"""Source folder (under ``model_repository/``) of the torch-runtime component model."""
RENDER_MARKER = ".acestep-rendered"
"""Written into every rendered repository; only such a folder is ever cleared by a re-render."""


def _onnx_files(path: Path) -> list[Path]:
    """The ONNX file and the external-data files it names (they must keep their names)."""
    import onnx  # function-local: onnx is an optional heavy dependency (the export extra)

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


def _source_dir(sources_root: Path | None, source: str | Path) -> Path:
    """A Python-backend model source folder: ``source`` itself when absolute, else under
    ``sources_root`` (resolved only now, so a render that copies no source needs no project)."""
    source = Path(source)
    if source.is_absolute():
        return source
    return (sources_root if sources_root is not None else default_sources_root()) / source


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
    comment = (f"Rendered by acestep_triton.export.repository for target {target!r}; "
               "edit the specs / ensemble_configs and re-render.")
    (folder / "config.pbtxt").write_text(render_config(model, comment=comment))
    return folder


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / RENDER_MARKER).is_file():
        raise FileExistsError(f"{out_dir} is not empty and was not rendered by us; refusing to clear it")


def render_repository(out_dir: str | Path, target: str = "cpu", onnx_dir: str | Path | None = None,
                      orchestrators: Sequence[OrchestratorSpec] = (), *,
                      components: Sequence[str | ComponentSpec] | None = None,
                      assets: str | Path | None = None, sizes: Mapping[str, int] | None = None,
                      engine_dir: str | Path | None = None, sources_root: str | Path | None = None,
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
    ``sources_root`` holds the Python-backend model sources (default: the project's
    ``model_repository/``, :func:`~acestep_triton.export.project_files.default_sources_root`).
    ``components=[]`` renders endpoints only. ``batching`` overrides the dynamic batching of
    the named components, ``component_parameters`` adds config parameters per model name (LoRA
    variants of the torch runtime), ``endpoint_parameters`` overrides parameters of every
    endpoint (e.g. ``frame_buckets``), ``endpoint_instances`` the instance count of every
    endpoint (an int) or of the named ones (``{"text2music": 8}``; see
    :func:`~acestep_triton.export.render_cli.parse_endpoint_instances`). Returns ``out_dir``.
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
                     engine_dir=engine_dir, sources_root=Path(sources_root) if sources_root is not None else None,
                     max_items=max_items, instance_count=instance_count, gpus=gpus,
                     max_queue_delay_us=max_queue_delay_us,
                     intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, runtime=runtime,
                     checkpoint=checkpoint, batching=batching or {},
                     component_parameters=component_parameters or {},
                     endpoint_parameters=endpoint_parameters or {})
        (staging / RENDER_MARKER).write_text("acestep_triton.export.repository output; replaced on re-render\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _render_into(out_dir: Path, target: str, specs: Sequence[ComponentSpec], onnx_dir: Path | None,
                 orchestrators: Sequence[OrchestratorSpec], *, assets: str | Path | None,
                 sizes: Mapping[str, int] | None, engine_dir: str | Path | None, sources_root: Path | None,
                 max_items: int, instance_count: int, gpus: Sequence[int], max_queue_delay_us: int,
                 intra_op_threads: int, inter_op_threads: int, runtime: str, checkpoint: str | Path | None,
                 batching: Mapping[str, DynamicBatching], component_parameters: Mapping[str, Mapping[str, str]],
                 endpoint_parameters: Mapping[str, str]) -> None:
    # Function-local: acestep_triton.lora imports torch (heavy), which the onnx and tensorrt
    # runtimes render without.
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
        _place_component_files(version, model, runtime, onnx_path, engine_dir, sources_root)

    for orch in orchestrators:
        if endpoint_parameters:
            orch = replace(orch, parameters={**orch.parameters, **endpoint_parameters})
        model = orchestrator_config(orch, Path(assets) if assets is not None else None, target, gpus)
        _copy_sources(_source_dir(sources_root, orch.source), _write_model(out_dir, model, target) / "1")


def _place_component_files(version: Path, model: ModelConfigSpec, runtime: str, onnx_path: Path | None,
                           engine_dir: str | Path | None, sources_root: Path | None) -> None:
    """Fill a component's version folder with what its runtime serves: the Python-backend source
    (torch; onnx with the ONNX file and its external data) or the engine (tensorrt; none given:
    an empty folder for engines built later)."""
    if runtime == "torch":
        _copy_sources(_source_dir(sources_root, TORCH_COMPONENT_SOURCE), version)
    elif runtime == "onnx":
        assert onnx_path is not None
        _copy_sources(_source_dir(sources_root, ONNX_COMPONENT_SOURCE), version)
        files = _onnx_files(onnx_path)
        _link_or_copy(files[0], version / "model.onnx")
        for data in files[1:]:
            _link_or_copy(data, version / data.name)
    else:
        version.mkdir()
        if engine_dir is not None:
            plan = Path(engine_dir) / f"{model.name}.plan"
            _check_engine_batch(plan, model)
            _link_or_copy(plan, version / "model.plan")

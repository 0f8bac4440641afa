"""From a checkpoint folder to a runnable model repository, in one call.

The demo command, the CLI's ``build`` step and the end-to-end tests all need the same chain
(ONNX export with parity, serving assets, rendered repository), so it lives here once.
Exports are cached by checkpoint content and export-code fingerprint, so a second build of the
same checkpoint only re-renders.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import load_components, meta_transformer
from ..export.engine_build import BuildOptions, build_engine
from ..export.model_configs import check_runtime, load_endpoints
from ..export.onnx_export import export_cached
from ..export.repository import render_repository
from ..export.specs import COMPONENTS, LORA_ROW_COMPONENTS, with_lora_rows
from ..lora import (
    LoraError,
    LoraRegistry,
    base_component,
    prepare_lora_onnx_dir,
    variant_specs,
    write_variants_manifest,
)
from ..lora.live import parse_budget_mb
from ..lora.live_control import LiveAdapterControl, write_control_model
from ..lora.state import LIVE_POINTER_FILE, STATE_FILE, write_live_pointer
from .assets import write_assets

LIVE_STATE_DIR = "lora_runtime"
"""Folder of a torch deployment's workdir that holds the live adapters' state file (the name
predates the "live adapters" name; tools look for ``lora_runtime/lora_state.json``)."""


@dataclass(frozen=True)
class Deployment:
    """The folders of a built deployment."""

    repository: Path
    assets: Path
    onnx_dir: Path | None
    """The ONNX export served (None for the torch runtime, which reads the checkpoint)."""


def build_deployment(ckpt_dir: str | Path, workdir: str | Path, *, vocab_path: str | Path | None = None,
                     endpoints: list[str] | None = None, components: Any = None,
                     onnx_dir: str | Path | None = None, progress: bool = False,
                     lora_dir: str | Path | None = None, target: str = "cpu", precision: str = "bf16",
                     runtime: str | None = None, lora_memory_mb: float | None = None,
                     **render_options: Any) -> Deployment:
    """Assets + ``workdir/repository`` for ``target`` and component ``runtime``:

    * ``onnx`` (cpu default): ONNX export (cached) run by onnxruntime;
    * ``tensorrt`` (gpu): ONNX export, then TensorRT engines of ``precision`` built here, on this GPU;
    * ``torch`` (gpu default, or cpu): no export; each component loads its torch modules from
      ``ckpt_dir`` at server start-up (compiled DiT blocks and CUDA graphs on a GPU).

    ``components`` may pass already loaded models of the checkpoint (saves loading them again);
    ``onnx_dir`` an existing export of this checkpoint (skips the export);
    ``render_options`` go to :func:`~acestep_triton.export.repository.render_repository`.
    LoRA adapters of ``lora_dir``: with ``onnx``/``tensorrt`` they become fused variant models
    (``<component>__<name>``, exported ONNX/engines); with ``torch`` they are live adapters
    (:func:`live_adapter_parameters`): any strength per request, loaded and unloaded while the server
    runs, within ``lora_memory_mb`` per transformer-component instance.
    """
    runtime = check_runtime(target, runtime)
    workdir = Path(workdir)
    assets = write_assets(ckpt_dir, workdir / "assets", vocab_path)
    (assets / LIVE_POINTER_FILE).unlink(missing_ok=True)  # live adapters only when configured below
    specs = list(COMPONENTS.values())
    if runtime == "torch":
        component_parameters: dict[str, dict[str, str]] = {}
        control: dict[str, str] | None = None
        if lora_dir is not None:
            control = live_adapter_parameters(ckpt_dir, lora_dir, workdir, assets, lora_memory_mb)
            specs = [with_lora_rows(s) for s in specs]
            for name in LORA_ROW_COMPONENTS:
                component_parameters[name] = {k: control[k] for k in ("lora_state", "lora_memory_mb")}
        repository = render_repository(workdir / "repository", target, None, load_endpoints(endpoints),
                                       assets=assets, components=specs, runtime="torch", checkpoint=ckpt_dir,
                                       component_parameters=component_parameters, **render_options)
        if control is not None:
            write_control_model(repository, control)
        return Deployment(repository=repository, assets=assets, onnx_dir=None)

    if onnx_dir is None:
        onnx = export_cached(ckpt_dir, workdir / "onnx", vocab_path=vocab_path, components=components,
                             progress=progress)
        onnx_dir = next(iter(onnx.values())).parent
    if lora_dir is not None:  # fused variants: <component>__<name> models, listed in the assets
        if components is None:
            components = load_components(ckpt_dir, vocab_path)
        variants = prepare_lora_onnx_dir(components, LoraRegistry.from_dir(lora_dir), onnx_dir,
                                         workdir / "onnx_lora", progress=progress)
        onnx_dir = workdir / "onnx_lora"
        write_variants_manifest(variants, assets)
        specs += variant_specs(variants)
    if runtime == "tensorrt":  # TensorRT engines, built on (and for) this machine's GPU
        engine_dir = workdir / "engines"
        engine_dir.mkdir(parents=True, exist_ok=True)
        options = BuildOptions(precision=precision, max_items=render_options.get("max_items", 4),
                               timing_cache=engine_dir / "timing.cache")
        for spec in specs:
            build_engine(Path(onnx_dir) / f"{spec.name}.onnx", engine_dir / f"{spec.name}.plan",
                         base_component(spec.name), options=options)
        render_options = {"max_items": options.max_items, **render_options, "engine_dir": engine_dir}
    repository = render_repository(workdir / "repository", target, onnx_dir, load_endpoints(endpoints),
                                   assets=assets, components=specs, runtime=runtime, **render_options)
    return Deployment(repository=repository, assets=assets, onnx_dir=Path(onnx_dir))


def live_adapter_parameters(ckpt_dir: str | Path, lora_dir: str | Path, workdir: Path, assets: Path,
                            lora_memory_mb: float | None = None) -> dict[str, str]:
    """Set up live adapters for a torch deployment; returns the control model's parameters.

    Every adapter folder of ``lora_dir`` is loaded now, checked against the checkpoint (a bad
    adapter fails the build, as with fused variants), into a fresh state file
    ``workdir/lora_runtime/lora_state.json``; the assets get the pointer the endpoints read.
    """
    root = Path(lora_dir).resolve()
    LoraRegistry.from_dir(root)  # the layout checks of the configured registry: errors name the folder
    state = workdir.resolve() / LIVE_STATE_DIR / STATE_FILE
    if state.parent.exists():
        shutil.rmtree(state.parent)
    memory = "" if lora_memory_mb is None else repr(float(lora_memory_mb))
    control = LiveAdapterControl(root, state, meta_transformer(ckpt_dir), budget_bytes=parse_budget_mb(memory))
    refused = control.reload()
    if refused:
        raise LoraError("LoRA adapters that cannot be served:\n  " + "\n  ".join(refused.values()))
    write_live_pointer(assets, state)
    return {"lora_dir": str(root), "lora_state": str(state), "lora_memory_mb": memory,
            "checkpoint_dir": str(Path(ckpt_dir).resolve())}

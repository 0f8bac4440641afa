"""From a checkpoint folder to a runnable CPU model repository, in one call.

The demo command, the CLI's ``build`` step and the end-to-end tests all need the same chain
(ONNX export with parity, serving assets, rendered repository), so it lives here once.
Exports are cached by checkpoint content and export-code fingerprint, so a second build of the
same checkpoint only re-renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import load_components
from ..export.onnx_export import export_cached
from ..export.render import load_endpoints, render_repository
from ..export.specs import COMPONENTS
from ..lora import LoraRegistry, base_component, prepare_lora_onnx_dir, variant_specs, write_variants_manifest
from .assets import write_assets


@dataclass(frozen=True)
class Deployment:
    """The folders of a built deployment."""

    repository: Path
    assets: Path
    onnx_dir: Path


def build_deployment(ckpt_dir: str | Path, workdir: str | Path, *, vocab_path: str | Path | None = None,
                         endpoints: list[str] | None = None, components: Any = None,
                         onnx_dir: str | Path | None = None, progress: bool = False,
                         lora_dir: str | Path | None = None, target: str = "cpu", precision: str = "bf16",
                         **render_options: Any) -> Deployment:
    """Export (cached) → assets → ``workdir/repository`` for ``target`` (cpu: ONNX run by
    onnxruntime; gpu: TensorRT engines of ``precision`` built here, on this GPU).

    ``components`` may pass already loaded models of the checkpoint (saves loading them again);
    ``onnx_dir`` an existing export of this checkpoint (skips the export);
    ``render_options`` go to :func:`~acestep_triton.export.render.render_repository`.
    """
    workdir = Path(workdir)
    if onnx_dir is None:
        onnx = export_cached(ckpt_dir, workdir / "onnx", vocab_path=vocab_path, components=components,
                             progress=progress)
        onnx_dir = next(iter(onnx.values())).parent
    assets = write_assets(ckpt_dir, workdir / "assets", vocab_path)
    specs = list(COMPONENTS.values())
    if lora_dir is not None:  # fused variants: <component>__<name> models, listed in the assets
        if components is None:
            components = load_components(ckpt_dir, vocab_path)
        variants = prepare_lora_onnx_dir(components, LoraRegistry.from_dir(lora_dir), onnx_dir,
                                         workdir / "onnx_lora", progress=progress)
        onnx_dir = workdir / "onnx_lora"
        write_variants_manifest(variants, assets)
        specs += variant_specs(variants)
    if target == "gpu":  # TensorRT engines, built on (and for) this machine's GPU
        from ..export.tensorrt import BuildOptions, build_engine

        engine_dir = workdir / "engines"
        engine_dir.mkdir(parents=True, exist_ok=True)
        options = BuildOptions(precision=precision, max_items=render_options.get("max_items", 4),
                               timing_cache=engine_dir / "timing.cache")
        for spec in specs:
            build_engine(Path(onnx_dir) / f"{spec.name}.onnx", engine_dir / f"{spec.name}.plan",
                         base_component(spec.name), options=options)
        render_options = {"max_items": options.max_items, **render_options, "engine_dir": engine_dir}
    repository = render_repository(workdir / "repository", target, onnx_dir, load_endpoints(endpoints),
                                   assets=assets, components=specs, **render_options)
    return Deployment(repository=repository, assets=assets, onnx_dir=Path(onnx_dir))

"""From a checkpoint folder to a runnable model repository, in one call.

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
from ..export.render import check_runtime, load_endpoints, render_repository
from ..export.specs import COMPONENTS
from ..lora import (
    LoraRegistry,
    LoraVariant,
    adapter_file,
    base_component,
    load_lora,
    prepare_lora_onnx_dir,
    variant_specs,
    write_variants_manifest,
)
from .assets import write_assets


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
                     runtime: str | None = None, **render_options: Any) -> Deployment:
    """Assets + ``workdir/repository`` for ``target`` and component ``runtime``:

    * ``onnx`` (cpu default): ONNX export (cached) run by onnxruntime;
    * ``tensorrt`` (gpu): ONNX export, then TensorRT engines of ``precision`` built here, on this GPU;
    * ``torch`` (gpu default, or cpu): no export; each component loads its torch modules from
      ``ckpt_dir`` at server start-up (compiled DiT blocks and CUDA graphs on a GPU).

    ``components`` may pass already loaded models of the checkpoint (saves loading them again);
    ``onnx_dir`` an existing export of this checkpoint (skips the export);
    ``render_options`` go to :func:`~acestep_triton.export.render.render_repository`.
    LoRA adapters of ``lora_dir`` become fused variant models (``<component>__<name>``) in every
    runtime: exported ONNX/engines, or torch models fusing the adapter when they load.
    """
    runtime = check_runtime(target, runtime)
    workdir = Path(workdir)
    assets = write_assets(ckpt_dir, workdir / "assets", vocab_path)
    specs = list(COMPONENTS.values())
    if runtime == "torch":
        component_parameters: dict[str, dict[str, str]] = {}
        if lora_dir is not None:
            registry = LoraRegistry.from_dir(lora_dir)
            variants = torch_lora_variants(ckpt_dir, registry, components)
            write_variants_manifest(variants, assets)
            specs += variant_specs(variants)
            for variant in variants:
                for model in variant.model_names:
                    component_parameters[model] = {
                        "lora_path": str(adapter_file(registry.adapters[variant.name]).resolve()),
                        "lora_weight": repr(variant.lora_weight)}
        repository = render_repository(workdir / "repository", target, None, load_endpoints(endpoints),
                                       assets=assets, components=specs, runtime="torch", checkpoint=ckpt_dir,
                                       component_parameters=component_parameters, **render_options)
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
                                   assets=assets, components=specs, runtime=runtime, **render_options)
    return Deployment(repository=repository, assets=assets, onnx_dir=Path(onnx_dir))


def torch_lora_variants(ckpt_dir: str | Path, registry: LoraRegistry, components: Any = None) -> list[LoraVariant]:
    """The variants of ``registry`` for the torch runtime: each adapter is read and checked
    against the checkpoint's transformer now (a bad adapter fails the build, not the server's
    start-up); the served models fuse it when they load."""
    from ..checkpoint import CheckpointLayout, load_transformer

    transformer = components.transformer if components is not None else load_transformer(
        CheckpointLayout(Path(ckpt_dir)))
    variants = []
    for name in registry:
        adapter = load_lora(registry.adapters[name], transformer, name=name)
        variants.append(LoraVariant(name=name, lora_weight=registry.weight(name), components=adapter.components,
                                    adapter_sha256=adapter.sha256))
    return variants

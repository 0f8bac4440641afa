"""Fused variant models (``dit_decoder__rap``): names, manifest, ONNX export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..export import onnx_export, specs
from .files import LORA_COMPONENTS, VARIANT_SEPARATOR, VARIANTS_FILE, LoraError, _read_json, load_lora
from .fuse import apply_lora
from .registry import LoraRegistry, check_adapter_name


def variant_model_name(component: str, adapter_name: str) -> str:
    """``condition_encoder`` + ``rap`` → ``condition_encoder__rap``."""
    return f"{component}{VARIANT_SEPARATOR}{adapter_name}"


def base_component(model_name: str) -> str:
    """The contract component a (possibly variant) model name serves: ``dit_decoder__rap`` →
    ``dit_decoder`` (for spec lookups such as ``request_shape`` in the BLS call)."""
    return model_name.split(VARIANT_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class LoraVariant:
    """One served adapter: its fused strength and the components it has own models for."""

    name: str
    lora_weight: float
    components: tuple[str, ...]
    adapter_sha256: str = ""

    def model_name(self, component: str) -> str:
        """The served model that runs ``component`` for requests naming this adapter."""
        return variant_model_name(component, self.name) if component in self.components else component

    @property
    def routes(self) -> dict[str, str]:
        """Component → variant model name, for the components this adapter touches."""
        return {c: variant_model_name(c, self.name) for c in self.components}

    @property
    def model_names(self) -> list[str]:
        return list(self.routes.values())

    def accepts(self, lora_weight: float) -> bool:
        """Whether a requested strength is the fused one (to fp32 wire precision)."""
        return math.isclose(float(lora_weight), self.lora_weight, rel_tol=1e-6, abs_tol=1e-6)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lora_weight": self.lora_weight, "components": list(self.components),
                "models": self.model_names, "adapter_sha256": self.adapter_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraVariant:
        components = tuple(str(c) for c in data["components"])
        unknown = [c for c in components if c not in LORA_COMPONENTS]
        if unknown:
            raise LoraError(f"LoRA variant {data.get('name')!r}: unknown components {unknown}")
        return cls(name=check_adapter_name(str(data["name"])), lora_weight=float(data["lora_weight"]),
                   components=components, adapter_sha256=str(data.get("adapter_sha256", "")))


def variant_specs(variants: Sequence[LoraVariant]) -> list[Any]:
    """Contract specs (``export.specs.ComponentSpec``) renamed to every variant model, for
    ``render_repository(components=[*COMPONENTS.values(), *variant_specs(variants)])``."""
    return [dataclasses.replace(specs.component(c), name=variant_model_name(c, v.name))
            for v in variants for c in v.components]


def write_variants_manifest(variants: Sequence[LoraVariant], folder: str | Path,
                            extra: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write :data:`VARIANTS_FILE` into ``folder`` (``extra``: more fields per variant name)."""
    path = Path(folder) / VARIANTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{**v.to_dict(), **(extra or {}).get(v.name, {})} for v in variants]
    path.write_text(json.dumps({"variants": entries}, indent=2) + "\n")
    return path


def read_variants_manifest(folder: str | Path) -> list[LoraVariant]:
    """The variants listed in ``folder/lora_variants.json``; none when the file is absent."""
    path = Path(folder) / VARIANTS_FILE
    if not path.is_file():
        return []
    return [LoraVariant.from_dict(entry) for entry in _read_json(path).get("variants", [])]


def _transformer_of(components: Any) -> nn.Module:
    """The transformer from a ``checkpoint.Components``, a component mapping, or itself."""
    if isinstance(components, nn.Module):
        return components
    if isinstance(components, Mapping):
        for key in ("transformer", "dit_decoder", "condition_encoder"):
            if key in components:
                return components[key]
        raise KeyError("components: no 'transformer' (or 'dit_decoder') entry")
    return components.transformer


def export_lora_variants(components: Any, registry: LoraRegistry, onnx_dir: str | Path, *,
                         parity: bool = True, scaling: str = "upstream", skip_existing: bool = False,
                         base_key: str = "", progress: bool = False, opset: int | None = None,
                         rtol: float | None = None) -> list[LoraVariant]:
    """Export ``<component>__<name>.onnx`` for every adapter of ``registry`` into ``onnx_dir``.

    Each adapter is fused at its configured strength (in place, restored afterwards) and only
    the components it touches are exported, each checked with onnxruntime against the fused
    torch model (as :func:`~acestep_triton.export.onnx_export.export_all` does). Writes
    :data:`VARIANTS_FILE` beside the files (with parity numbers) and returns the variants, which
    the deployment copies into the assets (:func:`write_variants_manifest`) and renders
    (:func:`variant_specs`). ``skip_existing`` reuses files whose manifest entry has the same
    adapter bytes, strength, scaling mode and ``base_key`` (a caller's fingerprint of the base
    model, see :func:`prepare_lora_onnx_dir`): without a ``base_key``, only safe in a folder tied
    to one checkpoint and export code, such as ``export_cached``'s keyed folder.
    """
    transformer = _transformer_of(components)
    onnx_dir = Path(onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    opset = onnx_export.DEFAULT_OPSET if opset is None else opset
    rtol = onnx_export.FP32_RTOL if rtol is None else rtol
    previous = {}
    if skip_existing and (onnx_dir / VARIANTS_FILE).is_file():
        previous = {e["name"]: e for e in _read_json(onnx_dir / VARIANTS_FILE).get("variants", [])}
    variants: list[LoraVariant] = []
    extra: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name in registry:
        weight = registry.weight(name)
        adapter = load_lora(registry.adapters[name], transformer, scaling=scaling, name=name)
        variant = LoraVariant(name=name, lora_weight=weight, components=adapter.components,
                              adapter_sha256=adapter.sha256)
        old = previous.get(name)
        if (old is not None and old.get("adapter_sha256") == adapter.sha256 and old.get("scaling") == scaling
                and old.get("base_key", "") == base_key
                and math.isclose(float(old.get("lora_weight", math.nan)), weight)
                and all((onnx_dir / f"{m}.onnx").is_file() for m in variant.model_names)):
            variants.append(variant)
            extra[name] = {k: old[k] for k in ("scaling", "base_key", "parity", "export_s") if k in old}
            continue
        entry: dict[str, Any] = {"scaling": scaling, "base_key": base_key, "parity": {}, "export_s": {}}
        with apply_lora(transformer, adapter, weight):
            for component in variant.components:
                model = variant_model_name(component, name)
                started = time.monotonic()
                path = onnx_export.export_component(component, transformer, onnx_dir / f"{model}.onnx", opset=opset)
                entry["export_s"][model] = round(time.monotonic() - started, 2)
                message = f"exported in {entry['export_s'][model]:.1f} s"
                if parity:
                    report = onnx_export.check_parity(component, transformer, path, rtol=rtol)
                    entry["parity"][model] = report.as_dict()
                    message += f"; parity max rel {report.max_rel:.2e}"
                    if not report.ok:
                        failures.append(f"{model}: {report.summary()}")
                if progress:
                    print(f"[lora] {model}: {message}", file=sys.stderr, flush=True)
        variants.append(variant)
        extra[name] = entry
    write_variants_manifest(variants, onnx_dir, extra)
    if failures:
        raise onnx_export.ParityError("LoRA variant export does not match torch:\n  " + "\n  ".join(failures))
    return variants


def _base_onnx_files(onnx_dir: Path) -> list[Path]:
    """The base components' ONNX graphs and external-data files in ``onnx_dir`` (no variants)."""
    names = {f"{c}.onnx" for c in specs.COMPONENTS} | {f"{c}.onnx.data" for c in specs.COMPONENTS}
    return sorted(p for p in onnx_dir.iterdir() if p.name in names and p.is_file())


def prepare_lora_onnx_dir(components: Any, registry: LoraRegistry, base_onnx_dir: str | Path,
                          out_dir: str | Path, **export_options: Any) -> list[LoraVariant]:
    """One folder with the base ONNX files (hard-linked, or copied across file systems) and every
    variant of ``registry`` (exported, or reused when unchanged): what the renderer's
    ``onnx_dir`` takes. The shared base folder (an export cache) is never written to.

    Variants are reused only when the adapter, strength and base files are unchanged: the base
    files' names, sizes and modification times form the ``base_key``.
    """
    base, out = Path(base_onnx_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _base_onnx_files(base)
    if not files:
        raise LoraError(f"{base}: no exported component files")
    digest = hashlib.sha256()
    for source in files:
        stat = source.stat()
        digest.update(f"{source.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        target = out / source.name
        if target.exists() and os.path.samefile(source, target):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return export_lora_variants(components, registry, out, skip_existing=True, base_key=digest.hexdigest(),
                                **export_options)


"""Fused variant models (``acestep_triton.lora.variants``): manifest, specs, ONNX export against the fused model.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lora_helpers import CHANGED_REL, _session
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_triton.export import specs
from acestep_triton.export.onnx_export import FP32_RTOL, check_parity
from acestep_triton.lora import (
    VARIANTS_FILE,
    LoraRegistry,
    LoraVariant,
    fused_transformer,
    load_lora,
    prepare_lora_onnx_dir,
    read_variants_manifest,
    variant_specs,
    write_variants_manifest,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_variants_manifest_round_trip(tmp_path: Path) -> None:
    variants = [LoraVariant(name="rap", lora_weight=0.5, components=("condition_encoder", "dit_decoder"),
                            adapter_sha256="ab")]
    write_variants_manifest(variants, tmp_path)
    assert read_variants_manifest(tmp_path) == variants
    assert read_variants_manifest(tmp_path / "none") == []
    names = [s.name for s in variant_specs(variants)]
    assert names == ["condition_encoder__rap", "dit_decoder__rap"]
    assert variant_specs(variants)[1].inputs == specs.DIT_DECODER.inputs


def test_export_lora_variants_matches_the_fused_model(tiny_lora: Path, tiny_onnx_components, tmp_path: Path) -> None:
    shutil.copytree(tiny_lora, tmp_path / "loras" / "rap")
    registry = LoraRegistry.from_dir(tmp_path / "loras", weights={"rap": 0.5})
    transformer = tiny_onnx_components.transformer
    base_dir, out = tmp_path / "base", tmp_path / "onnx"
    base_dir.mkdir()
    for name in ("text_encoder.onnx", "dit_decoder.onnx", "dit_decoder.onnx.data"):  # stand-ins: only linked
        (base_dir / name).write_bytes(name.encode())
    variants = prepare_lora_onnx_dir(tiny_onnx_components, registry, base_dir, out)
    assert [v.model_names for v in variants] == [["condition_encoder__rap", "dit_decoder__rap"]]
    assert read_variants_manifest(out) == variants
    manifest = json.loads((out / VARIANTS_FILE).read_text())["variants"][0]
    assert manifest["lora_weight"] == 0.5 and set(manifest["parity"]) == {"condition_encoder__rap", "dit_decoder__rap"}
    assert manifest["base_key"] and all(p["ok"] for p in manifest["parity"].values())
    assert all((out / n).samefile(base_dir / n) for n in ("text_encoder.onnx", "dit_decoder.onnx.data"))

    fused = fused_transformer(transformer, load_lora(registry.adapters["rap"], transformer), 0.5)
    for component in ("condition_encoder", "dit_decoder"):
        session = _session(out / f"{component}__rap.onnx")
        report = check_parity(component, fused, "", session=session)
        assert report.ok and report.max_rel <= FP32_RTOL, f"{component}: {report.summary()}"
        # the same inputs through the base weights: the file must hold the fused ones
        base = check_parity(component, transformer, "", session=session)
        assert base.max_rel > CHANGED_REL, f"{component}: variant matches the base model ({base.max_rel:.2e})"

    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*__*.onnx")}
    again = prepare_lora_onnx_dir(tiny_onnx_components, registry, base_dir, out)  # unchanged: reused
    assert again == variants and {p.name: p.stat().st_mtime_ns for p in out.glob("*__*.onnx")} == stamp


"""The tiny test adapter (``acestep_triton.synthetic.tiny_lora``) and the ``python -m acestep_triton.lora`` CLI.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer
from safetensors import safe_open

from acestep_triton.lora import (
    ADAPTER_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    METADATA_KEY,
    load_lora,
)
from acestep_triton.lora.cli import main
from acestep_triton.synthetic.tiny_lora import target_module_paths, write_tiny_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_lora_layout_targets_and_determinism(tiny_lora: Path, tiny_onnx_ckpt: Path, tmp_path: Path,
                                                  transformer) -> None:
    again = write_tiny_lora(tiny_onnx_ckpt, tmp_path / "again", seed=0, rank=4)
    other = write_tiny_lora(tiny_onnx_ckpt, tmp_path / "other", seed=1, rank=4)
    data = (tiny_lora / LORA_WEIGHTS_FILE).read_bytes()
    assert (again / LORA_WEIGHTS_FILE).read_bytes() == data, "same seed must give byte-identical files"
    assert (other / LORA_WEIGHTS_FILE).read_bytes() != data, "the seed must matter"

    with safe_open(str(tiny_lora / LORA_WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()[METADATA_KEY])
    targets = target_module_paths(transformer)
    # upstream's zh_rap targets: speaker_embedder, 6 Conformer blocks x q/k/v, 24 DiT blocks x 2 attentions x 4
    assert len(targets) == 1 + 6 * 3 + 24 * 2 * 4, targets
    assert keys == {f"{t}.lora_{h}.weight" for t in targets for h in "AB"}
    assert header["r"] == 4 and header["lora_alpha"] == 8 and header["use_rslora"] is True
    assert json.loads((tiny_lora / ADAPTER_CONFIG_FILE).read_text())["peft_type"] == "LORA"

    adapter = load_lora(tiny_lora, transformer)
    assert adapter.components == ("condition_encoder", "dit_decoder")
    assert set(adapter.ranks.values()) == {4} and not adapter.ignored
    assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values()), "lora_B must be non-zero"


def test_cli_writes_the_tiny_lora(tiny_onnx_ckpt: Path, tiny_lora: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--checkpoint", str(tiny_onnx_ckpt), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / LORA_WEIGHTS_FILE).read_bytes() == (tiny_lora / LORA_WEIGHTS_FILE).read_bytes()
    assert main(["inspect", str(tmp_path / "cli")]) == 0
    assert "211 layers" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1


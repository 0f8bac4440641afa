"""Shared pieces of the LoRA unit tests (``tests/test_lora_*.py``): the tiny adapter and the
tiny checkpoint's transformer as module fixtures, output probes, and adapter-file rewriting.

Output comparisons: "changes" means a max relative change above :data:`CHANGED_REL` (the tiny
adapter moves outputs by ~10%); "equal" is bit-exact where the arithmetic is identical, else
rel <= 1e-6 (fp32 re-association); ONNX parity <= 1e-4 relative (the export stage's tolerance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acestep_triton.component_graphs import component_graph
from acestep_triton.lora import (
    ADAPTER_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    SERVING_FILE,
    write_tiny_lora,
)

CHANGED_REL = 1e-2
"""A LoRA must move an output by more than this (max abs change / max abs output)."""


@pytest.fixture(scope="module")
def tiny_lora(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lora(tiny_onnx_ckpt, tmp_path_factory.mktemp("lora") / "tiny", seed=0, rank=4)


@pytest.fixture(scope="module")
def transformer(tiny_onnx_components):
    return tiny_onnx_components.transformer


def _outputs(transformer, component: str, seed: int = 5) -> torch.Tensor:
    """One output tensor of ``component`` on fixed example inputs (B=2, length 9)."""
    graph = component_graph(component, transformer)
    inputs = graph.example_inputs(2, 9, seed=seed)
    with torch.no_grad():
        out = graph(*inputs.values())
    return (out if isinstance(out, torch.Tensor) else out[0]).clone()


def _session(path: Path):
    """One onnxruntime CPU session per file, shared by both comparisons (creation dominates)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _rewrite(src: Path, dst_dir: Path, *, drop_metadata: bool = False, config: bool = True,
             rename=lambda k: k, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of an adapter with its keys renamed / extra keys / no header metadata / no config."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / LORA_WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors.update(extra or {})
    if drop_metadata:
        metadata = {"format": "pt"}
    save_file(tensors, str(dst_dir / LORA_WEIGHTS_FILE), metadata=metadata)
    if config:
        shutil.copy2(src / ADAPTER_CONFIG_FILE, dst_dir / ADAPTER_CONFIG_FILE)
    return dst_dir


def _registry_dir(tiny_lora: Path, root: Path) -> Path:
    for name in ("rap", "tiny"):
        shutil.copytree(tiny_lora, root / name)
    (root / "rap" / SERVING_FILE).write_text(json.dumps({"lora_weight": 0.5}))
    (root / ".hidden").mkdir()
    return root


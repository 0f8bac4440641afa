"""Shared pieces of the LoRA unit tests (``tests/test_lora_*.py``): the tiny adapter and the
tiny checkpoint's transformer as module fixtures, output probes, and adapter-file rewriting;
for the live-adapter tests (``test_lora_live_adapters``, ``test_lora_live_adapters_fast_path``) three tiny adapters,
the control commands and CPU component runners serving them.

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

from acestep_triton.checkpoint import meta_transformer
from acestep_triton.component_graphs import component_graph
from acestep_triton.export.specs import COMPONENTS
from acestep_triton.lora import (
    ADAPTER_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    SERVING_FILE,
)
from acestep_triton.lora.live_control import LiveAdapterControl
from acestep_triton.serving.torch_runtime import (
    ComponentRunner,
    LiveAdapterOptions,
    RuntimeOptions,
    load_component_module,
)
from acestep_triton.synthetic.tiny_lora import write_tiny_lora

CHANGED_REL = 1e-2
"""A LoRA must move an output by more than this (max abs change / max abs output)."""

CPU = torch.device("cpu")
MIB = 2**20


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



@pytest.fixture(scope="module")
def live_adapters_dir(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry of three tiny adapters: a and b at rank 4 (seeds 0, 1), c at rank 8 (seed 2: a
    larger rank re-lays a live-adapter stack out)."""
    root = tmp_path_factory.mktemp("live_loras")
    for name, seed, rank in (("a", 0, 4), ("b", 1, 4), ("c", 2, 8)):
        write_tiny_lora(tiny_onnx_ckpt, root / name, seed=seed, rank=rank)
    return root


def live_control(root: Path, ckpt: Path, state: Path, budget_mb: float = 64.0) -> LiveAdapterControl:
    """The control commands on registry ``root``, checked against ``ckpt``, recording into ``state``."""
    return LiveAdapterControl(root, state, meta_transformer(ckpt), budget_bytes=int(budget_mb * MIB))


def live_runner(component: str, ckpt: Path, state: Path | None, *, budget_bytes: int = 64 * MIB,
                status: Path | None = None, graph_backend=None, **options) -> ComponentRunner:
    """``component`` of ``ckpt`` on the CPU serving the live adapters of ``state`` (None: no
    adapters); ``options`` go to :class:`RuntimeOptions`."""
    loras = None if state is None else LiveAdapterOptions(state_file=state, budget_bytes=budget_bytes,
                                                          status_file=status)
    return ComponentRunner(COMPONENTS[component], load_component_module(component, ckpt),
                           RuntimeOptions(device=CPU, **options), loras, graph_backend=graph_backend)

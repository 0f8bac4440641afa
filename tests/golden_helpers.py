"""Small helpers for tests that compare our modules with the golden checkpoint's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn


def strict_load(module: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load with every key accounted for (missing or unexpected keys fail the test by name)."""
    result = module.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys, f"missing: {result.missing_keys}"
    assert not result.unexpected_keys, f"unexpected: {result.unexpected_keys}"
    return module.eval()


def read_folder(ckpt: Path, name: str) -> tuple[dict, dict[str, Tensor]]:
    """``config.json`` and the diffusers weights of one official checkpoint folder."""
    config = json.loads((ckpt / name / "config.json").read_text())
    return config, load_file(str(ckpt / name / "diffusion_pytorch_model.safetensors"))


def max_abs_err(a: Tensor, b: np.ndarray | Tensor) -> float:
    """max |a − b| after checking that the shapes agree."""
    b = torch.as_tensor(b)
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()

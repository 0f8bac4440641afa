"""The deterministic tiny test adapter for the tiny checkpoint (or any checkpoint's shapes).

Shaped like upstream's rap adapter (its ``target_modules``, alpha, rsLoRA flag) at a small rank,
with non-zero lora_B so it visibly changes the output. Command line:
``python -m acestep_triton.lora tiny --checkpoint C --out D``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn

from ..checkpoint import meta_transformer
from ..lora.files import ADAPTER_CONFIG_FILE, LORA_WEIGHTS_FILE, METADATA_KEY, UPSTREAM_TARGET_MODULES, target_shape
from ..models.transformer import unused_key

TINY_LORA_ALPHA_PER_RANK = 2.0
"""Tiny adapter: ``lora_alpha = 2 * r`` (upstream scaling 2, peft rsLoRA scaling 2 sqrt(r)), so a
test can tell the two scaling modes and alpha handling apart."""

TINY_LORA_UP_STD = 0.02
"""Std of the tiny adapter's lora_B. Non-zero (a trained adapter's B is; peft starts it at zero)
so that the adapter changes the output: at upstream scaling (2) each delta is about 15% of its
layer's weight norm, and the encode/decode outputs move by about 10% (measured)."""


def _save_canonical(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: Path) -> None:
    """Save a ``.safetensors`` file whose bytes depend only on its content.

    The safetensors writer emits the ``__metadata__`` map in hash order, which varies between
    runs once it has two entries; the header JSON is therefore re-emitted with sorted keys (tensor
    offsets are explicit, so the data block is unchanged) and padded with spaces to 8 bytes.
    """
    blob = save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata=dict(metadata))
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + size:])


def tiny_lora_config(rank: int) -> dict[str, Any]:
    """The tiny adapter's ``LoraConfig`` fields, shaped like upstream's ``zh_rap_lora_config.json``."""
    return {"r": rank, "lora_alpha": TINY_LORA_ALPHA_PER_RANK * rank, "use_rslora": True,
            "target_modules": list(UPSTREAM_TARGET_MODULES), "lora_dropout": 0.0, "bias": "none",
            "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}


def target_module_paths(transformer: nn.Module, target_modules: Sequence[str] = UPSTREAM_TARGET_MODULES) -> list[str]:
    """Module paths that peft's ``target_modules`` list selects (exact name or ``.``-suffix match)
    among the layers a LoRA can be fused into, skipping modules inference never uses."""
    return sorted(name for name, module in transformer.named_modules()
                  if name and any(name == t or name.endswith(f".{t}") for t in target_modules)
                  and target_shape(module) is not None and not unused_key(f"{name}.weight"))


def write_tiny_lora(ckpt_dir: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """Write a deterministic rank-``rank`` adapter for the checkpoint at ``ckpt_dir``, in upstream's
    layout (``out_dir/pytorch_lora_weights.safetensors``, bare module-path keys, the ``LoraConfig``
    as header metadata like diffusers writes it) plus peft's ``adapter_config.json``.

    Targets are upstream's ``target_modules`` that exist in our model. lora_A ~ N(0, 1/in),
    lora_B ~ N(0, :data:`TINY_LORA_UP_STD`): non-zero, so the output changes. Same arguments →
    byte-identical files. Returns ``out_dir``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    model = meta_transformer(ckpt_dir)  # structure and shapes only: no weights are materialised
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for path in target_module_paths(model):
        out_features, in_features = target_shape(model.get_submodule(path))  # type: ignore[misc]
        tensors[f"{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
        tensors[f"{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * TINY_LORA_UP_STD
    lora_config = tiny_lora_config(rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_config, indent=2, sort_keys=True)}
    _save_canonical(tensors, metadata, out / LORA_WEIGHTS_FILE)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", **lora_config}, indent=2,
                                                      sort_keys=True) + "\n")
    return out


"""Fusing an adapter into the weights: in place with bit-exact restore, or into a copy."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .files import LoraAdapter, LoraLayer


def _fused_tensors(module: nn.Module, layer: LoraLayer, lora_weight: float) -> dict[str, Tensor]:
    """New ``weight`` (and ``bias``) tensors of ``module`` with the layer's delta added in fp32."""
    weight = module.weight
    out = {"weight": (weight.detach().float() + layer.delta(lora_weight, weight.shape, weight.device))
           .to(weight.dtype)}
    if layer.bias is not None:
        bias = module.bias
        delta = layer.bias.to(device=bias.device, dtype=torch.float32) * (float(lora_weight) * layer.scaling)
        out["bias"] = (bias.detach().float() + delta).to(bias.dtype)
    return out


@contextlib.contextmanager
def apply_lora(transformer: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> Iterator[nn.Module]:
    """Add ``weight * scaling * B @ A`` to every adapted layer for the duration of the block.

    The original tensors are kept and put back on exit (also on error), so the restore is
    bit-exact; the parameters stay the same objects (exported graphs and ``state_dict`` views
    see the fused values). ``weight == 0`` leaves the model untouched. Peak extra memory: one
    fused copy of each adapted weight (about 1.3 B parameters for upstream's targets on the 3.5B
    checkpoint). Not re-entrant across threads: one generation at a time per transformer.
    """
    targets = adapter.check(transformer)
    saved: list[tuple[nn.Parameter, Tensor]] = []
    try:
        if weight != 0:
            with torch.no_grad():
                for path, layer in adapter.layers.items():
                    module = targets[path]
                    for param_name, value in _fused_tensors(module, layer, weight).items():
                        param = getattr(module, param_name)
                        saved.append((param, param.data))
                        param.data = value
        yield transformer
    finally:
        for param, original in reversed(saved):
            param.data = original


def fuse_in_place(transformer: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """Add the adapter at ``weight`` to ``transformer``'s weights for good (no restore).

    Layers whose module the transformer does not hold (a served half that dropped the other
    half's submodules) are skipped: check the adapter against the whole model first
    (:func:`~acestep_triton.lora.files.load_lora` with a meta-device transformer costs nothing).
    """
    if weight == 0:
        return transformer
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            try:
                module = transformer.get_submodule(path)
            except AttributeError:
                continue
            for param_name, value in _fused_tensors(module, layer, weight).items():
                getattr(module, param_name).data = value
    return transformer


def fused_transformer(transformer: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """A deep copy of ``transformer`` with the adapter fused in (the original is not touched).

    Costs a second full transformer in memory; :func:`export_lora_variants` fuses in place
    under :func:`apply_lora` instead, and serving uses :func:`fuse_in_place`.
    """
    adapter.check(transformer)
    return fuse_in_place(copy.deepcopy(transformer), adapter, weight)


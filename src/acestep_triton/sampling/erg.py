"""Per-layer query-scale vectors for ERG ("entropy rectifying guidance").

Upstream weakens the "unconditional" branch by multiplying the attention queries of a few layers
by ``tau = 0.01`` with forward hooks. Our served components take that as an explicit FP32 input
(one entry per layer, 1.0 = untouched), so hooks are never needed and the same exported graph
serves both branches. This module is the one place that knows which layers are weakened.
"""

from __future__ import annotations

import torch

#: The query multiplier upstream uses for every ERG variant.
ERG_TAU = 0.01
#: UMT5 encoder blocks whose self-attention query is weakened (``use_erg_tag``).
TEXT_ERG_LAYERS = range(8, 10)
#: Lyric Conformer blocks whose self-attention query is weakened (``use_erg_lyric``).
LYRIC_ERG_LAYERS = range(4, 6)
#: DiT blocks whose self- and cross-attention queries are weakened (``use_erg_diffusion``).
DIT_ERG_LAYERS = range(15, 20)


def query_scale(
    num_layers: int,
    weakened: range | None = None,
    tau: float = ERG_TAU,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A float32 vector of ``num_layers`` ones with ``tau`` at the ``weakened`` layers.

    Layers of ``weakened`` beyond ``num_layers`` are skipped rather than rejected: the official
    models have all of them, and small test checkpoints with fewer layers should still run
    (there ERG then touches only the layers that exist).
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    scale = torch.ones(num_layers, dtype=torch.float32)
    if weakened is not None:
        for layer in weakened:
            if 0 <= layer < num_layers:
                scale[layer] = tau
    return scale.to(device) if device is not None else scale


def text_query_scale(num_layers: int, erg: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """Query scale for the text encoder; ERG weakens UMT5 blocks 8-9."""
    return query_scale(num_layers, TEXT_ERG_LAYERS if erg else None, device=device)


def lyric_query_scale(num_layers: int, erg: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """Query scale for the condition encoder's lyric Conformer; ERG weakens blocks 4-5."""
    return query_scale(num_layers, LYRIC_ERG_LAYERS if erg else None, device=device)


def dit_query_scale(num_layers: int, erg: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """Query scale for the DiT decoder; ERG weakens blocks 15-19 (self and cross attention)."""
    return query_scale(num_layers, DIT_ERG_LAYERS if erg else None, device=device)

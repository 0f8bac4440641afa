"""The lyric encoder: a WeNet-style Conformer with ESPnet relative positional self-attention.

Configuration as trained for ACE-Step: pre-norm blocks (LayerNorm eps 1e-5) of relative-position
multi-head self-attention and a Swish feed-forward; no macaron feed-forward, no convolution
module, full (non-causal) attention limited only by the padding mask, a final LayerNorm. The
input layer is Linear + LayerNorm, scaled by sqrt(d) before the blocks.

Parameter names follow the official checkpoint (``embed.out.0``, ``encoders.N.self_attn.linear_q``,
``pos_bias_u`` ...). The per-block ``query_scale`` replaces upstream's ERG-lyric forward hook (which
multiplies the output of ``self_attn.linear_q`` in blocks 4-5 by 0.01) with a graph input.

Traceable for ONNX: the relative positional table and the relative-shift indices are built from
``arange`` over the runtime length; masking uses finite fills, never boolean indexing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import scale_rows

LAYER_NORM_EPS = 1e-5


def relative_positional_encoding(length: torch.Tensor, dim: int) -> torch.Tensor:
    """ESPnet's relative sinusoidal table for relative positions ``T-1, T-2, ..., -(T-1)``.

    ``length`` is a 1-D ``arange(T)`` (so the graph keeps T symbolic). Returns FP32 [2T-1, dim]
    with ``sin`` in even and ``cos`` in odd channels. The row order (positive positions first,
    descending) is what the relative shift in :class:`RelPositionSelfAttention` expects.
    """
    positions = length.float()
    relative = torch.cat((positions.flip(0), -positions[1:]))
    div_term = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=length.device) * -(math.log(10000.0) / dim)
    )
    angles = relative[:, None] * div_term[None, :]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def relative_shift_index(positions: torch.Tensor) -> torch.Tensor:
    """Index [T, T] into the 2T-1 relative positions: query i, key j -> row of position ``i - j``.

    Row ``k`` of the table holds position ``T-1-k``, so the row is ``T-1-i+j``. This replaces the
    Transformer-XL pad-and-reshape trick with an explicit gather, which exports cleanly.
    """
    return positions[None, :] - positions[:, None] + positions[-1]


class Positions(NamedTuple):
    """What every block's attention reads besides its input, made once per forward: which keys
    are tokens (``key_keep`` bool [B, 1, 1, T]), the relative position table ``pos_table``
    [2T-1, C], and the gather index of the relative shift ``shift_index`` int64 [T, T]."""

    key_keep: torch.Tensor
    pos_table: torch.Tensor
    shift_index: torch.Tensor


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative position terms (ESPnet variant).

    ``scores = ((q + u)·k + (q + v)·W_pos p_(i-j)) / sqrt(d_k)`` with learnt per-head biases
    ``pos_bias_u``/``pos_bias_v``; padded keys are excluded and padded rows of a fully padded
    sequence give zero output.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"lyric encoder width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def forward(self, x: torch.Tensor, positions: Positions, query_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, T, C]; ``query_scale`` a 0-dim or per-row [B] factor on ``linear_q``'s output."""
        key_keep, pos_table, shift_index = positions
        q = scale_rows(self.linear_q(x), query_scale)
        q = q.unflatten(-1, (self.heads, self.head_dim))  # [B, T, H, D]
        k = self.linear_k(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        v = self.linear_v(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        p = self.linear_pos(pos_table).unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)

        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))  # [B, H, T, T]
        position = torch.matmul(q_v, p.transpose(-2, -1))  # [B, H, T, 2T-1]
        position = torch.gather(position, -1, shift_index.expand_as(content))
        scores = (content + position) / math.sqrt(self.head_dim)

        scores = scores.masked_fill(~key_keep, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).masked_fill(~key_keep, 0.0)
        out = torch.matmul(weights, v).transpose(1, 2).flatten(2)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """Position-wise feed-forward with Swish (SiLU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm_mha(x)); x += ff(norm_ff(x))`` (no conv module)."""

    def __init__(self, dim: int, heads: int, ff_hidden: int) -> None:
        super().__init__()
        self.norm_mha = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attn = RelPositionSelfAttention(dim, heads)
        self.norm_ff = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.feed_forward = FeedForward(dim, ff_hidden)

    def forward(self, x: torch.Tensor, positions: Positions, query_scale: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), positions, query_scale)
        return x + self.feed_forward(self.norm_ff(x))


class _InputLayer(nn.Module):
    """Linear + LayerNorm input projection, kept as ``out.0``/``out.1`` for the checkpoint keys."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=LAYER_NORM_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class LyricConformer(nn.Module):
    """Conformer over lyric-token embeddings: [B, T, in_dim] + mask [B, T] -> [B, T, dim].

    ``query_scale`` (FP32 [num_blocks], default ones) multiplies each block's query projection:
    0.01 in blocks 4-5 is upstream's ERG-lyric guidance branch.
    """

    def __init__(self, in_dim: int, dim: int, heads: int, ff_hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.dim = dim
        self.embed = _InputLayer(in_dim, dim)
        self.encoders = nn.ModuleList([ConformerBlock(dim, heads, ff_hidden) for _ in range(num_blocks)])
        self.after_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    @property
    def num_blocks(self) -> int:
        return len(self.encoders)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, query_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` [B, T] of any dtype, non-zero = token. Padded positions are computed too (and
        later masked by the decoder's cross-attention)."""
        x = self.embed(x) * math.sqrt(self.dim)
        positions = torch.arange(x.shape[1], device=x.device)
        context = Positions(key_keep=(mask != 0)[:, None, None, :],
                            pos_table=relative_positional_encoding(positions, self.dim).to(x.dtype),
                            shift_index=relative_shift_index(positions))
        if query_scale is not None and query_scale.shape[-1] != self.num_blocks:
            raise ValueError(f"lyric_query_scale: last dimension must be {self.num_blocks} "
                             f"(Conformer blocks), got shape {tuple(query_scale.shape)}")
        scales = [None] * self.num_blocks if query_scale is None else query_scale.unbind(-1)
        for block, scale in zip(self.encoders, scales, strict=True):
            x = block(x, context, scale)
        return self.after_norm(x)

"""Building blocks of the ACE-Step diffusion transformer (a Sana-style linear DiT).

Each block of the decoder is: RMSNorm + adaLN-single modulation -> linear self-attention (ReLU
kernel, RoPE) -> softmax cross-attention over the condition tokens -> RMSNorm + adaLN ->
GLU-MBConv feed-forward. The module attribute names below are chosen so that parameter names are
exactly the official checkpoint keys (``attn.to_q``, ``cross_attn.to_out.0``,
``ff.inverted_conv.conv`` ...); the classes themselves are ours.

Everything here must survive ONNX export with dynamic batch and length: no Python branching on
tensor values, positions built with ``arange`` from the runtime length, masks applied by
arithmetic or ``where`` (never by boolean indexing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-6
"""Epsilon of every (parameter-free) RMSNorm in the decoder."""

LINEAR_ATTENTION_EPS = 1e-15
"""Floor of the linear-attention normaliser, so rows with a zero normaliser (padded frames, or a
head whose ReLU'd query is all zero) give 0 instead of 0/0 = NaN.

Upstream *adds* 1e-15. In fp32 that addition is exact for a zero normaliser and a no-op for any
normaliser above ~1.7e-8, so ``clamp_min`` gives the same numbers. It is used because ONNX graph
optimisers (onnxscript's, run by ``torch.onnx.export``) drop ``Add`` of constants below 1e-8 as a
no-op, which would put NaN into every exported graph with a padded frame."""


def rms_norm(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Parameter-free RMSNorm; the mean square is taken in fp32 so bf16/fp16 graphs stay stable."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (scale/shift broadcast over the tokens)."""
    return x * (1 + scale) + shift


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``cos`` and sign-folded ``sin`` tables [S, head_dim] for :func:`apply_rope`.

    Frequencies ``theta ** (-2i/d)`` for i < d/2, laid out as ``cat(freqs, freqs)`` (the Qwen2
    layout the checkpoint was trained with) while :func:`apply_rope` rotates *adjacent* pairs: the
    two elements of a pair therefore use different frequencies. That mismatch is part of the
    trained model, so it is reproduced, not fixed.

    The tables are computed from ``positions`` (built with ``arange`` from the runtime length)
    rather than sliced from a fixed-size cache, so exported graphs have no baked-in length limit.
    The sign of ``sin`` is folded in for the even slots (``x'[2i] = -x[2i+1]``), which lets the
    rotation be a pair swap plus two multiplies.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    sign = torch.tensor([-1.0, 1.0], device=positions.device).repeat(head_dim // 2)
    return angles.cos(), angles.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of ``x`` [..., S, D]; the result is FP32.

    ``out[2i] = x[2i] cos - x[2i+1] sin``, ``out[2i+1] = x[2i+1] cos + x[2i] sin`` (tables from
    :func:`rope_tables`). Computed in fp32 as upstream does, whatever the dtype of ``x``.
    """
    x = x.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * sin_signed


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]."""
    return x.transpose(1, 2).flatten(2)


def scale_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply ``x`` [B, ...] by a 0-dim factor or by one factor per batch row ([B]).

    This is the ERG hook as a graph input: a per-row factor lets the weakened (unconditional)
    and normal branches of one guidance step share a single batched call.
    """
    if scale is None:
        return x
    scale = scale.to(x.dtype)
    if scale.dim() == 1:
        scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    return x * scale


def _scale_query(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Multiply the query projection by its ERG factor (0-dim, or [B] per row)."""
    return scale_rows(q, scale)


class _Projections(nn.Module):
    """The q/k/v/out projections both attentions share (names are the official weight keys)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class LinearSelfAttention(_Projections):
    """Linear (kernelised) self-attention over the latent frames: O(W) in the sequence length.

    ``out_w = sum_s relu(q_w)·relu(k_s) v_s / max(sum_s relu(q_w)·relu(k_s), eps)``, with RoPE on q
    and k and the frame mask multiplying q, k and v: a padded frame contributes nothing to the
    sums over frames, so it is invisible to the valid frames (right-padding to a shape bucket
    leaves their output unchanged). The normaliser is obtained by appending a
    ones column to v, so one pair of matmuls gives numerator and denominator. The products are
    done in fp32 (sums over thousands of frames overflow fp16), then cast back to the input dtype.
    """

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, W, C], ``mask`` FP32 [B, 1, W, 1] (1 = frame), ``rope`` tables for W frames."""
        q = _split_heads(_scale_query(self.to_q(x), query_scale), self.heads)
        k = _split_heads(self.to_k(x), self.heads)
        v = _split_heads(self.to_v(x), self.heads).float() * mask
        q = F.relu(apply_rope(q, *rope) * mask)
        k = F.relu(apply_rope(k, *rope) * mask)
        v = F.pad(v, (0, 1), value=1.0)  # ones column: the last output column is the normaliser
        kv = torch.matmul(k.transpose(-1, -2), v)  # [B, H, D, D+1]
        out = torch.matmul(q, kv)  # [B, H, W, D+1]
        out = out[..., :-1] / out[..., -1:].clamp_min(LINEAR_ATTENTION_EPS)
        return self.to_out[0](_merge_heads(out).to(x.dtype))


class CrossAttention(_Projections):
    """Softmax attention from the latent frames to the condition tokens (speaker|text|lyric).

    RoPE is applied to q with the frame positions and to k with the token positions (both from
    0). ``key_bias`` removes padded tokens (their softmax weight is exactly 0, so tokens padded on
    the right to a shape bucket are invisible to every frame); frames for which no (frame, token) pair is valid
    (padded frames) get exactly zero attention output, which is what upstream's all ``-inf`` rows
    yield in PyTorch's SDPA, without ever producing NaN in an exported graph.
    """

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context_rope: tuple[torch.Tensor, torch.Tensor],
        key_bias: torch.Tensor,
        row_valid: torch.Tensor,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, W, C], ``context`` [B, S, C], ``key_bias`` [B, 1, 1, S] additive (0 or very
        negative), ``row_valid`` bool [B, 1, W, 1]."""
        q = _split_heads(_scale_query(self.to_q(x), query_scale), self.heads)
        k = _split_heads(self.to_k(context), self.heads)
        v = _split_heads(self.to_v(context), self.heads)
        q = apply_rope(q, *rope).to(x.dtype)
        k = apply_rope(k, *context_rope).to(x.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias.to(x.dtype))
        out = out.masked_fill(~row_valid, 0.0)  # select, not multiply: an fp16 all-masked row is NaN
        return self.to_out[0](_merge_heads(out))


class _ConvSlot(nn.Module):
    """Holds one ``nn.Conv1d`` as ``.conv``: the checkpoint nests each conv one level deep."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GLUMBConv(nn.Module):
    """Sana's gated MBConv feed-forward: 1x1 expand (SiLU), depthwise k=3 along time, GLU, 1x1.

    The depthwise convolution mixes neighbouring frames, which is how this feed-forward adds
    local context to the (position-agnostic apart from RoPE) linear attention. It is the only
    place in a block where a frame sees its neighbours' values directly, so its input is
    multiplied by the frame mask: the last valid frame then sees a zero right neighbour whether
    the latent ends there (the conv's own zero padding) or was padded on the right to a shape
    bucket. Padded frames are thereby invisible to valid ones, and a padded call gives the same
    velocity on the valid frames as an unpadded one (what shape buckets rely on).

    The checkpoint stores the 1x1 convolutions as ``Conv1d`` weights [out, in, 1]; they are
    applied as matmuls on the channel-last tokens (same numbers, no layout round trips: about 5%
    faster per decoder step in bf16 on an H100), and only the depthwise conv runs channel-first.
    """

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.inverted_conv = _ConvSlot(nn.Conv1d(dim, 2 * hidden, 1))
        self.depth_conv = _ConvSlot(
            nn.Conv1d(2 * hidden, 2 * hidden, kernel_size, padding=kernel_size // 2, groups=2 * hidden)
        )
        self.point_conv = _ConvSlot(nn.Conv1d(hidden, dim, 1, bias=False))

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, W, C] -> [B, W, C]; ``frame_mask`` [B, W, 1] (1 = frame, 0 = padding) zeroes the
        depthwise conv's input at padded frames (``None``: every frame is valid)."""
        expand, project = self.inverted_conv.conv, self.point_conv.conv
        h = F.silu(F.linear(x, expand.weight.squeeze(-1), expand.bias))
        if frame_mask is not None:
            h = h * frame_mask.to(h.dtype)
        h = self.depth_conv(h.transpose(1, 2)).transpose(1, 2)
        h, gate = h.chunk(2, dim=-1)
        return F.linear(h * F.silu(gate), project.weight.squeeze(-1))


class DiTBlock(nn.Module):
    """One decoder block with adaLN-single: the six modulation vectors are the shared timestep
    projection (computed once per call by the model) plus this block's learnt ``scale_shift_table``.

    The cross-attention has a plain residual (no norm, no gate), as trained.
    """

    def __init__(self, dim: int, heads: int, ff_hidden: int) -> None:
        super().__init__()
        self.attn = LinearSelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.ff = GLUMBConv(dim, ff_hidden)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        frame_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor,
        context_rope: tuple[torch.Tensor, torch.Tensor],
        key_bias: torch.Tensor,
        row_valid: torch.Tensor,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``temb`` [B, 6, C] is the shared adaLN projection; other arguments as in the attentions
        (``frame_mask`` [B, 1, W, 1] also masks the feed-forward's depthwise conv input)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + temb
        ).chunk(6, dim=1)
        h = modulate(rms_norm(x), shift_msa, scale_msa)
        x = x + gate_msa * self.attn(h, frame_mask, rope, query_scale)
        x = x + self.cross_attn(x, context, rope, context_rope, key_bias, row_valid, query_scale)
        h = modulate(rms_norm(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.ff(h, frame_mask[:, 0])

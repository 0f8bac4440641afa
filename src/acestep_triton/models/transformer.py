"""The ACE-Step diffusion transformer, split into the two served components.

``encode`` (the ``condition_encoder`` component, once per generation) embeds the conditions into
one token sequence ``[speaker | prompt text | lyrics]``; ``decode`` (the ``dit_decoder`` component,
every sampling step, the hot loop) predicts the flow-matching velocity of the latents given those
tokens and the timestep. ``forward`` chains both (used for parity tests only).

The module tree is ours, but parameter names equal the official checkpoint's keys
(``ace_step_transformer/diffusion_pytorch_model.safetensors``), so it loads that file strictly
after dropping the keys matched by :data:`UNUSED_KEYS`.

Export notes: ``decode`` computes RoPE tables and masks once per call (not per block) from
``arange`` over the runtime lengths, so batch, frame count W and token count S stay dynamic.
ERG guidance, which upstream implements with forward hooks on the query projections, is a pair of
graph inputs here (``query_scale`` for the DiT blocks, ``lyric_query_scale`` for the Conformer).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import DiTBlock, modulate, rms_norm, rope_tables
from .lyric_encoder import LyricConformer

UNUSED_KEYS: tuple[str, ...] = (
    # The cross-attention modules were built with "added" context projections that the
    # cross-attention processor never calls (about 0.6B parameters in the 3.5B model).
    r"^transformer_blocks\.\d+\.cross_attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)\.(weight|bias)$",
    # REPA projector heads (hidden states -> MERT / mHuBERT features): a training-only loss.
    r"^projectors\.\d+\.\d+\.(weight|bias)$",
)
"""Regexes of official checkpoint keys that inference never uses: not modules of ours."""

TIMESTEP_CHANNELS = 256
"""Width of the sinusoidal timestep features fed to ``timestep_embedder``."""

PATCH_HIDDEN_PER_CHANNEL = 256
"""The patch embedding's first conv has ``in_channels * 256`` outputs (fixed by the architecture)."""

PATCH_GROUPS = 32
"""Group count of the patch embedding's GroupNorm."""

ADALN_CHUNKS = 6
"""shift/scale/gate for attention and for the feed-forward."""

CONFORMER_DEFAULTS = {"lyric_encoder_num_heads": 16, "lyric_encoder_linear_units": 4096,
                      "lyric_encoder_num_blocks": 6}
"""Upstream hard-codes the lyric Conformer's heads, FF width and depth; the official config has no
keys for them. Optional keys with these defaults let a small checkpoint use a small Conformer."""


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the model, read from the checkpoint's ``config.json``.

    ``max_position`` is kept for reference only: RoPE positions are computed for the actual
    lengths, so no table of that size exists (upstream extends its cache past it anyway).
    """

    in_channels: int
    out_channels: int
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    mlp_ratio: float
    patch_size: tuple[int, int]
    max_height: int
    text_embedding_dim: int
    speaker_embedding_dim: int
    lyric_encoder_vocab_size: int
    lyric_hidden_size: int
    rope_theta: float
    max_position: int
    lyric_encoder_num_heads: int
    lyric_encoder_linear_units: int
    lyric_encoder_num_blocks: int

    @property
    def inner_dim(self) -> int:
        """Model width. Upstream derives it from heads x head_dim (the ``inner_dim`` key is ignored)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_hidden(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
        """Parse a diffusers-style config; every size must be present (no silent defaults),
        except the three optional Conformer keys of :data:`CONFORMER_DEFAULTS`."""
        required = ("in_channels", "out_channels", "num_layers", "num_attention_heads",
                    "attention_head_dim", "mlp_ratio", "patch_size", "max_height",
                    "text_embedding_dim", "speaker_embedding_dim", "lyric_encoder_vocab_size",
                    "lyric_hidden_size", "rope_theta", "max_position")
        missing = [k for k in required if k not in d]
        if missing:
            raise KeyError(f"transformer config.json lacks {', '.join(missing)}")
        patch = tuple(int(p) for p in d["patch_size"])
        if len(patch) != 2 or patch[1] != 1 or patch[0] != int(d["max_height"]):
            # One token per latent frame is what the frame mask, RoPE positions and unpatchify
            # assume (upstream's too): the patch must cover the full height and one frame.
            raise ValueError(f"patch_size {list(patch)} unsupported: expected [max_height, 1]")
        return cls(
            in_channels=int(d["in_channels"]), out_channels=int(d["out_channels"]),
            num_layers=int(d["num_layers"]), num_attention_heads=int(d["num_attention_heads"]),
            attention_head_dim=int(d["attention_head_dim"]), mlp_ratio=float(d["mlp_ratio"]),
            patch_size=(patch[0], patch[1]), max_height=int(d["max_height"]),
            text_embedding_dim=int(d["text_embedding_dim"]),
            speaker_embedding_dim=int(d["speaker_embedding_dim"]),
            lyric_encoder_vocab_size=int(d["lyric_encoder_vocab_size"]),
            lyric_hidden_size=int(d["lyric_hidden_size"]), rope_theta=float(d["rope_theta"]),
            max_position=int(d["max_position"]),
            **{k: int(d.get(k, v)) for k, v in CONFORMER_DEFAULTS.items()},
        )


def timestep_features(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal features [B, channels] of t (= sigma x 1000): ``[cos(t f_i), sin(t f_i)]`` with
    ``f_i = 10000^(-i / (channels/2))``: diffusers' ``Timesteps(flip_sin_to_cos=True, shift=0)``."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(exponent / half)
    angles = timestep.float()[:, None] * freqs[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class TimestepEmbedder(nn.Module):
    """MLP on the sinusoidal timestep features (``linear_1`` -> SiLU -> ``linear_2``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """Latents [B, C, H, W] + frame mask [B, W] -> tokens [B, W, D]: a (H x 1) conv per frame,
    GroupNorm, 1x1 conv.

    The GroupNorm statistics (as trained) span all frames of an item, so they are the one place
    where a frame's embedding depends on every other frame. Here they span the *valid* frames
    only (:func:`masked_group_norm`): an item padded on the right to a shape bucket is embedded
    exactly as the unpadded item, which is what lets requests of different lengths share one
    padded batch. With an all-ones mask this is the trained GroupNorm. The ``nn.GroupNorm``
    module is kept for its affine parameters and eps (checkpoint keys
    ``proj_in.early_conv_layers.1.weight/bias``); its own forward is not called.
    """

    def __init__(self, in_channels: int, patch_size: tuple[int, int], dim: int) -> None:
        super().__init__()
        hidden = in_channels * PATCH_HIDDEN_PER_CHANNEL
        self.early_conv_layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size),
            nn.GroupNorm(PATCH_GROUPS, hidden, eps=1e-6),
            nn.Conv2d(hidden, dim, kernel_size=1),
        )

    def forward(self, latents: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """``latents`` [B, C, H, W], ``frame_mask`` [B, W] (1 = frame, 0 = padding) -> [B, W, D]."""
        patch, norm, project = self.early_conv_layers
        x = masked_group_norm(patch(latents), frame_mask, norm)
        return project(x).flatten(2).transpose(1, 2)


def masked_group_norm(x: torch.Tensor, frame_mask: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` applied to ``x`` [B, C, 1, W] with mean and (biased) variance over the frames
    where ``frame_mask`` [B, W] is 1, so padded frames do not move the statistics of valid ones.

    Statistics are computed in fp32 (two passes: the mean, then the mean squared deviation,
    both as masked sums divided by the valid count) and the result is cast back to ``x``'s dtype,
    so bf16 graphs normalise like fp32 ones. Pure arithmetic on the mask (no boolean indexing, no
    branching on values), as ONNX export with dynamic W and CUDA-graph capture need. An item with
    no valid frame gets a count clamped to 1 (finite garbage instead of NaN; it is padding).
    """
    batch, channels = x.shape[0], x.shape[1]
    groups = norm.num_groups
    h = x.float().reshape(batch, groups, -1, x.shape[-1])  # [B, G, C/G * 1, W]
    m = frame_mask.float().reshape(batch, 1, 1, -1)
    count = (m.sum(dim=-1, keepdim=True) * h.shape[2]).clamp_min(1.0)  # [B, 1, 1, 1]
    mean = (h * m).sum(dim=(2, 3), keepdim=True) / count
    centred = h - mean
    var = (centred * centred * m).sum(dim=(2, 3), keepdim=True) / count
    h = (centred * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    if norm.affine:
        h = h * norm.weight.float().reshape(1, channels, 1, 1) + norm.bias.float().reshape(1, channels, 1, 1)
    return h.to(x.dtype)


class FinalLayer(nn.Module):
    """RMSNorm, shift/scale from the embedded timestep, Linear to H x C_out values per frame."""

    def __init__(self, dim: int, patch_height: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.patch_height = patch_height
        self.linear = nn.Linear(dim, patch_height * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor, embedded_timestep: torch.Tensor) -> torch.Tensor:
        """``x`` [B, W, D], ``embedded_timestep`` [B, D] -> [B, C_out, H, W]."""
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.linear(modulate(rms_norm(x), shift, scale))
        # Channel index of the linear output is (row p) * C_out + (channel c).
        return x.unflatten(-1, (self.patch_height, self.out_channels)).permute(0, 3, 2, 1)


class ACEStepTransformer(nn.Module):
    """ACE-Step v1's DiT with its condition encoder; see the module docstring for the split."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.heads = config.num_attention_heads
        self.head_dim = config.attention_head_dim

        # Condition encoder (encode).
        self.speaker_embedder = nn.Linear(config.speaker_embedding_dim, dim)
        self.genre_embedder = nn.Linear(config.text_embedding_dim, dim)
        self.lyric_embs = nn.Embedding(config.lyric_encoder_vocab_size, config.lyric_hidden_size)
        self.lyric_encoder = LyricConformer(
            in_dim=config.lyric_hidden_size, dim=config.lyric_hidden_size,
            heads=config.lyric_encoder_num_heads, ff_hidden=config.lyric_encoder_linear_units,
            num_blocks=config.lyric_encoder_num_blocks,
        )
        self.lyric_proj = nn.Linear(config.lyric_hidden_size, dim)

        # Decoder (decode).
        self.timestep_embedder = TimestepEmbedder(TIMESTEP_CHANNELS, dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, ADALN_CHUNKS * dim))
        self.proj_in = PatchEmbed(config.in_channels, config.patch_size, dim)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim, self.heads, config.ff_hidden) for _ in range(config.num_layers)]
        )
        self.final_layer = FinalLayer(dim, config.patch_size[0], config.out_channels)

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> ACEStepTransformer:
        """Build from the ``config.json`` dict, with default-initialised weights (load them next)."""
        return cls(TransformerConfig.from_dict(d))

    @property
    def num_layers(self) -> int:
        """DiT blocks: the length of ``decode``'s ``query_scale``."""
        return len(self.transformer_blocks)

    @property
    def lyric_layers(self) -> int:
        """Conformer blocks: the length of ``encode``'s ``lyric_query_scale``."""
        return self.lyric_encoder.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.speaker_embedder.weight.dtype

    def encode(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        speaker: torch.Tensor,
        lyric_ids: torch.Tensor,
        lyric_mask: torch.Tensor,
        lyric_query_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens ``[speaker | text | lyric]`` [B, 1+T+Tl, D] (FP32) and their mask (FP32).

        ``text_states`` [B, T, Ct] (UMT5 output), ``speaker`` [B, Cs], ``lyric_ids`` int64 [B, Tl];
        masks [B, T] / [B, Tl] int or float, 1 = token. ``lyric_query_scale`` FP32 [lyric_layers]
        or [B, lyric_layers].
        """
        dtype = self.dtype
        speaker_tokens = self.speaker_embedder(speaker.to(dtype))[:, None]
        text_tokens = self.genre_embedder(text_states.to(dtype))
        lyric = self.lyric_encoder(self.lyric_embs(lyric_ids), lyric_mask, lyric_query_scale)
        lyric_tokens = self.lyric_proj(lyric)
        states = torch.cat((speaker_tokens, text_tokens, lyric_tokens), dim=1)
        speaker_mask = torch.ones_like(speaker[:, :1], dtype=torch.float32)
        mask = torch.cat((speaker_mask, text_mask.float(), lyric_mask.float()), dim=1)
        return states.float(), mask

    def decode(
        self,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
        timestep: torch.Tensor,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [B, C, H, W] (FP32) of ``latents`` [B, C, H, W] at ``timestep`` [B] (sigma x 1000).

        ``latent_mask`` [B, W] and ``encoder_mask`` [B, S]: 1 = valid (any numeric dtype).
        Padded frames and tokens are invisible to valid ones: the patch embedding's GroupNorm
        statistics and the feed-forward's depthwise conv see only valid frames, both attentions
        mask frames/tokens, and RoPE positions start at 0 for both sequences. So latents padded on
        the right of W (mask 0) and encoder states padded on the right of S (mask 0), to a shape
        bucket, give the unpadded velocity on the valid frames (to float rounding); the velocity
        at padded frames is meaningless.
        ``query_scale`` FP32 [num_layers] or [B, num_layers] (one row per item) multiplies both
        query projections of each block.
        """
        dtype = self.dtype
        embedded_timestep = self.timestep_embedder(timestep_features(timestep).to(dtype))
        temb = self.t_block(embedded_timestep).unflatten(1, (ADALN_CHUNKS, -1))
        frame_valid = latent_mask > 0.5
        token_valid = encoder_mask > 0.5
        x = self.proj_in(latents.to(dtype), frame_valid)
        context = encoder_states.to(dtype)

        # Shared by all blocks: computed once per call.
        frame_pos = torch.arange(x.shape[1], device=x.device)
        token_pos = torch.arange(context.shape[1], device=x.device)
        rope = rope_tables(frame_pos, self.head_dim, self.config.rope_theta)
        context_rope = rope_tables(token_pos, self.head_dim, self.config.rope_theta)
        frame_mask = frame_valid.float()[:, None, :, None]
        key_bias = torch.zeros_like(encoder_mask, dtype=torch.float32).masked_fill(
            ~token_valid, torch.finfo(dtype).min)[:, None, None, :]
        row_valid = (frame_valid & token_valid.any(dim=1, keepdim=True))[:, None, :, None]

        if query_scale is not None and query_scale.shape[-1] != self.num_layers:
            raise ValueError(f"query_scale: last dimension must be {self.num_layers} (DiT blocks), "
                             f"got shape {tuple(query_scale.shape)}")
        # [L] → one 0-dim factor per block; [B, L] → one [B] column per block
        scales = [None] * self.num_layers if query_scale is None else query_scale.unbind(-1)
        for block, scale in zip(self.transformer_blocks, scales, strict=True):
            x = block(x, temb, frame_mask, rope, context, context_rope, key_bias, row_valid, scale)
        return self.final_layer(x, embedded_timestep).float()

    def forward(
        self,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        speaker: torch.Tensor,
        lyric_ids: torch.Tensor,
        lyric_mask: torch.Tensor,
        timestep: torch.Tensor,
        query_scale: torch.Tensor | None = None,
        lyric_query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``encode`` then ``decode`` (upstream's ``forward``)."""
        states, mask = self.encode(text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale)
        return self.decode(latents, latent_mask, states, mask, timestep, query_scale)


def unused_key(key: str, patterns: Sequence[str] = UNUSED_KEYS) -> bool:
    """Whether a checkpoint key is one of the weights inference never uses."""
    return any(re.search(p, key) for p in patterns)

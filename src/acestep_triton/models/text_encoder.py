"""The prompt (tag) encoder: a UMT5 encoder with a per-item, per-layer query scale.

ACE-Step conditions the diffusion transformer on UMT5's last hidden state of the prompt. Its
"ERG tag" guidance needs the same encoder with weakened attention in a few blocks: upstream
multiplies the output of ``layer[0].SelfAttention.q`` of blocks 8-9 by 0.01 with forward hooks.
Hooks are invisible to ONNX export, so here every block's query projection is replaced by a
:class:`ScaledQueryLinear` that reads its factor from a vector passed to :meth:`TextEncoder.forward`:
one graph serves both the normal pass (all ones) and the ERG pass (0.01 in the chosen blocks;
which blocks is decided by ``acestep_triton.sampling.erg``, not here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

from ..weights import materialize, read_safetensors

UNUSED_KEYS: tuple[str, ...] = (r"^decoder\.", r"^lm_head\.")
"""A full UMT5 checkpoint also carries the decoder and LM head; only the encoder is used."""

TIED_KEYS: dict[str, str] = {"encoder.embed_tokens.weight": "shared.weight"}
"""The encoder's embedding is the shared embedding; checkpoints store it once, as ``shared``."""


class _ScaleSource:
    """The query-scale vector of the forward call in progress, shared by all query projections.

    A plain object (not a module or buffer), so setting it during ``forward`` is ordinary Python
    that tracing and ``torch.export`` see through: the tensor read by each projection is the graph
    input itself, not captured module state.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class ScaledQueryLinear(nn.Linear):
    """``nn.Linear`` whose output is multiplied by column ``index`` of the current query scale.

    It subclasses ``nn.Linear`` (rather than wrapping one) so the parameter names, and therefore
    the checkpoint keys (``...SelfAttention.q.weight``), stay exactly the official ones.
    """

    def __init__(self, linear: nn.Linear, index: int, source: _ScaleSource) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight = linear.weight
        if linear.bias is not None:
            self.bias = linear.bias
        self.index = index
        self._source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # [B, T, inner]
        scale = self._source.value
        if scale is None:
            return out
        factor = scale[..., self.index].to(out.dtype)  # [] for a [L] vector, [B] for [B, L]
        if factor.dim() == 1:
            factor = factor[:, None, None]
        return out * factor


class TextEncoder(nn.Module):
    """UMT5 encoder: ``(input_ids, attention_mask, query_scale) -> last_hidden_state``.

    The wrapped ``transformers`` model is ``self.umt5``; its state-dict keys are the official
    ``umt5-base/model.safetensors`` keys. Eager attention is forced because it is the plain
    matmul/softmax path that exports to ONNX and matches upstream's numbers.
    """

    def __init__(self, config: UMT5Config | dict[str, Any]) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = UMT5Config.from_dict(config)
        config._attn_implementation = "eager"
        self.config = config
        self.umt5 = UMT5EncoderModel(config)
        self._scale_source = _ScaleSource()
        for i, block in enumerate(self.umt5.encoder.block):
            attn = block.layer[0].SelfAttention
            attn.q = ScaledQueryLinear(attn.q, i, self._scale_source)
        self.eval()

    @property
    def num_layers(self) -> int:
        """Length of the ``query_scale`` vector (the ``Lt`` of the served contract)."""
        return len(self.umt5.encoder.block)

    @property
    def hidden_size(self) -> int:
        return int(self.config.d_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                query_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids [B,T] (INT64) with mask [B,T] (INT64, 1 = keep) to states [B,T,C].

        ``query_scale`` FP32 multiplies the query projection of each block: [B, num_layers] (the
        served contract: one row per item, so plain and ERG prompts share one batch) or
        [num_layers] (the same for every item). None means all ones.
        """
        if query_scale is not None and query_scale.shape[-1] != self.num_layers:
            raise ValueError(f"query_scale: last dimension must be {self.num_layers} (UMT5 blocks), "
                             f"got shape {tuple(query_scale.shape)}")
        self._scale_source.value = query_scale
        try:
            out = self.umt5(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        finally:
            self._scale_source.value = None
        return out.last_hidden_state


def read_text_encoder_config(umt5_dir: str | Path) -> dict[str, Any]:
    """The UMT5 ``config.json`` as a dict (every size comes from it)."""
    return json.loads((Path(umt5_dir) / "config.json").read_text())


def load_text_encoder(umt5_dir: str | Path, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Build the encoder from ``umt5_dir/config.json`` and load ``model.safetensors`` strictly
    (decoder/LM-head weights of a full UMT5 file are skipped; any other mismatch is an error).
    Built on the meta device and filled from the file, so no random init is paid for."""
    umt5_dir = Path(umt5_dir)
    config = read_text_encoder_config(umt5_dir)
    state = read_safetensors(umt5_dir / "model.safetensors")
    # The file's keys are those of the wrapped UMT5 model, ``self.umt5``.
    model = materialize(lambda: TextEncoder(config), state, UNUSED_KEYS, f"text encoder ({umt5_dir})",
                        dtype=dtype, tied=TIED_KEYS, root="umt5")
    return model

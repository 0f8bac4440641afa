"""The seam between the sampling code and the model backends.

Sampling is written once against this Protocol; the in-process torch pipeline and the Triton
BLS orchestrators each provide an implementation, so both produce the same numbers for the
same request. There is exactly one method per served component (names, shapes and dtypes are
the component contract of docs/ARCHITECTURE.md), plus the layer counts needed to build the
per-layer ERG query-scale vectors.

Tensors are torch tensors on the implementation's device. Masks: token masks INT64 (1 = keep),
latent and encoder masks FP32. Query scales are FP32 vectors with one entry per layer
(1.0 = untouched, 0.01 = ERG).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ComponentBackend(Protocol):
    """The six served components behind ACE-Step, as seen by the sampling code."""

    @property
    def text_layers(self) -> int:
        """Number of UMT5 encoder blocks (length of ``encode_text``'s query scale)."""
        ...

    @property
    def lyric_layers(self) -> int:
        """Number of lyric Conformer blocks (length of ``lyric_query_scale``)."""
        ...

    @property
    def dit_layers(self) -> int:
        """Number of DiT blocks (length of ``predict_velocity``'s query scale)."""
        ...

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_scale: torch.Tensor
    ) -> torch.Tensor:
        """``text_encoder``: ids INT64 [B,T], mask INT64 [B,T], scale FP32 [Lt] → states FP32 [B,T,Ct]."""
        ...

    def encode_conditions(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        speaker: torch.Tensor,
        lyric_ids: torch.Tensor,
        lyric_mask: torch.Tensor,
        lyric_query_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``condition_encoder``: → (encoder_states FP32 [B,S,D], encoder_mask FP32 [B,S]), S = 1+T+Tl."""
        ...

    def predict_velocity(
        self,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
        timestep: torch.Tensor,
        query_scale: torch.Tensor,
    ) -> torch.Tensor:
        """``dit_decoder``: latents [B,8,16,W], mask [B,W], states [B,S,D], mask [B,S], timestep [B]
        (σ·1000), query scale [Ld] → velocity FP32 [B,8,16,W].

        The sampling loop batches guidance branches along B. A backend whose decoder accepts a
        per-row query scale [B, Ld] can be driven with ``row_query_scale=True`` (see
        ``loop.GuidedVelocity``), which merges even ERG-weakened branches into the same call.
        """
        ...

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """``dcae_encoder``: log-mel FP32 [B,2,128,T] → scaled latents FP32 [B,8,16,W]."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``dcae_decoder``: scaled latents FP32 [B,8,16,W] → log-mel FP32 [B,2,128,T]."""
        ...

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """``vocoder``: mel FP32 [B,128,T] (one channel per row) → waveform FP32 [B,1,N] at 44.1 kHz."""
        ...


class BackendWrapper:
    """A :class:`ComponentBackend` that forwards everything to ``inner``: the base of wrappers that change
    one method (shape buckets, CUDA-graph replay) and must pass the rest through untouched."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def text_layers(self) -> int:
        return self.inner.text_layers

    @property
    def lyric_layers(self) -> int:
        return self.inner.lyric_layers

    @property
    def dit_layers(self) -> int:
        return self.inner.dit_layers

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    query_scale: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_text(input_ids, attention_mask, query_scale)

    def encode_conditions(self, text_states: torch.Tensor, text_mask: torch.Tensor, speaker: torch.Tensor,
                          lyric_ids: torch.Tensor, lyric_mask: torch.Tensor,
                          lyric_query_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.encode_conditions(text_states, text_mask, speaker, lyric_ids, lyric_mask,
                                            lyric_query_scale)

    def predict_velocity(self, latents: torch.Tensor, latent_mask: torch.Tensor,
                         encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                         timestep: torch.Tensor, query_scale: torch.Tensor) -> torch.Tensor:
        return self.inner.predict_velocity(latents, latent_mask, encoder_states, encoder_mask, timestep,
                                           query_scale)

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_mel(mel)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode_latents(latents)

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.inner.vocode(mel)

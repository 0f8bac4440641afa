"""DCAE (deep-compression autoencoder) halves with ACE-Step's mel and latent scalings inside.

The network itself is diffusers' ``AutoencoderDC`` (used as a library); ACE-Step wraps it with
two fixed affine maps that must travel with the weights, so each served component is
self-contained and its inputs/outputs are the "natural" tensors:

* encoder: log-mel ``m`` → ``((m + 11) / 14 − 0.5) / 0.5`` (mel range [−11, 3] mapped to
  [−1, 1]) → encoder → ``z`` → latents ``(z + 1.9091) · 0.1786``;
* decoder: latents ``x`` → ``x / 0.1786 − 1.9091`` → decoder → ``d`` → log-mel
  ``(d · 0.5 + 0.5) · 14 − 11``.

The constants are upstream's (``MusicDCAE``: min/max mel −11/3, ``shift_factor`` −1.9091,
``scale_factor`` 0.1786); the config's own ``scaling_factor`` is not what ACE-Step uses.

Both halves come from the one official ``music_dcae_f8c8/diffusion_pytorch_model.safetensors``.
Each wrapper keeps the official attribute name (``encoder`` / ``decoder``), so its state-dict
keys are the official keys unchanged; :func:`split_state_dict` hands each half its share.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC, Decoder, Encoder
from torch import Tensor, nn

MEL_MIN = -11.0
MEL_MAX = 3.0
LATENT_SHIFT = -1.9091
LATENT_SCALE = 0.1786

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."

#: Official keys that inference never reads: none, every tensor belongs to one of the halves.
UNUSED_KEYS: tuple[str, ...] = ()
#: For a loader that feeds the whole official file to one half: the other half's keys.
ENCODER_FOREIGN_KEYS: tuple[str, ...] = (r"^decoder\.",)
DECODER_FOREIGN_KEYS: tuple[str, ...] = (r"^encoder\.",)


def _full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config with diffusers' ``AutoencoderDC`` defaults for absent keys (as from_pretrained does)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(AutoencoderDC.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    merged = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
        merged[key] = tuple(tuple(scales) for scales in merged[key])
    return merged


def split_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Official DCAE state dict → (encoder half, decoder half), keys unchanged.

    A key that belongs to neither half is an error: the official file has none, so it means a
    wrong file was given.
    """
    encoder = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    decoder = {k: v for k, v in state_dict.items() if k.startswith(DECODER_PREFIX)}
    stray = sorted(set(state_dict) - set(encoder) - set(decoder))
    if stray:
        raise KeyError(f"DCAE state dict has keys of neither half: {stray[:5]}")
    return encoder, decoder


def normalize_mel(mel: Tensor) -> Tensor:
    """Log-mel in [−11, 3] → the DCAE's [−1, 1] input range."""
    return ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5


def denormalize_mel(image: Tensor) -> Tensor:
    """Inverse of :func:`normalize_mel`."""
    return (image * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


def scale_latents(z: Tensor) -> Tensor:
    """Raw encoder output → the roughly unit-variance latents the diffusion model works in."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(latents: Tensor) -> Tensor:
    """Inverse of :func:`scale_latents`."""
    return latents / LATENT_SCALE + LATENT_SHIFT


def _half_arguments(c: Mapping[str, Any], half: str) -> dict[str, Any]:
    """The arguments the encoder and the decoder read alike from the config, for ``half``
    (``"encoder"`` or ``"decoder"``: the key prefix of its own block settings)."""
    return {
        "in_channels": c["in_channels"],
        "latent_channels": c["latent_channels"],
        "attention_head_dim": c["attention_head_dim"],
        "block_type": c[f"{half}_block_types"],
        "block_out_channels": tuple(c[f"{half}_block_out_channels"]),
        "layers_per_block": tuple(c[f"{half}_layers_per_block"]),
        "qkv_multiscales": c[f"{half}_qkv_multiscales"],
    }


class DCAEEncoder(nn.Module):
    """Log-mel ``[B, 2, 128, T]`` (T a multiple of 8) → scaled latents ``[B, 8, 16, T / 8]``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = _full_config(config)
        self.encoder = Encoder(
            **_half_arguments(c, "encoder"),
            downsample_block_type=c["downsample_block_type"],
            out_shortcut=c["encoder_out_shortcut"],
        )

    def forward(self, mel: Tensor) -> Tensor:
        return scale_latents(self.encoder(normalize_mel(mel)))


class DCAEDecoder(nn.Module):
    """Scaled latents ``[B, 8, 16, W]`` → log-mel ``[B, 2, 128, 8·W]`` (denormalised)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = _full_config(config)
        self.decoder = Decoder(
            **_half_arguments(c, "decoder"),
            norm_type=c["decoder_norm_types"],
            act_fn=c["decoder_act_fns"],
            upsample_block_type=c["upsample_block_type"],
            in_shortcut=c["decoder_in_shortcut"],
            conv_act_fn=c["decoder_conv_act_fn"],
        )

    def forward(self, latents: Tensor) -> Tensor:
        return denormalize_mel(self.decoder(unscale_latents(latents)))


def build_dcae(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None
) -> tuple[DCAEEncoder, DCAEDecoder]:
    """Both halves from the config dict, each loaded strictly from the official state dict if given."""
    encoder, decoder = DCAEEncoder(config), DCAEDecoder(config)
    if state_dict is not None:
        enc_sd, dec_sd = split_state_dict(state_dict)
        encoder.load_state_dict(enc_sd, strict=True)
        decoder.load_state_dict(dec_sd, strict=True)
    encoder.eval()
    decoder.eval()
    return encoder, decoder


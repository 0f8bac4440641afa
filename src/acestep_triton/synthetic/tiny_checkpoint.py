"""The tiny random checkpoint: the official layout and key names at a few MB, written in seconds.

Same folder and file names, same key names, tiny sizes, so tests, exports and the demo exercise
the real loading path (:mod:`acestep_triton.checkpoint`) without the 7.7 GiB download. The DCAE
and the vocoder are the official configs (:mod:`.full_size`) with only their widths and depths
shrunk; the DiT and the text encoder keep the official structure at 32 wide.

Command line: ``python -m acestep_triton.synthetic tiny OUT [--seed N]`` (or
``acestep-triton checkpoint tiny OUT``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CONFIG_FILE, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, VOCAB_FILENAMES, CheckpointLayout
from ..lyrics.vocab import write_tiny_vocab
from ..models.dcae import DCAEDecoder, DCAEEncoder
from ..models.text_encoder import TIED_KEYS, TextEncoder
from ..models.transformer import ACEStepTransformer
from ..models.vocoder import Vocoder
from ..weights import CheckpointError
from .checkpoint_files import fill_zero_matrices, save_weights, write_json, write_tiny_tokenizer
from .full_size import DCAE_CONFIG, VOCODER_CONFIG

DIFFUSERS_VERSION = "0.42.1"
"""``_diffusers_version`` written into the tiny diffusers configs (the official files carry one)."""

TINY_TEXT_LAYERS = 12
"""Kept at the official depth so the ERG-tag blocks (8-9) exist."""

TINY_VOCODER_POST_GAIN = 25.0
"""Weight-norm gain of the tiny vocoder's last conv: brings its noise to ~0.1 RMS (measured)."""


def tiny_text_encoder_config(vocab_size: int) -> dict[str, Any]:
    """A 12-block UMT5 encoder 32 wide (the structure of umt5-base, ~1/600 of its width)."""
    return {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
        "d_model": 32, "d_kv": 16, "d_ff": 64, "num_heads": 2,
        "num_layers": TINY_TEXT_LAYERS, "num_decoder_layers": TINY_TEXT_LAYERS,
        "vocab_size": vocab_size, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "dropout_rate": 0.0, "classifier_dropout": 0.0,
        "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "is_encoder_decoder": True, "tie_word_embeddings": True, "use_cache": True,
    }


def tiny_transformer_config() -> dict[str, Any]:
    """The official structure (24 blocks, so ERG blocks 15-19 exist) at 32 wide, with a small
    Conformer through the optional ``lyric_encoder_*`` keys; the lyric vocab keeps its 6693 ids."""
    return {
        "_class_name": "ACEStepTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 8, "out_channels": 8, "num_layers": 24, "num_attention_heads": 2,
        "attention_head_dim": 16, "inner_dim": 32, "mlp_ratio": 2.5, "patch_size": [16, 1],
        "max_height": 16, "max_width": 32768, "max_position": 32768, "rope_theta": 1000000.0,
        "text_embedding_dim": 32, "speaker_embedding_dim": 512, "lyric_encoder_vocab_size": 6693,
        "lyric_hidden_size": 64, "lyric_encoder_num_heads": 4, "lyric_encoder_linear_units": 128,
        "lyric_encoder_num_blocks": 6, "ssl_encoder_depths": [8, 8], "ssl_latent_dims": [16, 8],
        "ssl_names": ["mert", "m-hubert"],
    }


def _shrunk(official: Mapping[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
    """``official`` with ``sizes`` replaced, keys in the official order after ``_class_name`` and
    ``_diffusers_version`` (so the written ``config.json`` reads like an official one)."""
    config = copy.deepcopy(dict(official))
    head = {"_class_name": config.pop("_class_name"), "_diffusers_version": DIFFUSERS_VERSION}
    return {**head, **config, **copy.deepcopy(dict(sizes))}


def tiny_dcae_config() -> dict[str, Any]:
    """``AutoencoderDC`` with the official block types and compression (mel 128 → 16 rows, ×8 in
    time), 8-32 channels, one layer per block."""
    return _shrunk(DCAE_CONFIG, {
        "attention_head_dim": 8,
        "encoder_block_out_channels": [8, 16, 16, 32], "decoder_block_out_channels": [8, 16, 16, 32],
        "encoder_layers_per_block": [1, 1, 1, 1], "decoder_layers_per_block": [1, 1, 1, 1],
    })


def tiny_vocoder_config() -> dict[str, Any]:
    """ADaMoSHiFiGANV1 with the official mel front end and upsampling (hop 512 at 44.1 kHz) and
    a narrow ConvNeXt/HiFi-GAN."""
    return _shrunk(VOCODER_CONFIG, {
        "depths": [1, 1, 1, 1], "dims": [16, 16, 24, 32], "num_mels": 32, "upsample_initial_channel": 128,
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    })


class _Seeded:
    """Seed torch's global RNG for one block (module constructors draw their init from it),
    restoring the caller's RNG state afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def _write_config(folder: Path, config: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, config)


def _write_tiny_text_encoder(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_text_encoder_config(write_tiny_tokenizer(folder))
    _write_config(folder, config)
    with _Seeded(seed):
        model = TextEncoder(config)
    state = {k: v for k, v in model.umt5.state_dict().items() if k not in TIED_KEYS}
    save_weights(state, folder / TRANSFORMERS_WEIGHTS, torch.float32)


def _write_tiny_transformer(folder: Path, seed: int) -> None:
    config = tiny_transformer_config()
    _write_config(folder, config)
    with _Seeded(seed):
        model = ACEStepTransformer.from_config(config)
        fill_zero_matrices(model)
    # bf16 on disk, like the official file (the loader casts to the requested dtype).
    save_weights(model.state_dict(), folder / DIFFUSERS_WEIGHTS, torch.bfloat16)


def _write_tiny_dcae(folder: Path, seed: int) -> None:
    config = tiny_dcae_config()
    _write_config(folder, config)
    with _Seeded(seed):
        encoder, decoder = DCAEEncoder(config), DCAEDecoder(config)
        fill_zero_matrices(encoder)
        fill_zero_matrices(decoder)
    save_weights({**encoder.state_dict(), **decoder.state_dict()}, folder / DIFFUSERS_WEIGHTS, torch.float32)


def _write_tiny_vocoder(folder: Path, seed: int) -> None:
    config = tiny_vocoder_config()
    _write_config(folder, config)
    with _Seeded(seed):
        model = Vocoder(config)
        fill_zero_matrices(model)
    _tune_tiny_vocoder_gains(model)
    state = model.state_dict()
    if not any(k.endswith(".weight_g") for k in state):
        raise CheckpointError("vocoder: expected old-style weight_g/weight_v keys (official layout)")
    save_weights(state, folder / DIFFUSERS_WEIGHTS, torch.float32)


def _tune_tiny_vocoder_gains(model: nn.Module) -> None:
    """Make the random HiFi-GAN produce audible, zero-mean noise instead of a near-constant.

    With default init every upsampling stage shrinks the signal (~0.5x each, seven stages) and
    the biases add a DC offset that then dominates: the tiny model would output an almost silent
    constant. Unit weight-norm gains, zero biases in the generator and one fixed output gain give
    ~0.1 RMS noise for typical mels (fixed constants, so the file stays deterministic).
    """
    head = model.head
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif name.endswith("weight_g"):
                param.fill_(1.0)
        head.conv_post.weight_g.fill_(TINY_VOCODER_POST_GAIN)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random checkpoint in the official layout (a few MB, seconds) and return its path.

    Same ``seed`` → byte-identical files (weights come from seeded CPU generators, files are
    written with sorted keys and no timestamps). The lyric vocabulary is a tiny one with the
    official special ids, written as ``lyrics_vocab.json`` in the checkpoint folder, where
    :func:`~acestep_triton.checkpoint.load_components` looks for it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = CheckpointLayout(out)
    # Distinct seeds per component, so changing one model's size leaves the others unchanged.
    _write_tiny_text_encoder(layout.text_encoder_dir, seed * 10 + 1)
    _write_tiny_transformer(layout.transformer_dir, seed * 10 + 2)
    _write_tiny_dcae(layout.dcae_dir, seed * 10 + 3)
    _write_tiny_vocoder(layout.vocoder_dir, seed * 10 + 4)
    write_tiny_vocab(out / VOCAB_FILENAMES[0])
    layout.validate()
    return out

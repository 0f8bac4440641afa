"""Full-size ACE-Step models with random weights: for GPU benchmarks and engine builds, no download.

Speed and memory depend on the architecture, not on the trained values, so the production path
(TensorRT builds, CUDA graphs, Triton load tests) can be measured on a machine that has never
seen the 7.7 GiB checkpoint. Two variants:

* :func:`write_full_random_checkpoint` writes a checkpoint in the official four-folder layout
  with the official configs (DiT 24 x 2560, UMT5-base 768 x 12 with a tiny stand-in tokenizer,
  the official DCAE and vocoder), so every command that takes a checkpoint folder runs on it;
* :func:`build_random_models` builds the same models directly on a device (random init there,
  nothing written: 7 GB of files would take longer to write than the benchmark to run).

``layers`` reduces the DiT depth (keeping its width) for machines that cannot hold 3.5B
parameters. With fewer than 20 blocks, ERG (which weakens blocks 15-19) only touches the blocks
that exist: fine for speed and memory measurements, not a faithful model.

Command line: ``python -m acestep_triton.synthetic full-size OUT [--layers N] [--seed S]``
(or ``acestep-triton random-checkpoint``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
from .checkpoint_files import fill_zero_matrices, save_weights, write_json, write_tiny_tokenizer

TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "ACEStepTransformer2DModel",
    "in_channels": 8, "out_channels": 8, "num_layers": 24, "num_attention_heads": 20,
    "attention_head_dim": 128, "inner_dim": 2560, "mlp_ratio": 2.5, "patch_size": [16, 1],
    "max_height": 16, "max_width": 32768, "max_position": 32768, "rope_theta": 1000000.0,
    "text_embedding_dim": 768, "speaker_embedding_dim": 512, "lyric_encoder_vocab_size": 6693,
    "lyric_hidden_size": 1024, "ssl_encoder_depths": [8, 8], "ssl_latent_dims": [1024, 768],
    "ssl_names": ["mert", "m-hubert"],
}
"""``ace_step_transformer/config.json`` of ACE-Step-v1-3.5B (docs: ACE_STEP_FACTS.md). The lyric
Conformer has no keys: upstream hard-codes it (1024 wide, 16 heads, FF 4096, 6 blocks)."""

DCAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderDC",
    "in_channels": 2, "latent_channels": 8, "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [128, 256, 512, 1024], "decoder_block_out_channels": [128, 256, 512, 1024],
    "encoder_layers_per_block": [2, 2, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [5], [5]], "decoder_qkv_multiscales": [[], [], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "decoder_conv_act_fn": "relu",
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "scaling_factor": 0.41407,
}
"""``music_dcae_f8c8/config.json`` (diffusers ``AutoencoderDC``, mel 128 x T -> latent 8 x 16 x T/8)."""

VOCODER_CONFIG: dict[str, Any] = {
    "_class_name": "ADaMoSHiFiGANV1",
    "input_channels": 128, "depths": [3, 3, 9, 3], "dims": [128, 256, 384, 512], "kernel_sizes": [7],
    "drop_path_rate": 0.0, "num_mels": 512, "upsample_initial_channel": 1024,
    "upsample_rates": [4, 4, 2, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4, 4],
    "resblock_kernel_sizes": [3, 7, 11, 13], "resblock_dilation_sizes": [[1, 3, 5]] * 4,
    "pre_conv_kernel_size": 13, "post_conv_kernel_size": 13, "use_template": False,
    "sampling_rate": 44100, "n_fft": 2048, "win_length": 2048, "hop_length": 512,
    "n_mels": 128, "f_min": 40, "f_max": 16000,
}
"""``music_vocoder/config.json`` (ConvNeXt encoder + HiFi-GAN generator, 512x upsampling)."""

UMT5_VOCAB_SIZE = 256384
"""umt5-base's vocabulary: the embedding keeps this size although the stand-in tokenizer has
only a few hundred pieces, so memory and the embedding lookup are the real ones."""

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
    "d_model": 768, "d_kv": 64, "d_ff": 2048, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
    "vocab_size": UMT5_VOCAB_SIZE, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.0, "classifier_dropout": 0.0,
    "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    "is_encoder_decoder": True, "tie_word_embeddings": False, "scalable_attention": True, "use_cache": True,
}
"""``umt5-base/config.json`` (google/umt5-base) with dropout off (inference)."""

MIN_ERG_LAYERS = 20
"""ERG-diffusion weakens DiT blocks 15-19: fewer blocks change what ERG does (not the speed)."""

PARTS = ("text_encoder", "transformer", "dcae_encoder", "dcae_decoder", "vocoder")
"""What :func:`build_random_models` can build."""


@dataclass(frozen=True)
class FullSizeConfigs:
    """The four config dicts a random checkpoint is made from (official sizes by default).

    Tests pass small configs here to exercise the same code quickly; ``text_encoder`` gets its
    ``vocab_size`` from the stand-in tokenizer when it is ``None``.
    """

    transformer: Mapping[str, Any] = field(default_factory=lambda: dict(TRANSFORMER_CONFIG))
    dcae: Mapping[str, Any] = field(default_factory=lambda: dict(DCAE_CONFIG))
    vocoder: Mapping[str, Any] = field(default_factory=lambda: dict(VOCODER_CONFIG))
    text_encoder: Mapping[str, Any] = field(default_factory=lambda: dict(TEXT_ENCODER_CONFIG))

    def with_layers(self, layers: int | None) -> FullSizeConfigs:
        """The same configs with ``layers`` DiT blocks (``None``: unchanged)."""
        if layers is None:
            return self
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        return FullSizeConfigs({**self.transformer, "num_layers": int(layers)}, self.dcae, self.vocoder,
                               self.text_encoder)


def transformer_config(layers: int | None = None) -> dict[str, Any]:
    """The official DiT config, optionally with ``layers`` blocks."""
    return dict(FullSizeConfigs().with_layers(layers).transformer)


# ------------------------------------------------------------------------------- random init
def _finish(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    # .to(device) too: buffers made from numpy (the mel filterbank) are created on the CPU.
    module = module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def _build(factory: Any, device: torch.device, seed: int) -> nn.Module:
    """Construct on ``device`` (parameters are allocated and initialised there, so a 3.5B model
    on a GPU takes seconds rather than a minute of CPU init plus a 12 GB copy)."""
    # Seed a private copy of the RNG state: callers' random streams are left as they were.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            module = factory()
        fill_zero_matrices(module)
    return module


@dataclass
class RandomModels:
    """The models :func:`build_random_models` made (``None`` where a part was not asked for)."""

    configs: FullSizeConfigs
    transformer: Any = None
    text_encoder: Any = None
    dcae_encoder: Any = None
    dcae_decoder: Any = None
    vocoder: Any = None

    def parameter_count(self) -> int:
        seen: set[int] = set()
        total = 0
        for module in (self.transformer, self.text_encoder, self.dcae_encoder, self.dcae_decoder, self.vocoder):
            if module is None:
                continue
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total


def build_random_models(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                        layers: int | None = None, seed: int = 0,
                        parts: Iterable[str] = ("transformer", "dcae_decoder", "vocoder"),
                        configs: FullSizeConfigs | None = None, fold_vocoder: bool = True) -> RandomModels:
    """Build random models of the official sizes directly on ``device`` in ``dtype`` (eval mode,
    no gradients), without writing files.

    ``parts`` picks from :data:`PARTS` (default: what latents -> audio and the sampling loop
    need). The text encoder gets umt5-base's full vocabulary. ``fold_vocoder`` folds the
    vocoder's weight norm into plain weights (what serving runs). Deterministic for a given
    seed, device and torch version.
    """
    wanted = list(parts)
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    device = torch.device(device)
    configs = (configs or FullSizeConfigs()).with_layers(layers)
    models = RandomModels(configs=configs)
    if "transformer" in wanted:
        models.transformer = _finish(_build(lambda: ACEStepTransformer.from_config(configs.transformer),
                                            device, seed + 2), dtype, device)
    if "text_encoder" in wanted:
        config = dict(configs.text_encoder)
        config.setdefault("vocab_size", UMT5_VOCAB_SIZE)
        models.text_encoder = _finish(_build(lambda: TextEncoder(config), device, seed + 1), dtype, device)
    if "dcae_encoder" in wanted:
        models.dcae_encoder = _finish(_build(lambda: DCAEEncoder(configs.dcae), device, seed + 3), dtype, device)
    if "dcae_decoder" in wanted:
        models.dcae_decoder = _finish(_build(lambda: DCAEDecoder(configs.dcae), device, seed + 4), dtype, device)
    if "vocoder" in wanted:
        vocoder = _build(lambda: Vocoder(configs.vocoder), device, seed + 5)
        if fold_vocoder:
            vocoder.fold_weight_norm()
        models.vocoder = _finish(vocoder, dtype, device)
    return models


# ------------------------------------------------------------------------------- checkpoint
def write_full_random_checkpoint(out_dir: str | Path, *, seed: int = 0, layers: int | None = None,
                                 configs: FullSizeConfigs | None = None, device: str | torch.device = "cpu",
                                 progress: bool = False) -> Path:
    """Write a random checkpoint with the official configs in the official layout; return its path.

    The DiT is stored in bf16 (like the official file), the rest in fp32. The text encoder has
    umt5-base's shape with the project's tiny stand-in tokenizer (its ids are a subset of the
    embedding's rows) and the lyric vocabulary is the tiny one with the official special ids.
    ``device`` is where weights are initialised (a GPU makes the 3.5B init fast); files are
    written from CPU copies one model at a time. About 9 GB for the full model; the DiT alone
    needs about 12 GB of (host) memory while it is written, less with ``layers``.
    """
    configs = (configs or FullSizeConfigs()).with_layers(layers)
    out = Path(out_dir)
    layout = CheckpointLayout(out)
    started = time.monotonic()

    def note(message: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    size = _write_text_encoder(layout.text_encoder_dir, configs, device, seed)
    note(f"text encoder: {size / 1e9:.2f} GB")
    # DiT: bf16 on disk, as the official file.
    size = _write_part(layout.transformer_dir, configs.transformer, torch.bfloat16,
                       lambda: build_random_models(device, torch.bfloat16, seed=seed, parts=("transformer",),
                                                   configs=configs).transformer.state_dict())
    note(f"transformer ({configs.transformer['num_layers']} blocks): {size / 1e9:.2f} GB")
    # DCAE: both halves in one file, as the official one.
    size = _write_part(layout.dcae_dir, configs.dcae, torch.float32, lambda: _dcae_state(device, seed, configs))
    note(f"DCAE: {size / 1e9:.2f} GB")
    # Vocoder: keep the official weight_g/weight_v pairs (not folded).
    size = _write_part(layout.vocoder_dir, configs.vocoder, torch.float32,
                       lambda: build_random_models(device, torch.float32, seed=seed, parts=("vocoder",),
                                                   configs=configs, fold_vocoder=False).vocoder.state_dict())
    note(f"vocoder: {size / 1e9:.2f} GB")

    write_tiny_vocab(out / VOCAB_FILENAMES[0])
    layout.validate()
    return out


def _write_part(folder: Path, config: Mapping[str, Any], dtype: torch.dtype,
                state: Callable[[], Mapping[str, torch.Tensor]]) -> int:
    """One official folder: ``config.json`` and the weights ``state()`` makes (built only now, and
    dropped once written, so one model at a time is in memory); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, config)
    return save_weights(state(), folder / DIFFUSERS_WEIGHTS, dtype)


def _dcae_state(device: str | torch.device, seed: int, configs: FullSizeConfigs) -> dict[str, torch.Tensor]:
    parts = build_random_models(device, torch.float32, seed=seed, parts=("dcae_encoder", "dcae_decoder"),
                                configs=configs)
    return {**parts.dcae_encoder.state_dict(), **parts.dcae_decoder.state_dict()}


def _write_text_encoder(folder: Path, configs: FullSizeConfigs, device: str | torch.device, seed: int) -> int:
    """The stand-in tokenizer and umt5-base-shaped weights (``vocab_size`` at least the
    tokenizer's); returns the bytes of the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = write_tiny_tokenizer(folder)
    text_config = dict(configs.text_encoder)
    text_config.setdefault("vocab_size", pieces)
    if int(text_config["vocab_size"]) < pieces:
        raise ValueError(f"text encoder vocab_size {text_config['vocab_size']} < tokenizer size {pieces}")
    write_json(folder / CONFIG_FILE, text_config)
    parts = build_random_models(device, torch.float32, seed=seed, parts=("text_encoder",),
                                configs=FullSizeConfigs(configs.transformer, configs.dcae, configs.vocoder,
                                                        text_config))
    state = {k: v for k, v in parts.text_encoder.umt5.state_dict().items() if k not in TIED_KEYS}
    return save_weights(state, folder / TRANSFORMERS_WEIGHTS, torch.float32)

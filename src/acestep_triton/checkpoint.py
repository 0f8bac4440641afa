"""The official ACE-Step checkpoint: its layout, strict loading, a tiny random twin, download.

The loader takes the Hugging Face ``ACE-Step/ACE-Step-v1-3.5B`` folder exactly as published
(four sub-folders, diffusers/transformers file names) plus the lyric BPE vocabulary, which
upstream keeps in its GitHub repository rather than in the checkpoint. Loading is strict: every
key of the files must land in a module and every parameter must come from the files, except
for the weights each model module declares unused (``UNUSED_KEYS``); anything else is an error
that names the keys, because a silently half-loaded model produces plausible-sounding garbage.

``write_tiny_checkpoint`` writes a few-MB random checkpoint in the same layout (same folder and
file names, same key names, tiny sizes) so tests, exports and the demo exercise the real
loading path in seconds without the 7.7 GiB download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .weights import (  # noqa: F401 (re-exported: the checkpoint API's error and file reader)
    CheckpointError,
    SafetensorsFile,
    build_on_meta,
    load_state_dict_strict,
    materialize,
    read_safetensors,
)

HF_REPO_ID = "ACE-Step/ACE-Step-v1-3.5B"
"""The official checkpoint on the Hugging Face Hub."""

UPSTREAM_COMMIT = "d612523f50e252c0e138e68ae75b06223f96e934"
"""The ace-step/ACE-Step commit our reference numbers come from; the vocab is pinned to it."""

VOCAB_URL = (f"https://raw.githubusercontent.com/ace-step/ACE-Step/{UPSTREAM_COMMIT}/"
             "acestep/models/lyrics_utils/vocab.json")
VOCAB_SHA256 = "c2a66ea48c478c0bb9acb5497144b926acdeaa37128faa799508d40f2b9cc558"
"""SHA-256 of upstream's ``vocab.json`` at :data:`UPSTREAM_COMMIT` (checked after download)."""

TRANSFORMER_DIR = "ace_step_transformer"
DCAE_DIR = "music_dcae_f8c8"
VOCODER_DIR = "music_vocoder"
TEXT_ENCODER_DIR = "umt5-base"
CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_FILENAMES = ("lyrics_vocab.json", "vocab.json")
"""Names under which the lyric vocabulary is looked for inside the checkpoint folder, in order."""

OFFICIAL_FILES: dict[str, tuple[str, ...]] = {
    TRANSFORMER_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    DCAE_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    VOCODER_DIR: (CONFIG_FILE, DIFFUSERS_WEIGHTS),
    TEXT_ENCODER_DIR: (CONFIG_FILE, TRANSFORMERS_WEIGHTS, *TOKENIZER_FILES),
}
"""Every file the loader reads, per folder: the official layout, which we never rename."""


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of the official four-folder layout under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def transformer_dir(self) -> Path:
        return self.root / TRANSFORMER_DIR

    @property
    def dcae_dir(self) -> Path:
        return self.root / DCAE_DIR

    @property
    def vocoder_dir(self) -> Path:
        return self.root / VOCODER_DIR

    @property
    def text_encoder_dir(self) -> Path:
        return self.root / TEXT_ENCODER_DIR

    def folder(self, name: str) -> Path:
        if name not in OFFICIAL_FILES:
            raise KeyError(f"unknown checkpoint folder {name!r} (expected one of {sorted(OFFICIAL_FILES)})")
        return self.root / name

    def config_path(self, name: str) -> Path:
        return self.folder(name) / CONFIG_FILE

    def weights_path(self, name: str) -> Path:
        weights = TRANSFORMERS_WEIGHTS if name == TEXT_ENCODER_DIR else DIFFUSERS_WEIGHTS
        return self.folder(name) / weights

    def read_config(self, name: str) -> dict[str, Any]:
        path = self.config_path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"{path}: missing (is {self.root} an ACE-Step checkpoint?)") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e

    def required_files(self) -> list[Path]:
        return [self.root / d / f for d, files in OFFICIAL_FILES.items() for f in files]

    def missing_files(self) -> list[Path]:
        return [p for p in self.required_files() if not p.is_file()]

    def validate(self) -> None:
        """Fail early, naming every missing file, rather than deep inside one model's loader."""
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint folder {self.root} does not exist "
                                  "(`python -m acestep_triton.checkpoint download DIR` fetches it)")
        missing = self.missing_files()
        if missing:
            listed = "\n  ".join(str(p.relative_to(self.root)) for p in missing)
            raise CheckpointError(f"checkpoint {self.root} is incomplete; missing:\n  {listed}")

    def find_vocab(self, vocab_path: str | Path | None = None) -> Path:
        """The lyric vocabulary: ``vocab_path`` if given, else a known file name in ``root``.

        The vocab is not part of the Hub checkpoint (upstream ships it in its source tree), so
        the error says where to put it and how to get it.
        """
        if vocab_path is not None:
            path = Path(vocab_path)
            if not path.is_file():
                raise CheckpointError(f"lyric vocabulary {path} does not exist")
            return path
        for name in VOCAB_FILENAMES:
            path = self.root / name
            if path.is_file():
                return path
        names = " or ".join(VOCAB_FILENAMES)
        raise CheckpointError(
            f"lyric vocabulary not found: pass its path, or place upstream's "
            f"acestep/models/lyrics_utils/vocab.json as {names} in {self.root} "
            f"(`python -m acestep_triton.checkpoint download DIR` fetches it from {VOCAB_URL})")


# ---------------------------------------------------------------------------------------------
# Loading every component


@dataclass
class Components:
    """Everything a generation needs, built from one checkpoint folder.

    ``configs`` maps each official folder name to its ``config.json`` dict (the served layer
    counts and widths are read from there by export and serving code).
    """

    layout: CheckpointLayout
    configs: dict[str, dict[str, Any]]
    vocab_path: Path
    text_tokenizer: Any  # models.text_encoder.PromptTokenizer
    text_encoder: Any  # models.text_encoder.TextEncoder
    transformer: Any  # models.transformer.ACEStepTransformer
    dcae_encoder: Any  # models.dcae.DCAEEncoder
    dcae_decoder: Any  # models.dcae.DCAEDecoder
    vocoder: Any  # models.vocoder.Vocoder
    lyric_tokenizer: Any  # lyrics.tokenizer.LyricTokenizer

    def modules(self) -> dict[str, nn.Module]:
        """The torch modules by component name (to move them to a device or dtype together)."""
        return {"text_encoder": self.text_encoder, "transformer": self.transformer,
                "dcae_encoder": self.dcae_encoder, "dcae_decoder": self.dcae_decoder,
                "vocoder": self.vocoder}


def _finish(module: nn.Module) -> nn.Module:
    """Inference mode: eval (no dropout) and no gradients, so export and serving see constants."""
    module.eval()
    module.requires_grad_(False)
    return module


def _all_or_none(*steps: Callable[[], Any]) -> list[Any]:
    """Run every step even if some fail, then raise one error with all their messages, so a
    user fixing a checkpoint sees every problem at once rather than one per attempt."""
    results: list[Any] = []
    errors: list[str] = []
    for step in steps:
        try:
            results.append(step())
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("\n".join(errors))
    return results


def load_text_encoder(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> nn.Module:
    from acestep_triton.models.text_encoder import load_text_encoder as load_umt5

    return _finish(load_umt5(layout.text_encoder_dir, dtype))


def load_transformer(layout: CheckpointLayout, dtype: torch.dtype = torch.float32, *,
                     drop: Sequence[str] = ()) -> nn.Module:
    """The DiT; the official file is bf16, cast here to ``dtype`` (fp32 by default).

    ``drop`` names top-level submodules to leave out (the condition encoder never runs the
    decoder blocks and vice versa): their tensors are checked against the file but never read.
    """
    from acestep_triton.models.transformer import UNUSED_KEYS, ACEStepTransformer

    config = layout.read_config(TRANSFORMER_DIR)
    state = read_safetensors(layout.weights_path(TRANSFORMER_DIR))
    return materialize(lambda: ACEStepTransformer.from_config(config), state, UNUSED_KEYS,
                       f"transformer ({TRANSFORMER_DIR})", dtype=dtype, drop=drop)


def meta_transformer(ckpt_dir: str | Path) -> nn.Module:
    """The checkpoint's transformer on the meta device: every shape, no weights (for checks)."""
    from acestep_triton.models.transformer import ACEStepTransformer

    config = CheckpointLayout(Path(ckpt_dir)).read_config(TRANSFORMER_DIR)
    return build_on_meta(lambda: ACEStepTransformer.from_config(config))


DCAE_HALVES = ("encoder", "decoder")
"""The two halves of the official DCAE file, each served by its own model."""


def load_dcae_half(layout: CheckpointLayout, half: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """One DCAE half from the single official file, reading only that half's tensors. It is
    checked against every key of the file minus the other half's, so a stray key fails in both."""
    from acestep_triton.models import dcae

    if half not in DCAE_HALVES:
        raise ValueError(f"DCAE half must be one of {DCAE_HALVES}, got {half!r}")
    config = layout.read_config(DCAE_DIR)
    state = read_safetensors(layout.weights_path(DCAE_DIR))
    factory, foreign = ((lambda: dcae.DCAEEncoder(config), dcae.ENCODER_FOREIGN_KEYS) if half == "encoder"
                        else (lambda: dcae.DCAEDecoder(config), dcae.DECODER_FOREIGN_KEYS))
    return materialize(factory, state, (*dcae.UNUSED_KEYS, *foreign), f"DCAE {half} ({DCAE_DIR})", dtype=dtype)


def load_dcae(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """Both DCAE halves (every problem of both reported together)."""
    encoder, decoder = _all_or_none(*(lambda h=h: load_dcae_half(layout, h, dtype) for h in DCAE_HALVES))
    return encoder, decoder


def load_vocoder(layout: CheckpointLayout, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The vocoder with its official ``weight_g``/``weight_v`` pairs (fold them before export)."""
    from acestep_triton.models.vocoder import UNUSED_KEYS, Vocoder

    config = layout.read_config(VOCODER_DIR)
    state = read_safetensors(layout.weights_path(VOCODER_DIR))
    return materialize(lambda: Vocoder(config), state, UNUSED_KEYS, f"vocoder ({VOCODER_DIR})", dtype=dtype)


def load_components(ckpt_dir: str | Path, vocab_path: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Components:
    """Build and strictly load every component of the checkpoint at ``ckpt_dir``.

    ``vocab_path`` is the lyric vocabulary (default: ``lyrics_vocab.json``/``vocab.json`` in
    ``ckpt_dir``). The layout and the vocab are checked before any weight is read.
    """
    from acestep_triton.lyrics.tokenizer import LyricTokenizer
    from acestep_triton.models.text_encoder import PromptTokenizer

    layout = CheckpointLayout(Path(ckpt_dir))
    layout.validate()
    vocab = layout.find_vocab(vocab_path)
    configs = {name: layout.read_config(name) for name in OFFICIAL_FILES}
    text_encoder, transformer, (dcae_encoder, dcae_decoder), vocoder = _all_or_none(
        lambda: load_text_encoder(layout, dtype),
        lambda: load_transformer(layout, dtype),
        lambda: load_dcae(layout, dtype),
        lambda: load_vocoder(layout, dtype),
    )
    return Components(
        layout=layout, configs=configs, vocab_path=vocab,
        text_tokenizer=PromptTokenizer(layout.text_encoder_dir),
        text_encoder=text_encoder, transformer=transformer,
        dcae_encoder=dcae_encoder, dcae_decoder=dcae_decoder, vocoder=vocoder,
        lyric_tokenizer=LyricTokenizer(vocab),
    )


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoint

TINY_TEXT_LAYERS = 12
"""Kept at the official depth so the ERG-tag blocks (8-9) exist."""

# Word pieces of the tiny tokenizer: the vocabulary of typical prompts, so that tokenising a
# prompt gives a few meaningful ids instead of one id per character. Order fixes the ids.
_TINY_WORDS = (
    "pop", "rock", "jazz", "hip", "hop", "rap", "trap", "edm", "house", "techno", "dance",
    "electronic", "folk", "country", "metal", "blues", "soul", "funk", "ambient", "lofi",
    "classical", "orchestral", "ballad", "acoustic", "electric", "guitar", "piano", "drums",
    "bass", "synth", "strings", "violin", "vocal", "vocals", "female", "male", "choir",
    "upbeat", "chill", "sad", "happy", "energetic", "dreamy", "emotional", "melodic", "dark",
    "fast", "slow", "tempo", "bpm", "BPM", "beat", "beats", "key", "major", "minor", "song",
    "music", "instrumental", "verse", "chorus", "bridge", "intro", "outro",
)
_TINY_SUFFIXES = ("ing", "er", "ed", "al", "ic", "s", "ly", "tion")
_TINY_CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               ",.;:!?'\"-_&/()[]+#")


def _tiny_unigram_vocab() -> list[tuple[str, float]]:
    """``(piece, log-prob)`` pairs; ids 0/1/2 = ``<pad>``/``</s>``/``<unk>`` as in umt5-base.

    Scores favour whole words over their spelling (a word scores about one character), so the
    Viterbi segmentation of known words is one piece; unknown words fall back to characters.
    Built from constants, not trained, so the file is the same on every machine.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", round(-6.0 - 0.01 * i, 4)) for i, w in enumerate(_TINY_WORDS)]
    vocab += [(s, round(-7.0 - 0.01 * i, 4)) for i, s in enumerate(_TINY_SUFFIXES)]
    vocab += [(c, round(-8.0 - 0.01 * i, 4)) for i, c in enumerate(_TINY_CHARS)]
    vocab += [(f"▁{c}", round(-9.0 - 0.01 * i, 4)) for i, c in enumerate(_TINY_CHARS)]
    return vocab


def _write_tiny_tokenizer(folder: Path) -> int:
    """Write a fast-tokenizer triple that ``AutoTokenizer`` loads; return its vocabulary size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = _tiny_unigram_vocab()
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                            special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<pad>", "</s>", "<unk>")])
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special,
        "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False})
    _write_json(folder / "special_tokens_map.json", special)
    return len(vocab)


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


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                      dtype: torch.dtype | None = None) -> None:
    """Save with owned, contiguous copies (tied parameters would otherwise share storage)."""
    from safetensors.torch import save_file

    def owned(v: torch.Tensor) -> torch.Tensor:
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.detach().clone().contiguous()

    out = {k: owned(v) for k, v in sorted(tensors.items())}
    save_file(out, str(path), metadata={"format": "pt"})


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


def _write_tiny_text_encoder(folder: Path, seed: int) -> None:
    from acestep_triton.models.text_encoder import TIED_KEYS, TextEncoder

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tiny_tokenizer(folder)
    config = tiny_text_encoder_config(vocab_size)
    _write_json(folder / CONFIG_FILE, config)
    with _Seeded(seed):
        model = TextEncoder(config)
    state = {k: v for k, v in model.umt5.state_dict().items() if k not in TIED_KEYS}
    _save_safetensors(state, folder / TRANSFORMERS_WEIGHTS, torch.float32)


def tiny_transformer_config() -> dict[str, Any]:
    """The official structure (24 blocks, so ERG blocks 15-19 exist) at 32 wide, with a small
    Conformer through the optional ``lyric_encoder_*`` keys; the lyric vocab keeps its 6693 ids."""
    return {
        "_class_name": "ACEStepTransformer2DModel", "_diffusers_version": "0.42.1",
        "in_channels": 8, "out_channels": 8, "num_layers": 24, "num_attention_heads": 2,
        "attention_head_dim": 16, "inner_dim": 32, "mlp_ratio": 2.5, "patch_size": [16, 1],
        "max_height": 16, "max_width": 32768, "max_position": 32768, "rope_theta": 1000000.0,
        "text_embedding_dim": 32, "speaker_embedding_dim": 512, "lyric_encoder_vocab_size": 6693,
        "lyric_hidden_size": 64, "lyric_encoder_num_heads": 4, "lyric_encoder_linear_units": 128,
        "lyric_encoder_num_blocks": 6, "ssl_encoder_depths": [8, 8], "ssl_latent_dims": [16, 8],
        "ssl_names": ["mert", "m-hubert"],
    }


def tiny_dcae_config() -> dict[str, Any]:
    """``AutoencoderDC`` with the official block types and compression (mel 128 → 16 rows, ×8 in
    time), 8-32 channels, one layer per block."""
    return {
        "_class_name": "AutoencoderDC", "_diffusers_version": "0.42.1",
        "in_channels": 2, "latent_channels": 8, "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [8, 16, 16, 32], "decoder_block_out_channels": [8, 16, 16, 32],
        "encoder_layers_per_block": [1, 1, 1, 1], "decoder_layers_per_block": [1, 1, 1, 1],
        "encoder_qkv_multiscales": [[], [], [5], [5]], "decoder_qkv_multiscales": [[], [], [5], [5]],
        "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "decoder_conv_act_fn": "relu",
        "encoder_out_shortcut": True, "decoder_in_shortcut": True, "scaling_factor": 0.41407,
    }


def tiny_vocoder_config() -> dict[str, Any]:
    """ADaMoSHiFiGANV1 with the official mel front end and upsampling (hop 512 at 44.1 kHz) and
    a narrow ConvNeXt/HiFi-GAN."""
    return {
        "_class_name": "ADaMoSHiFiGANV1", "_diffusers_version": "0.42.1",
        "input_channels": 128, "depths": [1, 1, 1, 1], "dims": [16, 16, 24, 32], "kernel_sizes": [7],
        "drop_path_rate": 0.0, "num_mels": 32, "upsample_initial_channel": 128,
        "upsample_rates": [4, 4, 2, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4, 4],
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
        "pre_conv_kernel_size": 13, "post_conv_kernel_size": 13, "use_template": False,
        "sampling_rate": 44100, "n_fft": 2048, "win_length": 2048, "hop_length": 512,
        "n_mels": 128, "f_min": 40, "f_max": 16000,
    }


def _fill_zero_matrices(module: nn.Module) -> None:
    """Give all-zero matrices (adaLN tables, relative-position biases: upstream draws those at
    random, our constructors start them at zero) a random start of scale 1/sqrt(width), so the
    tiny model exercises every path instead of multiplying by zero."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2 and param.is_floating_point() and not param.any():
                param.normal_(0.0, param.shape[-1] ** -0.5)


def _write_tiny_transformer(folder: Path, seed: int) -> None:
    from acestep_triton.models.transformer import ACEStepTransformer

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_transformer_config()
    _write_json(folder / CONFIG_FILE, config)
    with _Seeded(seed):
        model = ACEStepTransformer.from_config(config)
        _fill_zero_matrices(model)
    # bf16 on disk, like the official file (the loader casts to the requested dtype).
    _save_safetensors(model.state_dict(), folder / DIFFUSERS_WEIGHTS, torch.bfloat16)


def _write_tiny_dcae(folder: Path, seed: int) -> None:
    from acestep_triton.models.dcae import DCAEDecoder, DCAEEncoder

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_dcae_config()
    _write_json(folder / CONFIG_FILE, config)
    with _Seeded(seed):
        encoder, decoder = DCAEEncoder(config), DCAEDecoder(config)
        _fill_zero_matrices(encoder)
        _fill_zero_matrices(decoder)
    _save_safetensors({**encoder.state_dict(), **decoder.state_dict()}, folder / DIFFUSERS_WEIGHTS,
                      torch.float32)


def _write_tiny_vocoder(folder: Path, seed: int) -> None:
    from acestep_triton.models.vocoder import Vocoder

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_vocoder_config()
    _write_json(folder / CONFIG_FILE, config)
    with _Seeded(seed):
        model = Vocoder(config)
        _fill_zero_matrices(model)
    _tune_tiny_vocoder_gains(model)
    state = model.state_dict()
    if not any(k.endswith(".weight_g") for k in state):
        raise CheckpointError("vocoder: expected old-style weight_g/weight_v keys (official layout)")
    _save_safetensors(state, folder / DIFFUSERS_WEIGHTS, torch.float32)


TINY_VOCODER_POST_GAIN = 25.0
"""Weight-norm gain of the tiny vocoder's last conv: brings its noise to ~0.1 RMS (measured)."""


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
    :func:`load_components` looks for it.
    """
    from acestep_triton.lyrics.vocab import write_tiny_vocab

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


# ---------------------------------------------------------------------------------------------
# Download


class CheckpointDownloadError(RuntimeError):
    """The official checkpoint or the vocabulary could not be fetched (typically: offline)."""


_OFFLINE_HELP = (
    "This command needs internet access to huggingface.co and raw.githubusercontent.com. "
    "Offline, copy a downloaded checkpoint instead: the four folders of {repo} "
    "({folders}) into {out}, and upstream's acestep/models/lyrics_utils/vocab.json as "
    "{out}/lyrics_vocab.json. Behind a proxy, set HTTPS_PROXY; for a Hub mirror, HF_ENDPOINT.")


def _offline_help(out_dir: Path) -> str:
    return _OFFLINE_HELP.format(repo=HF_REPO_ID, folders=", ".join(OFFICIAL_FILES), out=out_dir)


def download_vocab(dest: str | Path, url: str = VOCAB_URL, timeout_s: float = 60.0) -> Path:
    """Fetch upstream's lyric vocabulary (pinned commit) to ``dest`` and verify its SHA-256."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointDownloadError(
            f"could not download the lyric vocabulary from {url} ({e}).\n{_offline_help(dest.parent)}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise CheckpointDownloadError(f"{url}: unexpected content (sha256 {digest}, expected {VOCAB_SHA256})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def download_checkpoint(out_dir: str | Path, repo_id: str = HF_REPO_ID, revision: str | None = None) -> Path:
    """Download the official checkpoint into ``out_dir`` (official layout) plus the vocab.

    Returns ``out_dir``, ready for :func:`load_components`. Network failures become a
    :class:`CheckpointDownloadError` that says what to do offline.
    """
    out = Path(out_dir)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointDownloadError(
            "downloading needs huggingface_hub: pip install 'acestep-triton[download]'") from e
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(out),
                          allow_patterns=[f"{d}/*" for d in OFFICIAL_FILES])
    except Exception as e:  # huggingface_hub raises many types for "no network"; all mean the same here
        raise CheckpointDownloadError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}).\n{_offline_help(out)}") from e
    download_vocab(out / VOCAB_FILENAMES[0])
    CheckpointLayout(out).validate()
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``tiny OUT [--seed N]`` writes the random checkpoint; ``download OUT`` the official one."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.checkpoint",
                                     description="ACE-Step checkpoints in the official layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint (seconds, a few MB)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    download = sub.add_parser("download", help=f"download {HF_REPO_ID} and the lyric vocabulary")
    download.add_argument("out", type=Path)
    download.add_argument("--revision", default=None, help="Hub revision (default: main)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tiny":
            path = write_tiny_checkpoint(args.out, seed=args.seed)
        else:
            path = download_checkpoint(args.out, revision=args.revision)
    except (CheckpointError, CheckpointDownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

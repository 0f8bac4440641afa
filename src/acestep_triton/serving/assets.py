"""The small, weight-free files an orchestrator needs beside the served components.

The orchestrators tokenise, compute the log-mel of source audio and size the ERG query scales
themselves; the networks run in the component models. So a deployment ships, next to the model
repository, an *assets* folder in the checkpoint's own layout minus the big weight files:

```
assets/
  ace_step_transformer/config.json   music_dcae_f8c8/config.json   music_vocoder/config.json
  umt5-base/{config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json}
  lyrics_vocab.json
  mel.safetensors        # the log-mel window and filterbank stored in the vocoder checkpoint
```

The mel buffers are copied from the checkpoint (not recomputed) so that audio encoded by the
server is bit-identical to the in-process pipeline's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import (
    DCAE_DIR,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VOCODER_DIR,
    CheckpointLayout,
)
from ..lyrics.tokenizer import LyricTokenizer
from ..models.mel import LogMelSpectrogram
from ..models.prompt_tokenizer import PromptTokenizer
from ..models.transformer import TransformerConfig

MEL_PREFIX = "mel_transform."
MEL_FILE = "mel.safetensors"
VOCAB_FILE = "lyrics_vocab.json"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_assets(ckpt_dir: str | Path, out_dir: str | Path, vocab_path: str | Path | None = None) -> Path:
    """Copy configs, tokenizer files and the lyric vocab, and extract the mel buffers."""
    layout = CheckpointLayout(Path(ckpt_dir))
    layout.validate()
    out = Path(out_dir)
    for folder in (TRANSFORMER_DIR, DCAE_DIR, VOCODER_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(layout.config_path(folder), out / folder / "config.json")
    (out / TEXT_ENCODER_DIR).mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        source = layout.folder(TEXT_ENCODER_DIR) / name
        if source.is_file():
            shutil.copy2(source, out / TEXT_ENCODER_DIR / name)
    shutil.copy2(layout.find_vocab(vocab_path), out / VOCAB_FILE)
    with safe_open(str(layout.weights_path(VOCODER_DIR)), framework="pt") as f:
        mel = {k[len(MEL_PREFIX):]: f.get_tensor(k).float().contiguous()
               for k in f.keys() if k.startswith(MEL_PREFIX)}  # noqa: SIM118 (safe_open is not iterable)
    if mel:
        save_file(mel, str(out / MEL_FILE))
    return out


@dataclass
class ServingAssets:
    """What an orchestrator loads at start-up (tokenizers, mel front end, layer counts)."""

    prompt_tokenizer: PromptTokenizer
    lyric_tokenizer: Any
    mel: LogMelSpectrogram
    text_layers: int
    lyric_layers: int
    dit_layers: int


def load_assets(assets_dir: str | Path) -> ServingAssets:
    """Read an assets folder written by :func:`write_assets` (errors name the missing file)."""
    root = Path(assets_dir)
    layout = CheckpointLayout(root)
    for needed in (root / VOCAB_FILE, layout.config_path(TRANSFORMER_DIR), layout.config_path(VOCODER_DIR),
                   layout.folder(TEXT_ENCODER_DIR) / "tokenizer.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"serving assets incomplete: {needed} is missing "
                                    "(write them with `acestep-triton render --checkpoint ...`)")
    mel = LogMelSpectrogram.from_vocoder_config(layout.read_config(VOCODER_DIR))
    if (root / MEL_FILE).is_file():
        mel.load_state_dict(load_file(str(root / MEL_FILE)))
    mel.eval().requires_grad_(False)
    transformer = TransformerConfig.from_dict(layout.read_config(TRANSFORMER_DIR))
    text_config = layout.read_config(TEXT_ENCODER_DIR)
    return ServingAssets(
        prompt_tokenizer=PromptTokenizer(layout.folder(TEXT_ENCODER_DIR)),
        lyric_tokenizer=LyricTokenizer(root / VOCAB_FILE),
        mel=mel,
        text_layers=int(text_config["num_layers"]),
        lyric_layers=int(transformer.lyric_encoder_num_blocks),
        dit_layers=int(transformer.num_layers),
    )


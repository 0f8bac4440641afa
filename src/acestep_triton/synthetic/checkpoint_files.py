"""What the tiny and the full-size random checkpoints share, so both are written the same way.

The stand-in prompt tokenizer (the real umt5-base one is a 4 MB download), the non-zero start of
matrices our constructors leave at zero, and file writing whose bytes depend only on the content
(sorted keys, no timestamps), so a seed always gives the same files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from torch import nn

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


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a fast-tokenizer triple that ``AutoTokenizer`` loads; return its vocabulary size."""
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
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **special,
        "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False})
    write_json(folder / "special_tokens_map.json", special)
    return len(vocab)


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a final newline, the way the official config files look."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_weights(state: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> int:
    """Write ``state`` as safetensors (floating tensors cast to ``dtype``); return the bytes written.

    Tensors are cast one at a time and not cloned when already contiguous and owned, so peak
    memory stays near one copy of the model; tied parameters get their own copy (safetensors
    refuses shared storage).
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key in sorted(state):
        tensor = state[key].detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        pointer = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or pointer in seen:
            tensor = tensor.clone().contiguous()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    save_file(out, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def fill_zero_matrices(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give all-zero matrices (adaLN tables, relative-position biases: upstream draws those at
    random, our constructors start them at zero, trained checkpoints never have them zero) a
    normal start of scale 1/sqrt(width), so every path computes something instead of
    multiplying by zero."""
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2 and param.is_floating_point() and not param.any():
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)

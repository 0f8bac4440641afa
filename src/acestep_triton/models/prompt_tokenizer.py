"""The prompt (tag) tokenizer: UMT5's ``tokenizer.json``, as upstream tokenises prompts.

Upstream calls transformers' fast tokenizer with ``padding=True, truncation=True,
max_length=256``. A fast tokenizer is the ``tokenizers`` library's ``Tokenizer`` read from
``tokenizer.json`` (normaliser, Metaspace pre-tokeniser, Unigram model and the post-processor
that appends ``</s>``), padded and truncated with exactly these settings. This module sets them on
that ``Tokenizer`` itself, without importing transformers: every endpoint stub loads a prompt
tokenizer at start-up, and importing transformers cost it 2.3 s of CPU (of about 4.8 s per stub),
for tokenisation that is the same either way (``tests/test_text_encoder.py`` compares the two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from acestep_client.limits import PROMPT_MAX_TOKENS


def _token_text(value: Any) -> str | None:
    """A special token as the config files write it: a string, or an ``AddedToken`` mapping."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tokenizer_dir: Path) -> dict[str, Any]:
    """``special_tokens_map.json`` overlaid by ``tokenizer_config.json`` (transformers' order)."""
    merged: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            merged.update(json.loads(path.read_text()))
    return merged


class PromptTokenizer:
    """Prompt text → (input_ids, attention_mask), both INT64 [B,T], as upstream tokenises it.

    Upstream settings: pad to the longest prompt of the batch, truncate to 256 tokens, EOS
    appended by the tokenizer's post-processor (so a truncated prompt still ends with EOS).
    """

    def __init__(self, tokenizer_dir: str | Path, max_length: int = PROMPT_MAX_TOKENS) -> None:
        tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config = _special_tokens(tokenizer_dir)
        pad_token = _token_text(config.get("pad_token")) or "<pad>"
        eos_token = _token_text(config.get("eos_token")) or "</s>"
        pad_id, eos_id = self.tokenizer.token_to_id(pad_token), self.tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise ValueError(f"{tokenizer_dir}/tokenizer.json: no id for the pad token {pad_token!r} "
                             f"or the EOS token {eos_token!r}")
        self.pad_id, self.eos_id = pad_id, eos_id
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length, direction=config.get("truncation_side", "right"))
        self.tokenizer.enable_padding(direction=config.get("padding_side", "right"), pad_id=pad_id,
                                      pad_token=pad_token)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("PromptTokenizer takes a list of prompts, not a single string")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask

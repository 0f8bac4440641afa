"""Lyric tokenisation: per-line language detection, normalisation and BPE ids.

`LyricTokenizer(vocab_path).encode(lyrics)` gives the ids upstream ACE-Step feeds its lyric
encoder; `write_tiny_vocab` writes a small vocabulary with the official special ids for tests.
"""

from .tokenizer import MAX_LYRIC_TOKENS, SPECIAL_IDS, SUPPORTED_LANGUAGES, LyricTokenizer
from .vocab import VOCAB_SIZE, write_tiny_vocab

__all__ = [
    "MAX_LYRIC_TOKENS",
    "SPECIAL_IDS",
    "SUPPORTED_LANGUAGES",
    "VOCAB_SIZE",
    "LyricTokenizer",
    "write_tiny_vocab",
]

"""Lyrics → lyric token ids, identical to upstream `ACEStepPipeline.tokenize_lyrics`.

The ids are a model input, so they must be exactly those the checkpoint was trained on:

    [START]
    for each line of the lyrics (split on "\\n", stripped):
        empty line                      → [SPACE]
        otherwise: language = detected language of the line (see `language.py`), "en" if the
                   vocabulary has no tag for it; a line starting with "[...]" (a structure
                   tag such as "[verse]") is always encoded as English;
                   ids = BPE("[<lang>]" + cleaned line with " " written as "[SPACE]") + [SPACE]

A line whose cleaning fails is dropped (upstream prints the error and goes on); we log it.
Nothing is truncated: upstream feeds every id to the lyric encoder. `MAX_LYRIC_TOKENS` is our
serving limit, which the server checks (`check_length`) instead of cutting lyrics silently.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from tokenizers import Tokenizer

from acestep_client.limits import LYRIC_MAX_TOKENS

from .language import classify, detect_line_language
from .normalize import clean_line
from .romanize import hangul_to_latin, japanese_to_romaji, pinyin_with_tones
from .vocab import LANGUAGE_TOKEN_IDS, SPECIAL_IDS, VOCAB_SIZE

__all__ = [
    "MAX_LYRIC_TOKENS",
    "SPECIAL_IDS",
    "SUPPORTED_LANGUAGES",
    "LyricTokenizer",
]

log = logging.getLogger(__name__)

# Upstream does not cut lyric ids anywhere (no max length in the tokenizer, the pipeline or the
# Conformer, whose relative position table grows on demand). We refuse longer lyrics instead:
# 4096 ids is far above a full song (a dense 4-minute song is ~1-2k ids) and keeps the
# quadratic Conformer attention and the cross-attention length bounded in the server.
MAX_LYRIC_TOKENS = LYRIC_MAX_TOKENS  # one home: acestep_client.limits

# Languages the vocabulary has a tag for (detector codes; Chinese is tagged "[zh-cn]").
SUPPORTED_LANGUAGES = frozenset(["zh", *(code for code in LANGUAGE_TOKEN_IDS if code != "zh-cn")])

_STRUCTURE_LINE = re.compile(r"\[.*?\]")

START_ID = SPECIAL_IDS["[START]"]
SPACE_ID = SPECIAL_IDS["[SPACE]"]
STOP_ID = SPECIAL_IDS["[STOP]"]
UNK_ID = SPECIAL_IDS["[UNK]"]


class LyricTokenizer:
    """Upstream's lyric tokenizer over a `tokenizers` BPE vocabulary file (vocab.json).

    Construction reads the vocabulary only; language detection, pinyin and romaji are set up
    on first use. Instances hold no per-call state and may be shared between threads.
    """

    def __init__(self, vocab_path: str | Path) -> None:
        self.vocab_path = Path(vocab_path)
        self._bpe = Tokenizer.from_file(str(self.vocab_path))
        size = self._bpe.get_vocab_size(with_added_tokens=True)
        if size != VOCAB_SIZE:
            raise ValueError(f"{self.vocab_path}: lyric vocabulary has {size} ids, expected {VOCAB_SIZE}")
        for text, expected in SPECIAL_IDS.items():
            got = self._bpe.token_to_id(text)
            if got != expected:
                raise ValueError(f"{self.vocab_path}: special token {text} has id {got}, expected {expected}")
        self._warm_lock = threading.Lock()

    # -- encoding ----------------------------------------------------------------------------
    def line_language(self, line: str) -> str:
        """The language tag code a (stripped, non-empty) line is encoded with."""
        if _STRUCTURE_LINE.match(line):
            return "en"
        language = detect_line_language(line)
        return language if language in SUPPORTED_LANGUAGES else "en"

    def encode_line(self, line: str, language: str) -> list[int]:
        """BPE ids of one line in `language` (a detector code), without the trailing [SPACE]."""
        text = clean_line(line, language)
        tag = "zh-cn" if language == "zh" else language
        return self._bpe.encode(f"[{tag}]{text}".replace(" ", "[SPACE]")).ids

    def encode(self, lyrics: str) -> list[int]:
        """Token ids of the lyrics, exactly as upstream's `tokenize_lyrics` (not truncated)."""
        ids = [START_ID]
        for raw_line in lyrics.split("\n"):
            line = raw_line.strip()
            if not line:
                ids.append(SPACE_ID)
                continue
            language = self.line_language(line)
            try:
                line_ids = self.encode_line(line, language)
            except ImportError:
                raise
            except Exception as exc:  # upstream skips a line it cannot clean
                log.warning("lyric line dropped (%s: %s): %r as %s", type(exc).__name__, exc, line, language)
                continue
            ids += line_ids
            ids.append(SPACE_ID)
        return ids

    def encode_with_mask(self, lyrics: str) -> tuple[list[int], list[int]]:
        """Ids and attention mask as upstream's pipeline builds them.

        Empty lyrics ("" only: upstream tests `len(lyrics) > 0`) give the single id [STOP]=0
        with mask 0; otherwise the encoded ids with an all-ones mask.
        """
        if len(lyrics) == 0:
            return [STOP_ID], [0]
        ids = self.encode(lyrics)
        return ids, [1] * len(ids)

    @staticmethod
    def check_length(ids: list[int]) -> None:
        """Raise ValueError("lyrics: ...") when the ids exceed the serving limit."""
        if len(ids) > MAX_LYRIC_TOKENS:
            raise ValueError(f"lyrics: {len(ids)} lyric tokens, at most {MAX_LYRIC_TOKENS} are accepted")

    # -- inspection --------------------------------------------------------------------------
    def pieces(self, ids: list[int]) -> list[str]:
        """The text of each id ("[SPACE]" shown as " "), to read what the model receives."""
        out = []
        for i in ids:
            piece = self._bpe.id_to_token(int(i))
            out.append(" " if piece == "[SPACE]" else (piece if piece is not None else "[UNK]"))
        return out

    def decode(self, ids: list[int]) -> str:
        """The ids as one string (spaces restored, [STOP] dropped), for logs and debugging."""
        return "".join("" if p == "[STOP]" else p for p in self.pieces(ids))

    def warm_up(self) -> None:
        """Load the language model, pinyin and romaji tables now instead of on first request."""
        with self._warm_lock:
            classify("warm up")
            pinyin_with_tones("预热")
            japanese_to_romaji("準備")
            hangul_to_latin("준비")
            self.encode("warm up 1")

    def __len__(self) -> int:
        return self._bpe.get_vocab_size(with_added_tokens=True)

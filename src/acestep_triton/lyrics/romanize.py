"""Latin transcriptions of Chinese, Korean and Japanese lines (what the lyric BPE was built on).

The lyric vocabulary has almost no CJK characters: upstream feeds Chinese as numbered pinyin
(pypinyin, TONE3, neutral tone as 5), Korean as academic romanisation (hangul-romanize) and
Japanese as Hepburn romaji (cutlet over fugashi/unidic-lite). The libraries are set up (pypinyin
and cutlet also imported) on first use only, because cutlet's dictionary takes about a second
to load and a process that never sees Japanese should not pay for it. cutlet (MeCab) is not safe to call
from several threads at once, so its calls are serialised.
"""

from __future__ import annotations

import threading
from typing import Any

from hangul_romanize import Transliter
from hangul_romanize.rule import academic

__all__ = ["hangul_to_latin", "japanese_to_romaji", "pinyin_with_tones"]

_lock = threading.Lock()
_katsu: Any = None
_katsu_lock = threading.Lock()
_hangul: Any = None


def pinyin_with_tones(text: str) -> str:
    """Han characters → pinyin with tone digits ("的" → "de5"), other characters unchanged."""
    import pypinyin  # lyric-language package (~0.2 s to import): only for Chinese lines

    syllables = pypinyin.pinyin(
        text, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True
    )
    return "".join(item[0] for item in syllables)


def hangul_to_latin(text: str) -> str:
    """Hangul → academic (Yale-like) romanisation, as hangul-romanize's `academic` rule."""
    global _hangul
    if _hangul is None:
        with _lock:
            if _hangul is None:
                _hangul = Transliter(academic)
    return _hangul.translit(text)


def japanese_to_romaji(text: str) -> str:
    """Japanese → Hepburn romaji with cutlet's default settings."""
    global _katsu
    if _katsu is None:
        with _lock:
            if _katsu is None:
                import cutlet  # lyric-language package (MeCab dictionary): only for Japanese lines

                _katsu = cutlet.Cutlet()
    with _katsu_lock:
        return _katsu.romaji(text)

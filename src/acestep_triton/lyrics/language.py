"""Per-line language detection, decided exactly as the reference lyric tokenizer decides it.

Upstream ACE-Step picks the language of each lyric line with a "LangSegment" wrapper around
py3langid 0.3.0 (the filter list set to all 97 py3langid languages). The wrapper cuts the
line into script runs (Korean, Thai, Cyrillic, numbers, Latin incl. French/Vietnamese
letters, quoted parts), classifies each run, merges neighbours, resolves Chinese/Japanese
ambiguity for short Han runs and counts characters per language (Han counts double); the line
language is the most frequent one, or the runner-up if that is English. Its decisions, odd
ones included (a French sentence comes out as Esperanto, "[verse]" as Chinese), are baked
into the ids the model was trained on, so we re-implement those rules for one line with the
fixed configuration upstream uses, and nothing else (no multi-line text, no user filters).

The py3langid model is loaded once, lazily, under a lock; classification itself is read-only
numpy work, so `detect_line_language` can be called from several threads at once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .numbers_zh import spell_cardinal_plain

__all__ = [
    "FILTER_LANGUAGES",
    "LANGID_INSTALL_HINT",
    "classify",
    "detect_line_language",
    "identifier_languages",
    "line_language_counts",
]

LANGID_INSTALL_HINT = (
    "acestep_triton.lyrics needs py3langid 0.3.0 for lyric language detection: install it with "
    "`pip install --no-deps py3langid==0.3.0` (it declares numpy>=2, but runs on the numpy 1.26.4 "
    "we pin; 0.4.0 removed LanguageIdentifier.from_pickled_model)."
)

# Upstream's filter list: every language py3langid knows, alphabetically. Its joined form is
# also used for substring tests ("is this tag a language?"), exactly like upstream does.
FILTER_LANGUAGES: tuple[str, ...] = (
    "af", "am", "an", "ar", "as", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de",
    "dz", "el", "en", "eo", "es", "et", "eu", "fa", "fi", "fo", "fr", "ga", "gl", "gu", "he", "hi",
    "hr", "ht", "hu", "hy", "id", "is", "it", "ja", "jv", "ka", "kk", "km", "kn", "ko", "ku", "ky",
    "la", "lb", "lo", "lt", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt", "nb", "ne", "nl", "nn",
    "no", "oc", "or", "pa", "pl", "ps", "pt", "qu", "ro", "ru", "rw", "se", "si", "sk", "sl", "sq",
    "sr", "sv", "sw", "ta", "te", "th", "tl", "tr", "ug", "uk", "ur", "vi", "vo", "wa", "xh", "zh",
    "zu",
)
_FILTER_STRING = "-".join(FILTER_LANGUAGES)
# Short Han runs with a low score go to whichever of ja/zh comes first in the filter string.
_AMBIGUOUS_HAN_DEFAULT = "ja" if _FILTER_STRING.find("ja") < _FILTER_STRING.find("zh") else "zh"
_HAN_JA_THRESHOLD = 0.89

# ---------------------------------------------------------------------------------------------
# py3langid, loaded once
# ---------------------------------------------------------------------------------------------
_identifier: Any = None
_identifier_lock = threading.Lock()


def _load_identifier() -> Any:
    global _identifier
    if _identifier is None:
        with _identifier_lock:
            if _identifier is None:
                try:
                    # py3langid: optional lyric-language package (installed apart), ~0.1 s to import
                    from py3langid.langid import MODEL_FILE, LanguageIdentifier
                except ImportError as exc:  # pragma: no cover - depends on the environment
                    raise ImportError(LANGID_INSTALL_HINT) from exc
                if not hasattr(LanguageIdentifier, "from_pickled_model"):  # pragma: no cover
                    raise ImportError(LANGID_INSTALL_HINT)
                _identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)
    return _identifier


def classify(text: str) -> tuple[str, float]:
    """py3langid's best language and its normalised probability, rounded to 3 places."""
    language, probability = _load_identifier().classify(text)
    return language, round(float(probability), 3)


def identifier_languages() -> list[str]:
    """The languages of the loaded py3langid model (for tests of our fixed filter list)."""
    return list(_load_identifier().nb_classes)


# ---------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------
# Placeholders that stand for a cut-out run while the rest of the line is analysed.
_KEY = re.compile(r"(⑥\$*\d+\d{6,}⑥)")
_NUMBER_KEY = re.compile(r"⑥\d{6,}⑥")
_PUNCT_RUN = re.compile(r"([^\w\s]+)")
_NON_WORD_RUN = re.compile(r"[^\w]+")
_REPEATED_CHAR = re.compile(r"(.)\1+")
_DIGIT_RUN = re.compile(r"\d+")
_WHITESPACE = re.compile(r"\s")
_SENTENCE = re.compile(r"(.*?[。.?？!！]+[\n]{,1})")
_CAMEL_CAPITAL = re.compile(r"\B([A-Z])")

_FRENCH_LETTERS = "àáâãäåæçèéêëìíîïðñòóôõöùúûüýþÿ"
_VIETNAMESE_LETTERS = "đơưăáàảãạắằẳẵặấầẩẫậéèẻẽẹếềểễệíìỉĩịóòỏõọốồổỗộớờởỡợúùủũụứừửữựôâêỷỹ"


def _script_run(letters: str) -> re.Pattern[str]:
    """A run of words in one script, with leading quotes/brackets and trailing non-letters."""
    return re.compile(rf"(([【《（(“‘\"']*[{letters}]+[\W\s]*)+)")


def _squeeze(text: str) -> str:
    """Text as the classifier sees it: non-word runs → one space, repeated chars collapsed."""
    return _REPEATED_CHAR.sub(r"\1", _NON_WORD_RUN.sub(" ", text)).strip()


def _only_punctuation(text: str) -> bool:
    return not _PUNCT_RUN.sub("", text.replace("\n", "")).strip()


def _clear_text(text: str) -> tuple[str, bool]:
    """The text without punctuation, and whether that is made of digits only (or empty)."""
    clear = _PUNCT_RUN.sub("", re.sub(r"\n+", "", text)).strip()
    return clear, not _DIGIT_RUN.sub("", clear)


def _has_han(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _has_kana(text: str) -> bool:
    return any("\u3040" <= c <= "\u30ff" for c in text)


def _kept(language: str) -> bool:
    """Upstream's filter test (list membership, or substring of the first filter entry)."""
    return "?" in language or language in FILTER_LANGUAGES or language in FILTER_LANGUAGES[0]


# ---------------------------------------------------------------------------------------------
# Chinese SSML-like tags (<number>, <telephone>, <currency>, <date>): only their character
# counts matter here, but we rewrite them the same way to count the same characters.
# ---------------------------------------------------------------------------------------------
_ZH_DIGIT = {str(i): ch for i, ch in enumerate("零一二三四五六七八九")}
_DIGITS_SPLIT = re.compile(r"(\d+)")


def _zh_number_digits(text: str) -> str:
    out = "".join(
        "".join(_ZH_DIGIT.get(d, "") for d in part) if _DIGITS_SPLIT.match(part) else part
        for part in _DIGITS_SPLIT.split(text)
    )
    return out.replace(".", "点")


def _zh_number_amounts(text: str) -> str:
    out = "".join(
        spell_cardinal_plain(part) if _DIGITS_SPLIT.match(part) else part
        for part in _DIGITS_SPLIT.split(text)
    )
    return out.replace(".", "点")


def _with_suffix(value: str, suffix: str, read: Callable[[str], str]) -> str:
    value = read(value)
    return f"{value}{suffix}" if value not in ("", "0") else ""


def _zh_date(text: str) -> str:
    if not text.strip():
        return ""
    text = re.sub(r"日", "", re.sub(r"[/._|年月]", "-", text))
    fields = text.split(" ")
    if len(fields) == 1 and ":" in fields[0]:
        time_text, fields = fields[0], []
    else:
        time_text = fields[1] if len(fields) >= 2 else ""
    ymd = ""
    if fields:
        year = month = day = ""
        parts = fields[0].split("-")
        if len(parts) == 3:
            year, month, day = parts
        elif len(parts) == 2:
            if len(parts[0]) == 4:
                year, month = parts
            else:
                month, day = parts
        elif parts[0]:
            if len(parts[0]) == 4:
                year = parts[0]
            else:
                day = parts[0]
        ymd = (
            _with_suffix(year, "年", _zh_number_digits)
            + _with_suffix(month, "月", _zh_number_amounts)
            + _with_suffix(day, "日", _zh_number_amounts)
        )
        ymd = re.sub(r"([年|月|日])+", r"\1", ymd)
    times = re.sub(r"[/.\-：_]", ":", time_text).split(":")
    hours = minutes = seconds = ""
    if len(times) == 3:
        hours, minutes, seconds = times
    elif len(times) == 2:
        hours, minutes = times
    elif times[0]:
        hours = f"{times[0]}点"
    if len(times) > 1:
        hours = _with_suffix(hours, "点", _zh_number_amounts)
        minutes = _with_suffix(minutes, "分", _zh_number_amounts)
        seconds = _with_suffix(seconds, "秒", _zh_number_amounts)
    return ymd + re.sub(r"([点|分|秒])+", r"\1", hours + minutes + seconds)


def _ssml_zh(tag: str, text: str) -> tuple[str, str]:
    if tag == "telephone":
        return "zh", _zh_number_digits(text.replace("+86", "")).replace("一", "幺")
    if tag == "number":
        return "zh", _zh_number_digits(text)
    if tag == "currency":
        return "zh", _zh_number_amounts(text)
    if tag == "date":
        return "zh", _zh_date(text)
    return tag, text


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------
@dataclass
class _Word:
    lang: str
    text: str
    score: float
    symbol: object = None  # None: plain text, True: <lang>..</lang> tag, str: other tag name


_Groups = tuple[str, ...]

# Runs cut out of a line before the rest is classified, in upstream's order: (placeholder tag,
# pattern, handler method, fixed language). Each run becomes a placeholder "⑥<tag><i:06d>⑥"
# that `_handle_segments` later hands to the handler.
_RUNS: tuple[tuple[str, re.Pattern[str], str, str | None], ...] = (
    ("$1", re.compile(r"(<([a-zA-Z|-]*)>(.*?)<\/*[a-zA-Z|-]*>)"), "_language_tag", None),
    ("$6", _script_run("\uac00-\ud7a3"), "", "ko"),
    ("$8", _script_run("\u0e00-\u0e7f"), "", "th"),
    ("$7", _script_run("А-Яа-яЁё"), "", "ru"),
    ("00", re.compile(r"(\W*\d+\W+\d*\W*\d*)"), "_number", None),
    ("$5", _script_run("a-zA-Z" + _FRENCH_LETTERS + _VIETNAMESE_LETTERS), "_latin", None),
    ("$3", re.compile(r"([\"'])(.*?)(\1)"), "_quoted", None),
    (
        "$4",
        re.compile(r"([\n]*[【《（(“‘])([^【《（(“‘’”)）》】]{3,})([’”)）》】][\W\s]*[\n]{,1})"),
        "_quoted",
        None,
    ),
)


class _LineSegmenter:
    """State of one detection call (upstream keeps it on a shared object; we make a new one)."""

    def __init__(self, classify_fn: Callable[[str], tuple[str, float]]) -> None:
        self._classify = classify_fn
        self._hidden: dict[str, tuple[Callable[[list[_Word], _Groups], None], _Groups]] = {}
        self._waiting: list[_Word] = []
        self._counts: dict[str, int] = {}
        self._line_end = False
        self._runs = tuple(
            (tag, pattern, getattr(self, name) if language is None else self._fixed(language))
            for tag, pattern, name, language in _RUNS
        )

    # -- entry point -------------------------------------------------------------------------
    def counts(self, line: str) -> list[tuple[str, int]]:
        """Characters per language for one line, most frequent first (ties: first seen)."""
        text = _KEY.sub("", line)
        if text.strip():
            for tag, pattern, handler in self._runs:
                text = self._hide(tag, pattern, handler, text)
            self._line_end = False
            self._handle_segments([], text, top_level=True)
        return sorted(self._counts.items(), key=lambda item: item[1], reverse=True)

    def _hide(
        self, tag: str, pattern: re.Pattern[str], handler: Callable[[list[_Word], _Groups], None], text: str
    ) -> str:
        found = [m.groups(default="") for m in pattern.finditer(text)]
        if len(found) == 1 and "".join(found[0]) == text:
            return text  # the whole text is one run: leave it to the general parser
        for index, groups in enumerate(found):
            key = f"⑥{tag}{index:06d}⑥"
            text = pattern.sub(lambda _m, k=key: k, text, count=1)
            self._hidden[key] = (handler, groups)
        return text

    def _handle_segments(self, words: list[_Word], text: str, top_level: bool) -> None:
        segments = _KEY.split(text)
        for index, segment in enumerate(segments):
            if top_level:
                self._line_end = index >= len(segments) - 1
            if _KEY.match(segment):
                handler, groups = self._hidden[segment]
                handler(words, groups)
            else:
                self._parse_plain(words, segment)

    # -- run handlers --------------------------------------------------------------------------
    def _language_tag(self, words: list[_Word], groups: _Groups) -> None:
        tag, inner = groups[1], groups[2]
        if tag in _FILTER_STRING:
            self._add(words, tag, inner, 1.0, symbol=True)
        else:
            language, text = _ssml_zh(tag, inner)
            self._add(words, language, text, 1.0, symbol=tag)

    def _fixed(self, language: str) -> Callable[[list[_Word], _Groups], None]:
        def handle(words: list[_Word], groups: _Groups) -> None:
            self._add(words, language, groups[0], 1.0)

        return handle

    def _number(self, words: list[_Word], groups: _Groups) -> None:
        self._add(words, words[0].lang if words else "zh", groups[0], 0.0)

    def _latin(self, words: list[_Word], groups: _Groups) -> None:
        # Every py3langid language is in the filter list, so each sentence keeps its own
        # classification (upstream's fallbacks for languages outside the filter never apply).
        for sentence in _SENTENCE.split(groups[0]):
            if sentence.strip():
                language, score = self._classify(_squeeze(sentence))
                self._add(words, language, sentence, score)

    def _quoted(self, words: list[_Word], groups: _Groups) -> None:
        text = "".join(groups)
        if _KEY.search(text):
            self._handle_segments(words, text, top_level=False)
            return
        inner = _squeeze(groups[1])
        if len(inner) <= 5:
            self._parse_plain(words, text)
        else:
            language, score = self._classify(inner)
            self._add(words, language, text, score)

    # -- plain text ------------------------------------------------------------------------------
    def _parse_plain(self, words: list[_Word], segment: str) -> None:
        """Classify punctuation-delimited pieces, gluing short ones to the next piece."""
        pieces = _PUNCT_RUN.split(segment)
        line_end = self._line_end
        for index in range(len(pieces)):
            text = pieces[index]
            if not text:
                continue
            last = index >= len(pieces) - 1
            if not last and (_only_punctuation(text) or _only_punctuation(pieces[index + 1])):
                pieces[index + 1] = text + pieces[index + 1]
                continue
            cleaned = _squeeze(_DIGIT_RUN.sub("", _NUMBER_KEY.sub("", text)))
            if not last and len(cleaned) <= 2:
                pieces[index + 1] = text + pieces[index + 1]
                continue
            language, score = self._classify(cleaned)
            prev_language = words[-1].lang if words else None
            if language != "zh" and all("\u4e00" <= c <= "\u9fff" for c in _WHITESPACE.sub("", cleaned)):
                language, score = "zh", 1.0
            if len(cleaned) <= 5 and _has_han(cleaned):
                language = self._short_han(words, text, cleaned, language, score, prev_language,
                                           last and line_end)
            text = _NUMBER_KEY.sub(self._unhide_number, text)
            self._add(words, language, text, score)

    @staticmethod
    def _short_han(
        words: list[_Word], text: str, cleaned: str, language: str, score: float,
        prev_language: str | None, at_line_end: bool,
    ) -> str:
        """Chinese or Japanese for a run of at most five characters with Han in it."""
        if score < _HAN_JA_THRESHOLD:
            language = _AMBIGUOUS_HAN_DEFAULT
        if _has_kana(cleaned):
            return "ja"
        if len(cleaned) > 2 and score > 0.90:
            return language
        if at_line_end:
            return "zh" if len(cleaned) <= 1 else language
        undecided = (
            "zh|ja" if language == "zh" or (len(cleaned) <= 2 and prev_language == "zh") else "ja|zh"
        )
        compact = re.sub(r"\s+", "", text)
        if not compact:  # upstream fails here (None in str); its caller then answers "en"
            raise TypeError("no last character")
        related = (prev_language in undecided or undecided in prev_language) if prev_language else False
        if compact[-1] in ("。", "."):
            return prev_language if related and words else language  # type: ignore[return-value]
        return f"{undecided}|…"  # decided by the next word

    def _unhide_number(self, match: re.Match[str]) -> str:
        key = match.group(0)
        if key in self._hidden:
            return self._hidden[key][1][0]
        return key

    # -- merging and counting ---------------------------------------------------------------------
    def _add(self, words: list[_Word], language: str | None, text: str, score: float,
             symbol: object = None) -> None:
        if text != "\n" and not text.strip():
            return
        language = (language or "").lower()
        if language == "en":
            text = _CAMEL_CAPITAL.sub(r" \1", text).strip("-") + " "
        had_waiting = bool(self._waiting)
        previous = self._waiting.pop() if had_waiting else (words[-1] if words else None)
        if previous is not None and "|" in previous.lang:
            if language in previous.lang:
                previous.lang = language = language.split("|")[0]
            else:
                previous.lang = previous.lang.split("|")[0]
            if had_waiting:
                previous = self._save(words, previous.lang, previous.text, previous.score, previous.symbol)
        previous_lang = previous.lang if previous is not None else None
        if "|" in language and previous_lang and previous_lang not in language and "…" not in language:
            language = language.split("|")[0]
        if "|" in language:
            self._waiting.append(_Word(language, text, score, symbol))
        else:
            self._save(words, language, text, score, symbol)

    def _save(self, words: list[_Word], language: str, text: str, score: float,
              symbol: object = None) -> _Word:
        clear, is_number = _clear_text(text)
        previous = words[-1] if words else None
        if symbol is None and previous is not None and previous.symbol is None:
            if not clear or is_number:
                language = previous.lang  # digits/punctuation follow the previous language
            if previous.lang == language:
                self._count(language, text)
                previous.text += text
                return previous
            if _clear_text(previous.text)[1]:
                text = previous.text + text  # a number before a new language joins it
                words.pop()
        word = _Word(language, text, score, symbol)
        if _kept(language):
            words.append(word)
            self._count(language, text)
        return word

    def _count(self, language: str, text: str) -> None:
        if "|" not in language:
            weight = 2 if language == "zh" else 1  # Han characters count double
            self._counts[language] = self._counts.get(language, 0) + weight * len(text)


def line_language_counts(line: str) -> list[tuple[str, int]]:
    """Characters per detected language in one line (upstream's `getCounts`), for debugging."""
    if "\n" in line:
        raise ValueError("line_language_counts takes a single line")
    return _LineSegmenter(classify).counts(line) or [("zh", 0)]


def detect_line_language(line: str) -> str:
    """The language code upstream's `get_lang` returns for one (stripped, non-empty) line.

    The most frequent language, or the second one when the first is English (so a Chinese
    line with a few English words stays Chinese). Any failure inside the segmenter yields
    "en", as upstream's blanket exception handler does; a missing py3langid is not such a
    failure and raises ImportError.
    """
    if "\n" in line:
        raise ValueError("detect_line_language takes a single line")
    _load_identifier()
    try:
        counts = _LineSegmenter(classify).counts(line) or [("zh", 0)]
    except Exception:
        return "en"
    language = counts[0][0]
    if len(counts) > 1 and language == "en":
        language = counts[1][0]
    return language


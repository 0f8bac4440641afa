"""Text cleaning of one lyric line before BPE, per language, as the model saw it in training.

The lyric BPE was trained on lower-cased text with numbers, currency amounts, ordinals, a few
abbreviations and symbols spelled out in the line's language (the XTTS "multilingual
cleaners" via num2words), Chinese numbers read out in characters and then written as pinyin,
Korean romanised and Japanese turned into romaji. Each step below states the rule; the word
lists are the facts the reference uses. Failures inside the number/abbreviation/symbol steps
leave the text as it was before that step, as in the reference (num2words raises for some
language/currency pairs).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .numbers_zh import normalize_zh_numbers
from .romanize import hangul_to_latin, japanese_to_romaji, pinyin_with_tones

__all__ = ["CLEANED_LANGUAGES", "clean_line", "expand_numbers"]

# Languages that get the full multilingual cleaning (the others: ja → romaji, hi → basic).
CLEANED_LANGUAGES = frozenset(
    {"ar", "cs", "de", "en", "es", "fr", "hu", "it", "nl", "pl", "pt", "ru", "tr", "zh", "ko"}
)

# --------------------------------------------------------------------------------------------
# Abbreviations ("dr." → "doctor"), matched case-insensitively at a word start.
# --------------------------------------------------------------------------------------------
_ABBREVIATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
        ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"),
        ("rev", "reverend"), ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"),
        ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"),
        ("ft", "fort"),
    ),
    "es": (
        ("sra", "señora"), ("sr", "señor"), ("dr", "doctor"), ("dra", "doctora"), ("st", "santo"),
        ("co", "compañía"), ("jr", "junior"), ("ltd", "limitada"),
    ),
    "fr": (
        ("mme", "madame"), ("mr", "monsieur"), ("dr", "docteur"), ("st", "saint"),
        ("co", "compagnie"), ("jr", "junior"), ("ltd", "limitée"),
    ),
    "de": (("fr", "frau"), ("dr", "doktor"), ("st", "sankt"), ("co", "firma"), ("jr", "junior")),
    "pt": (
        ("sra", "senhora"), ("sr", "senhor"), ("dr", "doutor"), ("dra", "doutora"), ("st", "santo"),
        ("co", "companhia"), ("jr", "júnior"), ("ltd", "limitada"),
    ),
    "it": (
        ("sig", "signore"), ("dr", "dottore"), ("st", "santo"), ("co", "compagnia"),
        ("jr", "junior"), ("ltd", "limitata"),
    ),
    "pl": (("p", "pani"), ("m", "pan"), ("dr", "doktor"), ("sw", "święty"), ("jr", "junior")),
    "ar": (),
    "zh": (),
    "cs": (("dr", "doktor"), ("ing", "inženýr"), ("p", "pan")),
    "ru": (("г-жа", "госпожа"), ("г-н", "господин"), ("д-р", "доктор")),
    "nl": (("dhr", "de heer"), ("mevr", "mevrouw"), ("dr", "dokter"), ("jhr", "jonkheer")),
    "tr": (("b", "bay"), ("byk", "büyük"), ("dr", "doktor")),
    "hu": (("dr", "doktor"), ("b", "bácsi"), ("nőv", "nővér")),
    "ko": (),
}
# Russian abbreviations carry no dot; the others end with one.
_ABBREVIATION_RES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    lang: tuple(
        (re.compile(rf"\b{abbr}\b" if lang == "ru" else rf"\b{abbr}\.", re.IGNORECASE), word)
        for abbr, word in pairs
    )
    for lang, pairs in _ABBREVIATIONS.items()
}

# --------------------------------------------------------------------------------------------
# Symbols, in this order: & @ % # $ £ °, each replaced by " <word> ".
# --------------------------------------------------------------------------------------------
_SYMBOL_ORDER = ("&", "@", "%", "#", "$", "£", "°")
_SYMBOL_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("and", "at", "percent", "hash", "dollar", "pound", "degree"),
    "es": ("y", "arroba", "por ciento", "numeral", "dolar", "libra", "grados"),
    "fr": ("et", "arobase", "pour cent", "dièse", "dollar", "livre", "degrés"),
    "de": ("und", "at", "prozent", "raute", "dollar", "pfund", "grad"),
    "pt": ("e", "arroba", "por cento", "cardinal", "dólar", "libra", "graus"),
    "it": ("e", "chiocciola", "per cento", "cancelletto", "dollaro", "sterlina", "gradi"),
    "pl": ("i", "małpa", "procent", "krzyżyk", "dolar", "funt", "stopnie"),
    "ar": ("و", "على", "في المئة", "رقم", "دولار", "جنيه", "درجة"),
    "zh": ("和", "在", "百分之", "号", "美元", "英镑", "度"),
    "cs": ("a", "na", "procento", "křížek", "dolar", "libra", "stupně"),
    "ru": ("и", "собака", "процентов", "номер", "доллар", "фунт", "градус"),
    "nl": ("en", "bij", "procent", "hekje", "dollar", "pond", "graden"),
    "tr": ("ve", "at", "yüzde", "diyez", "dolar", "sterlin", "derece"),
    "hu": ("és", "kukac", "százalék", "kettőskereszt", "dollár", "font", "fok"),
    "ko": ("그리고", "에", "퍼센트", "번호", "달러", "파운드", "도"),
}

# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------
# Ordinal suffixes per language (alternation order decides what a match consumes).
_ORDINAL_RES: dict[str, re.Pattern[str]] = {
    lang: re.compile(pattern)
    for lang, pattern in {
        "en": r"([0-9]+)(st|nd|rd|th)",
        "es": r"([0-9]+)(º|ª|er|o|a|os|as)",
        "fr": r"([0-9]+)(º|ª|er|re|e|ème)",
        "de": r"([0-9]+)(st|nd|rd|th|º|ª|\.(?=\s|$))",
        "pt": r"([0-9]+)(º|ª|o|a|os|as)",
        "it": r"([0-9]+)(º|°|ª|o|a|i|e)",
        "pl": r"([0-9]+)(º|ª|st|nd|rd|th)",
        "ar": r"([0-9]+)(ون|ين|ث|ر|ى)",
        "cs": r"([0-9]+)\.(?=\s|$)",
        "ru": r"([0-9]+)(-й|-я|-е|-ое|-ье|-го)",
        "nl": r"([0-9]+)(de|ste|e)",
        "tr": r"([0-9]+)(\.|inci|nci|uncu|üncü)",
        "hu": r"([0-9]+)(\.|adik|edik|odik|ödik|ödike|ik)",
        "ko": r"([0-9]+)(번째|번|차|째)",
    }.items()
}
# What num2words puts between the main unit and the cents ("five dollars, zero cents"): a
# whole amount is cut before its last occurrence.
_CURRENCY_JOINER = {
    "en": ", ", "es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e ", "pl": ", ",
    "cs": ", ", "ru": ", ", "nl": ", ", "ar": ", ", "tr": ", ", "hu": ", ", "ko": ", ",
}
_CURRENCY_RES = (
    ("GBP", re.compile(r"((£[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+£))")),
    ("USD", re.compile(r"((\$[0-9\.\,]*[0-9]+)|([0-9\.\,]*[0-9]+\$))")),
    ("EUR", re.compile(r"(([0-9\.\,]*[0-9]+€)|((€[0-9\.\,]*[0-9]+)))")),
)
# Thousands separators: "," in en/ru; elsewhere "." (written unescaped upstream, so any
# character between digit groups makes a match; only dots are removed from it).
_COMMA_GROUPED = re.compile(r"\b\d{1,3}(,\d{3})*(\.\d+)?\b")
_DOT_GROUPED = re.compile(r"\b\d{1,3}(.\d{3})*(\,\d+)?\b")
_DECIMAL = re.compile(r"([0-9]+[.,][0-9]+)")
_INTEGER = re.compile(r"[0-9]+")
_WHITESPACE_RUN = re.compile(r"\s+")


def _num2words(value: float | int, lang: str, **kwargs: object) -> str:
    # lyric-language package, imported only when a line has numbers to spell out
    from num2words import num2words

    return num2words(value, lang="cz" if lang == "cs" else lang, **kwargs)


def _currency_words(amount_text: str, lang: str, currency: str) -> str:
    amount = float(re.sub(r"[^\d.]", "", amount_text.replace(",", ".")))
    words = _num2words(amount, lang, to="currency", currency=currency)
    if amount.is_integer():
        cut = words.rfind(_CURRENCY_JOINER[lang])
        if cut != -1:
            words = words[:cut]
    return words


def expand_numbers(text: str, lang: str) -> str:
    """Spell out amounts, decimals, ordinals and integers of a lower-cased line in `lang`."""
    if lang == "zh":
        return normalize_zh_numbers(text)
    if lang in ("en", "ru"):
        text = _COMMA_GROUPED.sub(lambda m: m.group(0).replace(",", ""), text)
    else:
        text = _DOT_GROUPED.sub(lambda m: m.group(0).replace(".", ""), text)
    try:
        for currency, pattern in _CURRENCY_RES:
            text = pattern.sub(lambda m, c=currency: _currency_words(m.group(0), lang, c), text)
    except Exception:
        pass  # an amount num2words cannot say stays as written (and later currencies too)
    if lang != "tr":
        text = _DECIMAL.sub(lambda m: _num2words(float(m.group(1).replace(",", ".")), lang), text)
    text = _ORDINAL_RES[lang].sub(lambda m: _num2words(int(m.group(1)), lang, ordinal=True), text)
    return _INTEGER.sub(lambda m: _num2words(int(m.group(0)), lang), text)


def _expand_abbreviations(text: str, lang: str) -> str:
    for pattern, word in _ABBREVIATION_RES[lang]:
        text = pattern.sub(word, text)
    return text


def _expand_symbols(text: str, lang: str) -> str:
    for symbol, word in zip(_SYMBOL_ORDER, _SYMBOL_WORDS[lang], strict=True):
        text = text.replace(symbol, f" {word} ").replace("  ", " ")
    return text.strip()


def _try(step: Callable[[str, str], str], text: str, lang: str) -> str:
    try:
        return step(text, lang)
    except Exception:
        return text


def _clean_multilingual(text: str, lang: str) -> str:
    text = text.replace('"', "")
    if lang == "tr":
        text = text.replace("İ", "i").replace("Ö", "ö").replace("Ü", "ü")
    text = text.lower()
    text = _try(expand_numbers, text, lang)
    text = _try(_expand_abbreviations, text, lang)
    text = _try(_expand_symbols, text, lang)
    return _WHITESPACE_RUN.sub(" ", text)


def clean_line(text: str, lang: str) -> str:
    """The text of one line as it goes into the BPE for language `lang` (without the tag).

    Raises NotImplementedError for a language the lyric vocabulary has no tag for.
    """
    if lang in CLEANED_LANGUAGES:
        text = _clean_multilingual(text, lang)
        if lang == "zh":
            text = pinyin_with_tones(text)
        elif lang == "ko":
            text = hangul_to_latin(text)
        return text
    if lang == "ja":
        return japanese_to_romaji(text).lower()
    if lang == "hi":
        return _WHITESPACE_RUN.sub(" ", text.lower())
    raise NotImplementedError(f"no lyric cleaning for language {lang!r}")

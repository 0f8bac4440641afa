"""Chinese read-out of Arabic numbers, as the reference lyric tokenizer does it before pinyin.

The model was trained on lyrics whose Chinese lines went through a WeNet/coqui style text
normaliser ("chn_text_norm"): dates, money, phone numbers, fractions, percentages, counted
quantities, long digit strings and plain numbers are rewritten as Chinese characters, and
then every punctuation mark becomes an ASCII comma. "2024年" therefore reaches pypinyin as
"二零二四年" and is read "er4 ling2 er4 si4 nian2". To give the model the ids it was trained on
we reproduce that behaviour rule for rule, including its quirks (each rewrite replaces the
*first* occurrence of the matched string in the whole line, a 4+ digit number is read digit
by digit, "2" before a unit above ten becomes "两").

The same module also provides the simpler cardinal reading used by the language detector's
SSML tags (`spell_cardinal_plain`), which differs in small ways (no "两", units only up to 亿).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

__all__ = [
    "normalize_zh_numbers",
    "read_cardinal",
    "read_digits",
    "spell_cardinal_plain",
]

_DIGIT_CHARS = "零一二三四五六七八九"
_LIANG = "两"
_POINT = "点"

# Units of the "mid" numbering system: 万 = 10^4, then every larger unit is 10^4 times the
# previous one (亿 10^8, 兆 10^12, ...). Sorted from largest to smallest power.
_UNITS_MID: tuple[tuple[int, str], ...] = tuple(
    sorted(
        [(1, "十"), (2, "百"), (3, "千"), (4, "万")]
        + [((i + 2) * 4, ch) for i, ch in enumerate("亿兆京垓秭穰沟涧正载")],
        reverse=True,
    )
)
# The SSML reader of the language detector only knows units up to 亿.
_UNITS_PLAIN: tuple[tuple[int, str], ...] = ((8, "亿"), (4, "万"), (3, "千"), (2, "百"), (1, "十"))

# A symbol of a spelled number: ("d", digit value), ("u", unit power) or ("p", 0) for the point.
_Symbol = tuple[str, int]


def _spell(value: str, units: tuple[tuple[int, str], ...], digit_of: Callable[[str], int]) -> list[_Symbol]:
    """Split a digit string into digit/unit symbols, recursing on the largest fitting unit.

    Leading zeros of a part are read as one 零 (so "105" is 一百零五). The first part keeps
    the zeros it has in `value`, which is how the reference reads e.g. "0123" as 零一百二十三.
    """
    stripped = value.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        if len(stripped) != len(value):
            return [("d", 0), ("d", digit_of(stripped))]
        return [("d", digit_of(stripped))]
    power = next(p for p, _ in units if p < len(stripped))
    head = _spell(value[:-power], units, digit_of)
    tail = _spell(stripped[-power:], units, digit_of)
    return [*head, ("u", power), *tail]


def _render(
    symbols: list[_Symbol], units: tuple[tuple[int, str], ...], liang_at: frozenset[int] = frozenset()
) -> str:
    names = dict(units)
    out = []
    for i, (kind, v) in enumerate(symbols):
        if kind == "d":
            out.append(_LIANG if i in liang_at else _DIGIT_CHARS[v])
        elif kind == "u":
            out.append(names[v])
        else:
            out.append(_POINT)
    return "".join(out)


def _liang_positions(symbols: list[_Symbol]) -> frozenset[int]:
    """Positions of the 2s read 两: before a unit above 十, at the start or after a unit above 十."""
    found = set()
    for i, (kind, v) in enumerate(symbols):
        if kind != "d" or v != 2:
            continue
        nxt = symbols[i + 1] if i + 1 < len(symbols) else None
        prev = symbols[i - 1] if i > 0 else None
        if nxt is None or nxt[0] != "u" or nxt[1] == 1:
            continue
        if prev is None or (prev[0] == "u" and prev[1] != 1):
            found.add(i)
    return frozenset(found)


def read_cardinal(number: str, liang: bool = True) -> str:
    """Read a decimal number string ("1200", "3.25") as a Chinese cardinal.

    Mirrors the reference normaliser: units from the mid system, 两 for a 2 before a unit
    above ten when `liang`, "一十..." shortened to "十...", a result starting with the point
    gets a leading 零.
    """
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"invalid number with more than one dot: {number!r}")
    int_part, dec_part = parts[0], parts[1] if len(parts) == 2 else ""
    # A single digit is read as is; longer integer parts get units.
    symbols = _spell(int_part, _UNITS_MID, int) if len(int_part) > 1 else [("d", int(c)) for c in int_part]
    if dec_part:
        symbols = [*symbols, ("p", 0), *(("d", int(c)) for c in dec_part)]
    return _finish(_render(symbols, _UNITS_MID, _liang_positions(symbols) if liang else frozenset()))


def read_digits(number: str) -> str:
    """Read a digit string digit by digit ("2024" → 二零二四); a dot is read 点."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"invalid number with more than one dot: {number!r}")
    out = "".join(_DIGIT_CHARS[int(c)] for c in parts[0])
    if len(parts) == 2 and parts[1]:
        out += _POINT + "".join(_DIGIT_CHARS[int(c)] for c in parts[1])
    return _finish(out)


def _finish(result: str) -> str:
    if result.startswith(_POINT):
        return _DIGIT_CHARS[0] + result
    if len(result) >= 2 and result[0] == "一" and result[1] == "十":
        return result[1:]
    return result


_PLAIN_DIGITS = {str(i): ch for i, ch in enumerate(_DIGIT_CHARS)}


def _ascii_digit(d: str) -> int:
    if d not in _PLAIN_DIGITS:
        raise KeyError(d)
    return int(d)


def spell_cardinal_plain(number: str) -> str:
    """Cardinal reading used by the detector's <currency>/<date> tags (GPT-SoVITS style).

    Leading zeros are dropped first ("000" → 零), units stop at 亿, no 两, trailing zeros of
    the decimals are dropped. Only ASCII digits are known: another Unicode digit raises
    KeyError, as it does in the reference (where the detector then falls back to English).
    """
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"invalid number with more than one dot: {number!r}")
    int_part, dec_part = parts[0], parts[1] if len(parts) == 2 else ""
    result = ""
    if int_part:
        digits = int_part.lstrip("0")
        if not digits:
            result = _PLAIN_DIGITS["0"]
        else:
            symbols = _spell(digits, _UNITS_PLAIN, _ascii_digit)
            result = _render(symbols, _UNITS_PLAIN)
            if len(symbols) >= 2 and symbols[0] == ("d", 1) and symbols[1] == ("u", 1):
                result = result[1:]
    dec_part = dec_part.rstrip("0")
    if dec_part:
        result = (result or _PLAIN_DIGITS["0"]) + _POINT + "".join(_PLAIN_DIGITS[d] for d in dec_part)
    return result


# --------------------------------------------------------------------------------------------
# Rewriting numbers inside a Chinese line
# --------------------------------------------------------------------------------------------

_SCALE = "(?:亿|千万|百万|万|千|百)"
_SCALE_OR_NONE = "(?:亿|千万|百万|万|千|百|)"
# Alternation order matters: the first alternative that fits decides how much is consumed.
_MONEY_UNIT = f"(?:{_SCALE}|{_SCALE_OR_NONE}元|{_SCALE_OR_NONE}块|角|毛|分)"

# Counting words after which a number is read as a cardinal ("3个", "12首", "5千米").
_QUANTIFIER_CHARS = (
    "丈世丘丝两个丸代令件伏位冬出刀分刻勺匹升单卮厘双叠口只合名周啖回场块坡堂堆墙壳壶夏夜天头季客家"
    "寸对寻尺尾层山岁岭常幢年座张忽户手扎打担挑捆撮支斗斛斤日旬时春曲更月本条杯板枝根桶棵毫江泡溪炮"
    "煲片瓶盆盏盒盘石砣碗碟秋秒程窠笼管箩箱篮簋粒纪线罐网罗群脚腔袋袭课贯贴跳身辆辈道里针钟钧钱钵铢"
    "铺锅锱阙队阵面页顶颗首"
)
_QUANTIFIER = f"(?:[{_QUANTIFIER_CHARS}]|千[克米]|微[克米])"

_RE_DATE = re.compile(
    r"\D+(?P<date>(?:(?:[089]\d|(?:19|20)\d{2})年)?(?:\d{1,2}月(?:\d{1,2}[日号])?)?)"
)
_RE_MONEY = re.compile(
    rf"\D+(?P<money>\d+(?:\.\d+)?[多余几]?{_MONEY_UNIT}(?:\d{_MONEY_UNIT}?)?)"
)
_RE_MOBILE = re.compile(r"\D(?P<phone>(?:\+?86 ?)?1(?:[38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
_RE_LANDLINE = re.compile(r"\D(?P<phone>(?:0(?:10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
_RE_FRACTION = re.compile(r"\d+/\d+")
_RE_PERCENT = re.compile(r"\d+(?:\.\d+)?%")
_RE_COUNTED = re.compile(rf"(?P<num>\d+(?:\.\d+)?)[多余几]?{_QUANTIFIER}")
_RE_LONG_DIGITS = re.compile(r"\d{4,32}")
_RE_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_RE_LATIN_TWO_LATIN = re.compile(r"(?P<a>[a-zA-Z]+)二(?P<b>[a-zA-Z]+)")
_RE_NUMBER_IN_MONEY = re.compile(r"\d+(?:\.\d+)?")

# Punctuation (Chinese + ASCII) that the normaliser turns into an ASCII comma.
_ZH_PUNCTUATION = (
    "！？｡。"
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏·〈〉-"
)
_TO_COMMA = str.maketrans({ch: "," for ch in _ZH_PUNCTUATION + string.punctuation})


def _read_date(date: str) -> str:
    """'2024年8月1日' → 二零二四年八月一日 (year digit by digit, month/day as cardinals)."""
    if "年" in date:
        year, rest = date.split("年", 1)
        year = read_digits(year) + "年"
    else:
        year, rest = "", date
    if not rest:
        return year
    month, day = rest.split("月", 1)
    month = read_cardinal(month) + "月"
    if day:
        day = read_cardinal(day[:-1]) + day[-1]
    return year + month + day


def _read_money(money: str) -> str:
    for number in _RE_NUMBER_IN_MONEY.findall(money):
        money = money.replace(number, read_cardinal(number))
    return money


def _read_mobile(phone: str) -> str:
    return "".join(read_digits(part) for part in phone.strip("+").split())


def _read_landline(phone: str) -> str:
    return "".join(read_digits(part) for part in phone.split("-"))


def _read_fraction(fraction: str) -> str:
    numerator, denominator = fraction.split("/")
    return read_cardinal(denominator) + "分之" + read_cardinal(numerator)


def _rewrite_first(text: str, found: list[str], read: Callable[[str], str]) -> str:
    """Replace, for each found string in order, its first occurrence in the current text."""
    for item in found:
        text = text.replace(item, read(item), 1)
    return text


def normalize_zh_numbers(text: str) -> str:
    """Rewrite numbers of a (lower-cased) Chinese line in characters, punctuation to commas."""
    text = "^" + text + "$"
    text = _rewrite_first(text, [m.group("date") for m in _RE_DATE.finditer(text)], _read_date)
    text = _rewrite_first(text, [m.group("money") for m in _RE_MONEY.finditer(text)], _read_money)
    text = _rewrite_first(text, [m.group("phone") for m in _RE_MOBILE.finditer(text)], _read_mobile)
    text = _rewrite_first(text, [m.group("phone") for m in _RE_LANDLINE.finditer(text)], _read_landline)
    text = _rewrite_first(text, _RE_FRACTION.findall(text), _read_fraction)
    text = text.replace("％", "%")
    text = _rewrite_first(
        text, _RE_PERCENT.findall(text), lambda p: "百分之" + read_cardinal(p.strip().strip("%"))
    )
    text = _rewrite_first(text, [m.group("num") for m in _RE_COUNTED.finditer(text)], read_cardinal)
    text = _rewrite_first(text, _RE_LONG_DIGITS.findall(text), read_digits)
    text = _rewrite_first(text, _RE_NUMBER.findall(text), read_cardinal)
    for m in list(_RE_LATIN_TWO_LATIN.finditer(text)):
        text = text.replace(m.group(0), m.group("a") + "2" + m.group("b"), 1)
    text = text.lstrip("^").rstrip("$")
    return text.translate(_TO_COMMA)

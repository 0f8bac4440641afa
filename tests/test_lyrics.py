"""Lyric tokenizer: exact upstream ids, language decisions, normalisation rules, tiny vocab.

The reference is upstream ACE-Step d612523 `ACEStepPipeline.tokenize_lyrics` with the real
vocabulary: `golden/lyrics_tokens.json` (every case must match id for id). The extra cases
below were produced by running that same upstream code on lines the golden file does not
cover (Chinese dates/money/phones/fractions, currency and ordinals, mixed scripts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from acestep_triton.lyrics import (
    MAX_LYRIC_TOKENS,
    SPECIAL_IDS,
    VOCAB_SIZE,
    LyricTokenizer,
    write_tiny_vocab,
)
from acestep_triton.lyrics import language as language_mod
from acestep_triton.lyrics import tokenizer as tokenizer_mod
from acestep_triton.lyrics.language import (
    FILTER_LANGUAGES,
    detect_line_language,
    identifier_languages,
)
from acestep_triton.lyrics.normalize import clean_line
from acestep_triton.lyrics.numbers_zh import (
    normalize_zh_numbers,
    read_cardinal,
    read_digits,
    spell_cardinal_plain,
)

# Number of cases in golden/lyrics_tokens.json; `test_every_golden_case_is_parametrised`
# fails if the file grows or shrinks, so no case can go untested.
N_GOLDEN_CASES = 12


def _golden(golden_dir: Path) -> list[dict]:
    return json.loads((golden_dir / "lyrics_tokens.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def real_tokenizer(golden_dir: Path) -> LyricTokenizer:
    return LyricTokenizer(golden_dir / "lyrics_vocab.json")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LyricTokenizer:
    path = tmp_path_factory.mktemp("tiny_vocab") / "vocab.json"
    write_tiny_vocab(path)
    return LyricTokenizer(path)


def _diff_message(got: list[int], want: list[int], tok: LyricTokenizer) -> str:
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                 min(len(got), len(want)))
    n_diff = sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))
    return (
        f"{n_diff} of {len(want)} ids differ (lengths {len(got)} vs {len(want)}), first at {first}:\n"
        f"  got  {tok.pieces(got[first:first + 12])}\n  want {tok.pieces(want[first:first + 12])}"
    )


# ----------------------------------------------------------------------------------------------
# Golden cases
# ----------------------------------------------------------------------------------------------
def test_every_golden_case_is_parametrised(golden_dir: Path) -> None:
    assert len(_golden(golden_dir)) == N_GOLDEN_CASES


@pytest.mark.parametrize("index", range(N_GOLDEN_CASES))
def test_golden_token_ids(index: int, golden_dir: Path, real_tokenizer: LyricTokenizer) -> None:
    case = _golden(golden_dir)[index]
    got = real_tokenizer.encode(case["lyrics"])
    assert got == case["token_ids"], _diff_message(got, case["token_ids"], real_tokenizer)
    assert real_tokenizer.pieces(got) == case["decoded"]


@pytest.mark.parametrize("index", range(N_GOLDEN_CASES))
def test_golden_line_languages(index: int, golden_dir: Path) -> None:
    case = _golden(golden_dir)[index]
    got = [detect_line_language(line.strip()) if line.strip() else None
           for line in case["lyrics"].split("\n")]
    assert got == case["line_langs_detected_raw"]


# (lyrics, decoded text, ids) from upstream d612523 tokenize_lyrics with the real vocabulary.
UPSTREAM_EXTRA_CASES = [
    ("我们一起走过2024年8月15日的夏天",
     "[START][zh-cn]wo3men5yi4qi3zou3guo4er4ling2er4si4nian2ba1yue4shi2wu3ri4de5xia4tian1 ",
     [261, 5023, 4893, 4851, 4620, 4881, 39, 4632, 4819, 4725, 25, 52, 4497, 4725, 4728, 27, 1164,
      4596, 4686, 4794, 4598, 2497, 4498, 4760, 17, 4650, 37, 1164, 4499, 33, 1164, 4574, 2]),
    ("价格是5元5角，打电话13812345678",
     "[START][zh-cn]jia4ge2shi4wu3yuan2wu3jiao3,da3dian4hua4yi1san1ba1yi1er4san1si4wu3liu4qi1ba1 ",
     [261, 5023, 23, 1164, 4499, 4772, 4557, 2497, 4498, 2124, 14, 4596, 2497, 4498, 23, 1164, 28,
      4498, 7, 17, 4588, 1447, 4604, 4654, 4586, 150, 4574, 4686, 4586, 4725, 150, 4574, 4728,
      2497, 4498, 4903, 4703, 4686, 2]),
    ("我有3个苹果和12首歌，百分之50%",
     "[START][zh-cn]wo3you3san1ge4ping2guo3he2shi2er4shou3ge1,bai3fen1zhi1bai3fen1zhi1wu3shi2 ",
     [261, 5023, 4893, 38, 4632, 150, 4574, 4585, 29, 52, 4497, 20, 4656, 4589, 4598, 4725, 4762,
      4886, 7, 15, 4658, 132, 4574, 4637, 15, 4658, 132, 4574, 4637, 2497, 4498, 4598, 2]),
    ("第1名在12.5秒内跑完3/4圈",
     "[START][zh-cn]di4yi4ming2zai4shi2er4dian3wu3miao3nei4pao3wan2si4fen1zhi1san1quan1 ",
     [261, 5023, 4592, 4620, 2959, 4497, 4597, 4598, 4725, 1447, 4695, 2497, 4498, 26, 1164, 28,
      4498, 4768, 29, 4576, 465, 4596, 4728, 132, 4574, 4637, 150, 4574, 1583, 4574, 2]),
    ("Mr. Smith paid $20.15 for 1,000 roses on the 2nd day",
     "[START][en]mister smith paid twenty dollars, fifteen cents for one thousand roses on the "
     "second day ",
     [261, 259, 26, 345, 44, 2, 3139, 22, 40, 2, 1899, 17, 2, 232, 50, 210, 2, 134, 84, 59, 32, 7,
      2, 19, 140, 136, 50, 2, 1217, 192, 2, 182, 31, 2, 28, 111, 2, 40, 206, 53, 2, 89, 791, 2, 47,
      2, 42, 2, 32, 1763, 2795, 2, 17, 88, 2]),
    ("Tengo 2 perros y 1.000 gatos, Sr. García",
     "[START][es]tengo dos perros y mil gatos, señor garcía ",
     [261, 284, 327, 119, 2, 1140, 2, 124, 31, 1224, 2, 38, 2, 2246, 2, 20, 1626, 32, 7, 2, 66,
      1239, 31, 2, 537, 1227, 2]),
    ("Das macht 20,15€, Dr. Müller",
     "[START][de]das macht zwanzig Euro und fünfzehn Cent, doktor müller ",
     [261, 260, 330, 2, 26, 77, 583, 2, 39, 6137, 1476, 20, 2, 5764, 121, 28, 2, 320, 2, 427, 27,
      19, 517, 351, 2, 5762, 86, 7, 2, 134, 502, 57, 2, 516, 84, 44, 2]),
    ("Это будет 20.15€ сэр",
     "[START][ru]это будет двадцать евро, пятнадцать центов сэр ",
     [261, 267, 3451, 2, 3731, 2, 3378, 3421, 3378, 3396, 3624, 2, 3805, 3429, 7, 2, 3758, 3392,
      3412, 3378, 3396, 3624, 2, 3396, 3410, 3761, 2, 3391, 3403, 3390, 2]),
    ("我爱你 baby\nI love you 我的爱人",
     "[START][zh-cn]wo3ai4ni3 baby [zh-cn]i love you wo3de5ai4ren2 ",
     [261, 5023, 4893, 4568, 27, 4554, 2, 15, 2647, 2, 5023, 22, 2, 99, 76, 2, 74, 2, 4893, 17,
      4650, 4568, 46, 4596, 2]),
    ("[Verse 1]\n東京タワーは333メートル\n\n[Chorus]",
     "[START][en][UNK]verse one[UNK] [ja]tokyo tower wa 333 metre  [en][chorus] ",
     [261, 259, 1, 35, 173, 18, 2, 28, 111, 1, 2, 5412, 51, 3059, 28, 2, 33, 69, 44, 2, 465, 2,
      4498, 4498, 4498, 2, 80, 144, 18, 2, 2, 259, 6684, 2]),
    ("안녕 오빠 100%",
     "[START][ko]annyeong o-ppa baeg peosenteu ",
     [261, 6152, 43, 2351, 5815, 2, 28, 8, 29, 547, 2, 1159, 5421, 2, 124, 439, 18, 533, 34, 2]),
    ("Oh-oh-oh, 50 % & #1",
     "[START][en]oh-oh-oh, fifty percent and hash one ",
     [261, 259, 28, 21, 8, 28, 21, 8, 28, 21, 7, 2, 19, 140, 210, 2, 124, 31, 1217, 33, 2, 53, 2,
      102, 120, 2, 28, 111, 2]),
]


@pytest.mark.parametrize(("lyrics", "decoded", "ids"), UPSTREAM_EXTRA_CASES,
                         ids=[c[0][:24] for c in UPSTREAM_EXTRA_CASES])
def test_upstream_extra_cases(lyrics: str, decoded: str, ids: list[int],
                              real_tokenizer: LyricTokenizer) -> None:
    got = real_tokenizer.encode(lyrics)
    assert real_tokenizer.decode(got) == decoded
    assert got == ids, _diff_message(got, ids, real_tokenizer)


# Line → language as upstream's get_lang answers (before the unsupported → "en" step).
UPSTREAM_LINE_LANGUAGES = {
    "我爱你 baby": "zh", "Hello 世界": "zh", "今日は good day": "pl", "iPhone 15系列机型": "zh",
    "<en>hello</en>你好": "zh", "<number>123</number>": "zh", "东京": "zh", "日本": "ja", "春": "zh",
    "佐々木": "zh", "[verse]": "zh", "[chorus]": "zh", "Je t'aime": "en", "Ich liebe dich": "de",
    "Oh-oh-oh": "fi", "2024": "zh", "!!!": "zh", "오빠 oppa": "ko", "Привет world": "ru",
    "¿Qué?": "fr", "ฉันรักเธอ": "th",
}


@pytest.mark.parametrize(("line", "language"), UPSTREAM_LINE_LANGUAGES.items())
def test_upstream_line_language(line: str, language: str) -> None:
    assert detect_line_language(line) == language


# ----------------------------------------------------------------------------------------------
# Rules that the ids depend on
# ----------------------------------------------------------------------------------------------
def test_special_ids_are_the_official_ones(real_tokenizer: LyricTokenizer) -> None:
    official = {
        "[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[START]": 261, "[en]": 259, "[de]": 260,
        "[fr]": 262, "[ru]": 267, "[es]": 284, "[it]": 285, "[pt]": 286, "[cs]": 293, "[pl]": 294,
        "[tr]": 295, "[nl]": 297, "[ar]": 5022, "[zh-cn]": 5023, "[ja]": 5412, "[hu]": 5753,
        "[ko]": 6152, "[hi]": 6680, "[start]": 6681, "[intro]": 6682, "[verse]": 6683,
        "[chorus]": 6684, "[bridge]": 6685, "[outro]": 6686, "[end]": 6687, "[inst]": 6688,
        "[solo]": 6689, "[hook]": 6690, "[pre-chorus]": 6691, "[break]": 6692,
    }
    assert official == SPECIAL_IDS
    assert len(real_tokenizer) == VOCAB_SIZE == 6693


def test_filter_list_is_every_py3langid_language() -> None:
    # The segmenter relies on this (every classification passes upstream's filter).
    assert list(FILTER_LANGUAGES) == sorted(identifier_languages())


def test_structure_and_unsupported_lines_are_english(real_tokenizer: LyricTokenizer) -> None:
    assert detect_line_language("[verse]") == "zh"  # upstream's raw decision...
    assert real_tokenizer.encode("[verse]") == [261, 259, 6683, 2]  # ...is overridden to [en]
    assert detect_line_language("Je t'aime, mon amour. C'est la vie!") == "eo"
    assert real_tokenizer.encode("Je t'aime")[:2] == [261, 259]


def test_empty_lines_and_mask(real_tokenizer: LyricTokenizer) -> None:
    assert real_tokenizer.encode("") == [261, 2]
    assert real_tokenizer.encode_with_mask("") == ([0], [0])  # upstream: no lyrics → [0], mask 0
    assert real_tokenizer.encode_with_mask("\n ") == ([261, 2, 2], [1, 1, 1])


@pytest.mark.parametrize(("number", "cardinal"), [
    ("10", "十"), ("15", "十五"), ("105", "一百零五"), ("200", "两百"), ("20", "二十"),
    ("22000", "两万两千"), ("1200", "一千两百"), ("100000", "十万"), ("10050", "一万零五十"),
    ("0123", "零一百二十三"), ("12.5", "十二点五"), ("20000000000", "两百亿"),
    ("1000000000000", "一兆"),
])
def test_chinese_cardinals(number: str, cardinal: str) -> None:
    assert read_cardinal(number) == cardinal


def test_chinese_number_readings() -> None:
    assert read_digits("2024") == "二零二四"
    assert spell_cardinal_plain("200") == "二百"  # the detector's reader has no 两
    assert spell_cardinal_plain("000") == "零"
    assert spell_cardinal_plain("1000000000000") == "一万亿"
    assert normalize_zh_numbers("2024年") == "二零二四年"
    assert normalize_zh_numbers("3/4和50%") == "四分之三和百分之五十"
    assert normalize_zh_numbers("b2b 你好！") == "b2b 你好,"
    assert clean_line("2024年", "zh") == "er4ling2er4si4nian2"


def test_cleaning_per_language() -> None:
    assert clean_line("I have 3 cats, 1st!", "en") == "i have three cats, first!"
    assert clean_line("Cuesta $5 @ 50%", "es") == "cuesta cinco dólares arroba cincuenta por ciento"
    assert clean_line("사랑해요", "ko") == "salanghae-yo"
    assert clean_line("今日はいい天気", "ja") == "kyou wa ii tenki"
    assert clean_line("Namaste  DOST", "hi") == "namaste dost"
    with pytest.raises(NotImplementedError):
        clean_line("x", "xx")


# ----------------------------------------------------------------------------------------------
# Serving concerns
# ----------------------------------------------------------------------------------------------
def test_length_limit_is_checked_not_truncated(real_tokenizer: LyricTokenizer) -> None:
    ids = real_tokenizer.encode("la " * 3000)
    assert len(ids) > MAX_LYRIC_TOKENS  # upstream does not truncate, neither do we
    with pytest.raises(ValueError, match=r"^lyrics: "):
        real_tokenizer.check_length(ids)
    real_tokenizer.check_length(ids[:MAX_LYRIC_TOKENS])


def test_line_that_fails_cleaning_is_dropped(real_tokenizer: LyricTokenizer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_clean = tokenizer_mod.clean_line

    def failing(text: str, lang: str) -> str:
        if text == "boom":
            raise RuntimeError("cannot clean")
        return real_clean(text, lang)

    monkeypatch.setattr(tokenizer_mod, "clean_line", failing)
    assert real_tokenizer.encode("hello\nboom\nhello") == real_tokenizer.encode("hello\nhello")


def test_missing_py3langid_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(language_mod, "_identifier", None)
    monkeypatch.setitem(sys.modules, "py3langid", None)
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps py3langid==0\.3\.0"):
        detect_line_language("hello world")


SONG = """[verse]
Walking down the empty street tonight
City lights are shining oh so bright
I remember every word you said

[pre-chorus]
We were 17 and free

[chorus]
清晨的阳光照在你脸上
我们一起走过2024年的夏天
君の笑顔が見たい
사랑해요 my love
$5 for a dream, 100% for you
"""


def test_thread_safe_and_fast(golden_dir: Path, real_tokenizer: LyricTokenizer) -> None:
    real_tokenizer.warm_up()
    song = SONG * 3  # ~45 lines, several languages
    start = time.perf_counter()
    expected = real_tokenizer.encode(song)
    elapsed = time.perf_counter() - start
    limit = float(os.environ.get("ACESTEP_LYRICS_TIME_LIMIT_S", "1.0"))
    assert elapsed < limit, f"tokenising a {len(song.splitlines())}-line song took {elapsed:.3f} s"
    texts = [song, *(c["lyrics"] for c in _golden(golden_dir))] * 4
    serial = [real_tokenizer.encode(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(real_tokenizer.encode, texts))
    assert parallel == serial
    assert serial[0] == expected


# ----------------------------------------------------------------------------------------------
# Tiny vocabulary
# ----------------------------------------------------------------------------------------------
def test_tiny_vocab_file(tmp_path: Path, tiny_tokenizer: LyricTokenizer) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_tiny_vocab(a)
    write_tiny_vocab(b)
    assert a.read_bytes() == b.read_bytes(), "tiny vocabulary is not deterministic"
    size = a.stat().st_size
    assert size < 300_000, f"tiny vocabulary is {size} bytes"
    assert len(tiny_tokenizer) == VOCAB_SIZE
    bpe = tiny_tokenizer._bpe
    for text, i in SPECIAL_IDS.items():
        assert bpe.token_to_id(text) == i
    real_shape = json.loads(a.read_text(encoding="utf-8"))
    assert real_shape["model"]["type"] == "BPE"
    assert real_shape["pre_tokenizer"] == {"type": "Whitespace"}


@pytest.mark.parametrize("index", range(N_GOLDEN_CASES))
def test_tiny_vocab_tokenises_golden_lyrics(index: int, golden_dir: Path,
                                            tiny_tokenizer: LyricTokenizer,
                                            real_tokenizer: LyricTokenizer) -> None:
    lyrics = _golden(golden_dir)[index]["lyrics"]
    ids = tiny_tokenizer.encode(lyrics)
    assert SPECIAL_IDS["[UNK]"] not in ids, tiny_tokenizer.pieces(ids)
    assert max(ids) < VOCAB_SIZE
    # Same normalised text as with the real vocabulary, only cut into smaller pieces.
    assert tiny_tokenizer.decode(ids) == real_tokenizer.decode(real_tokenizer.encode(lyrics))

"""The lyric vocabulary: official special ids, and a tiny stand-in vocabulary for tests.

The released model embeds lyric ids with a 6693-row table, so every id below is part of the
model contract. The real vocabulary (upstream `acestep/models/lyrics_utils/vocab.json`) is a
HF `tokenizers` file: a BPE model over lower-case Latin/Cyrillic/... pieces plus "added
tokens" for the specials, which the tokenizer matches verbatim in the text before BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "LANGUAGE_TOKEN_IDS",
    "SPECIAL_IDS",
    "STRUCTURE_TAG_IDS",
    "VOCAB_SIZE",
    "write_tiny_vocab",
]

VOCAB_SIZE = 6693

# Language tags: the key is the tag text without brackets (Chinese is "zh-cn").
LANGUAGE_TOKEN_IDS: dict[str, int] = {
    "en": 259, "de": 260, "fr": 262, "ru": 267, "es": 284, "it": 285, "pt": 286, "cs": 293,
    "pl": 294, "tr": 295, "nl": 297, "ar": 5022, "zh-cn": 5023, "ja": 5412, "hu": 5753,
    "ko": 6152, "hi": 6680,
}
# Song-structure tags (lower case: lyrics are lower-cased before they meet the vocabulary).
STRUCTURE_TAG_IDS: dict[str, int] = {
    "start": 6681, "intro": 6682, "verse": 6683, "chorus": 6684, "bridge": 6685, "outro": 6686,
    "end": 6687, "inst": 6688, "solo": 6689, "hook": 6690, "pre-chorus": 6691, "break": 6692,
}
# Every official special token, by its text in the vocabulary.
SPECIAL_IDS: dict[str, int] = {
    "[STOP]": 0,
    "[UNK]": 1,
    "[SPACE]": 2,
    "[START]": 261,
    **{f"[{name}]": i for name, i in LANGUAGE_TOKEN_IDS.items()},
    **{f"[{name}]": i for name, i in STRUCTURE_TAG_IDS.items()},
}

# Characters the tiny vocabulary knows one by one: everything that normalised Latin,
# pinyin, romaji, romanised Korean, Cyrillic and common punctuation can contain.
_TINY_CHARS = "".join(
    [
        "!\"$%&'()*,-./0123456789:;=?_|",
        "abcdefghijklmnopqrstuvwxyz",
        "¡«°´·º»¿×ßàáâãäæçèéêëìíîïðñòóôõöøùúûüýÿăąćčďđęěğıłńňōőœřśşšţťůűźżž",
        "абвгдежзийклмнопрстуфхцчшщъыьэюяё",
        "‐‑–—‘’“”„•…",
        "、。「」『』《》〈〉！（），－／：；？",
    ]
)
# A few merges, so that the tiny vocabulary also exercises the BPE merge path.
_TINY_MERGES = (
    ("t", "h"), ("th", "e"), ("i", "n"), ("in", "g"), ("a", "n"), ("e", "r"), ("o", "u"),
    ("o", "n"), ("e", "n"), ("a", "i"), ("n", "g"), ("a", "ng"), ("s", "h"), ("z", "h"),
    ("c", "h"), ("o", "ng"),
)


def write_tiny_vocab(path: Path) -> None:
    """Write a small, deterministic lyric vocabulary in the real file's format.

    All official special tokens keep their ids, so the vocabulary spans ids 0..6692 like the
    real one. The remaining ids are single characters (enough that any normalised Latin,
    pinyin, romaji or Cyrillic line tokenises without [UNK]), the results of a few merges,
    then unreachable fillers ("[unusedNNNN]": BPE only produces pieces that merges build).
    """
    special_by_id = {i: text for text, i in SPECIAL_IDS.items()}
    pieces = list(dict.fromkeys(_TINY_CHARS)) + [a + b for a, b in _TINY_MERGES]
    # The structure tags sit above the BPE model's range in the real file: ids 6681.. are
    # added tokens only. Keep that shape: model ids 0..6680, added tokens on top.
    model_size = min(STRUCTURE_TAG_IDS.values())
    vocab: dict[str, int] = {}
    free = iter(pieces)
    for i in range(model_size):
        if i in special_by_id:
            vocab[special_by_id[i]] = i
        else:
            vocab[next(free, f"[unused{i:04d}]")] = i
    missing = [p for p in pieces if p not in vocab]
    if missing:  # pragma: no cover - only if the character list outgrows the free ids
        raise RuntimeError(f"tiny vocabulary has no room for {missing!r}")
    added = [
        {
            "id": i,
            "special": True,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        }
        for text, i in sorted(SPECIAL_IDS.items(), key=lambda item: item[1])
    ]
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "[UNK]",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in _TINY_MERGES],
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

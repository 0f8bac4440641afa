"""UMT5 prompt encoder and tokenizer against upstream's numbers (golden ``umt5_*`` arrays).

Tolerance: 1e-4 absolute on hidden states (they are ~1-3 in scale); ids must be exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from acestep_triton.models.prompt_tokenizer import PromptTokenizer
from acestep_triton.models.text_encoder import TextEncoder, load_text_encoder
from acestep_triton.sampling.erg import text_query_scale

TOL = 1e-4

# The second prompt of the golden batch is not recorded. This reconstruction (case o's target
# prompt plus a Chinese, a Japanese and a Korean word) reproduces the recorded ids exactly;
# "ロ" and "ク" are outside the tiny tokenizer's vocabulary, so they only pin "an unknown character".
BATCH2_SECOND_PROMPT = "rock, electric guitar, 摇滚 ロック 록"


@pytest.fixture(scope="module")
def umt5_dir(golden_ckpt: Path) -> Path:
    return golden_ckpt / "umt5-base"


@pytest.fixture(scope="module")
def encoder(umt5_dir: Path) -> TextEncoder:
    return load_text_encoder(umt5_dir)


@pytest.fixture(scope="module")
def tokenizer(umt5_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(umt5_dir)


def _inputs(golden: dict[str, np.ndarray], case: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(golden[f"umt5_{case}_input_ids"]),
            torch.from_numpy(golden[f"umt5_{case}_attention_mask"]))


def _max_err(out: torch.Tensor, ref: np.ndarray) -> float:
    assert tuple(out.shape) == ref.shape, f"shape {tuple(out.shape)} != golden {ref.shape}"
    return float(np.abs(out.detach().numpy() - ref).max())


def test_prompt_ids_match_upstream(tokenizer: PromptTokenizer, golden_components, golden_cases) -> None:
    prompt = golden_cases["a_text2music_apg"]["call_kwargs"]["prompt"]
    ids, mask = tokenizer([prompt])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    np.testing.assert_array_equal(ids.numpy(), golden_components["umt5_prompt_input_ids"])
    np.testing.assert_array_equal(mask.numpy(), golden_components["umt5_prompt_attention_mask"])


def test_batch_pads_to_longest_like_upstream(tokenizer: PromptTokenizer, golden_components,
                                             golden_cases) -> None:
    prompt = golden_cases["a_text2music_apg"]["call_kwargs"]["prompt"]
    ids, mask = tokenizer([prompt, BATCH2_SECOND_PROMPT])
    np.testing.assert_array_equal(ids.numpy(), golden_components["umt5_batch2_input_ids"])
    np.testing.assert_array_equal(mask.numpy(), golden_components["umt5_batch2_attention_mask"])


def test_truncates_to_256_keeping_eos(tokenizer: PromptTokenizer) -> None:
    ids, mask = tokenizer(["pop " * 400, "rock"])
    assert ids.shape == (2, 256)
    assert int(ids[0, -1]) == tokenizer.eos_id
    assert mask.sum(dim=1).tolist()[0] == 256 and mask.sum(dim=1).tolist()[1] < 256


# Prompts a user may send: tags, CJK, accents and full-width forms (NFKC), runs of whitespace,
# punctuation, an empty prompt, an unknown character, and one past the 256-token limit.
TRANSFORMERS_PROMPTS = [
    "pop, rock, electric guitar, 120 bpm", "  Lo-Fi   hip hop\t\n beats ", "", "ﾛｯｸ ＲＯＣＫ café naïve",
    "摇滚, 流行, 女声", "ロック 록 🎸", "a,b;c:d!e?f (g) [h] {i}", "pop " * 300,
]


@pytest.mark.parametrize("batch", [TRANSFORMERS_PROMPTS[:1], TRANSFORMERS_PROMPTS[1:4], TRANSFORMERS_PROMPTS])
def test_same_ids_as_the_transformers_fast_tokenizer(umt5_dir: Path, tiny_onnx_ckpt: Path,
                                                     batch: list[str]) -> None:
    """The tokenizer reads ``tokenizer.json`` without transformers (models/prompt_tokenizer.py):
    its ids and mask equal upstream's call of transformers' ``AutoTokenizer`` (padding to the
    longest, truncation to 256) on the golden and the tiny checkpoints' tokenizers."""
    from transformers import AutoTokenizer

    for folder in (umt5_dir, tiny_onnx_ckpt / "umt5-base"):
        ids, mask = PromptTokenizer(folder)(batch)
        expected = AutoTokenizer.from_pretrained(str(folder))(batch, return_tensors="pt", padding=True,
                                                              truncation=True, max_length=256)
        assert ids.tolist() == expected["input_ids"].tolist(), folder
        assert mask.tolist() == expected["attention_mask"].tolist(), folder


def test_tokenizer_rejects_a_bare_string(tokenizer: PromptTokenizer) -> None:
    with pytest.raises(TypeError):
        tokenizer("pop")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["prompt", "batch2"])
def test_hidden_state_matches_upstream(encoder: TextEncoder, golden_components, case: str) -> None:
    ids, mask = _inputs(golden_components, case)
    ref = golden_components[f"umt5_{case}_last_hidden_state"]
    with torch.no_grad():
        err_none = _max_err(encoder(ids, mask), ref)
        err_ones = _max_err(encoder(ids, mask, text_query_scale(encoder.num_layers, erg=False)), ref)
    assert err_none <= TOL, f"{case}: max abs error {err_none:.3g} (query_scale=None)"
    assert err_ones <= TOL, f"{case}: max abs error {err_ones:.3g} (query_scale=ones)"


@pytest.mark.parametrize("case", ["prompt", "batch2"])
def test_erg_hidden_state_matches_upstream(encoder: TextEncoder, golden_components, case: str) -> None:
    ids, mask = _inputs(golden_components, case)
    ref = golden_components[f"umt5_{case}_erg_last_hidden_state"]
    scale = text_query_scale(encoder.num_layers, erg=True)
    assert scale[8:10].tolist() == pytest.approx([0.01, 0.01]) and scale.sum() == pytest.approx(10.02)
    with torch.no_grad():
        err = _max_err(encoder(ids, mask, scale), ref)
    assert err <= TOL, f"{case}: ERG max abs error {err:.3g}"
    # The ERG variant must really differ from the plain one, or this test proves nothing.
    plain = golden_components[f"umt5_{case}_last_hidden_state"]
    assert np.abs(ref - plain).max() > 100 * TOL


def _rows(*vectors: torch.Tensor) -> torch.Tensor:
    return torch.stack(vectors)


def test_per_item_query_scale_rows(encoder: TextEncoder, golden_components) -> None:
    """[B, L] (the served contract): row 0 plain, row 1 ERG, in one batch."""
    ids, mask = _inputs(golden_components, "batch2")
    n = encoder.num_layers
    with torch.no_grad():
        out = encoder(ids, mask, _rows(text_query_scale(n, erg=False), text_query_scale(n, erg=True)))
    err_plain = _max_err(out[:1], golden_components["umt5_batch2_last_hidden_state"][:1])
    err_erg = _max_err(out[1:], golden_components["umt5_batch2_erg_last_hidden_state"][1:])
    assert err_plain <= TOL, f"plain row: max abs error {err_plain:.3g}"
    assert err_erg <= TOL, f"ERG row: max abs error {err_erg:.3g}"


def test_query_scale_width_is_checked(encoder: TextEncoder, golden_components) -> None:
    ids, mask = _inputs(golden_components, "prompt")
    with pytest.raises(ValueError, match="query_scale"):
        encoder(ids, mask, torch.ones(1, encoder.num_layers + 1))


def test_query_scale_is_a_graph_input(encoder: TextEncoder, golden_components) -> None:
    """Exported with all-ones scales, the graph must still apply ERG scales given at run time
    (a scale captured as a constant, as a hook would be, fails this)."""
    ids, mask = _inputs(golden_components, "batch2")
    n = encoder.num_layers
    program = torch.export.export(encoder, (ids, mask, torch.ones(2, n)))
    with torch.no_grad():
        out = program.module()(ids, mask, _rows(*[text_query_scale(n, erg=True)] * 2))
    err = _max_err(out, golden_components["umt5_batch2_erg_last_hidden_state"])
    assert err <= TOL, f"exported graph, ERG scale at run time: max abs error {err:.3g}"


def test_scale_leaves_no_state_behind(encoder: TextEncoder, golden_components) -> None:
    ids, mask = _inputs(golden_components, "prompt")
    with torch.no_grad():
        encoder(ids, mask, text_query_scale(encoder.num_layers, erg=True))
        err = _max_err(encoder(ids, mask), golden_components["umt5_prompt_last_hidden_state"])
    assert err <= TOL, f"plain call after an ERG call: max abs error {err:.3g}"


def test_checkpoint_keys_are_the_official_ones(encoder: TextEncoder) -> None:
    keys = set(encoder.umt5.state_dict())
    assert "encoder.block.9.layer.0.SelfAttention.q.weight" in keys
    assert not any(".q.linear." in k for k in keys)

"""The encoder inputs of each guidance branch, for every ERG / guidance combination."""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import WithoutCodec

from acestep_triton.sampling import PromptTokens, SamplerConfig, build_conditions, lyric_inputs
from acestep_triton.sampling.backend import ComponentBackend
from acestep_triton.sampling.conditions import EncodedConditions
from acestep_triton.sampling.erg import dit_query_scale, lyric_query_scale, query_scale, text_query_scale

IDS = torch.tensor([[3, 4, 1]])
MASK = torch.ones_like(IDS)
LYRICS, LYRIC_MASK = lyric_inputs([261, 259, 2])


class RecordingBackend(WithoutCodec):
    """Records encoder calls; text states are 1 (normal) or 2 (ERG), encoder states = call number."""

    text_layers, lyric_layers, dit_layers = 12, 6, 24

    def __init__(self) -> None:
        self.text_calls: list[torch.Tensor] = []
        self.cond_calls: list[dict[str, torch.Tensor]] = []

    def encode_text(self, input_ids, attention_mask, query_scale):
        self.text_calls.append(query_scale)
        fill = 1.0 if bool((query_scale == 1).all()) else 2.0
        return torch.full((*input_ids.shape, 4), fill)

    def encode_conditions(self, text_states, text_mask, speaker, lyric_ids, lyric_mask, lyric_query_scale):
        self.cond_calls.append(
            dict(
                text=text_states, speaker=speaker, lyrics=lyric_ids, scale=lyric_query_scale, mask=lyric_mask
            )
        )
        s = 1 + text_states.shape[1] + lyric_ids.shape[1]
        n = float(len(self.cond_calls))
        return torch.full((text_states.shape[0], s, 2), n), torch.ones(text_states.shape[0], s)

    def predict_velocity(self, *args):
        raise NotImplementedError


def _text_value(call) -> float | None:
    t = call["text"]
    return float(t.flatten()[0]) if bool((t == t.flatten()[0]).all()) else None


def _describe(call) -> tuple:
    """(text 1/2/0, lyric ids real/zero, lyric ERG?) of one encode_conditions call."""
    assert not call["speaker"].any() and call["speaker"].shape == (1, 512)
    assert torch.equal(call["mask"], LYRIC_MASK)
    lyrics = "real" if torch.equal(call["lyrics"], LYRICS) else ("zero" if not call["lyrics"].any() else "?")
    erg = torch.equal(call["scale"], lyric_query_scale(6, True))
    assert erg or torch.equal(call["scale"], torch.ones(6))
    return _text_value(call), lyrics, erg


def _build(**overrides) -> tuple[RecordingBackend, EncodedConditions]:
    d = RecordingBackend()
    return d, build_conditions(d, PromptTokens(IDS, MASK, LYRICS, LYRIC_MASK), SamplerConfig(**overrides))


def test_recording_backend_satisfies_protocol():
    assert isinstance(RecordingBackend(), ComponentBackend)


@pytest.mark.parametrize(
    ("flags", "text_calls", "uncond"),
    [
        (dict(use_erg_tag=True, use_erg_lyric=True), 2, (2.0, "real", True)),
        (dict(use_erg_tag=False, use_erg_lyric=True), 1, (0.0, "real", True)),
        (dict(use_erg_tag=True, use_erg_lyric=False), 1, (0.0, "zero", False)),
        (dict(use_erg_tag=False, use_erg_lyric=False), 1, (0.0, "zero", False)),
    ],
)
def test_unconditional_branch(flags, text_calls, uncond):
    d, cond = _build(**flags)
    assert len(d.text_calls) == text_calls
    assert [_describe(c) for c in d.cond_calls] == [(1.0, "real", False), uncond]
    assert float(cond.cond.flatten()[0]) == 1 and float(cond.uncond.flatten()[0]) == 2
    assert cond.text_only is None and cond.mask.shape == (1, 1 + 3 + 3)


@pytest.mark.parametrize(
    ("erg_lyric", "text_only"), [(True, (1.0, "real", True)), (False, (1.0, "zero", False))]
)
def test_text_only_branch_for_double_condition(erg_lyric, text_only):
    d, cond = _build(use_erg_lyric=erg_lyric, guidance_scale_text=5.0, guidance_scale_lyric=2.0)
    assert _describe(d.cond_calls[2]) == text_only
    assert float(cond.text_only.flatten()[0]) == 3


def test_no_guidance_encodes_only_the_conditional_branch():
    d, cond = _build(guidance_scale=1.0, guidance_scale_text=5.0, guidance_scale_lyric=2.0)
    assert len(d.text_calls) == 1 and len(d.cond_calls) == 1
    assert cond.uncond is None and cond.text_only is None


def test_expand_broadcasts_batch_one():
    _, cond = _build()
    grown = cond.expand(3)
    assert grown.cond.shape[0] == grown.uncond.shape[0] == grown.mask.shape[0] == 3
    assert cond.expand(1) is cond
    with pytest.raises(ValueError):
        grown.expand(2)


def test_lyric_inputs_empty_is_one_masked_zero():
    ids, mask = lyric_inputs([], batch_size=2)
    assert ids.tolist() == [[0], [0]] and mask.tolist() == [[0], [0]] and ids.dtype == torch.int64


def test_erg_query_scales():
    assert torch.equal(text_query_scale(12, False), torch.ones(12))
    t = text_query_scale(12, True)
    assert [i for i in range(12) if t[i] != 1] == [8, 9] and float(t[8]) == pytest.approx(0.01)
    assert [i for i, v in enumerate(lyric_query_scale(6, True)) if v != 1] == [4, 5]
    assert [i for i, v in enumerate(dit_query_scale(24, True)) if v != 1] == [15, 16, 17, 18, 19]
    assert torch.equal(dit_query_scale(4, True), torch.ones(4))  # tiny models lack the ERG layers
    assert query_scale(3).dtype == torch.float32

"""Fusing (``acestep_triton.lora.fuse``): in place with bit-exact restore, linear in lora_weight, into a copy.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import CHANGED_REL, _outputs, _rel
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_triton.lora import (
    apply_lora,
    fused_transformer,
    load_lora,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_apply_changes_encode_and_decode_and_restores_bit_exactly(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    before = {k: (v.clone(), v.data_ptr()) for k, v in transformer.state_dict().items()}
    base = {c: _outputs(transformer, c) for c in ("condition_encoder", "dit_decoder")}
    with apply_lora(transformer, adapter, 1.0):
        changed = {c: _rel(_outputs(transformer, c), base[c]) for c in base}
    for component, rel in changed.items():
        assert rel > CHANGED_REL, f"{component}: LoRA moved the output by only {rel:.2e} (max rel)"
    after = transformer.state_dict()
    mismatched = [k for k, (t, ptr) in before.items() if not torch.equal(after[k], t) or after[k].data_ptr() != ptr]
    assert not mismatched, f"not restored bit-exactly: {mismatched[:5]}"
    for component in base:
        assert torch.equal(_outputs(transformer, component), base[component])

    with pytest.raises(RuntimeError, match="boom"), apply_lora(transformer, adapter, 2.0):
        raise RuntimeError("boom")
    assert all(torch.equal(transformer.state_dict()[k], t) for k, (t, _) in before.items()), \
        "an error inside the block must still restore the weights"


def test_weight_zero_is_exactly_no_lora(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    base = _outputs(transformer, "dit_decoder")
    with apply_lora(transformer, adapter, 0.0):
        assert torch.equal(_outputs(transformer, "dit_decoder"), base)


def test_weight_scales_the_delta_linearly(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    paths = ["speaker_embedder", "lyric_encoder.encoders.5.self_attn.linear_v",
             "transformer_blocks.23.cross_attn.to_out.0"]
    original = {p: transformer.get_submodule(p).weight.detach().clone() for p in paths}
    deltas = {}
    for w in (1.0, 0.5, -1.5, 3.0):
        with apply_lora(transformer, adapter, w):
            deltas[w] = {p: transformer.get_submodule(p).weight.detach() - original[p] for p in paths}
    for p in paths:
        layer = adapter.layers[p]
        expected = layer.scaling * layer.up.float() @ layer.down.float()  # upstream: weight * alpha / r * B @ A
        err = float((deltas[1.0][p] - expected).abs().max() / expected.abs().max())
        assert err <= 1e-6, f"{p}: delta differs from scaling * B @ A by {err:.2e} (rel)"
        for w in (0.5, -1.5, 3.0):
            err = float((deltas[w][p] - w * deltas[1.0][p]).abs().max() / (w * deltas[1.0][p]).abs().max())
            assert err <= 1e-5, f"{p}: delta at weight {w} is not {w} x the delta at 1 (rel error {err:.2e})"


def test_fused_copy_equals_apply(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    base = _outputs(transformer, "dit_decoder")
    fused = fused_transformer(transformer, adapter, 0.7)
    assert torch.equal(_outputs(transformer, "dit_decoder"), base), "fused_transformer must not touch the original"
    with apply_lora(transformer, adapter, 0.7):
        for component in ("condition_encoder", "dit_decoder"):
            applied, copied = _outputs(transformer, component), _outputs(fused, component)
            assert torch.equal(applied, copied), f"{component}: max diff {(applied - copied).abs().max():.2e}"


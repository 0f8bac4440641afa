"""Reading adapters (``acestep_triton.lora.files``): keys onto module paths, upstream's and
peft's scaling, errors naming keys.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lora_helpers import _rewrite
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_triton.lora import (
    ADAPTER_CONFIG_FILE,
    COMPONENT_OF_MODULE,
    LORA_WEIGHTS_FILE,
    LoraError,
    load_lora,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_scaling_modes_follow_upstream_and_peft(tiny_lora: Path, tmp_path: Path) -> None:
    r, alpha = 4, 8.0
    upstream = load_lora(tiny_lora)  # header metadata; set_scale ignores rslora -> alpha / r
    peft = load_lora(tiny_lora, scaling="peft")  # rsLoRA as trained -> alpha / sqrt(r)
    assert {layer.scaling for layer in upstream.layers.values()} == {alpha / r}
    assert {layer.scaling for layer in peft.layers.values()} == {alpha / math.sqrt(r)}
    assert upstream.settings.source == "metadata"

    bare = _rewrite(tiny_lora, tmp_path / "bare", drop_metadata=True)
    # upstream (diffusers) never reads adapter_config.json: alpha-less file -> alpha = r, scaling 1
    assert {layer.scaling for layer in load_lora(bare).layers.values()} == {1.0}
    peft_bare = load_lora(bare, scaling="peft")
    assert peft_bare.settings.source == ADAPTER_CONFIG_FILE
    assert {layer.scaling for layer in peft_bare.layers.values()} == {alpha / math.sqrt(r)}
    (bare / ADAPTER_CONFIG_FILE).unlink()
    assert {layer.scaling for layer in load_lora(bare, scaling="peft").layers.values()} == {1.0}
    with pytest.raises(ValueError, match="scaling"):
        load_lora(tiny_lora, scaling="kohya")


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model."])
def test_prefixed_keys_and_file_path_load_the_same_layers(tiny_lora: Path, tmp_path: Path, prefix: str,
                                                          transformer) -> None:
    reference = load_lora(tiny_lora)
    prefixed = _rewrite(tiny_lora, tmp_path / "p", rename=lambda k: prefix + k)
    adapter = load_lora(prefixed / LORA_WEIGHTS_FILE, transformer)  # the file itself, not the folder
    assert list(adapter.layers) == list(reference.layers)
    first = next(iter(adapter.layers))
    assert torch.equal(adapter.layers[first].up, reference.layers[first].up)


def test_unknown_keys_are_errors_naming_the_key(tiny_lora: Path, tmp_path: Path, transformer) -> None:
    pair = {"transformer_blocks.99.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer_blocks.99.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    bad = _rewrite(tiny_lora, tmp_path / "bad", extra=pair)
    load_lora(bad)  # a well-formed pair: only the model can tell it is not there
    with pytest.raises(LoraError, match=r"transformer_blocks\.99\.attn\.to_q\.lora_A\.weight"):
        load_lora(bad, transformer)

    for key, value in (("vocoder.conv.lora_A.weight", torch.zeros(4, 32)),
                       ("transformer_blocks.0.attn.to_q.alpha", torch.tensor(8.0)),
                       ("transformer_blocks.0.attn.to_q.lora_magnitude_vector", torch.ones(32))):
        folder = _rewrite(tiny_lora, tmp_path / key.replace(".", "_"), extra={key: value})
        with pytest.raises(LoraError, match=key.replace(".", r"\.")):
            load_lora(folder)

    shape = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 31)}
    folder = _rewrite(tiny_lora, tmp_path / "shape", rename=lambda k: k, extra=shape)
    with pytest.raises(LoraError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A\.weight.*do not fit"):
        load_lora(folder, transformer)
    with pytest.raises(LoraError, match=r"no pytorch_lora_weights\.safetensors"):
        load_lora(tmp_path)


def test_keys_of_unused_modules_are_ignored_like_upstream(tiny_lora: Path, tmp_path: Path, transformer) -> None:
    # cross_attn.add_q_proj exists upstream but inference never calls it: adapting it changes nothing
    unused = {"transformer_blocks.0.cross_attn.add_q_proj.lora_A.weight": torch.ones(4, 32),
              "transformer_blocks.0.cross_attn.add_q_proj.lora_B.weight": torch.ones(32, 4)}
    adapter = load_lora(_rewrite(tiny_lora, tmp_path / "u", extra=unused), transformer)
    assert sorted(adapter.ignored) == sorted(unused)
    assert len(adapter.layers) == len(load_lora(tiny_lora).layers)


def test_every_top_level_module_belongs_to_a_component(transformer) -> None:
    children = {name for name, _ in transformer.named_children()}
    assert children == set(COMPONENT_OF_MODULE), "lora.COMPONENT_OF_MODULE is out of date with the transformer"


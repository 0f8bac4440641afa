"""Per-request scopes (``acestep_triton.lora.served``): fused-variant routing, in-process fusing.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import CHANGED_REL, _outputs, _rel
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_client.params import ParamError
from acestep_triton.lora import (
    InProcessLoras,
    LoraVariant,
    RoutingCall,
    ServedLoras,
    base_component,
    no_lora,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_served_loras_route_requests_and_check_the_weight() -> None:
    seen: list[str] = []
    routing = RoutingCall(lambda model, inputs, outputs: seen.append(model) or [])
    rap = LoraVariant(name="rap", lora_weight=0.5, components=("condition_encoder", "dit_decoder"))
    served = ServedLoras(routing, [rap, LoraVariant(name="dec", lora_weight=1.0, components=("dit_decoder",))])

    with served("rap", 0.5):
        for component in ("text_encoder", "condition_encoder", "dit_decoder", "vocoder"):
            routing(component, {}, [])
    assert seen == ["text_encoder", "condition_encoder__rap", "dit_decoder__rap", "vocoder"]
    with served("dec", 1.0):
        routing("condition_encoder", {}, [])
        routing("dit_decoder", {}, [])
    with served("none", 2.5):  # lora_weight is ignored without an adapter, as upstream ignores it
        routing("dit_decoder", {}, [])
    assert seen[4:] == ["condition_encoder", "dit_decoder__dec", "dit_decoder"]
    assert routing.routes == {}

    with pytest.raises(ParamError) as info, served("rap", 1.0):
        pass
    assert info.value.field == "lora_weight" and "0.5" in str(info.value)
    with pytest.raises(ParamError) as info, served("jazz", 1.0):
        pass
    assert info.value.field == "lora_name_or_path" and "rap, dec" in str(info.value)
    with pytest.raises(ParamError) as info, no_lora("rap", 1.0):
        pass
    assert info.value.field == "lora_name_or_path"
    with no_lora("none", 1.0):
        pass
    assert base_component("dit_decoder__rap") == "dit_decoder" and base_component("vocoder") == "vocoder"


def test_in_process_scope_fuses_any_weight_and_restores(tiny_lora: Path, transformer) -> None:
    scope = InProcessLoras(transformer)
    base = _outputs(transformer, "dit_decoder")
    with scope(str(tiny_lora), 0.25):
        quarter = _outputs(transformer, "dit_decoder")
    with scope("none", 1.0):
        assert torch.equal(_outputs(transformer, "dit_decoder"), base)
    assert _rel(quarter, base) > CHANGED_REL / 10 and torch.equal(_outputs(transformer, "dit_decoder"), base)
    with pytest.raises(ParamError) as info, scope("/no/such/adapter", 1.0):
        pass
    assert info.value.field == "lora_name_or_path"


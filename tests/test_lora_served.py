"""Per-request scopes (``acestep_triton.lora.served``): fused-variant routing, in-process fusing.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_helpers import CHANGED_REL, _outputs, _rel
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_client.params import ParamError
from acestep_triton.lora import (
    InProcessLoras,
    LiveLoras,
    LoraScope,
    LoraVariant,
    RoutingCall,
    ServedLoras,
    base_component,
    no_lora,
)
from acestep_triton.lora.state import NO_ADAPTER, LoadedAdapter, LoraState, StateReader

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


def _two_requests_at_once(make_scope: Callable[[RoutingCall], LoraScope], first: tuple[str, float],
                          second: tuple[str, float]) -> dict[str, list[tuple[str, list[int] | None]]]:
    """Run two requests through one ``RoutingCall`` in two threads, interleaved so that both are
    inside their scopes when either calls a component; then each calls once more after its scope.

    Returns per request name its calls as ``(model, lora_index rows or None)``.
    """
    seen: dict[str, list[tuple[str, list[int] | None]]] = {first[0]: [], second[0]: []}

    def call(model, inputs, outputs):
        index = inputs.get("lora_index")
        seen[threading.current_thread().name].append((model, None if index is None else index.tolist()))
        return []

    routing = RoutingCall(call)
    scope = make_scope(routing)
    both_inside, both_called = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def request(name: str, weight: float) -> None:
        try:
            with scope(name, weight):
                both_inside.wait()  # the other request has entered its scope too
                routing("dit_decoder", {"x": torch.zeros(2, 1)}, [])
                both_called.wait()  # neither leaves its scope before both have called
            routing("dit_decoder", {"x": torch.zeros(2, 1)}, [])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=request, args=r, name=r[0]) for r in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return seen


def test_concurrent_requests_route_to_their_own_fused_variants() -> None:
    """Two requests in flight at once on one endpoint instance (threads of one process), choosing
    different adapters: each request's calls reach its own variant, then the base model."""
    variants = [LoraVariant(name="rap", lora_weight=0.5, components=("dit_decoder",)),
                LoraVariant(name="dec", lora_weight=1.0, components=("dit_decoder",))]
    seen = _two_requests_at_once(lambda routing: ServedLoras(routing, variants), ("rap", 0.5), ("dec", 1.0))
    assert seen == {"rap": [("dit_decoder__rap", None), ("dit_decoder", None)],
                    "dec": [("dit_decoder__dec", None), ("dit_decoder", None)]}


def test_concurrent_requests_send_their_own_runtime_adapter_rows(tmp_path: Path) -> None:
    """The same with live adapters: each request's rows carry its adapter's index, and the
    "no adapter" rows after its scope."""
    state = tmp_path / "state.json"
    LoraState(loaded={"a": LoadedAdapter(name="a", index=3, file="a", sha256=""),
                      "b": LoadedAdapter(name="b", index=7, file="b", sha256="")}, next_index=8).write(state)
    seen = _two_requests_at_once(lambda routing: LiveLoras(routing, StateReader(state)), ("a", 1.0), ("b", 0.5))
    assert seen == {"a": [("dit_decoder", [3, 3]), ("dit_decoder", [NO_ADAPTER] * 2)],
                    "b": [("dit_decoder", [7, 7]), ("dit_decoder", [NO_ADAPTER] * 2)]}


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


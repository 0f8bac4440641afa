"""Live adapters (``acestep_triton.lora.live``, ``.state``, ``.live_control``, the live scope):
per-row application against fusing, the resident cache and its budget, the control operations.

Runs on the session's tiny checkpoint, in-process (the Triton path is ``test_lora_live_adapters_triton``).
"per row equals fused" means the output row of a batch with mixed adapters equals the same
input run alone through the transformer with that adapter fused at that strength, within 1e-5
relative (fp32 re-association of ``W x + s B (A x)`` vs ``(W + s B A) x``); rows without an
adapter, or at strength 0, must equal the base model bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import _rel, live_control, live_runner
from lora_helpers import live_adapters_dir as live_adapters_dir
from safetensors import safe_open
from safetensors.torch import save_file

from acestep_client.params import ParamError
from acestep_triton.component_graphs import component_graph
from acestep_triton.export.specs import COMPONENTS, LORA_ROW_INPUTS, with_lora_rows
from acestep_triton.lora import (
    LORA_WEIGHTS_FILE,
    NO_ADAPTER,
    LiveLoras,
    LoraState,
    RoutingCall,
    ServedLoras,
    StateReader,
    fused_transformer,
    load_lora,
    served_scope,
)
from acestep_triton.lora.live import AdapterBank, called_modules, group_rows
from acestep_triton.lora.state import write_live_pointer
from acestep_triton.serving.torch_runtime import load_component_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROW_RTOL = 1e-5


def _rows(index: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    return {"lora_index": torch.tensor(index, dtype=torch.int32), "lora_scale": torch.tensor(weights)}


def _first(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0]


def _out(graph: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The first output of a component graph (the condition encoder also returns its mask)."""
    with torch.inference_mode():
        out = graph(*inputs)
    return out[0] if isinstance(out, tuple | list) else out


@pytest.mark.parametrize("component", ["condition_encoder", "dit_decoder"])
def test_mixed_rows_equal_each_adapter_fused_alone(component: str, live_adapters_dir: Path, tiny_onnx_ckpt: Path,
                                                   tiny_onnx_components, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    registry = live_control(live_adapters_dir, tiny_onnx_ckpt, state)
    ia, ib = registry.load("a").index, registry.load("b").index
    runner = live_runner(component, tiny_onnx_ckpt, state)
    transformer = tiny_onnx_components.transformer
    inputs = component_graph(component, transformer).example_inputs(5, 7, seed=3)
    plan = [(ia, 0.7), (ib, -1.5), (NO_ADAPTER, 0.9), (ia, 0.0), (ia, 2.0)]
    mixed = _first(runner({**inputs, **_rows([i for i, _ in plan], [w for _, w in plan])}))
    base = _first(runner(inputs))  # no row inputs: the plain model

    adapters = {ia: load_lora(live_adapters_dir / "a", transformer),
                ib: load_lora(live_adapters_dir / "b", transformer)}
    for row, (index, weight) in enumerate(plan):
        if index == NO_ADAPTER or weight == 0:
            assert torch.equal(mixed[row], base[row]), f"row {row} without adapter differs from the base model"
            continue
        fused = component_graph(component, fused_transformer(transformer, adapters[index], weight))
        alone = _out(fused, [t[row:row + 1] for t in inputs.values()])[0]
        assert _rel(mixed[row], alone) <= ROW_RTOL, f"row {row}: runtime vs fused {_rel(mixed[row], alone):.2e}"
        assert _rel(mixed[row], base[row]) > 1e-3, f"row {row}: the adapter did not change the output"


def test_bank_keeps_the_budget_least_recently_used_first(live_adapters_dir: Path, tiny_onnx_ckpt: Path,
                                                         tmp_path: Path) -> None:
    state, status = tmp_path / "state.json", tmp_path / "resident" / "dit.json"
    registry = live_control(live_adapters_dir, tiny_onnx_ckpt, state)
    index = {n: registry.load(n).index for n in ("a", "b", "c")}
    sizes = {n: registry.state.loaded[n].parameters["dit_decoder"] * 4 for n in index}
    runner = live_runner("dit_decoder", tiny_onnx_ckpt, state, budget_bytes=sizes["a"] + sizes["c"], status=status)
    bank: AdapterBank = runner.loras
    inputs = component_graph("dit_decoder", load_component_module("dit_decoder", tiny_onnx_ckpt)).example_inputs(2, 5)

    def use(*names: str) -> None:
        runner({**inputs, **_rows([index[n] for n in names], [1.0] * len(names))})

    use("a", "a")
    use("b", "b")
    assert bank.resident == ["a", "b"] and bank.resident_bytes == sizes["a"] + sizes["b"]
    use("a", "a")  # a becomes the most recently used
    use("c", "c")  # over budget: b (least recently used) goes, a stays
    assert bank.resident == ["a", "c"] and bank.evictions >= 1
    assert json.loads(status.read_text())["resident"] == ["a", "c"]
    use("b", "c")  # the least recently used (a) goes
    assert bank.resident == ["b", "c"]
    bank.budget_bytes = 1
    use("b", "c")  # what one batch needs stays, even above the budget
    assert set(bank.resident) == {"b", "c"}

    registry.unload("c")
    use("b", "b")
    assert bank.resident == ["b"], "an unloaded adapter must be dropped on the next call"
    with pytest.raises(ParamError) as info:
        use("c", "b")
    assert info.value.field == "lora_name_or_path"
    assert group_rows([3, -1, 3, 5], [1.0, 1.0, 0.5, 0.0]) == {3: ([0, 2], [1.0, 0.5])}


def test_projections_the_forward_never_calls_are_refused(live_adapters_dir: Path, tiny_onnx_ckpt: Path,
                                                         tmp_path: Path) -> None:
    module = load_component_module("dit_decoder", tiny_onnx_ckpt)
    graph = component_graph("dit_decoder", module)
    example = graph.example_inputs(1, 4)
    with torch.inference_mode():
        called = called_modules(module, lambda: graph(*example.values()))
    assert "transformer_blocks.0.attn.to_q" in called
    convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv1d) and m.kernel_size == (1,)
             and n.startswith("transformer_blocks.0.") and n not in called]
    assert convs, "the GLU-MBConv 1x1 convolutions run through F.linear: no hook can see them"
    target = convs[0]
    conv = module.get_submodule(target)
    folder = tmp_path / "reg" / "ff"
    folder.mkdir(parents=True)
    save_file({f"{target}.lora_A.weight": torch.randn(2, conv.in_channels),
               f"{target}.lora_B.weight": torch.randn(conv.out_channels, 2)}, str(folder / LORA_WEIGHTS_FILE))
    state = tmp_path / "state.json"
    entry = live_control(tmp_path / "reg", tiny_onnx_ckpt, state).load("ff")  # fits the checkpoint: can be fused
    runner = live_runner("dit_decoder", tiny_onnx_ckpt, state)
    with pytest.raises(ParamError, match=rf"(?s)lora_name_or_path.*{re.escape(target)}\.lora_A"):
        runner({**example, **_rows([entry.index], [1.0])})
    assert len(runner(example)) == 1, "the instance keeps serving after a refused adapter"


def test_control_load_unload_reload_and_refusals(live_adapters_dir: Path, tiny_onnx_ckpt: Path, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    root.mkdir()
    for name in ("a", "b"):  # copies: a folder linked from outside the registry is refused (issue 19)
        shutil.copytree(live_adapters_dir / name, root / name)
    state = tmp_path / "rt" / "state.json"
    registry = live_control(root, tiny_onnx_ckpt, state)
    assert registry.reload() == {}
    listing = registry.command("list")
    assert [a["name"] for a in listing["loaded"]] == ["a", "b"] and listing["available"] == []
    first = registry.state.loaded["a"]
    assert first.components == ("condition_encoder", "dit_decoder") and first.ranks == (4,)
    assert first.parameters["dit_decoder"] > first.parameters["condition_encoder"] > 0

    registry.command("unload", "a")
    assert registry.command("load", "a")["loaded"][-1]["index"] > first.index, "indices are never reused"
    for command, name, field in (("load", "jazz", "lora_name_or_path"), ("unload", "jazz", "lora_name_or_path"),
                                 ("load", None, "lora_name_or_path"), ("dance", None, "command")):
        with pytest.raises(ParamError) as info:
            registry.command(command, name)
        assert info.value.field == field

    # keys that do not fit the checkpoint: refused naming the key, recorded, nothing else changes
    bad = root / "bad"
    bad.mkdir()
    with safe_open(str(live_adapters_dir / "a" / LORA_WEIGHTS_FILE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 31)
    save_file(tensors, str(bad / LORA_WEIGHTS_FILE))
    with pytest.raises(ParamError, match=r"(?s)lora_name_or_path.*transformer_blocks\.0\.attn\.to_q\.lora_A"):
        registry.load("bad")
    assert "bad" in registry.state.failed and set(registry.state.loaded) == {"a", "b"}
    assert registry.reload().keys() == {"bad"}

    small = live_control(root, tiny_onnx_ckpt, tmp_path / "small.json", budget_mb=0.001)
    with pytest.raises(ParamError, match="memory budget"):
        small.load("a")

    shutil.rmtree(root / "b")
    registry.reload()
    assert set(registry.state.loaded) == {"a"}, "reload unloads adapters whose folder vanished"


def test_state_reader_follows_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    reader = StateReader(path)
    assert reader.current() == LoraState()
    LoraState(next_index=3).write(path)
    assert reader.current().next_index == 3
    LoraState(next_index=4).write(path)
    assert reader.current().next_index == 4
    assert not list(tmp_path.glob(".s.json.*")), "the atomic write leaves no temporary file"


def test_endpoint_scope_sends_rows_for_every_transformer_call(live_adapters_dir: Path, tiny_onnx_ckpt: Path,
                                                              tmp_path: Path) -> None:
    seen: list[tuple[str, dict]] = []
    routing = RoutingCall(lambda model, inputs, outputs: seen.append((model, dict(inputs))) or [])
    state = tmp_path / "state.json"
    index = live_control(live_adapters_dir, tiny_onnx_ckpt, state).load("b").index
    assets = tmp_path / "assets"
    assets.mkdir()
    assert isinstance(served_scope(RoutingCall(lambda *a: []), assets), ServedLoras)
    write_live_pointer(assets, state)
    scope = served_scope(routing, assets)
    assert isinstance(scope, LiveLoras)
    x = torch.zeros(3, 2)
    with scope("b", 2.5):
        for model in ("text_encoder", "condition_encoder", "dit_decoder"):
            routing(model, {"x": x}, [])
    with scope("none", 1.0):
        routing("dit_decoder", {"x": x}, [])
    assert "lora_index" not in seen[0][1]
    assert seen[1][1]["lora_index"].tolist() == [index] * 3 and seen[2][1]["lora_scale"].tolist() == [2.5] * 3
    assert seen[3][1]["lora_index"].tolist() == [NO_ADAPTER] * 3 and seen[3][0] == "dit_decoder"
    with pytest.raises(ParamError) as info, scope("jazz", 1.0):
        pass
    assert info.value.field == "lora_name_or_path" and "serves: b" in str(info.value)
    assert with_lora_rows(COMPONENTS["dit_decoder"]).inputs[-2:] == LORA_ROW_INPUTS
    assert with_lora_rows(COMPONENTS["vocoder"]) == COMPONENTS["vocoder"]
    assert with_lora_rows(COMPONENTS["dit_decoder"]).request_shape("lora_index", (3,)) == (3, 1)


def test_benchmark_prints_memory_and_per_step_tables(capsys: pytest.CaptureFixture[str]) -> None:
    from test_benchmarks_smoke import load_benchmark

    bench = load_benchmark("lora_live_adapters")
    assert bench.main(["--width", "256", "--frames", "8", "--tokens", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"| r={rank} " in out for rank in (16, 64, 256)) and "| none " in out
    model = bench.transformer(bench.REAL_CONFIG)  # the 3.5B shapes, on the meta device
    halves = bench.half_parameters(model)
    assert 2.4e9 < halves["dit_decoder"] < 2.6e9 and 0.05e9 < halves["condition_encoder"] < 0.15e9
    per_adapter = sum(bench.adapter_parameters(model, 256).values())
    assert 0.25e9 < per_adapter < 0.27e9, "upstream's rap targets at r=256: 24 x 8 DiT + 18 Conformer projections"


def test_adapter_batches_bypass_compiled_blocks_and_restore_them() -> None:
    """On a GPU a batch with adapter rows runs the compiled DiT blocks eagerly (the hooks were not
    traced); the compiled callables must be back afterwards, also after an error."""
    from acestep_triton.serving.torch_runtime import _eager_blocks

    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    for block in model.transformer_blocks:
        block.compile()  # lazy: nothing is compiled until a call
    compiled = [b._compiled_call_impl for b in model.transformer_blocks]
    assert all(c is not None for c in compiled)
    with pytest.raises(RuntimeError, match="boom"), _eager_blocks(model):
        assert all(b._compiled_call_impl is None for b in model.transformer_blocks)
        raise RuntimeError("boom")
    assert [b._compiled_call_impl for b in model.transformer_blocks] == compiled

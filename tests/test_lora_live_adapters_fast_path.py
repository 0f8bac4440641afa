"""Live LoRA adapters on the DiT's fast path (compiled blocks, CUDA graphs) and load-time warm-up.

On a GPU the DiT decoder's blocks are TorchInductor-compiled and each shape is replayed from a
CUDA graph. Live adapters there live in the bank's static stack (``lora.live.AdapterStack``),
so a batch with adapter rows, alone or mixed with base rows, runs the same compiled blocks and
graphs. On this CPU-only machine:

- compiled: ``torch.compile`` on the CPU. TorchInductor's C++ backend is used where a C++
  compiler is on PATH (one test; it compiles for about a minute), else ``aot_eager``; the
  recompile counts use dynamo's ``CompileCounter`` backend (same tracing, no code generation).
- graphs: :class:`ReplayGraphs` stands in for CUDA-graph capture (capture = run once, replay =
  rerun into the same output buffer), which exercises the decoder's static-input plumbing,
  including the adapter rows as graph inputs.

"Equal" for a compiled path against the eager one: 1e-5 relative (the stacked matmuls at the
padded rank re-associate fp32 sums); base rows of the eager path stay bit-exact (tested in
``test_lora_live_adapters``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_helpers import CPU, MIB, _rel, live_control, live_runner
from lora_helpers import live_adapters_dir as live_adapters_dir
from torch._dynamo.testing import CompileCounter

from acestep_triton.component_graphs import component_graph
from acestep_triton.export.specs import COMPONENTS
from acestep_triton.lora import NO_ADAPTER
from acestep_triton.sampling.buckets import DEFAULT_WARMUP, WarmupShape, parse_warmup
from acestep_triton.serving import torch_runtime
from acestep_triton.serving.torch_runtime import (
    ComponentRunner,
    LiveAdapterOptions,
    RuntimeOptions,
    load_component_module,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-5
INDUCTOR = shutil.which("g++") is not None or shutil.which("c++") is not None


class ReplayGraphs:
    """Stand-in for ``gpu.TorchCUDAGraphs`` on the CPU: "capture" runs the function once, "replay"
    reruns it and copies into the first output (a graph replay writes into the same buffer)."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
        self.captures += 1
        output = fn()

        def replay() -> torch.Tensor:
            self.replays += 1
            output.copy_(fn())
            return output

        return replay


@pytest.fixture
def loaded(live_adapters_dir: Path, tiny_onnx_ckpt: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A state file with a, b and c loaded; their indices."""
    state = tmp_path / "state.json"
    registry = live_control(live_adapters_dir, tiny_onnx_ckpt, state)
    return state, {name: registry.load(name).index for name in ("a", "b", "c")}


def _runner(ckpt: Path, state: Path | None, graph_backend: Any = None, **options: Any) -> ComponentRunner:
    """The DiT decoder serving the live adapters of ``state``."""
    return live_runner("dit_decoder", ckpt, state, graph_backend=graph_backend, **options)


def _rows(index: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    """The rows as Triton hands them over: [B, 1]."""
    return {"lora_index": torch.tensor(index, dtype=torch.int32)[:, None],
            "lora_scale": torch.tensor(weights, dtype=torch.float32)[:, None]}


def _inputs(ckpt_runner: ComponentRunner, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return component_graph("dit_decoder", ckpt_runner.graph.transformer).example_inputs(batch, length, seed=seed)


@pytest.fixture
def no_eager_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any batch falls back to running the compiled blocks eagerly."""
    def refuse(transformer: Any) -> Any:
        raise AssertionError("an adapter batch left the fast path (_eager_blocks)")

    monkeypatch.setattr(torch_runtime, "_eager_blocks", refuse)


# ------------------------------------------------------------------------------ compiled blocks
@pytest.mark.usefixtures("no_eager_blocks")
def test_compiled_adapter_rows_equal_eager_and_each_row_alone(tiny_onnx_ckpt: Path, loaded) -> None:
    """The compiled path (TorchInductor on the CPU when a C++ compiler exists, else aot_eager) with
    a batch mixing two adapters, base rows and strength 0 equals the eager path, and each row equals
    that row computed alone, within 1e-5."""
    state, index = loaded
    eager = _runner(tiny_onnx_ckpt, state)
    fast = _runner(tiny_onnx_ckpt, state, compile=True, compile_backend="inductor" if INDUCTOR else "aot_eager")
    assert fast.stack is not None and eager.stack is None
    inputs = _inputs(eager, 5, 12, seed=4)
    first = _rows([index["a"], NO_ADAPTER, NO_ADAPTER, index["a"], NO_ADAPTER], [1.0] * 5)
    assert _rel(fast({**inputs, **first})[0], eager({**inputs, **first})[0]) <= RTOL
    # b goes into a free slot of the compiled stack: written in place, read by the compiled code
    plan = [(index["a"], 0.7), (NO_ADAPTER, 1.0), (index["b"], -1.5), (index["a"], 0.0), (index["b"], 2.0)]
    rows = _rows([i for i, _ in plan], [w for _, w in plan])
    got = fast({**inputs, **rows})[0]
    want = eager({**inputs, **rows})[0]
    assert _rel(got, want) <= RTOL, f"compiled vs eager: {_rel(got, want):.2e}"
    base = eager(inputs)[0]
    for row, (i, w) in enumerate(plan):
        alone = eager({**{k: v[row:row + 1] for k, v in inputs.items()}, **_rows([i], [w])})[0][0]
        assert _rel(got[row], alone) <= RTOL, f"row {row}: mixed batch vs alone {_rel(got[row], alone):.2e}"
        changed = _rel(got[row], base[row]) > 1e-3
        assert changed == (i != NO_ADAPTER and w != 0), f"row {row}: adapter applied = {changed}"
    base_fast = fast(inputs)[0]
    assert _rel(base_fast, base) <= RTOL


@pytest.mark.usefixtures("no_eager_blocks")
def test_adapter_batches_compile_once_and_new_adapters_reuse_the_graph(tiny_onnx_ckpt: Path, loaded) -> None:
    """Base batches and adapter batches are one compilation each for all 24 blocks; other mixes,
    strengths and another adapter of the same layout (into a free slot) compile nothing; a larger
    rank re-lays the stack out and recompiles once."""
    state, index = loaded
    counter = CompileCounter()
    fast = _runner(tiny_onnx_ckpt, state, compile=True, compile_backend=counter)
    eager = _runner(tiny_onnx_ckpt, state)
    inputs = _inputs(eager, 4, 10, seed=1)
    fast(inputs)
    assert counter.frame_count == 1, "one compiled graph serves every block"
    for plan in ([index["a"], NO_ADAPTER, NO_ADAPTER, index["a"]], [index["a"], index["a"], NO_ADAPTER, NO_ADAPTER],
                 [index["b"], index["a"], NO_ADAPTER, index["b"]], [NO_ADAPTER, index["b"], index["b"], index["b"]]):
        rows = _rows(plan, [0.5, 1.0, 1.5, -1.0])
        assert _rel(fast({**inputs, **rows})[0], eager({**inputs, **rows})[0]) <= RTOL
    assert counter.frame_count == 2, "the adapter term is traced once, whatever the rows select"
    assert fast.stack.generation == 1 and fast.stack.rank == 4

    rows = _rows([index["c"], NO_ADAPTER, index["a"], index["c"]], [1.0, 1.0, 1.0, 0.3])
    assert _rel(fast({**inputs, **rows})[0], eager({**inputs, **rows})[0]) <= RTOL
    assert fast.stack.rank == 8 and fast.stack.generation == 2
    assert counter.frame_count == 3, "a re-layout recompiles once"
    assert set(fast.loras.resident) == {"a", "b", "c"}
    assert all(layer.down.shape[0] in (4, 8) for a in fast.loras._resident.values() for layer in a.layers.values())


def test_full_stack_evicts_least_recently_used_and_state_dict_is_the_checkpoints(
        tiny_onnx_ckpt: Path, loaded, tmp_path: Path) -> None:
    state, index = loaded
    status = tmp_path / "status.json"
    fast = ComponentRunner(COMPONENTS["dit_decoder"], load_component_module("dit_decoder", tiny_onnx_ckpt),
                           RuntimeOptions(device=CPU, compile=True, compile_backend="eager", lora_slots=1),
                           LiveAdapterOptions(state_file=state, budget_bytes=64 * MIB, status_file=status))
    keys = set(fast.graph.transformer.state_dict())
    inputs = _inputs(fast, 2, 6, seed=2)
    fast({**inputs, **_rows([index["a"], NO_ADAPTER], [1.0, 1.0])})
    fast({**inputs, **_rows([index["b"], NO_ADAPTER], [1.0, 1.0])})
    assert fast.loras.resident == ["b"] and fast.stack.slots == 1, "a full stack evicts instead of growing"
    fast({**inputs, **_rows([index["a"], index["b"]], [1.0, 1.0])})
    assert fast.stack.slots == 2, "what one batch needs stays: the stack grows"
    assert set(fast.graph.transformer.state_dict()) == keys, "the stacks are not part of the state_dict"
    import json

    stack = json.loads(status.read_text())["stack"]
    assert stack["slots"] == 2 and stack["rank"] == 4 and stack["bytes"] == fast.stack.nbytes > 0


# ------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.usefixtures("no_eager_blocks")
def test_graphs_capture_the_adapter_term_once_per_shape(tiny_onnx_ckpt: Path, loaded) -> None:
    """With (stand-in) CUDA graphs, a mixed batch replays a graph captured with the adapter term:
    one capture per shape and variant (base / adapters), the rows as graph inputs; a re-layout
    drops the adapter graphs (they read the old stack) and captures again."""
    state, index = loaded
    graphs = ReplayGraphs()
    fast = _runner(tiny_onnx_ckpt, state, graph_backend=graphs, cuda_graphs=True)
    eager = _runner(tiny_onnx_ckpt, state)
    assert fast.cuda_graphs and fast.stack is not None
    inputs = _inputs(eager, 3, 8, seed=5)
    plans = ([index["a"], NO_ADAPTER, index["b"]], [NO_ADAPTER, index["b"], index["b"]],
             [index["a"], index["a"], index["a"]])
    for plan in plans:
        rows = _rows(plan, [0.8, 1.2, -0.5])
        assert _rel(fast({**inputs, **rows})[0], eager({**inputs, **rows})[0]) <= RTOL
    assert torch.equal(fast(inputs)[0], eager(inputs)[0]), "a base batch replays the plain graph"
    assert graphs.captures == 2 and len(fast.forward.captured_shapes) == 2 and fast.forward.eager_calls == 0
    rows = _rows([index["c"], NO_ADAPTER, index["a"]], [1.0, 1.0, 2.0])
    assert _rel(fast({**inputs, **rows})[0], eager({**inputs, **rows})[0]) <= RTOL
    assert graphs.captures == 3 and len(fast.forward.captured_shapes) == 2, "stale adapter graph dropped"


# ------------------------------------------------------------------------------ warm-up
def test_warmup_parameter_parses_and_defaults() -> None:
    assert parse_warmup("2:768:512, 1:384:64,2:768:512") == (WarmupShape(2, 768, 512), WarmupShape(1, 384, 64))
    assert parse_warmup("none") == () == parse_warmup("") and parse_warmup("default") == DEFAULT_WARMUP
    assert len(DEFAULT_WARMUP) <= RuntimeOptions(device=CPU).max_graphs // 2
    for bad in ("1:2", "0:32:64", "a:b:c", "1:32:64,,"):
        with pytest.raises(ValueError, match="warmup: expected"):
            parse_warmup(bad)
    gpu = torch.device("cuda", 0)
    assert RuntimeOptions.for_component("dit_decoder", gpu).warmup == DEFAULT_WARMUP
    assert RuntimeOptions.for_component("dit_decoder", gpu, {"compile": "false", "cuda_graphs": "false"}).warmup == ()
    assert RuntimeOptions.for_component("vocoder", gpu).warmup == ()
    assert RuntimeOptions.for_component("dit_decoder", CPU).warmup == ()
    assert RuntimeOptions.for_component("dit_decoder", CPU, {"warmup": "1:32:64"}).warmup == (WarmupShape(1, 32, 64),)
    from acestep_triton.export.model_configs import component_config
    from acestep_triton.export.triton_config import check_config, render_config

    rendered = check_config(render_config(component_config(COMPONENTS["dit_decoder"], "gpu", runtime="torch")))
    assert rendered.parameters["warmup"].string_value == "auto"
    options = RuntimeOptions.for_component("dit_decoder", CPU, {"lora_fast_path": "false", "lora_slots": "2"})
    assert (options.lora_fast_path, options.lora_slots) == (False, 2)
    with pytest.raises(ValueError, match="lora_slots"):
        RuntimeOptions(device=CPU, lora_slots=0)


def test_warmup_captures_every_shape_before_the_first_request(tiny_onnx_ckpt: Path, loaded) -> None:
    """A runner built with ``warmup`` has captured each listed shape, base and adapter variant, and
    made the loaded adapters resident; the first request of such a shape captures nothing."""
    state, index = loaded
    graphs = ReplayGraphs()
    shapes = parse_warmup("2:16:12,1:32:12")
    fast = _runner(tiny_onnx_ckpt, state, graph_backend=graphs, cuda_graphs=True, warmup=shapes, lora_slots=4)
    assert graphs.captures == 4 and fast.warmup_seconds is not None
    assert set(fast.loras.resident) == {"a", "b", "c"} and fast.stack.rank == 8, "warm-up lays the stack out"
    assert "2 shape(s) warmed up" in fast.description
    inputs = fast.warmup_inputs(WarmupShape(2, 16, 12), seed=9)
    assert inputs["latents"].shape[-1] == 16 and inputs["encoder_states"].shape[1] == 12
    fast({**inputs, **_rows([index["b"], NO_ADAPTER], [1.0, 1.0])})
    fast(inputs)
    assert graphs.captures == 4, "warmed-up shapes replay"


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_every_component_warms_up_on_the_cpu(name: str, tiny_onnx_ckpt: Path) -> None:
    runner = ComponentRunner(COMPONENTS[name], load_component_module(name, tiny_onnx_ckpt),
                             RuntimeOptions(device=CPU, warmup=parse_warmup("1:8:16")))
    assert runner.warmup_seconds is not None and runner.warmup_seconds >= 0


def test_fast_path_off_falls_back_to_eager_blocks(tiny_onnx_ckpt: Path, loaded,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``lora_fast_path false``: no stack; adapter batches run the compiled blocks eagerly with
    per-call hooks (the previous behaviour), and give the same numbers."""
    state, index = loaded
    calls = []
    original = torch_runtime._eager_blocks

    def counting(transformer: Any) -> Any:
        calls.append(1)
        return original(transformer)

    monkeypatch.setattr(torch_runtime, "_eager_blocks", counting)
    slow = _runner(tiny_onnx_ckpt, state, compile=True, compile_backend="eager", lora_fast_path=False)
    fast = _runner(tiny_onnx_ckpt, state, compile=True, compile_backend="eager")
    assert slow.stack is None and fast.stack is not None
    inputs = _inputs(slow, 2, 6, seed=7)
    rows = _rows([index["a"], NO_ADAPTER], [1.3, 1.0])
    assert _rel(slow({**inputs, **rows})[0], fast({**inputs, **rows})[0]) <= RTOL
    assert calls == [1] and "on the compiled path" in fast.description and "compiled path" not in slow.description


def test_warmup_benchmark_compares_fresh_processes_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's orchestration (``benchmarks/warmup.py``): the probe's shapes become the warm
    variant's list, variants alternate in order per round, medians and the ratio are printed. The
    child processes are faked here (a real run takes a minute; RESULTS.md has one)."""
    from test_benchmarks_smoke import load_benchmark

    bench = load_benchmark("warmup")
    order: list[tuple[str, str]] = []

    def fake(variant: str, args: Any, checkpoint: Path, warmup: str) -> dict[str, Any]:
        order.append((variant, warmup))
        first = {"probe": 1.0, "cold": 2.0, "warm": 0.5}[variant]
        return {"variant": variant, "load_s": 1.0, "first_s": first, "second_s": 0.4,
                "dit_shapes": ["1:32:64", "2:32:64"]}

    monkeypatch.setattr(bench, "_run_child", fake)
    args = bench.argparse.Namespace(rounds=2, duration=3.0, steps=2, threads=1)
    result = bench.measure(args, Path("unused"))
    assert order[0] == ("probe", "none") and [v for v, _ in order[1:]] == ["cold", "warm", "warm", "cold"]
    assert all(w == "1:32:64,2:32:64" for _, w in order[1:])
    assert result["first_request_ratio"] == 4.0
    assert "first request, cold / warm: **4.00x**" in bench.table(result, args)

"""Smoke runs of the benchmarks in ``benchmarks/``: each runs with small settings and prints its
table. Timings are never asserted (CI machines vary); what is asserted is that the measuring
code ran and measured the right thing: every component and level present, no failed requests,
server statistics attributed to the models that ran, the same audio from Triton and in-process
(≤ 1e-4 absolute), and batched CFG equal to sequential CFG in fp32 (≤ 1e-4 relative).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from acestep_triton.checkpoint import Components
from acestep_triton.export import specs
from acestep_triton.gpu import CUDAGraphDecoder
from acestep_triton.pipeline import MusicGenerator
from acestep_triton.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TOL = 1e-4


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` under a distinctive module name (they are scripts)."""
    module_name = f"acestep_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- helpers
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_percentiles_and_tables() -> None:
    bench = load_benchmark("acestep_bench")
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert bench.percentile([], 50) != bench.percentile([], 50)  # NaN
    text = bench.format_table(("name", "value"), [("a", 1.23456), ("longer name", float("nan"))], "title")
    lines = text.splitlines()
    assert lines[0] == "### title" and lines[2].startswith("| name ") and "1.23" in text and "n/a" in text
    assert len({len(line) for line in lines[2:]}) == 1, "columns are aligned"


# ------------------------------------------------------------------------------- (c) CPU smoke
def test_cpu_smoke_prints_end_to_end_and_component_tables(tiny_server: TritonServer, tiny_local: MusicGenerator,
                                                          tiny_onnx_components: Components,
                                                          tiny_onnx_paths: dict[str, Path]) -> None:
    smoke = load_benchmark("cpu_smoke")
    lines: list[str] = []
    results = smoke.run_smoke(tiny_server.grpc_url, tiny_local, tiny_onnx_components, tiny_onnx_paths,
                              duration=2.0, steps=2, requests=1, repeats=1, out=lines.append)
    text = "\n".join(lines)
    print(text)
    assert "text2music end to end" in text and "ratio vs in-process" in text
    assert "Triton (gRPC + BLS + onnxruntime)" in text and "in-process (torch)" in text
    assert [r["component"] for r in results["components"]] == list(specs.COMPONENTS)
    for row in results["components"]:
        assert row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0
        assert row["max_abs_diff"] <= TOL, f"{row['component']}: onnxruntime vs torch {row['max_abs_diff']:.3g}"
    e2e = results["end_to_end"]
    assert len(e2e["triton_s"]) == len(e2e["inprocess_s"]) == 1
    assert e2e["max_abs_diff"] <= TOL, f"Triton vs in-process audio: {e2e['max_abs_diff']:.3g}"


# ------------------------------------------------------------------------------- (a) load client
def test_load_client_sweeps_levels_and_reads_server_statistics(tiny_server: TritonServer) -> None:
    load = load_benchmark("load_client")
    levels = asyncio.run(load.sweep(tiny_server.grpc_url, "text2music", [1, 2], 2, [2.0, 3.0], 2, 120.0,
                                    warmup=False))
    lines: list[str] = []
    load.print_tables(levels, out=lines.append)
    text = "\n".join(lines)
    print(text)
    assert "load sweep" in text and "server statistics per level" in text
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert (lv["requests"], lv["errors"]) == (2, 0), lv["error_messages"]
        assert lv["rtf"] > 0 and lv["p50_s"] <= lv["p90_s"] <= lv["p99_s"]
        server = lv["server"]
        assert server["text2music"]["requests"] == 2, server
        assert server["dit_decoder"]["requests"] >= 2 * 2, "two steps per request at least"
        assert all(s["queue_ms"] >= 0 and s["compute_ms"] > 0 for s in server.values()), server


def test_load_client_counts_failed_requests(tiny_server: TritonServer) -> None:
    load = load_benchmark("load_client")
    level = asyncio.run(load.run_level(tiny_server.grpc_url, "no_such_endpoint", 1, 1, [2.0], 2, 60.0, 0))
    assert (level["requests"], level["errors"]) == (1, 1)
    assert "no_such_endpoint" in level["error_messages"][0]


# ------------------------------------------------------------------------------- (b) GPU benchmark, on a CPU
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_gpu_benchmark_logic_runs_on_cpu_with_the_tiny_model(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    gpu = load_benchmark("gpu_eager_vs_optimized")
    out = tmp_path / "results.json"
    assert gpu.main(["--model", "tiny", "--device", "cpu", "--seconds", "2", "--steps", "3", "--repeats", "1",
                     "--warmup-steps", "1", "--json", str(out), "--markdown", str(tmp_path / "r.md")]) == 0
    printed = capsys.readouterr().out
    assert "eager vs optimized (medians)" in printed and "ratio" in printed
    info = json.loads(out.read_text())
    rows = {r["variant"]: r for r in info["results"]}
    assert set(rows) == {"eager-sequential", "optimized"}
    # 3 steps, guidance interval 0.5: steps 0-1 guided (2 branches), step 2 conditional only.
    assert rows["eager-sequential"]["dit_calls"] == 2 * 2 + 1
    assert rows["optimized"]["dit_calls"] == 3
    diff = rows["optimized"]["max_rel_diff_vs_eager"]
    assert diff <= TOL, f"batched vs sequential CFG (fp32): {diff:.3g}"
    assert all(r["finite"] and r["rtf"] > 0 for r in rows.values())
    assert "skipped" in info["tensorrt"]["note"]
    assert info["frames"] == 21 and (tmp_path / "r.md").read_text().count("eager-sequential") >= 1


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_sequential_branches_split_rows_per_item() -> None:
    gpu = load_benchmark("gpu_eager_vs_optimized")
    calls: list[tuple[int, ...]] = []

    def decode(latents: Any, *rest: Any) -> Any:
        calls.append((latents.shape[0], rest[-1].shape))
        return latents * 2

    split = gpu.SequentialBranches(decode, items=2)
    latents = torch.randn(6, 8, 16, 3)
    out = split(latents, torch.ones(6, 3), torch.randn(6, 4, 8), torch.ones(6, 4), torch.ones(6),
                torch.ones(6, 24))
    assert torch.equal(out, latents * 2)
    assert calls == [(2, torch.Size([2, 24]))] * 3


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_graph_self_check_compares_replay_with_eager() -> None:
    gpu = load_benchmark("gpu_eager_vs_optimized")

    class EagerGraphs:  # "replay" recomputes into the captured output, as a CUDA graph would
        def capture(self, fn: Any, device: Any) -> Any:
            output = fn()
            return lambda: output.copy_(fn())

    class StaleGraphs:  # a broken replay that ignores new inputs
        def capture(self, fn: Any, device: Any) -> Any:
            output = fn()
            return lambda: output

    models = gpu.build_random_models("cpu", torch.float32, configs=gpu.tiny_configs(), parts=("transformer",))
    transformer = models.transformer
    ids, mask, lyric_ids, lyric_mask, states = gpu.fixed_inputs(transformer, 8, 10, torch.device("cpu"), 0)
    backend = gpu.BenchBackend(transformer, None, None, torch.float32, states)
    with torch.inference_mode():
        tokens = gpu.PromptTokens(ids, mask, lyric_ids, lyric_mask)
        conditions = gpu.build_conditions(backend, tokens, gpu.SamplerConfig())
    noise = torch.randn(1, 8, 16, 9)
    good = gpu.graph_self_check(CUDAGraphDecoder(transformer, backend=EagerGraphs()), transformer, conditions, noise)
    assert good == {"max_rel_diff": 0.0, "follows_inputs": True}
    bad = gpu.graph_self_check(CUDAGraphDecoder(transformer, backend=StaleGraphs()), transformer, conditions, noise)
    assert not bad["follows_inputs"] and bad["max_rel_diff"] > 1e-3


# ------------------------------------------------------------------------------- the GPU check script
@pytest.mark.slow
@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_gpu_check_inprocess_section_runs_in_a_dry_run(tmp_path: Path) -> None:
    """The section ``inprocess`` of ``scripts/gpu_serving_check.sh`` (eager vs optimised in-process;
    the former ``scripts/gpu_check.sh``) alone, on the CPU with the tiny model."""
    env = {**os.environ, "SECTIONS": "inprocess", "AUDIO_SECONDS": "2", "INPROCESS_STEPS": "2",
           "INPROCESS_REPEATS": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_serving_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "eager vs optimized (medians)" in done.stdout and "section inprocess: ok" in done.stdout
    assert "phase checkpoint" not in done.stdout, "only the chosen section runs"
    results = json.loads((tmp_path / "out" / "inprocess.json").read_text())
    assert {r["variant"] for r in results["results"]} == {"eager-sequential", "optimized"}
    assert (tmp_path / "out" / "gpu_serving_check.log").is_file() and (tmp_path / "out" / "inprocess.md").is_file()

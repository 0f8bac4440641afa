"""The GPU check (``scripts/gpu_serving_check.sh`` + ``benchmarks/gpu_serving.py`` and its
sections in ``benchmarks/acestep_serving_check/``) on a CPU.

The check runs once on a lent GPU machine, so its whole code path must be proven here first:
``--dry-run`` runs the same script and measuring code with the tiny checkpoint, the cpu target
with the torch runtime and this environment's real tritonserver. Asserted: the script exits 0,
the server really served the requests, every section ended ``ok`` in its own record, and the
Markdown and JSON results hold each of (a)-(e) with finite numbers, including the served
components' own weight gauges; Triton and in-process give the same audio (fp32 on a CPU, the
same runners). Timings are never asserted. The pure helpers behind the tables, and the guard
that keeps one failing section from losing the others, are tested on their own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_benchmarks_smoke import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_serving_check.sh"
TOL = 1e-4


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------- the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One dry run of the whole check (a real tritonserver): (results folder, its output)."""
    out = tmp_path_factory.mktemp("gpu_serving_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "WORK": str(tmp_path_factory.mktemp("gpu_serving_work"))}
    # its own session, so a hung run is stopped with every process it started (the server too)
    process = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the dry run did not finish in 300 s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return out, output


@pytest.mark.slow
def test_dry_run_writes_every_section_with_finite_numbers(dry_run: tuple[Path, str]) -> None:
    out, output = dry_run
    markdown = (out / "gpu_serving.md").read_text()
    data = json.loads((out / "gpu_serving.json").read_text())
    assert "DRY RUN" in markdown and "phase measure" in output
    for title in ("(a) Triton vs the same components in-process", "(b) Triton + compiled torch vs eager",
                  "(c) throughput", "(d) memory at peak", "(d) per served component", "(e) live LoRA", "goals"):
        assert title in markdown, title
    # every section ran under its guard and wrote its own record
    assert {k: v["status"] for k, v in data["sections"].items()} == dict.fromkeys(
        ("setup_inprocess", "setup_eager", "setup_triton", "a_b_end_to_end", "c_throughput", "e_lora", "d_memory",
         "goals"), "ok")
    for key in ("a_b_end_to_end", "c_throughput", "d_memory", "e_lora"):
        assert key in json.loads((out / f"section_{key}.json").read_text()), key
    assert data["meta"]["require_device_inputs"], "the check runs the components in their check mode"

    # the server really started and served (explicit loading of what text2music needs)
    log = (out / "tritonserver.log").read_text()
    assert "successfully loaded 'text2music'" in log and "dcae_encoder" not in log
    assert finite(data["timings"]["tritonserver: start until ready"])

    # (a) + (b): every step count, three paths, same audio through Triton and in-process
    e2e = data["a_b_end_to_end"]
    assert e2e["triton_measured"] and e2e["finite"]
    assert set(e2e["per_steps"]) == {"2", "3"}
    for steps, row in e2e["per_steps"].items():
        for key in ("Triton_p50_s", "in-process_p50_s", "eager_p50_s", "Triton_rtf", "eager_rtf",
                    "triton_vs_inprocess", "triton_speedup_vs_eager", "max_abs_audio_diff"):
            assert finite(row[key]), (steps, key, row[key])
        assert row["max_abs_audio_diff"] <= TOL, f"{steps} steps: Triton vs in-process {row['max_abs_audio_diff']}"
        # the same DiT calls through Triton and in-process; eager splits the guided steps
        assert row["Triton_dit_calls"] == row["in-process_dit_calls"] == int(steps)
        assert row["eager_dit_calls"] > row["Triton_dit_calls"]

    # (c): every duration and level, no failed request, batching counted from Triton's statistics
    load = data["c_throughput"]
    assert load["errors"] == 0 and set(load["levels"]) == {"1", "2"}
    for duration, levels in load["levels"].items():
        assert [lv["concurrency"] for lv in levels] == [1, 2], duration
        for lv in levels:
            assert (lv["requests"], lv["errors"]) == (2, 0), lv["error_messages"]
            assert all(finite(lv[k]) for k in ("throughput_rps", "p50_s", "p90_s", "p99_s"))
            assert lv["dit"]["executions"] > 0 and lv["dit"]["inferences"] >= lv["dit"]["requests"] > 0
            assert finite(lv["dit"]["rows_per_execution"])
            assert {"text2music", "dit_decoder"} <= set(lv["server"])
        assert finite(load["ratio_top_vs_1"][duration])

    # (d): on a CPU the host RSS carries the numbers, per served model
    memory = data["d_memory"]
    assert finite(memory["server_rss_mib"]) and memory["server_rss_mib"] > 0
    assert finite(memory["inprocess_rss_mib"]) and memory["samples"] > 0
    assert {"dit_decoder", "text2music"} <= set(memory["model_rss_mib"])
    assert all(finite(v) for v in memory["model_rss_mib"].values())
    # per served component, from its own gauges: the weights it holds (the GPU's max_memory_allocated is 0 here)
    components = memory["components"]
    assert set(components) == {"text_encoder", "condition_encoder", "dit_decoder", "dcae_decoder", "vocoder"}
    for name, row in components.items():
        assert row["instances"] == 1 and row["weights_mib"] > 0, (name, row)
        assert row["max_allocated_mib"] == 0 and row["allocated_at_load_mib"] == 0, (name, row)

    goals = data["goals"]
    assert len(goals) == 2 * 2 + 2 and all(finite(g["measured"]) and g["met"] == "n/a" for g in goals)


# ------------------------------------------------------------------------------- pure helpers
@pytest.fixture(scope="module")
def serving() -> Any:
    return load_benchmark("gpu_serving")


def test_ratio_verdict_and_peaks(serving: Any) -> None:
    assert serving.ratio(3.0, 2.0) == 1.5
    assert math.isnan(serving.ratio(1.0, 0.0)) and math.isnan(serving.ratio(math.nan, 1.0))
    assert serving.verdict(1.05, 1.10, at_most=True) == "yes"
    assert serving.verdict(1.2, 1.10, at_most=True) == "no"
    assert serving.verdict(3.5, 3.0, at_most=False) == "yes"
    assert serving.verdict(3.5, 3.0, at_most=False, judged=False) == "n/a"
    assert serving.verdict(math.nan, 3.0, at_most=False) == "n/a"
    assert serving.nanmax(math.nan, 2.0, 1.0) == 2.0 and math.isnan(serving.nanmax(math.nan))


def test_nvidia_smi_answers(serving: Any) -> None:
    rows = serving.parse_csv_numbers("1234, 5678\n42, [N/A]\n")
    assert rows[0] == [1234.0, 5678.0] and rows[1][0] == 42.0 and math.isnan(rows[1][1])
    assert serving.parse_csv_numbers("") == []


def test_component_gauges_are_read_from_the_metrics_text(serving: Any) -> None:
    mib = 2**20
    text = "\n".join([
        "# HELP acestep_component_weights_bytes Bytes of the parameters and buffers a component instance holds",
        "# TYPE acestep_component_weights_bytes gauge",
        f'acestep_component_weights_bytes{{instance="dit_decoder_0_0",model="dit_decoder"}} {512 * mib}',
        f'acestep_component_weights_bytes{{instance="dit_decoder_0_1",model="dit_decoder"}} {512 * mib}',
        f'acestep_component_cuda_max_allocated_bytes{{instance="dit_decoder_0_0",model="dit_decoder"}} {900 * mib}',
        f'acestep_component_cuda_max_allocated_bytes{{instance="dit_decoder_0_1",model="dit_decoder"}} {700 * mib}',
        f'acestep_component_cuda_allocated_at_load_bytes{{instance="vocoder_0_0",model="vocoder"}} {30 * mib}',
        'nv_inference_count{model="dit_decoder",version="1"} 12',
    ])
    gauges = serving.parse_component_gauges(text)
    assert set(gauges) == {"dit_decoder", "vocoder"} and set(gauges["dit_decoder"]) == {"dit_decoder_0_0",
                                                                                        "dit_decoder_0_1"}
    rows = serving.component_rows(gauges)
    dit = rows["dit_decoder"]
    assert math.isnan(dit.pop("allocated_at_load_mib")), "not reported: missing, not zero"
    assert dit == {"instances": 2, "weights_mib": 512.0, "max_allocated_mib": 900.0, "max_allocated_sum_mib": 1600.0}
    assert rows["vocoder"]["allocated_at_load_mib"] == 30.0 and math.isnan(rows["vocoder"]["weights_mib"])


def test_a_failing_section_is_recorded_and_the_others_still_run(serving: Any, tmp_path: Path) -> None:
    report = serving.Report(tmp_path)
    failures: list[str] = []

    def broken() -> None:
        raise ZeroDivisionError("no server")

    def skipped() -> None:
        raise serving.SkipSectionError("nothing to measure")

    assert not serving.run_section(report, "first", broken, failures)
    assert not serving.run_section(report, "second", skipped, failures)
    assert serving.run_section(report, "third", lambda: report.add("third", {"value": 1.5}, "### third"), failures)
    data = json.loads((tmp_path / "gpu_serving.json").read_text())
    assert data["sections"]["first"]["status"] == "failed" and "ZeroDivisionError: no server" in \
        data["sections"]["first"]["error"] and "Traceback" in data["sections"]["first"]["traceback"]
    assert data["sections"]["second"] == {"status": "skipped", "reason": "nothing to measure",
                                          "seconds": data["sections"]["second"]["seconds"]}
    assert data["sections"]["third"]["status"] == "ok" and data["third"] == {"value": 1.5}
    assert json.loads((tmp_path / "section_third.json").read_text()) == {"third": {"value": 1.5}}
    assert failures == ["first: ZeroDivisionError: no server"], "a skip is not a failure"
    assert "first failed" in (tmp_path / "gpu_serving.md").read_text()


def level(concurrency: int, rps: float, rows_per_execution: float = 1.0) -> dict[str, Any]:
    return {"concurrency": concurrency, "throughput_rps": rps, "dit": {"rows_per_execution": rows_per_execution}}


def test_throughput_table_judges_only_short_requests(serving: Any) -> None:
    levels = {10.0: [level(1, 1.0), level(4, 2.5), level(8, 3.5, 6.0)],
              60.0: [level(1, 0.5), level(4, 1.0), level(8, 1.2, 8.0)]}
    headers, rows = serving.throughput_rows(levels, judged=True)
    assert headers == ["request s", "req/s @1", "req/s @4", "req/s @8", "@8 vs @1", "goal", "met", "DiT rows/exec @8"]
    assert rows[0] == ["10", 1.0, 2.5, 3.5, 3.5, ">= 3", "yes", 6.0]
    assert rows[1][4] == pytest.approx(2.4) and rows[1][5:7] == ["(reported)", "n/a"]
    _, dry = serving.throughput_rows(levels, judged=False)
    assert dry[0][6] == "n/a"
    assert math.isnan(serving.throughput_ratio([level(4, 2.0)])), "no concurrency-1 level: no ratio"
    table = serving.bench.format_table(headers, rows)
    assert "| 10 " in table and "(reported)" in table


def test_dit_delta_counts_rows_and_executions(serving: Any) -> None:
    before = {"requests": 10, "inferences": 20, "executions": 10}
    after = {"requests": 26, "inferences": 52, "executions": 14}
    delta = serving.dit_delta(before, after)
    assert delta == {"requests": 16, "inferences": 32, "executions": 4, "rows_per_execution": 8.0,
                     "requests_per_execution": 4.0}


def test_placeholders_are_written_only_for_missing_packages(serving: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "placeholders"
    (folder / "stale").mkdir(parents=True)
    monkeypatch.setattr(serving.bench, "importable", lambda name: name != "cutlet")
    assert serving.write_placeholders(folder) == ["cutlet"]
    assert sorted(p.name for p in folder.iterdir()) == ["cutlet"], "the folder is cleared first"
    spec = importlib.util.spec_from_file_location("placeholder_cutlet", folder / "cutlet" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__acestep_placeholder__ and module.Cutlet().romaji("準備") == "準備"
    namespace: dict[str, Any] = {}
    exec(compile(serving.PLACEHOLDERS["soundfile"], "soundfile", "exec"), namespace)
    with pytest.raises(RuntimeError, match="soundfile is not installed"):
        namespace["read"]("x.wav")


def test_plan_defaults_for_the_gpu_and_the_dry_run(serving: Any) -> None:
    common = ["measure", "--checkpoint", "c", "--repository", "r", "--out", "o"]
    gpu = serving.Plan.for_args(serving.parse_args(common))
    assert (gpu.device, gpu.e2e_seconds, gpu.steps, gpu.concurrency) == ("cuda", 60.0, [27, 60], [1, 4, 8])
    assert gpu.lora, "(e) runs by default"
    assert not serving.Plan.for_args(serving.parse_args([*common, "--no-lora"])).lora
    assert (gpu.load_durations, gpu.load_steps, gpu.requests) == ([10.0, 30.0, 60.0], 27, None)
    dry = serving.Plan.for_args(serving.parse_args([*common, "--dry-run"]))
    assert (dry.device, dry.concurrency, dry.threads) == ("cpu", [1, 2], 1)
    with pytest.raises(SystemExit):
        serving.Plan.for_args(serving.parse_args([*common, "--concurrency", "4,8"]))


def test_report_writes_strict_json_and_markdown(serving: Any, tmp_path: Path) -> None:
    report = serving.Report(tmp_path)
    report.add("x", {"value": math.nan, "rows": [1.5, math.inf]}, "### table\n\n| a |")
    report.note("something to know")
    data = json.loads((tmp_path / "gpu_serving.json").read_text())
    assert data["x"] == {"value": None, "rows": [1.5, None]} and data["notes"] == ["something to know"]
    text = (tmp_path / "gpu_serving.md").read_text()
    assert text.startswith("### table") and "- something to know" in text


def test_scripts_are_valid_bash() -> None:
    for name in ("gpu_serving_check.sh", "pack_gpu_carry.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr)
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--dry-run" in done.stdout and "SECTIONS" in done.stdout
    assert "set -euo" not in done.stdout, "--help prints the header only"
    assert not (ROOT / "scripts" / "gpu_check.sh").exists(), "one GPU check script, with sections"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SECTIONS": "serving,bogus"})
    assert done.returncode == 2 and "unknown section bogus" in done.stderr


def test_measure_arguments_parse(serving: Any) -> None:
    args = serving.parse_args(["measure", "--checkpoint", "c", "--repository", "r", "--out", "o",
                               "--triton-root", "/t", "--steps", "27", "--concurrency", "1,8"])
    assert isinstance(args, argparse.Namespace) and args.triton_root == Path("/t")
    plan = serving.Plan.for_args(args)
    assert plan.steps == [27] and plan.concurrency == [1, 8]

"""(a) Triton vs the same compiled components in-process, (b) vs eager sequential CFG."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import acestep_bench as bench
import numpy as np

from .figures import median, ratio, verdict
from .paths import EagerBaseline, InProcess, TritonPath
from .plan import GOAL_SPEEDUP_VS_EAGER, GOAL_TRITON_OVERHEAD, Plan, request_params
from .report import Deadline, Report

PATH_NAMES = {"Triton": "Triton (gRPC → BLS → compiled torch)", "in-process": "in-process (same compiled runners)",
              "eager": "eager PyTorch, sequential CFG"}
"""The three ways (a)+(b) serve the request, and their labels in the table."""


@dataclass
class EndToEndRuns:
    """What the interleaved runs measured: seconds and DiT calls per (path, steps), the largest
    Triton vs in-process audio difference per step count, whether all audio was finite."""

    runs: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    calls: dict[tuple[str, int], int] = field(default_factory=dict)
    diffs: dict[int, float] = field(default_factory=dict)
    finite: bool = True
    repeats: int = 0

    def add(self, path: str, steps: int, seconds: float, calls: int) -> None:
        self.runs.setdefault((path, steps), []).append(seconds)
        self.calls[(path, steps)] = calls


def measure_end_to_end(plan: Plan, triton: TritonPath | None, inproc: InProcess, eager: EagerBaseline | None,
                       report: Report, deadline: Deadline) -> None:
    """(a) and (b): the same request at each step count through Triton, in-process (compiled) and
    eager-sequential, ``repeats`` times interleaved (so drifts hit every path alike). A path that
    is None (no server, an eager baseline that did not build) is left out, its columns NaN."""
    measured = run_interleaved(plan, triton, inproc, eager, report, deadline)
    per_steps = {steps: steps_record(plan.e2e_seconds, steps, measured) for steps in plan.steps}
    report.add("a_b_end_to_end", {"per_steps": per_steps, "repeats": measured.repeats, "finite": measured.finite,
                                  "triton_measured": triton is not None},
               end_to_end_markdown(plan, measured, per_steps))


def run_interleaved(plan: Plan, triton: TritonPath | None, inproc: InProcess, eager: EagerBaseline | None,
                    report: Report, deadline: Deadline) -> EndToEndRuns:
    """Every path at every step count, once per repeat, while the time budget allows."""
    # torch, through the pipeline: heavy (see __init__), imported where used
    from acestep_triton.pipeline import sampler_config

    seconds = plan.e2e_seconds
    measured = EndToEndRuns()
    repeat_s = 0.0
    for repeat in range(plan.repeats):
        # keep about a third of the budget for (c)
        if repeat > 0 and deadline.left() - repeat_s < plan.time_budget_s / 3:
            report.note(f"(a)/(b): stopped after {repeat} of {plan.repeats} repeats (time budget)")
            break
        started = time.perf_counter()
        for steps in plan.steps:
            params = request_params(seconds, steps)
            audio_local, t, n = inproc.generate(params)
            measured.add("in-process", steps, t, n)
            if triton is not None:
                audio_served, t, n = triton.generate(params)
                measured.add("Triton", steps, t, n)
                measured.diffs[steps] = max(measured.diffs.get(steps, 0.0),
                                            float(np.abs(audio_served - audio_local).max()))
            ok = True
            if eager is not None:
                t, n, ok = eager.generate(seconds, sampler_config(params))
                measured.add("eager", steps, t, n)
            measured.finite = measured.finite and ok and bool(np.isfinite(audio_local).all())
        measured.repeats, repeat_s = repeat + 1, time.perf_counter() - started
    return measured


def steps_record(seconds: float, steps: int, measured: EndToEndRuns) -> dict[str, Any]:
    """One step count's figures: every path's runs, medians, RTFs and DiT calls, and the ratios."""
    p50 = {path: median(measured.runs.get((path, steps), [])) for path in PATH_NAMES}
    return {
        "seconds": seconds, "steps": steps,
        **{f"{path}_s": measured.runs.get((path, steps), []) for path in PATH_NAMES},
        **{f"{path}_p50_s": p50[path] for path in PATH_NAMES},
        **{f"{path}_rtf": ratio(seconds, p50[path]) for path in PATH_NAMES},
        **{f"{path}_dit_calls": measured.calls.get((path, steps), -1) for path in PATH_NAMES},
        "triton_vs_inprocess": ratio(p50["Triton"], p50["in-process"]),
        "triton_speedup_vs_eager": ratio(p50["eager"], p50["Triton"]),
        "inprocess_speedup_vs_eager": ratio(p50["eager"], p50["in-process"]),
        "max_abs_audio_diff": measured.diffs.get(steps, math.nan),
    }


def end_to_end_markdown(plan: Plan, measured: EndToEndRuns, per_steps: dict[int, dict[str, Any]]) -> str:
    """The three tables of (a)+(b) and how latency was timed."""
    seconds, judged = plan.e2e_seconds, not plan.dry_run
    rows = []
    for steps in plan.steps:
        p50 = {path: per_steps[steps][f"{path}_p50_s"] for path in PATH_NAMES}
        for path, label in PATH_NAMES.items():
            series = measured.runs.get((path, steps), [])
            rows.append((label, steps, len(series), p50[path], bench.percentile(series, 90), ratio(seconds, p50[path]),
                         measured.calls.get((path, steps), "n/a"), ratio(p50[path], p50["in-process"]),
                         ratio(p50["eager"], p50[path])))
    table = bench.format_table(("path", "steps", "runs", "p50 s", "p90 s", "RTF", "DiT calls", "vs in-process",
                                "speed-up vs eager"), rows,
                               f"(a)+(b) text2music end to end: {seconds:g} s of audio, batch 1, same seed")
    a_rows = [(s, v["Triton_p50_s"], v["in-process_p50_s"], v["triton_vs_inprocess"], f"<= {GOAL_TRITON_OVERHEAD:g}",
               verdict(v["triton_vs_inprocess"], GOAL_TRITON_OVERHEAD, True, judged), v["max_abs_audio_diff"])
              for s, v in per_steps.items()]
    a_table = bench.format_table(("steps", "Triton p50 s", "in-process p50 s", "Triton / in-process", "goal", "met",
                                  "max abs audio diff"), a_rows, "(a) Triton vs the same components in-process")
    b_rows = [(s, v["eager_rtf"], v["Triton_rtf"], v["in-process_rtf"], v["triton_speedup_vs_eager"],
               f">= {GOAL_SPEEDUP_VS_EAGER:g}",
               verdict(v["triton_speedup_vs_eager"], GOAL_SPEEDUP_VS_EAGER, False, judged))
              for s, v in per_steps.items()]
    b_table = bench.format_table(("steps", "eager RTF", "Triton RTF", "in-process RTF", "Triton speed-up", "goal",
                                  "met"), b_rows, "(b) Triton + compiled torch vs eager sequential CFG")
    explain = ("Latency: request sent → audio on the host (Triton: the gRPC client's whole request; in-process: "
               "`generate` + copy to the host; eager: sampling loop + DCAE decode + vocoder, prompt encoding not "
               "timed). RTF = audio seconds / latency. Medians over the interleaved runs.")
    return "\n\n".join((table, a_table, b_table, explain))

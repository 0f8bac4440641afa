"""(a) Triton vs the same compiled components in-process, (b) vs eager sequential CFG."""

from __future__ import annotations

import math
import time

import acestep_bench as bench

from .common import (
    GOAL_SPEEDUP_VS_EAGER,
    GOAL_TRITON_OVERHEAD,
    Deadline,
    Plan,
    Report,
    median,
    ratio,
    request_params,
    verdict,
)
from .paths import EagerBaseline, InProcess, TritonPath


def measure_end_to_end(plan: Plan, triton: TritonPath | None, inproc: InProcess, eager: EagerBaseline | None,
                       report: Report, deadline: Deadline) -> None:
    """(a) and (b): the same request at each step count through Triton, in-process (compiled) and
    eager-sequential, ``repeats`` times interleaved (so drifts hit every path alike). A path that
    is None (no server, an eager baseline that did not build) is left out, its columns NaN."""
    import numpy as np

    from acestep_triton.pipeline import sampler_config

    seconds = plan.e2e_seconds
    runs: dict[tuple[str, int], list[float]] = {}
    calls: dict[tuple[str, int], int] = {}
    diffs: dict[int, float] = {}
    finite = True
    done_repeats, repeat_s = 0, 0.0
    for repeat in range(plan.repeats):
        # keep about a third of the budget for (c)
        if repeat > 0 and deadline.left() - repeat_s < plan.time_budget_s / 3:
            report.note(f"(a)/(b): stopped after {repeat} of {plan.repeats} repeats (time budget)")
            break
        started = time.perf_counter()
        for steps in plan.steps:
            params = request_params(seconds, steps)
            audio_local, t, n = inproc.generate(params)
            runs.setdefault(("in-process", steps), []).append(t)
            calls[("in-process", steps)] = n
            if triton is not None:
                audio_served, t, n = triton.generate(params)
                runs.setdefault(("Triton", steps), []).append(t)
                calls[("Triton", steps)] = n
                diffs[steps] = max(diffs.get(steps, 0.0), float(np.abs(audio_served - audio_local).max()))
            ok = True
            if eager is not None:
                t, n, ok = eager.generate(seconds, sampler_config(params))
                runs.setdefault(("eager", steps), []).append(t)
                calls[("eager", steps)] = n
            finite = finite and ok and bool(np.isfinite(audio_local).all())
        done_repeats, repeat_s = repeat + 1, time.perf_counter() - started

    names = {"Triton": "Triton (gRPC → BLS → compiled torch)", "in-process": "in-process (same compiled runners)",
             "eager": "eager PyTorch, sequential CFG"}
    rows, per_steps = [], {}
    for steps in plan.steps:
        p50 = {path: median(runs.get((path, steps), [])) for path in names}
        per_steps[steps] = {
            "seconds": seconds, "steps": steps,
            **{f"{path}_s": runs.get((path, steps), []) for path in names},
            **{f"{path}_p50_s": p50[path] for path in names},
            **{f"{path}_rtf": ratio(seconds, p50[path]) for path in names},
            **{f"{path}_dit_calls": calls.get((path, steps), -1) for path in names},
            "triton_vs_inprocess": ratio(p50["Triton"], p50["in-process"]),
            "triton_speedup_vs_eager": ratio(p50["eager"], p50["Triton"]),
            "inprocess_speedup_vs_eager": ratio(p50["eager"], p50["in-process"]),
            "max_abs_audio_diff": diffs.get(steps, math.nan),
        }
        for path, label in names.items():
            series = runs.get((path, steps), [])
            rows.append((label, steps, len(series), p50[path], bench.percentile(series, 90), ratio(seconds, p50[path]),
                         calls.get((path, steps), "n/a"), ratio(p50[path], p50["in-process"]),
                         ratio(p50["eager"], p50[path])))
    judged = not plan.dry_run
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
    report.add("a_b_end_to_end", {"per_steps": per_steps, "repeats": done_repeats, "finite": finite,
                                  "triton_measured": triton is not None},
               "\n\n".join((table, a_table, b_table, explain)))


"""(c) Throughput under concurrency: requests/s per level and ``dit_decoder`` merging."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import acestep_bench as bench
import load_client as load

from .figures import ratio, verdict
from .paths import dit_counts
from .plan import ENDPOINT, GOAL_THROUGHPUT_MAX_SECONDS, GOAL_THROUGHPUT_RATIO, Plan
from .report import Deadline, Report


def throughput_ratio(levels: Sequence[Mapping[str, Any]]) -> float:
    """Requests/s at the highest concurrency level over requests/s at concurrency 1."""
    by_level = {lv["concurrency"]: lv for lv in levels}
    if 1 not in by_level or not by_level:
        return math.nan
    return ratio(by_level[max(by_level)]["throughput_rps"], by_level[1]["throughput_rps"])


def throughput_rows(levels_by_duration: Mapping[float, Sequence[Mapping[str, Any]]], judged: bool
                    ) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the throughput summary: requests/s per concurrency level for each
    request duration, the ratio of the highest level to concurrency 1, the goal (for requests up
    to 30 s), and the ``dit_decoder`` rows per execution at the highest level (Triton merging)."""
    concurrencies = sorted({lv["concurrency"] for levels in levels_by_duration.values() for lv in levels})
    top = concurrencies[-1] if concurrencies else 0
    headers = ["request s", *(f"req/s @{c}" for c in concurrencies), f"@{top} vs @1", "goal", "met",
               f"DiT rows/exec @{top}"]
    rows = []
    for duration, levels in sorted(levels_by_duration.items()):
        by_level = {lv["concurrency"]: lv for lv in levels}
        scale = throughput_ratio(levels)
        in_scope = duration <= GOAL_THROUGHPUT_MAX_SECONDS
        rows.append([f"{duration:g}", *(by_level[c]["throughput_rps"] if c in by_level else math.nan
                                        for c in concurrencies),
                     scale, f">= {GOAL_THROUGHPUT_RATIO:g}" if in_scope else "(reported)",
                     verdict(scale, GOAL_THROUGHPUT_RATIO, at_most=False, judged=judged and in_scope),
                     by_level[top]["dit"]["rows_per_execution"] if top in by_level else math.nan])
    return headers, rows


def dit_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float]:
    """``dit_decoder`` work of a level: BLS requests, batch rows (inference_count) and executions."""
    requests = after["requests"] - before["requests"]
    rows = after["inferences"] - before["inferences"]
    executions = after["executions"] - before["executions"]
    return {"requests": requests, "inferences": rows, "executions": executions,
            "rows_per_execution": ratio(rows, executions), "requests_per_execution": ratio(requests, executions)}


def measure_load(plan: Plan, url: str, report: Report, deadline: Deadline) -> None:
    """(c): per request duration, an unmeasured warm-up level at the highest concurrency (every
    batch shape the level will merge into gets compiled and captured), then each level."""
    top = max(plan.concurrency)
    by_duration: dict[float, list[dict[str, Any]]] = {}
    texts: list[str] = []
    index = 1
    for duration in plan.load_durations:
        if deadline.left() < 20:
            report.note(f"(c): {duration:g} s requests skipped (time budget)")
            continue
        started = time.perf_counter()
        warm = asyncio.run(load.run_level(url, ENDPOINT, top, top, [duration], plan.load_steps,
                                          plan.request_timeout_s, first_index=100_000))
        warm_s = time.perf_counter() - started
        if warm["errors"]:
            report.note(f"(c) warm-up at {duration:g} s failed: {warm['error_messages']}")
        levels = []
        for concurrency in plan.concurrency:
            if deadline.left() < 10:
                report.note(f"(c): {duration:g} s at concurrency {concurrency} skipped (time budget)")
                break
            total = plan.requests if plan.requests is not None else max(2 * concurrency, 4)
            before = dit_counts(url)
            level = asyncio.run(load.run_level(url, ENDPOINT, concurrency, total, [duration], plan.load_steps,
                                               plan.request_timeout_s, index))
            level["dit"] = dit_delta(before, dit_counts(url))
            level["warmup_s"] = warm_s
            index += total
            levels.append(level)
            print(f"(c) {duration:g} s, concurrency {concurrency}: {level['throughput_rps']:.3g} req/s, "
                  f"p50 {level['p50_s']:.3g} s, DiT rows/exec {level['dit']['rows_per_execution']:.3g}",
                  file=sys.stderr, flush=True)
        if not levels:
            continue
        by_duration[duration] = levels
        lines: list[str] = [f"**{duration:g} s requests**, {plan.load_steps} steps (unmeasured warm-up level at "
                            f"concurrency {top} first: {warm_s:.1f} s)", ""]
        load.print_tables(levels, out=lines.append)
        batching = [(lv["concurrency"], lv["dit"]["requests"], lv["dit"]["inferences"], lv["dit"]["executions"],
                     lv["dit"]["requests_per_execution"], lv["dit"]["rows_per_execution"]) for lv in levels]
        lines += ["", bench.format_table(("concurrency", "DiT requests", "inference_count (rows)", "execution_count",
                                          "requests/exec", "rows/exec"), batching,
                                         "dit_decoder batching (Triton statistics)")]
        texts.append("\n".join(lines))
    headers, rows = throughput_rows(by_duration, judged=not plan.dry_run)
    summary = bench.format_table(headers, rows, f"(c) throughput: concurrency {plan.concurrency} vs 1")
    ratios = {f"{d:g}": throughput_ratio(levels) for d, levels in by_duration.items()}
    errors = sum(lv["errors"] for levels in by_duration.values() for lv in levels)
    report.add("c_throughput", {"levels": {f"{d:g}": v for d, v in by_duration.items()},
                                "ratio_top_vs_1": ratios, "top_concurrency": top, "steps": plan.load_steps,
                                "errors": errors},
               "\n\n".join(["## (c) Throughput under concurrency", *texts, summary]))


"""The report, the plan, the time box, the section guard and the pure helpers of the check."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acestep_bench as bench
import load_client as load

ENDPOINT = "text2music"
TEXT2MUSIC_MODELS = ("text_encoder", "condition_encoder", "dit_decoder", "dcae_decoder", "vocoder", ENDPOINT)
"""What text2music calls (plus itself): the server loads only these (``dcae_encoder`` would be one
more process and model for nothing)."""

GOAL_TRITON_OVERHEAD = 1.10
GOAL_SPEEDUP_VS_EAGER = 3.0
GOAL_THROUGHPUT_RATIO = 3.0
GOAL_THROUGHPUT_MAX_SECONDS = 30.0
"""The throughput goal is for 10-30 s requests; longer ones are reported, not judged."""

RESULTS_STEM = "gpu_serving"
MiB = 2**20


# ------------------------------------------------------------------------------- pure helpers
def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when either is missing or the denominator is not positive."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return numerator / denominator


def verdict(value: float, goal: float, at_most: bool, judged: bool = True) -> str:
    """``yes``/``no`` for a measured value against its goal; ``n/a`` when not judged or unmeasured."""
    if not judged or not math.isfinite(value):
        return "n/a"
    return "yes" if (value <= goal if at_most else value >= goal) else "no"


def nanmax(*values: float) -> float:
    """The largest finite value (NaN when there is none): peaks over samples that may be missing."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return max(finite) if finite else math.nan


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def parse_csv_numbers(text: str) -> list[list[float]]:
    """Rows of an ``nvidia-smi --format=csv,noheader,nounits`` answer; ``[N/A]`` fields become NaN."""
    rows = []
    for line in text.strip().splitlines():
        fields = []
        for item in line.split(","):
            try:
                fields.append(float(item.strip()))
            except ValueError:
                fields.append(math.nan)
        if fields:
            rows.append(fields)
    return rows


def json_safe(value: Any) -> Any:
    """NaN/inf as null (strict JSON readers refuse them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------- the report
@dataclass
class Report:
    """Markdown sections and JSON data, rewritten to ``out`` after every section, so a run cut
    short still leaves what it measured; each section's record also goes to its own file
    (``section_<key>.json``), which a later failure cannot spoil."""

    out: Path
    data: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, markdown: str | None = None) -> None:
        self.data[key] = value
        if markdown:
            self.sections.append(markdown)
            print("\n" + markdown + "\n", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        bench.write_json(self.out / f"section_{key}.json", json_safe({key: value}))
        self.write()

    def note(self, text: str) -> None:
        self.data.setdefault("notes", []).append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)
        self.write()

    def status(self, key: str, record: Mapping[str, Any]) -> None:
        """How a section ended (``ok`` / ``failed`` / ``skipped``, seconds, error)."""
        self.data.setdefault("sections", {})[key] = dict(record)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        bench.write_json(self.out / f"{RESULTS_STEM}.json", json_safe(self.data))
        notes = "".join(f"- {n}\n" for n in self.data.get("notes", []))
        text = "\n\n".join(self.sections) + ("\n\nNotes:\n\n" + notes if notes else "") + "\n"
        (self.out / f"{RESULTS_STEM}.md").write_text(text)


class Deadline:
    """The run's time box: sections ask before they start and are skipped (noted) when it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class SkipSectionError(Exception):
    """Raised by a section that cannot run (no server, no time): recorded as ``skipped``."""


def run_section(report: Report, key: str, fn: Callable[[], Any], failures: list[str] | None = None) -> bool:
    """Run one section, guarded: its failure is recorded (status, error, traceback, a note) and
    never stops the others. True when it ran to the end."""
    started = time.perf_counter()
    try:
        fn()
    except SkipSectionError as exc:
        report.status(key, {"status": "skipped", "reason": str(exc), "seconds": time.perf_counter() - started})
        report.note(f"{key} skipped: {exc}")
        return False
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        report.status(key, {"status": "failed", "error": text, "traceback": traceback.format_exc(),
                            "seconds": time.perf_counter() - started})
        report.note(f"{key} failed: {text}")
        if failures is not None:
            failures.append(f"{key}: {text}")
        return False
    report.status(key, {"status": "ok", "seconds": time.perf_counter() - started})
    return True


# ------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What one run measures. ``for_args`` picks the GPU defaults, or tiny ones for a dry run."""

    device: str
    dry_run: bool
    e2e_seconds: float
    steps: list[int]
    repeats: int
    warm_steps: int
    load_durations: list[float]
    concurrency: list[int]
    load_steps: int
    requests: int | None
    time_budget_s: float
    request_timeout_s: float
    threads: int
    lora: bool = True

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        dry = args.dry_run

        def pick(value: Any, gpu: Any, cpu: Any) -> Any:
            return value if value is not None else (cpu if dry else gpu)

        def numbers(text: str, kind: type) -> list[Any]:
            return [kind(v) for v in str(text).split(",") if v.strip()]

        concurrency = numbers(pick(args.concurrency, "1,4,8", "1,2"), int)
        if 1 not in concurrency:
            raise SystemExit("error: --concurrency must include 1 (the throughput ratio is against it)")
        return cls(device=args.device or ("cpu" if dry else "cuda"), dry_run=dry,
                   e2e_seconds=pick(args.e2e_seconds, 60.0, 2.0), steps=numbers(pick(args.steps, "27,60", "2,3"), int),
                   repeats=pick(args.repeats, 3, 1), warm_steps=pick(args.warm_steps, 4, 2),
                   load_durations=numbers(pick(args.load_durations, "10,30,60", "1,2"), float),
                   concurrency=sorted(set(concurrency)), load_steps=pick(args.load_steps, 27, 2),
                   requests=pick(args.requests, None, 2), time_budget_s=pick(args.time_budget, 420.0, 240.0),
                   request_timeout_s=pick(args.request_timeout, 180.0, 120.0),
                   threads=pick(args.threads, 0, 1), lora=not getattr(args, "no_lora", False))


def request_params(seconds: float, steps: int, seed: int = 42) -> Any:
    """The (a)/(b) request: the load mix's first prompt (with lyrics), one fixed seed."""
    from acestep_client.params import GenerationParams

    prompt, lyrics = load.PROMPTS[0]
    return GenerationParams(prompt=prompt, lyrics=lyrics, audio_duration=seconds, infer_step=steps,
                            manual_seeds=str(seed))

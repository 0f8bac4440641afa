"""How a run records what it measured: the report (Markdown and JSON, rewritten after every
section), the run's time box, and the guard that runs each section on its own, so a section that
fails or runs out of time is recorded and the others still report."""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acestep_bench as bench

RESULTS_STEM = "gpu_serving"


def json_safe(value: Any) -> Any:
    """NaN/inf as null (strict JSON readers refuse them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


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

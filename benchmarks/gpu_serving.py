"""The GPU serving check's command line: ACE-Step served by Triton (torch runtime) against the
same code in-process, on one device, in one run.

The sections live in ``benchmarks/acestep_serving_check/`` (one module each, see its
``__init__``); ``scripts/gpu_serving_check.sh`` runs these sub-commands, each in its own time box::

    python benchmarks/gpu_serving.py placeholders DIR      # stand-ins for packages the GPU image lacks
    python benchmarks/gpu_serving.py build --checkpoint C --workdir W [--target gpu] [--endpoint-instances 8]
    python benchmarks/gpu_serving.py measure --checkpoint C --repository R --out DIR [--triton-root T] [--dry-run]

``measure`` runs (a) Triton vs the same compiled components in-process, (b) vs eager sequential
CFG, (c) throughput at concurrency 1/4/8, (e) live LoRA cost (``--no-lora`` skips it) and (d)
memory, each guarded: a section that fails is recorded in ``sections`` and the others still
report. ``--dry-run`` runs the same code on the CPU with tiny settings (the test suite does,
against a real tritonserver). Results: ``DIR/gpu_serving.md`` (tables for ``RESULTS.md``),
``DIR/gpu_serving.json`` and ``DIR/section_<name>.json``, written as each section ends.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench  # benchmarks/ is on sys.path only now

bench.ensure_project_importable()

from acestep_serving_check.figures import nanmax, parse_csv_numbers, ratio, verdict  # noqa: E402
from acestep_serving_check.measure import build, goals_section, measure, parse_args  # noqa: E402
from acestep_serving_check.memory import component_rows, parse_component_gauges  # noqa: E402
from acestep_serving_check.placeholders import PLACEHOLDERS, active_placeholders, write_placeholders  # noqa: E402
from acestep_serving_check.plan import Plan  # noqa: E402
from acestep_serving_check.report import Deadline, Report, SkipSectionError, run_section  # noqa: E402
from acestep_serving_check.throughput import dit_delta, throughput_ratio, throughput_rows  # noqa: E402

__all__ = ["PLACEHOLDERS", "Deadline", "Plan", "Report", "SkipSectionError", "active_placeholders", "bench",
           "build", "component_rows", "dit_delta", "goals_section", "measure", "nanmax", "parse_args",
           "parse_component_gauges", "parse_csv_numbers", "ratio", "run_section", "throughput_ratio",
           "throughput_rows", "verdict", "write_placeholders"]


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """``timeout`` stops a phase with SIGTERM: turn it into SystemExit so ``finally`` stops the
    server (started in its own session, it would outlive us otherwise)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "placeholders":
        written = write_placeholders(args.folder)
        print(f"placeholders: {', '.join(written) or 'none needed'} ({args.folder})")
        return 0
    if args.command == "build":
        print(build(args.checkpoint, args.workdir, args.target, args.endpoint_instances, args.threads))
        return 0
    return measure(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

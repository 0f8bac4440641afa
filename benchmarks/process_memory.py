"""What a process (and the machine) holds, read from ``/proc`` through :mod:`acestep_triton.serving.memory`.

The benchmarks measure memory per process (tritonserver, each model's stub, the benchmark
itself) from ``/proc/<pid>/status``, through the serving code's own reader, so a benchmark's
figure and the server's memory release mean the same thing. Linux only: off Linux, or for a
process that has exited, a field reads 0. Import it after ``bench.ensure_project_importable()``.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from acestep_triton.serving.memory import proc_field_bytes


def status_bytes(pid: int | str, key: str) -> int:
    """Field ``key`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...) of ``/proc/<pid>/status`` in bytes;
    ``pid`` may be ``"self"``."""
    return proc_field_bytes(f"/proc/{pid}/status", key)


def reset_peak(pid: int | str = "self") -> None:
    """Reset the process's high-water mark (``VmHWM``) to its current RSS, so the next peak read
    is what came after (raises where ``/proc`` refuses it)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def machine_summary() -> str:
    """``<cpu model>, <n> cores, <total> GiB``: the line every benchmark report starts with."""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    cpu = cpu or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {proc_field_bytes('/proc/meminfo', 'MemTotal') / 2**30:.1f} GiB"

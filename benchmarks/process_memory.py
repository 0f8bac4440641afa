"""What a process holds, read from ``/proc`` through :mod:`acestep_triton.serving.memory`.

The benchmarks measure memory per process (tritonserver, each model's stub, the benchmark
itself) from ``/proc/<pid>/status``, through the serving code's own reader, so a benchmark's
figure and the server's memory release mean the same thing. Linux only: off Linux, or for a
process that has exited, a field reads 0. Import it after ``bench.ensure_project_importable()``.
"""

from __future__ import annotations

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

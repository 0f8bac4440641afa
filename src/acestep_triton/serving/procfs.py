"""Process state from ``/proc``: one reader for the watchdog, the health probe and the drain.

Kept free of package imports so that the endpoint stubs (the drain gate) and the health probe
both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """``comm`` and the fields after it (the file's fields 3 on) of ``/proc/<pid>/stat``, or None
    when the process is gone. ``comm`` may hold spaces and parentheses: it ends at the last ``)``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None when it is gone."""
    stat = _stat_fields(pid)
    if stat is None:
        return None
    comm, fields = stat
    return comm, fields[0], int(fields[1])


def cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a process in clock ticks (``utime + stime``), or None when
    it is gone: whether a process is working, without asking it."""
    stat = _stat_fields(pid)
    return None if stat is None else int(stat[1][11]) + int(stat[1][12])  # the file's fields 14 and 15


def process_alive(pid: int) -> bool:
    """True when ``pid`` runs. A zombie (exited, waiting to be reaped) does not, although
    ``os.kill(pid, 0)`` succeeds on it: a stub killed with ``kill -9`` stays one, since Triton
    never reaps it."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")

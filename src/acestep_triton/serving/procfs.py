"""Process state from ``/proc``: one reader for the watchdog, the health probe and the drain.

Kept free of package imports so that the endpoint stubs (the drain gate) and the health probe
both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return comm, state, int(ppid)


def cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a process in clock ticks (``utime + stime``), or None when
    it is gone: whether a process is working, without asking it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is the state, field 3 of the file
    return int(fields[11]) + int(fields[12])  # utime and stime: fields 14 and 15 of the file


def process_alive(pid: int) -> bool:
    """True when ``pid`` runs. A zombie (exited, waiting to be reaped) does not, although
    ``os.kill(pid, 0)`` succeeds on it: a stub killed with ``kill -9`` stays one, since Triton
    never reaps it."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")

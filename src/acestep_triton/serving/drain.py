"""Graceful drain: finish the generations in flight, refuse new ones, then stop.

Why this exists (measured on tritonserver 2.51.0): on SIGTERM, Triton stops accepting inference
requests at once, also the BLS requests an endpoint sends its components while it generates
(``Model dit_decoder - Error when running inference: Server not ready``), so a generation in
flight fails at its next component call: a 60 s generation failed 0.1 s after the signal, and
a rolling update lost every generation a replica was running.

So ``acestep-triton serve`` does not pass SIGTERM straight on. It first *drains*:

1. it creates the flag file ``draining`` in the drain folder (``$ACESTEP_DRAIN_DIR``, which it
   puts in the server's environment, so every endpoint stub sees the same folder);
2. from then on each endpoint refuses a new request with ``[unavailable] ... shutting down``
   before doing any work (:meth:`DrainGate.check`), which the client retries, on another replica
   behind a Service; the health file says ``draining``, so readiness fails at once;
3. each endpoint marks a request it serves with a file ``inflight-<pid>-<n>`` for as long as it
   runs; ``serve`` waits until no such file of a live process is left, or the grace period
   (``serve --drain-timeout``) ran out;
4. only then does it stop tritonserver (SIGTERM, which now finds nothing in flight).

Files rather than a metric or a socket: a stub that dies leaves its marker behind, and the pid
in the name tells ``serve`` to ignore it; and a file costs a request two system calls.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from acestep_client.errors import UnavailableError

from .procfs import process_alive

DRAIN_DIR_ENV = "ACESTEP_DRAIN_DIR"
"""Environment variable naming the drain folder (set by ``serve`` for tritonserver and its stubs)."""
FLAG = "draining"
MARKER_PREFIX = "inflight-"
FOLDER_SUFFIX = "drain"
SHUTTING_DOWN = "the server is shutting down (draining for a restart or an update); retry the request"
"""The reason a draining endpoint gives, after ``[unavailable]``: clients resend it elsewhere."""


class DrainingError(UnavailableError):
    """Raised by :meth:`DrainGate.check` for a request that arrived after the drain began: an
    ``[unavailable]`` error, so clients resend it (to another replica, or to this one restarted)."""


class DrainGate:
    """The endpoint's side: refuse new work while draining, mark work in flight.

    ``directory`` None (the default: ``$ACESTEP_DRAIN_DIR``, unset when the server was not started
    by ``serve``) makes the gate a no-op, so a bare tritonserver serves as before.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        path = directory if directory is not None else os.environ.get(DRAIN_DIR_ENV)
        self.directory = Path(path) if path else None
        self._counter = itertools.count()
        self._lock = threading.Lock()

    @property
    def draining(self) -> bool:
        return self.directory is not None and (self.directory / FLAG).exists()

    def check(self) -> None:
        """Raise :class:`DrainingError` when the drain began (call inside :meth:`track`)."""
        if self.draining:
            raise DrainingError(SHUTTING_DOWN)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Mark one request in flight for the ``with`` block, which must cover its final
        response. Call :meth:`check` inside it: the marker is written before the flag is looked
        at, and ``serve`` writes the flag before it counts markers, so a request is either
        counted or refused, never missed by both."""
        if self.directory is None:
            yield
            return
        with self._lock:
            marker: Path | None = self.directory / f"{MARKER_PREFIX}{os.getpid()}-{next(self._counter)}"
        try:
            marker.touch()  # type: ignore[union-attr]
        except OSError:  # folder gone (serve exited): nothing waits for this request
            marker = None
        try:
            yield
        finally:
            if marker is not None:
                with contextlib.suppress(OSError):
                    marker.unlink()


def folder_for(shm_prefix: str) -> Path:
    """The drain folder of the server whose shared-memory prefix is ``shm_prefix``
    (``acestep_<token>_``): named after it, so a dead server's folder is recognised as such."""
    return Path(tempfile.gettempdir()) / f"{shm_prefix}{FOLDER_SUFFIX}"


def stale_folders(live_prefixes: set[str]) -> list[Path]:
    """Drain folders of servers that are gone (their prefix is not among ``live_prefixes``)."""
    found = []
    for path in Path(tempfile.gettempdir()).glob(f"acestep_*_{FOLDER_SUFFIX}"):
        if path.is_dir() and path.name[: -len(FOLDER_SUFFIX)] not in live_prefixes:
            found.append(path)
    return found


def begin(directory: Path) -> None:
    """Start draining: endpoints refuse new requests from now on."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FLAG).touch()


def in_flight(directory: Path) -> int:
    """Requests the endpoints are serving now (markers of live processes)."""
    count = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(MARKER_PREFIX):
            continue
        try:
            pid = int(entry.name[len(MARKER_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if process_alive(pid):  # a zombie's marker too is gone with its request
            count += 1
        else:  # the stub died with the request: nobody will finish it
            with contextlib.suppress(OSError):
                entry.unlink()
    return count


def reset(directory: Path) -> None:
    """Empty the folder (before a server starts: a new server has nothing in flight)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.name == FLAG or entry.name.startswith(MARKER_PREFIX):
            with contextlib.suppress(OSError):
                entry.unlink()

"""Fault injection for tests and the soak run: kill a model's Python-backend stub process.

A Triton Python-backend model instance is one ``triton_python_backend_stub`` process, a child
of the server, whose command line names the instance (``dit_decoder_0_0``). Killing it is what
an OOM kill or a crash in native code does to a model; :mod:`acestep_triton.serving.health`
describes what Triton does next and how the server recovers.

    from acestep_triton.serving.faults import kill_stub, stub_pids
    pids = stub_pids(server.pid, "dit_decoder")   # one pid per live instance
    victim = kill_stub(server, "dit_decoder")      # SIGKILL instance 0; returns its pid
"""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol

from .health import process_alive, stub_processes

__all__ = ["kill_stub", "stub_pids", "wait_for_stub"]


class _HasPid(Protocol):
    @property
    def pid(self) -> int | None: ...


def _server_pid(server: _HasPid | int) -> int:
    pid = server if isinstance(server, int) else server.pid
    if pid is None:
        raise RuntimeError("the server is not running")
    return pid


def stub_pids(server_pid: int, model_name: str) -> list[int]:
    """Pids of the live stub processes of ``model_name``'s instances on server ``server_pid``,
    in instance order (``<model>_0_0``, ``<model>_0_1``...). LoRA variants
    (``dit_decoder__tiny``) are other models: they do not count for ``dit_decoder``."""
    return [s.pid for s in stub_processes(server_pid) if s.model == model_name]


def kill_stub(server: _HasPid | int, model_name: str, *, index: int = 0, sig: int = signal.SIGKILL,
              timeout: float = 5.0) -> int:
    """Send ``sig`` (default SIGKILL) to the stub of instance ``index`` of ``model_name`` on
    ``server`` (a :class:`~acestep_triton.serving.server.TritonServer` or a server pid) and wait
    until it has exited (at most ``timeout`` s). Returns the pid that was killed."""
    pids = stub_pids(_server_pid(server), model_name)
    if not pids:
        raise LookupError(f"no live stub process for model {model_name!r} on server {_server_pid(server)}")
    if index >= len(pids):
        raise LookupError(f"model {model_name!r} has {len(pids)} live instance(s), no index {index}")
    pid = pids[index]
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while sig in (signal.SIGKILL, signal.SIGTERM) and process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def wait_for_stub(server: _HasPid | int, model_name: str, *, count: int = 1, timeout: float = 60.0) -> list[int]:
    """Block until ``model_name`` has ``count`` live stubs (e.g. after a reload); their pids."""
    deadline = time.monotonic() + timeout
    while True:
        pids = stub_pids(_server_pid(server), model_name)
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)

"""Give a request's transient memory back to the system once the request has ended.

Issue 13: after one batch-16 × 240 s request a server held 9.85 GiB for good. Nothing leaked
(every tensor of the request is unreferenced when its ``_serve`` returns), but the allocators
keep what was freed:

* on the CPU, glibc's malloc keeps freed heap memory in its arenas, and after the first big
  ``free`` it raises its mmap threshold (up to 32 MiB), so later audio-sized buffers come from the
  arenas too and are never unmapped. ``malloc_trim(0)`` hands every free page back (measured on
  the tiny checkpoint in-process: a batch-4 × 60 s request left RSS at 603 MiB from a 461 MiB
  baseline; after ``malloc_trim`` 456 MiB);
* on a GPU, PyTorch's caching allocator keeps freed blocks reserved for this process, where the
  other processes on the device (the component models, other endpoint instances) cannot use
  them: ``torch.cuda.empty_cache()`` returns them.

Both are cheap but not free (``malloc_trim`` walks the arenas, ``empty_cache`` makes the next
big request allocate again), so :class:`MemoryReleaser` only acts when the process grew past
a threshold during the request. The endpoints call :meth:`MemoryReleaser.after_request` after
every request, when the request's locals are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any

MiB = 2**20
#: Growth of the process over its post-load size that triggers a release (smaller growth is
#: allocator noise, and trimming it would only cost time).
DEFAULT_THRESHOLD = 64 * MiB


def proc_field_bytes(path: str, key: str) -> int:
    """A ``key:   N kB`` line of a ``/proc`` file in bytes (0 where the file or line is missing,
    e.g. off Linux or for a process that has exited)."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` (``VmRSS`` of ``/proc/<pid>/status``; 0 off Linux)."""
    return proc_field_bytes(f"/proc/{pid}/status", "VmRSS")


@lru_cache(maxsize=1)
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def malloc_trim() -> bool:
    """Return the C heap's free pages to the system; False where glibc is not available."""
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryReleaser:
    """Releases cached memory after a request that made this process grow.

    Construct it at the end of model loading: the RSS then is the baseline a finished request
    should come back to. ``device`` is where the endpoint's tensors live (``cuda`` also empties
    PyTorch's cache when more than ``threshold`` bytes sit reserved but unused).
    """

    def __init__(self, device: Any = "cpu", threshold: int = DEFAULT_THRESHOLD) -> None:
        # torch is imported only for a CUDA device: the ONNX component models use this too, and
        # their stub processes do not import torch at all.
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.threshold = threshold
        self.baseline = rss_bytes()
        self.releases = 0

    def after_request(self) -> bool:
        """Release what the finished request left cached; True when something was released."""
        released = False
        if rss_bytes() - self.baseline > self.threshold:
            gc.collect()  # tensors held only by reference cycles (e.g. a kept traceback) go first
            released = malloc_trim()
        if self.cuda:
            import torch  # heavy: only a CUDA instance gets here (this module stays torch-free)

            if torch.cuda.is_available():
                cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                if cached > self.threshold:
                    torch.cuda.empty_cache()
                    released = True
        if released:
            self.releases += 1
        return released

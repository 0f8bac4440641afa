"""Load one served component in a fresh process and report what loading cost that process.

A ``torch``-runtime model loads its component in its own stub process, so what a deployment pays
for a component is per process: the seconds to load it, the process's RSS before, at the peak
(``VmHWM``) and after, and the bytes of the weights the module keeps. Only a fresh interpreter
gives those figures cleanly (nothing loaded before, a peak that is the load's own), so
:func:`probe_load` runs this file as a child process. ``benchmarks/full_size.py`` probes every
component; ``tests/test_weights.py`` bounds the peak of one.

The loader comes from the source tree given (``full_size.py --before REV`` measures an older
revision's); the yardsticks (:mod:`acestep_triton.serving.memory` for ``/proc``,
:func:`acestep_triton.serving.component_stats.module_bytes` for the weights) always come from
this checkout, loaded by file, so both trees are measured alike even where the older one
predates them::

    python benchmarks/load_probe.py TREE COMPONENT CHECKPOINT   # prints one JSON line
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SERVING = REPO / "src" / "acestep_triton" / "serving"


def probe_load(name: str, ckpt: Path, tree: Path = REPO) -> dict[str, Any]:
    """Load component ``name`` of ``ckpt`` with the loader of source tree ``tree`` in a fresh
    process: ``seconds``, ``base_rss``, ``peak_rss``, ``steady_rss`` and ``weights`` (bytes), or
    ``{"error": <the child's last line of stderr>}``. ``PYTHONPATH`` is cleared so the tree's own
    folders decide what is imported."""
    done = subprocess.run([sys.executable, __file__, str(tree), name, str(ckpt)], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _this_checkout(name: str) -> ModuleType:
    """``acestep_triton/serving/<name>.py`` of this checkout, loaded by file under a private name
    (neither yardstick imports anything of the project), whichever tree the package comes from."""
    spec = importlib.util.spec_from_file_location(f"_load_probe_{name}", SERVING / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_load(tree: Path, name: str, ckpt: str) -> dict[str, Any]:
    """In the child process: load ``name`` with ``tree``'s loader and read what it cost."""
    memory, stats = _this_checkout("memory"), _this_checkout("component_stats")
    sys.path[:0] = [str(tree / "src"), str(tree / "client")]
    # by name, after the tree's folders lead sys.path: the measured tree's loader, not this checkout's
    load_component_module = importlib.import_module("acestep_triton.serving.torch_runtime").load_component_module
    base = memory.rss_bytes()
    started = time.perf_counter()
    module = load_component_module(name, ckpt)
    seconds = time.perf_counter() - started
    steady = memory.rss_bytes()
    # The high-water mark only grows: read after the RSS, it is never below it (read first, the
    # RSS can pass it by a page in between).
    peak = memory.proc_field_bytes("/proc/self/status", "VmHWM")
    return {"seconds": seconds, "base_rss": base, "peak_rss": peak, "steady_rss": steady,
            "weights": stats.module_bytes(module)}


def main(argv: list[str]) -> int:
    tree, name, ckpt = argv
    print(json.dumps(measure_load(Path(tree), name, ckpt)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

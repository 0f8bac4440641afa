"""Shared helpers of the benchmark scripts (tables, percentiles, running from a bare checkout).

The scripts in ``benchmarks/`` are run as files (``python benchmarks/<name>.py``), not as a
package, so each puts this folder on ``sys.path`` and imports this module by its (distinctive)
name. Nothing here imports torch or the project, so every script can call
:func:`ensure_project_importable` before its own imports.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def importable(name: str) -> bool:
    """Whether ``import name`` would find a module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ensure_project_importable() -> None:
    """Make ``acestep_triton`` / ``acestep_client`` importable from a checkout that was not
    pip-installed (a bare GPU machine): put ``src/`` and ``client/`` on ``sys.path``."""
    for package, folder in (("acestep_triton", REPO / "src"), ("acestep_client", REPO / "client")):
        if not importable(package) and folder.is_dir():
            sys.path.insert(0, str(folder))


def stub_soundfile_if_missing() -> bool:
    """Install a placeholder ``soundfile`` module when the real one is missing; return True if so.

    The project imports soundfile at module level for reading and writing audio files; the GPU
    benchmark reads and writes none, and a bare GPU image may lack the package (and the cffi it
    needs). The placeholder raises if anything does try to use it.
    """
    if importable("soundfile"):
        return False
    stub = types.ModuleType("soundfile")

    def unavailable(*_: Any, **__: Any) -> Any:
        raise RuntimeError("soundfile is not installed; this benchmark does not read or write audio files")

    stub.read = stub.write = stub.info = stub.SoundFile = unavailable  # type: ignore[attr-defined]
    stub.__acestep_stub__ = True  # type: ignore[attr-defined]
    # a real module spec: libraries probe optional packages with importlib.util.find_spec, which
    # raises on a module whose __spec__ is None (transformers does this for soundfile)
    stub.__spec__ = importlib.machinery.ModuleSpec("soundfile", loader=None)
    sys.modules["soundfile"] = stub
    return True


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default), NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (pipes, aligned columns): readable in a terminal and pasteable into RESULTS.md."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [] if title is None else [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def write_json(path: str | Path | None, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON (atomically enough for a results file read after the run)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)

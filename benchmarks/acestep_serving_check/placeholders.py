"""Stand-ins for packages a bare GPU image lacks but text2music with English lyrics never uses."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import acestep_bench as bench

PLACEHOLDERS: dict[str, str] = {
    "soundfile": '''"""Placeholder (benchmarks/gpu_serving.py placeholders): this machine has no soundfile (libsndfile).

The serving code imports soundfile at module level to read and write audio files; text2music
reads and writes none, so the module only has to exist. Any use raises.
"""

__acestep_placeholder__ = True


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("soundfile is not installed here (placeholder from benchmarks/gpu_serving.py placeholders)")


read = write = info = SoundFile = _unavailable
''',
    "cutlet": '''"""Placeholder (benchmarks/gpu_serving.py placeholders): this machine has no cutlet (Japanese romaji).

Real romanisation needs cutlet, fugashi and unidic-lite, a 47 MB dictionary that does not fit
the files a bare GPU machine can be given. The lyric tokenizer's start-up warm-up romanises one
Japanese word; this passes text through unchanged. The benchmark's lyrics are English, so its
token ids are the real ones; Japanese lyric lines would get other ids here. Timing only, never
serving.
"""

__acestep_placeholder__ = True


class Cutlet:
    def romaji(self, text):
        return text
''',
}
"""Packages a bare GPU image may lack that the serving code imports, but text2music with
English lyrics never really uses: module sources written only where the real one is missing."""


def write_placeholders(folder: Path, names: Iterable[str] = tuple(PLACEHOLDERS)) -> list[str]:
    """Write a placeholder package into ``folder`` for each of ``names`` not importable otherwise.

    Files, not ``sys.modules`` entries: the Triton model processes import them too (``folder``
    goes on their ``PYTHONPATH``). ``folder`` is cleared first, so a placeholder of an earlier run
    never hides a real package installed since.
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    importlib.invalidate_caches()
    written = []
    for name in names:
        if bench.importable(name):
            continue
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(PLACEHOLDERS[name])
        written.append(name)
    return written


def active_placeholders() -> list[str]:
    """Which of :data:`PLACEHOLDERS` are stand-ins here (ours, or acestep_bench's soundfile stub),
    without importing anything new: recorded with the results so no reader mistakes them."""
    active = []
    for name in PLACEHOLDERS:
        module = sys.modules.get(name)
        if module is not None:
            if getattr(module, "__acestep_placeholder__", False) or getattr(module, "__acestep_stub__", False):
                active.append(name)
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is not None and origin.is_file() and "__acestep_placeholder__" in origin.read_text(errors="replace"):
            active.append(name)
    return active


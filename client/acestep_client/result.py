"""What one generation produced, and how it is written to disk.

Kept apart from :mod:`acestep_client.client` so that code which generates without a server
(the in-process pipeline's CLI) writes the same files without importing ``tritonclient``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from acestep_client.audio_io import ENCODINGS, format_from_path, write_audio


@dataclass
class GenerationResult:
    """What one request produced: ``audio`` float32 [B, 2, N] at ``sample_rate`` and the
    parameters the server actually used: ``params`` (with ``actual_seeds``, plus the client-side
    fields such as ``format``) and ``params_json``, the server's text exactly as received."""

    audio: np.ndarray
    sample_rate: int
    params: dict[str, Any]
    params_json: str

    @property
    def batch_size(self) -> int:
        return int(self.audio.shape[0])

    @property
    def duration_s(self) -> float:
        return self.audio.shape[-1] / float(self.sample_rate)

    def save(self, path_or_dir: str | Path, format: str | None = None, *, stem: str = "output") -> list[Path]:
        """Write one audio file per item plus ``<name>_params.json`` beside each.

        ``path_or_dir`` is a folder (files ``<stem>_<i>.<format>``) or, for a path with an audio
        suffix, a file name (used as is for one item, ``<name>_<i><suffix>`` for several).
        ``format`` defaults to the suffix, then to the parameters' ``format``, then wav.
        Returns the audio paths.
        """
        target = Path(path_or_dir)
        is_file = target.suffix.lower().lstrip(".") in ENCODINGS and not target.is_dir()
        fmt = (format or (format_from_path(target) if is_file else None)
               or str(self.params.get("format") or "wav")).lower()
        if fmt not in ENCODINGS:
            raise ValueError(f"format: {fmt!r} is not one of {', '.join(ENCODINGS)}")
        if is_file:
            names = ([target] if self.batch_size == 1 else
                     [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(self.batch_size)])
        else:
            names = [target / f"{stem}_{i}.{fmt}" for i in range(self.batch_size)]
        written = []
        for i, path in enumerate(names):
            write_audio(path, self.audio[i], self.sample_rate, fmt)
            meta = {**self.params, "audio_path": str(path), "batch_index": i}
            text = json.dumps(meta, ensure_ascii=False, indent=2)
            path.with_name(f"{path.stem}_params.json").write_text(text, encoding="utf-8")
            written.append(path)
        return written

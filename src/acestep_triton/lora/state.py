"""The set of adapters a running server serves at any strength (live adapters, ``torch`` runtime).

One JSON file (the *state file*) is the single source of truth shared by three kinds of
processes that cannot share memory: the ``lora_registry`` control model writes it (load, unload,
reload; :mod:`.live_control`), the endpoints read it to turn a request's ``lora_name_or_path`` into an
adapter index (or a :class:`ParamError` naming the field), and the ``condition_encoder`` /
``dit_decoder`` instances read it to find the file behind an index they are asked to apply.
Readers re-read it only when its modification time or size changed (one ``stat`` per call),
and the writer replaces it atomically, so a reader never sees half a file.

Indices are never reused: unloading and loading an adapter again gives it a new index, so a
component never applies stale tensors cached under an old index.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "lora_state.json"
"""Default name of the state file (in the deployment's ``lora_runtime`` folder)."""

LIVE_POINTER_FILE = "lora_runtime.json"
"""Written into the assets folder of a live-adapter deployment: ``{"state_file": ...}``; its
presence tells the endpoints to send per-row adapter inputs instead of routing to variants. (The
file name predates the "live adapters" name; deployments already built carry it.)"""

NO_ADAPTER = -1
"""``lora_index`` of a batch row without adapter."""


@dataclass(frozen=True)
class LoadedAdapter:
    """One served adapter as the control model validated it against the checkpoint."""

    name: str
    index: int
    file: str
    sha256: str
    scaling: str = "upstream"
    ranks: tuple[int, ...] = ()
    layers: int = 0
    components: tuple[str, ...] = ()
    parameters: Mapping[str, int] = field(default_factory=dict)
    """A/B (and bias) element count per component: the memory it costs, times the dtype's size."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "file": self.file, "sha256": self.sha256,
                "scaling": self.scaling, "ranks": list(self.ranks), "layers": self.layers,
                "components": list(self.components), "parameters": dict(self.parameters)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadedAdapter:
        return cls(name=str(data["name"]), index=int(data["index"]), file=str(data["file"]),
                   sha256=str(data.get("sha256", "")), scaling=str(data.get("scaling", "upstream")),
                   ranks=tuple(int(r) for r in data.get("ranks", ())), layers=int(data.get("layers", 0)),
                   components=tuple(str(c) for c in data.get("components", ())),
                   parameters={str(k): int(v) for k, v in (data.get("parameters") or {}).items()})


@dataclass(frozen=True)
class LoraState:
    """The content of the state file."""

    loaded: Mapping[str, LoadedAdapter] = field(default_factory=dict)
    next_index: int = 0
    failed: Mapping[str, str] = field(default_factory=dict)
    """Adapters of the registry folder that the last load or reload refused, with the reason."""

    def by_index(self, index: int) -> LoadedAdapter | None:
        for adapter in self.loaded.values():
            if adapter.index == index:
                return adapter
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "next_index": self.next_index,
                "loaded": {n: a.to_dict() for n, a in sorted(self.loaded.items())}, "failed": dict(self.failed)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraState:
        return cls(loaded={str(n): LoadedAdapter.from_dict(a) for n, a in (data.get("loaded") or {}).items()},
                   next_index=int(data.get("next_index", 0)),
                   failed={str(k): str(v) for k, v in (data.get("failed") or {}).items()})

    @classmethod
    def read(cls, path: str | Path) -> LoraState:
        """The state in ``path``; an empty state when the file does not exist yet."""
        path = Path(path)
        if not path.is_file():
            return cls()
        return cls.from_dict(json.loads(path.read_text()))

    def write(self, path: str | Path) -> None:
        """Replace ``path`` atomically (write a temporary file beside it, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class StateReader:
    """The current :class:`LoraState` of a file, re-read only when the file changed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._state = LoraState()

    def current(self) -> LoraState:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._state = None, LoraState()
            return self._state
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # a rename changes the inode
        if stamp != self._stamp:
            self._state = LoraState.read(self.path)
            self._stamp = stamp
        return self._state


def write_live_pointer(assets_dir: str | Path, state_file: str | Path) -> Path:
    """Tell the endpoints of a deployment where the state file is (:data:`LIVE_POINTER_FILE`)."""
    path = Path(assets_dir) / LIVE_POINTER_FILE
    path.write_text(json.dumps({"state_file": str(Path(state_file).resolve())}, indent=2) + "\n")
    return path


def read_live_pointer(assets_dir: str | Path) -> Path | None:
    """The state file of a live-adapter deployment, or None (fused variants, or no LoRA)."""
    path = Path(assets_dir) / LIVE_POINTER_FILE
    if not path.is_file():
        return None
    return Path(json.loads(path.read_text())["state_file"])

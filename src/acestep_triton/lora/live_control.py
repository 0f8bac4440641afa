"""Adding and removing live adapters while the server runs: the ``lora_registry`` control model.

The registry folder holds one sub-folder per adapter (:mod:`.registry` reads it, as for
:class:`~.registry.LoraRegistry`); :class:`LiveAdapterControl` is not a second registry but the
commands that change which of its adapters are served.

Nothing in it is served until it is loaded, explicitly: the control model answers four commands
(``command`` BYTES [1], plus ``lora_name_or_path`` BYTES [1] naming a folder of the registry):

* ``list``: the loaded adapters, the ones the registry folder holds but does not serve, and,
  per component instance, which adapters are resident in memory and how many bytes they take;
* ``load NAME``: read the folder's adapter and check every key against the checkpoint's
  transformer (shapes only, on the meta device: nothing is materialised), then serve it;
* ``unload NAME``: stop serving it (instances drop its tensors on their next call);
* ``reload``: load every folder not loaded yet or whose file changed, unload the vanished ones.

Requests only ever name adapters by folder name: a server never opens a path a request names,
and a folder (or adapter file) whose real path leaves the registry folder, through a symlink, is
refused. A refused load names ``lora_name_or_path``, the folder and the reason (unknown folder, a
file that is not a readable safetensors adapter, keys that do not fit the checkpoint, a single
adapter larger than the memory budget) and changes nothing else; ``reload`` loads every good
folder and reports each bad one. The answer is ``loras_json`` BYTES [1] (the listing, after the
command).

``load``, ``unload`` and ``reload`` change what every user of the server gets, so they need the
admin key (:mod:`acestep_client.auth`: request parameter ``acestep_admin_key``, compared with the
``ACESTEP_ADMIN_KEY`` that ``acestep-triton serve`` puts in the server's environment); a missing
or wrong key is ``[permission_denied]``. ``list`` is open. What the state file remembers of
refused loads is bounded (the last :data:`MAX_FAILED`, reasons cut to :data:`MAX_REASON_CHARS`),
and so is every error message (:data:`MAX_MESSAGE_CHARS`, well under gRPC's 16 KiB of metadata,
where a longer message would lose its category tag).

The loaded set lives in the state file (:mod:`.state`), written only here; the component
instances keep the tensors they use within ``lora_memory_mb`` (:class:`~.live.AdapterBank`,
least recently used evicted, re-read from the registry folder on their next use).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from acestep_client.params import ParamError, echo

from ..export.project_files import default_sources_root
from ..export.triton_config import ModelConfigSpec, TensorConfig, render_config
from .files import LoraError, adapter_file, load_lora
from .live import component_part
from .registry import folder_names, is_no_lora, is_valid_adapter_name, registry_folder
from .state import LoadedAdapter, LoraState

CONTROL_MODEL = "lora_registry"
"""Served name of the control model."""

CONTROL_SOURCE = "lora_registry"
"""Its Python-backend source folder under ``model_repository/``."""

COMMANDS = ("list", "load", "unload", "reload")
ADMIN_COMMANDS = ("load", "unload", "reload")
"""Commands that need the admin key (``list`` is open)."""

MAX_FAILED = 16
"""Refused loads the state file remembers (the most recent; every reader parses the file)."""
MAX_REASON_CHARS = 2000
"""A remembered refusal's reason is cut to this."""
MAX_MESSAGE_CHARS = 4096
"""Longest error message the control model answers with (gRPC carries it in 16 KiB of metadata)."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


STATUS_DIR = "resident"
"""Folder beside the state file where each component instance records its resident adapters."""


class LiveAdapterControl:
    """The commands behind the control model: which adapters of the registry folder ``root`` are
    served, recorded in ``state_file``. Every adapter is checked against ``transformer`` (the
    checkpoint's, on the meta device) and the per-component ``budget_bytes`` before it is served."""

    def __init__(self, root: str | Path, state_file: str | Path, transformer: nn.Module, *,
                 budget_bytes: int, scaling: str = "upstream", bytes_per_parameter: int = 4) -> None:
        self.root = Path(root)
        self.state_file = Path(state_file)
        self.transformer = transformer
        self.budget_bytes = int(budget_bytes)
        self.scaling = scaling
        self.bytes_per_parameter = bytes_per_parameter

    @property
    def state(self) -> LoraState:
        return LoraState.read(self.state_file)

    def folders(self) -> list[str]:
        """Adapter folders of the registry (names a ``load`` accepts)."""
        return folder_names(self.root)

    def _validate(self, name: str, index: int) -> LoadedAdapter:
        """Read and check ``name``'s adapter; :class:`ParamError` on ``lora_name_or_path`` naming
        the folder for anything wrong with it (a bad file never reads as an internal error)."""
        folder = registry_folder(self.root, name)
        try:
            file = adapter_file(folder)
            real = file.resolve()
            if not real.is_relative_to(folder.resolve()):
                raise LoraError(f"{file} leads to {real}, outside the adapter's folder")
            adapter = load_lora(file, self.transformer, scaling=self.scaling, name=name)
        except LoraError as e:
            raise ParamError("lora_name_or_path", f"adapter {name!r} ({folder}) cannot be served: {e}") from None
        except Exception as e:  # whatever else a malformed file provokes: still this folder's fault
            raise ParamError("lora_name_or_path", f"adapter {name!r} ({folder}) cannot be read: "
                                                  f"{type(e).__name__}: {e}") from None
        parameters = {}
        for component in adapter.components:
            part = component_part(adapter, component)
            parameters[component] = sum(t.numel() for layer in part.layers.values()
                                         for t in (layer.down, layer.up, layer.bias) if t is not None)
        largest = max(parameters.values(), default=0) * self.bytes_per_parameter
        if largest > self.budget_bytes:
            raise ParamError("lora_name_or_path", f"adapter {name!r} needs {largest / 2**20:.1f} MiB in one "
                                                  f"component, more than the whole LoRA memory budget "
                                                  f"({self.budget_bytes / 2**20:.1f} MiB, lora_memory_mb)")
        return LoadedAdapter(name=name, index=index, file=str(adapter.path.resolve()), sha256=adapter.sha256,
                             scaling=self.scaling, ranks=tuple(sorted(set(adapter.ranks.values()))),
                             layers=len(adapter.layers), components=adapter.components, parameters=parameters)

    def load(self, name: str) -> LoadedAdapter:
        """Serve ``name`` (again: a changed file is re-read and gets a new index)."""
        name = name.strip()
        state = self.state
        try:
            entry = self._validate(name, state.next_index)
        except ParamError as e:
            if is_valid_adapter_name(name):  # an invalid name is no folder: nothing to remember about it
                failed = {k: v for k, v in state.failed.items() if k != name}
                failed[name] = clip(e.reason, MAX_REASON_CHARS)
                self._write(state.loaded, state.next_index, dict(list(failed.items())[-MAX_FAILED:]))
            raise
        old = state.loaded.get(name)
        if old is not None and old.sha256 == entry.sha256:
            return old
        failed = {k: v for k, v in state.failed.items() if k != name}
        self._write({**state.loaded, name: entry}, state.next_index + 1, failed)
        return entry

    def unload(self, name: str) -> None:
        name = name.strip()
        state = self.state
        if name not in state.loaded:
            served = ", ".join(state.loaded) or "none"
            raise ParamError("lora_name_or_path", f"adapter {echo(name)} is not loaded (loaded: {served})")
        self._write({k: v for k, v in state.loaded.items() if k != name}, state.next_index, state.failed)

    def reload(self) -> dict[str, str]:
        """Load what is new or changed, unload what vanished; returns the refusals by name."""
        folders = set(self.folders())
        for name in [n for n in self.state.loaded if n not in folders]:
            self.unload(name)
        refused: dict[str, str] = {}
        for name in sorted(folders):  # one bad folder never keeps the ones after it from loading
            try:
                self.load(name)
            except ParamError as e:
                refused[name] = clip(e.reason, MAX_REASON_CHARS)
        state = self.state
        self._write(state.loaded, state.next_index, refused)
        return refused

    def _write(self, loaded: Mapping[str, LoadedAdapter], next_index: int, failed: Mapping[str, str]) -> None:
        LoraState(loaded=dict(loaded), next_index=next_index, failed=dict(failed)).write(self.state_file)

    def residency(self) -> dict[str, Any]:
        """What each live component instance holds (its status file; dead processes' are dropped)."""
        folder = self.state_file.parent / STATUS_DIR
        out: dict[str, Any] = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                status = json.loads(path.read_text())
                os.kill(int(status["pid"]), 0)
            except (OSError, ValueError, KeyError):
                continue
            out[path.stem] = status
        return out

    def listing(self) -> dict[str, Any]:
        state = self.state
        return {"registry": str(self.root), "budget_bytes": self.budget_bytes,
                "loaded": [a.to_dict() for a in sorted(state.loaded.values(), key=lambda a: a.index)],
                "available": [n for n in self.folders() if n not in state.loaded],
                "failed": dict(state.failed), "instances": self.residency()}

    def command(self, command: str, name: str | None = None) -> dict[str, Any]:
        """Run one control command and return the listing after it."""
        command = command.strip().lower()
        if command not in COMMANDS:
            raise ParamError("command", f"unknown command {echo(command)}; use one of {', '.join(COMMANDS)}")
        if command in ("load", "unload"):
            if is_no_lora(name):
                raise ParamError("lora_name_or_path", f"{command} needs the name of an adapter folder")
            assert name is not None
            if command == "load":
                self.load(name)
            else:
                self.unload(name)
        elif command == "reload":
            refused = self.reload()
            return {**self.listing(), "failed": refused}  # every bad folder of this reload
        return self.listing()


# ---------------------------------------------------------------------------------------------
# The Triton model


def control_config(parameters: Mapping[str, str]) -> str:
    """``config.pbtxt`` of the control model (CPU, one instance, no batching)."""
    model = ModelConfigSpec(
        name=CONTROL_MODEL, backend="python", max_batch_size=0, instance_kind="KIND_CPU", instance_count=1,
        inputs=(TensorConfig("command", "BYTES", (1,)),
                TensorConfig("lora_name_or_path", "BYTES", (1,), optional=True)),
        outputs=(TensorConfig("loras_json", "BYTES", (1,)),), parameters=dict(parameters))
    return render_config(model, comment="Rendered by acestep_triton.lora.live_control: live LoRA adapter commands.")


def write_control_model(repository: str | Path, parameters: Mapping[str, str],
                        sources_root: str | Path | None = None) -> Path:
    """Add ``lora_registry/{config.pbtxt, 1/model.py}`` to a rendered repository."""
    folder = Path(repository) / CONTROL_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(control_config(parameters))
    shutil.copy2(Path(sources_root or default_sources_root()) / CONTROL_SOURCE / "model.py", folder / "1" / "model.py")
    return folder


__all__ = ["COMMANDS", "CONTROL_MODEL", "LiveAdapterControl",
           "control_config", "write_control_model"]

"""The LoRA registry: one folder, one sub-folder per adapter (the folder name is the adapter name).

Everything that reads the registry folder lives here: the name rules, the scan, the checked
lookup of one adapter folder, and :class:`LoraRegistry`, the snapshot a build or the in-process
pipeline serves (names, folders, strengths). Live adapters (``torch`` runtime) are loaded from
the same folder while the server runs; the commands doing that are
:class:`~.live_control.LiveAdapterControl`, which keeps no registry of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from acestep_client.params import ParamError, echo

from .files import _NAME_RE, NO_LORA, SERVING_FILE, VARIANT_SEPARATOR, LoraError, _read_json, adapter_file

MAX_ADAPTER_NAME_CHARS = 100
"""Longest adapter (folder) name: well below a file name's 255 bytes (a longer name would reach
the file system as ENAMETOOLONG) and short enough to sit in model names and error messages."""


def check_adapter_name(name: str) -> str:
    """A served adapter name: letters, digits, ``_`` and ``-`` (it becomes part of model names),
    not ``none``, without the ``__`` separator, at most :data:`MAX_ADAPTER_NAME_CHARS` long.
    The error quotes at most the start of a refused name (:func:`~acestep_client.params.echo`)."""
    if len(name) > MAX_ADAPTER_NAME_CHARS:
        raise ValueError(f"LoRA adapter name {echo(name)} is too long: at most {MAX_ADAPTER_NAME_CHARS} "
                         "characters")
    if not _NAME_RE.match(name) or VARIANT_SEPARATOR in name or name.lower() == NO_LORA:
        raise ValueError(f"invalid LoRA adapter name {echo(name)}: use letters, digits, '_' and '-' (not "
                         f"'{VARIANT_SEPARATOR}', not '{NO_LORA}')")
    return name


def is_valid_adapter_name(name: str) -> bool:
    """Whether ``name`` passes :func:`check_adapter_name`."""
    try:
        check_adapter_name(name)
    except ValueError:
        return False
    return True


def is_no_lora(name: str | None) -> bool:
    """Whether a ``lora_name_or_path`` value asks for no adapter (``none``, any case, or empty)."""
    return name is None or name.strip() == "" or name.strip().lower() == NO_LORA


def check_weight_range(weight: float) -> float:
    """The schema's bounds for ``lora_weight`` (-3..3), checked for weights configured on the server."""
    weight = float(weight)
    if not math.isfinite(weight) or not -3.0 <= weight <= 3.0:
        raise ValueError(f"lora_weight {weight} is outside [-3, 3]")
    return weight


def adapter_folders(root: Path) -> list[Path]:
    """The sub-folders of a registry that may hold an adapter, sorted by name (hidden ones, such
    as an editor's or a sync tool's, are skipped)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_names(root: Path) -> list[str]:
    """Names of the registry's adapter folders as they are now (valid names only; none when the
    folder does not exist): what a live ``load`` accepts. Unlike :meth:`LoraRegistry.from_dir`,
    nothing is refused here: a bad folder only fails when it is loaded."""
    if not root.is_dir():
        return []
    return [folder.name for folder in adapter_folders(root) if is_valid_adapter_name(folder.name)]


def registry_folder(root: Path, name: str) -> Path:
    """The folder of adapter ``name``, checked: a valid name, present, and really inside the
    registry (a symlink to a folder elsewhere is refused, so a request can never make the
    server read outside it). :class:`ParamError` on ``lora_name_or_path`` otherwise."""
    try:
        check_adapter_name(name)
    except ValueError as e:
        raise ParamError("lora_name_or_path", str(e)) from None
    folder = root / name
    real_root = root.resolve()
    try:
        present = folder.is_dir()
        real = folder.resolve()
    except OSError as e:
        raise ParamError("lora_name_or_path", f"adapter folder {folder} cannot be read ({e.strerror})") from None
    if not present:
        have = ", ".join(folder_names(root)) or "none"
        raise ParamError("lora_name_or_path", f"no adapter folder {name!r} in the LoRA registry {root} "
                                              f"(it holds: {have})")
    if real.parent != real_root:
        raise ParamError("lora_name_or_path", f"adapter folder {folder} leads to {real}, outside the LoRA "
                                              f"registry {real_root}: copy the adapter into the registry instead "
                                              "of linking it")
    return folder


@dataclass(frozen=True)
class LoraRegistry:
    """The adapters a deployment serves: name → adapter folder, and the strength each is served at.

    :meth:`from_dir` reads one sub-folder per adapter (the folder name is the adapter name), each
    holding ``pytorch_lora_weights.safetensors`` and optionally ``serving.json``
    (``{"lora_weight": 0.8}``, default 1.0).
    """

    adapters: Mapping[str, Path]
    weights: Mapping[str, float] = field(default_factory=dict)
    root: Path | None = None

    @classmethod
    def from_dir(cls, root: str | Path, weights: Mapping[str, float] | None = None) -> LoraRegistry:
        """Scan ``root``; ``weights`` override the ``serving.json`` strengths by adapter name.
        Errors name the folder (a misconfigured deployment fails at build time, not per request)."""
        root = Path(root)
        if not root.is_dir():
            raise LoraError(f"LoRA folder {root} does not exist")
        adapters: dict[str, Path] = {}
        strengths: dict[str, float] = {}
        for folder in adapter_folders(root):
            try:
                name = check_adapter_name(folder.name)
            except ValueError as e:
                raise LoraError(f"{folder}: {e}") from None
            adapter_file(folder)  # raises, naming the folder, when it holds no adapter
            adapters[name] = folder
            strength = 1.0
            if (folder / SERVING_FILE).is_file():
                strength = _read_json(folder / SERVING_FILE).get("lora_weight", 1.0)
            try:
                strengths[name] = check_weight_range(strength)
            except (TypeError, ValueError) as e:
                raise LoraError(f"{folder / SERVING_FILE}: {e}") from None
        for name, strength in (weights or {}).items():
            if name not in adapters:
                raise LoraError(f"weights: no adapter {name!r} in {root} (have {', '.join(adapters) or 'none'})")
            strengths[name] = check_weight_range(strength)
        return cls(adapters=adapters, weights=strengths, root=root)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapters)

    def weight(self, name: str) -> float:
        """The strength ``name`` is served at (1.0 unless configured)."""
        return float(self.weights.get(name, 1.0))

    def resolve(self, name: str | None) -> Path | None:
        """The adapter folder for a request's ``lora_name_or_path``; None for ``none``.

        Unknown names (and file-system paths: a server never loads files a request names) raise
        :class:`ParamError` on ``lora_name_or_path``, listing what is served.
        """
        if is_no_lora(name):
            return None
        assert name is not None
        key = name.strip()
        if key in self.adapters:
            return self.adapters[key]
        served = ", ".join(self.adapters) if self.adapters else "no adapters are configured"
        raise ParamError("lora_name_or_path", f"unknown LoRA adapter {echo(name)}; this server serves: {served} "
                                              f"(or '{NO_LORA}')")


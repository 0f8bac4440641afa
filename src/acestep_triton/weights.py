"""Weights files and strict loading that never holds a file and a random model at once.

Why this module exists: the 3.5B transformer is 7.7 GB of bf16 on disk and 14 GB in fp32. The
obvious way to load it (construct the module with random init, read the file, copy, cast) costs
a minute of random init on the CPU, and a process briefly holds the module plus the file plus a
cast copy. Serving loads the transformer twice in parallel (condition encoder and DiT decoder),
each needing only half of it. So here:

* :class:`SafetensorsFile` reads the safetensors header and then one tensor at a time with plain
  positioned reads (``os.pread``). Nothing is memory-mapped: pages of a mapped file count in the
  process's RSS for as long as the mapping lives, which would put the whole file on top of the
  model at the peak of a load. The page cache still serves repeated reads.
* :func:`materialize` builds the module on PyTorch's ``meta`` device (shapes only, no memory,
  no init), checks every key and shape against the file's header exactly as strictly as before,
  drops the submodules the caller does not serve, and then creates each remaining parameter from
  the file, cast to the target dtype tensor by tensor. Peak memory is the kept weights plus one
  tensor in its stored dtype.

The module imports nothing from the rest of the package, so model modules, the checkpoint
layout and LoRA code can all use it without import cycles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, or whose tensors do not fit the model built from it."""


DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""The safetensors dtype names this reader accepts."""

MAX_HEADER_BYTES = 100 * 2**20
"""A header larger than this is refused before it is read (the format's own reference limit);
a corrupt length field would otherwise make us allocate whatever it says."""


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A ``.safetensors`` file as a read-only mapping: the header is parsed once, each tensor is
    read from disk when asked (a fresh CPU tensor that owns its memory, in the stored dtype).

    The header is validated against the file size, so a truncated or corrupt file fails here
    with :class:`CheckpointError` naming the file, not later with a bus error or a garbage tensor.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: missing")
        self._entries, self._data_start, self._metadata = _read_header(self.path)
        self._buffer: torch.Tensor | None = None
        self._keys = tuple(self._entries)

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (string to string; empty when there is none): where
        adapter files keep their ``LoraConfig`` (``lora_adapter_metadata``)."""
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (nothing is read)."""
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype, from the header."""
        return self._entry(key)[0]

    def nbytes(self, key: str | None = None) -> int:
        """Bytes of one tensor's data, or of every tensor's (``key=None``)."""
        if key is not None:
            start, end = self._entry(key)[2]
            return end - start
        return sum(end - start for _, _, (start, end) in self._entries.values())

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(key) from None

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key``, cast to ``dtype`` when given (the stored bytes are read once)."""
        stored, shape, (start, end) = self._entry(key)
        cast = dtype is not None and dtype != stored
        # A cast reads through one reused staging buffer (sized for the file's largest tensor):
        # a fresh buffer per tensor would page-fault the whole file's size once more and leave
        # the freed buffers as holes in the C heap.
        raw = self._staging(end - start) if cast else torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            view = memoryview(raw.numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._data_start + start)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise CheckpointError(f"{self.path}: {key}: file ends inside the tensor's data")
                    done += n
        tensor = raw.view(stored).reshape(shape)
        return tensor.to(dtype) if cast else tensor

    def _staging(self, nbytes: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < nbytes:
            largest = max((end - start for _, _, (start, end) in self._entries.values()), default=0)
            self._buffer = torch.empty(max(nbytes, largest), dtype=torch.uint8)
        return self._buffer[:nbytes]

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors now (``POSIX_FADV_WILLNEED``), so a cold
        disk reads ahead while earlier tensors are being cast; a hint, a no-op where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        ranges = sorted(self._entry(k)[2] for k in keys)
        with open(self.path, "rb", buffering=0) as f:
            for start, end in ranges:
                if end > start:
                    os.posix_fadvise(f.fileno(), self._data_start + start, end - start, os.POSIX_FADV_WILLNEED)

    def release(self) -> None:
        """Drop the staging buffer of cast reads (the next cast read allocates it again)."""
        self._buffer = None

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _read_header(path: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]], int,
                                       dict[str, str]]:
    """``{key: (dtype, shape, (start, end))}``, the offset of the data section and the
    ``__metadata__`` entry (string to string, as the format defines it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {length} does not fit "
                                  f"a {size}-byte file)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start, data_size = 8 + length, size - 8 - length
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]] = {}
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry ({e!r})") from e
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or not 0 <= start <= end <= data_size \
                or end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r}: offsets {start}..{end} do not hold "
                                  f"{list(shape)} {info['dtype']} within the file's {data_size} data bytes")
        entries[key] = (dtype, shape, (start, end))
    return entries, data_start, {str(k): v for k, v in metadata.items()}


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """The tensors of a ``.safetensors`` file (CPU, stored dtype), read lazily key by key."""
    return SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------
# Strict key matching


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.search(key) for p in compiled)


def _file_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if isinstance(state, SafetensorsFile):
        return state.shape(key)  # from the header, without reading the tensor
    return tuple(state[key].shape)


def match_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               unused: Sequence[str] = (), what: str = "model", *,
               tied: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{module key: file key}`` for every entry of ``expected`` (a module's ``state_dict``, on
    any device, meta included), or one :class:`CheckpointError` naming every missing, unexpected
    and misshapen key (prefixed by ``what``).

    ``unused`` are regular expressions (``re.search``) of keys that may be present in the file
    and/or the module without a counterpart; ``tied`` maps a module key to the file key it shares
    storage with (stored once).
    """
    is_unused = _matcher(unused)
    file_keys = set(state.keys())
    source_of = {k: k for k in expected if k in file_keys}
    for dst, src in (tied or {}).items():
        if dst in expected and dst not in file_keys and src in file_keys:
            source_of[dst] = src
    missing = sorted(k for k in expected if k not in source_of and not is_unused(k))
    unexpected = sorted(k for k in file_keys if k not in expected and not is_unused(k))
    mismatched = sorted(
        f"{k}: checkpoint {_file_shape(state, src)} vs model {tuple(expected[k].shape)}"
        for k, src in source_of.items() if _file_shape(state, src) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = [f"{what}: checkpoint does not match the model built from its config"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                parts.append(f"{title} ({len(keys)}):\n    " + "\n    ".join(keys))
        raise CheckpointError("\n  ".join(parts))
    return source_of


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           unused: Sequence[str] = (), what: str = "model", *,
                           tied: Mapping[str, str] | None = None) -> None:
    """Copy ``state_dict`` into the existing parameters of ``module``, casting each tensor to the
    parameter's dtype, after :func:`match_keys` found every key in place (so a wrong file never
    half-overwrites the module). For loading a checkpoint from scratch use :func:`materialize`,
    which skips building the module's random init."""
    expected = module.state_dict()  # detached views of the parameters and buffers
    source_of = match_keys(expected, state_dict, unused, what, tied=tied)
    with torch.no_grad():
        for key, src in source_of.items():
            expected[key].copy_(state_dict[src])


# ---------------------------------------------------------------------------------------------
# Loading onto the meta device


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")
"""The ``torch.nn.init`` functions that modules' ``reset_parameters`` call while they are built."""


def _skipping_meta(init: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(init)
    def run(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return run


@contextlib.contextmanager
def _no_init_on_meta() -> Iterator[None]:
    """Random initialisation of meta tensors skipped. It draws nothing there, but the first one
    (``nn.Embedding``'s ``normal_``) goes through ``torch._refs``, whose wrapper imports
    ``torch._dynamo``: 1.5 s of every component process's start-up (measured on torch 2.13).
    Tensors on any other device are initialised as ever, so another thread building a real
    model meanwhile is unaffected."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name, init in saved.items():
        setattr(nn.init, name, _skipping_meta(init))
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with every parameter and buffer on the meta device: shapes, no memory, no init."""
    with torch.device("meta"), _no_init_on_meta():
        return factory()


def drop_submodules(module: nn.Module, names: Iterable[str]) -> None:
    """Replace the named direct submodules by ``None`` (the code paths a component never runs)."""
    for name in names:
        if not isinstance(getattr(module, name, None), nn.Module):
            raise AttributeError(f"{type(module).__name__} has no submodule {name!r} to drop")
        setattr(module, name, None)


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = key.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def materialize(factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor],
                unused: Sequence[str] = (), what: str = "model", *, dtype: torch.dtype = torch.float32,
                tied: Mapping[str, str] | None = None, drop: Sequence[str] = (), root: str = "") -> nn.Module:
    """Build ``factory()``'s module and fill it from ``state`` without ever random-initialising it.

    1. The module is built on the meta device and its whole ``state_dict`` is matched against the
       file's keys and shapes (:func:`match_keys`: as strict as loading the whole module).
    2. ``drop`` names top-level submodules to leave out (``None`` after loading); their tensors are
       never read.
    3. Each remaining parameter and buffer is read from the file and cast to ``dtype`` (floating
       tensors; others keep the module's dtype), one tensor at a time. Tied parameters (one object
       under several names) are read once and stay one object.

    ``root`` names the submodule whose keys the file holds (the whole module by default), for a
    module that wraps the checkpoint's model. The result is in eval mode without gradients.
    Anything still on the meta device afterwards (a parameter the file cannot fill) is an error
    naming it.
    """
    whole = build_on_meta(factory)
    module = whole.get_submodule(root) if root else whole
    source_of = match_keys(module.state_dict(), state, unused, what, tied=tied)
    drop_submodules(module, drop)
    if isinstance(state, SafetensorsFile):
        kept = module.state_dict()
        state.prefetch({src for key, src in source_of.items() if key in kept})
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    with torch.no_grad():
        for names in groups.values():
            src = next((source_of[n] for n in names if n in source_of), None)
            if src is None:
                continue
            owner, leaf = _owner(module, names[0])
            meta = getattr(owner, leaf)
            value = nn.Parameter(_read_as(state, src, meta, dtype), requires_grad=False)
            for name in names:
                owner, leaf = _owner(module, name)
                setattr(owner, leaf, value)
        for name, buffer in list(module.named_buffers(remove_duplicate=False)):
            if name in source_of:  # also buffers built off meta (e.g. from numpy): the file wins
                owner, leaf = _owner(module, name)
                owner._buffers[leaf] = _read_as(state, source_of[name], buffer, dtype)
    if isinstance(state, SafetensorsFile):
        state.release()
    left = [n for n, t in (*whole.named_parameters(), *whole.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: no weights in the checkpoint for: {', '.join(left)}")
    whole.eval()
    whole.requires_grad_(False)
    return whole


def _read_as(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    target = dtype if like.is_floating_point() else like.dtype
    if isinstance(state, SafetensorsFile):
        return state.read(key, target)
    return state[key].detach().to(dtype=target, copy=True)


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks: the identity of a weights file (an ONNX export
    an engine was built from, an adapter a registry loaded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()

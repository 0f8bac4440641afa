"""Runtime adapters: one copy of the base weights, each batch row with its own adapter and strength.

Fused variants (:mod:`.variants`) cost a full copy of every touched component per adapter and
strength. Here the transformer half of a ``condition_encoder`` / ``dit_decoder`` instance keeps
only the checkpoint's weights, and every adapted projection adds, for the rows that asked for it,

    y = W x + b + s_row * (B (A x) + b_B),    s_row = lora_weight_row * scaling

with ``scaling`` exactly as :func:`~.files.load_lora` computes it (upstream's by default), which is
the same function as fusing ``W + s B A`` (:func:`~.fuse.apply_lora`) up to fp32 re-association.

Rows are grouped by adapter: a group gathers its rows' inputs, runs the two thin matmuls and adds
the result back at those rows (``index_add``), so rows of other adapters, and rows without one
(``lora_index`` -1 or ``lora_weight`` 0, which are therefore exactly the base model), cost
nothing; a batch where no row has an adapter runs the plain model (no hook is even registered).
The term is added by forward hooks on the adapted modules, registered for the duration of one
call, so the model's code and its ``state_dict`` stay the checkpoint's.

A module whose weight the model uses without calling it (the GLU-MBConv's 1x1 convolutions go
through ``F.linear`` on the weight) cannot take a hook; :class:`AdapterBank` finds the modules
that are really called once, by a probe forward, and refuses adapters that touch any other,
naming the keys (such an adapter can still be served fused).

:class:`AdapterBank` is the per-instance cache: adapters are read from the files the state file
lists (:mod:`.state`) on first use, kept on the instance's device in its dtype, and evicted least
recently used beyond a byte budget (the adapters one batch needs stay, even above the budget).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from acestep_client.params import ParamError

from .files import LoraAdapter, LoraError, _target_shape, component_of, load_lora
from .state import NO_ADAPTER, LoadedAdapter, StateReader


@dataclass(frozen=True)
class RuntimeLayer:
    """One adapted projection, ready to apply: ``down`` [r, in], ``up`` [out, r] on the device."""

    down: Tensor
    up: Tensor
    scaling: float
    bias: Tensor | None = None
    conv: bool = False
    """A 1x1 ``Conv1d`` (channels on dim 1) rather than a ``Linear`` (features last)."""

    def delta(self, x: Tensor) -> Tensor:
        """``B (A x) + b_B`` for the rows in ``x`` (scaling not applied)."""
        if self.conv:
            x = x.transpose(1, 2)
        out = F.linear(F.linear(x, self.down), self.up, self.bias)
        return out.transpose(1, 2) if self.conv else out


@dataclass(frozen=True)
class RuntimeAdapter:
    """The layers of one adapter that one component runs, resident on the component's device."""

    name: str
    index: int
    sha256: str
    layers: Mapping[str, RuntimeLayer]

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers.values() for t in (layer.down, layer.up, layer.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def component_part(adapter: LoraAdapter, component: str) -> LoraAdapter:
    """The adapter restricted to the layers that run in ``component``."""
    return dataclasses.replace(adapter, layers={p: layer for p, layer in adapter.layers.items()
                                                if component_of(p) == component})


def runtime_adapter(adapter: LoraAdapter, component: str, module: nn.Module, *, index: int = 0,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    reachable: set[str] | None = None) -> RuntimeAdapter:
    """Check ``adapter``'s layers of ``component`` against ``module`` (its transformer half) and
    put them on ``device`` in ``dtype``. :class:`LoraError` names every key that does not fit,
    including layers a hook cannot reach (not in ``reachable``, when given)."""
    part = component_part(adapter, component)
    targets = part.check(module)
    if reachable is not None:
        unreachable = [", ".join(part.layers[p].keys) or p for p in targets if p not in reachable]
        if unreachable:
            raise LoraError(f"LoRA {adapter.path}: {len(unreachable)} key(s) adapt modules whose weights "
                            f"{component} uses without calling them, so a runtime adapter cannot reach them "
                            "(serve this adapter fused instead):\n  " + "\n  ".join(unreachable))
    layers = {}
    for path, layer in part.layers.items():
        def put(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        layers[path] = RuntimeLayer(down=put(layer.down), up=put(layer.up), scaling=layer.scaling,  # type: ignore[arg-type]
                                    bias=put(layer.bias), conv=isinstance(targets[path], nn.Conv1d))
    return RuntimeAdapter(name=adapter.name, index=index, sha256=adapter.sha256, layers=layers)


@dataclass(frozen=True)
class RowGroup:
    """The rows of one call that use one adapter: ``rows`` (None: every row) and their strengths."""

    adapter: RuntimeAdapter
    rows: Tensor | None
    weights: Tensor


def group_rows(index: Sequence[int], weights: Sequence[float]) -> dict[int, tuple[list[int], list[float]]]:
    """``{adapter index: (rows, lora_weights)}``; rows without adapter (index < 0, weight 0) left out."""
    groups: dict[int, tuple[list[int], list[float]]] = {}
    for row, (i, w) in enumerate(zip(index, weights, strict=True)):
        if i < 0 or w == 0:
            continue
        rows, ws = groups.setdefault(int(i), ([], []))
        rows.append(row)
        ws.append(float(w))
    return groups


def _hook(path: str, groups: Sequence[RowGroup]) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        for group in groups:
            layer = group.adapter.layers.get(path)
            if layer is None:
                continue
            rows = x if group.rows is None else x.index_select(0, group.rows)
            delta = layer.delta(rows.to(layer.down.dtype))
            scale = (group.weights * layer.scaling).to(delta.dtype).reshape(-1, *([1] * (delta.dim() - 1)))
            delta = (delta * scale).to(output.dtype)
            output = output + delta if group.rows is None else output.index_add(0, group.rows, delta)
        return output

    return hook


@contextlib.contextmanager
def lora_rows(module: nn.Module, groups: Sequence[RowGroup]) -> Iterator[None]:
    """Add each group's low-rank term to its rows in every call of ``module`` inside the block."""
    paths = sorted({p for g in groups for p in g.adapter.layers})
    handles = [module.get_submodule(p).register_forward_hook(_hook(p, groups)) for p in paths]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def called_modules(module: nn.Module, run: Callable[[], Any]) -> set[str]:
    """Paths of the adaptable layers (``Linear``, 1x1 ``Conv1d``) that ``run()`` really calls."""
    seen: set[str] = set()
    handles = []
    for name, sub in module.named_modules():
        if name and _target_shape(sub) is not None:
            handles.append(sub.register_forward_hook(lambda m, a, o, name=name: seen.add(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


class AdapterBank:
    """Adapters resident in one component instance (module docstring): resolve, cache, apply.

    ``module`` is the instance's transformer half, ``reachable`` the layers its forward calls
    (:func:`called_modules`). ``budget_bytes`` bounds the resident A/B tensors; ``status_file``,
    when given, is rewritten whenever the resident set changes (what ``list_loras`` reports).
    """

    def __init__(self, component: str, module: nn.Module, state: StateReader, *, reachable: set[str],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 budget_bytes: int = 2 << 30, status_file: str | Path | None = None,
                 model_name: str | None = None) -> None:
        self.component = component
        self.module = module
        self.state = state
        self.reachable = reachable
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = int(budget_bytes)
        self.status_file = Path(status_file) if status_file is not None else None
        self.model_name = model_name or component
        self._resident: OrderedDict[int, RuntimeAdapter] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return [a.name for a in self._resident.values()]

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values())

    def _entry(self, index: int) -> LoadedAdapter:
        entry = self.state.current().by_index(index)
        if entry is None:
            raise ParamError("lora_name_or_path", f"adapter #{index} is not loaded on this server (unloaded "
                                                  "while the request ran?); list them with list_loras()")
        return entry

    def adapter(self, index: int) -> RuntimeAdapter:
        """The resident adapter for ``index``, loaded from its file on first use."""
        cached = self._resident.get(index)
        if cached is not None:
            self._resident.move_to_end(index)
            return cached
        entry = self._entry(index)
        try:
            adapter = load_lora(entry.file, scaling=entry.scaling, name=entry.name)
            loaded = runtime_adapter(adapter, self.component, self.module, index=index, device=self.device,
                                     dtype=self.dtype, reachable=self.reachable)
        except LoraError as e:
            raise ParamError("lora_name_or_path", f"adapter {entry.name!r}: {e}") from e
        self._resident[index] = loaded
        self.loads += 1
        return loaded

    def _evict(self, keep: set[int]) -> None:
        for index in list(self._resident):
            if self.resident_bytes <= self.budget_bytes:
                break
            if index not in keep:
                del self._resident[index]
                self.evictions += 1

    def _forget_unloaded(self) -> None:
        """Drop adapters the control model unloaded (their index is no longer in the state)."""
        state = self.state.current()
        live = {a.index for a in state.loaded.values()}
        for index in [i for i in self._resident if i not in live]:
            del self._resident[index]

    def groups(self, index: Tensor, weights: Tensor) -> list[RowGroup]:
        """The row groups of one call from its ``lora_index`` / ``lora_scale`` rows."""
        before = (tuple(self._resident), self.resident_bytes)
        self._forget_unloaded()
        by_adapter = group_rows(index.reshape(-1).tolist(), weights.reshape(-1).tolist())
        batch = int(index.numel())
        groups = []
        for i, (rows, ws) in by_adapter.items():
            adapter = self.adapter(i)
            row_tensor = None if rows == list(range(batch)) else torch.tensor(rows, device=self.device)
            groups.append(RowGroup(adapter=adapter, rows=row_tensor,
                                   weights=torch.tensor(ws, dtype=torch.float32, device=self.device)))
        self._evict(keep=set(by_adapter))
        if (tuple(self._resident), self.resident_bytes) != before:
            self.write_status()
        return groups

    def write_status(self) -> None:
        """Record the resident set for the control model's listing (best effort)."""
        if self.status_file is None:
            return
        status = {"model": self.model_name, "component": self.component, "pid": os.getpid(),
                  "resident": self.resident, "resident_bytes": self.resident_bytes,
                  "budget_bytes": self.budget_bytes, "loads": self.loads, "evictions": self.evictions,
                  "updated": time.time()}
        with contextlib.suppress(OSError):
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
            tmp.write_text(json.dumps(status, indent=2) + "\n")
            os.replace(tmp, self.status_file)

    @contextlib.contextmanager
    def apply(self, index: Tensor | None, weights: Tensor | None) -> Iterator[bool]:
        """Run the block with the rows' adapters applied; yields whether any row has one."""
        if index is None or weights is None:
            yield False
            return
        groups = self.groups(index, weights)
        if not groups:
            yield False
            return
        with lora_rows(self.module, groups):
            yield True


def parse_budget_mb(value: str | float | None, default_mb: float = 2048.0) -> int:
    """The ``lora_memory_mb`` config parameter in bytes (empty: ``default_mb``)."""
    text = str(value if value is not None else "").strip()
    mb = float(text) if text else default_mb
    if not mb > 0:
        raise ValueError(f"config parameter lora_memory_mb must be > 0, got {value!r}")
    return int(mb * 2**20)


__all__ = ["NO_ADAPTER", "AdapterBank", "RowGroup", "RuntimeAdapter", "RuntimeLayer", "called_modules",
           "component_part", "group_rows", "lora_rows", "parse_budget_mb", "runtime_adapter"]

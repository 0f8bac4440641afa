"""Live adapters: one copy of the base weights, each batch row with its own adapter and strength.

"Live" because they are loaded and unloaded while the server runs (:mod:`.live_control`) and
applied per request, as opposed to fused variants, which are baked into exported models.

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

The fast path (:class:`AdapterStack`, a DiT decoder with TorchInductor-compiled blocks or CUDA
graphs): hooks registered per call and row groups of data-dependent size are exactly what a
compiled graph or a captured CUDA graph cannot follow. So there the resident adapters live in
static tensors instead: per adapted projection a fixed-capacity, zero-padded stack of A [slots,
R, in] and B [slots, out, R] (non-persistent buffers on the projection module, so the
``state_dict`` stays the checkpoint's), and one forward hook, registered once, adds

    y += (s_row * scaling[slot_row]) * B[slot_row] (A[slot_row] x_row)

for every row, gathered by the per-row ``slot`` and ``scale`` tensors of the call (rows without
an adapter get scale 0, which adds exact zeros). Those two tensors are the only per-call
inputs, so the compiled blocks trace the term once and a CUDA graph captures it once per shape;
loading an adapter into a free slot writes into the same tensors and needs neither. Only a layout
change (a projection not stacked yet, a larger rank, more slots) makes new tensors, after which
the compiled code recompiles once and the runner re-captures its graphs. Cost: every row of an
adapter batch pays for the thin matmuls at rank R, and the stack holds every block's projection
at rank R for each slot (a projection adapted in one DiT block is stacked for all of them, so
that one compiled block still serves every block).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
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

from .files import LoraAdapter, LoraError, component_of, load_lora, target_shape
from .state import NO_ADAPTER, LoadedAdapter, StateReader


@dataclass(frozen=True)
class LiveLayer:
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
class LiveAdapter:
    """The layers of one adapter that one component runs, resident on the component's device."""

    name: str
    index: int
    sha256: str
    layers: Mapping[str, LiveLayer]

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers.values() for t in (layer.down, layer.up, layer.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def component_part(adapter: LoraAdapter, component: str) -> LoraAdapter:
    """The adapter restricted to the layers that run in ``component``."""
    return dataclasses.replace(adapter, layers={p: layer for p, layer in adapter.layers.items()
                                                if component_of(p) == component})


def live_adapter(adapter: LoraAdapter, component: str, module: nn.Module, *, index: int = 0,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    reachable: set[str] | None = None) -> LiveAdapter:
    """Check ``adapter``'s layers of ``component`` against ``module`` (its transformer half) and
    put them on ``device`` in ``dtype``. :class:`LoraError` names every key that does not fit,
    including layers a hook cannot reach (not in ``reachable``, when given)."""
    part = component_part(adapter, component)
    targets = part.check(module)
    if reachable is not None:
        unreachable = [", ".join(part.layers[p].keys) or p for p in targets if p not in reachable]
        if unreachable:
            raise LoraError(f"LoRA {adapter.path}: {len(unreachable)} key(s) adapt modules whose weights "
                            f"{component} uses without calling them, so a live adapter cannot reach them "
                            "(serve this adapter fused instead):\n  " + "\n  ".join(unreachable))
    layers = {}
    for path, layer in part.layers.items():
        def put(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        layers[path] = LiveLayer(down=put(layer.down), up=put(layer.up), scaling=layer.scaling,  # type: ignore[arg-type]
                                    bias=put(layer.bias), conv=isinstance(targets[path], nn.Conv1d))
    return LiveAdapter(name=adapter.name, index=index, sha256=adapter.sha256, layers=layers)


@dataclass(frozen=True)
class RowGroup:
    """The rows of one call that use one adapter: ``rows`` (None: every row) and their strengths."""

    adapter: LiveAdapter
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
        if name and target_shape(sub) is not None:
            handles.append(sub.register_forward_hook(lambda m, a, o, name=name: seen.add(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


class RowSelection:
    """The per-row ``slot`` / ``scale`` of the current call, read by the stack's hooks.

    One object per stack, referenced by every stacked projection (``module.lora_rows``): the hook
    reads the call's rows from it instead of closing over them, so the same hook function, and
    the same compiled block, serves every call and every block. ``active`` False (a batch
    without adapter rows) skips the term entirely.
    """

    def __init__(self) -> None:
        self.active = False
        self.slot: Tensor | None = None
        self.scale: Tensor | None = None

    @contextlib.contextmanager
    def use(self, slot: Tensor, scale: Tensor) -> Iterator[None]:
        """Within the block, stacked projections add each row's adapter term."""
        self.slot, self.scale, self.active = slot, scale, True
        try:
            yield
        finally:
            self.slot, self.scale, self.active = None, None, False


def _stacked_delta(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook of a stacked projection: add ``scale_row * scaling[slot] * B[slot] A[slot] x``.

    One function object for every module (everything it needs is read from ``module``): dynamo
    guards on the hook's identity, so distinct closures would compile each block separately.
    Static shapes only (gathers and batched matmuls over all rows), so it compiles and captures.
    It is registered on every reachable projection when the stack is made, before anything is
    compiled: dynamo does not notice hooks added later (``skip_nnmodule_hook_guards``), while a
    buffer going from None to a tensor is guarded, so stacking a new path recompiles correctly.
    """
    rows: RowSelection = module.lora_rows
    if not rows.active or module.lora_down is None:  # no row has an adapter / path not stacked
        return output
    x = args[0]
    if module.lora_conv:
        x = x.transpose(1, 2)  # [B, C, L] -> [B, L, C]: features last, like a Linear
    down, up = module.lora_down, module.lora_up
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(down.dtype)
    delta = torch.bmm(torch.bmm(flat, down.index_select(0, rows.slot).transpose(1, 2)),
                      up.index_select(0, rows.slot).transpose(1, 2))
    if module.lora_bias is not None:
        delta = delta + module.lora_bias.index_select(0, rows.slot)[:, None]
    scale = (rows.scale * module.lora_scaling.index_select(0, rows.slot)).to(delta.dtype)
    delta = delta * scale[:, None, None]
    if module.lora_conv:
        delta = delta.transpose(1, 2)
    return output + delta.reshape(output.shape).to(output.dtype)


_BLOCK_PATH = re.compile(r"^transformer_blocks\.\d+\.(.+)$")


@dataclass
class _Slot:
    """What one stack slot holds: the adapter's index and, per path, (rank, scaling, has bias)."""

    index: int
    layers: dict[str, tuple[int, float, bool]]


class AdapterStack:
    """Resident adapters as fixed-capacity padded A/B stacks on the adapted modules (module docstring).

    ``module`` is the transformer half, ``reachable`` the projections its forward calls. The
    layout (stacked paths, rank ``rank``, capacity ``slots``) only grows; each growth bumps
    ``generation``, which tells a runner that compiled code and captured graphs read tensors
    that are gone. :meth:`place` and :meth:`free` otherwise write into the existing tensors.
    """

    BUFFERS = ("lora_down", "lora_up", "lora_scaling", "lora_bias")

    def __init__(self, module: nn.Module, reachable: set[str], *, slots: int = 4,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if slots < 1:
            raise ValueError(f"config parameter lora_slots must be >= 1, got {slots}")
        self.module = module
        self.reachable = reachable
        self.device = torch.device(device)
        self.dtype = dtype
        self.slots = int(slots)
        self.rank = 0
        self.layout: dict[str, bool] = {}
        """Stacked path -> whether it has a bias stack."""
        self.generation = 0
        self.rows = RowSelection()
        self._occupants: list[_Slot | None] = [None] * self.slots
        self._handles: dict[str, Any] = {}
        for path in sorted(reachable):
            sub = module.get_submodule(path)
            if target_shape(sub) is None:
                continue
            for name in self.BUFFERS:
                sub.register_buffer(name, None, persistent=False)
            sub.lora_rows = self.rows
            sub.lora_conv = isinstance(sub, nn.Conv1d)
            self._handles[path] = sub.register_forward_hook(_stacked_delta)

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked tensors (padded, all slots)."""
        total = 0
        for path in self.layout:
            sub = self.module.get_submodule(path)
            for name in self.BUFFERS:
                t = getattr(sub, name, None)
                total += 0 if t is None else t.numel() * t.element_size()
        return total

    def slot_of(self, index: int) -> int | None:
        """The slot holding adapter ``index``, or None."""
        return next((k for k, o in enumerate(self._occupants) if o is not None and o.index == index), None)

    @property
    def full(self) -> bool:
        return all(o is not None for o in self._occupants)

    def _siblings(self, path: str) -> list[str]:
        """``path`` and, for a DiT block projection, the same projection in every block (reachable
        ones): all compiled blocks then see the same module structure and share one graph."""
        match = _BLOCK_PATH.match(path)
        blocks = getattr(self.module, "transformer_blocks", None)
        if match is None or blocks is None:
            return [path]
        return [p for i in range(len(blocks))
                if (p := f"transformer_blocks.{i}.{match.group(1)}") in self.reachable or p == path]

    def _relayout(self, paths: dict[str, bool], rank: int, slots: int) -> None:
        """New, larger stacks: the old contents copied in, hooks on newly stacked paths."""
        for path, bias in paths.items():
            sub = self.module.get_submodule(path)
            shape = target_shape(sub)
            assert shape is not None, path
            out_features, in_features = shape
            old = {name: getattr(sub, name, None) for name in self.BUFFERS}
            kw = {"device": self.device, "dtype": self.dtype}
            down = torch.zeros(slots, rank, in_features, **kw)
            up = torch.zeros(slots, out_features, rank, **kw)
            scaling = torch.zeros(slots, device=self.device, dtype=torch.float32)
            bias_stack = torch.zeros(slots, out_features, **kw) if bias else None
            if old["lora_down"] is not None:
                n, r = old["lora_down"].shape[:2]
                down[:n, :r] = old["lora_down"]
                up[:n, :, :r] = old["lora_up"]
                scaling[:n] = old["lora_scaling"]
                if bias_stack is not None and old["lora_bias"] is not None:
                    bias_stack[:n] = old["lora_bias"]
            for name, tensor in zip(self.BUFFERS, (down, up, scaling, bias_stack), strict=True):
                sub.register_buffer(name, tensor, persistent=False)
        self._occupants.extend([None] * (slots - self.slots))
        self.layout, self.rank, self.slots = paths, rank, slots
        self.generation += 1

    def place(self, adapter: LiveAdapter) -> LiveAdapter:
        """Write ``adapter`` into a free slot (growing the layout if it does not fit) and return it
        with its layers as views into the stack, so its tensors are not held twice."""
        with torch.inference_mode():  # like every call's tensors: updated in place inside requests
            return self._place(adapter)

    def _place(self, adapter: LiveAdapter) -> LiveAdapter:
        paths = dict(self.layout)
        for path, layer in adapter.layers.items():
            for sibling in self._siblings(path):  # siblings get a bias stack too: one structure
                paths[sibling] = paths.get(sibling, False) or layer.bias is not None
        rank = max([self.rank, *(int(layer.down.shape[0]) for layer in adapter.layers.values())])
        slots = self.slots * 2 if self.full else self.slots
        if paths != self.layout or rank != self.rank or slots != self.slots:
            self._relayout(paths, rank, slots)
        k = next(i for i, o in enumerate(self._occupants) if o is None)
        for path in self.layout:
            sub = self.module.get_submodule(path)
            sub.lora_down[k].zero_()
            sub.lora_up[k].zero_()
            sub.lora_scaling[k] = 0.0
            if sub.lora_bias is not None:
                sub.lora_bias[k].zero_()
        occupant = _Slot(index=adapter.index, layers={})
        for path, layer in adapter.layers.items():
            sub = self.module.get_submodule(path)
            r = int(layer.down.shape[0])
            sub.lora_down[k, :r].copy_(layer.down)
            sub.lora_up[k, :, :r].copy_(layer.up)
            sub.lora_scaling[k] = layer.scaling
            if layer.bias is not None:
                sub.lora_bias[k].copy_(layer.bias)
            occupant.layers[path] = (r, layer.scaling, layer.bias is not None)
        self._occupants[k] = occupant
        return self.view(adapter)

    def view(self, adapter: LiveAdapter) -> LiveAdapter:
        """``adapter`` with its layers as views into its slot (after a re-layout: the new tensors)."""
        k = self.slot_of(adapter.index)
        if k is None:
            raise KeyError(f"adapter #{adapter.index} is not in the stack")
        occupant = self._occupants[k]
        assert occupant is not None
        layers = {}
        for path, (r, scaling, has_bias) in occupant.layers.items():
            sub = self.module.get_submodule(path)
            layers[path] = LiveLayer(down=sub.lora_down[k, :r], up=sub.lora_up[k, :, :r], scaling=scaling,
                                        bias=sub.lora_bias[k] if has_bias else None,
                                        conv=isinstance(sub, nn.Conv1d))
        return dataclasses.replace(adapter, layers=layers)

    def free(self, index: int) -> None:
        """Release adapter ``index``'s slot (its contents stay until the slot is reused; no row
        can select it, and a scale-0 row reading it adds exact zeros)."""
        k = self.slot_of(index)
        if k is not None:
            self._occupants[k] = None

    def selection(self, slots: Sequence[int], scales: Sequence[float]) -> tuple[Tensor, Tensor]:
        """The call's ``slot`` (int64) and ``scale`` (fp32) row tensors on the stack's device."""
        return (torch.tensor(list(slots), dtype=torch.int64, device=self.device),
                torch.tensor(list(scales), dtype=torch.float32, device=self.device))


class AdapterBank:
    """Adapters resident in one component instance (module docstring): resolve, cache, apply.

    ``module`` is the instance's transformer half, ``reachable`` the layers its forward calls
    (:func:`called_modules`). ``budget_bytes`` bounds the resident A/B tensors; ``status_file``,
    when given, is rewritten whenever the resident set changes (what ``list_loras`` reports).

    After :meth:`use_stack` the resident adapters live in an :class:`AdapterStack` (the fast
    path) and calls go through :meth:`selection` instead of :meth:`apply`; the byte budget and
    the least-recently-used order stay as they are, and a full stack first evicts the least
    recently used adapter the call does not need (else it grows).
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
        self._resident: OrderedDict[int, LiveAdapter] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        self.stack: AdapterStack | None = None
        self._stack_generation = 0

    def use_stack(self, slots: int = 4) -> AdapterStack:
        """Keep the resident adapters in an :class:`AdapterStack` of ``slots`` (initial) slots from
        now on (the compiled / CUDA-graph path). Adapters already resident move into it."""
        if self.stack is None:
            self.stack = AdapterStack(self.module, self.reachable, slots=slots, device=self.device, dtype=self.dtype)
            for index, adapter in list(self._resident.items()):
                self._resident[index] = self.stack.place(adapter)
            self._refresh_views()
        return self.stack

    def _refresh_views(self) -> None:
        """After a stack re-layout, point the resident adapters at the new tensors (the old ones
        must not be kept alive)."""
        if self.stack is None or self.stack.generation == self._stack_generation:
            return
        for index, adapter in self._resident.items():
            self._resident[index] = self.stack.view(adapter)
        self._stack_generation = self.stack.generation

    def _drop(self, index: int) -> None:
        del self._resident[index]
        if self.stack is not None:
            self.stack.free(index)

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

    def adapter(self, index: int, keep: set[int] | None = None) -> LiveAdapter:
        """The resident adapter for ``index``, loaded from its file on first use (with a stack:
        into a slot, evicting the least recently used adapter not in ``keep`` if it is full)."""
        cached = self._resident.get(index)
        if cached is not None:
            self._resident.move_to_end(index)
            return cached
        entry = self._entry(index)
        try:
            adapter = load_lora(entry.file, scaling=entry.scaling, name=entry.name)
            loaded = live_adapter(adapter, self.component, self.module, index=index, device=self.device,
                                     dtype=self.dtype, reachable=self.reachable)
        except LoraError as e:
            raise ParamError("lora_name_or_path", f"adapter {entry.name!r}: {e}") from e
        if self.stack is not None:
            if self.stack.full:
                victim = next((i for i in self._resident if i not in (keep or set())), None)
                if victim is not None:
                    self._drop(victim)
                    self.evictions += 1
            loaded = self.stack.place(loaded)
            self._refresh_views()
        self._resident[index] = loaded
        self.loads += 1
        return loaded

    def _evict(self, keep: set[int]) -> None:
        for index in list(self._resident):
            if self.resident_bytes <= self.budget_bytes:
                break
            if index not in keep:
                self._drop(index)
                self.evictions += 1

    def _forget_unloaded(self) -> None:
        """Drop adapters the control model unloaded (their index is no longer in the state)."""
        state = self.state.current()
        live = {a.index for a in state.loaded.values()}
        for index in [i for i in self._resident if i not in live]:
            self._drop(index)

    def _resolve(self, index: Tensor, weights: Tensor) -> dict[int, tuple[list[int], list[float]]]:
        """Make every adapter the call's rows name resident; ``{adapter index: (rows, weights)}``."""
        before = (tuple(self._resident), self.resident_bytes)
        self._forget_unloaded()
        by_adapter = group_rows(index.reshape(-1).tolist(), weights.reshape(-1).tolist())
        for i in by_adapter:
            self.adapter(i, keep=set(by_adapter))
        self._evict(keep=set(by_adapter))
        if (tuple(self._resident), self.resident_bytes) != before:
            self.write_status()
        return by_adapter

    def groups(self, index: Tensor, weights: Tensor) -> list[RowGroup]:
        """The row groups of one call from its ``lora_index`` / ``lora_scale`` rows."""
        by_adapter = self._resolve(index, weights)
        batch = int(index.numel())
        groups = []
        for i, (rows, ws) in by_adapter.items():
            row_tensor = None if rows == list(range(batch)) else torch.tensor(rows, device=self.device)
            groups.append(RowGroup(adapter=self._resident[i], rows=row_tensor,
                                   weights=torch.tensor(ws, dtype=torch.float32, device=self.device)))
        return groups

    def selection(self, index: Tensor | None, weights: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """The stack's per-row ``slot`` / ``scale`` tensors for one call (rows without an adapter:
        slot 0, scale 0), or None when no row has an adapter (the plain model runs)."""
        if self.stack is None:
            raise RuntimeError("selection() needs use_stack() first")
        if index is None or weights is None:
            return None
        by_adapter = self._resolve(index, weights)
        if not by_adapter:
            return None
        batch = int(index.numel())
        slots, scales = [0] * batch, [0.0] * batch
        for i, (rows, ws) in by_adapter.items():
            k = self.stack.slot_of(i)
            assert k is not None, f"adapter #{i} resident but not stacked"
            for row, w in zip(rows, ws, strict=True):
                slots[row], scales[row] = k, w
        return self.stack.selection(slots, scales)

    def write_status(self) -> None:
        """Record the resident set for the control model's listing (best effort)."""
        if self.status_file is None:
            return
        status = {"model": self.model_name, "component": self.component, "pid": os.getpid(),
                  "resident": self.resident, "resident_bytes": self.resident_bytes,
                  "budget_bytes": self.budget_bytes, "loads": self.loads, "evictions": self.evictions,
                  "updated": time.time()}
        if self.stack is not None:
            status["stack"] = {"slots": self.stack.slots, "rank": self.stack.rank,
                               "projections": len(self.stack.layout), "bytes": self.stack.nbytes}
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


__all__ = ["NO_ADAPTER", "AdapterBank", "AdapterStack", "LiveAdapter", "LiveLayer", "RowGroup", "RowSelection",
           "called_modules", "component_part", "group_rows", "live_adapter", "lora_rows", "parse_budget_mb"]

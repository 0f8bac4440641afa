"""Per-request adapter selection: the scopes a ``MusicGenerator`` runs each request in."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from acestep_client.params import ParamError, echo

from .files import LORA_COMPONENTS, NO_LORA, LoraAdapter, LoraError, load_lora
from .fuse import apply_lora
from .registry import LoraRegistry, is_no_lora
from .state import NO_ADAPTER, StateReader, read_live_pointer
from .variants import LoraVariant, read_variants_manifest

LoraScope = Callable[[str, float], AbstractContextManager[Any]]
"""``scope(lora_name_or_path, lora_weight)``: a context manager the generator runs a whole request
in; raises :class:`ParamError` on entry for a name or strength the backend cannot serve."""


@contextlib.contextmanager
def no_lora(name: str, weight: float) -> Iterator[None]:
    """The scope of a backend without adapters: ``none`` passes, any name is a request error."""
    if not is_no_lora(name):
        raise ParamError("lora_name_or_path", f"unknown LoRA adapter {echo(name)}: this server has no LoRA adapters "
                                              f"configured (use '{NO_LORA}')")
    yield


class InProcessLoras:
    """The in-process scope: fuse the named adapter into the torch transformer for one request.

    Names resolve through ``registry`` first, then (``allow_paths``, the local CLI like upstream)
    as a path to an adapter folder or file. Any ``lora_weight`` works (re-fused per request).
    Loaded adapters are cached (``cache_size`` most recent).
    """

    def __init__(self, transformer: nn.Module, registry: LoraRegistry | None = None, *,
                 allow_paths: bool = True, scaling: str = "upstream", cache_size: int = 4) -> None:
        self.transformer = transformer
        self.registry = registry
        self.allow_paths = allow_paths
        self.scaling = scaling
        self.cache_size = cache_size
        self._cache: OrderedDict[Path, LoraAdapter] = OrderedDict()

    def resolve(self, name: str) -> Path | None:
        if is_no_lora(name):
            return None
        if self.registry is not None and name.strip() in self.registry.adapters:
            return self.registry.adapters[name.strip()]
        if self.allow_paths and Path(name).exists():
            return Path(name)
        if self.registry is not None:
            self.registry.resolve(name)  # raises the listing error
        raise ParamError("lora_name_or_path", f"{echo(name)} is neither 'none' nor an existing LoRA adapter path")

    def adapter(self, path: Path) -> LoraAdapter:
        key = path.resolve()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            adapter = load_lora(path, self.transformer, scaling=self.scaling)
        except LoraError as e:
            raise ParamError("lora_name_or_path", str(e)) from e
        self._cache[key] = adapter
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return adapter

    @contextlib.contextmanager
    def __call__(self, name: str, weight: float) -> Iterator[None]:
        path = self.resolve(name)
        if path is None:
            yield
            return
        with apply_lora(self.transformer, self.adapter(path), weight):
            yield


@dataclass(frozen=True)
class LoraChoice:
    """One request's adapter, as every component call of that request must carry it.

    ``routes``: fused variants, e.g. ``dit_decoder`` → ``dit_decoder__rap``. ``rows``: runtime
    adapters, ``(lora_index, lora_weight)`` sent as per-row inputs; None sends none (a deployment
    without live adapters). Created per request by the scopes below, never changed.
    """

    routes: Mapping[str, str] = field(default_factory=dict)
    rows: tuple[int, float] | None = None


class RoutingCall:
    """Wraps a ``ComponentCall`` (``call(model, inputs, outputs)``) and adapts it per request.

    Each call carries the :class:`LoraChoice` of the request it is made for: the one a scope
    entered with :meth:`choosing` in the calling thread (or asyncio task), else ``default``.
    The choice lives in a context variable, not on this shared object, so concurrent requests
    through one instance (threads of one process) each keep their own adapter.

    With ``rows``, every call of a transformer component gets the per-row inputs ``lora_index``
    / ``lora_scale`` (one row per batch row: every guidance branch of a request uses its
    adapter, as upstream's fused model does).
    """

    def __init__(self, call: Callable[[str, Mapping[str, Tensor], Sequence[str]], list[Tensor]]) -> None:
        self._call = call
        self.default = LoraChoice()
        """The choice outside any request scope (:class:`LiveLoras` sets "no adapter" rows)."""
        self._choice: ContextVar[LoraChoice | None] = ContextVar("lora_choice", default=None)

    @property
    def choice(self) -> LoraChoice:
        """The choice the calling context's component calls carry now."""
        choice = self._choice.get()
        return self.default if choice is None else choice

    @property
    def routes(self) -> Mapping[str, str]:
        """The model routes of :attr:`choice`."""
        return self.choice.routes

    @contextlib.contextmanager
    def choosing(self, choice: LoraChoice) -> Iterator[None]:
        """Make ``choice`` the one this context's calls carry, until the block ends."""
        token = self._choice.set(choice)
        try:
            yield
        finally:
            self._choice.reset(token)

    def __call__(self, model: str, inputs: Mapping[str, Tensor], outputs: Sequence[str]) -> list[Tensor]:
        choice = self.choice
        if choice.rows is not None and model in LORA_COMPONENTS:
            first = next(iter(inputs.values()))
            index, weight = choice.rows
            rows = int(first.shape[0])
            inputs = {**inputs,
                      "lora_index": torch.full((rows,), index, dtype=torch.int32, device=first.device),
                      "lora_scale": torch.full((rows,), float(weight), dtype=torch.float32, device=first.device)}
        return self._call(choice.routes.get(model, model), inputs, outputs)


class ServedLoras:
    """The Triton scope: route a request naming an adapter to its fused variant models.

    A name that is not served raises :class:`ParamError` on ``lora_name_or_path``; a strength other
    than the fused one raises it on ``lora_weight`` (``lora_weight`` is ignored with ``none``, as
    upstream ignores it).
    """

    def __init__(self, routing: RoutingCall, variants: Sequence[LoraVariant]) -> None:
        self.routing = routing
        self.variants = {v.name: v for v in variants}

    def select(self, name: str, weight: float) -> LoraVariant | None:
        if is_no_lora(name):
            return None
        variant = self.variants.get(name.strip())
        if variant is None:
            served = ", ".join(self.variants) if self.variants else "no adapters are configured"
            raise ParamError("lora_name_or_path", f"unknown LoRA adapter {echo(name)}; this server serves: {served} "
                                                  f"(or '{NO_LORA}')")
        if not variant.accepts(weight):
            raise ParamError("lora_weight", f"{float(weight):g}: adapter {variant.name!r} is served fused at "
                                            f"lora_weight {variant.lora_weight:g} only (other strengths need "
                                            "another configured variant or the in-process pipeline)")
        return variant

    @contextlib.contextmanager
    def __call__(self, name: str, weight: float) -> Iterator[None]:
        variant = self.select(name, weight)
        with self.routing.choosing(LoraChoice(routes=dict(variant.routes) if variant is not None else {})):
            yield


class LiveLoras:
    """The Triton scope of a ``torch``-runtime deployment: any loaded adapter at any strength.

    The request's ``lora_name_or_path`` is looked up in the state file (:mod:`.state`, re-read
    when the control model changed it); its index and the request's ``lora_weight`` then travel
    with every transformer-component call (:class:`RoutingCall`), so Triton may batch the call
    with other requests' rows, whatever adapter they use. ``lora_weight`` is any value the schema
    accepts; with ``none`` no adapter is applied (and ``lora_weight`` ignored, as upstream).
    """

    def __init__(self, routing: RoutingCall, state: StateReader) -> None:
        self.routing = routing
        self.state = state
        routing.default = LoraChoice(rows=(NO_ADAPTER, 0.0))  # the transformer components require rows

    def select(self, name: str, weight: float) -> tuple[int, float]:
        if is_no_lora(name):
            return NO_ADAPTER, 0.0
        state = self.state.current()
        key = name.strip()
        entry = state.loaded.get(key)
        if entry is None:
            served = ", ".join(sorted(state.loaded)) or "no adapters are loaded"
            reason = f" (it could not be loaded: {state.failed[key]})" if key in state.failed else ""
            raise ParamError("lora_name_or_path", f"unknown LoRA adapter {echo(name)}{reason}; this server serves: "
                                                  f"{served} (or '{NO_LORA}'); load one with the lora_registry "
                                                  "model (client.load_lora)")
        return entry.index, float(weight)

    @contextlib.contextmanager
    def __call__(self, name: str, weight: float) -> Iterator[None]:
        with self.routing.choosing(LoraChoice(rows=self.select(name, weight))):
            yield


def served_scope(routing: RoutingCall, assets_dir: str | Path) -> LoraScope:
    """The LoRA scope an endpoint serves with: live adapters when the deployment has them
    (:data:`~.state.LIVE_POINTER_FILE` in the assets), else its fused variants (possibly none)."""
    state_file = read_live_pointer(assets_dir)
    if state_file is not None:
        return LiveLoras(routing, StateReader(state_file))
    return ServedLoras(routing, read_variants_manifest(assets_dir))

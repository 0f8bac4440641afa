"""The in-process GPU path: the DiT decoder replayed from CUDA graphs.

One sampling step launches a few thousand small kernels (24 blocks × norms, projections,
attention pieces, adaLN); at batch 1-3 and 60 s of audio the GPU finishes many of them faster
than Python can launch them. A CUDA graph records the launches of one ``transformer.decode``
call for fixed input shapes once and replays them with a single launch every step.

:class:`CUDAGraphDecoder` has ``decode``'s signature and keeps one graph per distinct input
shape (a guided step with all CFG branches batched, and a conditional-only step outside the
guidance interval, are two shapes). :class:`GraphedBackend` wraps an in-process backend
(e.g. :class:`~acestep_triton.pipeline.TorchBackend` on CUDA) and routes ``predict_velocity``
through it.

Capture needs everything in ``decode`` to be device work for fixed shapes. The one exception
in the model is the RoPE sign vector, which ``rope_tables`` builds with ``torch.tensor(...,
device=...)`` (a host-to-device copy, illegal while capturing); for a fixed shape the tables
are constants, so they are computed before capture and handed to the model while capturing
(:func:`static_rope`).

For Triton's TensorRT backend the equivalent is the model config option
``optimization { cuda { graphs: true } }`` (see benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .models import transformer as transformer_module
from .models.attention import rope_tables
from .sampling.backend import BackendWrapper

#: ``decode``'s argument order.
DECODE_INPUTS = ("latents", "latent_mask", "encoder_states", "encoder_mask", "timestep", "query_scale")


@contextlib.contextmanager
def static_rope(tables: dict[tuple[int, str], tuple[Tensor, Tensor]]) -> Iterator[None]:
    """While active, ``models.transformer`` gets its RoPE tables from ``tables`` (keyed by
    (positions, device)) instead of computing them: nothing is copied from the host."""
    original = transformer_module.rope_tables

    def lookup(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
        key = (int(positions.shape[0]), str(positions.device))
        if key not in tables:
            raise KeyError(f"static_rope: no table for {key[0]} positions on {key[1]}")
        return tables[key]

    transformer_module.rope_tables = lookup
    try:
        yield
    finally:
        transformer_module.rope_tables = original


def rope_tables_for(transformer: nn.Module, lengths: tuple[int, ...], device: torch.device
                    ) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """The RoPE tables ``decode`` needs for sequences of ``lengths`` (frames and tokens)."""
    tables = {}
    for length in lengths:
        positions = torch.arange(length, device=device)
        tables[(length, str(positions.device))] = rope_tables(
            positions, transformer.head_dim, transformer.config.rope_theta)
    return tables


class GraphBackend(Protocol):
    """Turns a function that reads static inputs into a replayable one."""

    def capture(self, fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
        """Record ``fn`` (already warmed up or not) and return ``replay() -> output``: the same
        output tensor every time, recomputed from the current contents of the static inputs."""
        ...


class TorchCUDAGraphs:
    """:class:`GraphBackend` with ``torch.cuda.CUDAGraph``.

    Each graph gets its own private memory pool (the default): a graph's output then never
    shares memory with another graph's intermediates, whatever order the shapes are replayed in
    (conditional-only and guided steps alternate). ``share_pool=True`` saves memory when the
    caller guarantees capture-order replay.
    """

    def __init__(self, warmup: int = 2, share_pool: bool = False) -> None:
        self.warmup = warmup
        self.share_pool = share_pool
        self.pool: Any = None

    def capture(self, fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
        # Warm up on a side stream (cuBLAS/cuDNN workspaces and autotuning happen outside the
        # capture), as torch's CUDA-graph recipe requires.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        if self.share_pool and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool if self.share_pool else None):
            output = fn()

        def replay() -> Tensor:
            graph.replay()
            return output

        replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph alive with the closure
        return replay


@dataclass
class _Captured:
    inputs: tuple[Tensor, ...]
    replay: Callable[[], Tensor]
    keepalive: tuple[Any, ...] = ()
    """Tensors the graph reads that were allocated outside it (the RoPE tables): freed, their
    memory would be reused by later allocations and replays would read garbage."""


class CUDAGraphDecoder:
    """``transformer.decode`` replayed from one CUDA graph per input shape.

    Call it like ``decode(latents, latent_mask, encoder_states, encoder_mask, timestep,
    query_scale)``. The first call with a new shape captures (after warm-up); later calls copy
    the inputs into the graph's static buffers and replay. Returns a fresh tensor (a copy of the
    graph's output buffer), so callers may keep results across steps.
    ``max_graphs`` bounds how many shapes are kept (each holds its activations' memory);
    beyond it, calls run eagerly.

    ``decode`` replaces ``transformer.decode`` as the captured function; it receives every
    tensor the call was given, so a caller may append inputs of its own after ``decode``'s six
    (the live LoRA path appends the per-row adapter ``slot`` and ``scale``). Calls with a
    different number of inputs are different graphs. :meth:`drop` forgets graphs whose captured
    code reads tensors that are about to go away.
    """

    def __init__(self, transformer: nn.Module, *, backend: GraphBackend | None = None,
                 max_graphs: int = 8, decode: Callable[..., Tensor] | None = None) -> None:
        self.transformer = transformer
        self.backend = backend if backend is not None else TorchCUDAGraphs()
        self.max_graphs = max_graphs
        self.decode: Callable[..., Tensor] = decode if decode is not None else transformer.decode
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self.eager_calls = 0

    @property
    def captured_shapes(self) -> list[tuple[Any, ...]]:
        return list(self._graphs)

    @staticmethod
    def _key(inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
        return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Captured:
        with torch.inference_mode(False):
            static = tuple(t.detach().clone() for t in inputs)
        latents, encoder_states = static[0], static[2]
        tables = rope_tables_for(self.transformer, (int(latents.shape[-1]), int(encoder_states.shape[1])),
                                 latents.device)

        def run() -> Tensor:
            with torch.no_grad(), static_rope(tables):
                return self.decode(*static)

        replay = self.backend.capture(run, latents.device)
        return _Captured(inputs=static, replay=replay, keepalive=(tables, run))

    def drop(self, which: Callable[[tuple[Any, ...]], bool] | None = None) -> int:
        """Forget the graphs whose key ``which(key)`` selects (all without ``which``); a key has one
        ``(shape, dtype, device)`` entry per input. Returns how many were dropped."""
        keys = [k for k in self._graphs if which is None or which(k)]
        for key in keys:
            del self._graphs[key]
        return len(keys)

    def __call__(self, latents: Tensor, latent_mask: Tensor, encoder_states: Tensor, encoder_mask: Tensor,
                 timestep: Tensor, query_scale: Tensor, *extra: Tensor) -> Tensor:
        inputs = (latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale, *extra)
        key = self._key(inputs)
        captured = self._graphs.get(key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                self.eager_calls += 1
                with torch.no_grad():
                    return self.decode(*inputs)
            captured = self._graphs[key] = self._capture(inputs)
        with torch.no_grad():
            for static, value in zip(captured.inputs, inputs, strict=True):
                static.copy_(value)
            return captured.replay().clone()


class GraphedBackend(BackendWrapper):
    """A :class:`~acestep_triton.sampling.ComponentBackend` whose ``predict_velocity`` replays CUDA graphs;
    every other method and attribute is the wrapped backend's.

    ``inner`` is an in-process backend on a CUDA device (``pipeline.TorchBackend``);
    ``transformer`` defaults to ``inner.c.transformer``. Drive the sampling loop with
    ``SamplingHooks(row_query_scale=True)`` so that every guided step is one shape and one replay.
    """

    def __init__(self, inner: Any, transformer: nn.Module | None = None,
                 decoder: CUDAGraphDecoder | None = None) -> None:
        super().__init__(inner)
        if decoder is None:
            decoder = CUDAGraphDecoder(transformer if transformer is not None else inner.c.transformer)
        self.decoder = decoder

    def predict_velocity(self, latents: Tensor, latent_mask: Tensor, encoder_states: Tensor,
                         encoder_mask: Tensor, timestep: Tensor, query_scale: Tensor) -> Tensor:
        return self.decoder(latents, latent_mask, encoder_states, encoder_mask, timestep, query_scale)

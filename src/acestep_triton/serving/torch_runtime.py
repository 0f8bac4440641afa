"""The ``torch`` component runtime: each served component run by the checkpoint's own torch modules.

Beside ``onnx`` (onnxruntime, cpu target) and ``tensorrt`` (engines, gpu target), this runtime
serves the six components straight from our ``models/`` (loaded strictly from the checkpoint,
as everywhere else) under the same names and tensors (``export/specs.py``). It is what makes
the fast GPU path servable: on a GPU the DiT blocks are compiled by TorchInductor and the
decoder step is replayed from one CUDA graph per shape bucket (:class:`~acestep_triton.gpu.
CUDAGraphDecoder`), which measured 3.2x eager PyTorch in-process on an H200; no engine build is
needed, and the numbers are those of the reference pipeline (same modules, same code).

This module is plain torch (no ``pb_utils``): :class:`ComponentRunner` is what the Triton
Python-backend model (:mod:`acestep_triton.serving.torch_component`) calls per batch, and
:func:`runner_call` plugs the very same runners into the Triton backend in-process, so a
benchmark can compare "through Triton" with "the same compiled components called directly".

Live LoRA adapters (:class:`LiveAdapterOptions`, :mod:`acestep_triton.lora.live`): the
condition encoder and DiT decoder keep the checkpoint's weights only, and each batch row may
name an adapter and strength (``lora_index`` / ``lora_scale``), so one instance serves every
loaded adapter at any strength, mixed in one batch.

Precision: fp32 on the CPU. On a GPU the transformer halves (``condition_encoder``,
``dit_decoder``) default to bf16, the DiT's own code keeping fp32 where the numbers need it
(RMSNorm statistics, RoPE, linear-attention sums, outputs); the text encoder, the DCAE and the
vocoder default to fp32 (small next to the DiT, and the audio path is the most sensitive to
rounding). Every component's inputs and outputs stay FP32 on the wire, as the contract says.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from acestep_client.limits import PROMPT_MAX_TOKENS
from acestep_client.params import ParamError

from ..checkpoint import (
    CheckpointLayout,
    load_dcae_half,
    load_text_encoder,
    load_transformer,
    load_vocoder,
    meta_transformer,
)
from ..component_graphs import ComponentGraph, component_graph
from ..export.specs import COMPONENTS, ComponentSpec
from ..gpu import CUDAGraphDecoder, GraphBackend
from ..lora import fuse_in_place, load_lora
from ..lora.live import AdapterBank, AdapterStack, called_modules, parse_budget_mb
from ..lora.state import StateReader
from ..pipeline import MusicGenerator
from ..sampling.buckets import BucketedBackend, ShapeBuckets, WarmupShape, parse_warmup
from .assets import load_assets, write_assets
from .config_params import parse_flag
from .memory import malloc_trim
from .orchestrator import TritonBackend

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Values of the ``precision`` config parameter."""

GPU_DEFAULT_PRECISION: dict[str, str] = {
    "text_encoder": "fp32", "condition_encoder": "bf16", "dit_decoder": "bf16",
    "dcae_encoder": "fp32", "dcae_decoder": "fp32", "vocoder": "fp32",
}
"""The precision of each component on a GPU when the config does not say (module docstring)."""

ENCODE_ONLY = ("genre_embedder", "lyric_embs", "lyric_encoder", "lyric_proj")
DECODE_ONLY = ("timestep_embedder", "t_block", "proj_in", "transformer_blocks", "final_layer")
"""The transformer's submodules that only ``encode`` / only ``decode`` uses: a component
instance drops the other half after loading, so condition encoder and DiT decoder together hold
one transformer's weights, not two. (``speaker_embedder``, 512 x D, stays in both: the model
reads its dtype from it.)"""


@dataclass(frozen=True)
class RuntimeOptions:
    """How one component instance runs. ``compile``/``cuda_graphs`` only act on the DiT decoder
    (where the time goes); ``cuda_graphs`` only on a CUDA device. ``compile`` defaults to on on a
    GPU only; set explicitly on the CPU it compiles there too (TorchInductor's C++ backend needs
    a C++ compiler; ``compile_backend`` picks another torch.compile backend, e.g. ``aot_eager``).

    ``warmup``: the ``dit_decoder`` shapes run once at load, before the model reports ready
    (:meth:`ComponentRunner.warm_up`). ``lora_fast_path``/``lora_slots``: live adapters on a
    compiled or graphed DiT go through the static :class:`~acestep_triton.lora.live.
    AdapterStack` of that many initial slots (off: such batches run the blocks eagerly)."""

    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    max_graphs: int = 16
    compile_backend: str | Callable[..., Any] = "inductor"
    warmup: tuple[WarmupShape, ...] = ()
    lora_fast_path: bool = True
    lora_slots: int = 4

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"config parameter precision: expected one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.device.type == "cpu" and self.precision != "fp32":
            raise ValueError(f"config parameter precision: {self.precision} on the CPU is not supported "
                             "(CPU instances run fp32)")
        if self.lora_slots < 1:
            raise ValueError(f"config parameter lora_slots must be >= 1, got {self.lora_slots}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @classmethod
    def for_component(cls, name: str, device: torch.device, parameters: Mapping[str, str] | None = None
                      ) -> RuntimeOptions:
        """Options from a model's config parameters (``precision``, ``compile``, ``cuda_graphs``,
        ``max_graphs``, ``compile_backend``, ``warmup``, ``lora_fast_path``, ``lora_slots``), with
        the per-device defaults for whatever they leave out.

        ``warmup`` ``auto`` (or absent) is :data:`~acestep_triton.sampling.buckets.DEFAULT_WARMUP`
        for a DiT decoder on a GPU that compiles or captures graphs (where first calls cost
        seconds to minutes), and nothing elsewhere (a CPU's first call costs little; opt in with
        ``default`` or a list)."""
        parameters = parameters or {}
        on_gpu = device.type == "cuda"
        precision = parameters.get("precision") or (GPU_DEFAULT_PRECISION[name] if on_gpu else "fp32")
        if precision == "auto":
            precision = GPU_DEFAULT_PRECISION[name] if on_gpu else "fp32"
        compile_ = parse_flag(parameters.get("compile"), on_gpu, "compile")
        cuda_graphs = parse_flag(parameters.get("cuda_graphs"), on_gpu, "cuda_graphs")
        warmup_text = (parameters.get("warmup") or "auto").strip()
        if warmup_text.lower() == "auto":
            fast = name == "dit_decoder" and on_gpu and (compile_ or cuda_graphs)
            warmup_text = "default" if fast else "none"
        return cls(device=device, precision=precision, compile=compile_, cuda_graphs=cuda_graphs,
                   max_graphs=int(parameters.get("max_graphs") or 16),
                   compile_backend=(parameters.get("compile_backend") or "inductor").strip(),
                   warmup=parse_warmup(warmup_text),
                   lora_fast_path=parse_flag(parameters.get("lora_fast_path"), True, "lora_fast_path"),
                   lora_slots=int(parameters.get("lora_slots") or 4))


def load_component_module(name: str, ckpt_dir: str | Path, *, lora_path: str | Path | None = None,
                          lora_weight: float = 1.0, lora_scaling: str = "upstream",
                          dtype: torch.dtype = torch.float32) -> nn.Module:
    """The torch model served as component ``name``, strictly loaded from the checkpoint in ``dtype``.

    Start-up cost is reading what the component serves, once: modules are built on the meta
    device and filled from the file tensor by tensor (:func:`acestep_triton.weights.materialize`),
    only the files the component needs are opened, the transformer components never read the
    half they do not run (:data:`ENCODE_ONLY` / :data:`DECODE_ONLY`), and each DCAE model reads
    only its own half. With ``lora_path`` the adapter is checked against the whole transformer and
    fused in place at ``lora_weight`` into the half that is served (a LoRA variant model such as
    ``dit_decoder__rap``).
    """
    module = _load_component_module(name, CheckpointLayout(Path(ckpt_dir)), lora_path, lora_weight, lora_scaling,
                                    dtype)
    # Loading freed its temporaries (the cast reads' staging buffer, header parsing, lazily
    # imported code's scratch): hand the pages back so the steady RSS is the weights' size.
    malloc_trim()
    return module


def _load_component_module(name: str, layout: CheckpointLayout, lora_path: str | Path | None, lora_weight: float,
                           lora_scaling: str, dtype: torch.dtype) -> nn.Module:
    if name == "text_encoder":
        return load_text_encoder(layout, dtype)
    if name in ("condition_encoder", "dit_decoder"):
        transformer = load_transformer(layout, dtype, drop=DECODE_ONLY if name == "condition_encoder" else ENCODE_ONLY)
        if lora_path is not None:
            _fuse_variant(layout, transformer, lora_path, lora_weight, lora_scaling)
        return transformer
    if lora_path is not None:
        raise ValueError(f"{name}: LoRA adapters touch only the transformer components")
    if name in ("dcae_encoder", "dcae_decoder"):
        return load_dcae_half(layout, name.removeprefix("dcae_"), dtype)
    if name == "vocoder":
        vocoder = load_vocoder(layout, dtype)
        vocoder.fold_weight_norm()  # what export traces too: plain weights, same function
        return vocoder
    raise KeyError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")


def _fuse_variant(layout: CheckpointLayout, transformer: nn.Module, lora_path: str | Path, weight: float,
                  scaling: str) -> None:
    """Fuse a LoRA variant's adapter into the served half of the transformer, in place. The
    adapter is checked against the whole transformer (built on the meta device, no memory), so
    a key for the other half is fine and a key for no module at all is still an error."""
    adapter = load_lora(lora_path, meta_transformer(layout.root), scaling=scaling)
    fuse_in_place(transformer, adapter, weight)


@dataclass(frozen=True)
class LiveAdapterOptions:
    """Live adapters of a transformer-component instance (config parameters ``lora_state``,
    ``lora_memory_mb``): the state file naming the loaded adapters, the byte budget of the
    resident A/B tensors, and where the instance reports what it holds."""

    state_file: Path
    budget_bytes: int
    status_file: Path | None = None
    model_name: str | None = None

    @classmethod
    def from_parameters(cls, model_name: str, parameters: Mapping[str, str]) -> LiveAdapterOptions | None:
        """None unless the config names a ``lora_state`` file (live adapters are on)."""
        # lora.live_control imports tritonclient (through export.triton_config): importing this
        # module stays free of it
        from ..lora.live_control import STATUS_DIR

        if not parameters.get("lora_state"):
            return None
        state = Path(parameters["lora_state"])
        return cls(state_file=state, budget_bytes=parse_budget_mb(parameters.get("lora_memory_mb")),
                   status_file=state.parent / STATUS_DIR / f"{model_name}.{os.getpid()}.json", model_name=model_name)


@contextlib.contextmanager
def _eager_blocks(transformer: nn.Module) -> Iterator[None]:
    """Run TorchInductor-compiled blocks eagerly inside the block (``nn.Module.compile`` keeps the
    compiled callable in ``_compiled_call_impl``): a batch with runtime-adapter rows registers
    hooks the compiled graphs were not traced with, and must not make them recompile."""
    blocks = [b for b in getattr(transformer, "transformer_blocks", None) or ()
              if getattr(b, "_compiled_call_impl", None) is not None]
    saved = [b._compiled_call_impl for b in blocks]
    for block in blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, compiled in zip(blocks, saved, strict=True):
            block._compiled_call_impl = compiled


class ComponentRunner:
    """One served component on one device: contract inputs in, contract outputs (FP32) out.

    ``__call__({input_name: tensor})`` returns the outputs in contract order, on the runner's
    device. Inputs may come from any device (they are moved, a no-op when already there).

    With ``loras`` (transformer components only), the optional inputs ``lora_index`` /
    ``lora_scale`` select a live adapter and strength per batch row
    (:class:`~acestep_triton.lora.live.AdapterBank`). On a compiled or graphed DiT decoder
    the adapters live in the bank's static :class:`~acestep_triton.lora.live.AdapterStack`:
    a batch with adapter rows, mixed with base rows or not, runs the same compiled blocks, and
    replays a CUDA graph per shape captured with the adapter term (the per-row ``slot`` and
    ``scale`` are two more graph inputs). Batches without any adapter row run exactly as without
    ``loras``. Elsewhere (CPU, eager) and with ``lora_fast_path`` off, adapter rows are grouped
    per adapter by per-call hooks, the compiled blocks bypassed (:func:`_eager_blocks`).

    ``graph_backend`` replaces the CUDA-graph capture (tests pass a stand-in that replays
    eagerly, which runs the graph path on the CPU); with it ``cuda_graphs`` acts on any device.
    ``options.warmup`` shapes are run before the constructor returns (:meth:`warm_up`).
    """

    def __init__(self, spec: ComponentSpec, module: nn.Module, options: RuntimeOptions,
                 loras: LiveAdapterOptions | None = None, *, graph_backend: GraphBackend | None = None) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device
        module = module.to(device=options.device, dtype=options.dtype).eval().requires_grad_(False)
        self.graph: ComponentGraph = component_graph(spec.name, module)
        self.forward: Any = self.graph
        self.compiled = False
        self.cuda_graphs = False
        self.loras: AdapterBank | None = None
        self.stack: AdapterStack | None = None
        self._graph_generation = 0
        self.warmup_seconds: float | None = None
        if loras is not None:
            self.loras = self._adapter_bank(module, loras)
        if spec.name == "dit_decoder":
            transformer = self.graph.transformer
            if options.compile:
                import torch._dynamo  # heavy (~1 s to import): only compiled instances need it

                # Every (batch, bucket) shape is a new specialisation: allow enough of them, and
                # let dynamo switch to shape-generic kernels after the first recompile (dynamic=None)
                # instead of compiling one program per shape.
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                for block in transformer.transformer_blocks:
                    # one compilation serves every block (same code, weights as inputs)
                    block.compile(backend=options.compile_backend)
                self.compiled = True
            if options.cuda_graphs and (self.device.type == "cuda" or graph_backend is not None):
                # max_graphs counts shapes: with live adapters on the fast path a shape has two
                # graphs (base rows only / with adapter rows), so the graph limit doubles
                per_shape = 2 if loras is not None and options.lora_fast_path else 1
                self.forward = CUDAGraphDecoder(transformer, max_graphs=per_shape * options.max_graphs,
                                                backend=graph_backend, decode=self._decode)
                self.cuda_graphs = True
        if self.loras is not None and options.lora_fast_path and (self.compiled or self.cuda_graphs):
            self.stack = self.loras.use_stack(options.lora_slots)
            self._graph_generation = self.stack.generation
        if options.warmup:
            self.warm_up(options.warmup)

    def _adapter_bank(self, module: nn.Module, loras: LiveAdapterOptions) -> AdapterBank:
        """The instance's adapter cache; probes which projections the forward really calls (once,
        before any compilation, on a one-item example)."""
        if self.spec.name not in ("condition_encoder", "dit_decoder"):
            raise ValueError(f"{self.spec.name}: live LoRA adapters touch only the transformer components")
        example = [t.to(self.device) for t in self.graph.example_inputs(1, 4).values()]
        with torch.inference_mode():
            reachable = called_modules(module, lambda: self.graph(*example))
        bank = AdapterBank(self.spec.name, module, StateReader(loras.state_file), reachable=reachable,
                           device=self.device, dtype=self.options.dtype, budget_bytes=loras.budget_bytes,
                           status_file=loras.status_file, model_name=loras.model_name)
        bank.write_status()
        return bank

    def _decode(self, *inputs: Tensor) -> Tensor:
        """What a CUDA graph captures: ``decode``'s six inputs, plus the adapter stack's per-row
        ``slot`` and ``scale`` when a batch has adapter rows."""
        transformer = self.graph.transformer
        if len(inputs) == 6:
            return transformer.decode(*inputs)
        assert self.stack is not None
        *decode_inputs, slot, scale = inputs
        with self.stack.rows.use(slot, scale):
            return transformer.decode(*decode_inputs)

    @property
    def description(self) -> str:
        parts = [f"{self.spec.name} on {self.device} ({self.options.precision})"]
        if self.compiled:
            parts.append("TorchInductor blocks" if self.options.compile_backend == "inductor"
                         else f"compiled blocks ({self.options.compile_backend})")
        if self.cuda_graphs:
            parts.append("CUDA graphs per shape")
        if self.loras is not None:
            where = "; on the compiled path" if self.stack is not None else ""
            parts.append(f"live LoRA adapters (budget {self.loras.budget_bytes / 2**20:.0f} MiB{where})")
        if self.warmup_seconds is not None:
            parts.append(f"{len(self.options.warmup)} shape(s) warmed up in {self.warmup_seconds:.1f} s")
        return ", ".join(parts)

    def _stacked(self, args: list[Tensor], slot: Tensor, scale: Tensor) -> Any:
        """A batch with adapter rows on the fast path: compiled blocks and/or a CUDA graph with the
        stack's term, ``slot``/``scale`` as inputs."""
        assert self.stack is not None
        if self.cuda_graphs:
            if self.stack.generation != self._graph_generation:
                # a re-layout replaced the stacked tensors: graphs that read the old ones must go
                # before anything is replayed
                self.forward.drop(lambda key: len(key) > len(args))
                self._graph_generation = self.stack.generation
            return self.forward(*args, slot, scale)
        with self.stack.rows.use(slot, scale):
            return self.forward(*args)

    @torch.inference_mode()
    def __call__(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [n for n in self.spec.input_names if n not in inputs]
        if missing:
            raise ValueError(f"input {missing[0]!r} is missing")
        args = [inputs[n].to(self.device) for n in self.spec.input_names]
        if self.loras is None:
            result = self.forward(*args)
        elif self.stack is not None:
            selection = self.loras.selection(inputs.get("lora_index"), inputs.get("lora_scale"))
            result = self.forward(*args) if selection is None else self._stacked(args, *selection)
        else:
            with self.loras.apply(inputs.get("lora_index"), inputs.get("lora_scale")) as active:
                if active and (self.compiled or self.cuda_graphs):
                    with _eager_blocks(self.graph.transformer):
                        result = self.graph(*args)
                else:
                    result = self.forward(*args)
        outputs = list(result) if isinstance(result, tuple | list) else [result]
        return [o.float().contiguous() for o in outputs]

    # ---------------------------------------------------------------------------- warm-up
    def warmup_inputs(self, shape: WarmupShape, *, seed: int = 0) -> dict[str, Tensor]:
        """Contract inputs (on the CPU) for one warm-up ``shape``.

        The DiT decoder gets exactly ``batch`` x ``frames`` x ``tokens`` (B, W, S). The other
        components read the shape as the request it stands for: the text encoder ``batch``
        prompts of ``tokens`` tokens (at most 256), the condition encoder ``batch`` rows of about
        ``tokens`` condition tokens; the audio components one song of ``frames`` latent frames
        (the DCAE; the vocoder its mel, both channels), whatever ``batch`` is: the DiT's batch
        counts guidance branches, which never reach them.
        """
        graph = self.graph
        name = self.spec.name
        if name == "dit_decoder":
            sizes = {"B": shape.batch, "W": shape.frames, "S": shape.tokens}
        elif name == "text_encoder":
            sizes = graph.dynamic_sizes(shape.batch, min(shape.tokens, PROMPT_MAX_TOKENS))
        elif name == "condition_encoder":
            sizes = graph.dynamic_sizes(shape.batch, max(1, (shape.tokens - 2) // 3))
        elif name == "vocoder":
            frames_per_latent = int(COMPONENTS["dcae_decoder"].outputs[0].shape[2]) // int(
                COMPONENTS["dcae_decoder"].inputs[0].shape[2])
            sizes = graph.dynamic_sizes(2, shape.frames * frames_per_latent)
        else:
            sizes = graph.dynamic_sizes(1, shape.frames)
        sizes = {**graph.checkpoint_sizes(), **sizes}
        generator = torch.Generator().manual_seed(seed)
        return {t.name: graph.fill(t, t.resolve(sizes), generator) for t in self.spec.inputs}

    def _warmup_adapters(self) -> list[int]:
        """Indices of the loaded live adapters to make resident at warm-up (at most the stack's
        slots on the fast path, one otherwise), so no first request reads an adapter file or
        re-lays the stack out; the first is used for the adapter variant of each warm-up shape."""
        if self.loras is None:
            return []
        loaded = sorted(self.loras.state.current().loaded.values(), key=lambda a: a.index)
        wanted = self.options.lora_slots if self.stack is not None else 1
        return [a.index for a in loaded if self.spec.name in a.components][:wanted]

    def warm_up(self, shapes: Sequence[WarmupShape]) -> float:
        """Run each shape once (and, with live adapters loaded, once more with an adapter row
        mixed into base rows), so TorchInductor compiles, each CUDA graph is captured, and the
        one-time costs of the first calls (allocator growth, kernel selection, adapter files) are
        paid before the model reports ready (Triton calls ``initialize``, which builds this
        runner, before readiness). Returns the seconds it took (also ``warmup_seconds``)."""
        started = time.perf_counter()
        adapters = self._warmup_adapters()
        try:
            for index in adapters:
                self.loras.adapter(index, keep=set(adapters))  # type: ignore[union-attr]
        except ParamError:
            adapters = []  # an adapter that cannot be served is refused on the request that names it
        done: set[tuple[tuple[int, ...], ...]] = set()
        for shape in shapes:
            inputs = self.warmup_inputs(shape)
            key = tuple(tuple(t.shape) for t in inputs.values())
            if key in done:  # e.g. the audio components: one song per frame count
                continue
            done.add(key)
            try:
                self(inputs)
                if adapters and self.spec.name in ("condition_encoder", "dit_decoder"):
                    index = torch.full((shape.batch,), -1, dtype=torch.int32)
                    index[0] = adapters[0]
                    self({**inputs, "lora_index": index, "lora_scale": torch.ones(shape.batch)})
            except Exception as e:
                raise RuntimeError(f"{self.spec.name}: warm-up shape {shape} (batch:frames:tokens) failed: "
                                   f"{e}") from e
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - started
        return self.warmup_seconds


def load_runner(name: str, ckpt_dir: str | Path, options: RuntimeOptions, **lora: Any) -> ComponentRunner:
    """:func:`load_component_module` + :class:`ComponentRunner` (``lora``: its LoRA keywords)."""
    return ComponentRunner(COMPONENTS[name], load_component_module(name, ckpt_dir, dtype=options.dtype, **lora),
                           options)


def load_runners(ckpt_dir: str | Path, device: torch.device | str = "cpu",
                 parameters: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, ComponentRunner]:
    """Every component of a checkpoint as runners on ``device`` (``parameters``: per component,
    the same keys as the served models' config parameters, e.g. ``{"dit_decoder": {"compile":
    "false"}}``). What an in-process twin of a torch-runtime deployment uses."""
    device = torch.device(device)
    parameters = parameters or {}
    return {name: load_runner(name, ckpt_dir, RuntimeOptions.for_component(name, device, parameters.get(name)))
            for name in COMPONENTS}


def runner_call(runners: Mapping[str, ComponentRunner]) -> Any:
    """A ``ComponentCall`` (``call(model, inputs, outputs)``, see ``serving.orchestrator``) over
    in-process runners: what BLS does inside Triton, without Triton."""

    def call(model: str, inputs: Mapping[str, Tensor], outputs: Sequence[str]) -> list[Tensor]:
        runner = runners[model]
        results = dict(zip(runner.spec.output_names, runner(inputs), strict=True))
        return [results[name] for name in outputs]

    return call


def in_process_twin_generator(ckpt_dir: str | Path, vocab_path: str | Path | None = None, *,
                              device: torch.device | str = "cpu",
                              parameters: Mapping[str, Mapping[str, str]] | None = None,
                              buckets: ShapeBuckets | None = None) -> MusicGenerator:
    """The in-process twin of a torch-runtime deployment: a ``MusicGenerator`` whose backend
    calls the same :class:`ComponentRunner` objects the served models run (compiled DiT and
    CUDA graphs on a GPU), padded to the same shape ``buckets`` (default: the endpoints'
    default ladder; ``ShapeBuckets()`` for none). Only the Triton layer is missing, which is
    what a "Triton vs in-process" benchmark needs to isolate."""
    device = torch.device(device)
    runners = load_runners(ckpt_dir, device, parameters)
    with tempfile.TemporaryDirectory() as tmp:
        assets = load_assets(write_assets(ckpt_dir, Path(tmp) / "assets", vocab_path))
    backend: Any = TritonBackend(runner_call(runners), assets.text_layers, assets.lyric_layers,
                                   assets.dit_layers)
    buckets = ShapeBuckets.default() if buckets is None else buckets
    if buckets.enabled:
        backend = BucketedBackend(backend, buckets)
    return MusicGenerator(backend, assets.prompt_tokenizer, assets.lyric_tokenizer, assets.mel, device=device)

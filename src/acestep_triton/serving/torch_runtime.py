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
:func:`runner_call` plugs the very same runners into the Triton denoiser in-process, so a
benchmark can compare "through Triton" with "the same compiled components called directly".

Runtime LoRA adapters (:class:`RuntimeLoraOptions`, :mod:`acestep_triton.lora.runtime`): the
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
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoint import (
    CheckpointLayout,
    load_dcae,
    load_text_encoder,
    load_transformer,
    load_vocoder,
)
from ..export.adapters import ComponentGraph, component_graph
from ..export.specs import COMPONENTS, ComponentSpec

if TYPE_CHECKING:
    from ..lora.runtime import AdapterBank

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


def parse_flag(value: str | bool | None, default: bool, name: str) -> bool:
    """A boolean config parameter (``true``/``false``/``1``/``0``/``auto`` or empty = default)."""
    if isinstance(value, bool):
        return value
    text = (value or "auto").strip().lower()
    if text in ("auto", ""):
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"config parameter {name}: expected true, false or auto, got {value!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """How one component instance runs. ``compile``/``cuda_graphs`` only act on the DiT decoder
    (where the time goes) and only on a CUDA device; elsewhere they are accepted and ignored."""

    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    max_graphs: int = 16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"config parameter precision: expected one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.device.type == "cpu" and self.precision != "fp32":
            raise ValueError(f"config parameter precision: {self.precision} on the CPU is not supported "
                             "(CPU instances run fp32)")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @classmethod
    def for_component(cls, name: str, device: torch.device, parameters: Mapping[str, str] | None = None
                      ) -> RuntimeOptions:
        """Options from a model's config parameters (``precision``, ``compile``, ``cuda_graphs``,
        ``max_graphs``), with the per-device defaults for whatever they leave out."""
        parameters = parameters or {}
        on_gpu = device.type == "cuda"
        precision = parameters.get("precision") or (GPU_DEFAULT_PRECISION[name] if on_gpu else "fp32")
        if precision == "auto":
            precision = GPU_DEFAULT_PRECISION[name] if on_gpu else "fp32"
        return cls(device=device, precision=precision,
                   compile=parse_flag(parameters.get("compile"), on_gpu, "compile"),
                   cuda_graphs=parse_flag(parameters.get("cuda_graphs"), on_gpu, "cuda_graphs"),
                   max_graphs=int(parameters.get("max_graphs") or 16))


def _drop(module: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        setattr(module, name, None)


def load_component_module(name: str, ckpt_dir: str | Path, *, lora_path: str | Path | None = None,
                          lora_weight: float = 1.0, lora_scaling: str = "upstream") -> nn.Module:
    """The torch model served as component ``name``, strictly loaded from the checkpoint (fp32).

    Only the files the component needs are read. The transformer loses the half the component
    does not run (:data:`ENCODE_ONLY` / :data:`DECODE_ONLY`). With ``lora_path`` the adapter is
    fused at ``lora_weight`` (a LoRA variant model such as ``dit_decoder__rap``).
    """
    layout = CheckpointLayout(Path(ckpt_dir))
    if name == "text_encoder":
        return load_text_encoder(layout)
    if name in ("condition_encoder", "dit_decoder"):
        transformer = load_transformer(layout)
        if lora_path is not None:
            from ..lora import fused_transformer, load_lora

            adapter = load_lora(lora_path, transformer, scaling=lora_scaling)
            transformer = fused_transformer(transformer, adapter, lora_weight)
        _drop(transformer, DECODE_ONLY if name == "condition_encoder" else ENCODE_ONLY)
        return transformer
    if lora_path is not None:
        raise ValueError(f"{name}: LoRA adapters touch only the transformer components")
    if name in ("dcae_encoder", "dcae_decoder"):
        encoder, decoder = load_dcae(layout)
        return encoder if name == "dcae_encoder" else decoder
    if name == "vocoder":
        vocoder = load_vocoder(layout)
        vocoder.fold_weight_norm()  # what export traces too: plain weights, same function
        return vocoder
    raise KeyError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")


@dataclass(frozen=True)
class RuntimeLoraOptions:
    """Runtime adapters of a transformer-component instance (config parameters ``lora_state``,
    ``lora_memory_mb``): the state file naming the loaded adapters, the byte budget of the
    resident A/B tensors, and where the instance reports what it holds."""

    state_file: Path
    budget_bytes: int
    status_file: Path | None = None
    model_name: str | None = None

    @classmethod
    def from_parameters(cls, model_name: str, parameters: Mapping[str, str]) -> RuntimeLoraOptions | None:
        """None unless the config names a ``lora_state`` file (runtime adapters are on)."""
        import os

        from ..lora.control import STATUS_DIR
        from ..lora.runtime import parse_budget_mb

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
    ``lora_scale`` select a runtime adapter and strength per batch row
    (:class:`~acestep_triton.lora.runtime.AdapterBank`). Batches where a row uses one run the
    DiT outside its CUDA graphs and compiled blocks (eager; the graphs were captured without the
    low-rank terms); batches without any adapter row run exactly as without ``loras``.
    """

    def __init__(self, spec: ComponentSpec, module: nn.Module, options: RuntimeOptions,
                 loras: RuntimeLoraOptions | None = None) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device
        module = module.to(device=options.device, dtype=options.dtype).eval().requires_grad_(False)
        self.graph: ComponentGraph = component_graph(spec.name, module)
        self.forward: Any = self.graph
        self.compiled = False
        self.cuda_graphs = False
        self.loras: AdapterBank | None = None
        if loras is not None:
            self.loras = self._adapter_bank(module, loras)
        if spec.name == "dit_decoder" and self.device.type == "cuda":
            transformer = self.graph.transformer
            if options.compile:
                import torch._dynamo

                # Every (batch, bucket) shape is a new specialisation: allow enough of them, and
                # let dynamo switch to shape-generic kernels after the first recompile (dynamic=None)
                # instead of compiling one program per shape.
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                for block in transformer.transformer_blocks:
                    block.compile()  # one compilation serves every block (same code, weights as inputs)
                self.compiled = True
            if options.cuda_graphs:
                from ..gpu import CUDAGraphDecoder

                self.forward = CUDAGraphDecoder(transformer, max_graphs=options.max_graphs)
                self.cuda_graphs = True

    def _adapter_bank(self, module: nn.Module, loras: RuntimeLoraOptions) -> AdapterBank:
        """The instance's adapter cache; probes which projections the forward really calls (once,
        before any compilation, on a one-item example)."""
        from ..lora.runtime import AdapterBank, called_modules
        from ..lora.state import StateReader

        if self.spec.name not in ("condition_encoder", "dit_decoder"):
            raise ValueError(f"{self.spec.name}: runtime LoRA adapters touch only the transformer components")
        example = [t.to(self.device) for t in self.graph.example_inputs(1, 4).values()]
        with torch.inference_mode():
            reachable = called_modules(module, lambda: self.graph(*example))
        bank = AdapterBank(self.spec.name, module, StateReader(loras.state_file), reachable=reachable,
                           device=self.device, dtype=self.options.dtype, budget_bytes=loras.budget_bytes,
                           status_file=loras.status_file, model_name=loras.model_name)
        bank.write_status()
        return bank

    @property
    def description(self) -> str:
        parts = [f"{self.spec.name} on {self.device} ({self.options.precision})"]
        if self.compiled:
            parts.append("TorchInductor blocks")
        if self.cuda_graphs:
            parts.append("CUDA graphs per shape")
        if self.loras is not None:
            parts.append(f"runtime LoRA adapters (budget {self.loras.budget_bytes / 2**20:.0f} MiB)")
        return ", ".join(parts)

    @torch.inference_mode()
    def __call__(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [n for n in self.spec.input_names if n not in inputs]
        if missing:
            raise ValueError(f"input {missing[0]!r} is missing")
        args = [inputs[n].to(self.device) for n in self.spec.input_names]
        if self.loras is None:
            result = self.forward(*args)
        else:
            with self.loras.apply(inputs.get("lora_index"), inputs.get("lora_scale")) as active:
                if active and (self.compiled or self.cuda_graphs):
                    with _eager_blocks(self.graph.transformer):
                        result = self.graph(*args)
                else:
                    result = self.forward(*args)
        outputs = list(result) if isinstance(result, tuple | list) else [result]
        return [o.float().contiguous() for o in outputs]


def load_runner(name: str, ckpt_dir: str | Path, options: RuntimeOptions, **lora: Any) -> ComponentRunner:
    """:func:`load_component_module` + :class:`ComponentRunner` (``lora``: its LoRA keywords)."""
    return ComponentRunner(COMPONENTS[name], load_component_module(name, ckpt_dir, **lora), options)


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


def runtime_generator(ckpt_dir: str | Path, vocab_path: str | Path | None = None, *,
                      device: torch.device | str = "cpu",
                      parameters: Mapping[str, Mapping[str, str]] | None = None,
                      buckets: Any = None) -> Any:
    """The in-process twin of a torch-runtime deployment: a ``MusicGenerator`` whose denoiser
    calls the same :class:`ComponentRunner` objects the served models run (compiled DiT and
    CUDA graphs on a GPU), padded to the same shape ``buckets`` (default: the endpoints'
    default ladder; ``ShapeBuckets()`` for none). Only the Triton layer is missing, which is
    what a "Triton vs in-process" benchmark needs to isolate."""
    from ..pipeline import MusicGenerator
    from ..sampling.buckets import BucketedDenoiser, ShapeBuckets
    from .assets import load_assets, write_assets
    from .orchestrator import TritonDenoiser

    device = torch.device(device)
    runners = load_runners(ckpt_dir, device, parameters)
    with tempfile.TemporaryDirectory() as tmp:
        assets = load_assets(write_assets(ckpt_dir, Path(tmp) / "assets", vocab_path))
    denoiser: Any = TritonDenoiser(runner_call(runners), assets.text_layers, assets.lyric_layers,
                                   assets.dit_layers)
    buckets = ShapeBuckets.default() if buckets is None else buckets
    if buckets.enabled:
        denoiser = BucketedDenoiser(denoiser, buckets)
    return MusicGenerator(denoiser, assets.prompt_tokenizer, assets.lyric_tokenizer, assets.mel, device=device)

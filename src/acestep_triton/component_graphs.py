"""The component graphs: thin ``nn.Module`` wrappers that give each served component exactly its
contract signature. What ONNX export traces and what the ``torch`` runtime serves
(``serving/torch_runtime.py``) are the same graphs, so they live beside the models, not in
``export/``.

The torch models have Python-friendly signatures (optional query scales, one transformer with
``encode`` and ``decode``, a vocoder that still carries weight-norm pairs). ONNX export traces a
module's ``forward`` with positional tensors, so each served component gets an adapter here whose
``forward`` takes the contract's inputs in the contract's order and returns its outputs in order
(``export/specs.py`` is the one home of those names; nothing here restates them).

Each adapter also knows the sizes the checkpoint fixes (``Ct``, ``D``, ``Lt``...) and how to make
plausible example inputs of a given batch and length, with shapes resolved from the contract.
Export traces one such example; the parity check feeds another of a different size, which is what
proves that the dynamic axes really are dynamic.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .export import specs
from .export.specs import ComponentSpec, TensorSpec

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16, "FP64": torch.float64,
    "INT64": torch.int64, "INT32": torch.int32, "INT16": torch.int16, "INT8": torch.int8,
    "UINT8": torch.uint8, "BOOL": torch.bool,
}
"""Triton dtype names of the contract → torch dtypes of the example inputs."""

ERG_SCALE = 0.01
"""The weakened query factor of ERG; example query scales mix it with 1.0 so parity covers both."""


def torch_dtype(spec: TensorSpec) -> torch.dtype:
    """The torch dtype of a contract tensor."""
    return _TORCH_DTYPES[spec.dtype]


def prefix_mask(batch: int, length: int, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """``[batch, length]`` masks of 1s then 0s: item 0 uses the full length (so the longest item
    fills the tensor, as in a real padded batch), the others a random length of at least 1."""
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)


def example_query_scale(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Per-item, per-layer query scales ``[B, L]`` mixing 1.0 and :data:`ERG_SCALE`: row 0 is all
    ones (a normal branch), the other rows weaken random layers (at least the last), so a parity
    check covers normal and weakened attention and rows that differ within one batch."""
    weakened = torch.rand(shape, generator=generator) < 0.3
    weakened[0] = False
    weakened[1:, -1] = True
    return torch.where(weakened, torch.tensor(ERG_SCALE), torch.tensor(1.0)).float()


class ComponentGraph(nn.Module):
    """Base of the adapters: ``forward`` takes the contract inputs in order.

    Subclasses set :attr:`spec`, implement ``forward``, :meth:`checkpoint_sizes` (fixed symbols)
    and :meth:`dynamic_sizes` (what "batch, length" means for this component), and may override
    :meth:`vocab_size` / :meth:`fill` for inputs that are not plain normal noise.
    """

    spec: ClassVar[ComponentSpec]

    def checkpoint_sizes(self) -> dict[str, int]:
        """Sizes of the checkpoint-fixed symbols this component's inputs and outputs use."""
        return {}

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        """Sizes of the dynamic symbols for an example of ``batch`` items and ``length``."""
        raise NotImplementedError

    def vocab_size(self, name: str) -> int:
        """Number of token ids an INT64 id input accepts."""
        raise KeyError(f"{self.spec.name}: no vocabulary for input {name!r}")

    def fill(self, tensor: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Values for one input, chosen by its role (read from the contract name's suffix)."""
        dtype = torch_dtype(tensor)
        if tensor.name.endswith("query_scale"):
            return example_query_scale(shape, generator)
        if tensor.name.endswith("mask"):
            return prefix_mask(shape[0], shape[1], dtype, generator)
        if dtype == torch.int64:
            return torch.randint(0, self.vocab_size(tensor.name), shape, generator=generator)
        return torch.randn(shape, generator=generator, dtype=dtype)

    def example_inputs(self, batch: int, length: int, *, seed: int = 0) -> dict[str, Tensor]:
        """Contract inputs (name → tensor, in contract order) for ``batch`` items of ``length``."""
        generator = torch.Generator().manual_seed(seed)
        sizes = {**self.checkpoint_sizes(), **self.dynamic_sizes(batch, length)}
        inputs: dict[str, Tensor] = {}
        for tensor in self.spec.inputs:
            shape = tensor.resolve(sizes)
            if any(d < 1 for d in shape):
                raise ValueError(f"{self.spec.name}.{tensor.name}: unresolved shape {shape}")
            inputs[tensor.name] = self.fill(tensor, shape, generator)
        return inputs


class TextEncoderGraph(ComponentGraph):
    """``text_encoder``: UMT5 ids and mask plus the per-block query scale → last hidden state."""

    spec = specs.TEXT_ENCODER

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def checkpoint_sizes(self) -> dict[str, int]:
        return {"Lt": int(self.text_encoder.num_layers), "Ct": int(self.text_encoder.hidden_size)}

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        return {"B": batch, "T": length}

    def vocab_size(self, name: str) -> int:
        return int(self.text_encoder.config.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, query_scale: Tensor) -> Tensor:
        return self.text_encoder(input_ids, attention_mask, query_scale)


class ConditionEncoderGraph(ComponentGraph):
    """``condition_encoder``: the transformer's ``encode`` (speaker | text | lyric tokens)."""

    spec = specs.CONDITION_ENCODER

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def checkpoint_sizes(self) -> dict[str, int]:
        config = self.transformer.config
        return {"Ct": int(config.text_embedding_dim), "D": int(config.inner_dim),
                "Ll": int(self.transformer.lyric_layers)}

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        # Lyrics longer than the prompt and of a different length, so a swapped axis shows.
        lyric = 2 * length + 1
        return {"B": batch, "T": length, "Tl": lyric, "S": 1 + length + lyric}

    def vocab_size(self, name: str) -> int:
        return int(self.transformer.config.lyric_encoder_vocab_size)

    def forward(self, text_states: Tensor, text_mask: Tensor, speaker: Tensor, lyric_ids: Tensor,
                lyric_mask: Tensor, lyric_query_scale: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer.encode(text_states, text_mask, speaker, lyric_ids, lyric_mask,
                                       lyric_query_scale)


class DiTDecoderGraph(ComponentGraph):
    """``dit_decoder``: the transformer's ``decode`` (velocity of the latents at a timestep)."""

    spec = specs.DIT_DECODER

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def checkpoint_sizes(self) -> dict[str, int]:
        return {"D": int(self.transformer.config.inner_dim), "Ld": int(self.transformer.num_layers)}

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        return {"B": batch, "W": length, "S": length // 2 + 5}

    def fill(self, tensor: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        if tensor.name == "timestep":  # sigma x 1000
            return torch.rand(shape, generator=generator) * 1000.0
        return super().fill(tensor, shape, generator)

    def forward(self, latents: Tensor, latent_mask: Tensor, encoder_states: Tensor, encoder_mask: Tensor,
                timestep: Tensor, query_scale: Tensor) -> Tensor:
        return self.transformer.decode(latents, latent_mask, encoder_states, encoder_mask, timestep,
                                       query_scale)


def _log_mel_like(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Values in the range of ACE-Step's log-mel images ([-11, 3], mostly around -5)."""
    return (torch.randn(shape, generator=generator) * 2.0 - 5.0).clamp(-11.0, 3.0)


class DCAEEncoderGraph(ComponentGraph):
    """``dcae_encoder``: log-mel → scaled latents (the wrapper already has this signature)."""

    spec = specs.DCAE_ENCODER

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        # ``length`` counts latent frames; the DCAE compresses time as much as the mel rows.
        mel_rows, latent_rows = self.spec.inputs[0].shape[2], self.spec.outputs[0].shape[2]
        return {"B": batch, "W": length, "F": length * int(mel_rows) // int(latent_rows)}

    def fill(self, tensor: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return _log_mel_like(shape, generator)

    def forward(self, mel: Tensor) -> Tensor:
        return self.encoder(mel)


class DCAEDecoderGraph(ComponentGraph):
    """``dcae_decoder``: scaled latents → denormalised log-mel."""

    spec = specs.DCAE_DECODER

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        return {"B": batch, "W": length}

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)


class VocoderGraph(ComponentGraph):
    """``vocoder``: one log-mel channel per row → waveform."""

    spec = specs.VOCODER

    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def dynamic_sizes(self, batch: int, length: int) -> dict[str, int]:
        return {"B": batch, "F": length}

    def fill(self, tensor: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return _log_mel_like(shape, generator)

    def forward(self, mel: Tensor) -> Tensor:
        return self.vocoder(mel)


GRAPHS: dict[str, type[ComponentGraph]] = {
    cls.spec.name: cls
    for cls in (TextEncoderGraph, ConditionEncoderGraph, DiTDecoderGraph, DCAEEncoderGraph,
                DCAEDecoderGraph, VocoderGraph)
}
"""Adapter class per served component, in contract (data-path) order."""

SOURCE_ATTRIBUTES: dict[str, str] = {
    "text_encoder": "text_encoder", "condition_encoder": "transformer", "dit_decoder": "transformer",
    "dcae_encoder": "dcae_encoder", "dcae_decoder": "dcae_decoder", "vocoder": "vocoder",
}
"""Which attribute of ``checkpoint.Components`` each served component is cut from."""

if set(GRAPHS) != set(specs.COMPONENTS) or set(SOURCE_ATTRIBUTES) != set(specs.COMPONENTS):
    raise ImportError("component_graphs is out of date with export.specs.COMPONENTS")


def component_graph(name: str, module: nn.Module) -> ComponentGraph:
    """Wrap a torch model (or pass an adapter through) as the served component ``name``.

    ``module`` is what :data:`SOURCE_ATTRIBUTES` names: the whole transformer for both
    ``condition_encoder`` and ``dit_decoder``. The wrapped module is shared, not copied.
    """
    cls = GRAPHS[specs.component(name).name]
    if isinstance(module, ComponentGraph):
        if not isinstance(module, cls):
            raise TypeError(f"{name}: got the adapter {type(module).__name__}, expected {cls.__name__}")
        return module
    return cls(module).eval()


def export_graph(name: str, module: nn.Module) -> ComponentGraph:
    """The adapter to trace for export: like :func:`component_graph`, except that the vocoder is
    a copy with its weight norm folded into plain weights (the original stays untouched, so a
    parity check against it also covers the folding)."""
    graph = component_graph(name, module)
    if isinstance(graph, VocoderGraph):
        folded = copy.deepcopy(graph.vocoder)
        folded.fold_weight_norm()
        graph = VocoderGraph(folded).eval()
    return graph


def component_sources(components: Any) -> dict[str, nn.Module]:
    """Served component name → torch model, from a ``checkpoint.Components`` (or any object with
    its attributes) or from a mapping already keyed by served component names."""
    if isinstance(components, Mapping):
        unknown = sorted(set(components) - set(specs.COMPONENTS))
        if unknown:
            raise KeyError(f"unknown components {unknown}; known: {', '.join(specs.COMPONENTS)}")
        return {name: components[name] for name in specs.COMPONENTS if name in components}
    return {name: getattr(components, attr) for name, attr in SOURCE_ATTRIBUTES.items()}

"""The served component contract, as data (its one home; docs/ARCHITECTURE.md shows it as a table).

Tensor names, dtypes and shapes written here are what the ONNX exporter names its graph inputs
and outputs, what the repository renderer writes into every ``config.pbtxt`` (CPU and GPU alike),
and what the Triton backend sends. Shapes are written with symbols so that one table serves the
tiny test checkpoint and the real 3.5B one:

* ``B`` - the batch (always the leading dim when present);
* dynamic per request: ``T`` text tokens, ``Tl`` lyric tokens, ``S`` = 1 + T + Tl encoder tokens,
  ``W`` latent frames, ``F`` mel frames, ``N`` audio samples;
* fixed per checkpoint (read when rendering from the exported ONNX files, or for the torch
  runtime from the checkpoint's config files): ``Ct`` text width, ``D`` transformer width,
  ``Lt``/``Ll``/``Ld`` layer counts of the text encoder, the lyric Conformer and the DiT (one
  query-scale entry per layer);
* integers are fixed by the architecture (8 latent channels, 16 latent height, 128 mel bins...).

A config dim is ``-1`` for every symbol unless the renderer was given the checkpoint's sizes.
Every contract tensor leads with ``B`` (query scales too: one row per item, so all guidance
branches of a step share one call), which lets Triton batch requests dynamically; a ``[B]``-only
tensor (``timestep``) therefore travels as ``[B, 1]`` (see :meth:`ComponentSpec.request_shape`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from acestep_client.params import MAX_BATCH

BATCH = "B"
DYNAMIC_SYMBOLS = ("B", "T", "Tl", "S", "W", "F", "N")
CHECKPOINT_SYMBOLS = ("Ct", "D", "Lt", "Ll", "Ld")
TRITON_DTYPES = ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64",
                 "BYTES")

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a served model: Triton dtype (without ``TYPE_``) and symbolic shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    description: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unknown Triton dtype {self.dtype!r}")
        for i, d in enumerate(self.shape):
            if isinstance(d, str) and d not in DYNAMIC_SYMBOLS + CHECKPOINT_SYMBOLS:
                raise ValueError(f"{self.name}: unknown dim symbol {d!r}")
            if d == BATCH and i != 0:
                raise ValueError(f"{self.name}: the batch dim must lead (Triton batches dim 0)")
            if isinstance(d, int) and d < 1 and d != -1:
                raise ValueError(f"{self.name}: bad dim {d}")

    @property
    def batch_dim(self) -> int | None:
        """Index of the batch dim (0), or ``None`` for a per-call tensor such as a query scale."""
        return 0 if self.shape and self.shape[0] == BATCH else None

    @property
    def dims(self) -> tuple[int, ...]:
        """The full shape with ``-1`` for every symbol (what a config with max_batch_size 0 says)."""
        return self.resolve({})

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The full shape with known symbols replaced by their sizes and the rest ``-1``."""
        return tuple(d if isinstance(d, int) else int(sizes.get(d, -1)) for d in self.shape)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{axis: symbol}`` for ``torch.onnx.export(dynamic_axes=...)``; checkpoint-fixed
        symbols are left static because the export traces one checkpoint."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str) and d in DYNAMIC_SYMBOLS}


@dataclass(frozen=True)
class ComponentSpec:
    """A served component: its model name, ordered inputs and ordered outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    rows_per_item: int = 1
    """Batch rows one requested song takes in a call (the vocoder gets one row per stereo
    channel, the DiT one per CFG branch): sizes ``max_batch_size`` and TensorRT profiles."""

    def max_batch(self, max_items: int = MAX_BATCH) -> int:
        """The largest B a request of ``max_items`` songs sends to this component."""
        return max_items * self.rows_per_item

    @property
    def batchable(self) -> bool:
        """True when every tensor leads with the batch dim, so Triton may batch requests
        (``max_batch_size`` > 0, dynamic batching). A per-call tensor (query scale) rules it out:
        Triton would prepend a batch dim to it too."""
        return all(t.batch_dim == 0 for t in self.inputs + self.outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def request_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a caller sends for tensor ``name`` whose model-side shape is ``shape``.

        Identical except for a batched component's ``[B]``-only tensors (``timestep``): Triton
        config dims cannot be empty, so their config is ``dims: [1]`` with ``reshape: []`` and
        requests carry ``[B, 1]``; the model still sees ``[B]``. Outputs come back the same way.
        """
        tensor = self.tensor(name)
        if self.batchable and tensor.shape == (BATCH,):
            return (*tuple(shape), 1)
        return tuple(shape)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every input's and output's dynamic axes, keyed by tensor name (ONNX export)."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}


def _t(name: str, dtype: str, *shape: Dim, description: str = "") -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), description=description)


TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    description="UMT5 encoder over the prompt tokens; query_scale is the per-layer ERG scale",
    inputs=(
        _t("input_ids", "INT64", "B", "T"),
        _t("attention_mask", "INT64", "B", "T", description="1 = keep"),
        _t("query_scale", "FP32", "B", "Lt", description="per item and layer; 1.0 normal, 0.01 ERG"),
    ),
    outputs=(_t("last_hidden_state", "FP32", "B", "T", "Ct"),),
    rows_per_item=2,  # the prompt, and its ERG-weakened encoding for the unconditional branch
)

CONDITION_ENCODER = ComponentSpec(
    name="condition_encoder",
    description="DiT encode: speaker token | prompt states | lyric Conformer, S = 1 + T + Tl",
    inputs=(
        _t("text_states", "FP32", "B", "T", "Ct"),
        _t("text_mask", "INT64", "B", "T"),
        _t("speaker", "FP32", "B", 512),
        _t("lyric_ids", "INT64", "B", "Tl"),
        _t("lyric_mask", "INT64", "B", "Tl"),
        _t("lyric_query_scale", "FP32", "B", "Ll", description="per item and Conformer block"),
    ),
    outputs=(
        _t("encoder_states", "FP32", "B", "S", "D"),
        _t("encoder_mask", "FP32", "B", "S"),
    ),
    rows_per_item=3,  # conditional, unconditional and text-only (double condition) conditions
)

DIT_DECODER = ComponentSpec(
    name="dit_decoder",
    description="DiT decode (the hot loop): velocity for latents at a timestep; CFG branches batched",
    inputs=(
        _t("latents", "FP32", "B", 8, 16, "W"),
        _t("latent_mask", "FP32", "B", "W"),
        _t("encoder_states", "FP32", "B", "S", "D"),
        _t("encoder_mask", "FP32", "B", "S"),
        _t("timestep", "FP32", "B", description="sent as [B, 1] on the wire, see request_shape()"),
        _t("query_scale", "FP32", "B", "Ld", description="scales to_q in self- and cross-attention"),
    ),
    outputs=(_t("velocity", "FP32", "B", 8, 16, "W"),),
    rows_per_item=3,  # conditional, unconditional and text-only (double condition) branches
)

DCAE_ENCODER = ComponentSpec(
    name="dcae_encoder",
    description="log-mel (not normalised) to scaled latents",
    inputs=(_t("mel", "FP32", "B", 2, 128, "F"),),
    outputs=(_t("latents", "FP32", "B", 8, 16, "W"),),
)

DCAE_DECODER = ComponentSpec(
    name="dcae_decoder",
    description="scaled latents to denormalised log-mel",
    inputs=(_t("latents", "FP32", "B", 8, 16, "W"),),
    outputs=(_t("mel", "FP32", "B", 2, 128, "F"),),
)

VOCODER = ComponentSpec(
    name="vocoder",
    description="log-mel, one channel per row, to a 44.1 kHz waveform",
    inputs=(_t("mel", "FP32", "B", 128, "F"),),
    outputs=(_t("waveform", "FP32", "B", 1, "N"),),
    rows_per_item=2,  # one row per stereo channel
)

COMPONENTS: dict[str, ComponentSpec] = {
    c.name: c for c in (TEXT_ENCODER, CONDITION_ENCODER, DIT_DECODER, DCAE_ENCODER, DCAE_DECODER, VOCODER)
}
"""Every served component by model name, in data-path order."""

SAMPLING_DEVICES = ("cpu", "cuda")
"""Values of an endpoint's ``sampling_device`` config parameter (renderer and orchestrator)."""


def component(name: str) -> ComponentSpec:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise KeyError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}") from None


# ------------------------------------------------------------------------------ live LoRA rows
LORA_ROW_INPUTS = (
    TensorSpec("lora_index", "INT32", (BATCH,), optional=True,
               description="live LoRA adapter per row (-1: none); sent as [B, 1] like timestep"),
    TensorSpec("lora_scale", "FP32", (BATCH,), optional=True,
               description="lora_weight per row (0: none)"),
)
"""Extra inputs of ``condition_encoder`` and ``dit_decoder`` in a ``torch``-runtime deployment
with live adapters (``acestep_triton.lora.live``): one row per batch row, so requests using
different adapters, or none, batch together. ONNX graphs and engines do not have them."""

LORA_ROW_COMPONENTS = ("condition_encoder", "dit_decoder")


def with_lora_rows(spec: ComponentSpec) -> ComponentSpec:
    """``spec`` plus :data:`LORA_ROW_INPUTS` for the transformer components (others unchanged)."""
    if spec.name not in LORA_ROW_COMPONENTS or "lora_index" in spec.input_names:
        return spec
    return replace(spec, inputs=spec.inputs + LORA_ROW_INPUTS)


def read_onnx_sizes(spec: ComponentSpec, path: Path) -> dict[str, int]:
    """Check an exported ONNX file against the contract and read its checkpoint-fixed sizes.

    Every contract input and output must exist in the graph with the contract's rank; a fixed
    ONNX dim under a checkpoint symbol (``Ct``, ``D``, ``Lt``...) gives that symbol's size.
    Weights are not loaded (``load_external_data=False``).
    """
    import onnx  # only when an exported file is read: the contract itself needs no onnx

    model = onnx.load(str(path), load_external_data=False)
    graph_io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    sizes: dict[str, int] = {}
    for t in spec.inputs + spec.outputs:
        if t.name not in graph_io:
            raise ValueError(f"{path.name}: no tensor {t.name!r}, which the {spec.name} contract needs "
                             f"(graph has {sorted(graph_io)})")
        dims = graph_io[t.name].type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise ValueError(f"{path.name}: {t.name} has rank {len(dims)}, the contract says "
                             f"{len(t.shape)} {list(t.shape)}")
        for symbol, dim in zip(t.shape, dims, strict=True):
            fixed = dim.dim_value if dim.HasField("dim_value") else None
            if isinstance(symbol, int):
                if fixed is not None and fixed != symbol:
                    raise ValueError(f"{path.name}: {t.name} dim is {fixed}, the contract says {symbol}")
            elif fixed is not None and symbol in DYNAMIC_SYMBOLS:
                raise ValueError(f"{path.name}: {t.name} was exported with a fixed size {fixed} for the "
                                 f"dynamic dim {symbol} (export it as a dynamic axis)")
            elif fixed is not None and sizes.setdefault(symbol, fixed) != fixed:
                raise ValueError(f"{path.name}: {symbol} is both {sizes[symbol]} and {fixed}")
    return sizes

"""LoRA adapters for the ACE-Step transformer: loading, fusing, live adapters, registry, serving.

What upstream does (facts, from ``acestep/pipeline_ace_step.py`` ``load_lora``): it hands the
adapter's ``pytorch_lora_weights.safetensors`` to diffusers' ``load_lora_adapter`` (no key prefix,
no ``adapter_config.json``), then calls ``set_weights_and_activate_adapters(model, [name],
[lora_weight])``, i.e. peft's ``LoraLayer.set_scale(name, lora_weight)`` on every adapted layer.
That sets the layer's scaling to ``lora_weight * lora_alpha / r`` and each adapted ``Linear``
computes ``W x + b + scaling * B (A x)``. Three consequences this package reproduces:

* ``lora_weight`` scales the weight delta **linearly** (``0`` is exactly no LoRA);
* ``lora_alpha`` is whatever diffusers read from the file: the ``lora_adapter_metadata`` JSON in
  the safetensors header (diffusers >= 0.35 writes the ``LoraConfig`` there), otherwise
  ``alpha = r`` for every layer (diffusers' convention for alpha-less files: scaling 1);
* ``use_rslora`` has no effect: ``set_scale`` recomputes ``alpha / r`` without the rank
  stabilisation (peft issue #2733), although training used ``alpha / sqrt(r)`` (upstream's
  ``config/zh_rap_lora_config.json`` trains r=256, alpha=32, ``use_rslora: true``).

Modules (one job each; this package re-exports their public names):

* :mod:`.files`: reading an adapter onto our module paths, ``scaling="upstream"`` (default:
  upstream's numbers) or ``"peft"`` (training-time semantics: rsLoRA honoured);
* :mod:`.fuse`: ``W' = W + lora_weight * scaling * B @ A`` in place with bit-exact restore
  (:func:`apply_lora`) or into a copy (:func:`fused_transformer`);
* :mod:`.live`: live adapters (loaded while the server runs), the low-rank term added per batch
  row by the ``torch`` component runtime (:class:`AdapterBank`);
* :mod:`.registry`: the registry folder (one sub-folder per adapter) and :class:`LoraRegistry`;
  :mod:`.state` and :mod:`.live_control`: the adapters a running server serves, loaded and
  unloaded while it runs by the ``lora_registry`` model;
* :mod:`.variants`: fused variant models (``dit_decoder__rap``) and their ONNX export;
* :mod:`.served`: the per-request scopes (in-process, fused routing, live-adapter rows);
* :mod:`.cli`: ``python -m acestep_triton.lora`` (the deterministic tiny test adapter itself is
  :mod:`acestep_triton.synthetic.tiny_lora`).

Serving strategy (for the docs)
-------------------------------
LoRA lives in the transformer, which is served as two components: ``condition_encoder`` (the
speaker/genre embedders and the lyric Conformer: upstream's ``linear_q/k/v`` targets) and
``dit_decoder`` (the DiT blocks: ``to_q/k/v/out.0``). Per runtime:

(a) **``torch`` runtime: live adapters** (any adapter, any strength, per request). The two
    components keep one copy of the base weights; each adapted projection adds
    ``s_row * B (A x)`` for the rows that use an adapter (:mod:`.live`). The adapter travels
    as per-row inputs ``lora_index`` INT32 / ``lora_scale`` FP32, so Triton's dynamic batcher
    merges requests using different adapters, or none, into one call. Memory per adapter: its
    A/B tensors (upstream's rap targets at r=256 on the 3.5B shapes: 262 M parameters, against
    2.59 G for the two transformer halves), not a model copy.
    Cost per step: two thin matmuls per adapted projection for the rows that use it (measured
    in ``benchmarks/lora_live_adapters.py``); rows without adapter cost nothing. Adapters are loaded,
    unloaded and listed while the server runs (:mod:`.live_control`), within a memory budget.
(b) **``onnx`` / ``tensorrt``: fused variants** from a configured set. Each configured adapter,
    at one configured ``lora_weight``, gets its own fused copies of the components it touches,
    served as ``condition_encoder__<name>`` / ``dit_decoder__<name>`` (:func:`export_lora_variants`).
    The orchestrator routes a request naming the adapter to them (:class:`ServedLoras`); another
    ``lora_weight`` than the fused one is rejected naming ``lora_weight``. Zero cost per step, but
    a full copy of each touched component per adapter and strength (about 5 GB for the 3.5B DiT
    in bf16) and one engine build per variant; requests for different adapters never share a
    batch. Exported graphs and engines have no hook points, hence no live adapters there.
(c) In-process (``--local``): any adapter path at any strength, fused per request
    (:class:`InProcessLoras`) and restored bit-exactly afterwards.

Files: ``python -m acestep_triton.lora tiny --checkpoint C --out D`` writes the deterministic
tiny adapter for the tiny checkpoint; ``python -m acestep_triton.lora inspect PATH`` summarises one.
"""

from __future__ import annotations

from .files import (
    ADAPTER_CONFIG_FILE,
    COMPONENT_OF_MODULE,
    DECODER_MODULES,
    ENCODER_MODULES,
    KEY_PREFIXES,
    LORA_COMPONENTS,
    LORA_WEIGHTS_FILE,
    METADATA_KEY,
    NO_LORA,
    PEFT_WEIGHTS_FILE,
    SCALING_MODES,
    SERVING_FILE,
    UPSTREAM_TARGET_MODULES,
    VARIANT_SEPARATOR,
    VARIANTS_FILE,
    LoraAdapter,
    LoraError,
    LoraLayer,
    LoraSettings,
    adapter_file,
    component_of,
    load_lora,
)
from .fuse import apply_lora, fuse_in_place, fused_transformer
from .live import AdapterBank, LiveAdapter, called_modules, live_adapter, lora_rows
from .registry import LoraRegistry, check_adapter_name, check_weight_range, is_no_lora
from .served import InProcessLoras, LiveLoras, LoraScope, RoutingCall, ServedLoras, no_lora, served_scope
from .state import LIVE_POINTER_FILE, NO_ADAPTER, STATE_FILE, LoadedAdapter, LoraState, StateReader
from .variants import (
    LoraVariant,
    base_component,
    export_lora_variants,
    prepare_lora_onnx_dir,
    read_variants_manifest,
    variant_model_name,
    variant_specs,
    write_variants_manifest,
)

__all__ = [
    "ADAPTER_CONFIG_FILE", "COMPONENT_OF_MODULE", "DECODER_MODULES", "ENCODER_MODULES", "KEY_PREFIXES",
    "LIVE_POINTER_FILE", "LORA_COMPONENTS", "LORA_WEIGHTS_FILE", "METADATA_KEY", "NO_ADAPTER", "NO_LORA",
    "PEFT_WEIGHTS_FILE", "SCALING_MODES", "SERVING_FILE", "STATE_FILE", "UPSTREAM_TARGET_MODULES", "VARIANTS_FILE",
    "VARIANT_SEPARATOR", "AdapterBank", "InProcessLoras", "LiveAdapter", "LiveLoras", "LoadedAdapter", "LoraAdapter",
    "LoraError", "LoraLayer", "LoraRegistry", "LoraScope", "LoraSettings", "LoraState", "LoraVariant",
    "RoutingCall", "ServedLoras", "StateReader", "adapter_file", "apply_lora", "base_component",
    "called_modules", "check_adapter_name", "check_weight_range", "component_of", "export_lora_variants",
    "fuse_in_place", "fused_transformer", "is_no_lora", "live_adapter", "load_lora", "lora_rows", "no_lora",
    "prepare_lora_onnx_dir", "read_variants_manifest", "served_scope", "variant_model_name", "variant_specs",
    "write_variants_manifest",
]

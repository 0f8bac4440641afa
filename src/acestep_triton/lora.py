"""LoRA adapters for the ACE-Step transformer: loading, fusing, a tiny test adapter, and serving.

What upstream does (facts, from ``acestep/pipeline_ace_step.py`` ``load_lora``): it hands the
adapter's ``pytorch_lora_weights.safetensors`` to diffusers' ``load_lora_adapter`` (no key prefix,
no ``adapter_config.json``), then calls ``set_weights_and_activate_adapters(model, [name],
[lora_weight])``, i.e. peft's ``LoraLayer.set_scale(name, lora_weight)`` on every adapted layer.
That sets the layer's scaling to ``lora_weight * lora_alpha / r`` and each adapted ``Linear``
computes ``W x + b + scaling * B (A x)``. Three consequences this module reproduces:

* ``lora_weight`` scales the weight delta **linearly** (``0`` is exactly no LoRA);
* ``lora_alpha`` is whatever diffusers read from the file: the ``lora_adapter_metadata`` JSON in
  the safetensors header (diffusers >= 0.35 writes the ``LoraConfig`` there), otherwise
  ``alpha = r`` for every layer (diffusers' convention for alpha-less files: scaling 1);
* ``use_rslora`` has no effect: ``set_scale`` recomputes ``alpha / r`` without the rank
  stabilisation (peft issue #2733), although training used ``alpha / sqrt(r)`` (upstream's
  ``config/zh_rap_lora_config.json`` trains r=256, alpha=32, ``use_rslora: true``).

:func:`load_lora` implements that as ``scaling="upstream"`` (the default: same numbers as
upstream). ``scaling="peft"`` gives the adapter's training-time semantics instead: the config
from the header metadata, else ``adapter_config.json`` beside the file (peft's
``save_pretrained`` layout), else alpha = r; and ``alpha / sqrt(r)`` when ``use_rslora``.

Fusing. Every adapted layer here is a plain ``Linear`` (or a 1x1 ``Conv1d``), so the adapter is
applied as ``W' = W + lora_weight * scaling * B @ A`` (and ``b' = b + lora_weight * scaling *
lora_B.bias`` when the adapter trained biases): the same function as upstream's runtime branch,
with no extra work per step. :func:`apply_lora` fuses in place for a block and puts the original
tensors back afterwards (bit-exact: they are kept, never recomputed by subtraction);
:func:`fused_transformer` returns a fused deep copy (for export).

Serving strategy (for the docs)
-------------------------------
LoRA lives in the transformer, which is served as two components: ``condition_encoder`` (the
speaker/genre embedders and the lyric Conformer: upstream's ``linear_q/k/v`` targets) and
``dit_decoder`` (the DiT blocks: ``to_q/k/v/out.0``). Options:

(a) **Per-request selection from a configured set** (implemented, the default). Each configured
    adapter, at one configured ``lora_weight``, gets its own fused copies of the components it
    touches, served as ``condition_encoder__<name>`` / ``dit_decoder__<name>``
    (:func:`export_lora_variants`, :class:`LoraVariant`). The orchestrator routes a request that
    names the adapter to those models (:class:`ServedLoras`); all other components are shared.
    A request with another ``lora_weight`` than the fused one is rejected with an error naming
    ``lora_weight``.
(b) **Weights fused per engine for the whole deployment**: no extra memory, but one adapter for
    every request, and changing it means rebuilding the engines and restarting.

Trade-offs of (a): memory per variant is a full copy of each touched component (for the 3.5B
checkpoint in bf16: about 5 GB for ``dit_decoder``, about 0.2 GB for ``condition_encoder``) and a
TensorRT build per variant (minutes each for the DiT); in exchange, zero runtime cost per step (the
delta is folded into the weights), and requests for different adapters run concurrently on their
own model instances (they could never share a batch anyway). Runtime adapters (unfused ``A``/``B``
as extra graph inputs or multi-LoRA kernels) would need one engine for all adapters and allow any
strength, at the price of two extra small matmuls per adapted layer and per step (about 20% more
FLOPs in each adapted projection at r=256) and custom kernels that TensorRT does not provide for
this graph. A continuous ``lora_weight`` per request is therefore only offered in-process
(:class:`InProcessLoras`, re-fusing per request); with (a) each strength is its own variant.

Files: ``python -m acestep_triton.lora tiny --checkpoint C --out D`` writes the deterministic
tiny adapter for the tiny checkpoint; ``python -m acestep_triton.lora inspect PATH`` summarises one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from acestep_client.params import ParamError

# ---------------------------------------------------------------------------------------------
# Constants

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' adapter file name (what upstream's trainer writes and its ``load_lora`` reads)."""

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
"""peft's ``save_pretrained`` file name, accepted as a fallback inside an adapter folder."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
"""peft's adapter config (r, lora_alpha, use_rslora ...), read in ``scaling="peft"`` mode."""

METADATA_KEY = "lora_adapter_metadata"
"""safetensors header entry where diffusers (>= 0.35) stores the adapter's ``LoraConfig`` JSON."""

SERVING_FILE = "serving.json"
"""Optional file in a registry adapter folder: ``{"lora_weight": 0.8}``, the strength it is served at."""

VARIANTS_FILE = "lora_variants.json"
"""Manifest of exported LoRA variants (written beside the ONNX files and into the assets folder)."""

VARIANT_SEPARATOR = "__"
"""Served model name of a variant: ``<component>__<adapter name>``."""

NO_LORA = "none"
"""The schema value of ``lora_name_or_path`` meaning: no adapter (upstream's sentinel)."""

SCALING_MODES = ("upstream", "peft")

KEY_PREFIXES = ("base_model.model.", "transformer.")
"""Prefixes stripped from adapter keys: peft's ``PeftModel`` state dict and diffusers' pipeline-level
``save_lora_weights`` file; upstream's trainer writes bare module paths."""

ENCODER_MODULES = ("speaker_embedder", "genre_embedder", "lyric_embs", "lyric_encoder", "lyric_proj")
"""Top-level transformer children that run in ``encode`` (the ``condition_encoder`` component)."""

DECODER_MODULES = ("timestep_embedder", "t_block", "proj_in", "transformer_blocks", "final_layer")
"""Top-level transformer children that run in ``decode`` (the ``dit_decoder`` component)."""

COMPONENT_OF_MODULE: dict[str, str] = {
    **{m: "condition_encoder" for m in ENCODER_MODULES},
    **{m: "dit_decoder" for m in DECODER_MODULES},
}
"""Served component each top-level transformer child belongs to."""

LORA_COMPONENTS = ("condition_encoder", "dit_decoder")
"""Components a LoRA can touch, in data-path order."""

UPSTREAM_TARGET_MODULES = ("speaker_embedder", "linear_q", "linear_k", "linear_v",
                           "to_q", "to_k", "to_v", "to_out.0")
"""``target_modules`` of upstream's ``config/zh_rap_lora_config.json`` (all exist in our model)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_KEY_RE = re.compile(r"^(?P<module>.+?)\.lora_(?P<half>A|B)(?:\.(?P<adapter>[A-Za-z0-9_-]+))?"
                     r"\.(?P<kind>weight|bias)$")


class LoraError(ValueError):
    """An adapter that cannot be loaded or does not fit the transformer; names every bad key."""


# ---------------------------------------------------------------------------------------------
# The adapter


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``delta W = scaling * up @ down`` (``up`` = lora_B, ``down`` = lora_A).

    ``down`` is [r, in] and ``up`` [out, r] (a 1x1 conv's trailing kernel dim is dropped);
    ``bias`` is lora_B's bias when the adapter trained one. ``keys`` are the file keys it came
    from, for error messages.
    """

    module: str
    down: Tensor
    up: Tensor
    scaling: float
    bias: Tensor | None = None
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, lora_weight: float, shape: torch.Size, device: torch.device) -> Tensor:
        """``lora_weight * scaling * up @ down`` in fp32, reshaped to the target weight's ``shape``."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down).mul_(float(lora_weight) * self.scaling).reshape(shape)


@dataclass(frozen=True)
class LoraSettings:
    """Where the scaling came from: ``source`` is ``"metadata"``, ``"adapter_config.json"`` or
    ``"default"`` (alpha = r per layer); ``lora_alpha`` None means alpha = r."""

    source: str
    lora_alpha: float | None = None
    use_rslora: bool = False
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] = ()

    def alpha_for(self, module: str, rank: int) -> float:
        """peft's per-layer alpha: the first ``alpha_pattern`` key matching the module path (peft's
        ``get_pattern_key`` rule), else ``lora_alpha``, else the layer's rank."""
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(alpha)
        return float(self.lora_alpha) if self.lora_alpha is not None else float(rank)


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded adapter, keyed by our transformer's module paths (= the official ones).

    ``ignored`` are file keys of layers inference never runs (modules matched by the
    transformer's ``UNUSED_KEYS``): upstream adapts them too, with no effect on its output.
    """

    name: str
    path: Path
    layers: Mapping[str, LoraLayer]
    settings: LoraSettings
    scaling_mode: str = "upstream"
    ignored: tuple[str, ...] = ()
    sha256: str = ""

    @property
    def components(self) -> tuple[str, ...]:
        """Served components whose weights the adapter changes, in data-path order."""
        touched = {component_of(m) for m in self.layers}
        return tuple(c for c in LORA_COMPONENTS if c in touched)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: layer.rank for m, layer in self.layers.items()}

    def check(self, transformer: nn.Module) -> dict[str, nn.Module]:
        """The target module of every layer; :class:`LoraError` naming each key that does not
        fit (no such module, unsupported layer type, shape mismatch)."""
        targets: dict[str, nn.Module] = {}
        problems: list[str] = []
        for path, layer in self.layers.items():
            keys = ", ".join(layer.keys) or path
            try:
                module = transformer.get_submodule(path)
            except AttributeError:
                problems.append(f"{keys}: the transformer has no module {path!r}")
                continue
            shape = _target_shape(module)
            if shape is None:
                problems.append(f"{keys}: {path} is a {type(module).__name__}; only Linear and 1x1 Conv1d "
                                "layers can take a LoRA here")
                continue
            out_features, in_features = shape
            if tuple(layer.down.shape) != (layer.rank, in_features) or tuple(layer.up.shape) != (
                    out_features, layer.rank):
                problems.append(f"{keys}: lora_A {list(layer.down.shape)} / lora_B {list(layer.up.shape)} do not "
                                f"fit {path} ({in_features} in, {out_features} out)")
                continue
            if layer.bias is not None and getattr(module, "bias", None) is None:
                problems.append(f"{keys}: lora_B has a bias but {path} has none")
                continue
            targets[path] = module
        if problems:
            raise LoraError(f"LoRA {self.path}: {len(problems)} key(s) do not fit the transformer:\n  "
                            + "\n  ".join(problems))
        return targets

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        scalings = sorted({round(layer.scaling, 6) for layer in self.layers.values()})
        return (f"{self.name}: {len(self.layers)} layers, rank {ranks}, scaling {scalings} "
                f"({self.scaling_mode}; alpha from {self.settings.source}), components "
                f"{list(self.components)}, ignored {len(self.ignored)} unused-module keys")


def component_of(module_path: str) -> str:
    """The served component a transformer module path runs in (by its top-level child)."""
    top = module_path.split(".", 1)[0]
    try:
        return COMPONENT_OF_MODULE[top]
    except KeyError:
        raise LoraError(f"{module_path}: not a module of the ACE-Step transformer "
                        f"(known top-level modules: {', '.join(COMPONENT_OF_MODULE)})") from None


def _target_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer a LoRA can be fused into, or None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1:
        return module.out_channels, module.in_channels
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def adapter_file(path_or_dir: str | Path) -> Path:
    """The adapter's ``.safetensors`` file: the path itself, or the known file in a folder."""
    path = Path(path_or_dir)
    if path.is_dir():
        for name in (LORA_WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
            if (path / name).is_file():
                return path / name
        raise LoraError(f"{path}: no {LORA_WEIGHTS_FILE} (or {PEFT_WEIGHTS_FILE}) in this folder")
    if not path.is_file():
        raise LoraError(f"LoRA adapter {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors adapters are supported")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LoraError(f"{path}: expected a JSON object")
    return data


def _settings_from(config: Mapping[str, Any], source: str) -> LoraSettings:
    alpha = config.get("lora_alpha")
    targets = config.get("target_modules") or ()
    return LoraSettings(source=source, lora_alpha=None if alpha is None else float(alpha),
                        use_rslora=bool(config.get("use_rslora", False)),
                        alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                        target_modules=(targets,) if isinstance(targets, str) else tuple(targets))


def _resolve_settings(header: Mapping[str, str] | None, folder: Path, scaling: str) -> LoraSettings:
    """The alpha/rslora settings per ``scaling`` mode (see the module docstring)."""
    if header and header.get(METADATA_KEY):
        try:
            config = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LoraError(f"{METADATA_KEY} in the safetensors header is not valid JSON ({e})") from e
        settings = _settings_from(config, "metadata")
    elif scaling == "peft" and (folder / ADAPTER_CONFIG_FILE).is_file():
        settings = _settings_from(_read_json(folder / ADAPTER_CONFIG_FILE), ADAPTER_CONFIG_FILE)
    else:
        settings = LoraSettings(source="default")
    if scaling == "upstream":  # peft's set_scale drops the rank stabilisation (issue #2733)
        settings = dataclasses.replace(settings, use_rslora=False)
    return settings


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_lora(path_or_dir: str | Path, transformer: nn.Module | None = None, *,
              scaling: str = "upstream", name: str | None = None) -> LoraAdapter:
    """Read a peft/diffusers LoRA (a folder with ``pytorch_lora_weights.safetensors`` [+
    ``adapter_config.json``], or the ``.safetensors`` file) onto our transformer's module paths.

    Keys are ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (optionally with a
    ``base_model.model.`` or ``transformer.`` prefix, an adapter-name segment, and
    ``lora_B.bias``). Keys of modules inference never uses are set aside in ``ignored``; any
    other key that is not a LoRA pair (DoRA, embedding LoRA, kohya ``.alpha`` ...) is an error
    naming it. ``scaling`` is ``"upstream"`` (default) or ``"peft"`` (module docstring). With
    ``transformer``, every layer is also checked against it (:meth:`LoraAdapter.check`).
    """
    from safetensors import safe_open

    from .models.transformer import unused_key

    if scaling not in SCALING_MODES:
        raise ValueError(f"scaling must be one of {SCALING_MODES}, got {scaling!r}")
    file = adapter_file(path_or_dir)
    with safe_open(str(file), framework="pt", device="cpu") as f:
        header = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    settings = _resolve_settings(header, file.parent, scaling)

    halves: dict[str, dict[str, tuple[str, Tensor]]] = {}
    ignored: list[str] = []
    problems: list[str] = []
    for key in sorted(tensors):
        stripped = _strip_prefix(key)
        match = _KEY_RE.match(stripped)
        if match is None:
            if "lora_magnitude_vector" in key:
                problems.append(f"{key}: DoRA adapters are not supported")
            elif "lora_embedding_" in key:
                problems.append(f"{key}: LoRA on embeddings is not supported")
            else:
                problems.append(f"{key}: not a LoRA key (expected <module>.lora_A.weight / .lora_B.weight)")
            continue
        module, part = match["module"], f"{match['half']}.{match['kind']}"
        if unused_key(f"{module}.weight"):
            ignored.append(key)
            continue
        if part == "A.bias":
            problems.append(f"{key}: lora_A has no bias in a LoRA")
            continue
        if module.split(".", 1)[0] not in COMPONENT_OF_MODULE:
            problems.append(f"{key}: unknown target module {module!r} (not in the ACE-Step transformer)")
            continue
        if part in halves.setdefault(module, {}):
            problems.append(f"{key}: duplicate of {halves[module][part][0]}")
            continue
        halves[module][part] = (key, tensors[key])

    layers: dict[str, LoraLayer] = {}
    for module, parts in halves.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            present = ", ".join(k for k, _ in parts.values())
            problems.append(f"{present}: {module} needs both lora_A.weight and lora_B.weight")
            continue
        down, up = parts["A.weight"][1], parts["B.weight"][1]
        down = down.squeeze(-1) if down.dim() == 3 and down.shape[-1] == 1 else down
        up = up.squeeze(-1) if up.dim() == 3 and up.shape[-1] == 1 else up
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"{parts['A.weight'][0]}: lora_A {list(down.shape)} and lora_B {list(up.shape)} "
                            "are not a rank-r pair")
            continue
        rank = int(down.shape[0])
        alpha = settings.alpha_for(module, rank)
        layer_scaling = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
        bias = parts.get("B.bias", (None, None))[1]
        layers[module] = LoraLayer(module=module, down=down, up=up, scaling=layer_scaling, bias=bias,
                                   keys=tuple(k for k, _ in parts.values()))
    if problems:
        raise LoraError(f"LoRA {file}: {len(problems)} key(s) cannot be used:\n  " + "\n  ".join(problems))
    if not layers:
        raise LoraError(f"LoRA {file}: no adapted layer that inference uses"
                        + (f" ({len(ignored)} keys of unused modules)" if ignored else ""))
    folder_name = file.parent.name if file.name in (LORA_WEIGHTS_FILE, PEFT_WEIGHTS_FILE) else file.stem
    adapter = LoraAdapter(name=name or folder_name, path=file, layers=dict(sorted(layers.items())),
                          settings=settings, scaling_mode=scaling, ignored=tuple(ignored),
                          sha256=_file_sha256(file))
    if transformer is not None:
        adapter.check(transformer)
    return adapter


# ---------------------------------------------------------------------------------------------
# Fusing


def _fused_tensors(module: nn.Module, layer: LoraLayer, lora_weight: float) -> dict[str, Tensor]:
    """New ``weight`` (and ``bias``) tensors of ``module`` with the layer's delta added in fp32."""
    weight = module.weight
    out = {"weight": (weight.detach().float() + layer.delta(lora_weight, weight.shape, weight.device))
           .to(weight.dtype)}
    if layer.bias is not None:
        bias = module.bias
        delta = layer.bias.to(device=bias.device, dtype=torch.float32) * (float(lora_weight) * layer.scaling)
        out["bias"] = (bias.detach().float() + delta).to(bias.dtype)
    return out


@contextlib.contextmanager
def apply_lora(transformer: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> Iterator[nn.Module]:
    """Add ``weight * scaling * B @ A`` to every adapted layer for the duration of the block.

    The original tensors are kept and put back on exit (also on error), so the restore is
    bit-exact; the parameters stay the same objects (exported graphs and ``state_dict`` views
    see the fused values). ``weight == 0`` leaves the model untouched. Peak extra memory: one
    fused copy of each adapted weight (about 1.3 B parameters for upstream's targets on the 3.5B
    checkpoint). Not re-entrant across threads: one generation at a time per transformer.
    """
    targets = adapter.check(transformer)
    saved: list[tuple[nn.Parameter, Tensor]] = []
    try:
        if weight != 0:
            with torch.no_grad():
                for path, layer in adapter.layers.items():
                    module = targets[path]
                    for param_name, value in _fused_tensors(module, layer, weight).items():
                        param = getattr(module, param_name)
                        saved.append((param, param.data))
                        param.data = value
        yield transformer
    finally:
        for param, original in reversed(saved):
            param.data = original


def fused_transformer(transformer: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """A deep copy of ``transformer`` with the adapter fused in (the original is not touched).

    Costs a second full transformer in memory; :func:`export_lora_variants` fuses in place
    under :func:`apply_lora` instead.
    """
    fused = copy.deepcopy(transformer)
    targets = adapter.check(fused)
    if weight != 0:
        with torch.no_grad():
            for path, layer in adapter.layers.items():
                for param_name, value in _fused_tensors(targets[path], layer, weight).items():
                    getattr(targets[path], param_name).data = value
    return fused


# ---------------------------------------------------------------------------------------------
# Tiny adapter

TINY_LORA_ALPHA_PER_RANK = 2.0
"""Tiny adapter: ``lora_alpha = 2 * r`` (upstream scaling 2, peft rsLoRA scaling 2 sqrt(r)), so a
test can tell the two scaling modes and alpha handling apart."""

TINY_LORA_UP_STD = 0.02
"""Std of the tiny adapter's lora_B. Non-zero (a trained adapter's B is; peft starts it at zero)
so that the adapter changes the output: at upstream scaling (2) each delta is about 15% of its
layer's weight norm, and the encode/decode outputs move by about 10% (measured)."""


def _save_canonical(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: Path) -> None:
    """Save a ``.safetensors`` file whose bytes depend only on its content.

    The safetensors writer emits the ``__metadata__`` map in hash order, which varies between
    runs once it has two entries; the header JSON is therefore re-emitted with sorted keys (tensor
    offsets are explicit, so the data block is unchanged) and padded with spaces to 8 bytes.
    """
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata=dict(metadata))
    size = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + blob[8 + size:])


def tiny_lora_config(rank: int) -> dict[str, Any]:
    """The tiny adapter's ``LoraConfig`` fields, shaped like upstream's ``zh_rap_lora_config.json``."""
    return {"r": rank, "lora_alpha": TINY_LORA_ALPHA_PER_RANK * rank, "use_rslora": True,
            "target_modules": list(UPSTREAM_TARGET_MODULES), "lora_dropout": 0.0, "bias": "none",
            "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}


def target_module_paths(transformer: nn.Module, target_modules: Sequence[str] = UPSTREAM_TARGET_MODULES) -> list[str]:
    """Module paths that peft's ``target_modules`` list selects (exact name or ``.``-suffix match)
    among the layers a LoRA can be fused into, skipping modules inference never uses."""
    from .models.transformer import unused_key

    return sorted(name for name, module in transformer.named_modules()
                  if name and any(name == t or name.endswith(f".{t}") for t in target_modules)
                  and _target_shape(module) is not None and not unused_key(f"{name}.weight"))


def write_tiny_lora(ckpt_dir: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """Write a deterministic rank-``rank`` adapter for the checkpoint at ``ckpt_dir``, in upstream's
    layout (``out_dir/pytorch_lora_weights.safetensors``, bare module-path keys, the ``LoraConfig``
    as header metadata like diffusers writes it) plus peft's ``adapter_config.json``.

    Targets are upstream's ``target_modules`` that exist in our model. lora_A ~ N(0, 1/in),
    lora_B ~ N(0, :data:`TINY_LORA_UP_STD`): non-zero, so the output changes. Same arguments →
    byte-identical files. Returns ``out_dir``.
    """
    from .checkpoint import TRANSFORMER_DIR, CheckpointLayout
    from .models.transformer import ACEStepTransformer

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    config = CheckpointLayout(Path(ckpt_dir)).read_config(TRANSFORMER_DIR)
    with torch.device("meta"):  # structure and shapes only: no weights are materialised
        model = ACEStepTransformer.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for path in target_module_paths(model):
        out_features, in_features = _target_shape(model.get_submodule(path))  # type: ignore[misc]
        tensors[f"{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
        tensors[f"{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * TINY_LORA_UP_STD
    lora_config = tiny_lora_config(rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_config, indent=2, sort_keys=True)}
    _save_canonical(tensors, metadata, out / LORA_WEIGHTS_FILE)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", **lora_config}, indent=2,
                                                      sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Registry and variants


def check_adapter_name(name: str) -> str:
    """A served adapter name: letters, digits, ``_`` and ``-`` (it becomes part of model names),
    not ``none`` and without the ``__`` separator."""
    if not _NAME_RE.match(name) or VARIANT_SEPARATOR in name or name.lower() == NO_LORA:
        raise ValueError(f"invalid LoRA adapter name {name!r}: use letters, digits, '_' and '-' (not "
                         f"'{VARIANT_SEPARATOR}', not '{NO_LORA}')")
    return name


def is_no_lora(name: str | None) -> bool:
    """Whether a ``lora_name_or_path`` value asks for no adapter (``none``, any case, or empty)."""
    return name is None or name.strip() == "" or name.strip().lower() == NO_LORA


def check_weight_range(weight: float) -> float:
    """The schema's bounds for ``lora_weight`` (-3..3), checked for weights configured on the server."""
    weight = float(weight)
    if not math.isfinite(weight) or not -3.0 <= weight <= 3.0:
        raise ValueError(f"lora_weight {weight} is outside [-3, 3]")
    return weight


@dataclass(frozen=True)
class LoraRegistry:
    """The adapters a deployment serves: name → adapter folder, and the strength each is served at.

    :meth:`from_dir` reads one sub-folder per adapter (the folder name is the adapter name), each
    holding ``pytorch_lora_weights.safetensors`` and optionally ``serving.json``
    (``{"lora_weight": 0.8}``, default 1.0).
    """

    adapters: Mapping[str, Path]
    weights: Mapping[str, float] = field(default_factory=dict)
    root: Path | None = None

    @classmethod
    def from_dir(cls, root: str | Path, weights: Mapping[str, float] | None = None) -> LoraRegistry:
        """Scan ``root``; ``weights`` override the ``serving.json`` strengths by adapter name.
        Errors name the folder (a misconfigured deployment fails at build time, not per request)."""
        root = Path(root)
        if not root.is_dir():
            raise LoraError(f"LoRA folder {root} does not exist")
        adapters: dict[str, Path] = {}
        strengths: dict[str, float] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                name = check_adapter_name(folder.name)
            except ValueError as e:
                raise LoraError(f"{folder}: {e}") from None
            adapter_file(folder)  # raises, naming the folder, when it holds no adapter
            adapters[name] = folder
            strength = 1.0
            if (folder / SERVING_FILE).is_file():
                strength = _read_json(folder / SERVING_FILE).get("lora_weight", 1.0)
            try:
                strengths[name] = check_weight_range(strength)
            except (TypeError, ValueError) as e:
                raise LoraError(f"{folder / SERVING_FILE}: {e}") from None
        for name, strength in (weights or {}).items():
            if name not in adapters:
                raise LoraError(f"weights: no adapter {name!r} in {root} (have {', '.join(adapters) or 'none'})")
            strengths[name] = check_weight_range(strength)
        return cls(adapters=adapters, weights=strengths, root=root)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapters)

    def weight(self, name: str) -> float:
        """The strength ``name`` is served at (1.0 unless configured)."""
        return float(self.weights.get(name, 1.0))

    def resolve(self, name: str | None) -> Path | None:
        """The adapter folder for a request's ``lora_name_or_path``; None for ``none``.

        Unknown names (and file-system paths: a server never loads files a request names) raise
        :class:`ParamError` on ``lora_name_or_path``, listing what is served.
        """
        if is_no_lora(name):
            return None
        assert name is not None
        key = name.strip()
        if key in self.adapters:
            return self.adapters[key]
        served = ", ".join(self.adapters) if self.adapters else "no adapters are configured"
        raise ParamError("lora_name_or_path", f"unknown LoRA adapter {name!r}; this server serves: {served} "
                                              f"(or '{NO_LORA}')")


def variant_model_name(component: str, adapter_name: str) -> str:
    """``condition_encoder`` + ``rap`` → ``condition_encoder__rap``."""
    return f"{component}{VARIANT_SEPARATOR}{adapter_name}"


def base_component(model_name: str) -> str:
    """The contract component a (possibly variant) model name serves: ``dit_decoder__rap`` →
    ``dit_decoder`` (for spec lookups such as ``request_shape`` in the BLS call)."""
    return model_name.split(VARIANT_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class LoraVariant:
    """One served adapter: its fused strength and the components it has own models for."""

    name: str
    lora_weight: float
    components: tuple[str, ...]
    adapter_sha256: str = ""

    def model_name(self, component: str) -> str:
        """The served model that runs ``component`` for requests naming this adapter."""
        return variant_model_name(component, self.name) if component in self.components else component

    @property
    def routes(self) -> dict[str, str]:
        """Component → variant model name, for the components this adapter touches."""
        return {c: variant_model_name(c, self.name) for c in self.components}

    @property
    def model_names(self) -> list[str]:
        return list(self.routes.values())

    def accepts(self, lora_weight: float) -> bool:
        """Whether a requested strength is the fused one (to fp32 wire precision)."""
        return math.isclose(float(lora_weight), self.lora_weight, rel_tol=1e-6, abs_tol=1e-6)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lora_weight": self.lora_weight, "components": list(self.components),
                "models": self.model_names, "adapter_sha256": self.adapter_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraVariant:
        components = tuple(str(c) for c in data["components"])
        unknown = [c for c in components if c not in LORA_COMPONENTS]
        if unknown:
            raise LoraError(f"LoRA variant {data.get('name')!r}: unknown components {unknown}")
        return cls(name=check_adapter_name(str(data["name"])), lora_weight=float(data["lora_weight"]),
                   components=components, adapter_sha256=str(data.get("adapter_sha256", "")))


def variant_specs(variants: Sequence[LoraVariant]) -> list[Any]:
    """Contract specs (``export.specs.ComponentSpec``) renamed to every variant model, for
    ``render_repository(components=[*COMPONENTS.values(), *variant_specs(variants)])``."""
    from .export import specs

    return [dataclasses.replace(specs.component(c), name=variant_model_name(c, v.name))
            for v in variants for c in v.components]


def write_variants_manifest(variants: Sequence[LoraVariant], folder: str | Path,
                            extra: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write :data:`VARIANTS_FILE` into ``folder`` (``extra``: more fields per variant name)."""
    path = Path(folder) / VARIANTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{**v.to_dict(), **(extra or {}).get(v.name, {})} for v in variants]
    path.write_text(json.dumps({"variants": entries}, indent=2) + "\n")
    return path


def read_variants_manifest(folder: str | Path) -> list[LoraVariant]:
    """The variants listed in ``folder/lora_variants.json``; none when the file is absent."""
    path = Path(folder) / VARIANTS_FILE
    if not path.is_file():
        return []
    return [LoraVariant.from_dict(entry) for entry in _read_json(path).get("variants", [])]


def _transformer_of(components: Any) -> nn.Module:
    """The transformer from a ``checkpoint.Components``, a component mapping, or itself."""
    if isinstance(components, nn.Module):
        return components
    if isinstance(components, Mapping):
        for key in ("transformer", "dit_decoder", "condition_encoder"):
            if key in components:
                return components[key]
        raise KeyError("components: no 'transformer' (or 'dit_decoder') entry")
    return components.transformer


def export_lora_variants(components: Any, registry: LoraRegistry, onnx_dir: str | Path, *,
                         parity: bool = True, scaling: str = "upstream", skip_existing: bool = False,
                         base_key: str = "", progress: bool = False, opset: int | None = None,
                         rtol: float | None = None) -> list[LoraVariant]:
    """Export ``<component>__<name>.onnx`` for every adapter of ``registry`` into ``onnx_dir``.

    Each adapter is fused at its configured strength (in place, restored afterwards) and only
    the components it touches are exported, each checked with onnxruntime against the fused
    torch model (as :func:`~acestep_triton.export.onnx_export.export_all` does). Writes
    :data:`VARIANTS_FILE` beside the files (with parity numbers) and returns the variants, which
    the deployment copies into the assets (:func:`write_variants_manifest`) and renders
    (:func:`variant_specs`). ``skip_existing`` reuses files whose manifest entry has the same
    adapter bytes, strength, scaling mode and ``base_key`` (a caller's fingerprint of the base
    model, see :func:`prepare_lora_onnx_dir`): without a ``base_key``, only safe in a folder tied
    to one checkpoint and export code, such as ``export_cached``'s keyed folder.
    """
    import time

    from .export import onnx_export

    transformer = _transformer_of(components)
    onnx_dir = Path(onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    opset = onnx_export.DEFAULT_OPSET if opset is None else opset
    rtol = onnx_export.FP32_RTOL if rtol is None else rtol
    previous = {}
    if skip_existing and (onnx_dir / VARIANTS_FILE).is_file():
        previous = {e["name"]: e for e in _read_json(onnx_dir / VARIANTS_FILE).get("variants", [])}
    variants: list[LoraVariant] = []
    extra: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name in registry:
        weight = registry.weight(name)
        adapter = load_lora(registry.adapters[name], transformer, scaling=scaling, name=name)
        variant = LoraVariant(name=name, lora_weight=weight, components=adapter.components,
                              adapter_sha256=adapter.sha256)
        old = previous.get(name)
        if (old is not None and old.get("adapter_sha256") == adapter.sha256 and old.get("scaling") == scaling
                and old.get("base_key", "") == base_key
                and math.isclose(float(old.get("lora_weight", math.nan)), weight)
                and all((onnx_dir / f"{m}.onnx").is_file() for m in variant.model_names)):
            variants.append(variant)
            extra[name] = {k: old[k] for k in ("scaling", "base_key", "parity", "export_s") if k in old}
            continue
        entry: dict[str, Any] = {"scaling": scaling, "base_key": base_key, "parity": {}, "export_s": {}}
        with apply_lora(transformer, adapter, weight):
            for component in variant.components:
                model = variant_model_name(component, name)
                started = time.monotonic()
                path = onnx_export.export_component(component, transformer, onnx_dir / f"{model}.onnx", opset=opset)
                entry["export_s"][model] = round(time.monotonic() - started, 2)
                message = f"exported in {entry['export_s'][model]:.1f} s"
                if parity:
                    report = onnx_export.check_parity(component, transformer, path, rtol=rtol)
                    entry["parity"][model] = report.as_dict()
                    message += f"; parity max rel {report.max_rel:.2e}"
                    if not report.ok:
                        failures.append(f"{model}: {report.summary()}")
                if progress:
                    print(f"[lora] {model}: {message}", file=sys.stderr, flush=True)
        variants.append(variant)
        extra[name] = entry
    write_variants_manifest(variants, onnx_dir, extra)
    if failures:
        raise onnx_export.ParityError("LoRA variant export does not match torch:\n  " + "\n  ".join(failures))
    return variants


def _base_onnx_files(onnx_dir: Path) -> list[Path]:
    """The base components' ONNX graphs and external-data files in ``onnx_dir`` (no variants)."""
    from .export import specs

    names = {f"{c}.onnx" for c in specs.COMPONENTS} | {f"{c}.onnx.data" for c in specs.COMPONENTS}
    return sorted(p for p in onnx_dir.iterdir() if p.name in names and p.is_file())


def prepare_lora_onnx_dir(components: Any, registry: LoraRegistry, base_onnx_dir: str | Path,
                          out_dir: str | Path, **export_options: Any) -> list[LoraVariant]:
    """One folder with the base ONNX files (hard-linked, or copied across file systems) and every
    variant of ``registry`` (exported, or reused when unchanged): what the renderer's
    ``onnx_dir`` takes. The shared base folder (an export cache) is never written to.

    Variants are reused only when the adapter, strength and base files are unchanged: the base
    files' names, sizes and modification times form the ``base_key``.
    """
    import os
    import shutil

    base, out = Path(base_onnx_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _base_onnx_files(base)
    if not files:
        raise LoraError(f"{base}: no exported component files")
    digest = hashlib.sha256()
    for source in files:
        stat = source.stat()
        digest.update(f"{source.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        target = out / source.name
        if target.exists() and os.path.samefile(source, target):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return export_lora_variants(components, registry, out, skip_existing=True, base_key=digest.hexdigest(),
                                **export_options)


# ---------------------------------------------------------------------------------------------
# Per-request selection (the pipeline's LoRA scope)

LoraScope = Callable[[str, float], AbstractContextManager[Any]]
"""``scope(lora_name_or_path, lora_weight)``: a context manager the generator runs a whole request
in; raises :class:`ParamError` on entry for a name or strength the backend cannot serve."""


@contextlib.contextmanager
def no_lora(name: str, weight: float) -> Iterator[None]:
    """The scope of a backend without adapters: ``none`` passes, any name is a request error."""
    if not is_no_lora(name):
        raise ParamError("lora_name_or_path", f"unknown LoRA adapter {name!r}: this server has no LoRA adapters "
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
        raise ParamError("lora_name_or_path", f"{name!r} is neither 'none' nor an existing LoRA adapter path")

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


class RoutingCall:
    """Wraps a ``ComponentCall`` (``call(model, inputs, outputs)``) and renames component models
    per request: ``routes`` maps ``dit_decoder`` → ``dit_decoder__rap`` while a request runs."""

    def __init__(self, call: Callable[[str, Mapping[str, Tensor], Sequence[str]], list[Tensor]]) -> None:
        self._call = call
        self.routes: dict[str, str] = {}

    def __call__(self, model: str, inputs: Mapping[str, Tensor], outputs: Sequence[str]) -> list[Tensor]:
        return self._call(self.routes.get(model, model), inputs, outputs)


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
            raise ParamError("lora_name_or_path", f"unknown LoRA adapter {name!r}; this server serves: {served} "
                                                  f"(or '{NO_LORA}')")
        if not variant.accepts(weight):
            raise ParamError("lora_weight", f"{float(weight):g}: adapter {variant.name!r} is served fused at "
                                            f"lora_weight {variant.lora_weight:g} only (other strengths need "
                                            "another configured variant or the in-process pipeline)")
        return variant

    @contextlib.contextmanager
    def __call__(self, name: str, weight: float) -> Iterator[None]:
        variant = self.select(name, weight)
        self.routing.routes = dict(variant.routes) if variant is not None else {}
        try:
            yield
        finally:
            self.routing.routes = {}


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``tiny --checkpoint C --out D [--seed N] [--rank R]``; ``inspect PATH [--scaling peft]``."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.lora",
                                     description="LoRA adapters for the ACE-Step transformer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write the deterministic tiny adapter for a (tiny) checkpoint")
    tiny.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (official layout)")
    tiny.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--rank", type=int, default=4)
    inspect = sub.add_parser("inspect", help="summarise an adapter (layers, ranks, scaling, components)")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--scaling", choices=SCALING_MODES, default="upstream")
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError

    try:
        if args.command == "tiny":
            print(write_tiny_lora(args.checkpoint, args.out, seed=args.seed, rank=args.rank))
        else:
            print(load_lora(args.path, scaling=args.scaling).summary())
    except (LoraError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

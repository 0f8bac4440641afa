"""Reading adapter files: keys onto our module paths, and the scaling upstream applies."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.transformer import unused_key
from ..weights import CheckpointError, SafetensorsFile, file_sha256

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
            shape = target_shape(module)
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


def target_shape(module: nn.Module) -> tuple[int, int] | None:
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

    The file is read by :class:`~acestep_triton.weights.SafetensorsFile`, which checks the header
    against the file's size before allocating anything: an empty, truncated or random file, or
    one whose header claims 2^60 bytes, is a :class:`LoraError` naming the file, never an
    allocation of what a corrupt length field says.
    """
    if scaling not in SCALING_MODES:
        raise ValueError(f"scaling must be one of {SCALING_MODES}, got {scaling!r}")
    file = adapter_file(path_or_dir)
    header, tensors = _read_tensors(file)
    settings = _resolve_settings(header, file.parent, scaling)
    halves, ignored, problems = _group_keys(tensors)
    layers, pair_problems = _pair_halves(halves, settings)
    problems += pair_problems
    if problems:
        raise LoraError(f"LoRA {file}: {len(problems)} key(s) cannot be used:\n  " + "\n  ".join(problems))
    if not layers:
        raise LoraError(f"LoRA {file}: no adapted layer that inference uses"
                        + (f" ({len(ignored)} keys of unused modules)" if ignored else ""))
    folder_name = file.parent.name if file.name in (LORA_WEIGHTS_FILE, PEFT_WEIGHTS_FILE) else file.stem
    adapter = LoraAdapter(name=name or folder_name, path=file, layers=dict(sorted(layers.items())),
                          settings=settings, scaling_mode=scaling, ignored=tuple(ignored),
                          sha256=file_sha256(file))
    if transformer is not None:
        adapter.check(transformer)
    return adapter


_Halves = dict[str, dict[str, tuple[str, Tensor]]]
"""Per module path, its LoRA tensors by part (``"A.weight"``, ``"B.weight"``, ``"B.bias"``), each
with the file key it came from (for error messages)."""


def _read_tensors(file: Path) -> tuple[Mapping[str, str] | None, dict[str, Tensor]]:
    """The header metadata and every tensor of ``file``; a file that is no readable safetensors
    file is a :class:`LoraError` (the reader checks the header before allocating anything)."""
    try:
        reader = SafetensorsFile(file)
        return reader.metadata, {key: reader.read(key) for key in reader}
    except CheckpointError as e:
        raise LoraError(f"not a readable adapter file: {e}") from None


def _not_lora_reason(key: str) -> str:
    """Why a key that does not look like ``<module>.lora_A/B.weight`` cannot be used."""
    if "lora_magnitude_vector" in key:
        return f"{key}: DoRA adapters are not supported"
    if "lora_embedding_" in key:
        return f"{key}: LoRA on embeddings is not supported"
    return f"{key}: not a LoRA key (expected <module>.lora_A.weight / .lora_B.weight)"


def _group_keys(tensors: Mapping[str, Tensor]) -> tuple[_Halves, list[str], list[str]]:
    """Sort the file's keys into per-module halves, the keys of modules inference never uses
    (``ignored``), and one problem per key that cannot be used; every key is looked at, so the
    error lists them all at once."""
    halves: _Halves = {}
    ignored: list[str] = []
    problems: list[str] = []
    for key in sorted(tensors):
        match = _KEY_RE.match(_strip_prefix(key))
        if match is None:
            problems.append(_not_lora_reason(key))
            continue
        module, part = match["module"], f"{match['half']}.{match['kind']}"
        if unused_key(f"{module}.weight"):
            ignored.append(key)
        elif part == "A.bias":
            problems.append(f"{key}: lora_A has no bias in a LoRA")
        elif module.split(".", 1)[0] not in COMPONENT_OF_MODULE:
            problems.append(f"{key}: unknown target module {module!r} (not in the ACE-Step transformer)")
        elif part in halves.setdefault(module, {}):
            problems.append(f"{key}: duplicate of {halves[module][part][0]}")
        else:
            halves[module][part] = (key, tensors[key])
    return halves, ignored, problems


def _squeeze_kernel(t: Tensor) -> Tensor:
    """A 1x1 conv's [out, in, 1] weight as the [out, in] matrix it is."""
    return t.squeeze(-1) if t.dim() == 3 and t.shape[-1] == 1 else t


def _pair_halves(halves: _Halves, settings: LoraSettings) -> tuple[dict[str, LoraLayer], list[str]]:
    """One :class:`LoraLayer` per module whose A and B form a rank-r pair, with its scaling
    (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA); one problem per module that does not."""
    layers: dict[str, LoraLayer] = {}
    problems: list[str] = []
    for module, parts in halves.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            present = ", ".join(k for k, _ in parts.values())
            problems.append(f"{present}: {module} needs both lora_A.weight and lora_B.weight")
            continue
        down, up = _squeeze_kernel(parts["A.weight"][1]), _squeeze_kernel(parts["B.weight"][1])
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
    return layers, problems

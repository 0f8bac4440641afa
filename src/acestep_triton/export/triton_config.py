"""Triton's model configuration as data, and its one ``config.pbtxt`` writer.

:class:`ModelConfigSpec` (with :class:`TensorConfig`, :class:`DynamicBatching` and
:class:`QueuePolicy`) holds everything this project's configs say, checked when built;
:func:`render_config` writes it as protobuf text and :func:`check_config` parses every text with
Triton's own ``ModelConfig`` protobuf before anyone writes it to disk, so a config that Triton
would refuse (or silently read differently) fails at render time, not at server start. What each
served model's config says is decided in :mod:`acestep_triton.export.model_configs`; the live
LoRA adapters' control model (:mod:`acestep_triton.lora.live_control`) uses this module directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from acestep_triton.export.specs import TRITON_DTYPES


@dataclass(frozen=True)
class TensorConfig:
    """One ``input``/``output`` entry as written: dims exclude the batch dim when batching."""

    name: str
    data_type: str  # Triton dtype without TYPE_ ("BYTES" is written TYPE_STRING)
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.data_type not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unknown Triton dtype {self.data_type!r}")
        if not self.dims:
            raise ValueError(f"{self.name}: Triton needs at least one dim (use [1] + reshape [])")


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's ``dynamic_batching``: merges queued requests of equal shapes into one execution,
    waiting up to ``max_queue_delay_us`` for more (the shared work a batchable component gains)."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``default_queue_policy``: how many requests may wait for a free instance and for
    how long. Past either, Triton refuses the request at once ("Exceeds maximum queue size",
    "Request timeout expired") instead of letting a burst pile up into client timeouts.

    Rendered as ``dynamic_batching { default_queue_policy { ... } }``, which tritonserver 2.51
    accepts (and enforces) on a ``max_batch_size: 0`` decoupled Python model too: it then only
    queues, it never merges requests. 0 means unlimited for both numbers.
    """

    max_queue_size: int = 0
    timeout_us: int = 0
    """Longest wait in the queue (microseconds); then ``timeout_action``."""
    timeout_action: str = "REJECT"

    def __post_init__(self) -> None:
        if self.max_queue_size < 0 or self.timeout_us < 0:
            raise ValueError("queue policy: max_queue_size and timeout_us must be >= 0")
        if self.timeout_action not in ("REJECT", "DELAY"):
            raise ValueError(f"queue policy: timeout_action must be REJECT or DELAY, got {self.timeout_action!r}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> QueuePolicy:
        """``{"max_queue_size": 8, "timeout_s": 120}`` (an endpoint definition's ``queue``)."""
        known = {"max_queue_size", "timeout_s", "timeout_action"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown queue keys {unknown} (known: {sorted(known)})")
        return cls(max_queue_size=int(data.get("max_queue_size", 0)),
                   timeout_us=round(float(data.get("timeout_s", 0)) * 1_000_000),
                   timeout_action=str(data.get("timeout_action", "REJECT")))


@dataclass(frozen=True)
class ModelConfigSpec:
    """Everything our configs say; :func:`render_config` turns it into ``config.pbtxt`` text."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None
    platform: str | None = None
    max_batch_size: int = 0
    instance_kind: str = "KIND_CPU"
    instance_count: int = 1
    instance_gpus: tuple[int, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    decoupled: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None
    queue_policy: QueuePolicy | None = None
    """Allowed without batching (``max_batch_size: 0``): see :class:`QueuePolicy`."""

    def __post_init__(self) -> None:
        if (self.backend is None) == (self.platform is None):
            raise ValueError(f"{self.name}: give exactly one of backend or platform")
        if self.max_batch_size < 0 or self.instance_count < 1:
            raise ValueError(f"{self.name}: max_batch_size must be >= 0 and instance_count >= 1")
        if self.dynamic_batching is not None and self.max_batch_size == 0:
            # Triton silently drops dynamic_batching when max_batch_size is 0 (seen on 2.51):
            # refuse it here so a config never claims batching it does not get.
            raise ValueError(f"{self.name}: dynamic batching needs max_batch_size > 0")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU", "KIND_MODEL", "KIND_AUTO"):
            raise ValueError(f"{self.name}: unknown instance kind {self.instance_kind!r}")
        names = [t.name for t in self.inputs + self.outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{self.name}: duplicate tensor names {dupes}")


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _ints(values: Iterable[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _render_tensors(key: str, tensors: Sequence[TensorConfig]) -> list[str]:
    if not tensors:
        return []
    blocks = []
    for t in tensors:
        lines = [f"    name: {_quote(t.name)}",
                 f"    data_type: TYPE_{'STRING' if t.data_type == 'BYTES' else t.data_type}",
                 f"    dims: {_ints(t.dims)}"]
        if t.reshape is not None:
            lines.append(f"    reshape: {{ shape: {_ints(t.reshape)} }}")
        if t.optional:
            lines.append("    optional: true")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return [f"{key} [\n" + ",\n".join(blocks) + "\n]"]


def render_config(model: ModelConfigSpec, *, comment: str | None = None) -> str:
    """The ``config.pbtxt`` text for ``model`` (checked with :func:`check_config`)."""
    out = [f"# {line}" for line in (comment or "Rendered by acestep_triton.export.triton_config; "
                                                "edit the specs and re-render.").splitlines()]
    out.append(f"name: {_quote(model.name)}")
    if model.backend is not None:
        out.append(f"backend: {_quote(model.backend)}")
    else:
        out.append(f"platform: {_quote(str(model.platform))}")
    if model.default_model_filename:
        out.append(f"default_model_filename: {_quote(model.default_model_filename)}")
    out.append(f"max_batch_size: {model.max_batch_size}")
    out += _render_tensors("input", model.inputs)
    out += _render_tensors("output", model.outputs)
    group = [f"    kind: {model.instance_kind}", f"    count: {model.instance_count}"]
    if model.instance_gpus:
        group.append(f"    gpus: {_ints(model.instance_gpus)}")
    out.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    if model.dynamic_batching is not None or model.queue_policy is not None:
        db = model.dynamic_batching
        lines = []
        if db is not None and db.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_ints(db.preferred_batch_sizes)}")
        if db is not None:
            lines.append(f"  max_queue_delay_microseconds: {db.max_queue_delay_us}")
        if model.queue_policy is not None:
            qp = model.queue_policy
            lines.append(f"  default_queue_policy {{\n    timeout_action: {qp.timeout_action}\n"
                         f"    default_timeout_microseconds: {qp.timeout_us}\n"
                         f"    max_queue_size: {qp.max_queue_size}\n  }}")
        out.append("dynamic_batching {\n" + "\n".join(lines) + "\n}")
    if model.decoupled:
        out.append("model_transaction_policy {\n  decoupled: true\n}")
    if model.parameters:
        entries = [f"  {{\n    key: {_quote(k)}\n    value: {{ string_value: {_quote(str(v))} }}\n  }}"
                   for k, v in model.parameters.items()]
        out.append("parameters [\n" + ",\n".join(entries) + "\n]")
    text = "\n".join(out) + "\n"
    check_config(text)
    return text


def check_config(text: str) -> Any:
    """Parse ``text`` with Triton's ``ModelConfig`` protobuf; raise ``ValueError`` on any error.

    Returns the parsed message, so tests can compare what Triton will read with what was meant.
    """
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid config.pbtxt: {exc}") from exc
    if not config.name:
        raise ValueError("invalid config.pbtxt: no model name")
    if bool(config.backend) == bool(config.platform):
        raise ValueError(f"invalid config.pbtxt for {config.name}: needs exactly one of backend/platform")
    return config

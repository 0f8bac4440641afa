"""The one request schema, shared by the client, the Triton orchestrators and the front end.

Every field is declared once, here, with its Triton dtype, default and bounds. From this one table
the repository renderer writes the orchestrators' ``input`` blocks, the client builds its typed
``InferInput`` tensors, the server validates what arrives, and the front end gets its defaults.
Field names and defaults follow upstream ACE-Step's ``__call__`` (what users already script
against). Torch-free on purpose: this module ships in the thin client.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from acestep_client.limits import (  # noqa: F401 (re-exported: the schema's limits)
    EDIT_PRESETS,
    LATENT_FRAME_S,
    MAX_DURATION_S,
    OUTPUT_SAMPLE_RATE,
)

MAX_STEPS = 1000
MAX_BATCH = 16
MAX_PROMPT_CHARS = 2048
MAX_LYRICS_CHARS = 8192
SCHEDULERS = ("euler", "heun", "pingpong")
CFG_TYPES = ("apg", "cfg", "cfg_star")
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
TASKS = ("text2music", "retake", "repaint", "edit", "extend", "audio2audio")
EDIT_TYPES = ("only_lyrics", "remix")
AUDIO_INPUTS = ("src_audio", "ref_audio")
"""Audio travels as the bytes of an audio file (wav/flac/ogg/mp3), one BYTES [1] tensor each:
``src_audio`` is the source of repaint/edit/extend, ``ref_audio`` the reference of audio2audio."""
MIN_AUDIO_SAMPLE_RATE = 8000
MAX_AUDIO_SAMPLE_RATE = 192000
"""Sample rates accepted for ``src_audio``/``ref_audio`` (telephone to high-resolution studio
audio); anything else is refused naming the field rather than resampled at a cost for nothing."""
MAX_LORA_NAME_CHARS = 256
"""Longest ``lora_name_or_path`` accepted (served adapter names are shorter still: see
``acestep_triton.lora.registry``); a longer value is refused without being echoed back."""
ECHO_CHARS = 64
"""How much of a refused value an error message quotes (:func:`echo`): enough to recognise it,
never so much that the message outgrows gRPC's 16 KiB metadata and loses its category tag."""
FLOAT32_MAX = 3.4028234663852886e38


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (with the full length)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, (str, bytes)) else ""
    return f"{text[:limit]}...{size}"


def to_float32(value: float) -> float:
    """``value`` as the FP32 tensor carries it, written back as the shortest decimal that
    round-trips it (0.7, not 0.699999988079071).

    Both sides validate this number: the client before sending, the server after decoding, so a
    value that float32 rounds (``repaint_end`` 1.00000001 becomes 1.0) gets the same verdict on
    both. Pure Python (``struct``), so the schema needs no numpy.
    """
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    for digits in range(1, 10):
        text = f"{single:.{digits}g}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == single:
            return float(text)
    return single  # pragma: no cover - 9 significant digits always round-trip a float32


class ParamError(ValueError):
    """A request field is invalid. The message always starts with the field's name."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class FieldSpec:
    """How one request field travels (Triton dtype) and what values it accepts."""

    name: str
    triton_dtype: str  # "BYTES", "FP32", "INT32", "BOOL"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    max_chars: int | None = None
    wire: bool = True  # False: client-side only (e.g. file format), recorded in the JSON

    @property
    def python_type(self) -> type:
        return {"BYTES": str, "FP32": float, "INT32": int, "BOOL": bool}[self.triton_dtype]


def _f(name: str, dtype: str, default: Any, help: str, **kw: Any) -> Any:
    spec = FieldSpec(name=name, triton_dtype=dtype, default=default, help=help, **kw)
    return field(default=default, metadata={"spec": spec})


@dataclass
class GenerationParams:
    """All parameters of one generation request (text2music for now).

    ``validate()`` normalises and checks every field; ``to_json()``/``from_json()`` round-trip
    the parameters JSON that upstream users pass back to retake a result.
    """

    prompt: str = _f("prompt", "BYTES", "", "comma-separated tags: genre, instruments, mood, tempo",
                     max_chars=MAX_PROMPT_CHARS)
    lyrics: str = _f("lyrics", "BYTES", "", "lyrics with [verse]/[chorus] structure tags",
                     max_chars=MAX_LYRICS_CHARS)
    audio_duration: float = _f("audio_duration", "FP32", -1.0,
                               "seconds; <= 0 draws a random duration in [30, 240)",
                               minimum=-1.0, maximum=MAX_DURATION_S)
    infer_step: int = _f("infer_step", "INT32", 60, "denoising steps", minimum=1, maximum=MAX_STEPS)
    guidance_scale: float = _f("guidance_scale", "FP32", 15.0, "classifier-free guidance scale",
                               minimum=0.0, maximum=200.0)
    scheduler_type: str = _f("scheduler_type", "BYTES", "euler", "sampler", choices=SCHEDULERS)
    cfg_type: str = _f("cfg_type", "BYTES", "apg", "guidance rule", choices=CFG_TYPES)
    omega_scale: float = _f("omega_scale", "FP32", 10.0, "granularity (mean-shift) scale",
                            minimum=-100.0, maximum=100.0)
    manual_seeds: str = _f("manual_seeds", "BYTES", "",
                           "seeds per batch item, e.g. '12345' or '1,2'; empty = random")
    guidance_interval: float = _f("guidance_interval", "FP32", 0.5,
                                  "fraction of steps (centred) that use guidance",
                                  minimum=0.0, maximum=1.0)
    guidance_interval_decay: float = _f("guidance_interval_decay", "FP32", 0.0,
                                        "linear decay of the scale inside the interval",
                                        minimum=0.0, maximum=1.0)
    min_guidance_scale: float = _f("min_guidance_scale", "FP32", 3.0, "scale reached by the decay",
                                   minimum=0.0, maximum=200.0)
    use_erg_tag: bool = _f("use_erg_tag", "BOOL", True, "entropy-rectifying guidance on the prompt")
    use_erg_lyric: bool = _f("use_erg_lyric", "BOOL", True, "entropy-rectifying guidance on lyrics")
    use_erg_diffusion: bool = _f("use_erg_diffusion", "BOOL", True,
                                 "entropy-rectifying guidance in the transformer")
    oss_steps: str = _f("oss_steps", "BYTES", "",
                        "optimal step selection, e.g. '16,29,52' (1-based); empty = all steps")
    guidance_scale_text: float = _f("guidance_scale_text", "FP32", 0.0,
                                    "text scale; with lyric scale > 1 enables double condition",
                                    minimum=0.0, maximum=200.0)
    guidance_scale_lyric: float = _f("guidance_scale_lyric", "FP32", 0.0, "lyric scale",
                                     minimum=0.0, maximum=200.0)
    batch_size: int = _f("batch_size", "INT32", 1, "songs generated together",
                         minimum=1, maximum=MAX_BATCH)
    task: str = _f("task", "BYTES", "text2music", "what to do", choices=TASKS)
    # --- retake / repaint / extend (upstream names; variance 0 reproduces the original)
    retake_seeds: str = _f("retake_seeds", "BYTES", "",
                           "seeds of the retake noise per item; empty = random")
    retake_variance: float = _f("retake_variance", "FP32", 0.2,
                                "how far a retake/repaint/extend moves from the original (0..1); "
                                "repaint and extend start at step int(N·(1 − v))",
                                minimum=0.0, maximum=1.0)
    repaint_start: float = _f("repaint_start", "FP32", 0.0, "repaint window start (s)",
                              minimum=0.0, maximum=MAX_DURATION_S)
    repaint_end: float = _f("repaint_end", "FP32", 0.0, "repaint window end (s)",
                            minimum=0.0, maximum=MAX_DURATION_S)
    left_extend_length: float = _f("left_extend_length", "FP32", 0.0,
                                   "seconds added before the source (extend)",
                                   minimum=0.0, maximum=MAX_DURATION_S)
    right_extend_length: float = _f("right_extend_length", "FP32", 0.0,
                                    "seconds added after the source (extend)",
                                    minimum=0.0, maximum=MAX_DURATION_S)
    # --- edit (FlowEdit): source prompt/lyrics are ``prompt``/``lyrics``
    edit_type: str = _f("edit_type", "BYTES", "only_lyrics",
                        "edit preset: only_lyrics (n_min 0.6, n_max 1.0) or remix (0.2, 0.4)",
                        choices=EDIT_TYPES)
    edit_target_prompt: str = _f("edit_target_prompt", "BYTES", "", "target tags (edit)",
                                 max_chars=MAX_PROMPT_CHARS)
    edit_target_lyrics: str = _f("edit_target_lyrics", "BYTES", "", "target lyrics (edit)",
                                 max_chars=MAX_LYRICS_CHARS)
    edit_n_min: float = _f("edit_n_min", "FP32", -1.0,
                           "FlowEdit start as a fraction of the steps; < 0 = edit_type's preset",
                           minimum=-1.0, maximum=1.0)
    edit_n_max: float = _f("edit_n_max", "FP32", -1.0,
                           "FlowEdit end as a fraction of the steps; < 0 = edit_type's preset",
                           minimum=-1.0, maximum=1.0)
    edit_n_avg: int = _f("edit_n_avg", "INT32", 1, "noise draws averaged per FlowEdit step",
                         minimum=1, maximum=16)
    # --- audio2audio
    ref_audio_strength: float = _f("ref_audio_strength", "FP32", 0.5,
                                   "how much of the reference audio is kept (audio2audio)",
                                   minimum=0.0, maximum=1.0)
    # --- LoRA
    lora_name_or_path: str = _f("lora_name_or_path", "BYTES", "none",
                                "LoRA adapter name (one the server is configured with) or 'none'",
                                max_chars=MAX_LORA_NAME_CHARS)
    lora_weight: float = _f("lora_weight", "FP32", 1.0, "LoRA strength", minimum=-3.0, maximum=3.0)
    format: str = _f("format", "BYTES", "wav", "audio file format written by the client",
                     choices=AUDIO_FORMATS, wire=False)

    # ----------------------------------------------------------------------------- schema access
    @classmethod
    def specs(cls) -> tuple[FieldSpec, ...]:
        return tuple(f.metadata["spec"] for f in fields(cls))

    @classmethod
    def wire_specs(cls) -> tuple[FieldSpec, ...]:
        """Fields sent as tensors to the server (one optional input each)."""
        return tuple(s for s in cls.specs() if s.wire)

    @classmethod
    def spec(cls, name: str) -> FieldSpec:
        for s in cls.specs():
            if s.name == name:
                return s
        raise KeyError(name)

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> GenerationParams:
        """Coerce and check every field in place; raise :class:`ParamError` naming the field."""
        for spec in self.specs():
            setattr(self, spec.name, _check(spec, getattr(self, spec.name)))
        self.seed_list()  # parse now so bad seeds fail before any work starts
        self.retake_seed_list()
        n_min, n_max = self.edit_range()
        if self.task == "edit" and n_min > n_max:
            raise ParamError("edit_n_min", f"{n_min:g} is above edit_n_max {n_max:g}")
        if self.task == "repaint" and self.repaint_end <= self.repaint_start:
            raise ParamError("repaint_end", f"{self.repaint_end:g} s must be after repaint_start "
                                            f"{self.repaint_start:g} s")
        if self.task == "extend" and self.left_extend_length + self.right_extend_length <= 0:
            raise ParamError("right_extend_length",
                             "extend needs left_extend_length or right_extend_length > 0")
        oss = parse_int_list("oss_steps", self.oss_steps, minimum=1, maximum=MAX_STEPS)
        if any(b <= a for a, b in itertools.pairwise(oss)):
            raise ParamError("oss_steps", f"step indices must increase strictly, got {oss}")
        self._check_task_arithmetic(max(oss) if oss else self.infer_step)
        return self

    def _check_task_arithmetic(self, num_steps: int) -> None:
        """Values inside each field's bounds that the sampling arithmetic cannot serve.

        They live here, not in the sampling code alone, so the client, the front end and the
        server give the same verdict (the server runs this same ``validate`` first). The formulas
        are the sampling code's: ``int(duration·44100/512/8)`` latent frames and audio2audio's
        ``int((1 − ref_audio_strength)·N)`` steps, N = max(oss_steps) or infer_step.
        """
        if (self.task in ("text2music", "retake") and self.audio_duration > 0
                and int(self.audio_duration * 44100 / 512 / 8) < 1):
            raise ParamError("audio_duration", f"{self.audio_duration:g} s is shorter than one latent frame; "
                                               f"the minimum is {math.ceil(LATENT_FRAME_S * 1e4) / 1e4:g} s "
                                               "(or <= 0 for a random duration)")
        if self.task == "audio2audio" and int((1.0 - self.ref_audio_strength) * num_steps) < 1:
            raise ParamError("ref_audio_strength",
                             f"{self.ref_audio_strength:g} with {num_steps} steps leaves no denoising step "
                             "(audio2audio runs int((1 - ref_audio_strength) * infer_step) steps; "
                             f"use at most {_max_ref_audio_strength(num_steps):g})")

    def retake_seed_list(self) -> list[int]:
        return parse_int_list("retake_seeds", self.retake_seeds, minimum=0, maximum=2**32 - 1)

    def edit_range(self) -> tuple[float, float]:
        """(n_min, n_max): explicit values, else the ``edit_type`` preset (upstream's UI rule)."""
        preset = EDIT_PRESETS[self.edit_type]
        n_min = self.edit_n_min if self.edit_n_min >= 0 else preset[0]
        n_max = self.edit_n_max if self.edit_n_max >= 0 else preset[1]
        return n_min, n_max

    def seed_list(self) -> list[int]:
        """Seeds as integers (empty list: draw random seeds)."""
        return parse_int_list("manual_seeds", self.manual_seeds, minimum=0, maximum=2**32 - 1)

    def oss_step_list(self) -> list[int]:
        return parse_int_list("oss_steps", self.oss_steps, minimum=1, maximum=None)

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in self.specs()}

    def to_json(self, **extra: Any) -> str:
        """The parameters JSON (plus extras such as ``actual_seeds``), upstream-compatible keys."""
        return json.dumps({**self.to_dict(), **extra}, ensure_ascii=False, indent=2)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, strict: bool = False) -> GenerationParams:
        """Build from a mapping; unknown keys are ignored unless ``strict`` (upstream JSON has
        extra keys such as ``timecosts`` and ``audio_path``). Seeds recorded as lists become the
        comma-separated strings the schema uses."""
        known = {s.name for s in cls.specs()}
        unknown = sorted(set(data) - known)
        if strict and unknown:
            raise ParamError(unknown[0], "unknown parameter")
        values = {k: v for k, v in data.items() if k in known and v is not None}
        # A saved result replays with the seeds it actually used (random ones included).
        if not values.get("manual_seeds") and isinstance(data.get("actual_seeds"), list):
            values["manual_seeds"] = data["actual_seeds"]
        for key in ("manual_seeds", "oss_steps", "retake_seeds"):
            if isinstance(values.get(key), (list, tuple)):
                values[key] = ",".join(str(int(v)) for v in values[key])
        return cls(**values).validate()

    @classmethod
    def from_json(cls, text: str) -> GenerationParams:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ParamError("json_data", f"not valid JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise ParamError("json_data", "must be a JSON object")
        return cls.from_mapping(data)


def _max_ref_audio_strength(num_steps: int) -> float:
    """The largest 4-decimal ``ref_audio_strength`` that leaves audio2audio one step (a hint for
    the error: searched, since ``int((1 − s)·N)`` rounds 1 − 0.9 = 0.0999… down at N = 10)."""
    strength = math.floor((1 - 1 / num_steps) * 1e4) / 1e4
    while strength > 0 and int((1.0 - strength) * num_steps) < 1:
        strength = round(strength - 1e-4, 4)
    return strength


def parse_int_list(name: str, text: str | Iterable[int] | int | None, *, minimum: int | None,
                   maximum: int | None) -> list[int]:
    """Parse '1, 2,3' (or an int, or a list) into ints, naming ``name`` on any bad entry."""
    if text is None:
        return []
    if isinstance(text, bool):
        raise ParamError(name, "must be integers separated by commas")
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, str):
        # Commas (or spaces) separate; an empty entry ("1,,2", "1,2,") is refused rather than
        # skipped: the sampling code and upstream read such a list as an error too.
        parts = text.split(",") if text.strip() else []
        if any(not part.strip() for part in parts):
            raise ParamError(name, f"{echo(text)} has an empty entry; use integers separated by commas")
        items = [item for part in parts for item in part.split()]
    else:
        items = list(text)
    out: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ParamError(name, f"{echo(item)} is not an integer") from None
        if minimum is not None and value < minimum:
            raise ParamError(name, f"{value} is below {minimum}")
        if maximum is not None and value > maximum:
            raise ParamError(name, f"{value} is above {maximum}")
        out.append(value)
    return out


def check_field(name: str, value: Any) -> Any:
    """One field's value, coerced and checked as :meth:`GenerationParams.validate` does it (for a
    server that must look at one field, such as ``task``, before the others)."""
    return _check(GenerationParams.spec(name), value)


def _check(spec: FieldSpec, value: Any) -> Any:
    """Coerce one value to the field's type and check its bounds."""
    kind = spec.python_type
    if kind is str:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ParamError(spec.name, "is not valid UTF-8") from None
        if isinstance(value, (list, tuple)) and spec.name in ("manual_seeds", "oss_steps", "retake_seeds"):
            value = ",".join(str(v) for v in value)
        if isinstance(value, int) and not isinstance(value, bool) and spec.name in ("manual_seeds",
                                                                                    "retake_seeds"):
            value = str(value)
        if not isinstance(value, str):
            raise ParamError(spec.name, f"must be a string, got {type(value).__name__}")
        if spec.max_chars is not None and len(value) > spec.max_chars:
            raise ParamError(spec.name, f"is {len(value)} characters long; the limit is {spec.max_chars}")
        if spec.choices is not None and value not in spec.choices:
            raise ParamError(spec.name, f"{echo(value)} is not one of {', '.join(spec.choices)}")
        return value
    if kind is bool:
        if isinstance(value, (bool, int)) and not isinstance(value, float):
            return bool(value)
        if hasattr(value, "item"):  # numpy scalar
            return bool(value.item())
        raise ParamError(spec.name, f"must be a boolean, got {type(value).__name__}")
    if isinstance(value, (bool, str, bytes)):
        raise ParamError(spec.name, f"must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParamError(spec.name, f"must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ParamError(spec.name, f"must be finite, got {number}")
    if kind is int:
        if number != int(number):
            raise ParamError(spec.name, f"must be an integer, got {number}")
        number = int(number)
    elif spec.triton_dtype == "FP32":
        if abs(number) > FLOAT32_MAX:
            raise ParamError(spec.name, f"{number:g} does not fit a 32-bit float")
        number = to_float32(number)  # checked as sent: the server sees this value, not the double
    if spec.minimum is not None and number < spec.minimum:
        raise ParamError(spec.name, f"{number} is below the minimum {spec.minimum:g}")
    if spec.maximum is not None and number > spec.maximum:
        raise ParamError(spec.name, f"{number} is above the maximum {spec.maximum:g}")
    return number


# --------------------------------------------------------------------------------- wire format
# Each wire field travels as its own tensor of shape [1] (the orchestrators do not batch
# requests: a request's ``batch_size`` is its batch). numpy is imported lazily so that the schema
# itself stays importable anywhere.

NUMPY_DTYPES = {"BYTES": "object", "FP32": "float32", "INT32": "int32", "BOOL": "bool"}


def encode_field(spec: FieldSpec, value: Any) -> Any:
    """A numpy array of shape [1] holding ``value`` in the field's wire dtype."""
    import numpy as np  # lazy: the schema itself imports without numpy

    if spec.triton_dtype == "BYTES":
        return np.array([str(value).encode("utf-8")], dtype=object)
    return np.array([value], dtype=NUMPY_DTYPES[spec.triton_dtype])


def decode_field(spec: FieldSpec, array: Any) -> Any:
    """The Python value of a received field tensor; shape and dtype errors name the field."""
    import numpy as np  # lazy: the schema itself imports without numpy

    arr = np.asarray(array)
    if arr.size != 1:
        raise ParamError(spec.name, f"expected one value (shape [1]), got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    if spec.triton_dtype == "BYTES":
        if not isinstance(item, (bytes, str)):
            raise ParamError(spec.name, f"expected BYTES, got {arr.dtype}")
        return item
    expected = np.dtype(NUMPY_DTYPES[spec.triton_dtype])
    if arr.dtype != expected:
        raise ParamError(spec.name, f"expected {spec.triton_dtype} ({expected}), got {arr.dtype}")
    if spec.triton_dtype == "FP32":
        # the shortest decimal that round-trips the float32 (0.7, not 0.699999988079071): the value
        # the user typed, as upstream's Python floats carried it, and the one the client validated
        return to_float32(float(item))
    return item.item()


def params_from_wire(arrays: Mapping[str, Any]) -> GenerationParams:
    """Server side: build and validate parameters from the received tensors (absent = default)."""
    values: dict[str, Any] = {}
    for spec in GenerationParams.wire_specs():
        if spec.name in arrays and arrays[spec.name] is not None:
            values[spec.name] = decode_field(spec, arrays[spec.name])
    return GenerationParams(**values).validate()


def params_to_wire(params: GenerationParams) -> dict[str, Any]:
    """Client side: one [1]-shaped numpy array per wire field."""
    return {s.name: encode_field(s, getattr(params, s.name)) for s in GenerationParams.wire_specs()}

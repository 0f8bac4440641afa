"""What upstream ACE-Step's Gradio arguments mean in our request schema.

Scripts written against upstream's demo call its endpoints with upstream's argument names and
rely on upstream's defaults (the initial values of its UI components, which is what
``gradio_client`` fills in for an argument left out). This module holds those names and
defaults once and turns one endpoint's arguments into a validated
:class:`~acestep_client.params.GenerationParams`. It is free of Gradio (and of torch) so the
mapping can be tested and reused on its own; bad input raises
:class:`~acestep_client.params.ParamError` naming the argument.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from acestep_client.params import GenerationParams, ParamError

DEFAULT_PROMPT = "pop, synth, drums, bass, electric guitar, 118 BPM, bright, uplifting, female vocals"
DEFAULT_LYRICS = """[verse]
Streetlights hum a quiet tune
Paper boats beneath the moon
Every window holds a spark
Singing softly through the dark

[chorus]
Hold on, the night is young
Every song is still unsung
Raise your voice and let it ring
Tomorrow is a brand new thing

[verse]
Footsteps echo on the stone
Nobody walks this road alone
"""
"""The UI's starting prompt and lyrics (ours; upstream ships its own example song)."""

TAG_PRESETS: dict[str, str] = {
    "Pop": "pop, synth, drums, bass, 120 BPM, catchy, bright, female vocals",
    "Rock": "rock, electric guitar, bass, drums, 132 BPM, energetic, gritty, male vocals",
    "Hip Hop": "hip hop, 808 bass, hi-hats, 92 BPM, confident, rhythmic vocals",
    "Electronic": "electronic, synth pads, kick drum, 126 BPM, euphoric, instrumental",
    "Jazz": "jazz, piano, upright bass, brushed drums, 100 BPM, smooth, relaxed",
    "Acoustic": "folk, acoustic guitar, soft percussion, 96 BPM, warm, intimate, male vocals",
}
"""Prompt presets the UI offers (a convenience; any comma-separated tags work)."""

FORMAT_CHOICES = ("mp3", "ogg", "flac", "wav")
SOURCE_CHOICES = {
    "repaint": ("text2music", "last_repaint", "upload"),
    "edit": ("text2music", "last_edit", "upload"),
    "extend": ("text2music", "last_extend", "upload"),
}
"""Where repaint/edit/extend take their source audio from (upstream's radio choices)."""

UPSTREAM_DEFAULTS: dict[str, Any] = {
    # /__call__ (upstream: the text2music button, bound to the pipeline's __call__)
    "format": "wav",
    "audio_duration": -1.0,
    "prompt": DEFAULT_PROMPT,
    "lyrics": DEFAULT_LYRICS,
    "infer_step": 60,
    "guidance_scale": 15.0,
    "scheduler_type": "euler",
    "cfg_type": "apg",
    "omega_scale": 10.0,
    "manual_seeds": "",
    "guidance_interval": 0.5,
    "guidance_interval_decay": 0.0,
    "min_guidance_scale": 3.0,
    "use_erg_tag": True,
    "use_erg_lyric": False,  # upstream's UI default (its pipeline's own default is True)
    "use_erg_diffusion": True,
    "oss_steps": "",
    "guidance_scale_text": 0.0,
    "guidance_scale_lyric": 0.0,
    "audio2audio_enable": False,
    "ref_audio_strength": 0.5,
    "ref_audio_input": None,
    "lora_name_or_path": "none",
    "lora_weight": 1.0,
    # /retake_process_func, /repaint_process_func
    "retake_variance": 0.2,
    "retake_seeds": "",
    "repaint_start": 0.0,
    "repaint_end": 30.0,
    "repaint_source": "text2music",
    # /edit_process_func
    "edit_prompt": "",
    "edit_lyrics": "",
    "edit_type": "only_lyrics",
    "edit_n_min": 0.6,
    "edit_n_max": 1.0,
    "edit_n_avg": 1,
    "edit_source": "text2music",
    # /extend_process_func
    "extend_seeds": "",
    "left_extend_length": 0.0,
    "right_extend_length": 30.0,
    "extend_source": "text2music",
}
"""Every endpoint argument's default: upstream's UI values (``edit_n_avg`` is ours: upstream
fixes it at 1). The UI components start from these, so they are also the API's defaults."""

SETTINGS = ("prompt", "lyrics", "infer_step", "guidance_scale", "scheduler_type", "cfg_type", "omega_scale",
            "manual_seeds", "guidance_interval", "guidance_interval_decay", "min_guidance_scale",
            "use_erg_tag", "use_erg_lyric", "use_erg_diffusion", "oss_steps", "guidance_scale_text",
            "guidance_scale_lyric")
"""The generation settings every endpoint but retake takes from the Text2Music tab. Their
upstream names are our schema's field names."""

ALIASES: dict[str, dict[str, str]] = {
    "text2music": {"ref_audio": "ref_audio_input"},
    "retake": {},
    "repaint": {"src_audio": "source_audio"},
    "edit": {"src_audio": "source_audio", "edit_target_prompt": "edit_prompt",
             "edit_target_lyrics": "edit_lyrics"},
    "extend": {"src_audio": "source_audio", "retake_seeds": "extend_seeds"},
}
"""Schema field -> the endpoint's argument name, so an error names what the caller passed."""


def build_params(task: str, settings: Mapping[str, Any], **fields: Any) -> GenerationParams:
    """Validated parameters for ``task`` from the shared settings plus task fields.

    ``None`` (an empty Gradio textbox or an argument a client sent as null) means the schema's
    default, as it did upstream.
    """
    values = {name: settings[name] for name in SETTINGS if name in settings}
    values.update(fields)
    values = {k: v for k, v in values.items() if v is not None}
    return GenerationParams(task=task, **values).validate()


def text2music_params(settings: Mapping[str, Any], *, format: str, audio_duration: float,
                      audio2audio_enable: bool, ref_audio_strength: float, ref_audio_input: str | None,
                      lora_name_or_path: str | None, lora_weight: float) -> GenerationParams:
    """``/__call__``: text2music, or audio2audio when it is enabled.

    Upstream quietly fell back to text2music when audio2audio was enabled without a reference;
    here that is an error, because the caller clearly asked for something else.
    """
    if audio2audio_enable and not ref_audio_input:
        raise ParamError("ref_audio_input", "Audio2Audio is enabled but no reference audio was given")
    return build_params("audio2audio" if audio2audio_enable else "text2music", settings,
                        format=format, audio_duration=audio_duration, ref_audio_strength=ref_audio_strength,
                        lora_name_or_path=lora_name_or_path or "none", lora_weight=lora_weight)


def parse_json_data(json_data: Any, field: str) -> dict[str, Any] | None:
    """A parameters JSON given as a dict or as JSON text (``None``/empty: not given)."""
    if json_data is None or json_data == "" or json_data == {}:
        return None
    if isinstance(json_data, str):
        try:
            json_data = json.loads(json_data)
        except json.JSONDecodeError as exc:
            raise ParamError(field, f"not valid JSON ({exc.msg})") from exc
    if not isinstance(json_data, dict):
        raise ParamError(field, f"must be a JSON object, got {type(json_data).__name__}")
    return json_data


def retake_params(json_data: Mapping[str, Any], *, retake_variance: float,
                  retake_seeds: str | None) -> GenerationParams:
    """``/retake_process_func``: the same request as ``json_data`` (a parameters JSON, ours or
    upstream's, replayed with its actual seeds and duration) with new retake noise."""
    try:
        base = GenerationParams.from_mapping(json_data)
    except ParamError as exc:  # a field inside the JSON: say where it came from
        raise ParamError("json_data", str(exc)) from exc
    values = base.to_dict()
    values.update(task="retake", retake_variance=retake_variance, retake_seeds=retake_seeds or "")
    return GenerationParams(**values).validate()


def edit_params(settings: Mapping[str, Any], *, edit_prompt: str | None, edit_lyrics: str | None,
                edit_type: str, edit_n_min: float, edit_n_max: float, edit_n_avg: int,
                retake_seeds: str | None, format: str, lora_name_or_path: str | None,
                lora_weight: float) -> GenerationParams:
    """``/edit_process_func``: FlowEdit from the settings' prompt/lyrics to the edit targets.

    An empty target keeps the source's prompt or lyrics (upstream's rule). ``edit_n_min`` and
    ``edit_n_max`` are used as given; ``edit_type`` is the preset the UI loads into them.
    """
    return build_params("edit", settings, edit_target_prompt=edit_prompt or settings.get("prompt"),
                        edit_target_lyrics=edit_lyrics or settings.get("lyrics"), edit_type=edit_type,
                        edit_n_min=edit_n_min, edit_n_max=edit_n_max, edit_n_avg=edit_n_avg,
                        retake_seeds=retake_seeds or "", format=format,
                        lora_name_or_path=lora_name_or_path or "none", lora_weight=lora_weight)


def repaint_params(settings: Mapping[str, Any], *, retake_variance: float, retake_seeds: str | None,
                   repaint_start: float, repaint_end: float, format: str, lora_name_or_path: str | None,
                   lora_weight: float) -> GenerationParams:
    """``/repaint_process_func``: regenerate ``[repaint_start, repaint_end)`` of the source."""
    return build_params("repaint", settings, retake_variance=retake_variance, retake_seeds=retake_seeds or "",
                        repaint_start=repaint_start, repaint_end=repaint_end, format=format,
                        lora_name_or_path=lora_name_or_path or "none", lora_weight=lora_weight)


def extend_params(settings: Mapping[str, Any], *, extend_seeds: str | None, left_extend_length: float,
                  right_extend_length: float, format: str, lora_name_or_path: str | None,
                  lora_weight: float) -> GenerationParams:
    """``/extend_process_func``: add ``left``/``right_extend_length`` seconds around the source
    (upstream's extend seeds are the schema's retake seeds). ``retake_variance`` is 1.0, what
    upstream's UI passes (every step runs); the gRPC API honours any value, as upstream's pipeline."""
    return build_params("extend", settings, retake_seeds=extend_seeds or "", retake_variance=1.0,
                        left_extend_length=left_extend_length, right_extend_length=right_extend_length,
                        format=format, lora_name_or_path=lora_name_or_path or "none", lora_weight=lora_weight)

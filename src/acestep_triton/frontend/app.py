"""The Gradio front end (port 7865): upstream ACE-Step's demo UI and API, served from Triton.

It holds no model: every request goes through the thin client (:mod:`acestep_client`) to the
Triton endpoints, so it runs in a slim container without torch. Its API keeps upstream's
endpoint names (``/__call__``, ``/retake_process_func``, ``/repaint_process_func``,
``/edit_process_func``, ``/extend_process_func``), argument names and defaults, so a
``gradio_client`` script written for upstream's demo runs unchanged against it.

Each endpoint is the click event of its tab's button (as upstream's were): the argument names
are the keys of ``inputs_kwargs`` and their defaults are the initial values of the components
(see :data:`~acestep_triton.frontend.upstream.UPSTREAM_DEFAULTS`). A few arguments exist only
for API callers (``source_audio`` on repaint/edit/extend: "use this file as the source") and sit
in hidden components. Bad input fails with a ``gr.Error`` whose message starts with the
argument's name.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from acestep_client.client import (
    AccessDenied,
    AceStepClient,
    AceStepError,
    ServerError,
    ServerUnavailable,
    field_of,
)
from acestep_client.params import AUDIO_INPUTS, EDIT_PRESETS, MAX_DURATION_S, GenerationParams, ParamError

from .disconnect import caller_gone
from .service import UPSTREAM_RANDOM_RANGE, DurationPolicy, FrontendService, Output
from .session import Memory, pick_source, recall, remember
from .upstream import (
    ALIASES,
    FORMAT_CHOICES,
    SETTINGS,
    SOURCE_CHOICES,
    TAG_PRESETS,
    UPSTREAM_DEFAULTS,
    edit_params,
    extend_params,
    parse_json_data,
    repaint_params,
    retake_params,
    text2music_params,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 7865
URL_ENV = "ACESTEP_URL"
AUTH_ENV = "ACESTEP_FRONTEND_AUTH"
"""``user:password`` (several separated by commas): the front end's own login (Gradio auth), for
browsers and ``gradio_client`` alike. Unset: no login (the demo). Its key to the model server is
``ACESTEP_API_KEY``, which the client library reads; it is never shown to the front end's users."""


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """``"alice:pw1,bob:pw2"`` as Gradio's ``auth`` list; None for no login. A malformed entry is
    an error at start-up (never a front end that silently runs without its login)."""
    if text is None or not text.strip():
        return None
    pairs = []
    for entry in text.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{AUTH_ENV}: each entry must be user:password (got an entry without "
                             f"{'a user' if sep and not user else 'a password' if sep else ':'})")
        pairs.append((user, password))
    return pairs
MAX_UPLOAD = "256mb"
"""Largest upload Gradio accepts: a 240 s, 48 kHz stereo float WAV (our own output) is ~92 MB."""
TITLE = "ACE-Step on Triton"
PROGRESS = gr.Progress()
"""The progress default Gradio looks for; it gives each call its own tracker, so sharing is safe."""


# ------------------------------------------------------------------------------ components
def _api(component: Any, name: str) -> Any:
    """Make ``component``'s input errors name the API argument it feeds.

    Gradio's own bound and choice checks say "Value 0 is less than minimum value 1." without
    naming the argument. The instance's ``preprocess`` is wrapped rather than the class
    subclassed, because defining a component subclass makes Gradio write a ``.pyi`` stub next
    to the defining module (which fails on a read-only install).
    """
    checked = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return checked(payload)
        except gr.Error as exc:
            raise gr.Error(f"{name}: {exc.message}") from exc

    component.preprocess = preprocess
    return component


# ------------------------------------------------------------------------------ errors
@contextlib.contextmanager
def user_errors(aliases: dict[str, str]) -> Iterator[None]:
    """Turn the client's and the schema's errors into ``gr.Error`` naming the caller's argument.

    Schema fields with another name in this endpoint's API (``edit_target_prompt`` is
    ``edit_prompt`` there) are renamed, so the message names what the caller actually passed.
    """
    try:
        yield
    except ParamError as exc:
        raise gr.Error(f"{aliases.get(exc.field, exc.field)}: {exc.reason}") from exc
    except ServerError as exc:
        raise gr.Error(server_message(exc.message, aliases)) from exc
    except AccessDenied as exc:  # the operator's configuration, not the caller's input
        raise gr.Error(f"the model server refused this front end's key; ask its operator to check "
                       f"ACESTEP_API_KEY ({exc})", print_exception=False) from exc
    except ServerUnavailable as exc:  # after the client's retries
        raise gr.Error(f"the model server is unavailable, try again in a moment: {exc}") from exc
    except AceStepError as exc:  # cancelled (often: the caller left) / timed out; not a server fault
        raise gr.Error(str(exc), print_exception=False) from exc


def server_message(message: str, aliases: dict[str, str]) -> str:
    """A server error as the caller should read it: ``"<argument>: <reason> (...)"`` when the
    server named a field (Triton puts its own prefix before it), else the message as it is."""
    name = field_of(message, frozenset(AUDIO_INPUTS))
    if name is None:
        return f"the model server failed the request: {message}"
    reason = message[message.index(f"{name}: ") + len(name) + 2:]
    return f"{aliases.get(name, name)}: {reason} (rejected by the model server)"


def _progress_callback(progress: gr.Progress) -> Callable[[int, int], None]:
    def on_progress(step: int, total: int) -> None:
        progress((step, total), desc="denoising", unit="steps")

    return on_progress


# ------------------------------------------------------------------------------ endpoints
class Endpoints:
    """The API functions. Their keyword arguments are upstream's names; each returns
    ``(audio file path, parameters JSON, session memory)`` (the memory is a ``gr.State``, not
    part of the API)."""

    def __init__(self, service: FrontendService) -> None:
        self.service = service

    def _run(self, kind: str, params: GenerationParams, memory: Memory | None, progress: gr.Progress,
             src_audio: str | None = None, ref_audio: str | None = None) -> tuple[str, dict[str, Any], Memory]:
        progress(0, desc="queued at the model server")

        def on_retry(attempt: int, attempts: int, error: BaseException, delay: float) -> None:
            progress(0, desc=f"model server unavailable; retrying in {delay:.0f} s ({attempt + 1}/{attempts})")

        out: Output = self.service.generate(params, src_audio=src_audio, ref_audio=ref_audio,
                                            on_progress=_progress_callback(progress), should_cancel=caller_gone,
                                            on_retry=on_retry)
        return str(out.audio_path), out.params, remember(memory, kind, out.audio_path, out.params)

    def text2music(self, progress: gr.Progress = PROGRESS, *, format: str, audio_duration: float,
                   prompt: str, lyrics: str, infer_step: int, guidance_scale: float, scheduler_type: str,
                   cfg_type: str, omega_scale: float, manual_seeds: str | None, guidance_interval: float,
                   guidance_interval_decay: float, min_guidance_scale: float, use_erg_tag: bool,
                   use_erg_lyric: bool, use_erg_diffusion: bool, oss_steps: str | None,
                   guidance_scale_text: float, guidance_scale_lyric: float, audio2audio_enable: bool,
                   ref_audio_strength: float, ref_audio_input: str | None = None,
                   lora_name_or_path: str | None = None, lora_weight: float,
                   memory: Memory | None = None) -> tuple[str, dict[str, Any], Memory]:
        """Generate a song from tags and lyrics (audio2audio: from a reference audio)."""
        settings = _settings(locals())
        with user_errors(ALIASES["text2music"]):
            params = text2music_params(settings, format=format, audio_duration=audio_duration,
                                       audio2audio_enable=audio2audio_enable,
                                       ref_audio_strength=ref_audio_strength, ref_audio_input=ref_audio_input,
                                       lora_name_or_path=lora_name_or_path, lora_weight=lora_weight)
            return self._run("text2music", params, memory, progress,
                             ref_audio=ref_audio_input if params.task == "audio2audio" else None)

    def retake(self, progress: gr.Progress = PROGRESS, *, json_data: Any = None, retake_variance: float,
               retake_seeds: str | None, memory: Memory | None = None) -> tuple[str, dict[str, Any], Memory]:
        """A variation of a result: ``json_data`` is its parameters JSON (default: this session's
        last Text2Music result), replayed with new retake noise of strength ``retake_variance``."""
        with user_errors(ALIASES["retake"]):
            data = parse_json_data(json_data, "json_data")
            if data is None:
                last = recall(memory, "text2music")
                if last is None:
                    raise ParamError("json_data", "no parameters given and no Text2Music result in this "
                                                  "session yet")
                data = last["params"]
            params = retake_params(data, retake_variance=retake_variance, retake_seeds=retake_seeds)
            return self._run("retake", params, memory, progress)

    def repaint(self, progress: gr.Progress = PROGRESS, *, text2music_json_data: Any = None,
                repaint_json_data: Any = None, retake_variance: float, retake_seeds: str | None,
                repaint_start: float, repaint_end: float, repaint_source: str,
                repaint_source_audio_upload: str | None = None, prompt: str, lyrics: str, infer_step: int,
                guidance_scale: float, scheduler_type: str, cfg_type: str, omega_scale: float,
                manual_seeds: str | None, guidance_interval: float, guidance_interval_decay: float,
                min_guidance_scale: float, use_erg_tag: bool, use_erg_lyric: bool, use_erg_diffusion: bool,
                oss_steps: str | None, guidance_scale_text: float, guidance_scale_lyric: float,
                source_audio: str | None = None, format: str, lora_name_or_path: str | None = None,
                lora_weight: float, memory: Memory | None = None) -> tuple[str, dict[str, Any], Memory]:
        """Regenerate the window [repaint_start, repaint_end) seconds of a source song."""
        settings = _settings(locals())
        with user_errors(ALIASES["repaint"]):
            src = pick_source(kind="repaint", choice=repaint_source, explicit=source_audio,
                              upload=repaint_source_audio_upload, text2music_json=text2music_json_data,
                              own_json=repaint_json_data, memory=memory, output_dir=self.service.output_dir)
            params = repaint_params(settings, retake_variance=retake_variance, retake_seeds=retake_seeds,
                                    repaint_start=repaint_start, repaint_end=repaint_end, format=format,
                                    lora_name_or_path=lora_name_or_path, lora_weight=lora_weight)
            return self._run("repaint", params, memory, progress, src_audio=src)

    def edit(self, progress: gr.Progress = PROGRESS, *, text2music_json_data: Any = None,
             edit_input_params_json: Any = None, edit_source: str, edit_source_audio_upload: str | None = None,
             prompt: str, lyrics: str, edit_prompt: str | None, edit_lyrics: str | None, edit_n_min: float,
             edit_n_max: float, infer_step: int, guidance_scale: float, scheduler_type: str, cfg_type: str,
             omega_scale: float, manual_seeds: str | None, guidance_interval: float,
             guidance_interval_decay: float, min_guidance_scale: float, use_erg_tag: bool,
             use_erg_lyric: bool, use_erg_diffusion: bool, oss_steps: str | None, guidance_scale_text: float,
             guidance_scale_lyric: float, retake_seeds: str | None, edit_type: str, edit_n_avg: int,
             source_audio: str | None = None, format: str, lora_name_or_path: str | None = None,
             lora_weight: float, memory: Memory | None = None) -> tuple[str, dict[str, Any], Memory]:
        """Edit a source song (FlowEdit) from its prompt/lyrics towards edit_prompt/edit_lyrics."""
        settings = _settings(locals())
        with user_errors(ALIASES["edit"]):
            src = pick_source(kind="edit", choice=edit_source, explicit=source_audio,
                              upload=edit_source_audio_upload, text2music_json=text2music_json_data,
                              own_json=edit_input_params_json, memory=memory,
                              output_dir=self.service.output_dir)
            params = edit_params(settings, edit_prompt=edit_prompt, edit_lyrics=edit_lyrics, edit_type=edit_type,
                                 edit_n_min=edit_n_min, edit_n_max=edit_n_max, edit_n_avg=edit_n_avg,
                                 retake_seeds=retake_seeds, format=format, lora_name_or_path=lora_name_or_path,
                                 lora_weight=lora_weight)
            return self._run("edit", params, memory, progress, src_audio=src)

    def extend(self, progress: gr.Progress = PROGRESS, *, text2music_json_data: Any = None,
               extend_input_params_json: Any = None, extend_seeds: str | None, left_extend_length: float,
               right_extend_length: float, extend_source: str, extend_source_audio_upload: str | None = None,
               prompt: str, lyrics: str, infer_step: int, guidance_scale: float, scheduler_type: str,
               cfg_type: str, omega_scale: float, manual_seeds: str | None, guidance_interval: float,
               guidance_interval_decay: float, min_guidance_scale: float, use_erg_tag: bool,
               use_erg_lyric: bool, use_erg_diffusion: bool, oss_steps: str | None, guidance_scale_text: float,
               guidance_scale_lyric: float, source_audio: str | None = None, format: str,
               lora_name_or_path: str | None = None, lora_weight: float,
               memory: Memory | None = None) -> tuple[str, dict[str, Any], Memory]:
        """Add left_extend_length / right_extend_length seconds before / after a source song."""
        settings = _settings(locals())
        with user_errors(ALIASES["extend"]):
            src = pick_source(kind="extend", choice=extend_source, explicit=source_audio,
                              upload=extend_source_audio_upload, text2music_json=text2music_json_data,
                              own_json=extend_input_params_json, memory=memory,
                              output_dir=self.service.output_dir)
            params = extend_params(settings, extend_seeds=extend_seeds, left_extend_length=left_extend_length,
                                   right_extend_length=right_extend_length, format=format,
                                   lora_name_or_path=lora_name_or_path, lora_weight=lora_weight)
            return self._run("extend", params, memory, progress, src_audio=src)


def _settings(arguments: dict[str, Any]) -> dict[str, Any]:
    return {name: arguments[name] for name in SETTINGS if name in arguments}


# ------------------------------------------------------------------------------ layout
def _output_ui(task_name: str, kind: str) -> tuple[gr.Audio, gr.JSON]:
    audio = gr.Audio(type="filepath", label=f"{task_name} Generated Audio 1", interactive=False,
                     elem_id=f"{kind}_audio")
    with gr.Accordion(f"{task_name} Parameters", open=False):
        params_json = gr.JSON(label=f"{task_name} Parameters", elem_id=f"{kind}_params")
    return audio, params_json


def _source_ui(kind: str, label: str) -> tuple[gr.Radio, gr.Audio, gr.Audio]:
    """The source radio, its upload (shown for 'upload') and the hidden API-only ``source_audio``."""
    choice = _api(gr.Radio(list(SOURCE_CHOICES[kind]), value=UPSTREAM_DEFAULTS[f"{kind}_source"],
                           label=f"{label} Source", elem_id=f"{kind}_source"), f"{kind}_source")
    upload = gr.Audio(type="filepath", label="Upload Audio", visible=False, elem_id=f"{kind}_source_audio_upload")
    explicit = gr.Audio(type="filepath", label="source_audio", visible=False)
    choice.change(lambda value: gr.update(visible=value == "upload"), inputs=[choice], outputs=[upload],
                  api_visibility="private", queue=False)
    return choice, upload, explicit


@dataclass(frozen=True)
class _SourceTaskUI:
    """The bottom of the Repainting, Edit and Extend tabs: where the source comes from, the
    button, and the result."""

    source: gr.Radio
    upload: gr.Audio
    explicit: gr.Audio
    button: gr.Button
    audio: gr.Audio
    params_json: gr.JSON


def _source_task_ui(kind: str, label: str) -> _SourceTaskUI:
    source, upload, explicit = _source_ui(kind, label)
    button = gr.Button(label, variant="primary")
    audio, params_json = _output_ui(label, kind)
    return _SourceTaskUI(source, upload, explicit, button, audio, params_json)


def _slider(name: str, low: float, high: float, step: float, label: str, **options: Any) -> gr.Slider:
    """A slider for API argument ``name``. It starts at upstream's default for the argument, because
    a component's initial value is also the API's default (so are those of the helpers below)."""
    return _api(gr.Slider(low, high, step=step, value=UPSTREAM_DEFAULTS[name], label=label, **options), name)


def _seconds_slider(name: str, label: str) -> gr.Slider:
    """A position or length in seconds (repaint window, extension): up to the longest song."""
    return _slider(name, 0.0, MAX_DURATION_S, 0.01, label)


def _textbox(name: str, label: str, **options: Any) -> gr.Textbox:
    """Free text: no bound or choice for Gradio to check, so no :func:`_api` wrapper."""
    return gr.Textbox(value=UPSTREAM_DEFAULTS[name], label=label, **options)


def _checkbox(name: str, label: str, **options: Any) -> gr.Checkbox:
    return gr.Checkbox(value=UPSTREAM_DEFAULTS[name], label=label, **options)


def _radio(name: str, choices: list[str], label: str, **options: Any) -> gr.Radio:
    """Gradio checks the choice; :func:`_api` makes its error name the argument."""
    return _api(gr.Radio(choices, value=UPSTREAM_DEFAULTS[name], label=label, **options), name)


@dataclass(frozen=True)
class _SharedInputs:
    """What the other tabs' endpoints read from the Text2Music tab (as upstream's did): the tags,
    lyrics and settings, the format and LoRA, its result, and the session's memory."""

    settings: dict[str, Any]
    """Component per :data:`~.upstream.SETTINGS` name, in upstream's argument order."""
    audio_format: gr.Dropdown
    lora: dict[str, Any]
    text2music_json: gr.JSON
    memory: gr.State

    def tail(self) -> dict[str, Any]:
        """The last arguments of repaint, edit and extend, in upstream's order."""
        return {"format": self.audio_format, **self.lora, "memory": self.memory}


_Click = Callable[[], Any]
"""An endpoint's ``button.click`` registration, made by :func:`build_demo` once every tab exists."""


def _duration_and_format_ui(policy: DurationPolicy) -> tuple[gr.Slider, gr.Dropdown]:
    max_seconds = policy.max_duration or MAX_DURATION_S
    with gr.Row(equal_height=True):
        audio_duration = _api(gr.Slider(
            -1, max_seconds, step=0.00001, value=UPSTREAM_DEFAULTS["audio_duration"], label="Audio Duration",
            info=f"-1 means a random duration ({policy.random_range[0]:g} ~ "
                 f"{min(policy.random_range[1], max_seconds):g} s).", scale=9,
            elem_id="audio_duration"), "audio_duration")
        audio_format = _api(gr.Dropdown(list(FORMAT_CHOICES), value=UPSTREAM_DEFAULTS["format"], label="Format"),
                            "format")
    return audio_duration, audio_format


def _tags_and_lyrics_ui() -> dict[str, Any]:
    with gr.Row():
        preset = gr.Dropdown(["Custom", *TAG_PRESETS], value="Custom", label="Preset", scale=1)
        prompt = _textbox("prompt", "Tags", lines=1, max_lines=4, scale=9,
                          info="Comma-separated tags: genre, instruments, mood, tempo.")
    preset.change(lambda name: TAG_PRESETS.get(name, ""), inputs=[preset], outputs=[prompt],
                  api_visibility="private", queue=False)
    lyrics = _textbox("lyrics", "Lyrics", lines=9, max_lines=13,
                      info="Structure tags like [verse], [chorus], [bridge]; "
                           "[instrumental] for music without vocals.")
    return {"prompt": prompt, "lyrics": lyrics}


def _basic_settings_ui() -> dict[str, Any]:
    with gr.Accordion("Basic Settings", open=False):
        return {
            "infer_step": _slider("infer_step", 1, 200, 1, "Infer Steps", elem_id="infer_step"),
            "guidance_scale": _slider("guidance_scale", 0.0, 30.0, 0.1, "Guidance Scale",
                                      info="Not applied when both text and lyric scales are above 1."),
            "guidance_scale_text": _slider("guidance_scale_text", 0.0, 10.0, 0.1, "Guidance Scale Text",
                                           info="Text-only guidance (cfg); try 5.0 with lyric 1.5."),
            "guidance_scale_lyric": _slider("guidance_scale_lyric", 0.0, 10.0, 0.1, "Guidance Scale Lyric"),
            "manual_seeds": _textbox("manual_seeds", "manual seeds (default None)", placeholder="1,2,3,4",
                                     info="Seed for the generation"),
        }


def _advanced_settings_ui() -> dict[str, Any]:
    with gr.Accordion("Advanced Settings", open=False):
        return {
            "scheduler_type": _radio("scheduler_type", ["euler", "heun", "pingpong"], "Scheduler Type",
                                     elem_id="scheduler_type", info="euler is recommended; heun is slower; "
                                                                    "pingpong is stochastic (SDE)."),
            "cfg_type": _radio("cfg_type", ["cfg", "apg", "cfg_star"], "CFG Type", elem_id="cfg_type",
                               info="apg is recommended."),
            "use_erg_tag": _checkbox("use_erg_tag", "use ERG for tag",
                                     info="Entropy-rectifying guidance: a weaker tag condition for more "
                                          "diversity."),
            "use_erg_lyric": _checkbox("use_erg_lyric", "use ERG for lyric"),
            "use_erg_diffusion": _checkbox("use_erg_diffusion", "use ERG for diffusion"),
            "omega_scale": _slider("omega_scale", -100.0, 100.0, 0.1, "Granularity Scale",
                                   info="Higher values can reduce artifacts."),
            "guidance_interval": _slider("guidance_interval", 0.0, 1.0, 0.01, "Guidance Interval",
                                         info="0.5: guidance only in the middle half of the steps."),
            "guidance_interval_decay": _slider("guidance_interval_decay", 0.0, 1.0, 0.01, "Guidance Interval Decay",
                                               info="Decay from the guidance scale to the min guidance scale "
                                                    "inside the interval."),
            "min_guidance_scale": _slider("min_guidance_scale", 0.0, 200.0, 0.1, "Min Guidance Scale"),
            "oss_steps": _textbox("oss_steps", "OSS Steps", placeholder="16, 29, 52, 96, 129, 158, 172, 183, 189, 200",
                                  info="Optimal step selection (1-based step indices)."),
        }


def _audio2audio_ui() -> dict[str, Any]:
    """The reference audio and its strength, shown only while Audio2Audio is enabled."""
    with gr.Accordion("Reference Audio (Audio2Audio)", open=False):
        enable = _checkbox("audio2audio_enable", "Enable Audio2Audio", elem_id="audio2audio_checkbox")
        ref_audio_input = gr.Audio(type="filepath", label="Reference Audio (for Audio2Audio)", visible=False,
                                   elem_id="ref_audio_input")
        strength = _slider("ref_audio_strength", 0.0, 1.0, 0.01, "Refer audio strength", visible=False,
                           elem_id="ref_audio_strength")
        enable.change(lambda on: (gr.update(visible=on), gr.update(visible=on)), inputs=[enable],
                      outputs=[ref_audio_input, strength], api_visibility="private", queue=False)
    return {"audio2audio_enable": enable, "ref_audio_strength": strength, "ref_audio_input": ref_audio_input}


def _lora_ui(lora_choices: Sequence[str]) -> dict[str, Any]:
    with gr.Accordion("LoRA", open=False):
        name = gr.Dropdown(["none", *lora_choices], value=UPSTREAM_DEFAULTS["lora_name_or_path"],
                           label="Lora Name or Path", allow_custom_value=True,
                           info="An adapter the model server is configured with.")
        weight = _api(gr.Number(value=UPSTREAM_DEFAULTS["lora_weight"], label="Lora weight", step=0.1,
                                minimum=-3, maximum=3), "lora_weight")
    return {"lora_name_or_path": name, "lora_weight": weight}


def _text2music_tab(endpoints: Endpoints, memory: gr.State, policy: DurationPolicy,
                    lora_choices: Sequence[str]) -> tuple[_SharedInputs, _Click]:
    """``/__call__``: tags, lyrics, every generation setting, audio2audio and LoRA."""
    with gr.Tab("Text2Music", id="text2music"), gr.Row():
        with gr.Column():
            audio_duration, audio_format = _duration_and_format_ui(policy)
            components = {**_tags_and_lyrics_ui(), **_basic_settings_ui(), **_advanced_settings_ui()}
            audio2audio = _audio2audio_ui()
            lora = _lora_ui(lora_choices)
            button = gr.Button("Generate", variant="primary", elem_id="text2music_generate")
        with gr.Column():
            audio, params_json = _output_ui("Text2Music", "text2music")
    settings = {name: components[name] for name in SETTINGS}
    shared = _SharedInputs(settings, audio_format, lora, params_json, memory)
    click = functools.partial(
        button.click, endpoints.text2music, api_name="__call__", outputs=[audio, params_json, memory],
        inputs_kwargs={"format": audio_format, "audio_duration": audio_duration, **settings, **audio2audio,
                       **lora, "memory": memory})
    return shared, click


def _retake_tab(endpoints: Endpoints, shared: _SharedInputs) -> _Click:
    """``/retake_process_func``: replays the Text2Music result's parameters with new retake noise."""
    with gr.Tab("Retake", id="retake"):
        gr.Markdown("A variation of the last Text2Music result (its parameters, new retake noise).")
        variance = _slider("retake_variance", 0.0, 1.0, 0.01, "variance")
        seeds = _textbox("retake_seeds", "retake seeds (default None)")
        button = gr.Button("Retake", variant="primary")
        audio, params_json = _output_ui("Retake", "retake")
    return functools.partial(
        button.click, endpoints.retake, api_name="retake_process_func", outputs=[audio, params_json, shared.memory],
        inputs_kwargs={"json_data": shared.text2music_json, "retake_variance": variance, "retake_seeds": seeds,
                       "memory": shared.memory})


def _source_task_click(ui: _SourceTaskUI, shared: _SharedInputs, handler: Callable[..., Any], api_name: str,
                       inputs: dict[str, Any]) -> _Click:
    """The click of a source-task tab under upstream's endpoint name. Its inputs, in upstream's
    order (``gradio_client`` scripts pass them by position): the Text2Music tab's JSON, the tab's
    own ``inputs``, the explicit source audio, then the shared tail; it answers the audio, the
    parameters JSON and the shared memory."""
    return functools.partial(
        ui.button.click, handler, api_name=api_name, outputs=[ui.audio, ui.params_json, shared.memory],
        inputs_kwargs={"text2music_json_data": shared.text2music_json, **inputs, "source_audio": ui.explicit,
                       **shared.tail()})


def _repaint_tab(endpoints: Endpoints, shared: _SharedInputs) -> _Click:
    """``/repaint_process_func``: regenerates a window of a source song."""
    with gr.Tab("Repainting", id="repaint"):
        gr.Markdown("Uses the tags, lyrics and settings of the Text2Music tab.")
        variance = _slider("retake_variance", 0.0, 1.0, 0.01, "variance")
        seeds = _textbox("retake_seeds", "repaint seeds (default None)")
        start = _seconds_slider("repaint_start", "Repaint Start Time")
        end = _seconds_slider("repaint_end", "Repaint End Time")
        ui = _source_task_ui("repaint", "Repaint")
    return _source_task_click(ui, shared, endpoints.repaint, "repaint_process_func", {
        "repaint_json_data": ui.params_json, "retake_variance": variance, "retake_seeds": seeds,
        "repaint_start": start, "repaint_end": end, "repaint_source": ui.source,
        "repaint_source_audio_upload": ui.upload, **shared.settings})


def _edit_tab(endpoints: Endpoints, shared: _SharedInputs) -> _Click:
    """``/edit_process_func``: FlowEdit of a source song towards new tags and lyrics."""
    with gr.Tab("Edit", id="edit"):
        gr.Markdown("Edits from the Text2Music tab's tags and lyrics (and settings) towards these.")
        edit_prompt = _textbox("edit_prompt", "Edit Tags", lines=2, max_lines=4, info="Empty: keep the source tags.")
        edit_lyrics = _textbox("edit_lyrics", "Edit Lyrics", lines=9, max_lines=13,
                               info="Empty: keep the source lyrics.")
        seeds = _textbox("retake_seeds", "edit seeds (default None)")
        edit_type = _radio("edit_type", ["only_lyrics", "remix"], "Edit Type", elem_id="edit_type",
                           info="only_lyrics keeps the song and changes the words (keep the change small); "
                                "remix can change melody and genre.")
        n_min = _slider("edit_n_min", 0.0, 1.0, 0.01, "edit_n_min")
        n_max = _slider("edit_n_max", 0.0, 1.0, 0.01, "edit_n_max")
        n_avg = _slider("edit_n_avg", 1, 16, 1, "edit_n_avg", info="Noise draws averaged per edit step.")
        edit_type.change(_edit_preset, inputs=[edit_type], outputs=[n_min, n_max], api_visibility="private",
                         queue=False)
        ui = _source_task_ui("edit", "Edit")
    settings = {k: v for k, v in shared.settings.items() if k not in ("prompt", "lyrics")}
    return _source_task_click(ui, shared, endpoints.edit, "edit_process_func", {
        "edit_input_params_json": ui.params_json, "edit_source": ui.source, "edit_source_audio_upload": ui.upload,
        "prompt": shared.settings["prompt"], "lyrics": shared.settings["lyrics"], "edit_prompt": edit_prompt,
        "edit_lyrics": edit_lyrics, "edit_n_min": n_min, "edit_n_max": n_max, **settings, "retake_seeds": seeds,
        "edit_type": edit_type, "edit_n_avg": n_avg})


def _extend_tab(endpoints: Endpoints, shared: _SharedInputs) -> _Click:
    """``/extend_process_func``: adds seconds before and after a source song."""
    with gr.Tab("Extend", id="extend"):
        gr.Markdown("Uses the tags, lyrics and settings of the Text2Music tab. Runs every step "
                    "(retake_variance 1.0, as upstream's UI); the gRPC API honours any retake_variance.")
        seeds = _textbox("extend_seeds", "extend seeds (default None)")
        left = _seconds_slider("left_extend_length", "Left Extend Length")
        right = _seconds_slider("right_extend_length", "Right Extend Length")
        ui = _source_task_ui("extend", "Extend")
    return _source_task_click(ui, shared, endpoints.extend, "extend_process_func", {
        "extend_input_params_json": ui.params_json, "extend_seeds": seeds, "left_extend_length": left,
        "right_extend_length": right, "extend_source": ui.source, "extend_source_audio_upload": ui.upload,
        **shared.settings})


def build_demo(service: FrontendService, *, lora_choices: Sequence[str] = ()) -> gr.Blocks:
    """The UI: tabs Text2Music, Retake, Repainting, Edit, Extend; the buttons are the API.

    Each tab is laid out by its own function, which hands back its endpoint's click registration;
    the registrations run after all tabs exist because Gradio numbers events in the order they are
    registered (``fn_index``, which positional ``gradio_client`` calls use): the tabs' private
    handlers first, then the five endpoints in upstream's order.
    """
    endpoints = Endpoints(service)
    # No analytics: a serving front end has no business phoning home (and often cannot).
    with gr.Blocks(title=TITLE, delete_cache=(3600, 24 * 3600), analytics_enabled=False) as demo:
        gr.Markdown(f"<h1 style='text-align: center;'>{TITLE}</h1>"
                    f"<p style='text-align: center;'>ACE-Step v1 music generation, served by NVIDIA Triton "
                    f"at <code>{service.client.url}</code>.</p>")
        memory = gr.State(None)
        shared, text2music_click = _text2music_tab(endpoints, memory, service.policy, lora_choices)
        clicks = [text2music_click, _retake_tab(endpoints, shared), _repaint_tab(endpoints, shared),
                  _edit_tab(endpoints, shared), _extend_tab(endpoints, shared)]
        for click in clicks:
            click()
    return demo


def _edit_preset(edit_type: str) -> tuple[float, float]:
    """The sliders' values for an edit type (upstream's presets)."""
    return EDIT_PRESETS.get(edit_type, EDIT_PRESETS["only_lyrics"])


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep-frontend", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get(URL_ENV, "localhost:8001"),
                        help=f"Triton gRPC address (env {URL_ENV}; default %(default)s)")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0 in a container; default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where result files are written (default: a new temporary folder)")
    parser.add_argument("--keep-hours", type=float, default=24.0,
                        help="delete result files older than this (default %(default)s)")
    parser.add_argument("--max-duration", type=float, default=None,
                        help="deployment cap: no request may produce more seconds of audio than this "
                             "(default: the server's limit)")
    parser.add_argument("--random-duration", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=UPSTREAM_RANDOM_RANGE,
                        help="range that audio_duration -1 draws from (default: upstream's 30 240)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME",
                        help="LoRA adapter offered in the UI (repeatable; the server must know it; "
                             "default: the adapters a torch-runtime server has loaded)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="requests each endpoint keeps in flight to the model server at once; more "
                             "wait in Gradio's queue (default %(default)s)")
    parser.add_argument("--timeout-s", "--timeout", dest="timeout_s", type=float, default=None,
                        help="deadline of a request in seconds, retries included (default: none)")
    return parser


def create_service(args: argparse.Namespace) -> FrontendService:
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="acestep-frontend-"))
    policy = DurationPolicy(random_range=tuple(args.random_duration), max_duration=args.max_duration)
    return FrontendService(AceStepClient(args.url), output_dir, policy,
                           keep_seconds=args.keep_hours * 3600.0, timeout_s=args.timeout_s)


def launch(service: FrontendService, *, server_name: str = "127.0.0.1", port: int = DEFAULT_PORT,
           concurrency: int = 4, lora_choices: Sequence[str] = (), block: bool = True,
           auth: Sequence[tuple[str, str]] | None = None) -> gr.Blocks:
    """Build and start the app; with ``block=False`` return once it is serving. ``auth``:
    (user, password) pairs that must log in first (:func:`parse_auth`), None for an open UI."""
    demo = build_demo(service, lora_choices=lora_choices)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=server_name, server_port=port, allowed_paths=[str(service.output_dir)],
                max_file_size=MAX_UPLOAD, prevent_thread_lock=not block, show_error=True, quiet=not block,
                ssr_mode=False, auth=list(auth) if auth else None)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        service = create_service(args)
        auth = parse_auth(os.environ.get(AUTH_ENV))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not service.client.is_ready():
        log.warning("no ready Triton server at %s yet; requests will fail until it is up", args.url)
    log.info("results go to %s", service.output_dir)
    log.info("login %s; model server key %s", "required" if auth else f"off (set {AUTH_ENV})",
             "sent" if service.client.api_key else "none")
    launch(service, server_name=args.server_name, port=args.port, concurrency=args.concurrency,
           lora_choices=args.lora or served_loras(service), auth=auth)
    return 0


def served_loras(service: FrontendService) -> list[str]:
    """The adapters a torch-runtime server has loaded (its ``lora_registry``), offered when no
    ``--lora`` is given; none when the server has no registry or is not up yet (any name can
    still be typed: the dropdown takes custom values)."""
    try:
        return [a["name"] for a in service.client.list_loras().get("loaded", [])]
    except Exception as exc:  # a fused-variant or LoRA-less server, or none yet
        log.info("no live LoRA listing from the model server (%s)", exc)
        return []


if __name__ == "__main__":
    sys.exit(main())

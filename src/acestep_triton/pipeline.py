"""Request-level generation, shared by the in-process reference and the Triton orchestrators.

``MusicGenerator`` turns one validated :class:`~acestep_client.params.GenerationParams` into
audio: tokenise, resolve duration and seeds, encode the conditions, run the sampling loop,
decode to 48 kHz, and record the parameters JSON (with the actual seeds). It talks to the
networks only through a :class:`~acestep_triton.sampling.ComponentBackend`, so the same code runs

* in-process, with :class:`TorchBackend` over the torch modules (the reference pipeline and
  the CLI's ``--local`` mode), and
* inside Triton, with the BLS backend of ``serving/`` calling the served components.

Same seed and parameters → the same numbers from both (tested).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acestep_client.limits import MODEL_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, CancelFn
from acestep_client.params import GenerationParams, ParamError

from .audio import decode_audio_bytes, to_stereo_44k
from .checkpoint import load_components
from .codec import AudioCodec
from .lora import InProcessLoras, LoraRegistry, LoraScope, no_lora
from .lyrics import MAX_LYRIC_TOKENS
from .models.mel import LogMelSpectrogram
from .sampling import (
    ComponentBackend,
    EncodedConditions,
    PromptTokens,
    SamplerConfig,
    SamplingHooks,
    SeededNoise,
    build_conditions,
    latent_frames,
    lyric_inputs,
    resolve_request_seeds,
    sample_audio2audio,
    sample_retake,
    sample_text2music,
)
from .sampling.hooks import ProgressFn
from .sampling.noise import MAX_FRAMES, resolve_duration
from .sampling.tasks import RepaintWindow, encode_edit_conditions, sample_edit, sample_extend, sample_repaint


@dataclass
class GenerationOutput:
    """Audio [B, 2, N] float32 at ``sample_rate`` and the record needed to reproduce it."""

    audio: torch.Tensor
    sample_rate: int
    record: dict[str, Any]
    latents: torch.Tensor


def sampler_config(params: GenerationParams) -> SamplerConfig:
    """The sampling part of a request (field names are shared with the schema)."""
    return SamplerConfig(
        infer_step=params.infer_step,
        guidance_scale=params.guidance_scale,
        scheduler_type=params.scheduler_type,
        cfg_type=params.cfg_type,
        omega_scale=params.omega_scale,
        guidance_interval=params.guidance_interval,
        guidance_interval_decay=params.guidance_interval_decay,
        min_guidance_scale=params.min_guidance_scale,
        use_erg_tag=params.use_erg_tag,
        use_erg_lyric=params.use_erg_lyric,
        use_erg_diffusion=params.use_erg_diffusion,
        oss_steps=params.oss_step_list(),
        guidance_scale_text=params.guidance_scale_text,
        guidance_scale_lyric=params.guidance_scale_lyric,
    )


AudioBytes = bytes | None


@dataclass(frozen=True)
class _Request:
    """One request as the task samplers read it, built once per request by ``_generate``.

    ``noise`` holds the manual seeds, ``retake`` the retake seeds (drawn from as the task needs);
    ``rng`` draws a random duration (text2music, retake).
    """

    params: GenerationParams
    config: SamplerConfig
    noise: SeededNoise
    retake: SeededNoise
    hooks: SamplingHooks
    src_audio: AudioBytes
    ref_audio: AudioBytes
    rng: random.Random | None


@dataclass(frozen=True)
class _Sampled:
    """A task sampler's result: the final latents, their length in seconds (what the decoder
    and the record need), and the task's own fields of the parameters record."""

    latents: torch.Tensor
    duration: float
    record: dict[str, Any] = field(default_factory=dict)


def _param_error(exc: ValueError) -> ParamError:
    """Sampling code raises ``ValueError("<field>: reason")``; give it the schema's error type."""
    field_name, _, reason = str(exc).partition(": ")
    known = {s.name for s in GenerationParams.specs()}
    return ParamError(field_name, reason) if field_name in known and reason else ParamError("request", str(exc))


def torch_device(name: torch.device | str) -> torch.device:
    """``name`` as a usable torch device; ``ValueError`` saying why when it is not one here."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r}: torch sees no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU; name it
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device``: itself when already there, else a moved copy (``Module.to``
    moves in place, and the caller's module, e.g. the vocoder's mel front end, stays put)."""
    if all(t.device == device for t in (*module.parameters(), *module.buffers())):
        return module
    return copy.deepcopy(module).to(device)


class MusicGenerator:
    """Runs whole requests of every task against any :class:`ComponentBackend`."""

    def __init__(self, backend: ComponentBackend, prompt_tokenizer: Any, lyric_tokenizer: Any,
                 mel: LogMelSpectrogram, *, overlapped_decode: bool = True,
                 lora_scope: LoraScope | None = None, device: torch.device | str = "cpu") -> None:
        """``overlapped_decode``: decode songs longer than 48 s in bounded windows (upstream's
        opt-in ``overlapped_decode``). On by default here: it bounds every component call's
        size, which a server with fixed engine profiles and shared memory needs.

        ``device``: where the sampling loop's tensors live (the mel front end moves there too).
        The backend's outputs must come back on it: on a GPU the loop then never copies latents
        to the host between steps. Noise is still drawn on the CPU (see ``sampling.noise``).
        """
        self.device = torch_device(device)
        self.backend = backend
        self.lora_scope: LoraScope = lora_scope or no_lora
        self.prompt_tokenizer = prompt_tokenizer
        self.lyric_tokenizer = lyric_tokenizer
        self.codec = AudioCodec(backend.encode_mel, backend.decode_latents, backend.vocode,
                                _on_device(mel, self.device), overlapped_decode=overlapped_decode)

    def tokenize_lyrics(self, lyrics: str, field_name: str = "lyrics") -> list[int]:
        """Lyric ids, with the served length limit checked (the error names the field)."""
        if not lyrics:
            return []
        ids = self.lyric_tokenizer.encode(lyrics)
        if len(ids) > MAX_LYRIC_TOKENS:
            raise ParamError(field_name, f"{len(ids)} tokens; the limit is {MAX_LYRIC_TOKENS}")
        return ids

    def encode_audio(self, data: bytes | None, field_name: str) -> tuple[torch.Tensor, float]:
        """Source/reference audio file bytes → (latents [1, 8, 16, W], duration in seconds)."""
        if data is None:
            raise ParamError(field_name, "this task needs an audio file")
        wave, rate = decode_audio_bytes(data, field_name)
        latents = self.codec.encode(to_stereo_44k(wave, rate).unsqueeze(0), MODEL_SAMPLE_RATE)
        # The encoder pads to whole frames, so a source of up to 240 s (the decoder's limit) can
        # come out one frame longer than a generation may be: our own 240 s song (2583 frames),
        # resampled to 48 kHz and back, rounds up to 2584. That last frame is mostly padding;
        # drop it rather than refuse the source (at most 93 ms of its end).
        return latents[..., :MAX_FRAMES], wave.shape[-1] / rate

    def _tokens(self, prompt: str, lyrics: str, lyrics_field: str = "lyrics") -> PromptTokens:
        input_ids, attention_mask = self.prompt_tokenizer([prompt])
        lyric_ids, lyric_mask = lyric_inputs(self.tokenize_lyrics(lyrics, lyrics_field))
        return PromptTokens(input_ids, attention_mask, lyric_ids, lyric_mask).to(self.device)

    def _conditions(self, request: _Request) -> EncodedConditions:
        """The request's prompt and lyrics through the encoders (every task but edit)."""
        tokens = self._tokens(request.params.prompt, request.params.lyrics)
        return build_conditions(self.backend, tokens, request.config)

    def _from_source(self, latents: torch.Tensor, record: dict[str, Any]) -> _Sampled:
        """A result whose length follows the source/reference audio, not ``audio_duration``."""
        return _Sampled(latents, latents.shape[-1] * self.codec.samples_per_latent / MODEL_SAMPLE_RATE, record)

    @torch.inference_mode()
    def generate(self, params: GenerationParams, *, src_audio: AudioBytes = None, ref_audio: AudioBytes = None,
                 progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                 rng: random.Random | None = None, seed_rng: torch.Generator | None = None) -> GenerationOutput:
        """One request of any task, start to finish.

        ``src_audio`` (repaint/edit/extend) and ``ref_audio`` (audio2audio) are the bytes of an
        audio file. ``rng`` draws a random duration when ``audio_duration <= 0``; ``seed_rng``
        draws missing seeds (upstream: torch's global generator). Raises :class:`ParamError`
        for bad input and ``SamplingCancelled`` when ``should_cancel()`` turns true between steps
        (or ``codec.DecodeCancelled``, one of them, between decode windows).
        """
        params.validate()
        # Every backend a MusicGenerator runs on (in-process, served) takes per-row query scales.
        hooks = SamplingHooks(progress=progress, should_cancel=should_cancel, row_query_scale=True)
        try:
            with self.lora_scope(params.lora_name_or_path, params.lora_weight):
                return self._generate(params, src_audio, ref_audio, hooks, rng, seed_rng)
        except ValueError as exc:
            if isinstance(exc, ParamError):
                raise
            raise _param_error(exc) from exc

    def _generate(self, params: GenerationParams, src_audio: AudioBytes, ref_audio: AudioBytes,
                  hooks: SamplingHooks, rng: random.Random | None,
                  seed_rng: torch.Generator | None) -> GenerationOutput:
        # 1. The sampling configuration and the seeds (the schema's parsed seeds, not the raw
        #    strings: the seeds used are the ones validated).
        config = sampler_config(params)
        noise, retake = resolve_request_seeds(params.seed_list() or None, params.retake_seed_list() or None,
                                              params.batch_size, seed_rng)
        # 2. The task's sampler, from the request to the final latents.
        request = _Request(params, config, noise, retake, hooks, src_audio, ref_audio, rng)
        sampled = _TASK_SAMPLERS[params.task](self, request)
        # 3. Decode to 48 kHz audio (a cancel stops within one window).
        audio = self.codec.decode(sampled.latents, OUTPUT_SAMPLE_RATE, self.codec.should_overlap(sampled.duration),
                                  should_cancel=hooks.should_cancel)
        # 4. The parameters record, with the seeds actually used.
        record = {**params.to_dict(), **sampled.record}
        record.update(audio_duration=sampled.duration, actual_seeds=noise.seeds, retake_seeds=retake.seeds,
                      oss_steps=params.oss_step_list(), sample_rate=OUTPUT_SAMPLE_RATE)
        return GenerationOutput(audio=audio, sample_rate=OUTPUT_SAMPLE_RATE, record=record, latents=sampled.latents)

    # The task samplers: one per task, each the whole of that task from the request to latents.

    def _text2music(self, request: _Request) -> _Sampled:
        # 1. Encode the prompt and lyrics.
        conditions = self._conditions(request)
        # 2. Resolve the duration (random when audio_duration <= 0) and draw the seed noise.
        duration = resolve_duration(request.params.audio_duration, request.rng)
        noise = request.noise.draw_latents(latent_frames(duration), self.device)
        # 3. Sample.
        latents = sample_text2music(self.backend, conditions, noise, request.config,
                                    generator=request.noise.step_generator, hooks=request.hooks)
        return _Sampled(latents, duration)

    def _retake(self, request: _Request) -> _Sampled:
        # 1. Encode the prompt and lyrics.
        conditions = self._conditions(request)
        # 2. Resolve the duration and draw the seed noise and the retake-seed noise.
        duration = resolve_duration(request.params.audio_duration, request.rng)
        frames = latent_frames(duration)
        noise = request.noise.draw_latents(frames, self.device)
        retake_noise = request.retake.draw_latents(frames, self.device)
        # 3. Sample from their cos/sin mix.
        latents = sample_retake(self.backend, conditions, noise, retake_noise, request.params.retake_variance,
                                request.config, generator=request.noise.step_generator, hooks=request.hooks)
        return _Sampled(latents, duration)

    def _repaint(self, request: _Request) -> _Sampled:
        params = request.params
        # 1. Encode the source audio, then the prompt and lyrics.
        source, src_duration = self.encode_audio(request.src_audio, "src_audio")
        conditions = self._conditions(request)
        # 2. The window. Past the source's end it extends the source: the retake noise then needs
        #    the window's frame count (the source's whenever upstream works), as for extend.
        frames = source.shape[-1]
        window = RepaintWindow.from_seconds(params.repaint_start, params.repaint_end, frames)
        # 3. Draw the seed noise and the retake-seed noise.
        noise = request.noise.draw_latents(frames, self.device)
        retake_noise = request.retake.draw_latents(window.retake_noise_frames, self.device)
        # 4. Regenerate the window (the whole source is a retake: pingpong's generator for that).
        latents = sample_repaint(self.backend, conditions, source, noise, retake_noise, params.repaint_start,
                                 params.repaint_end, params.retake_variance, request.config,
                                 generator=request.noise.step_generator, hooks=request.hooks)
        return self._from_source(latents, {"src_audio_duration": src_duration})

    def _extend(self, request: _Request) -> _Sampled:
        params = request.params
        # 1. Encode the source audio, then the prompt and lyrics.
        source, src_duration = self.encode_audio(request.src_audio, "src_audio")
        conditions = self._conditions(request)
        # 2. The window: the padding on either side of the source.
        window = RepaintWindow.for_extension(params.left_extend_length, params.right_extend_length, src_duration,
                                             source.shape[-1])
        # 3. Draw the seed noise (the source's frames) and the retake-seed noise (the padding's).
        noise = request.noise.draw_latents(source.shape[-1], self.device)
        retake_noise = request.retake.draw_latents(window.retake_noise_frames, self.device)
        # 4. Generate the padding; as upstream's pipeline, the loop starts at int(N·(1 − retake_variance)).
        latents = sample_extend(self.backend, conditions, source, noise, retake_noise, params.left_extend_length,
                                params.right_extend_length, src_duration, request.config,
                                retake_variance=params.retake_variance, hooks=request.hooks)
        return self._from_source(latents, {"src_audio_duration": src_duration})

    def _edit(self, request: _Request) -> _Sampled:
        params = request.params
        # 1. Encode the source audio.
        source, src_duration = self.encode_audio(request.src_audio, "src_audio")
        # 2. Tokenise both sides: the source prompt and lyrics, the edit target's.
        tokens = self._tokens(params.prompt, params.lyrics)
        n_min, n_max = params.edit_range()
        target = self._tokens(params.edit_target_prompt, params.edit_target_lyrics, "edit_target_lyrics")
        # 3. Encode both sides with edit's own null condition.
        source_conditions = encode_edit_conditions(self.backend, tokens, request.config)
        target_conditions = encode_edit_conditions(self.backend, target, request.config)
        # 4. FlowEdit from the source towards the target (the retake seeds' noise).
        latents = sample_edit(self.backend, source_conditions, target_conditions, source, request.retake,
                              request.config, edit_n_min=n_min, edit_n_max=n_max, edit_n_avg=params.edit_n_avg,
                              hooks=request.hooks)
        return self._from_source(latents, {"src_audio_duration": src_duration, "edit_n_min": n_min,
                                           "edit_n_max": n_max})

    def _audio2audio(self, request: _Request) -> _Sampled:
        params = request.params
        # 1. Encode the prompt and lyrics, then the reference audio.
        conditions = self._conditions(request)
        reference, _ = self.encode_audio(request.ref_audio, "ref_audio")
        # 2. Draw the seed noise with the reference's frame count.
        noise = request.noise.draw_latents(reference.shape[-1], self.device)
        # 3. Re-noise the reference (one copy per item) and sample from there.
        latents = sample_audio2audio(self.backend, conditions, reference.expand(params.batch_size, -1, -1, -1),
                                     noise, params.ref_audio_strength, request.config,
                                     generator=request.noise.step_generator, hooks=request.hooks)
        return self._from_source(latents, {})


_TASK_SAMPLERS: dict[str, Callable[[MusicGenerator, _Request], _Sampled]] = {
    "text2music": MusicGenerator._text2music,
    "retake": MusicGenerator._retake,
    "repaint": MusicGenerator._repaint,
    "edit": MusicGenerator._edit,
    "extend": MusicGenerator._extend,
    "audio2audio": MusicGenerator._audio2audio,
}
"""The task table of ``MusicGenerator._generate`` (one entry per ``acestep_client.params.TASKS``)."""


class TorchBackend:
    """The :class:`ComponentBackend` over in-process torch modules (the reference backend)."""

    def __init__(self, components: Any) -> None:
        self.c = components

    @property
    def text_layers(self) -> int:
        return self.c.text_encoder.num_layers

    @property
    def lyric_layers(self) -> int:
        return self.c.transformer.lyric_layers

    @property
    def dit_layers(self) -> int:
        return self.c.transformer.num_layers

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    query_scale: torch.Tensor) -> torch.Tensor:
        return self.c.text_encoder(input_ids, attention_mask, query_scale)

    def encode_conditions(self, text_states: torch.Tensor, text_mask: torch.Tensor,
                          speaker: torch.Tensor, lyric_ids: torch.Tensor, lyric_mask: torch.Tensor,
                          lyric_query_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c.transformer.encode(text_states, text_mask, speaker, lyric_ids, lyric_mask,
                                         lyric_query_scale)

    def predict_velocity(self, latents: torch.Tensor, latent_mask: torch.Tensor,
                         encoder_states: torch.Tensor, encoder_mask: torch.Tensor,
                         timestep: torch.Tensor, query_scale: torch.Tensor) -> torch.Tensor:
        return self.c.transformer.decode(latents, latent_mask, encoder_states, encoder_mask, timestep,
                                         query_scale)

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return self.c.dcae_encoder(mel)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.c.dcae_decoder(latents)

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.c.vocoder(mel)


def local_generator(ckpt_dir: str | Path, vocab_path: str | Path | None = None,
                    lora_dir: str | Path | None = None, device: torch.device | str = "cpu") -> MusicGenerator:
    """The in-process reference pipeline for a checkpoint folder (official or tiny layout).

    ``lora_name_or_path`` may name an adapter of ``lora_dir`` or, as upstream, an adapter path;
    any ``lora_weight`` works here (the adapter is fused per request). ``device``: where the
    models run and the sampling loop keeps its tensors (fp32 everywhere)."""
    components = load_components(ckpt_dir, vocab_path)
    for module in components.modules().values():
        module.to(device)
    registry = LoraRegistry.from_dir(lora_dir) if lora_dir is not None else None
    return MusicGenerator(TorchBackend(components), components.text_tokenizer,
                          components.lyric_tokenizer, components.vocoder.mel_transform,
                          lora_scope=InProcessLoras(components.transformer, registry), device=device)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acestep_client.limits import MODEL_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, CancelFn
from acestep_client.params import GenerationParams, ParamError

from .audio import decode_audio_bytes, to_stereo_44k
from .codec import AudioCodec
from .lora import InProcessLoras, LoraRegistry, LoraScope, no_lora
from .lyrics import MAX_LYRIC_TOKENS
from .models.mel import LogMelSpectrogram
from .sampling import (
    ComponentBackend,
    SamplerConfig,
    build_conditions,
    latent_frames,
    lyric_inputs,
    resolve_request_seeds,
    sample_audio2audio,
    sample_retake,
    sample_text2music,
)
from .sampling.noise import MAX_FRAMES, resolve_duration
from .sampling.tasks import RepaintWindow, encode_edit_conditions, sample_edit, sample_extend, sample_repaint

ProgressFn = Callable[[int, int], None]

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
TASKS_WITH_SOURCE = ("repaint", "edit", "extend")


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

    def _prompt(self, prompt: str, lyrics: str, lyrics_field: str = "lyrics") -> tuple[torch.Tensor, ...]:
        input_ids, attention_mask = self.prompt_tokenizer([prompt])
        lyric_ids, lyric_mask = lyric_inputs(self.tokenize_lyrics(lyrics, lyrics_field))
        return tuple(t.to(self.device) for t in (input_ids, attention_mask, lyric_ids, lyric_mask))

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
        try:
            with self.lora_scope(params.lora_name_or_path, params.lora_weight):
                return self._generate(params, src_audio, ref_audio, progress, should_cancel, rng, seed_rng)
        except ValueError as exc:
            if isinstance(exc, ParamError):
                raise
            raise _param_error(exc) from exc

    def _generate(self, params: GenerationParams, src_audio: AudioBytes, ref_audio: AudioBytes,
                  progress: ProgressFn | None, should_cancel: CancelFn | None,
                  rng: random.Random | None, seed_rng: torch.Generator | None) -> GenerationOutput:
        task = params.task
        dev = self.device
        config = sampler_config(params)
        # The schema's parsed seeds, not the raw strings: the seeds used are the ones validated.
        noise, retake = resolve_request_seeds(params.seed_list() or None, params.retake_seed_list() or None,
                                              params.batch_size, seed_rng)
        common = {"progress": progress, "should_cancel": should_cancel, "row_query_scale": True}
        record: dict[str, Any] = {}
        source = None
        if task in TASKS_WITH_SOURCE:
            source, duration = self.encode_audio(src_audio, "src_audio")
            record["src_audio_duration"] = duration
        ids, mask, lyric_ids, lyric_mask = self._prompt(params.prompt, params.lyrics)

        if task == "edit":
            assert source is not None
            n_min, n_max = params.edit_range()
            target = self._prompt(params.edit_target_prompt, params.edit_target_lyrics, "edit_target_lyrics")
            latents = sample_edit(
                self.backend, encode_edit_conditions(self.backend, ids, mask, lyric_ids, lyric_mask, config),
                encode_edit_conditions(self.backend, *target, config), source, retake, config,
                edit_n_min=n_min, edit_n_max=n_max, edit_n_avg=params.edit_n_avg,
                progress=progress, should_cancel=should_cancel, row_query_scale=True)
            record.update(edit_n_min=n_min, edit_n_max=n_max)
        else:
            conditions = build_conditions(self.backend, ids, mask, lyric_ids, lyric_mask, config)
            if task == "repaint":
                assert source is not None
                frames = source.shape[-1]
                # A window past the source's end extends it: the retake noise then needs the
                # window's frame count (the source's whenever upstream works), as for extend.
                window = RepaintWindow.from_seconds(params.repaint_start, params.repaint_end, frames)
                latents = sample_repaint(
                    self.backend, conditions, source, noise.draw_latents(frames, dev),
                    retake.draw_latents(window.retake_noise_frames, dev), params.repaint_start, params.repaint_end,
                    params.retake_variance, config,
                    generator=noise.step_generator, **common)
            elif task == "extend":
                assert source is not None
                window = RepaintWindow.for_extension(params.left_extend_length, params.right_extend_length,
                                                     duration, source.shape[-1])
                latents = sample_extend(
                    self.backend, conditions, source, noise.draw_latents(source.shape[-1], dev),
                    retake.draw_latents(window.retake_noise_frames, dev), params.left_extend_length,
                    params.right_extend_length, duration, config, retake_variance=params.retake_variance,
                    **common)  # upstream's pipeline: the loop starts at int(N·(1 − retake_variance))
            elif task == "audio2audio":
                reference, _ = self.encode_audio(ref_audio, "ref_audio")
                latents = sample_audio2audio(
                    self.backend, conditions, reference.expand(params.batch_size, -1, -1, -1),
                    noise.draw_latents(reference.shape[-1], dev), params.ref_audio_strength, config,
                    generator=noise.step_generator, **common)
            else:  # text2music, retake
                duration = resolve_duration(params.audio_duration, rng)
                frames = latent_frames(duration)
                if task == "retake":
                    latents = sample_retake(
                        self.backend, conditions, noise.draw_latents(frames, dev), retake.draw_latents(frames, dev),
                        params.retake_variance, config, generator=noise.step_generator, **common)
                else:
                    latents = sample_text2music(self.backend, conditions, noise.draw_latents(frames, dev), config,
                                                generator=noise.step_generator, **common)
        if task not in ("text2music", "retake"):  # the length follows the source/reference audio
            duration = latents.shape[-1] * self.codec.samples_per_latent / MODEL_SAMPLE_RATE
        audio = self.codec.decode(latents, OUTPUT_SAMPLE_RATE, self.codec.should_overlap(duration),
                                  should_cancel=should_cancel)  # a cancel stops within one window
        record = {**params.to_dict(), **record}
        record.update(audio_duration=duration, actual_seeds=noise.seeds, retake_seeds=retake.seeds,
                      oss_steps=params.oss_step_list(), sample_rate=OUTPUT_SAMPLE_RATE)
        return GenerationOutput(audio=audio, sample_rate=OUTPUT_SAMPLE_RATE, record=record, latents=latents)


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
    from .checkpoint import load_components

    components = load_components(ckpt_dir, vocab_path)
    for module in components.modules().values():
        module.to(device)
    registry = LoraRegistry.from_dir(lora_dir) if lora_dir is not None else None
    return MusicGenerator(TorchBackend(components), components.text_tokenizer,
                          components.lyric_tokenizer, components.vocoder.mel_transform,
                          lora_scope=InProcessLoras(components.transformer, registry), device=device)

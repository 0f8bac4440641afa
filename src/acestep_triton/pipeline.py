"""Request-level generation, shared by the in-process reference and the Triton orchestrators.

``MusicGenerator`` turns one validated :class:`~acestep_client.params.GenerationParams` into
audio: tokenise, resolve duration and seeds, encode the conditions, run the sampling loop,
decode to 48 kHz, and record the parameters JSON (with the actual seeds). It talks to the
networks only through a :class:`~acestep_triton.sampling.Denoiser`, so the same code runs

* in-process, with :class:`TorchDenoiser` over the torch modules (the reference pipeline and
  the CLI's ``--local`` mode), and
* inside Triton, with the BLS denoiser of ``serving/`` calling the served components.

Same seed and parameters → the same numbers from both (tested).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acestep_client.params import OUTPUT_SAMPLE_RATE, GenerationParams, ParamError

from .codec import AudioCodec
from .lyrics import MAX_LYRIC_TOKENS
from .models.mel import LogMelSpectrogram
from .sampling import (
    Denoiser,
    SamplerConfig,
    build_conditions,
    latent_frames,
    lyric_inputs,
    resolve_request_seeds,
    sample_text2music,
)
from .sampling.noise import resolve_duration

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

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


class MusicGenerator:
    """Runs whole requests against any :class:`Denoiser`."""

    def __init__(self, denoiser: Denoiser, prompt_tokenizer: Any, lyric_tokenizer: Any,
                 mel: LogMelSpectrogram, *, overlapped_decode: bool = True) -> None:
        """``overlapped_decode``: decode songs longer than 48 s in bounded windows (upstream's
        opt-in ``overlapped_decode``). On by default here: it bounds every component call's
        size, which a server with fixed engine profiles and shared memory needs."""
        self.denoiser = denoiser
        self.prompt_tokenizer = prompt_tokenizer
        self.lyric_tokenizer = lyric_tokenizer
        self.codec = AudioCodec(denoiser.encode_mel, denoiser.decode_latents, denoiser.vocode, mel,
                                overlapped_decode=overlapped_decode)

    def tokenize_lyrics(self, lyrics: str) -> list[int]:
        """Lyric ids, with the served length limit checked (error names ``lyrics``)."""
        if not lyrics:
            return []
        ids = self.lyric_tokenizer.encode(lyrics)
        if len(ids) > MAX_LYRIC_TOKENS:
            raise ParamError("lyrics", f"{len(ids)} tokens; the limit is {MAX_LYRIC_TOKENS}")
        return ids

    @torch.inference_mode()
    def generate(self, params: GenerationParams, *, progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None, rng: random.Random | None = None,
                 seed_rng: torch.Generator | None = None) -> GenerationOutput:
        """One request, start to finish. ``rng`` draws a random duration when
        ``audio_duration <= 0``; ``seed_rng`` draws missing seeds (upstream: torch's global
        generator). Raises :class:`ParamError` for bad input and ``SamplingCancelled`` when
        ``should_cancel()`` turns true between steps."""
        params.validate()
        config = sampler_config(params)
        duration = resolve_duration(params.audio_duration, rng)
        noise, retake = resolve_request_seeds(params.manual_seeds or None, None, params.batch_size,
                                              seed_rng)
        lyric_ids, lyric_mask = lyric_inputs(self.tokenize_lyrics(params.lyrics))
        input_ids, attention_mask = self.prompt_tokenizer([params.prompt])
        conditions = build_conditions(self.denoiser, input_ids, attention_mask, lyric_ids, lyric_mask,
                                      config)
        latents = sample_text2music(
            self.denoiser, conditions, noise.draw_latents(latent_frames(duration)), config,
            generator=noise.step_generator, progress=progress, should_cancel=should_cancel,
            row_query_scale=True,
        )
        audio = self.codec.decode(latents, OUTPUT_SAMPLE_RATE, self.codec.should_overlap(duration))
        record = params.to_dict()
        record.update(audio_duration=duration, actual_seeds=noise.seeds, retake_seeds=retake.seeds,
                      oss_steps=params.oss_step_list(), sample_rate=OUTPUT_SAMPLE_RATE)
        return GenerationOutput(audio=audio, sample_rate=OUTPUT_SAMPLE_RATE, record=record,
                                latents=latents)


class TorchDenoiser:
    """The :class:`Denoiser` over in-process torch modules (the reference backend)."""

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


def local_generator(ckpt_dir: str | Path, vocab_path: str | Path | None = None) -> MusicGenerator:
    """The in-process reference pipeline for a checkpoint folder (official or tiny layout)."""
    from .checkpoint import load_components

    components = load_components(ckpt_dir, vocab_path)
    return MusicGenerator(TorchDenoiser(components), components.text_tokenizer,
                          components.lyric_tokenizer, components.vocoder.mel_transform)

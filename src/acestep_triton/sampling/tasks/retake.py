"""retake and audio2audio: text2music from a different starting point, nothing else.

- retake: the starting noise is ``cos(a)·ε(seed) + sin(a)·ε(retake_seed)`` with
  ``a = retake_variance·π/2``; everything else is text2music (upstream treats retake as a
  repaint of the whole clip, which takes exactly this path).
- audio2audio: σ_max = 1 − ref_audio_strength, int(σ_max·N) steps, start from the reference
  latents noised to the schedule's ``noise_level``; frames = the reference's.
"""

from __future__ import annotations

import torch

from ..backend import ComponentBackend
from ..conditions import EncodedConditions
from ..config import SamplerConfig
from ..hooks import NO_HOOKS, SamplingHooks
from ..loop import run_sampling
from ..noise import mix_retake_noise, noise_reference
from ..schedule import audio2audio_schedule


def sample_retake(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    noise: torch.Tensor,
    retake_noise: torch.Tensor,
    retake_variance: float,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """retake: text2music from the cos/sin mix of the seed noise and the retake-seed noise.

    ``generator`` (pingpong's step noise) is the *manual-seed* generator of item 0, as upstream.
    """
    start = mix_retake_noise(noise, retake_noise, retake_variance)
    return run_sampling(backend, conditions, start, config.schedule(), config, generator=generator, hooks=hooks)


def sample_audio2audio(
    backend: ComponentBackend,
    conditions: EncodedConditions,
    reference: torch.Tensor,
    noise: torch.Tensor,
    ref_audio_strength: float,
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    hooks: SamplingHooks = NO_HOOKS,
) -> torch.Tensor:
    """audio2audio: partially re-noise the reference latents [B,8,16,W] and sample from there.

    ``noise`` must have the reference's shape (draw it with the reference's frame count).
    The step count is ``int((1 − strength)·N)`` with N = ``config.num_steps`` (max(oss_steps)
    when given: upstream replaces an oss schedule by the plain one here).
    """
    schedule = audio2audio_schedule(ref_audio_strength, config.num_steps)
    start = noise_reference(reference, noise, schedule)
    return run_sampling(backend, conditions, start, schedule, config, generator=generator, hooks=hooks)

"""Audio I/O and band-limited resampling without torchaudio.

ACE-Step works at 44.1 kHz inside and delivers 48 kHz; user audio arrives at any rate. Upstream
resamples with ``torchaudio.transforms.Resample`` defaults, and the DCAE latents of a source
clip depend on it, so :func:`resample` reproduces that filter exactly:

* rates reduced by their gcd (44100 → 48000 becomes 147 → 160 phases);
* windowed-sinc ("sinc_interp_hann") kernel, 6 zero crossings, cutoff 0.99 × the lower Nyquist,
  computed in float64 and rounded to the signal's dtype (as the transform does);
* zero padding of ``width`` before and ``width + orig`` after, one strided conv (one output
  channel per phase), output length ``ceil(new · N / orig)``.

Kernels are cached per (rates, dtype, device): a 48 kHz decode reuses the same one each call.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

MODEL_SAMPLE_RATE = 44100
OUTPUT_SAMPLE_RATE = 48000

_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99


@functools.lru_cache(maxsize=32)
def _sinc_kernel_f64(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase kernel ``[new, 1, 2·width + orig]`` (float64) and ``width``, for reduced rates."""
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # Phase j samples the signal at j / new input periods. torchaudio forms -j/new in float32
    # (integer arange / int) before adding the float64 taps; doing the same keeps it bit-exact.
    t = (torch.arange(0, -new, -1)[:, None, None] / new).to(torch.float32).double() + taps
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return sinc * window * (base_freq / orig), width


@functools.lru_cache(maxsize=64)
def _sinc_kernel(
    orig: int, new: int, dtype: torch.dtype, device: torch.device, lowpass_filter_width: int, rolloff: float
) -> tuple[Tensor, int]:
    kernel, width = _sinc_kernel_f64(orig, new, lowpass_filter_width, rolloff)
    return kernel.to(device=device, dtype=dtype), width


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """Length :func:`resample` returns for ``num_samples`` input samples."""
    if orig_sr == new_sr:
        return num_samples
    g = math.gcd(orig_sr, new_sr)
    return math.ceil((new_sr // g) * num_samples / (orig_sr // g))


def resample(
    wave: Tensor,
    orig_sr: int,
    new_sr: int,
    lowpass_filter_width: int = _LOWPASS_FILTER_WIDTH,
    rolloff: float = _ROLLOFF,
) -> Tensor:
    """Resample the last dimension of ``wave`` (any leading shape, floating point) like torchaudio."""
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, wave.dtype, wave.device, lowpass_filter_width, float(rolloff))
    lead, length = wave.shape[:-1], wave.shape[-1]
    rows = wave.reshape(-1, 1, length)
    rows = torch.nn.functional.pad(rows, (width, width + orig))
    out = torch.nn.functional.conv1d(rows, kernel, stride=orig)  # [R, new, frames]
    out = out.transpose(1, 2).reshape(rows.shape[0], -1)
    out = out[:, : resampled_length(length, orig_sr, new_sr)]
    return out.reshape(*lead, out.shape[-1])


def load_audio(path: str | Path) -> tuple[Tensor, int]:
    """Read an audio file → (``[C, N]`` float32 in [−1, 1], sample rate).

    soundfile scales integer PCM the way ``torchaudio.load`` does (by 2^(bits−1)), so latents
    of a WAV/FLAC source match upstream's.
    """
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


MAX_INPUT_SECONDS = 240.0
"""Longest source/reference audio accepted (the longest generation ACE-Step serves)."""


def decode_audio_bytes(data: bytes, field: str, max_seconds: float = MAX_INPUT_SECONDS) -> tuple[Tensor, int]:
    """An uploaded audio file (wav/flac/ogg/mp3 bytes) → (``[C, N]`` float32, sample rate).

    Every way a file can be unusable becomes a ``ValueError("<field>: reason")`` (the pipeline
    turns it into a ``ParamError``), so a bad upload ends that request and nothing else.
    """
    import io

    if not data:
        raise ValueError(f"{field}: the audio file is empty")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{field}: cannot decode the audio file (wav, flac, ogg or mp3 expected): {exc}") from None
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ValueError(f"{field}: the audio file has no samples")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise ValueError(f"{field}: {seconds:.1f} s long; the limit is {max_seconds:g} s")
    if not np.isfinite(samples).all():
        raise ValueError(f"{field}: the audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(samples.T)), int(rate)


def to_stereo_44k(wave: Tensor, sr: int) -> Tensor:
    """``[C, N]`` or ``[N]`` at ``sr`` → ``[2, M]`` float32 at 44.1 kHz, the model's input format.

    Mono is duplicated (as upstream does); with more than two channels the first two (front
    left/right in the usual layouts) are kept rather than guessing a downmix.
    """
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2 or wave.shape[0] == 0:
        raise ValueError(f"audio must be [channels, samples], got shape {tuple(wave.shape)}")
    if wave.shape[0] == 1:
        wave = wave.repeat(2, 1)
    elif wave.shape[0] > 2:
        wave = wave[:2]
    return resample(wave.float(), sr, MODEL_SAMPLE_RATE)

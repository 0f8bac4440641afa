"""Audio I/O and band-limited resampling without torchaudio.

ACE-Step works at 44.1 kHz inside and delivers 48 kHz; user audio arrives at any rate. Upstream
resamples with ``torchaudio.transforms.Resample`` defaults, and the DCAE latents of a source
clip depend on it, so :func:`resample` reproduces that filter exactly:

* rates reduced by their gcd (44100 → 48000 becomes 147 → 160 phases);
* windowed-sinc ("sinc_interp_hann") kernel, 6 zero crossings, cutoff 0.99 × the lower Nyquist,
  computed in float64 and rounded to the signal's dtype (as the transform does);
* zero padding of ``width`` before and ``width + orig`` after, one strided conv (one output
  channel per phase), output length ``ceil(new · N / orig)``.

That kernel has ``new × (2·width + orig)`` taps: fine for every common rate pair (48 → 44.1 kHz:
147 × 174), but rates sharing no factor blow it up (1999 → 44100 Hz: 44100 × 2013 taps, 3.4 GiB
peak to build; 44101 → 44100 Hz: 15.6 GB for one array). So that exact method is kept only while
the kernel is small (:data:`EXACT_KERNEL_MAX_TAPS`; results for common rates stay bit-identical)
and any other rate pair takes :func:`_resample_compact`: the same windowed sinc evaluated only
at the ``2·width + 1`` taps that can be non-zero for each output sample (its fractional position
``n·orig/new`` computed exactly in integers), in chunks of outputs. Its memory is a table of
``new × (2·width + 1)`` weights (at most 2.4 M for 8–192 kHz into 44.1 or 48 kHz) plus one
chunk, so it grows with the audio, not with the rates' ratio. Where both can run the two differ
only by torchaudio's float32 rounding of each phase (~1e-5 on a unit signal; tested).

Kernels and weight tables are cached per (rates, dtype, device) in bounded LRU caches: a 48 kHz
decode reuses the same one each call, and odd upload rates cannot pile up memory.
"""

from __future__ import annotations

import functools
import io
import math
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from acestep_client.limits import MODEL_SAMPLE_RATE
from acestep_client.params import MAX_AUDIO_SAMPLE_RATE, MIN_AUDIO_SAMPLE_RATE, ParamError

_LOWPASS_FILTER_WIDTH = 6
_ROLLOFF = 0.99

EXACT_KERNEL_MAX_TAPS = 1 << 20
"""Largest torchaudio-style kernel (``new × (2·width + orig)`` taps, 8 MiB in float64) built.
Every pair of the usual rates (8 k … 192 k, 11025 multiples, to 44.1 or 48 kHz) fits (64 → 44.1 kHz
is the largest, 0.29 M), so their results stay bit-identical to torchaudio; other pairs take the
compact method."""

_COMPACT_TABLE_MAX_WEIGHTS = 1 << 23
"""Largest per-phase weight table cached by the compact method (64 MiB in float64); past it the
weights are computed per chunk instead (only rates far above 192 kHz get there)."""

_CHUNK_ELEMENTS = 1 << 22
"""Gathered input samples per chunk of the compact method (16 MiB of float32)."""


def _filter_width(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[float, int]:
    """(cutoff in cycles per reduced block, half-width in input samples), as torchaudio sizes them."""
    base_freq = min(orig, new) * rolloff
    return base_freq, math.ceil(lowpass_filter_width * orig / base_freq)


def exact_kernel_taps(orig_sr: int, new_sr: int, lowpass_filter_width: int = _LOWPASS_FILTER_WIDTH,
                      rolloff: float = _ROLLOFF) -> int:
    """Taps of the torchaudio-style kernel for these rates (what decides the method used)."""
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    _, width = _filter_width(orig, new, lowpass_filter_width, rolloff)
    return new * (2 * width + orig)


@functools.lru_cache(maxsize=8)
def _sinc_kernel_f64(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[Tensor, int]:
    """Polyphase kernel ``[new, 1, 2·width + orig]`` (float64) and ``width``, for reduced rates."""
    base_freq, width = _filter_width(orig, new, lowpass_filter_width, rolloff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # Phase j samples the signal at j / new input periods. torchaudio forms -j/new in float32
    # (integer arange / int) before adding the float64 taps; doing the same keeps it bit-exact.
    t = (torch.arange(0, -new, -1)[:, None, None] / new).to(torch.float32).double() + taps
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return sinc * window * (base_freq / orig), width


@functools.lru_cache(maxsize=16)
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
    """Resample the last dimension of ``wave`` (any leading shape, floating point) like torchaudio.

    Memory grows with the audio, whatever the rates: see the module docstring for the two methods.
    """
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    lead, length = wave.shape[:-1], wave.shape[-1]
    rows = wave.reshape(-1, length)
    if exact_kernel_taps(orig, new, lowpass_filter_width, rolloff) <= EXACT_KERNEL_MAX_TAPS:
        out = _resample_exact(rows, orig, new, lowpass_filter_width, float(rolloff))
    else:
        out = _resample_compact(rows, orig, new, lowpass_filter_width, float(rolloff))
    out = out[:, : resampled_length(length, orig_sr, new_sr)]
    return out.reshape(*lead, out.shape[-1])


def _resample_exact(rows: Tensor, orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> Tensor:
    """torchaudio's method on ``[R, N]`` rows (reduced rates): one strided conv, a channel per phase."""
    kernel, width = _sinc_kernel(orig, new, rows.dtype, rows.device, lowpass_filter_width, rolloff)
    padded = torch.nn.functional.pad(rows[:, None], (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel, stride=orig)  # [R, new, frames]
    return out.transpose(1, 2).reshape(rows.shape[0], -1)


def _phase_weights(phases: Tensor, orig: int, new: int, lowpass_filter_width: int,
                   rolloff: float) -> Tensor:
    """float64 ``[P, 2·width + 1]`` weights of input taps ``c − width … c + width`` for outputs whose
    position ``n·orig/new`` is ``c + phase/new`` (``phase`` in ``[0, new)``).

    The same window and scale as :func:`_sinc_kernel_f64`: the time between input tap ``m`` and the
    output is ``(m·new − phase) / (orig·new)`` reduced blocks, formed exactly in integers.
    """
    base_freq, width = _filter_width(orig, new, lowpass_filter_width, rolloff)
    taps = torch.arange(-width, width + 1, dtype=torch.int64, device=phases.device)
    t = (taps[None] * new - phases[:, None].to(torch.int64)).double() / (orig * new)
    t = (t * base_freq).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return sinc * window * (base_freq / orig)


@functools.lru_cache(maxsize=4)
def _phase_table(orig: int, new: int, dtype: torch.dtype, device: torch.device, lowpass_filter_width: int,
                 rolloff: float) -> Tensor:
    """Weights for every phase ``[new, 2·width + 1]`` in ``dtype`` (bounded: see the callers)."""
    phases = torch.arange(new, dtype=torch.int64, device=device)
    return _phase_weights(phases, orig, new, lowpass_filter_width, rolloff).to(dtype)


def _resample_compact(rows: Tensor, orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> Tensor:
    """The windowed sinc at each output's exact fractional position, in chunks of outputs.

    Memory: the phase table (``new × (2·width + 1)``, or none past :data:`_COMPACT_TABLE_MAX_WEIGHTS`)
    and one chunk of about :data:`_CHUNK_ELEMENTS` gathered samples, plus the output itself.
    """
    _, width = _filter_width(orig, new, lowpass_filter_width, rolloff)
    taps = 2 * width + 1
    count, length = rows.shape
    out_len = math.ceil(new * length / orig)
    table = None
    if new * taps <= _COMPACT_TABLE_MAX_WEIGHTS:
        table = _phase_table(orig, new, rows.dtype, rows.device, lowpass_filter_width, rolloff)
    # Output n reads input c − width … c + width with c = n·orig // new < length: pad width each side.
    padded = torch.nn.functional.pad(rows, (width, width))
    offsets = torch.arange(taps, dtype=torch.int64, device=rows.device)
    out = torch.empty(count, out_len, dtype=rows.dtype, device=rows.device)
    chunk = max(1, _CHUNK_ELEMENTS // (taps * max(count, 1)))
    for first in range(0, out_len, chunk):
        n = torch.arange(first, min(first + chunk, out_len), dtype=torch.int64, device=rows.device)
        position = n * orig
        centre, phase = position // new, position % new
        weights = (table[phase] if table is not None
                   else _phase_weights(phase, orig, new, lowpass_filter_width, rolloff).to(rows.dtype))
        gathered = padded[:, centre[:, None] + offsets[None]]  # [R, chunk, taps]
        out[:, first : first + n.shape[0]] = torch.einsum("rct,ct->rc", gathered, weights)
    return out


def load_audio(path: str | Path) -> tuple[Tensor, int]:
    """Read an audio file → (``[C, N]`` float32 in [−1, 1], sample rate).

    soundfile scales integer PCM the way ``torchaudio.load`` does (by 2^(bits−1)), so latents
    of a WAV/FLAC source match upstream's.
    """
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


MAX_INPUT_SECONDS = 240.0
"""Longest source/reference audio accepted (the longest generation ACE-Step serves)."""
MAX_INPUT_CHANNELS = 2
"""Mono or stereo only. A file's decoded size is channels × frames × 4 bytes, and a compressed
file is tiny beside it: a 370 KiB FLAC of 8 channels × 192 kHz × 239 s decodes to 1.4 GiB (its
stub went from 1.1 to 3.9 GB), so the channel count is checked in the header, before decoding."""


def _decode_reason(exc: Exception) -> str:
    """What libsndfile said about an unusable upload, without the in-memory file's repr.

    ``LibsndfileError`` reads "Error opening <_io.BytesIO object at 0x…>: " with the reason kept
    apart in ``error_string``; other errors get any ``<… at 0x…>`` repr cut out.
    """
    reason = getattr(exc, "error_string", "") or str(exc)
    reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>:?", "", reason).strip(" :.")
    return reason or type(exc).__name__


def decode_audio_bytes(data: bytes, field: str, max_seconds: float = MAX_INPUT_SECONDS) -> tuple[Tensor, int]:
    """An uploaded audio file (wav/flac/ogg/mp3 bytes) → (``[C, N]`` float32, sample rate).

    Every way a file can be unusable becomes a ``ParamError("<field>: reason")`` (a
    ``ValueError``), so a bad upload ends that request and nothing else. The sample rate and the
    length are checked from the header before any sample is decoded: a rate outside
    :data:`~acestep_client.params.MIN_AUDIO_SAMPLE_RATE` … ``MAX_AUDIO_SAMPLE_RATE`` is refused
    (no music needs it, and resampling it would cost time for nothing), and so is more than
    :data:`MAX_INPUT_CHANNELS` channels; the decoded size is then at most 2 channels × 240 s at
    the highest rate (350 MiB of float32), whatever the file's compression.
    """
    if not data:
        raise ParamError(field, "the audio file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
            if not MIN_AUDIO_SAMPLE_RATE <= rate <= MAX_AUDIO_SAMPLE_RATE:
                raise ParamError(field, f"sample rate {rate} Hz is outside the supported "
                                        f"{MIN_AUDIO_SAMPLE_RATE}–{MAX_AUDIO_SAMPLE_RATE} Hz")
            if not 1 <= channels <= MAX_INPUT_CHANNELS:
                raise ParamError(field, f"{channels} channels; mono or stereo expected (mix it down to "
                                        f"{MAX_INPUT_CHANNELS} channels first)")
            if frames / rate > max_seconds:
                raise ParamError(field, f"{frames / rate:.1f} s long; the limit is {max_seconds:g} s")
            # Never more than the limit allows, whatever the header said (a wrong frame count):
            # one frame more than the limit still shows as too long below.
            samples = f.read(frames=min(frames, int(max_seconds * rate) + 1), dtype="float32", always_2d=True)
    except ParamError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ParamError(field, "cannot decode the audio file (wav, flac, ogg or mp3 expected): "
                                f"{_decode_reason(exc)}") from None
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ParamError(field, "the audio file has no samples")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise ParamError(field, f"{seconds:.1f} s long; the limit is {max_seconds:g} s")
    if not np.isfinite(samples).all():
        raise ParamError(field, "the audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(samples.T)), rate


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

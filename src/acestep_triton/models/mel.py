"""Log-mel front end of the DCAE and the vocoder, in plain torch (no torchaudio).

ACE-Step computes one log-mel image per audio channel before the DCAE encoder, and the vocoder
was trained to invert exactly that image, so the numbers must agree with upstream's transform:

* STFT with ``n_fft`` 2048, a periodic Hann window of 2048, hop 512, ``center=False`` after a
  reflect pad of ``(win - hop) // 2`` on the left and ``(win - hop + 1) // 2`` on the right
  (768 / 768), so that ``N`` samples give exactly ``N / hop`` frames;
* magnitude ``sqrt(re² + im² + 1e-6)`` (the epsilon keeps the gradient finite at 0);
* a slaney-scale, slaney-normalised triangular filterbank (128 bins, 40 Hz to 16 kHz), the
  same matrix as ``torchaudio.functional.melscale_fbanks(norm="slaney", mel_scale="slaney")``;
* ``log(clamp(x, 1e-5))``.

The official vocoder checkpoint stores the window and the filterbank as buffers
(``mel_transform.spectrogram.window``, ``mel_transform.mel_scale.fb``) and upstream uses the
stored copies, so the sub-module names here reproduce those keys: loading the vocoder's state
dict fills them, and a module built without a checkpoint computes them from the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL  # 15.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(freq: float) -> float:
    """Slaney mel of a frequency in Hz (scalar, as torchaudio computes the band edges)."""
    if freq < _SLANEY_BREAK_HZ:
        return freq / _SLANEY_HZ_PER_MEL
    return _SLANEY_BREAK_MEL + math.log(freq / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP


def mel_to_hz_slaney(mels: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel_slaney`, element-wise on a tensor."""
    linear = _SLANEY_HZ_PER_MEL * mels
    logarithmic = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mels - _SLANEY_BREAK_MEL))
    return torch.where(mels >= _SLANEY_BREAK_MEL, logarithmic, linear)


def slaney_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular mel filters ``[n_freqs, n_mels]``, slaney scale and slaney area normalisation.

    Computed in float32 in the same order as torchaudio's ``melscale_fbanks`` so that a module
    built without a checkpoint matches one loaded from it to float rounding.
    """
    bin_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_edges = torch.linspace(hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max), n_mels + 2)
    hz_edges = mel_to_hz_slaney(mel_edges)
    widths = hz_edges[1:] - hz_edges[:-1]
    # distance of every edge above every bin: [n_freqs, n_mels + 2]
    offsets = hz_edges.unsqueeze(0) - bin_freqs.unsqueeze(1)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    # slaney norm: every triangle gets unit area in Hz
    area_norm = 2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels])
    return filters * area_norm.unsqueeze(0)


class _MagnitudeSpectrogram(nn.Module):
    """Reflect-padded, non-centred STFT magnitude; holds the (checkpoint-loadable) window."""

    window: Tensor

    def __init__(self, n_fft: int, win_length: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.pad_left = (win_length - hop_length) // 2
        self.pad_right = (win_length - hop_length + 1) // 2
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, wave: Tensor) -> Tensor:
        """``[R, N]`` float32 → ``[R, n_fft // 2 + 1, N // hop]``."""
        padded = nn.functional.pad(wave.unsqueeze(1), (self.pad_left, self.pad_right), mode="reflect")
        spec = torch.stft(
            padded.squeeze(1),
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.float(),
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return torch.sqrt(torch.view_as_real(spec).square().sum(-1) + 1e-6)


class _MelProjection(nn.Module):
    """Holds the filterbank ``fb`` [n_freqs, n_mels] (checkpoint-loadable) and applies it."""

    fb: Tensor

    def __init__(self, n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> None:
        super().__init__()
        self.register_buffer("fb", slaney_mel_filterbank(n_freqs, f_min, f_max, n_mels, sample_rate))

    def forward(self, linear: Tensor) -> Tensor:
        """``[R, n_freqs, T]`` → ``[R, n_mels, T]``."""
        return torch.matmul(self.fb.float().transpose(0, 1), linear)


class LogMelSpectrogram(nn.Module):
    """Waveform ``[..., N]`` at ``sample_rate`` → log-mel ``[..., n_mels, N // hop_length]``.

    Leading dimensions are kept (``[B, 2, N]`` → ``[B, 2, 128, T]`` is the DCAE input, ``[B, N]``
    → ``[B, 128, T]`` the vocoder's), so callers need no reshaping. Computation is float32
    even when the module was cast to a lower precision with its vocoder (the buffers are cast
    back at use), because log-mel of low-precision STFTs would shift every latent.
    """

    def __init__(
        self,
        sample_rate: int = 44100,
        n_fft: int = 2048,
        win_length: int = 2048,
        hop_length: int = 512,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = None,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.spectrogram = _MagnitudeSpectrogram(n_fft, win_length, hop_length)
        self.mel_scale = _MelProjection(n_fft // 2 + 1, f_min, f_max or sample_rate // 2, n_mels, sample_rate)

    @classmethod
    def from_vocoder_config(cls, config: Mapping[str, Any]) -> LogMelSpectrogram:
        """The transform described by ``music_vocoder/config.json`` (upstream reads it from there)."""
        return cls(
            sample_rate=int(config.get("sampling_rate", 44100)),
            n_fft=int(config.get("n_fft", 2048)),
            win_length=int(config.get("win_length", 2048)),
            hop_length=int(config.get("hop_length", 512)),
            n_mels=int(config.get("n_mels", 128)),
            f_min=float(config.get("f_min", 40)),
            f_max=float(config.get("f_max", 16000)),
        )

    def forward(self, wave: Tensor) -> Tensor:
        lead = wave.shape[:-1]
        rows = wave.reshape(-1, wave.shape[-1]).float()
        mel = self.mel_scale(self.spectrogram(rows))
        logmel = torch.log(torch.clamp(mel, min=1e-5))
        return logmel.reshape(*lead, *logmel.shape[-2:])

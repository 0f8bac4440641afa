"""Audio ⇄ latents around the three audio components, shared by in-process and Triton serving.

The codec owns everything *between* the networks (padding, the log-mel front end, the
per-channel vocoding, resampling, the overlap windows of long decodes) and calls the networks
through three callables, so the in-process torch modules and Triton BLS requests plug in alike:

* ``dcae_encode(mel [B, 2, 128, T]) -> latents [B, 8, 16, T/8]`` (log-mel in, scaled latents out)
* ``dcae_decode(latents [B, 8, 16, W]) -> mel [B, 2, 128, 8·W]`` (denormalised log-mel)
* ``vocode(mel [R, 128, T]) -> wave [R, 1, 512·T]`` (one audio channel per row, 44.1 kHz)

It reproduces upstream ACE-Step (``MusicDCAE.encode`` as used by ``infer_latents``, and
``MusicDCAE.decode`` / ``decode_overlap`` as used by ``latents2audio``):

* encode: resample to 44.1 kHz, zero-pad on the right to a multiple of ``hop · 8`` = 4096
  samples, log-mel per channel, DCAE encoder (W = padded samples / 4096);
* decode: DCAE decoder, vocoder on each channel, resample to the output rate (48 kHz). The
  output is not trimmed: W frames give ``ceil(W · 4096 · 48000 / 44100)`` samples;
* overlapped decode (upstream's opt-in ``overlapped_decode`` flag, taken only when the
  requested duration exceeds 48 s): the DCAE decoder runs on windows of 512 latent frames
  every 256 frames, keeping the middle half of each window (the whole head of the first and tail
  of the last), and the vocoder on windows of 512 mel frames (262144 samples) every 508 frames,
  dropping 1024 samples at inner window edges and cross-fading 128 samples linearly; the
  result is cut to ``int(W · 4096 · sr / 44100)`` samples. Every component call then has a
  bounded size, which bounds memory for 4-minute songs.

Decoding a batch of long songs takes far longer than a 1-step denoise (issue 13: a cancelled
16 × 240 s request kept decoding for ~105 s), so :meth:`AudioCodec.decode` takes the request's
``should_cancel`` and checks it before every component call (each DCAE window, each vocoder
window, each batch item): a cancelled request stops within one window with
:class:`DecodeCancelled`, a :class:`~acestep_triton.sampling.SamplingCancelled` the endpoints
already count as cancelled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from acestep_client.limits import (
    DCAE_WINDOW_FRAMES,
    MODEL_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    OVERLAP_MIN_DURATION_S,
    CancelFn,
)

from .audio import resample
from .models.mel import LogMelSpectrogram
from .models.vocoder import Vocoder
from .sampling.loop import SamplingCancelled

TensorFn = Callable[[Tensor], Tensor]


class DecodeCancelled(SamplingCancelled):
    """``should_cancel()`` turned true while decoding: raised before the next component call.

    A :class:`SamplingCancelled` (so every caller that handles cancellation handles this one),
    whose ``step``/``total`` count batch items: ``step`` items were fully decoded of ``total``;
    ``stage`` names the component call that was skipped (``dcae`` or ``vocoder``).
    """

    def __init__(self, item: int, items: int, stage: str) -> None:
        super().__init__(item, items)
        self.stage = stage
        self.args = (f"decoding cancelled before a {stage} call of batch item {item + 1} of {items}",)


class _CancelCheck:
    """Raises :class:`DecodeCancelled` when the request's ``should_cancel`` says so."""

    def __init__(self, should_cancel: CancelFn | None, items: int) -> None:
        self.should_cancel = should_cancel
        self.items = items
        self.item = 0

    def __call__(self, stage: str) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise DecodeCancelled(self.item, self.items, stage)


def _never(stage: str) -> None:
    """The check of calls made outside :meth:`AudioCodec.decode` (nothing to cancel)."""


@dataclasses.dataclass(frozen=True)
class OverlapWindows:
    """Window sizes of the overlapped decode (upstream's values)."""

    dcae_window: int = DCAE_WINDOW_FRAMES  # latent frames per DCAE decoder call
    vocoder_window: int = 512 * 512  # samples per vocoder call (512 mel frames)
    vocoder_overlap: int = 1024  # samples dropped at each inner vocoder window edge
    crossfade: int = 128  # samples cross-faded across a vocoder seam


class AudioCodec:
    """Stereo audio ⇄ ACE-Step latents through pluggable DCAE/vocoder callables."""

    def __init__(
        self,
        dcae_encode: TensorFn,
        dcae_decode: TensorFn,
        vocode: TensorFn,
        mel: LogMelSpectrogram,
        *,
        latent_stride: int = 8,
        overlapped_decode: bool = False,
        vocoder_rows_per_call: int | None = None,
        windows: OverlapWindows = OverlapWindows(),
    ) -> None:
        """``latent_stride``: mel frames per latent frame (the DCAE's time compression).

        ``overlapped_decode`` enables the windowed long-audio decode for durations over 48 s
        (see :meth:`should_overlap`); ``vocoder_rows_per_call`` caps how many channels go to
        the vocoder at once (``None``: both channels of an item together; 1 is upstream's
        memory-saving choice for the non-overlapped path; the result is the same).
        """
        self.dcae_encode = dcae_encode
        self.dcae_decode = dcae_decode
        self.vocode = vocode
        self.mel = mel
        self.latent_stride = latent_stride
        self.overlapped_decode = overlapped_decode
        self.vocoder_rows_per_call = vocoder_rows_per_call
        self.windows = windows

    @classmethod
    def from_modules(
        cls, encoder: TensorFn, decoder: TensorFn, vocoder: Vocoder, **kwargs: Any
    ) -> AudioCodec:
        """In-process codec from :class:`DCAEEncoder`, :class:`DCAEDecoder`, :class:`Vocoder`.

        The log-mel front end is the vocoder's own (its buffers come from the vocoder checkpoint).
        """
        return cls(encoder, decoder, vocoder, vocoder.mel_transform, **kwargs)

    # ------------------------------------------------------------------ geometry

    @property
    def sample_rate(self) -> int:
        """The model's internal rate (44.1 kHz)."""
        return self.mel.sample_rate

    @property
    def samples_per_latent(self) -> int:
        """Samples at 44.1 kHz per latent frame (4096)."""
        return self.mel.hop_length * self.latent_stride

    def latent_frames(self, num_samples: int, sample_rate: int) -> int:
        """Latent frames of the real (unpadded) content of ``num_samples`` at ``sample_rate``.

        Upstream's ``latent_lengths``: floor of the length in 44.1 kHz samples / 4096.
        """
        return int(num_samples / sample_rate * self.sample_rate / self.samples_per_latent)

    def should_overlap(self, duration_s: float) -> bool:
        """Whether upstream would decode a request of ``duration_s`` seconds with overlap windows."""
        return self.overlapped_decode and duration_s > OVERLAP_MIN_DURATION_S

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode(self, wave: Tensor, sample_rate: int = MODEL_SAMPLE_RATE) -> Tensor:
        """Stereo ``[B, 2, N]`` (or ``[2, N]``) at ``sample_rate`` → latents ``[B, 8, 16, W]``.

        ``W = ceil(N' / 4096)`` where ``N'`` is the length at 44.1 kHz.
        """
        if wave.dim() == 2:
            wave = wave.unsqueeze(0)
        if wave.dim() != 3 or wave.shape[-1] == 0:
            raise ValueError(f"audio must be [B, channels, samples], samples > 0; got {tuple(wave.shape)}")
        wave = wave.to(device=self.mel.spectrogram.window.device, dtype=torch.float32)
        wave = resample(wave, sample_rate, self.sample_rate)
        remainder = wave.shape[-1] % self.samples_per_latent
        if remainder:
            wave = F.pad(wave, (0, self.samples_per_latent - remainder))
        return self.dcae_encode(self.mel(wave))

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def decode(
        self, latents: Tensor, sample_rate: int = OUTPUT_SAMPLE_RATE, overlapped: bool = False,
        should_cancel: CancelFn | None = None,
    ) -> Tensor:
        """Latents ``[B, 8, 16, W]`` → stereo ``[B, 2, N]`` float32 at ``sample_rate``.

        ``overlapped`` selects upstream's windowed decode (pass :meth:`should_overlap` of the
        request duration to behave as upstream does). ``should_cancel`` is asked before every
        DCAE and vocoder call; when it returns true, :class:`DecodeCancelled` is raised.
        """
        if latents.dim() != 4 or latents.shape[-1] == 0:
            raise ValueError(f"latents must be [B, C, H, W] with W > 0, got {tuple(latents.shape)}")
        check = _CancelCheck(should_cancel, latents.shape[0])
        waves = []
        for index, item in enumerate(latents.split(1)):
            check.item = index
            if overlapped:
                waves.append(self._decode_item_overlapped(item, sample_rate, check))
            else:
                check("dcae")
                mel = self.dcae_decode(item)[0]  # [2, 128, T]
                waves.append(resample(self._vocode_rows(mel, check).float(), self.sample_rate, sample_rate))
        return torch.stack(waves)

    def _vocode_rows(self, mel: Tensor, check: Callable[[str], None] = _never) -> Tensor:
        """``[R, 128, T]`` → ``[R, N]``, at most ``vocoder_rows_per_call`` rows per call."""
        step = self.vocoder_rows_per_call or mel.shape[0]
        waves = []
        for rows in mel.split(step):
            check("vocoder")
            waves.append(self.vocode(rows)[:, 0])
        return torch.cat(waves)

    def _decode_item_overlapped(self, latent: Tensor, sample_rate: int,
                                check: Callable[[str], None] = _never) -> Tensor:
        mel = self._dcae_decode_windowed(latent, check)[0]  # [2, 128, 8·W]
        wave = self._vocode_windowed(mel, check).float()
        total = latent.shape[-1] * self.samples_per_latent
        if sample_rate != self.sample_rate:
            wave = resample(wave, self.sample_rate, sample_rate)
        # upstream: int() of the float length at the output rate (one sample shorter than the
        # plain path's ceil when the ratio is not whole)
        keep = min(int(total * sample_rate / self.sample_rate), wave.shape[-1])
        return wave[:, :keep]

    def _dcae_decode_windowed(self, latent: Tensor, check: Callable[[str], None] = _never) -> Tensor:
        """DCAE decode of ``[1, C, H, L]`` in windows; returns the ``[1, 2, 128, 8·L]`` mel.

        Windows of ``win`` frames start every ``win/2``; each keeps its middle half (mel trimmed
        by ``win/4`` latent frames on inner edges), so kept parts tile ``[0, L)`` exactly.
        """
        length = latent.shape[-1]
        win = self.windows.dcae_window
        quarter, hop = win // 4, win // 2
        trim = quarter * self.latent_stride
        starts = list(range(0, length - 2 * quarter, hop)) or [0]
        pieces = []
        for i, start in enumerate(starts):
            segment = latent[..., start : min(length, start + win)]
            check("dcae")
            mel = self.dcae_decode(segment)
            first, last = i == 0, i == len(starts) - 1
            lo = 0 if first else trim
            if first and last:
                hi = min(segment.shape[-1] * self.latent_stride, mel.shape[-1])
            elif last:
                hi = mel.shape[-1]
            else:
                hi = mel.shape[-1] - trim
            pieces.append(mel[..., lo:hi])
        return torch.cat(pieces, dim=-1)

    def _vocode_windowed(self, mel: Tensor, check: Callable[[str], None] = _never) -> Tensor:
        """Vocode ``[R, 128, M]`` in fixed windows with cross-faded seams → ``[R, N ≥ 512·M]``.

        Window k covers samples ``[k·hop_s, k·hop_s + win_s)`` with ``hop_s = win_s − 2·overlap``;
        it contributes ``[k·hop_s + overlap, (k+1)·hop_s + overlap)`` (the last one everything
        after ``overlap``, including the tail made from zero-padded mel frames, which the
        caller cuts), and the ``crossfade`` samples before each contribution are a linear blend
        of the previous window's tail and this window's head.
        """
        w = self.windows
        hop = self.mel.hop_length
        frames = w.vocoder_window // hop
        hop_samples = w.vocoder_window - 2 * w.vocoder_overlap
        total = mel.shape[-1] * hop
        fade_out = torch.linspace(1, 0, w.crossfade, device=mel.device)
        fade_in = torch.linspace(0, 1, w.crossfade, device=mel.device)

        def window_at(frame: int) -> Tensor:
            block = mel[..., frame : frame + frames]
            if block.shape[-1] < frames:  # zero log-mel frames, as upstream pads
                block = F.pad(block, (0, frames - block.shape[-1]))
            return self._vocode_rows(block, check)

        pieces = [window_at(0)[:, : -w.vocoder_overlap]]
        done = pieces[0].shape[-1]
        position = hop_samples
        while position < total and position // hop < mel.shape[-1]:
            new = window_at(position // hop)
            fade = min(w.crossfade, done, new.shape[-1] - (w.vocoder_overlap - w.crossfade))
            if fade > 0:
                prev = pieces[-1]
                if prev.shape[-1] < fade:  # unreachable with upstream's sizes; kept honest
                    raise RuntimeError("vocoder window shorter than the crossfade")
                head = new[:, w.vocoder_overlap - fade : w.vocoder_overlap]
                blended = prev[:, -fade:] * fade_out[:fade] + head * fade_in[:fade]
                pieces[-1] = torch.cat([prev[:, :-fade], blended], dim=-1)
            final = position + hop_samples >= total
            tail = new[:, w.vocoder_overlap :] if final else new[:, w.vocoder_overlap : -w.vocoder_overlap]
            pieces.append(tail)
            done += tail.shape[-1]
            position += hop_samples
        return torch.cat(pieces, dim=-1)

"""AudioCodec: upstream's encode/decode numbers, and the overlapped long-audio decode.

Golden paths (tolerance 1e-4 absolute, measured error in the messages): 44.1 kHz audio →
latents, 48 kHz audio → resample → latents, latents → 44.1/48 kHz audio.

The overlapped decode is an approximation by design (upstream's): a window sees less context
than the whole song, so its output differs from the plain decode near window edges (the DCAE
decoder's linear attention is global, so there everywhere a little). It is tested in two ways:

* window bookkeeping, exactly: with frame-local stand-ins for the networks (each output frame
  depends only on its own input frame) windowing changes nothing, so the overlapped result must
  equal the plain one sample for sample (up to float rounding in the cross-fade, 1e-6); an
  off-by-one in any trim, hop or cross-fade offset breaks this by O(1);
* with real networks: the vocoder windowed output equals the plain one wherever a sample is
  farther than the vocoder's receptive field from every window edge (tiny random vocoder), the
  DCAE windowing is exact when one window covers everything (W ≤ 512), and the full overlapped
  decode with the golden DCAE has upstream's length and finite samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden_helpers import max_abs_err, read_folder, strict_load
from torch import Tensor

from acestep_triton.audio import load_audio, resampled_length
from acestep_triton.codec import AudioCodec
from acestep_triton.models.dcae import DCAEDecoder, DCAEEncoder, split_state_dict
from acestep_triton.models.mel import LogMelSpectrogram
from acestep_triton.models.vocoder import Vocoder

TOL = 1e-4


@pytest.fixture(scope="module")
def golden_modules(golden_ckpt: Path) -> tuple[DCAEEncoder, DCAEDecoder, Vocoder]:
    config, sd = read_folder(golden_ckpt, "music_dcae_f8c8")
    enc_sd, dec_sd = split_state_dict(sd)
    encoder = strict_load(DCAEEncoder(config), enc_sd)
    decoder = strict_load(DCAEDecoder(config), dec_sd)
    config, sd = read_folder(golden_ckpt, "music_vocoder")
    vocoder = strict_load(Vocoder(config), sd).fold_weight_norm()
    return encoder, decoder, vocoder


@pytest.fixture(scope="module")
def codec(golden_modules: tuple[DCAEEncoder, DCAEDecoder, Vocoder]) -> AudioCodec:
    return AudioCodec.from_modules(*golden_modules)


# ---------------------------------------------------------------------------------- golden


def test_encode_matches_upstream(codec: AudioCodec, golden_components: dict[str, np.ndarray]) -> None:
    wave44 = torch.from_numpy(golden_components["dcae_enc_in_audio_44k"])
    wave48 = torch.from_numpy(golden_components["dcae_enc48_in_audio_48k"])
    errs = {
        "44k": max_abs_err(codec.encode(wave44), golden_components["dcae_enc_out_latents"]),
        "48k": max_abs_err(codec.encode(wave48, sample_rate=48000), golden_components["dcae_enc48_out_latents"]),
        "44k_unbatched": max_abs_err(codec.encode(wave44[0])[0], golden_components["dcae_enc_out_latents"][0]),
    }
    assert max(errs.values()) <= TOL, f"max abs errs {errs}"
    n = wave44.shape[-1]
    assert codec.latent_frames(n, 44100) == int(golden_components["dcae_enc_out_latent_lengths"][0])


def test_decode_matches_upstream(codec: AudioCodec, golden_components: dict[str, np.ndarray]) -> None:
    latents = torch.from_numpy(golden_components["dcae_dec_in_latents"])
    errs = {
        "48k": max_abs_err(codec.decode(latents)[0], golden_components["dcae_dec_out_wav_48k"]),
        "44k": max_abs_err(codec.decode(latents, sample_rate=44100)[0], golden_components["dcae_dec_out_wav_44k"]),
    }
    assert max(errs.values()) <= TOL, f"max abs errs {errs}"


def test_whole_request_audio_matches_upstream(codec: AudioCodec, golden_dir: Path) -> None:
    """Case files: a source WAV → repaint's source latents; case a's final latents → its audio."""
    cases = golden_dir / "cases"
    wave, sr = load_audio(cases / "case_a_text2music_apg_48k_float.wav")
    with np.load(cases / "case_m_repaint.npz") as z:
        src_latents = z["src_or_ref_latents"]
    with np.load(cases / "case_a_text2music_apg.npz") as z:
        final_latents, audio_48k = z["final_latents"], z["audio_48k"]
    errs = {
        "encode_wav": max_abs_err(codec.encode(wave, sample_rate=sr), src_latents),
        "decode_case_a": max_abs_err(codec.decode(torch.from_numpy(final_latents)), audio_48k),
    }
    assert max(errs.values()) <= TOL, f"max abs errs {errs}"


def test_decode_batch_equals_items(codec: AudioCodec) -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 8, 16, 2)
    both = codec.decode(latents)
    err = max(max_abs_err(both[i], codec.decode(latents[i : i + 1])[0]) for i in range(2))
    assert both.shape == (2, 2, resampled_length(2 * 4096, 44100, 48000))
    assert err <= 1e-6, f"batched vs per-item max abs err {err:.3g}"


def test_should_overlap_follows_upstream_rule(codec: AudioCodec) -> None:
    assert not codec.should_overlap(240.0)  # off unless enabled, as upstream's default
    enabled = AudioCodec(
        codec.dcae_encode, codec.dcae_decode, codec.vocode, codec.mel, overlapped_decode=True
    )
    assert enabled.should_overlap(48.5) and not enabled.should_overlap(48.0)


# ---------------------------------------------------------------------------------- overlap: bookkeeping


class _FrameLocalNets:
    """Stand-ins whose every output frame depends only on the matching input frame.

    Each frame also carries its position within the frame (the ``phase`` ramps), so a shift by
    any number of samples or frames changes the values. Calls are recorded to check window sizes.
    """

    def __init__(self) -> None:
        self.dcae_widths: list[int] = []
        self.vocoder_frames: list[int] = []

    def dcae_decode(self, latents: Tensor) -> Tensor:
        self.dcae_widths.append(latents.shape[-1])
        mel = latents[:, :2].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        phase = torch.arange(mel.shape[-1], dtype=mel.dtype) % 8
        return mel + 0.01 * phase

    def vocode(self, mel: Tensor) -> Tensor:
        self.vocoder_frames.append(mel.shape[-1])
        wave = mel.mean(1, keepdim=True).repeat_interleave(512, dim=-1)
        phase = torch.arange(wave.shape[-1], dtype=wave.dtype) % 512
        return wave + 1e-3 * phase / 512


def _mock_codec(nets: _FrameLocalNets) -> AudioCodec:
    return AudioCodec(
        dcae_encode=lambda mel: mel, dcae_decode=nets.dcae_decode, vocode=nets.vocode, mel=LogMelSpectrogram()
    )


@pytest.mark.parametrize(
    ("frames", "sample_rate"),
    [(60, 48000), (511, 44100), (513, 44100), (1100, 48000), (2583, 44100)],
)
def test_overlapped_decode_windows_tile_exactly(frames: int, sample_rate: int) -> None:
    torch.manual_seed(frames)
    latents = torch.randn(1, 8, 16, frames)
    nets = _FrameLocalNets()
    codec = _mock_codec(nets)
    plain = codec.decode(latents, sample_rate=sample_rate)
    nets.dcae_widths.clear()
    nets.vocoder_frames.clear()
    windowed = codec.decode(latents, sample_rate=sample_rate, overlapped=True)

    total = frames * 4096
    assert windowed.shape == (1, 2, int(total * sample_rate / 44100))  # upstream's final cut
    assert plain.shape[-1] == resampled_length(total, 44100, sample_rate)
    # At 48 kHz the resampler's last taps (7 input samples) see what follows the song: zeros in
    # the plain path, the vocoder's output for zero-padded mel frames in the windowed one.
    edge = 0 if sample_rate == 44100 else 16
    n = windowed.shape[-1] - edge
    err = max_abs_err(windowed[..., :n], plain[..., :n])
    assert err <= 1e-6, f"{frames} frames @ {sample_rate}: windowed vs plain max abs err {err:.3g}"
    # every call has bounded size: DCAE windows of at most 512 frames, vocoder windows of 512
    assert max(nets.dcae_widths) <= 512 and set(nets.vocoder_frames) == {512}
    expected_dcae_calls = len(range(0, frames - 256, 256)) or 1
    assert len(nets.dcae_widths) == expected_dcae_calls


# ---------------------------------------------------------------------------------- overlap: real networks

_TINY_VOCODER = {
    "depths": [1], "dims": [8], "kernel_sizes": [7], "num_mels": 8, "upsample_initial_channel": 8,
    "upsample_rates": [8, 8, 8], "upsample_kernel_sizes": [16, 16, 16], "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3]], "pre_conv_kernel_size": 7, "post_conv_kernel_size": 7,
}
# Receptive field of _TINY_VOCODER in mel frames: stem 3 + dwconv 3 + pre conv 3, plus about one
# frame for the transposed convs and residual blocks; twice that is a safe margin.
_TINY_VOCODER_REACH = 24


def test_vocoder_windows_agree_with_plain_away_from_edges() -> None:
    torch.manual_seed(0)
    vocoder = Vocoder(_TINY_VOCODER).fold_weight_norm()
    frames = 1100  # three windows: frames 0, 508, 1016
    mel = torch.randn(1, 128, frames) - 4.0
    codec = AudioCodec(lambda x: x, lambda x: x, vocoder, vocoder.mel_transform)
    with torch.no_grad():
        plain = vocoder(mel)[:, 0]
        windowed = codec._vocode_windowed(mel)
    assert windowed.shape[-1] >= plain.shape[-1] and torch.isfinite(windowed).all()

    reach = _TINY_VOCODER_REACH
    inside = torch.zeros(plain.shape[-1], dtype=torch.bool)
    for start in range(0, frames, 508):
        lo, hi = (start + reach) * 512, min(start + 512 - reach, frames - reach) * 512
        inside[lo:hi] = True
    assert inside.float().mean() > 0.8
    err = (windowed[:, : plain.shape[-1]] - plain)[:, inside].abs().max().item()
    assert err <= 1e-5, f"windowed vs plain vocoder, away from edges: max abs err {err:.3g}"


def test_overlapped_decode_with_golden_dcae(golden_modules: tuple[DCAEEncoder, DCAEDecoder, Vocoder]) -> None:
    """Golden DCAE + cheap vocoder stand-in (the golden vocoder alone needs ~5 s per 1000 frames)."""
    _, decoder, vocoder = golden_modules
    nets = _FrameLocalNets()
    codec = AudioCodec(lambda x: x, decoder, nets.vocode, vocoder.mel_transform, overlapped_decode=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        short = torch.randn(1, 8, 16, 200, generator=gen)  # one window covers it: same as plain
        err = max_abs_err(codec._dcae_decode_windowed(short), decoder(short))
        assert err <= 1e-6, f"single-window DCAE decode max abs err {err:.3g}"

    frames = 600  # two DCAE windows, [0, 512) and [256, 600); 56 s, so upstream would overlap
    latents = torch.randn(1, 8, 16, frames, generator=gen)
    wave = codec.decode(latents, overlapped=codec.should_overlap(frames * 4096 / 44100))
    assert wave.shape == (1, 2, int(frames * 4096 * 48000 / 44100)) and torch.isfinite(wave).all()
    assert nets.vocoder_frames and set(nets.vocoder_frames) == {512}


def test_vocoder_rows_per_call() -> None:
    nets = _FrameLocalNets()
    latents = torch.randn(2, 8, 16, 3, generator=torch.Generator().manual_seed(3))
    together = _mock_codec(nets).decode(latents)
    assert len(nets.vocoder_frames) == 2  # one call per item, both channels in it
    one_by_one = AudioCodec(
        lambda x: x, nets.dcae_decode, nets.vocode, LogMelSpectrogram(), vocoder_rows_per_call=1
    ).decode(latents)
    assert len(nets.vocoder_frames) == 2 + 4
    assert torch.equal(together, one_by_one)

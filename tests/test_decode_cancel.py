"""Cancellation while decoding (issue 13.2): the codec asks ``should_cancel`` before every
component call, so a cancelled long batch stops within one window. Fake networks count calls;
the served path is tested in ``test_memory_serving.py``."""

from __future__ import annotations

import pytest
import torch

from acestep_client.params import GenerationParams
from acestep_triton.codec import AudioCodec, DecodeCancelled
from acestep_triton.models.mel import LogMelSpectrogram
from acestep_triton.sampling import SamplingCancelled


class CountingNetworks:
    """Shape-correct stand-ins for the DCAE decoder and vocoder, recording each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def dcae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls.append("dcae")
        return torch.zeros(latents.shape[0], 2, 128, 8 * latents.shape[-1])

    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        self.calls.append("vocoder")
        return torch.zeros(mel.shape[0], 1, 512 * mel.shape[-1])


def codec(nets: CountingNetworks) -> AudioCodec:
    return AudioCodec(lambda mel: mel, nets.dcae_decode, nets.vocode, LogMelSpectrogram(), overlapped_decode=True)


@pytest.mark.parametrize("overlapped", [True, False])
def test_decode_stops_at_the_next_component_call(overlapped: bool) -> None:
    nets = CountingNetworks()
    frames = 1200 if overlapped else 300  # 111 s in windows, or 28 s decoded whole
    latents = torch.zeros(3, 8, 16, frames)
    full = CountingNetworks()
    codec(full).decode(latents, 44100, overlapped)
    assert len(full.calls) >= 6, full.calls

    stop_after = 4
    with pytest.raises(DecodeCancelled) as info:
        codec(nets).decode(latents, 44100, overlapped, should_cancel=lambda: len(nets.calls) >= stop_after)
    assert len(nets.calls) == stop_after, "no component call may run once the request is cancelled"
    error = info.value
    assert isinstance(error, SamplingCancelled), "the endpoints count a SamplingCancelled as cancelled"
    assert error.total == 3 and 0 <= error.step < 3 and error.stage in ("dcae", "vocoder")
    assert "decoding cancelled" in str(error)


def test_decode_without_cancel_is_unchanged() -> None:
    nets = CountingNetworks()
    latents = torch.randn(2, 8, 16, 40)
    plain = codec(nets).decode(latents, 48000, False)
    asked = codec(CountingNetworks()).decode(latents, 48000, False, should_cancel=lambda: False)
    assert torch.equal(plain, asked)


def test_pipeline_cancels_during_decode(tiny_onnx_components) -> None:
    """In-process, a 1-step batch: the cancel arrives after the only denoising step, i.e. during
    the decode, and ends the request with ``SamplingCancelled`` (not audio)."""
    from acestep_triton.pipeline import MusicGenerator, TorchBackend

    c = tiny_onnx_components
    generator = MusicGenerator(TorchBackend(c), c.text_tokenizer, c.lyric_tokenizer, c.vocoder.mel_transform)
    steps: list[int] = []
    calls = {"vocoder": 0}
    vocode = generator.codec.vocode

    def counted(mel: torch.Tensor) -> torch.Tensor:
        calls["vocoder"] += 1
        return vocode(mel)

    generator.codec.vocode = counted
    with pytest.raises(DecodeCancelled):
        generator.generate(GenerationParams(infer_step=1, audio_duration=2.0, batch_size=3, manual_seeds="1"),
                           progress=lambda step, total: steps.append(step),
                           should_cancel=lambda: calls["vocoder"] >= 1)
    assert steps == [1] and calls["vocoder"] == 1

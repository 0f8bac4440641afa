"""The orchestrators' Prometheus metrics, scraped from the real server's /metrics after generating."""

from __future__ import annotations

import re
import urllib.request

import pytest

from acestep_client.client import AceStepClient, ServerError
from acestep_client.params import GenerationParams
from acestep_triton.serving.server import TritonServer


def scrape(server: TritonServer) -> dict[str, float]:
    """``name{labels}`` → value of every sample on the server's metrics endpoint."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, number in samples.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += number
    return total


def test_generation_metrics_are_exported(tiny_server: TritonServer) -> None:
    client = AceStepClient(tiny_server.grpc_url)
    before = scrape(tiny_server)
    result = client.generate(GenerationParams(prompt="pop", audio_duration=2.0, infer_step=4, batch_size=2))
    with pytest.raises(ServerError):
        client.generate(GenerationParams(prompt="pop", infer_step=0), validate=False)
    after = scrape(tiny_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("acestep_requests_total", task="text2music", outcome="success") == 1
    assert delta("acestep_requests_total", task="text2music", outcome="invalid") == 1
    assert delta("acestep_denoising_steps_total", task="text2music") == 4
    audio_s = result.audio.shape[0] * result.audio.shape[-1] / result.sample_rate
    assert delta("acestep_audio_seconds_total", task="text2music") == pytest.approx(audio_s, rel=1e-4)
    assert delta("acestep_generation_seconds_total", task="text2music") > 0
    assert value(after, "acestep_realtime_factor", task="text2music") > 0
    # Triton's own metrics are on the same endpoint (the HPA scales on queue time)
    assert any(k.startswith("nv_inference_queue_duration_us") for k in after)

"""Admission control (serving/admission.py) and memory release (serving/memory.py), in-process.

The served behaviour (a refused request, a fitting one, memory coming back) is tested through a
real tritonserver in ``test_memory_serving.py``.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_client.errors import UnavailableError
from acestep_client.params import GenerationParams, ParamError
from acestep_triton.sampling import SamplingCancelled
from acestep_triton.serving.admission import (
    Admission,
    MemoryBudget,
    MiB,
    ModelDims,
    RequestShape,
    audio_seconds,
    estimate_memory,
    guidance_branches,
    refusal,
    request_shape,
)
from acestep_triton.serving.memory import MemoryReleaser, malloc_trim, rss_bytes

BIG = ModelDims()  # the 3.5B checkpoint's sizes


def test_guidance_branches_follow_the_sampling_loop() -> None:
    assert guidance_branches(GenerationParams(guidance_scale=15.0)) == 2
    assert guidance_branches(GenerationParams(guidance_scale=1.0)) == 1
    assert guidance_branches(GenerationParams(guidance_scale=0.0)) == 1
    assert guidance_branches(GenerationParams(guidance_scale_text=5.0, guidance_scale_lyric=1.5)) == 3
    assert guidance_branches(GenerationParams(guidance_scale_text=5.0, guidance_scale_lyric=1.0)) == 2


def test_dims_are_read_from_the_checkpoint(tiny_onnx_ckpt: Path) -> None:
    dims = ModelDims.from_dir(tiny_onnx_ckpt)
    assert (dims.dit_width, dims.dit_ff, dims.dit_heads) == (32, 80, 2)
    assert dims.dcae_channels == (8, 16, 16, 32) and dims.latent_stride == 8
    assert dims.vocoder_channels == 128
    # 3.5B: the first DCAE level (128 channels on 128 × 8 per frame) and 8 elements per sample
    assert BIG.dcae_per_frame(BIG.dcae_channels) == 128 * 128 * 8
    assert BIG.vocoder_per_sample == 8.0
    assert BIG.dit_per_row_frame == pytest.approx(80 * dims.dit_per_row_frame)  # 80× wider


def test_estimate_scales_with_the_shape() -> None:
    base = RequestShape(batch=1, frames=2583, branches=2, tokens=300, lyric_tokens=40)
    one, four = estimate_memory(base, BIG), estimate_memory(replace(base, batch=4), BIG)
    assert four.parts["dit"] == pytest.approx(4 * one.parts["dit"])
    assert four.parts["audio"] == pytest.approx(4 * one.parts["audio"])
    guided = estimate_memory(replace(base, branches=3), BIG).parts["dit"]
    assert guided == pytest.approx(1.5 * one.parts["dit"])
    more_tokens = estimate_memory(replace(base, tokens=600), BIG).parts["cross_attention"]
    assert more_tokens == pytest.approx(2 * one.parts["cross_attention"])
    # past 48 s the decode runs in windows: its size no longer grows with the song
    long, longer = (estimate_memory(replace(base, frames=f), BIG) for f in (1000, 2583))
    assert long.parts["dcae_window"] == longer.parts["dcae_window"]
    assert long.parts["vocoder_window"] == longer.parts["vocoder_window"]
    short = estimate_memory(replace(base, frames=400), BIG)  # 37 s: decoded whole
    assert short.parts["vocoder_window"] > long.parts["vocoder_window"]
    assert one.peak > 0 and four.peak > one.peak
    assert "dit" in one.describe()


def test_request_shape_of_each_task() -> None:
    shape = request_shape(GenerationParams(audio_duration=60.0, batch_size=3), text_tokens=12, lyric_tokens=30)
    assert (shape.batch, shape.frames, shape.branches, shape.tokens) == (3, 645, 2, 1 + 12 + 30)
    assert shape.length_field == "audio_duration" and shape.overlapped
    randomly = request_shape(GenerationParams(audio_duration=-1.0))
    assert randomly.frames == 2583, "a random duration is bounded by its longest draw (240 s)"
    repaint = request_shape(GenerationParams(task="repaint", repaint_end=5.0), src_seconds=10.0)
    assert repaint.length_field == "src_audio" and repaint.frames == repaint.source_frames == 107
    extend = request_shape(GenerationParams(task="extend", right_extend_length=10.0), src_seconds=10.0)
    assert extend.frames == 107 + 107 + 2 and extend.source_frames == 107  # + rounding
    a2a = request_shape(GenerationParams(task="audio2audio"), ref_seconds=30.0)
    assert a2a.length_field == "ref_audio" and a2a.frames == 322


def test_audio_seconds_reads_only_the_header() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((22050, 2), np.float32), 44100, format="WAV")
    assert audio_seconds(buffer.getvalue()) == pytest.approx(0.5)
    assert audio_seconds(b"not audio") is None and audio_seconds(None) is None


def test_refusal_names_the_field_that_helps() -> None:
    budget = 20 * 1024 * MiB
    assert refusal(RequestShape(batch=1, frames=2583, branches=2, tokens=300), BIG, budget) is None
    big_batch = RequestShape(batch=16, frames=2583, branches=2, tokens=300)
    error = refusal(big_batch, BIG, budget)
    assert isinstance(error, ParamError) and error.field == "batch_size", error
    fit = int(str(error).split("at most ")[1].split()[0])
    assert estimate_memory(replace(big_batch, batch=fit), BIG).peak <= budget
    assert estimate_memory(replace(big_batch, batch=fit + 1), BIG).peak > budget
    assert "MiB" in str(error) and "20480 MiB" in str(error)

    small = 1536 * MiB  # less than one 240 s song: the duration must shrink
    error = refusal(RequestShape(batch=1, frames=2583, branches=2, tokens=300), BIG, small)
    assert error is not None and error.field == "audio_duration", error
    longest = float(str(error).split("at most ")[1].split(" s")[0])
    assert 1.0 < longest < 240.0
    fits = RequestShape(batch=1, frames=int(longest * 44100 / 4096), branches=2, tokens=300)
    assert estimate_memory(fits, BIG).peak <= small

    error = refusal(RequestShape(batch=1, frames=2583, source_frames=2583, length_field="src_audio"), BIG, small)
    assert error is not None and error.field == "src_audio", error
    error = refusal(RequestShape(batch=1, frames=1, lyric_tokens=4096, tokens=4200), BIG, 64 * MiB)
    assert error is not None and error.field == "lyrics", error


def test_budget_waits_for_requests_in_flight_then_admits() -> None:
    budget = MemoryBudget(100, timeout_s=10.0, poll_s=0.01)
    order: list[str] = []
    with budget.reserve(70):
        def second() -> None:
            with budget.reserve(50):
                order.append("second runs")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        assert order == [] and budget.in_flight == 70, "50 + 70 > 100 must wait"
        order.append("first ends")
    thread.join(5)
    assert order == ["first ends", "second runs"] and budget.in_flight == 0


def test_budget_times_out_as_unavailable_and_honours_cancel() -> None:
    budget = MemoryBudget(100, timeout_s=0.2, poll_s=0.01)
    with budget.reserve(80):
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="came free within"), budget.reserve(30):
            pass
        assert 0.15 < time.monotonic() - started < 3
        with pytest.raises(SamplingCancelled), budget.reserve(30, should_cancel=lambda: True):
            pass
    with pytest.raises(ValueError, match="never fit"), budget.reserve(101):
        pass
    with budget.reserve(100):  # all of it, once nothing else is held
        assert budget.in_flight == 100
    live = MemoryBudget(100, timeout_s=0.1, poll_s=0.01, free_now=lambda: 10)
    with pytest.raises(UnavailableError), live.reserve(20):  # fits the budget, not what is free
        pass


def test_admission_from_parameters() -> None:
    cpu_auto = Admission.from_parameters({}, BIG, free_memory=lambda device: 6000 * MiB)
    assert cpu_auto.lazy, "auto on the CPU: MemAvailable minus the margin, read at the first request"
    assert cpu_auto.budget is not None and cpu_auto.budget.budget == (6000 - 2048) * MiB
    assert Admission.from_parameters({"memory_budget_mb": "off"}, BIG).budget is None
    admission = Admission.from_parameters({"memory_budget_mb": "512", "memory_wait_s": "2"}, BIG)
    assert admission.budget is not None and admission.budget.budget == 512 * MiB
    assert admission.budget.timeout_s == 2.0 and "512 MiB" in admission.describe()
    with pytest.raises(ValueError, match="memory_budget_mb"):
        Admission.from_parameters({"memory_budget_mb": "lots"}, BIG)
    with pytest.raises(ValueError, match="memory_check_free"):
        Admission.from_parameters({"memory_budget_mb": "1", "memory_check_free": "maybe"}, BIG)
    with pytest.raises(ParamError) as info:
        admission.admit(GenerationParams(audio_duration=240.0, batch_size=8))
    assert info.value.field == "batch_size" or info.value.field == "audio_duration"
    with admission.admit(GenerationParams(audio_duration=5.0)):
        assert admission.budget.in_flight > 0
    assert admission.budget.in_flight == 0


def test_auto_budget_reads_free_memory_at_the_first_request_not_at_load() -> None:
    """Issue 18: at load the components beside the endpoint may not hold their memory yet. A fake
    free-memory reader (no GPU needed: the device is only an object here) shows when it is read."""
    reads: list[str] = []
    free = {"bytes": 1500 * MiB}

    def free_memory(device: torch.device) -> int:
        reads.append(str(device))
        return free["bytes"]

    admission = Admission.from_parameters({"memory_budget_mb": "auto", "memory_margin_mb": "1000"}, BIG,
                                          device="cuda:0", free_memory=free_memory)
    assert reads == [] and admission.lazy, "nothing may be read while the instance loads"
    assert "first request" in admission.describe()
    free["bytes"] = 900 * MiB  # the components took their memory: less than the margin is free now
    with pytest.raises(UnavailableError, match="not more than memory_margin_mb"), \
            admission.admit(GenerationParams(audio_duration=5.0)):
        pass
    assert reads == ["cuda:0"] and admission.lazy, "a failed read is tried again at the next request"
    free["bytes"] = 9000 * MiB
    with admission.admit(GenerationParams(audio_duration=5.0)):
        assert admission.budget is not None and admission.budget.budget == 8000 * MiB
    assert reads == ["cuda:0", "cuda:0"] and not admission.lazy
    free["bytes"] = 1 * MiB  # kept: later requests do not read it again (memory_check_free does that)
    with admission.admit(GenerationParams(audio_duration=5.0)):
        pass
    assert len(reads) == 2 and "8000 MiB" in admission.describe()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_releaser_hands_freed_heap_memory_back() -> None:
    malloc_trim()  # what earlier tests in this process freed would take the chunks' place: no growth
    releaser = MemoryReleaser("cpu", threshold=32 * MiB)
    assert not releaser.after_request(), "nothing grew: nothing to release"
    chunks = [torch.ones(25_000) for _ in range(2000)]  # 100 KB each: glibc serves them from its arenas
    grown = rss_bytes()
    kept = chunks[::25]  # a few stay alive, as a server's long-lived objects do: the heap's top cannot shrink
    del chunks
    assert rss_bytes() > grown - 32 * MiB, "glibc kept the freed arena memory (the issue's symptom)"
    assert releaser.after_request() and releaser.releases == 1
    assert rss_bytes() < grown - 150 * MiB, f"RSS {rss_bytes() >> 20} MiB after release, {grown >> 20} MiB before"
    assert malloc_trim() and len(kept) == 80


def test_releaser_empties_the_cuda_cache_only_when_much_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU needed: torch.cuda's counters are stubbed; what matters is when the cache is emptied."""
    emptied: list[bool] = []
    cached = {"reserved": 10 * MiB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * MiB)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    releaser = MemoryReleaser(torch.device("cuda", 0), threshold=64 * MiB)
    releaser.baseline = rss_bytes() + 2**40  # keep the host side out of it
    assert not releaser.after_request() and emptied == []
    cached["reserved"] = 900 * MiB  # a big request left 898 MiB cached but unused
    assert releaser.after_request() and emptied == [True]


def test_render_passes_the_budget_to_every_endpoint(tmp_path: Path) -> None:
    from acestep_triton.export.model_configs import load_endpoints
    from acestep_triton.export.render_cli import memory_parameters
    from acestep_triton.export.repository import render_repository

    assert memory_parameters(None) == {} and memory_parameters("Auto") == {"memory_budget_mb": "auto"}
    with pytest.raises(ValueError, match="memory-budget-mb"):
        memory_parameters("lots")
    endpoints = load_endpoints(["text2music", "repaint"])

    def budget(repository: Path, name: str) -> str:
        config = (repository / name / "config.pbtxt").read_text()
        match = re.search(r'key: "memory_budget_mb"\s*value: \{ string_value: "([^"]*)" \}', config)
        assert match, config
        return match.group(1)

    default = render_repository(tmp_path / "default", "cpu", None, endpoints, components=[], assets=tmp_path)
    assert budget(default, "text2music") == "auto"
    chosen = render_repository(tmp_path / "chosen", "cpu", None, endpoints, components=[], assets=tmp_path,
                               endpoint_parameters=memory_parameters("512"))
    assert budget(chosen, "text2music") == budget(chosen, "repaint") == "512"


def test_cpu_auto_budget_is_mem_available_minus_the_margin() -> None:
    """Issue 19: admission was off on the CPU target. ``auto`` there reads the host's
    ``MemAvailable`` (the real /proc/meminfo here) at the first request, minus the margin."""
    from acestep_triton.serving.admission import available_ram

    admission = Admission.from_parameters({"memory_budget_mb": "auto", "memory_margin_mb": "256"}, BIG)
    assert admission.lazy
    free = available_ram()
    assert free > 256 * MiB, "this machine reports MemAvailable"
    budget = admission.budget
    assert budget is not None and abs(budget.budget - (free - 256 * MiB)) < 512 * MiB
    short = Admission.from_parameters({"memory_budget_mb": "auto", "memory_margin_mb": "100"}, BIG,
                                      free_memory=lambda device: 50 * MiB)
    with pytest.raises(UnavailableError, match=r"the host \(MemAvailable\)"), \
            short.admit(GenerationParams(audio_duration=5.0)):
        pass

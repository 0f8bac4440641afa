"""Cross-request batching with the ``torch`` component runtime: Triton's dynamic batcher merges
the DiT calls of concurrent requests whose lengths fall into one shape bucket, proved from
Triton's own statistics (fewer ``dit_decoder`` executions than requests), and each request keeps
the audio of the in-process pipeline (1e-4 absolute).

A module of its own (the rest of the torch runtime's tests: ``test_torch_runtime.py``): its
server waits for two requests' rows, which no other test wants.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from fixtures_onnx import single_thread
from fixtures_serving import serve_deployment
from test_torch_runtime import TOL, max_err

from acestep_client.client import AceStepClient, GenerationResult
from acestep_client.params import GenerationParams
from acestep_triton.export.triton_config import DynamicBatching
from acestep_triton.pipeline import MusicGenerator
from acestep_triton.sampling import latent_frames
from acestep_triton.sampling.buckets import ShapeBuckets
from acestep_triton.serving.deploy import build_deployment
from acestep_triton.serving.server import TritonServer

STEPS = 3
ROWS = 2  # conditional + unconditional: every step is guided (guidance_interval 1)
BATCH_REQUEST = {"prompt": "pop, upbeat, guitar, 120 BPM", "infer_step": STEPS, "guidance_interval": 1.0,
                 "cfg_type": "cfg"}


def two_lengths_in_one_bucket(buckets: ShapeBuckets) -> tuple[float, float]:
    """Two durations with different frame counts that share one frame bucket."""
    for tenths in range(10, 80):
        a, b = tenths / 10, tenths / 10 + 0.3
        fa, fb = latent_frames(a), latent_frames(b)
        if fa != fb and buckets.frame_bucket(fa) == buckets.frame_bucket(fb) != fb:
            return a, b
    raise AssertionError("no two durations share a bucket")


def dit_stats(url: str) -> tuple[int, int, int]:
    """(requests, inferences, executions) of dit_decoder from Triton's own statistics."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics("dit_decoder", as_json=True)
    model = stats["model_stats"][0]
    return (int(model["inference_stats"]["success"].get("count", 0)), int(model.get("inference_count", 0)),
            int(model.get("execution_count", 0)))


@pytest.fixture(scope="module")
def batching_server(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """text2music over the torch runtime, the DiT batcher waiting for two requests' rows."""
    deployment = build_deployment(
        tiny_onnx_ckpt, tmp_path_factory.mktemp("batch_deploy"), runtime="torch", endpoints=["text2music"],
        intra_op_threads=1,
        # one batch = both requests' rows; the delay only bounds the wait when they drift apart
        batching={"dit_decoder": DynamicBatching(max_queue_delay_us=5_000_000,
                                                 preferred_batch_sizes=(2 * ROWS,))})
    yield from serve_deployment(deployment, tmp_path_factory.mktemp("batch_log") / "tritonserver.log")


def test_concurrent_requests_in_one_bucket_share_dit_calls(batching_server: TritonServer,
                                                           tiny_local: MusicGenerator) -> None:
    short, long = two_lengths_in_one_bucket(ShapeBuckets.default())
    requests = [GenerationParams(**BATCH_REQUEST, lyrics="[verse]\nfree as a bird", audio_duration=short,
                                 manual_seeds="3"),
                GenerationParams(**BATCH_REQUEST, lyrics="[verse]\nsing it loud tonight", audio_duration=long,
                                 manual_seeds="4")]
    before = dit_stats(batching_server.grpc_url)
    results: list[GenerationResult | BaseException] = [None, None]  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            results[i] = AceStepClient(batching_server.grpc_url).generate(requests[i])
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = dit_stats(batching_server.grpc_url)
    calls, rows, executions = (a - b for a, b in zip(after, before, strict=True))
    assert calls == 2 * STEPS and rows == 2 * STEPS * ROWS, (calls, rows)
    assert executions == STEPS, f"{calls} DiT requests ran in {executions} executions, expected {STEPS} merged"
    for request, result in zip(requests, results, strict=True):
        assert isinstance(result, GenerationResult), result
        with single_thread():
            local = tiny_local.generate(request)
        assert max_err(result.audio, local.audio.numpy()) <= TOL, "a batched request's audio changed"

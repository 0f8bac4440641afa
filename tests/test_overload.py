"""Overload: a burst past an endpoint's queue is refused at once, not left to time out.

Each endpoint definition (``ensemble_configs/<task>.json``) carries ``"queue": {"max_queue_size",
"timeout_s"}``, rendered as Triton's ``default_queue_policy`` with ``timeout_action: REJECT``.
The unit tests check the rendering; the server test serves the fake endpoint (same decoupled
``max_batch_size: 0`` Python model as the real endpoints) with a tiny queue on a real
tritonserver and fires a burst at it.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from triton_harness import fake_endpoint, running_server

from acestep_client.params import GenerationParams, params_to_wire
from acestep_triton.export.model_configs import OrchestratorSpec, load_endpoints, orchestrator_config
from acestep_triton.export.repository import render_repository
from acestep_triton.export.triton_config import QueuePolicy, check_config, render_config

ROOT = Path(__file__).resolve().parents[1]
QUEUE_FULL = "Exceeds maximum queue size"
"""Triton's own words for a request refused by ``max_queue_size`` (status UNAVAILABLE)."""
QUEUE_TIMEOUT = "timeout"
"""...and for one whose queue wait passed ``default_timeout_microseconds`` (``Request timeout expired``)."""


# ----------------------------------------------------------------------------------- rendering
def test_every_endpoint_definition_renders_a_rejecting_queue(tmp_path: Path) -> None:
    endpoints = load_endpoints()
    assert {e.name for e in endpoints} == {p.stem for p in (ROOT / "ensemble_configs").glob("*.json")}
    for endpoint in endpoints:
        assert endpoint.queue is not None, f"{endpoint.name}: no queue policy in its definition"
        config = check_config(render_config(orchestrator_config(endpoint, tmp_path)))
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == endpoint.queue.max_queue_size > 0
        assert policy.default_timeout_microseconds == endpoint.queue.timeout_us > 0
        assert policy.timeout_action == 0  # REJECT (the enum's first value)
        assert config.max_batch_size == 0  # queueing only: requests are never merged


def test_queue_policy_from_json_and_its_errors(tmp_path: Path) -> None:
    definition = tmp_path / "t.json"
    definition.write_text('{"name": "t", "source": "orchestrator", "task": "text2music", '
                          '"queue": {"max_queue_size": 3, "timeout_s": 1.5}}')
    assert OrchestratorSpec.from_json(definition).queue == QueuePolicy(3, 1_500_000)
    definition.write_text('{"name": "t", "task": "text2music", "queue": {"size": 3}}')
    with pytest.raises(ValueError, match="unknown queue keys"):
        OrchestratorSpec.from_json(definition)
    with pytest.raises(ValueError, match="timeout_action"):
        QueuePolicy(1, 0, "DROP")
    with pytest.raises(ValueError, match=">= 0"):
        QueuePolicy(-1)
    plain = OrchestratorSpec(name="t", source="orchestrator", task="text2music")
    text = render_config(orchestrator_config(plain))
    assert "dynamic_batching" not in text  # no queue: Triton's default (unbounded)


# ----------------------------------------------------------------------------------- real server
STEPS, STEP_DELAY_S = 10, 0.1
"""Each accepted request takes about 1 s on the fake endpoint."""


def burst_request(url: str, model: str, results: list[tuple[str, float, int]], lock: threading.Lock) -> None:
    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = []
    for name, value in params_to_wire(GenerationParams(infer_step=STEPS, audio_duration=1.0)).items():
        tensor = grpcclient.InferInput(name, list(value.shape),
                                       "BYTES" if value.dtype == object else grpcclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    started = time.monotonic()
    outcome, steps = "lost", 0
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=60)
            if error is not None:
                outcome = str(error)
                break
            if result.as_numpy("progress") is not None:  # type: ignore[attr-defined]
                steps += 1
            if result.as_numpy("audio") is not None:  # type: ignore[attr-defined]
                outcome = "ok"
                break
    finally:
        with lock:
            results.append((outcome, time.monotonic() - started, steps))
        client.stop_stream()
        client.close()


@pytest.mark.triton
def test_a_burst_past_the_queue_is_refused_fast(tmp_path: Path) -> None:
    """1 instance, queue of 1, queue wait at most 0.3 s: of 6 simultaneous requests 1 runs and
    the others are refused without running a step: 4 at once (queue full) and the queued one,
    whose wait expired, when the instance frees (Triton checks the timeout lazily, as it takes
    the next request). None is lost or left to a client timeout."""
    spec = fake_endpoint(STEP_DELAY_S)
    spec = OrchestratorSpec(name=spec.name, source=spec.source, task=spec.task, parameters=spec.parameters,
                            instance_count=1, queue=QueuePolicy(max_queue_size=1, timeout_us=300_000))
    repository = render_repository(tmp_path / "repo", "cpu", None, [spec], components=[])
    with running_server(repository, log_path=tmp_path / "server.log") as server:
        results: list[tuple[str, float, int]] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=burst_request, args=(server.grpc_url, spec.name, results, lock))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)  # in order: the first one gets the instance
        for thread in threads:
            thread.join(timeout=90)
    ok = [t for outcome, t, _ in results if outcome == "ok"]
    refused = [(outcome, t, steps) for outcome, t, steps in results if outcome != "ok"]
    assert len(results) == 6, f"lost requests: {results}"
    assert len(ok) == 1, results
    running_s = ok[0]
    assert running_s > STEPS * STEP_DELAY_S * 0.8
    full = [t for o, t, _ in refused if QUEUE_FULL in o]
    expired = [t for o, t, _ in refused if QUEUE_TIMEOUT in o.lower()]
    assert len(full) == 4 and len(expired) == 1, refused
    assert all(steps == 0 for _, _, steps in refused), f"a refused request ran: {refused}"
    assert max(full) < 0.5, f"queue-full refusals were not immediate: {refused}"
    assert expired[0] < running_s + 0.5, f"the expired request waited past the running one: {results}"
    print(f"burst of 6: ok after {running_s:.2f} s; refusals {[(o[-40:], round(t, 2)) for o, t, _ in refused]}")

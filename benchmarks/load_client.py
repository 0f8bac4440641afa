"""Load test of a running deployment: asyncio gRPC streaming clients at rising concurrency.

For each concurrency level (default 1, 2, 4, 8) that many clients send text2music requests
back to back over decoupled gRPC streams (``tritonclient.grpc.aio``), drawing from a fixed,
repeating list of prompts and durations, until ``--requests`` requests of that level finished.
Per level it reports:

* latency per request (send → final response with the audio): p50 / p90 / p99;
* throughput (requests per second) and RTF = seconds of audio produced / wall seconds, for the
  whole level (what a GPU serving many users delivers) and per request (what one user feels);
* from the server's own statistics (``get_inference_statistics`` before and after the level,
  per model): executions, average time requests waited in the queue and average compute time.
  Queue time growing with concurrency while compute stays flat means the instances are saturated
  (add instances or GPUs); compute growing means the batches got bigger (dynamic batching).

Usage: ``python benchmarks/load_client.py --url HOST:8001 [--concurrency 1,2,4,8] [--requests 16]
[--durations 30,60] [--steps 27] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

from acestep_client.params import GenerationParams  # noqa: E402

PROMPTS = (
    ("pop, upbeat, female vocals, guitar, 120 BPM", "[verse]\nwalking down the street tonight\n[chorus]\nsing it loud"),
    ("lofi, chill, piano, slow tempo", ""),
    ("rock, electric guitar, drums, energetic", "[verse]\nthunder in the distance\n[chorus]\nwe run"),
    ("edm, synth, dance, 128 BPM", "[intro]\n\n[chorus]\nfeel the beat"),
)
"""The fixed request mix (prompt, lyrics); an empty lyric is an instrumental."""


@dataclass
class RequestResult:
    latency_s: float
    audio_s: float
    error: str | None = None


def request_params(index: int, durations: Sequence[float], steps: int) -> GenerationParams:
    prompt, lyrics = PROMPTS[index % len(PROMPTS)]
    duration = durations[index % len(durations)]
    return GenerationParams(prompt=prompt, lyrics=lyrics, audio_duration=duration, infer_step=steps,
                            manual_seeds=str(1000 + index))


async def one_request(client: Any, endpoint: str, params: GenerationParams, timeout_s: float) -> RequestResult:
    """One request over its own decoupled stream; done at the response carrying the audio."""
    # tritonclient (heavy) only where requests are sent: the GPU check imports this for its prompts
    from acestep_client.client import AceStepClient

    inputs = AceStepClient.build_inputs(params)
    finished = asyncio.Event()

    async def requests() -> Any:
        yield {"model_name": endpoint, "inputs": inputs, "request_id": uuid.uuid4().hex}
        await finished.wait()  # keep the stream open until the final response arrived

    started = time.perf_counter()
    audio_s, error = 0.0, None
    stream = client.stream_infer(requests(), stream_timeout=timeout_s)
    latency = None
    try:
        async for result, failure in stream:
            if failure is not None:
                error = str(failure)
            else:
                audio = result.as_numpy("audio")
                if audio is None:
                    continue  # a progress response
                rate = result.as_numpy("sample_rate")
                audio_s = audio.shape[-1] / float(rate.reshape(-1)[0]) * audio.shape[0]
            # Final (audio or error): close our side; the server then ends the stream.
            latency = time.perf_counter() - started
            finished.set()
    finally:
        finished.set()
    if latency is None:
        latency = time.perf_counter() - started
    if error is None and audio_s == 0.0:
        error = "stream ended without audio"
    return RequestResult(latency_s=latency, audio_s=audio_s, error=error)


def _stats(raw: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """``{model: {success, executions, queue_ns, compute_ns}}`` from a statistics response (JSON)."""
    out = {}
    for model in raw.get("model_stats", []):
        stats = model.get("inference_stats", {})

        def field(name: str, key: str, stats: Mapping[str, Any] = stats) -> int:
            return int(stats.get(name, {}).get(key, 0))

        out[model["name"]] = {
            "success": field("success", "count"), "executions": int(model.get("execution_count", 0)),
            "queue_ns": field("queue", "ns"),
            "compute_ns": field("compute_input", "ns") + field("compute_infer", "ns") + field("compute_output", "ns"),
        }
    return out


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per model active during a level: executions, mean queue and compute ms per request."""
    a, b = _stats(before), _stats(after)
    out = {}
    for name, end in b.items():
        start = a.get(name, {"success": 0, "executions": 0, "queue_ns": 0, "compute_ns": 0})
        done = end["success"] - start["success"]
        if done <= 0:
            continue
        queue = (end["queue_ns"] - start["queue_ns"]) / done / 1e6
        compute = (end["compute_ns"] - start["compute_ns"]) / done / 1e6
        out[name] = {"requests": done, "executions": end["executions"] - start["executions"],
                     "queue_ms": queue, "compute_ms": compute}
    return out


async def run_level(url: str, endpoint: str, concurrency: int, total: int, durations: Sequence[float], steps: int,
                    timeout_s: float, first_index: int) -> dict[str, Any]:
    """``concurrency`` workers over ``total`` requests; returns the level's numbers."""
    # tritonclient (heavy) only where requests are sent: the GPU check imports this for its prompts
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(url)
    try:
        before = await client.get_inference_statistics(as_json=True)
        counter = itertools.count(first_index)
        last = first_index + total
        results: list[RequestResult] = []

        async def worker() -> None:
            while (index := next(counter)) < last:
                results.append(await one_request(client, endpoint, request_params(index, durations, steps),
                                                 timeout_s))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        # A decoupled model's statistics are recorded as its execution returns, which can be just
        # after the client has its final response: wait (briefly) until the level is counted.
        done = sum(r.error is None for r in results)
        for _ in range(40):
            after = await client.get_inference_statistics(as_json=True)
            counted = stats_delta(before, after).get(endpoint, {}).get("requests", 0)
            if counted >= done:
                break
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    ok = [r for r in results if r.error is None]
    latencies = [r.latency_s for r in ok]
    audio = sum(r.audio_s for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error})[:3], "wall_s": wall,
        "throughput_rps": len(ok) / wall, "rtf": audio / wall,
        "rtf_per_request": statistics.median(r.audio_s / r.latency_s for r in ok) if ok else float("nan"),
        "p50_s": bench.percentile(latencies, 50), "p90_s": bench.percentile(latencies, 90),
        "p99_s": bench.percentile(latencies, 99), "server": stats_delta(before, after),
    }


def print_tables(levels: Sequence[Mapping[str, Any]], out: Any = print) -> None:
    headers = ("concurrency", "requests", "errors", "wall s", "req/s", "RTF (total)", "RTF (per request)",
               "p50 s", "p90 s", "p99 s")
    out(bench.format_table(headers, [(lv["concurrency"], lv["requests"], lv["errors"], lv["wall_s"],
                                      lv["throughput_rps"], lv["rtf"], lv["rtf_per_request"], lv["p50_s"],
                                      lv["p90_s"], lv["p99_s"]) for lv in levels], "load sweep"))
    rows = []
    for lv in levels:
        for model, s in sorted(lv["server"].items()):
            share = s["queue_ms"] / (s["queue_ms"] + s["compute_ms"]) if s["queue_ms"] + s["compute_ms"] else 0.0
            rows.append((lv["concurrency"], model, s["requests"], s["executions"], s["queue_ms"], s["compute_ms"],
                         100.0 * share))
    out("")
    out(bench.format_table(("concurrency", "model", "requests", "executions", "queue ms", "compute ms", "queue %"),
                           rows, "server statistics per level (mean per request)"))
    for lv in levels:
        for message in lv["error_messages"]:
            out(f"concurrency {lv['concurrency']} error: {message}")


async def sweep(url: str, endpoint: str, levels: Sequence[int], requests: int | None, durations: Sequence[float],
                steps: int, timeout_s: float, warmup: bool = True) -> list[dict[str, Any]]:
    if warmup:  # model loading, first allocations: not part of any level
        await run_level(url, endpoint, 1, 1, durations[:1], steps, timeout_s, first_index=0)
    results, index = [], 1
    for level in levels:
        total = requests if requests is not None else max(2 * level, 4)
        result = await run_level(url, endpoint, level, total, durations, steps, timeout_s, index)
        index += total
        results.append(result)
        print(f"concurrency {level}: {result['requests']} requests, {result['errors']} errors, "
              f"RTF {result['rtf']:.2f}, p50 {result['p50_s']:.2f} s", file=sys.stderr, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    parser.add_argument("--endpoint", default="text2music")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 × level, >= 4)")
    parser.add_argument("--durations", default="30,60", help="comma-separated audio durations (s), cycled")
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    durations = [float(d) for d in args.durations.split(",") if d.strip()]
    if not levels or min(levels) < 1 or not durations:
        parser.error("--concurrency and --durations need positive values")
    results = asyncio.run(sweep(args.url, args.endpoint, levels, args.requests, durations, args.steps,
                                args.timeout, warmup=not args.no_warmup))
    print_tables(results)
    bench.write_json(args.json, {"url": args.url, "endpoint": args.endpoint, "steps": args.steps,
                                 "durations": durations, "levels": results})
    return 1 if any(lv["errors"] for lv in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU smoke benchmark with the tiny model: what serving through Triton costs, per request and per component.

Two tables:

1. **Triton end-to-end vs in-process**: the same text2music requests sent through a real
   tritonserver (gRPC client → decoupled orchestrator → six ONNX components by BLS) and run by
   the in-process torch pipeline; wall time per request, RTF, and the ratio. With the tiny model
   the ratio measures serving overhead (gRPC, BLS, tensor copies), not model speed.
2. **onnxruntime vs torch per component**: each served component on the same example inputs,
   the exported ONNX graph in onnxruntime against the torch module (both single-threaded by
   default), with the ratio and the largest difference of their outputs.

Numbers from the tiny model say nothing about the real model's speed; this script exists so the
measuring code runs in CI (``tests/test_benchmarks_smoke.py``) and as a quick sanity check.

Usage: ``python benchmarks/cpu_smoke.py [--url HOST:PORT] [--duration 2] [--steps 4] [--requests 2]``
(without ``--url`` it builds the tiny checkpoint, its ONNX export and a repository, and starts a
tritonserver of its own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from acestep_client.client import AceStepClient  # noqa: E402
from acestep_client.params import GenerationParams  # noqa: E402
from acestep_triton.checkpoint import load_components  # noqa: E402
from acestep_triton.component_graphs import component_sources, export_graph  # noqa: E402
from acestep_triton.export.onnx_export import export_cached  # noqa: E402
from acestep_triton.pipeline import MusicGenerator, TorchBackend  # noqa: E402
from acestep_triton.serving.deploy import build_deployment  # noqa: E402
from acestep_triton.serving.server import TritonServer  # noqa: E402
from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

PROMPT = "pop, upbeat, guitar, 120 BPM"
LYRICS = "[verse]\nfree as a bird\n[chorus]\nsing along"

Printer = Callable[[str], None]


def smoke_params(duration: float, steps: int, seed: int) -> GenerationParams:
    return GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, infer_step=steps,
                            manual_seeds=str(seed))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def triton_vs_inprocess(url: str, local: Any, *, duration: float, steps: int, requests: int) -> dict[str, Any]:
    """Send ``requests`` requests (seeds 1..n) through Triton and in-process; time each."""
    client = AceStepClient(url)
    client.generate(smoke_params(duration, 1, 0))  # warm-up: first BLS calls load sessions lazily
    local.generate(smoke_params(duration, 1, 0))
    served, inproc, diffs = [], [], []
    for seed in range(1, requests + 1):
        result, seconds = _timed(lambda seed=seed: client.generate(smoke_params(duration, steps, seed)))
        served.append(seconds)
        output, seconds = _timed(lambda seed=seed: local.generate(smoke_params(duration, steps, seed)))
        inproc.append(seconds)
        diffs.append(float(np.abs(result.audio - output.audio.numpy()).max()))
    return {"triton_s": served, "inprocess_s": inproc, "max_abs_diff": max(diffs), "duration": duration,
            "steps": steps}


def onnx_vs_torch(components: Any, onnx_paths: Mapping[str, Path], *, batch: int = 2, length: int = 16,
                  repeats: int = 5, threads: int = 1) -> list[dict[str, Any]]:
    """Time every component in torch and in onnxruntime on the same inputs (median of ``repeats``)."""
    import onnxruntime as ort  # optional (the export/serve extras), heavy: only for this comparison

    sources = component_sources(components)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for name, path in onnx_paths.items():
            graph = export_graph(name, sources[name]).eval()
            inputs = graph.example_inputs(batch, length, seed=0)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feeds = {k: v.numpy() for k, v in inputs.items()}

            def run_torch(graph: Any = graph, inputs: dict = inputs) -> Any:
                with torch.inference_mode():
                    return graph(*inputs.values())

            def run_onnx(session: Any = session, feeds: dict = feeds) -> Any:
                return session.run(None, feeds)

            reference, onnx_out = run_torch(), run_onnx()  # warm-up, and the outputs to compare
            torch_times = [_timed(run_torch)[1] for _ in range(repeats)]
            onnx_times = [_timed(run_onnx)[1] for _ in range(repeats)]
            reference = reference if isinstance(reference, tuple) else (reference,)
            diff = max(float(np.abs(np.asarray(o) - r.numpy()).max()) for o, r in zip(onnx_out, reference,
                                                                                         strict=True))
            rows.append({"component": name, "torch_ms": 1e3 * statistics.median(torch_times),
                         "onnxruntime_ms": 1e3 * statistics.median(onnx_times), "max_abs_diff": diff,
                         "shape": f"B={batch}, length={length}"})
    finally:
        torch.set_num_threads(previous)
    return rows


def run_smoke(url: str, local: Any, components: Any, onnx_paths: Mapping[str, Path], *, duration: float = 2.0,
              steps: int = 4, requests: int = 2, repeats: int = 5, threads: int = 1,
              out: Printer = print) -> dict[str, Any]:
    """Both measurements; prints both tables through ``out`` and returns the numbers.

    torch runs with ``threads`` threads throughout (restored afterwards): on a small CPU, torch's
    default thread pool makes the tiny model's kernels wait on each other (seconds per call).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        e2e = triton_vs_inprocess(url, local, duration=duration, steps=steps, requests=requests)
    finally:
        torch.set_num_threads(previous)
    served, inproc = statistics.median(e2e["triton_s"]), statistics.median(e2e["inprocess_s"])
    rows = [("Triton (gRPC + BLS + onnxruntime)", len(e2e["triton_s"]), served,
             bench.percentile(e2e["triton_s"], 90), duration / served, served / inproc),
            ("in-process (torch)", len(e2e["inprocess_s"]), inproc, bench.percentile(e2e["inprocess_s"], 90),
             duration / inproc, 1.0)]
    out(bench.format_table(("backend", "requests", "p50 s", "p90 s", "RTF", "ratio vs in-process"), rows,
                           f"text2music end to end: {duration:g} s of audio, {steps} steps, tiny model"))
    out(f"\nlargest |Triton - in-process| audio difference: {e2e['max_abs_diff']:.3g}\n")
    components_rows = onnx_vs_torch(components, onnx_paths, repeats=repeats, threads=threads)
    out(bench.format_table(
        ("component", "inputs", "torch ms", "onnxruntime ms", "ratio ort/torch", "max abs diff"),
        [(r["component"], r["shape"], r["torch_ms"], r["onnxruntime_ms"], r["onnxruntime_ms"] / r["torch_ms"],
          r["max_abs_diff"]) for r in components_rows],
        f"per component, {threads} thread(s), median of {repeats}"))
    return {"end_to_end": e2e, "components": components_rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server's gRPC address (default: start one)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint the server serves (default: the tiny one, written here)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acestep_smoke_") as tmp:
        workdir = args.workdir or Path(tmp)
        ckpt = args.checkpoint or write_tiny_checkpoint(workdir / "ckpt")
        components = load_components(ckpt)
        onnx_paths = export_cached(ckpt, workdir / "onnx", components=components)
        local = MusicGenerator(TorchBackend(components), components.text_tokenizer, components.lyric_tokenizer,
                               components.vocoder.mel_transform)
        kwargs = {"duration": args.duration, "steps": args.steps, "requests": args.requests,
                  "repeats": args.repeats, "threads": args.threads}
        if args.url:
            results = run_smoke(args.url, local, components, onnx_paths, **kwargs)
        else:
            deployment = build_deployment(ckpt, workdir / "deploy", onnx_dir=next(iter(onnx_paths.values())).parent,
                                              intra_op_threads=args.threads)
            with TritonServer(deployment.repository, log_path=workdir / "tritonserver.log",
                              startup_timeout=300) as server:
                results = run_smoke(server.grpc_url, local, components, onnx_paths, **kwargs)
        bench.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

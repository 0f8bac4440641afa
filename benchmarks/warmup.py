"""First-request time of a torch-runtime deployment with and without the load-time warm-up.

A torch-runtime component runs its config parameter ``warmup`` (``batch:frames:tokens,...``)
while it loads (``ComponentRunner.warm_up``), so a model only reports ready once those shapes
have run: on a GPU that is TorchInductor compilation and one CUDA-graph capture per shape; on a
CPU it is the one-time costs of a process's first calls (allocator growth, oneDNN primitive and
kernel selection, lazy initialisation inside torch). This script measures what the first
request pays for them, side by side in one run:

- a probe run records the ``dit_decoder`` shapes the request sends (bucketed as the endpoints
  bucket them: ``ShapeBuckets.default()``), which become the warm-up list;
- then ``--rounds`` rounds, each starting one fresh process per variant (one-time costs are per
  process, so variants must not share one), alternating which goes first: ``cold`` (no warm-up)
  and ``warm`` (every component warms up those shapes at load). Each process loads the in-process
  twin of a torch-runtime deployment (``serving.torch_runtime.in_process_twin_generator``: the very
  runners the served models run, without Triton), times the load (warm-up included), the first
  request and a second, identical one;
- prints a Markdown table of medians and the ratio first(cold) / first(warm).

Usage: ``python benchmarks/warmup.py [--checkpoint DIR] [--duration 10] [--steps 8] [--rounds 3]
[--threads 1] [--json PATH]`` (without ``--checkpoint`` it writes the tiny random checkpoint).
With the tiny model the numbers are one-time costs of the runtime, not model speed; on a GPU,
``benchmarks/gpu_serving.py`` measures the compiled path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

from acestep_client.params import GenerationParams  # noqa: E402

PROMPT = "pop, upbeat, guitar, 120 BPM"
LYRICS = "[verse]\nfree as a bird\n[chorus]\nsing along, sing along\n[verse]\nthe night is young"
VARIANTS = ("cold", "warm")


def _params(duration: float, steps: int) -> GenerationParams:
    return GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, infer_step=steps,
                            manual_seeds="7")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process: load (with or without warm-up), then two identical requests."""
    # torch only in the measured child processes (the parent only starts them), and its thread
    # count set before the runtime's modules load
    import torch

    torch.set_num_threads(args.threads)
    from acestep_triton.export.specs import COMPONENTS
    from acestep_triton.serving import torch_runtime

    seen: list[tuple[int, int, int]] = []
    if args.child == "probe":  # record the DiT shapes the request sends
        call = torch_runtime.ComponentRunner.__call__

        def recording(self: Any, inputs: Any) -> Any:
            if self.spec.name == "dit_decoder":
                shape = (int(inputs["latents"].shape[0]), int(inputs["latents"].shape[-1]),
                         int(inputs["encoder_states"].shape[1]))
                if shape not in seen:
                    seen.append(shape)
            return call(self, inputs)

        torch_runtime.ComponentRunner.__call__ = recording  # type: ignore[method-assign]
    warmup = args.warmup if args.child == "warm" else "none"
    started = time.perf_counter()
    generator = torch_runtime.in_process_twin_generator(args.checkpoint, device="cpu",
                                                        parameters={name: {"warmup": warmup} for name in COMPONENTS})
    load_s = time.perf_counter() - started
    times = []
    for _ in range(2):
        started = time.perf_counter()
        generator.generate(_params(args.duration, args.steps))
        times.append(time.perf_counter() - started)
    return {"variant": args.child, "load_s": load_s, "first_s": times[0], "second_s": times[1],
            "dit_shapes": [f"{b}:{w}:{s}" for b, w, s in seen]}


def _run_child(variant: str, args: argparse.Namespace, checkpoint: Path, warmup: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--checkpoint", str(checkpoint),
               "--duration", str(args.duration), "--steps", str(args.steps), "--threads", str(args.threads),
               "--warmup", warmup]
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """The probe, then ``args.rounds`` interleaved rounds of both variants; medians and the ratio."""
    probe = _run_child("probe", args, checkpoint, "none")
    warmup = ",".join(probe["dit_shapes"])
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in (VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]):
            runs[variant].append(_run_child(variant, args, checkpoint, warmup))
    summary = {v: {key: statistics.median(r[key] for r in runs[v]) for key in ("load_s", "first_s", "second_s")}
               for v in VARIANTS}
    return {"warmup": warmup, "runs": runs, "median": summary,
            "first_request_ratio": summary["cold"]["first_s"] / summary["warm"]["first_s"]}


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"warm-up shapes (batch:frames:tokens, as the request sends them): `{result['warmup']}`",
             f"request: text2music {args.duration:g} s, {args.steps} steps; {args.rounds} rounds, "
             f"fresh process per variant and round, torch threads {args.threads}; medians", "",
             "| variant | load s (incl. warm-up) | first request s | second request s |",
             "|---|---|---|---|"]
    for variant in VARIANTS:
        m = result["median"][variant]
        lines.append(f"| {variant} | {m['load_s']:.3f} | {m['first_s']:.3f} | {m['second_s']:.3f} |")
    lines += ["", f"first request, cold / warm: **{result['first_request_ratio']:.2f}x**"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the tiny random one)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of audio per request")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each process")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per process")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", choices=("probe", *VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            # torch, for the tiny checkpoint, only when none is given: the parent otherwise needs none
            from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(tmp) / "checkpoint", seed=0)
        result = measure(args, checkpoint)
    print(table(result, args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

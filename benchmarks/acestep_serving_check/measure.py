"""The whole measurement: the server, the in-process twin, then each section under its guard."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import acestep_bench as bench
import load_client as load
import numpy as np

from acestep_triton.serving.server import TritonServer, tail

from .end_to_end import measure_end_to_end
from .figures import verdict
from .lora import measure_lora
from .memory import MemorySampler, memory_section, scrape_component_gauges
from .paths import CudaPeaks, EagerBaseline, InProcess, ServerStarter, TritonPath, triton_install
from .placeholders import active_placeholders
from .plan import (
    GOAL_SPEEDUP_VS_EAGER,
    GOAL_THROUGHPUT_MAX_SECONDS,
    GOAL_THROUGHPUT_RATIO,
    GOAL_TRITON_OVERHEAD,
    TEXT2MUSIC_MODELS,
    Plan,
    request_params,
)
from .report import Deadline, Report, SkipSectionError, run_section
from .throughput import measure_load

CUDA_POOL_BYTES = 2 * 2**30
"""``--cuda-memory-pool-byte-size`` of the server on a GPU: the Python backend hands GPU tensors
between processes through this pool (default 64 MiB; a batched DiT call's encoder states alone
can pass that), so BLS tensors stay on the device."""


def goals_section(plan: Plan, report: Report) -> None:
    """Every goal against what this run measured, in one table."""
    judged = not plan.dry_run
    rows = []
    for steps, v in report.data.get("a_b_end_to_end", {}).get("per_steps", {}).items():
        rows.append((f"Triton / in-process latency, {steps} steps", v["triton_vs_inprocess"],
                     f"<= {GOAL_TRITON_OVERHEAD:g}",
                     verdict(v["triton_vs_inprocess"], GOAL_TRITON_OVERHEAD, True, judged)))
        rows.append((f"Triton speed-up over eager sequential CFG, {steps} steps", v["triton_speedup_vs_eager"],
                     f">= {GOAL_SPEEDUP_VS_EAGER:g}",
                     verdict(v["triton_speedup_vs_eager"], GOAL_SPEEDUP_VS_EAGER, False, judged)))
    throughput = report.data.get("c_throughput", {})
    for duration, value in throughput.get("ratio_top_vs_1", {}).items():
        in_scope = float(duration) <= GOAL_THROUGHPUT_MAX_SECONDS
        rows.append((f"req/s at concurrency {throughput['top_concurrency']} vs 1, {duration} s requests", value,
                     f">= {GOAL_THROUGHPUT_RATIO:g}" if in_scope else "(reported)",
                     verdict(value, GOAL_THROUGHPUT_RATIO, False, judged and in_scope)))
    title = "goals" + (" (dry run: tiny model on the CPU, nothing is judged)" if plan.dry_run else "")
    report.add("goals", [dict(zip(("check", "measured", "goal", "met"), r, strict=True)) for r in rows],
               bench.format_table(("check", "measured", "goal", "met"), rows, title))


def describe(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    # torch and the modules built on it: heavy (see __init__), imported where used
    import torch

    from acestep_triton.serving.torch_component import REQUIRE_DEVICE_INPUTS_ENV, requires_device_inputs

    cuda = plan.device.startswith("cuda")
    info = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, "
            f"{os.cpu_count()} cores)", "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "numpy": np.__version__, "placeholders": active_placeholders(),
            "checkpoint": str(args.checkpoint), "repository": str(args.repository),
            "triton_root": str(args.triton_root) if args.triton_root else "this environment's nvidia-pytriton",
            "require_device_inputs": requires_device_inputs({}),
            "require_device_inputs_how": f"environment {REQUIRE_DEVICE_INPUTS_ENV} for every component",
            "plan": plan.__dict__}
    if cuda:
        info["gpu_memory_total_mib"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    try:
        info["tritonclient"] = importlib.metadata.version("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        info["tritonclient"] = "missing"
    return info


def meta_section(plan: Plan, args: argparse.Namespace, report: Report) -> None:
    """The machine and the software versions, first in the report."""
    info = describe(plan, args)
    header = (f"Device: {info['device']}; Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), "
              f"numpy {info['numpy']}, tritonclient {info['tritonclient']}; placeholders: "
              f"{', '.join(info['placeholders']) or 'none'}; components refuse host inputs: "
              f"{'yes' if info['require_device_inputs'] else 'no'}"
              + ("; DRY RUN (tiny model, CPU): checks the code, says nothing about speed" if plan.dry_run else ""))
    report.add("meta", info, f"## GPU serving check\n\n{header}")


@dataclass
class Paths:
    """What the set-up sections produced (None where one failed)."""

    peaks: CudaPeaks | None = None
    inproc: InProcess | None = None
    eager: EagerBaseline | None = None
    triton: TritonPath | None = None


def measure(args: argparse.Namespace) -> int:
    """Every section; 0 when all ran without errors (the goals are reported, not enforced).

    Order: the server starts in the background while this process loads and warms its own copy
    of the runners (their TorchInductor compilations land in the on-disk cache the server's
    models then hit) and builds the eager baseline; then warm-up requests through Triton for
    every shape measured, (a)+(b), (e), (c), and (d) whatever happened before, while the server
    still runs (its components' gauges are read from ``/metrics``). Each step is a guarded
    section (:func:`~.report.run_section`): one that fails is recorded and the rest still run.
    """
    plan = Plan.for_args(args)
    deadline = Deadline(plan.time_budget_s)
    report = Report(args.out)
    bench.stub_soundfile_if_missing()
    # torch: heavy (see __init__), imported where used, after the soundfile stand-in
    import torch

    if plan.threads > 0:
        torch.set_num_threads(plan.threads)  # as the served components have (dry run: 1 thread each)
    meta_section(plan, args, report)
    return MeasureRun(args, plan, report, deadline).run()


class MeasureRun:
    """One ``measure`` run after its header: constructing it starts the memory sampler and the
    server in the background; :meth:`run` then runs the sections in order, each guarded, every
    set-up section leaving what it built in :attr:`paths` for the sections after it."""

    def __init__(self, args: argparse.Namespace, plan: Plan, report: Report, deadline: Deadline) -> None:
        self.args, self.plan, self.report, self.deadline = args, plan, report, deadline
        self.failures: list[str] = []
        self.paths = Paths()
        self.timings: dict[str, float] = {}
        self.warm_durations = sorted({plan.e2e_seconds, *plan.load_durations})
        self.sampler = MemorySampler(interval=0.5 if plan.dry_run else 1.0)
        self.sampler.start()
        self.server = self._server()
        self.sampler.server_pid = lambda: self.server.pid
        self.starter = ServerStarter(self.server)
        self.starter.start()

    def _server(self) -> TritonServer:
        cuda = self.plan.device.startswith("cuda")
        return TritonServer(self.args.repository, log_path=self.args.out / "tritonserver.log",
                            startup_timeout=self.args.server_timeout, install=triton_install(self.args.triton_root),
                            extra_args=["--model-control-mode=explicit",
                                        *(f"--load-model={m}" for m in TEXT2MUSIC_MODELS),
                                        f"--model-load-thread-count={len(TEXT2MUSIC_MODELS)}",
                                        *([f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}"] if cuda else [])])

    def run(self) -> int:
        """Every section in order; 0 when none failed."""
        try:
            self._section("setup_inprocess", self.setup_inprocess)
            self._section("setup_eager", self.setup_eager)
            self._section("setup_triton", self.setup_triton)
            self.report.add("timings", self.timings, bench.format_table(
                ("phase", "s"), list(self.timings.items()), "set-up (loading, compiling, CUDA-graph capture)"))
            self._section("a_b_end_to_end", self.end_to_end)
            # (e) before (c): it takes seconds, while (c) uses whatever budget is left
            if self.plan.lora:
                self._section("e_lora", lambda: measure_lora(self.plan, self.report, self.deadline))
            else:
                self.report.status("e_lora", {"status": "skipped", "reason": "--no-lora"})
            self._section("c_throughput", self.throughput)
        finally:
            self.memory_and_stop()
        self._section("goals", lambda: goals_section(self.plan, self.report))
        for failure in self.failures:
            print(f"error: {failure}", file=sys.stderr)
        if self.failures and self.server.log_path is not None:
            print(f"--- tritonserver log, last lines ({self.server.log_path}) ---\n{tail(self.server.log_path, 60)}",
                  file=sys.stderr)
        return 1 if self.failures else 0

    def _section(self, key: str, fn: Callable[[], Any]) -> None:
        run_section(self.report, key, fn, self.failures)

    def setup_inprocess(self) -> None:
        import torch  # heavy (see __init__): imported where used

        device = torch.device(self.plan.device)
        self.paths.peaks = CudaPeaks(device)
        inproc = InProcess(self.args.checkpoint, self.plan.device, self.paths.peaks)
        self.timings["in-process runners: load"] = inproc.load_s
        if device.type == "cuda":
            self.sampler.self_reserved = lambda: torch.cuda.memory_reserved(device) / 2**20
        started = time.perf_counter()
        for seconds in self.warm_durations:
            inproc.generate(request_params(seconds, self.plan.warm_steps))
        self.timings["in-process runners: warm-up (compile, CUDA graphs)"] = time.perf_counter() - started
        self.paths.inproc = inproc

    def setup_eager(self) -> None:
        # torch, through the pipeline: heavy (see __init__), imported where used
        from acestep_triton.pipeline import sampler_config

        plan, paths = self.plan, self.paths
        if paths.inproc is None or paths.peaks is None:
            raise SkipSectionError("needs the in-process runners (their tokenizers give the token counts)")
        prompt, lyrics = load.PROMPTS[0]
        text_tokens, lyric_tokens = paths.inproc.token_counts(prompt, lyrics)
        baseline = EagerBaseline(self.args.checkpoint, plan.device, text_tokens, lyric_tokens,
                                 sampler_config(request_params(plan.e2e_seconds, plan.steps[0])), paths.peaks)
        baseline.generate(plan.e2e_seconds, sampler_config(request_params(plan.e2e_seconds, plan.warm_steps)))
        self.timings["eager baseline: build on the device"] = baseline.build_s
        paths.eager = baseline

    def setup_triton(self) -> None:
        plan, starter = self.plan, self.starter
        # wait for the server, keeping a quarter of the budget (at most 90 s) for the measurements
        starter.join(timeout=max(1.0, self.deadline.left() - min(90.0, plan.time_budget_s / 4)))
        if starter.is_alive():
            raise RuntimeError("tritonserver did not become ready within the time budget")
        if starter.error is not None:
            raise RuntimeError(f"tritonserver failed to start: {starter.error}")
        self.timings["tritonserver: start until ready"] = starter.seconds
        path = TritonPath(self.server.grpc_url, plan.request_timeout_s)
        started = time.perf_counter()
        for seconds in self.warm_durations:  # a component refusing a host input fails here, naming it
            path.generate(request_params(seconds, plan.warm_steps))
        self.timings["tritonserver: warm-up requests"] = time.perf_counter() - started
        self.paths.triton = path

    def end_to_end(self) -> None:
        if self.paths.inproc is None:
            raise SkipSectionError("the in-process runners did not load")
        measure_end_to_end(self.plan, self.paths.triton, self.paths.inproc, self.paths.eager, self.report,
                           self.deadline)

    def throughput(self) -> None:
        if self.paths.triton is None:
            raise SkipSectionError("no working server")
        measure_load(self.plan, self.server.grpc_url, self.report, self.deadline)
        errors = self.report.data["c_throughput"]["errors"]
        if errors:
            raise RuntimeError(f"{errors} load requests failed")

    def memory_and_stop(self) -> None:
        """(d), whatever happened before, while the server still runs; then stop the server."""
        gauges = None
        starter = self.starter
        if self.server.pid is not None and starter.error is None and not starter.is_alive():
            try:
                gauges = scrape_component_gauges(self.server.metrics_url)
            except Exception as exc:  # the table says so; the other rows stand
                self.report.note(f"(d) the components' gauges could not be read: {type(exc).__name__}: {exc}")
        self._section("d_memory", lambda: memory_section(self.sampler, self.paths.peaks, self.report, gauges))
        self.server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_serving.py", description="The GPU serving check (see benchmarks/"
                                                                         "acestep_serving_check/__init__.py).")
    sub = parser.add_subparsers(dest="command", required=True)
    holders = sub.add_parser("placeholders", help="write stand-ins for missing packages (soundfile, cutlet)")
    holders.add_argument("folder", type=Path)
    build_cmd = sub.add_parser("build", help="the deployment under test (torch runtime, text2music only)")
    build_cmd.add_argument("--checkpoint", type=Path, required=True)
    build_cmd.add_argument("--workdir", type=Path, required=True)
    build_cmd.add_argument("--target", choices=("cpu", "gpu"), default="gpu")
    build_cmd.add_argument("--endpoint-instances", default=None,
                           help="text2music instances, as `acestep-triton build --endpoint-instances` "
                                "(one request at a time each; default: as the endpoint definition says)")
    build_cmd.add_argument("--threads", type=int, default=0, help="torch threads per component (0: torch's default)")
    run = sub.add_parser("measure", help="(a)-(e) against a built repository")
    run.add_argument("--checkpoint", type=Path, required=True)
    run.add_argument("--repository", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True, help="folder for gpu_serving.{md,json} and the server log")
    run.add_argument("--triton-root", type=Path, default=None,
                     help="carried nvidia-pytriton tree (holds pytriton/ and nvidia_pytriton.libs/)")
    run.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: the same code, quickly")
    run.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    run.add_argument("--e2e-seconds", type=float, default=None, help="(a)/(b) audio seconds (60)")
    run.add_argument("--steps", default=None, help="(a)/(b) step counts (27,60)")
    run.add_argument("--repeats", type=int, default=None, help="(a)/(b) interleaved repeats (3)")
    run.add_argument("--warm-steps", type=int, default=None, help="steps of each warm-up request (4)")
    run.add_argument("--load-durations", default=None, help="(c) request durations, one sweep each (10,30,60)")
    run.add_argument("--concurrency", default=None, help="(c) levels, must include 1 (1,4,8)")
    run.add_argument("--load-steps", type=int, default=None, help="(c) steps per request (27)")
    run.add_argument("--requests", type=int, default=None, help="(c) requests per level (default: max(2 x level, 4))")
    run.add_argument("--time-budget", type=float, default=None, help="seconds for the whole measurement (420)")
    run.add_argument("--request-timeout", type=float, default=None, help="seconds per request (180)")
    run.add_argument("--server-timeout", type=float, default=300.0, help="seconds for tritonserver to load")
    run.add_argument("--threads", type=int, default=None, help="in-process torch threads (0: default; dry run 1)")
    run.add_argument("--no-lora", action="store_true",
                     help="skip (e) live LoRA: extra time per DiT step at r=16,64,256 "
                          "(benchmarks/lora_live_adapters.py)")
    return parser.parse_args(argv)


def build(checkpoint: Path, workdir: Path, target: str, endpoint_instances: str | None, threads: int) -> Path:
    """The deployment under test: torch runtime, the text2music endpoint only, with the build's
    ``endpoint_instances`` option (a decoupled endpoint instance runs one request at a time, so
    concurrency 8 needs 8 of them). Returns the repository."""
    # the renderer (tritonclient) and the deployment (torch): heavy (see __init__), imported where used
    from acestep_triton.export.render_cli import parse_endpoint_instances
    from acestep_triton.serving.deploy import build_deployment

    deployment = build_deployment(checkpoint, workdir, target=target, runtime="torch", endpoints=["text2music"],
                                  intra_op_threads=threads,
                                  endpoint_instances=parse_endpoint_instances(endpoint_instances))
    return deployment.repository

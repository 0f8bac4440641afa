"""ACE-Step at its real size through a real tritonserver on the CPU: cold start, memory, every task.

One command, Markdown tables for RESULTS.md (and ``--json`` for the raw figures):

1. **Checkpoint**: the full-size random checkpoint in the official layout (official configs,
   DiT 24 x 2560; ``acestep_triton.synthetic.full_size``), written once or reused.
2. **Reading it**: the seconds to read every weight file once from this disk (page cache
   dropped first where the machine allows it; the table says whether it was cold or warm).
3. **Loading each component** in a fresh process, as a ``torch``-runtime model does: seconds,
   peak and steady RSS, the bytes of the weights it serves. With ``--before REV`` the same is
   measured with the loader of git revision ``REV`` (a temporary worktree), same checkpoint,
   same table.
4. **Serving**: the torch-runtime CPU repository (six endpoints, six components, live LoRA
   registry) through tritonserver: time from process start to ready, per model load seconds,
   per process peak (during load) and steady RSS, against the tiny checkpoint's on the same
   machine (the fixed cost of the stub processes).
5. **Requests**: one per task (text2music 10 s, twice with the same seed; retake, repaint,
   extend, edit, audio2audio at 5 s; text2music with a rank-64 live LoRA), 3 steps each:
   seconds, seconds per ``dit_decoder`` execution (Triton's statistics), the admission estimate
   against the measured peak (the sum of every server process's RSS, sampled every 20 ms, less
   its value before the request), finite audio, and whether the two identical requests gave
   bit-identical audio.
6. **Goals**: each figure the issue asks for, with its bound, met or not.

    python benchmarks/full_size.py [--workdir artifacts/full_size] [--before 6c45675] [--json out.json]
    python benchmarks/full_size.py --smoke   # the same code path on a 2-block, 32-wide model (the suite)

Linux only (reads /proc). Needs the project's venv (``scripts/setup.sh``): tritonserver comes from
the pytriton wheel. At full size this takes ~20 GiB of memory at the peak and ~30 min on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench
from load_probe import probe_load

bench.ensure_project_importable()

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from process_memory import machine_summary, reset_peak, status_bytes  # noqa: E402

from acestep_client.client import AceStepClient  # noqa: E402
from acestep_client.params import GenerationParams  # noqa: E402
from acestep_triton.checkpoint import OFFICIAL_FILES, CheckpointLayout  # noqa: E402
from acestep_triton.export.specs import COMPONENTS  # noqa: E402
from acestep_triton.serving import admission as adm  # noqa: E402
from acestep_triton.serving.assets import load_assets  # noqa: E402
from acestep_triton.serving.deploy import build_deployment  # noqa: E402
from acestep_triton.serving.health import stub_processes  # noqa: E402
from acestep_triton.serving.memory import rss_bytes  # noqa: E402
from acestep_triton.serving.server import TritonServer  # noqa: E402
from acestep_triton.synthetic.full_size import FullSizeConfigs, write_full_random_checkpoint  # noqa: E402
from acestep_triton.synthetic.tiny_checkpoint import (  # noqa: E402
    tiny_dcae_config,
    tiny_text_encoder_config,
    tiny_transformer_config,
    tiny_vocoder_config,
    write_tiny_checkpoint,
)
from acestep_triton.synthetic.tiny_lora import write_tiny_lora  # noqa: E402

MiB = 2**20
GiB = 2**30
LORA_NAME = "rank64"
SEED = "42"


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Plan:
    """What one run measures (``--smoke`` shrinks the model and the audio, not the code path)."""

    workdir: Path
    smoke: bool = False
    steps: int = 3
    song_s: float = 10.0
    clip_s: float = 5.0
    lora_rank: int = 64
    before: str | None = None
    startup_timeout_s: float = 3600.0
    warm_restart: bool = True
    warm_pass: bool = True
    """Send every request once unmeasured first: each endpoint is its own process, and its first
    request grows it for good (resampling kernels, oneDNN primitives, a live adapter made
    resident), which is not the request's transient memory the admission estimate is about."""
    baseline: bool = True

    @property
    def checkpoint(self) -> Path:
        return self.workdir / ("smoke_checkpoint" if self.smoke else "checkpoint")

    def configs(self) -> FullSizeConfigs:
        """Official configs, or for ``--smoke`` the tiny ones with a 2-block DiT."""
        if not self.smoke:
            return FullSizeConfigs()
        text = tiny_text_encoder_config(0)
        del text["vocab_size"]  # the writer takes it from the stand-in tokenizer
        return FullSizeConfigs({**tiny_transformer_config(), "num_layers": 2}, tiny_dcae_config(),
                               tiny_vocoder_config(), text)


def smoke_plan(workdir: Path) -> Plan:
    return Plan(workdir=workdir, smoke=True, steps=2, song_s=2.0, clip_s=1.5, lora_rank=4,
                startup_timeout_s=600.0, warm_restart=False, warm_pass=False)


# ---------------------------------------------------------------------------------- 1-2. files
def ensure_checkpoint(plan: Plan) -> tuple[Path, float | None]:
    """The checkpoint folder and the seconds it took to write (None when reused)."""
    if CheckpointLayout(plan.checkpoint).missing_files() == [] and (plan.checkpoint / "lyrics_vocab.json").exists():
        return plan.checkpoint, None
    started = time.perf_counter()
    write_full_random_checkpoint(plan.checkpoint, configs=plan.configs(), progress=not plan.smoke)
    return plan.checkpoint, time.perf_counter() - started


def weight_files(ckpt: Path) -> list[Path]:
    layout = CheckpointLayout(ckpt)
    return [layout.weights_path(name) for name in OFFICIAL_FILES]


def drop_page_cache(paths: Sequence[Path]) -> bool:
    """Evict ``paths`` from the page cache (``posix_fadvise`` DONTNEED; no privileges needed).
    True when the kernel was asked for every file; a warm cache is then unlikely but possible."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()  # dirty pages (a checkpoint just written) are not evicted
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_seconds(paths: Sequence[Path], chunk: int = 16 * MiB) -> tuple[float, int]:
    """(seconds, bytes) to read ``paths`` once, sequentially, into a reused buffer."""
    buffer = bytearray(chunk)
    view, total = memoryview(buffer), 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - started, total


def read_table(ckpt: Path) -> dict[str, Any]:
    files = weight_files(ckpt)
    dropped = drop_page_cache(files)
    cold_s, size = read_seconds(files)
    warm_s, _ = read_seconds(files)
    return {"bytes": size, "first_read_s": cold_s, "first_read_cache": "dropped (fadvise)" if dropped else "warm",
            "warm_read_s": warm_s}


# ---------------------------------------------------------------------------------- 3. loading
@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary git worktree of ``rev`` (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="acestep_before_") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(bench.REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(bench.REPO), "worktree", "remove", "--force", str(path)], check=False)


def load_table(ckpt: Path, before: str | None) -> dict[str, dict[str, Any]]:
    """``{component: {"after": probe, "before": probe}}`` (``before`` only with a revision)."""
    table: dict[str, dict[str, Any]] = {name: {} for name in COMPONENTS}
    for name in COMPONENTS:
        table[name]["after"] = probe_load(name, ckpt, bench.REPO)
    if before:
        with worktree(before) as tree:
            for name in COMPONENTS:
                table[name]["before"] = probe_load(name, ckpt, tree)
    return table


# ---------------------------------------------------------------------------------- 4. serving
def server_processes(server: TritonServer) -> dict[str, int]:
    """``{process label: pid}``: tritonserver and each model's stub (``model`` or ``model#i``)."""
    found: dict[str, int] = {"tritonserver": int(server.pid or 0)}
    for stub in stub_processes(server.pid):
        label = stub.model if stub.model not in found else f"{stub.model}#{stub.instance}"
        found[label] = stub.pid
    return found


def reset_peaks(pids: Mapping[str, int]) -> None:
    """Reset each process's high-water mark (``VmHWM``) to its current RSS."""
    for pid in pids.values():
        with suppress(OSError):
            reset_peak(pid)


LOADED = re.compile(r"(?P<model>[\w.-]+): .*loaded in (?P<seconds>[\d.]+) s")


def model_load_seconds(log: str) -> dict[str, float]:
    """Per-model load seconds from the component models' own log lines."""
    return {m["model"]: float(m["seconds"]) for m in LOADED.finditer(log)}


@dataclass
class Served:
    """A started server and what its start cost."""

    server: TritonServer
    ready_s: float
    processes: dict[str, int]
    load_peak: dict[str, int] = field(default_factory=dict)
    steady: dict[str, int] = field(default_factory=dict)


def start_server(ckpt: Path, workdir: Path, plan: Plan, lora_dir: Path | None, settle_s: float = 5.0) -> Served:
    """Build the torch-runtime CPU repository, start tritonserver, time it to ready and read
    every process's peak (during load) and steady RSS."""
    deployment = build_deployment(ckpt, workdir, runtime="torch", target="cpu", lora_dir=lora_dir)
    server = TritonServer(deployment.repository, log_path=workdir / "tritonserver.log",
                          startup_timeout=plan.startup_timeout_s)
    started = time.perf_counter()
    server.start()
    ready_s = time.perf_counter() - started
    processes = server_processes(server)
    served = Served(server, ready_s, processes)
    served.load_peak = {k: status_bytes(pid, "VmHWM") for k, pid in processes.items()}
    time.sleep(settle_s)
    served.steady = {k: rss_bytes(pid) for k, pid in processes.items()}
    return served


# ---------------------------------------------------------------------------------- 5. requests
def synthetic_source(seconds: float, rate: int = 44100) -> bytes:
    """A stereo wav of ``seconds``: two tones and a little noise (deterministic)."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.02 * rng.standard_normal(t.size)
    out = io.BytesIO()
    sf.write(out, np.stack([left, right], 1).astype(np.float32), rate, format="WAV")
    return out.getvalue()


@dataclass(frozen=True)
class Request:
    label: str
    params: GenerationParams
    src_audio: bytes | None = None
    ref_audio: bytes | None = None


def requests(plan: Plan) -> list[Request]:
    """One request per task, 3 steps each (2 for ``--smoke``), the same seeds."""
    base = GenerationParams(prompt="pop, upbeat, guitar, 120 BPM", lyrics="[verse]\nfree as a bird",
                            infer_step=plan.steps, manual_seeds=SEED)
    song = replace(base, audio_duration=plan.song_s)
    clip = replace(base, audio_duration=plan.clip_s)
    source = synthetic_source(plan.clip_s)
    short = synthetic_source(plan.clip_s - 2 * plan.clip_s / 5)
    return [
        Request("text2music", song),
        Request("text2music (same again)", song),
        Request("retake", replace(clip, task="retake", retake_seeds="7", retake_variance=0.5)),
        Request("repaint", replace(base, task="repaint", repaint_start=plan.clip_s / 5,
                                   repaint_end=3 * plan.clip_s / 5, retake_variance=0.5), src_audio=source),
        Request("extend", replace(base, task="extend", right_extend_length=2 * plan.clip_s / 5,
                                  retake_variance=1.0), src_audio=short),
        Request("edit", replace(base, task="edit", edit_type="remix", edit_target_prompt="rock, electric guitar"),
                src_audio=source),
        Request("audio2audio", replace(base, task="audio2audio", ref_audio_strength=0.5), ref_audio=source),
        Request(f"text2music + LoRA r{plan.lora_rank}", replace(song, lora_name_or_path=LORA_NAME, lora_weight=1.0)),
    ]


def metric(url: str, name: str, model: str) -> float:
    """The sum of ``name{model="..."}`` samples on Triton's metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class PeakSampler(threading.Thread):
    """Samples the sum of the server processes' RSS every ``interval_s`` until stopped."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval_s = list(pids), interval_s
        self.peak = self.total()
        self._stop_event = threading.Event()

    def total(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, self.total())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.total())


def estimate(request: Request, dims: adm.ModelDims, count: Callable[[GenerationParams], tuple[int, int]]) -> int:
    """The admission estimate of ``request``, as the endpoint computes it."""
    text, lyric = count(request.params)
    shape = adm.request_shape(request.params, src_seconds=adm.audio_seconds(request.src_audio),
                              ref_seconds=adm.audio_seconds(request.ref_audio), text_tokens=text, lyric_tokens=lyric)
    return adm.estimate_memory(shape, dims).peak


def run_request(served: Served, request: Request, dims: adm.ModelDims,
                count: Callable[[GenerationParams], tuple[int, int]]) -> dict[str, Any]:
    url, metrics = served.server.grpc_url, served.server.metrics_url
    pids = served.processes
    reset_peaks(pids)
    before = {k: rss_bytes(pid) for k, pid in pids.items()}
    executions = metric(metrics, "nv_inference_exec_count", "dit_decoder")
    compute_us = metric(metrics, "nv_inference_compute_infer_duration_us", "dit_decoder")
    sampler = PeakSampler(list(pids.values()))
    sampler.start()
    started = time.perf_counter()
    result = AceStepClient(url).generate(request.params, src_audio=request.src_audio, ref_audio=request.ref_audio,
                                         timeout_s=3600.0)
    seconds = time.perf_counter() - started
    peak_total = sampler.stop()
    calls = metric(metrics, "nv_inference_exec_count", "dit_decoder") - executions
    dit_us = metric(metrics, "nv_inference_compute_infer_duration_us", "dit_decoder") - compute_us
    audio = np.asarray(result.audio)
    measured = peak_total - sum(before.values())
    est = estimate(request, dims, count)
    per_process = {k: status_bytes(pid, "VmHWM") - before[k] for k, pid in pids.items()}
    return {"label": request.label, "seconds": seconds, "dit_executions": calls,
            "s_per_dit_execution": dit_us / 1e6 / calls if calls else float("nan"),
            "estimate": est, "measured_peak": measured, "estimate_over_measured": est / measured if measured > 0
            else float("nan"), "sum_of_process_peaks": sum(max(0, v) for v in per_process.values()),
            "finite": bool(audio.size and np.isfinite(audio).all()), "samples": int(audio.size),
            "audio": audio}


def token_count(assets_dir: Path) -> Callable[[GenerationParams], tuple[int, int]]:
    """The endpoints' token counter over the deployment's tokenizers."""
    assets = load_assets(assets_dir)
    def lyric_ids(text: str, _field: str) -> list[int]:
        return assets.lyric_tokenizer.encode(text) if text else []

    tokenizers = SimpleNamespace(prompt_tokenizer=assets.prompt_tokenizer, tokenize_lyrics=lyric_ids)
    return adm.token_counter(tokenizers)


# ---------------------------------------------------------------------------------- 6. report
def mib(n: float) -> float:
    return n / MiB


def format_read(read: Mapping[str, Any]) -> str:
    return bench.format_table(
        ["weights", "first read (s)", "page cache before it", "warm read (s)"],
        [[f"{read['bytes'] / GiB:.2f} GiB", read["first_read_s"], read["first_read_cache"], read["warm_read_s"]]],
        "Reading the checkpoint's weight files once")


def format_load(table: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, runs in table.items():
        for when in ("before", "after"):
            r = runs.get(when)
            if r is None:
                continue
            if "error" in r:
                rows.append([name, when, "error", r["error"][:60], "", "", ""])
                continue
            held = r["steady_rss"] - r["base_rss"]
            rows.append([name, when, r["seconds"], mib(r["weights"]), mib(r["peak_rss"]), mib(r["steady_rss"]),
                         r["peak_rss"] / r["steady_rss"], held / r["weights"] if r["weights"] else float("nan")])
    return bench.format_table(["component", "loader", "load (s)", "weights (MiB)", "peak RSS (MiB)",
                               "steady RSS (MiB)", "peak ÷ steady", "(steady − import) ÷ weights"], rows,
                              "Loading one component in a fresh process")


def format_serving(tiny: Served, full: Served, weights: Mapping[str, int], loads: Mapping[str, float]) -> str:
    rows = []
    for label in full.processes:
        base = tiny.steady.get(label, 0)
        w = weights.get(label.split("#")[0], 0)
        growth = full.steady[label] - base
        rows.append([label, loads.get(label, float("nan")), mib(w), mib(base), mib(full.load_peak[label]),
                     mib(full.steady[label]), growth / w if w else float("nan"),
                     full.load_peak[label] / full.steady[label] if full.steady[label] else float("nan")])
    total = ["all processes", float("nan"), mib(sum(weights.get(k.split("#")[0], 0) for k in full.processes)),
             mib(sum(tiny.steady.values())), mib(sum(full.load_peak.values())), mib(sum(full.steady.values())),
             float("nan"), float("nan")]
    return bench.format_table(["process", "load (s)", "weights (MiB)", "tiny steady (MiB)", "peak at load (MiB)",
                               "steady (MiB)", "(steady − tiny) ÷ weights", "peak ÷ steady"], [*rows, total],
                              f"Serving: ready in {full.ready_s:.1f} s (tiny checkpoint: {tiny.ready_s:.1f} s)")


def format_requests(results: Sequence[Mapping[str, Any]]) -> str:
    rows = [[r["label"], r["seconds"], r["dit_executions"], r["s_per_dit_execution"], mib(r["estimate"]),
             mib(r["measured_peak"]), r["estimate_over_measured"], mib(r["sum_of_process_peaks"]),
             mib(r["first_pass_peak"]) if r.get("first_pass_peak") is not None else float("nan"),
             "yes" if r["finite"] else "NO"] for r in results]
    return bench.format_table(["request", "seconds", "dit_decoder executions", "s / execution", "estimate (MiB)",
                               "measured peak (MiB)", "estimate ÷ measured", "sum of process peaks (MiB)",
                               "first request of its endpoint (MiB)", "finite"], rows, "Requests through Triton")


def goals(report: Mapping[str, Any]) -> list[list[Any]]:
    """``[goal, figure, bound, met]`` rows of the issue's goals."""
    full, tiny, read = report["serving"], report["tiny"], report["read"]
    rows: list[list[Any]] = []
    if tiny["ready_s"] != full["ready_s"]:  # a tiny-checkpoint baseline was measured
        extra_ready = full["ready_s"] - tiny["ready_s"]
        rows.append(["(ready − tiny ready) ÷ one read of the files", extra_ready / read["first_read_s"], "≤ 2"])
        worst_weights = max((g for g in full["steady_over_weights"].values() if g == g), default=float("nan"))
        rows.append(["max over processes: (steady − tiny steady) ÷ weights", worst_weights, "≤ 1.25"])
    worst_peak = max(full["peak_over_steady"].values())
    rows.append(["max over processes: peak at load ÷ steady", worst_peak, "≤ 1.5"])
    ratios = [r["estimate_over_measured"] for r in report["requests"]]
    rows.append(["admission estimate ÷ measured peak (min)", min(ratios), "≥ 1.0"])
    rows.append(["admission estimate ÷ measured peak (max)", max(ratios), "≤ 1.5"])
    rows.append(["every request's audio finite", all(r["finite"] for r in report["requests"]), "True"])
    rows.append(["identical requests, identical audio", report["identical"], "True"])
    return [[goal, value, bound, _met(value, bound)] for goal, value, bound in rows]


def _met(value: Any, bound: str) -> str:
    if isinstance(value, bool):
        return "met" if value else "MISSED"
    op, limit = bound.split()
    return "met" if (value <= float(limit) if op == "≤" else value >= float(limit)) else "MISSED"


def environment() -> str:
    return (f"machine: {machine_summary()}; "
            f"python {platform.python_version()}, torch {torch.__version__}, tritonclient {version('tritonclient')}, "
            f"tritonserver 2.51.0 (nvidia-pytriton {version('nvidia-pytriton')})")


# ---------------------------------------------------------------------------------- run
def serve_and_measure(plan: Plan, ckpt: Path, weights: Mapping[str, int], report: dict[str, Any]) -> str:
    """Sections 4-5: tiny baseline start, full start, one request per task."""
    lora_dir = plan.workdir / "loras"
    if not (lora_dir / LORA_NAME).exists():
        write_tiny_lora(ckpt, lora_dir / LORA_NAME, rank=plan.lora_rank)
    if plan.smoke or not plan.baseline:  # the smoke model is the tiny one: it is its own baseline
        tiny = None
    else:
        tiny = start_server(write_tiny_checkpoint(plan.workdir / "tiny_checkpoint"), plan.workdir / "tiny_deploy",
                            plan, lora_dir=None)
        tiny.server.stop()
    cache = "dropped (fadvise)" if drop_page_cache(weight_files(ckpt)) else "warm"
    full = start_server(ckpt, plan.workdir / "deploy", plan, lora_dir=lora_dir)
    tiny = tiny or replace(full, steady={k: 0 for k in full.steady})
    try:
        loads = model_load_seconds(full.server.log_text())
        dims = adm.ModelDims.from_dir(ckpt)
        count = token_count(plan.workdir / "deploy" / "assets")
        first: dict[str, float] = {}
        if plan.warm_pass:
            for r in requests(plan):
                first[r.label] = run_request(full, r, dims, count)["measured_peak"]
        results = [{**run_request(full, r, dims, count), "first_pass_peak": first.get(r.label)}
                   for r in requests(plan)]
    finally:
        full.server.stop()
    warm_ready_s = None
    if plan.warm_restart:
        again = start_server(ckpt, plan.workdir / "deploy", plan, lora_dir=lora_dir, settle_s=0.0)
        warm_ready_s = again.ready_s
        again.server.stop()
    identical = bool(np.array_equal(results[0]["audio"], results[1]["audio"]))
    for r in results:
        r.pop("audio")
    report["tiny"] = {"ready_s": tiny.ready_s, "steady": tiny.steady}
    report["serving"] = {
        "ready_s": full.ready_s, "page_cache_at_start": cache, "warm_restart_ready_s": warm_ready_s,
        "load_s": loads, "load_peak": full.load_peak, "steady": full.steady,
        "steady_over_weights": {k: (full.steady[k] - tiny.steady.get(k, 0)) / weights[k.split("#")[0]]
                                for k in full.processes if weights.get(k.split("#")[0])},
        "peak_over_steady": {k: full.load_peak[k] / full.steady[k] for k in full.processes if full.steady[k]}}
    report["requests"], report["identical"] = results, identical
    restart = f"; a second start with the page cache warm: ready in {warm_ready_s:.1f} s" if warm_ready_s else ""
    return "\n\n".join([format_serving(tiny, full, weights, loads),
                        f"Page cache before the start: {cache}{restart}.", format_requests(results),
                        f"Identical text2music requests gave bit-identical audio: {identical}"])


def run(plan: Plan, json_path: Path | None = None) -> dict[str, Any]:
    """Every section in order; the JSON is rewritten after each, so a failure keeps what came before."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, written_s = ensure_checkpoint(plan)
    report: dict[str, Any] = {"plan": {k: str(v) for k, v in asdict(plan).items()}, "environment": environment(),
                              "checkpoint_written_s": written_s}
    report["read"] = read_table(ckpt)
    bench.write_json(json_path, report)
    report["load"] = load_table(ckpt, plan.before)
    bench.write_json(json_path, report)
    weights = {name: runs["after"].get("weights", 0) for name, runs in report["load"].items()}
    sections = [format_read(report["read"]), format_load(report["load"])]
    print("\n\n".join(sections), flush=True)
    sections.append(serve_and_measure(plan, ckpt, weights, report))
    report["goals"] = goals(report)
    title = "Goals" + (" (smoke run: a tiny model, the verdicts mean nothing)" if plan.smoke else "")
    sections.append(bench.format_table(["goal", "figure", "bound", "verdict"], report["goals"], title))
    report["markdown"] = "\n\n".join([f"`{' '.join(sys.argv)}`; {report['environment']}", *sections])
    bench.write_json(json_path, report)
    return report


def reestimate(path: Path, workdir: Path) -> str:
    """The requests table and goals of a saved report with the admission estimates of the current
    constants: the estimate is a pure function of a request's shape and the checkpoint's sizes,
    so a recalibration can be judged against figures already measured."""
    report = json.loads(path.read_text())
    plan = Plan(workdir=workdir)
    dims = adm.ModelDims.from_dir(plan.checkpoint)
    count = token_count(workdir / "deploy" / "assets")
    by_label = {r.label: r for r in requests(plan)}
    for r in report["requests"]:
        r["estimate"] = estimate(by_label[r["label"]], dims, count)
        r["estimate_over_measured"] = r["estimate"] / r["measured_peak"]
    report["goals"] = goals(report)
    return "\n\n".join([format_requests(report["requests"]),
                        bench.format_table(["goal", "figure", "bound", "verdict"], report["goals"], "Goals")])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=bench.REPO / "artifacts" / "full_size",
                        help="where the checkpoint and repositories go (reused between runs)")
    parser.add_argument("--before", default=None, help="git revision whose loader to measure beside this one")
    parser.add_argument("--smoke", action="store_true", help="the same path on a 2-block, 32-wide model, short audio")
    parser.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the tiny-checkpoint start and the warm restart (their goals are then not judged)")
    parser.add_argument("--reestimate", type=Path, default=None,
                        help="recompute a saved --json report's admission estimates with the current constants")
    args = parser.parse_args(argv)
    if args.reestimate is not None:
        print(reestimate(args.reestimate, args.workdir))
        return 0
    plan = smoke_plan(args.workdir) if args.smoke else Plan(workdir=args.workdir)
    plan = replace(plan, before=args.before)
    if args.no_baseline:
        plan = replace(plan, baseline=False, warm_restart=False)
    report = run(plan, args.json)
    print(report["markdown"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

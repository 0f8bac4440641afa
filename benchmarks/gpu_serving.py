"""One device, one run: ACE-Step served by Triton (torch runtime) against the same code in-process.

Everything is measured in ONE run on ONE device, so the ratios printed side by side compare like
with like (clocks, heat and driver are the same for every variant):

(a) **Triton end to end** (gRPC client → ``text2music`` endpoint → BLS → the torch-runtime
    components) against **the same compiled components called in-process**
    (:func:`acestep_triton.serving.torch_runtime.runtime_generator`: same runners, same shape
    buckets, no Triton), same request and seed: latency ratio (goal ≤ 1.10×) and the largest
    audio difference;
(b) Triton against **eager PyTorch with one DiT call per CFG branch** (upstream's way: the
    eager-sequential variant of ``gpu_eager_vs_optimized.py``, imported, on random weights of the
    served checkpoint's architecture): RTF at 27 and 60 steps for 60 s of audio (goal ≥ 3×);
(c) **throughput** at concurrency 1, 4, 8 for 10, 30 and 60 s requests (``load_client.py``'s
    levels: p50/p90/p99, server queue vs compute time per model), ``dit_decoder``
    inference_count vs execution_count (cross-request batching) and requests/s at 8 vs 1 (goal
    ≥ 3× for 10-30 s requests);
(d) **memory at peak**: ``torch.cuda.max_memory_allocated`` in-process, ``nvidia-smi`` for the
    device and the server's processes, host RSS.

Sub-commands (``scripts/gpu_serving_check.sh`` runs them, each in its own time box)::

    python benchmarks/gpu_serving.py placeholders DIR      # stand-ins for packages the GPU image lacks
    python benchmarks/gpu_serving.py build --checkpoint C --workdir W [--target gpu] [--endpoint-instances 8]
    python benchmarks/gpu_serving.py measure --checkpoint C --repository R --out DIR [--triton-root T] [--dry-run]

``measure --dry-run`` runs the same code on the CPU with tiny durations, step counts and
concurrency 1, 2 (the test suite does, against a real tritonserver). Results: ``DIR/gpu_serving.md``
(tables for ``RESULTS.md``) and ``DIR/gpu_serving.json``, rewritten after every section so a run
cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

import load_client as load  # noqa: E402  (benchmarks/ is on sys.path: the levels and their statistics)

ENDPOINT = "text2music"
TEXT2MUSIC_MODELS = ("text_encoder", "condition_encoder", "dit_decoder", "dcae_decoder", "vocoder", ENDPOINT)
"""What text2music calls (plus itself): the server loads only these (``dcae_encoder`` would be one
more process and model for nothing)."""

GOAL_TRITON_OVERHEAD = 1.10
GOAL_SPEEDUP_VS_EAGER = 3.0
GOAL_THROUGHPUT_RATIO = 3.0
GOAL_THROUGHPUT_MAX_SECONDS = 30.0
"""The throughput goal is for 10-30 s requests; longer ones are reported, not judged."""

RESULTS_STEM = "gpu_serving"


# ------------------------------------------------------------------------------- pure helpers
def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when either is missing or the denominator is not positive."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return numerator / denominator


def verdict(value: float, goal: float, at_most: bool, judged: bool = True) -> str:
    """``yes``/``no`` for a measured value against its goal; ``n/a`` when not judged or unmeasured."""
    if not judged or not math.isfinite(value):
        return "n/a"
    return "yes" if (value <= goal if at_most else value >= goal) else "no"


def nanmax(*values: float) -> float:
    """The largest finite value (NaN when there is none): peaks over samples that may be missing."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return max(finite) if finite else math.nan


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def parse_csv_numbers(text: str) -> list[list[float]]:
    """Rows of an ``nvidia-smi --format=csv,noheader,nounits`` answer; ``[N/A]`` fields become NaN."""
    rows = []
    for line in text.strip().splitlines():
        fields = []
        for item in line.split(","):
            try:
                fields.append(float(item.strip()))
            except ValueError:
                fields.append(math.nan)
        if fields:
            rows.append(fields)
    return rows


def stub_model_name(argv: Sequence[str]) -> str | None:
    """The model a Python-backend stub process serves, from its command line: the stub's first
    argument is ``<repository>/<model>/<version>/model.py``."""
    if len(argv) < 2 or not argv[0].endswith("triton_python_backend_stub"):
        return None
    parts = Path(argv[1]).parts
    return parts[-3] if len(parts) >= 3 and parts[-1] == "model.py" else None


def set_instance_count(config_text: str, count: int) -> str:
    """A rendered ``config.pbtxt`` with its one instance group's count set to ``count``.

    Why: the endpoint definition fixes 2 text2music instances, and a decoupled endpoint instance
    runs one request at a time, so concurrency 8 needs 8 of them (each its own process, sampling
    on the GPU). The build has no option for it; the config is parsed and re-written with
    Triton's own protobuf, so nothing else in it changes.
    """
    from google.protobuf import text_format

    from acestep_triton.export.render import check_config

    if count < 1:
        raise ValueError(f"instance count must be >= 1, got {count}")
    config = check_config(config_text)
    if len(config.instance_group) != 1:
        raise ValueError(f"{config.name}: expected one instance group, found {len(config.instance_group)}")
    config.instance_group[0].count = count
    return (f"# Rendered by acestep_triton.export.render; instance count set to {count} by "
            f"benchmarks/gpu_serving.py.\n" + text_format.MessageToString(config))


def throughput_ratio(levels: Sequence[Mapping[str, Any]]) -> float:
    """Requests/s at the highest concurrency level over requests/s at concurrency 1."""
    by_level = {lv["concurrency"]: lv for lv in levels}
    if 1 not in by_level or not by_level:
        return math.nan
    return ratio(by_level[max(by_level)]["throughput_rps"], by_level[1]["throughput_rps"])


def throughput_rows(levels_by_duration: Mapping[float, Sequence[Mapping[str, Any]]], judged: bool
                    ) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the throughput summary: requests/s per concurrency level for each
    request duration, the ratio of the highest level to concurrency 1, the goal (for requests up
    to 30 s), and the ``dit_decoder`` rows per execution at the highest level (Triton merging)."""
    concurrencies = sorted({lv["concurrency"] for levels in levels_by_duration.values() for lv in levels})
    top = concurrencies[-1] if concurrencies else 0
    headers = ["request s", *(f"req/s @{c}" for c in concurrencies), f"@{top} vs @1", "goal", "met",
               f"DiT rows/exec @{top}"]
    rows = []
    for duration, levels in sorted(levels_by_duration.items()):
        by_level = {lv["concurrency"]: lv for lv in levels}
        scale = throughput_ratio(levels)
        in_scope = duration <= GOAL_THROUGHPUT_MAX_SECONDS
        rows.append([f"{duration:g}", *(by_level[c]["throughput_rps"] if c in by_level else math.nan
                                        for c in concurrencies),
                     scale, f">= {GOAL_THROUGHPUT_RATIO:g}" if in_scope else "(reported)",
                     verdict(scale, GOAL_THROUGHPUT_RATIO, at_most=False, judged=judged and in_scope),
                     by_level[top]["dit"]["rows_per_execution"] if top in by_level else math.nan])
    return headers, rows


def dit_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float]:
    """``dit_decoder`` work of a level: BLS requests, batch rows (inference_count) and executions."""
    requests = after["requests"] - before["requests"]
    rows = after["inferences"] - before["inferences"]
    executions = after["executions"] - before["executions"]
    return {"requests": requests, "inferences": rows, "executions": executions,
            "rows_per_execution": ratio(rows, executions), "requests_per_execution": ratio(requests, executions)}


# ------------------------------------------------------------------------------- placeholders
PLACEHOLDERS: dict[str, str] = {
    "soundfile": '''"""Placeholder written by benchmarks/gpu_serving.py: this machine has no soundfile (libsndfile).

The serving code imports soundfile at module level to read and write audio files; text2music
reads and writes none, so the module only has to exist. Any use raises.
"""

__acestep_placeholder__ = True


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("soundfile is not installed here (placeholder from benchmarks/gpu_serving.py)")


read = write = info = SoundFile = _unavailable
''',
    "cutlet": '''"""Placeholder written by benchmarks/gpu_serving.py: this machine has no cutlet (Japanese romaji).

Real romanisation needs cutlet, fugashi and unidic-lite, a 47 MB dictionary that does not fit
the files a bare GPU machine can be given. The lyric tokenizer's start-up warm-up romanises one
Japanese word; this passes text through unchanged. The benchmark's lyrics are English, so its
token ids are the real ones; Japanese lyric lines would get other ids here. Timing only, never
serving.
"""

__acestep_placeholder__ = True


class Cutlet:
    def romaji(self, text):
        return text
''',
}
"""Packages a bare GPU image may lack that the serving code imports, but text2music with
English lyrics never really uses: module sources written only where the real one is missing."""


def write_placeholders(folder: Path, names: Iterable[str] = tuple(PLACEHOLDERS)) -> list[str]:
    """Write a placeholder package into ``folder`` for each of ``names`` not importable otherwise.

    Files, not ``sys.modules`` entries: the Triton model processes import them too (``folder``
    goes on their ``PYTHONPATH``). ``folder`` is cleared first, so a placeholder of an earlier run
    never hides a real package installed since.
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    importlib.invalidate_caches()
    written = []
    for name in names:
        if bench.importable(name):
            continue
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(PLACEHOLDERS[name])
        written.append(name)
    return written


def active_placeholders() -> list[str]:
    """Which of :data:`PLACEHOLDERS` are stand-ins here (ours, or acestep_bench's soundfile stub),
    without importing anything new: recorded with the results so no reader mistakes them."""
    active = []
    for name in PLACEHOLDERS:
        module = sys.modules.get(name)
        if module is not None:
            if getattr(module, "__acestep_placeholder__", False) or getattr(module, "__acestep_stub__", False):
                active.append(name)
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is not None and origin.is_file() and "__acestep_placeholder__" in origin.read_text(errors="replace"):
            active.append(name)
    return active


# ------------------------------------------------------------------------------- build
def build(checkpoint: Path, workdir: Path, target: str, endpoint_instances: int | None, threads: int) -> Path:
    """The deployment under test: torch runtime, the text2music endpoint only, ``endpoint_instances``
    endpoint instances (None: as rendered). Returns the repository."""
    from acestep_triton.serving.deploy import build_deployment

    deployment = build_deployment(checkpoint, workdir, target=target, runtime="torch", endpoints=[ENDPOINT],
                                  intra_op_threads=threads)
    if endpoint_instances:
        config = deployment.repository / ENDPOINT / "config.pbtxt"
        config.write_text(set_instance_count(config.read_text(), endpoint_instances))
    return deployment.repository


# ------------------------------------------------------------------------------- memory
def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (the server, its Python stubs, their compile workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class MemorySampler(threading.Thread):
    """Samples memory every ``interval`` s while the run goes on, keeping peaks.

    GPU: ``nvidia-smi`` (whole device, and per process where the driver lists processes: a
    sandboxed machine may list none); host: RSS of this process and of the server's process tree,
    per served model. Sampling, not tracing: a peak shorter than the interval can be missed.
    """

    def __init__(self, interval: float) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.interval = interval
        self.nvidia_smi = shutil.which("nvidia-smi")
        self.server_pid: Callable[[], int | None] = lambda: None
        self.self_reserved: Callable[[], float] = lambda: math.nan
        self.peaks: dict[str, float] = {}
        self.model_rss: dict[str, float] = {}
        self.model_gpu: dict[str, float] = {}
        self.baseline_gpu_mib = math.nan
        self.samples = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def _smi(self, query: str) -> list[list[float]]:
        if self.nvidia_smi is None:
            return []
        try:
            done = subprocess.run([self.nvidia_smi, query, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return parse_csv_numbers(done.stdout) if done.returncode == 0 else []

    def gpu_used_mib(self) -> float:
        rows = self._smi("--query-gpu=memory.used")
        return rows[0][0] if rows else math.nan

    def _peak(self, key: str, value: float) -> None:
        self.peaks[key] = nanmax(self.peaks.get(key, math.nan), value)

    def sample(self) -> None:
        used = self.gpu_used_mib()
        apps = {int(r[0]): r[1] for r in self._smi("--query-compute-apps=pid,used_memory")
                if len(r) >= 2 and math.isfinite(r[0])}
        server = self.server_pid()
        tree = process_tree(server) if server else []
        with self._lock:
            self.samples += 1
            self._peak("gpu_used_mib", used)
            self._peak("self_rss_mib", _rss_mib(os.getpid()))
            self._peak("self_gpu_process_mib", apps.get(os.getpid(), math.nan))
            if not tree:
                return
            # per model: the sum over its instances' processes (8 text2music stubs, say)
            rss: dict[str, float] = {}
            gpu: dict[str, float] = {}
            for pid in tree:
                model = stub_model_name(_argv(pid)) or ("tritonserver" if pid == server else "other")
                value = _rss_mib(pid)
                rss[model] = rss.get(model, 0.0) + (0.0 if math.isnan(value) else value)
                if pid in apps:
                    gpu[model] = gpu.get(model, 0.0) + apps[pid]
            for model, value in rss.items():
                self.model_rss[model] = nanmax(self.model_rss.get(model, math.nan), value)
            for model, value in gpu.items():
                self.model_gpu[model] = nanmax(self.model_gpu.get(model, math.nan), value)
            self._peak("server_rss_mib", sum(rss.values()))
            if gpu:  # only where the driver lists the server's processes
                self._peak("server_gpu_process_mib", sum(gpu.values()))
            self._peak("server_gpu_estimate_mib", used - self.baseline_gpu_mib - self.self_reserved())

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.baseline_gpu_mib = self.gpu_used_mib()
        super().start()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=15)
        self.sample()


# ------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What one run measures. ``for_args`` picks the GPU defaults, or tiny ones for a dry run."""

    device: str
    dry_run: bool
    e2e_seconds: float
    steps: list[int]
    repeats: int
    warm_steps: int
    load_durations: list[float]
    concurrency: list[int]
    load_steps: int
    requests: int | None
    time_budget_s: float
    request_timeout_s: float
    threads: int

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        dry = args.dry_run

        def pick(value: Any, gpu: Any, cpu: Any) -> Any:
            return value if value is not None else (cpu if dry else gpu)

        def numbers(text: str, kind: type) -> list[Any]:
            return [kind(v) for v in str(text).split(",") if v.strip()]

        concurrency = numbers(pick(args.concurrency, "1,4,8", "1,2"), int)
        if 1 not in concurrency:
            raise SystemExit("error: --concurrency must include 1 (the throughput ratio is against it)")
        return cls(device=args.device or ("cpu" if dry else "cuda"), dry_run=dry,
                   e2e_seconds=pick(args.e2e_seconds, 60.0, 2.0), steps=numbers(pick(args.steps, "27,60", "2,3"), int),
                   repeats=pick(args.repeats, 3, 1), warm_steps=pick(args.warm_steps, 4, 2),
                   load_durations=numbers(pick(args.load_durations, "10,30,60", "1,2"), float),
                   concurrency=sorted(set(concurrency)), load_steps=pick(args.load_steps, 27, 2),
                   requests=pick(args.requests, None, 2), time_budget_s=pick(args.time_budget, 420.0, 240.0),
                   request_timeout_s=pick(args.request_timeout, 180.0, 120.0),
                   threads=pick(args.threads, 0, 1))


def request_params(seconds: float, steps: int, seed: int = 42) -> Any:
    """The (a)/(b) request: the load mix's first prompt (with lyrics), one fixed seed."""
    from acestep_client.params import GenerationParams

    prompt, lyrics = load.PROMPTS[0]
    return GenerationParams(prompt=prompt, lyrics=lyrics, audio_duration=seconds, infer_step=steps,
                            manual_seeds=str(seed))


def dit_counts(url: str) -> dict[str, int]:
    """``dit_decoder``'s cumulative counters from Triton's statistics: BLS requests (success),
    batch rows run (inference_count) and executions (execution_count)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        model = client.get_inference_statistics(model_name="dit_decoder", as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {"requests": int(model.get("inference_stats", {}).get("success", {}).get("count", 0)),
            "inferences": int(model.get("inference_count", 0)), "executions": int(model.get("execution_count", 0))}


# ------------------------------------------------------------------------------- the three paths
class CudaPeaks:
    """Device memory per path: what its weights hold (allocated after it loaded) and the highest
    ``max_memory_allocated`` above the allocation at the start of each of its calls (activations,
    graph pools). Peak statistics are reset per call, so the process-wide peak is kept here."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device
        self.weights: dict[str, float] = {}
        self.above: dict[str, float] = {}
        self.process_peak = math.nan

    def allocated(self) -> float:
        return self.torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else math.nan

    def call(self, label: str, fn: Callable[[], Any]) -> Any:
        if not self.cuda:
            return fn()
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        start = self.torch.cuda.memory_allocated(self.device)
        result = fn()
        self.torch.cuda.synchronize(self.device)
        peak = self.torch.cuda.max_memory_allocated(self.device)
        self.above[label] = nanmax(self.above.get(label, math.nan), (peak - start) / 2**20)
        self.process_peak = nanmax(self.process_peak, peak / 2**20)
        return result

    def peak(self, label: str) -> float:
        return self.weights.get(label, math.nan) + self.above.get(label, math.nan)


class InProcess:
    """The in-process twin of the deployment: the same compiled runners, no Triton."""

    def __init__(self, checkpoint: Path, device: str, peaks: CudaPeaks) -> None:
        from acestep_triton.serving.torch_runtime import runtime_generator

        self.peaks = peaks
        before = peaks.allocated()
        started = time.perf_counter()
        self.generator = runtime_generator(checkpoint, device=device)
        self.load_s = time.perf_counter() - started
        peaks.weights["in-process"] = peaks.allocated() - before

    def dit_calls(self) -> int:
        return int(getattr(self.generator.denoiser, "calls", -1))

    def generate(self, params: Any) -> tuple[Any, float, int]:
        """(audio [B, 2, N] numpy, seconds, DiT calls); the audio is on the host when timed, as
        Triton's is when the client has it."""
        before_calls = self.dit_calls()

        def run() -> tuple[Any, float]:
            started = time.perf_counter()
            audio = self.generator.generate(params).audio.float().cpu().numpy()
            return audio, time.perf_counter() - started

        audio, elapsed = self.peaks.call("in-process", run)
        return audio, elapsed, self.dit_calls() - before_calls

    def token_counts(self, prompt: str, lyrics: str) -> tuple[int, int]:
        """(prompt tokens, lyric tokens) of a request, as its DiT conditions will have them."""
        from acestep_triton.sampling.conditions import lyric_inputs

        ids, _ = self.generator.prompt_tokenizer([prompt])
        lyric_ids, _ = lyric_inputs(self.generator.tokenize_lyrics(lyrics))
        return int(ids.shape[1]), int(lyric_ids.shape[1])


class EagerBaseline:
    """Upstream's way on the same device: eager PyTorch, one DiT call per CFG branch.

    This is ``gpu_eager_vs_optimized.py``'s eager-sequential variant (its denoiser, branch
    splitter, call counter and timed ``generate``, imported), on random weights of the served
    checkpoint's architecture built directly on the device, conditioned with the served request's
    token counts and sampler settings. As there, prompt encoding is not timed and the DCAE and
    vocoder run in the model dtype (bf16 on a GPU, as upstream).
    """

    def __init__(self, checkpoint: Path, device: str, text_tokens: int, lyric_tokens: int, config: Any,
                 peaks: CudaPeaks, seed: int = 0) -> None:
        import torch

        from acestep_triton.checkpoint import DCAE_DIR, TRANSFORMER_DIR, VOCODER_DIR, CheckpointLayout
        from acestep_triton.codec import AudioCodec
        from acestep_triton.export.full_random import FullSizeConfigs
        from acestep_triton.sampling import build_conditions

        self.gpu = importlib.import_module("gpu_eager_vs_optimized")
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.seed = seed
        layout = CheckpointLayout(checkpoint)
        configs = FullSizeConfigs(transformer=layout.read_config(TRANSFORMER_DIR), dcae=layout.read_config(DCAE_DIR),
                                  vocoder=layout.read_config(VOCODER_DIR))
        self.peaks = peaks
        before = peaks.allocated()
        started = time.perf_counter()
        models = self.gpu.build_random_models(self.device, self.dtype, seed=seed, configs=configs,
                                              parts=("transformer", "dcae_decoder", "vocoder"))
        self.build_s = time.perf_counter() - started
        self.layers = int(models.transformer.num_layers)
        ids, mask, lyric_ids, lyric_mask, states = self.gpu.fixed_inputs(models.transformer, text_tokens,
                                                                         lyric_tokens, self.device, seed)
        base = self.gpu.BenchDenoiser(models.transformer, models.dcae_decoder, models.vocoder, self.dtype, states)
        self.codec = AudioCodec(base.encode_mel, base.decode_latents, base.vocode, models.vocoder.mel_transform,
                                overlapped_decode=True)
        self.counter = self.gpu.CallCounter(models.transformer.decode)
        self.variant = self.gpu.Variant("eager-sequential",
                                        base.with_decode(self.gpu.SequentialBranches(self.counter, items=1)),
                                        False, self.counter, "PyTorch eager, one DiT call per CFG branch")
        with torch.inference_mode():
            self.conditions = build_conditions(base, ids, mask, lyric_ids, lyric_mask, config)
        peaks.weights["eager"] = peaks.allocated() - before

    def generate(self, seconds: float, config: Any) -> tuple[float, int, bool]:
        """(seconds: sampling loop + latents → audio, DiT calls, everything finite)."""
        from acestep_triton.sampling import latent_frames

        generator = self.torch.Generator().manual_seed(self.seed)
        noise = self.torch.randn(1, 8, 16, latent_frames(seconds), generator=generator).to(self.device)
        self.counter.calls = 0
        latents, audio, loop_s, decode_s = self.peaks.call("eager", lambda: self.gpu.generate(
            self.variant, self.conditions, noise, config, self.codec, seconds))
        finite = bool(self.torch.isfinite(latents).all() and self.torch.isfinite(audio).all())
        return loop_s + decode_s, self.counter.calls, finite


class TritonPath:
    """The deployment through its gRPC client, with the DiT calls counted from Triton's statistics."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from acestep_client.client import AceStepClient

        self.url = url
        self.client = AceStepClient(url)
        self.timeout_s = timeout_s

    def generate(self, params: Any) -> tuple[Any, float, int]:
        before = dit_counts(self.url)["requests"]
        started = time.perf_counter()
        result = self.client.generate(params, timeout_s=self.timeout_s)
        elapsed = time.perf_counter() - started
        return result.audio, elapsed, dit_counts(self.url)["requests"] - before


# ------------------------------------------------------------------------------- the report
@dataclass
class Report:
    """Markdown sections and JSON data, rewritten to ``out`` after every section."""

    out: Path
    data: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, markdown: str | None = None) -> None:
        self.data[key] = value
        if markdown:
            self.sections.append(markdown)
            print("\n" + markdown + "\n", flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.data.setdefault("notes", []).append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        bench.write_json(self.out / f"{RESULTS_STEM}.json", _json_safe(self.data))
        notes = "".join(f"- {n}\n" for n in self.data.get("notes", []))
        text = "\n\n".join(self.sections) + ("\n\nNotes:\n\n" + notes if notes else "") + "\n"
        (self.out / f"{RESULTS_STEM}.md").write_text(text)


def _json_safe(value: Any) -> Any:
    """NaN/inf as null (strict JSON readers refuse them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Deadline:
    """The run's time box: sections ask before they start and are skipped (noted) when it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------- the sections
def measure_end_to_end(plan: Plan, triton: TritonPath | None, inproc: InProcess, eager: EagerBaseline,
                       report: Report, deadline: Deadline) -> None:
    """(a) and (b): the same request at each step count through Triton, in-process (compiled) and
    eager-sequential, ``repeats`` times interleaved (so drifts hit every path alike)."""
    import numpy as np

    from acestep_triton.pipeline import sampler_config

    seconds = plan.e2e_seconds
    runs: dict[tuple[str, int], list[float]] = {}
    calls: dict[tuple[str, int], int] = {}
    diffs: dict[int, float] = {}
    finite = True
    done_repeats, repeat_s = 0, 0.0
    for repeat in range(plan.repeats):
        # keep about a third of the budget for (c)
        if repeat > 0 and deadline.left() - repeat_s < plan.time_budget_s / 3:
            report.note(f"(a)/(b): stopped after {repeat} of {plan.repeats} repeats (time budget)")
            break
        started = time.perf_counter()
        for steps in plan.steps:
            params = request_params(seconds, steps)
            audio_local, t, n = inproc.generate(params)
            runs.setdefault(("in-process", steps), []).append(t)
            calls[("in-process", steps)] = n
            if triton is not None:
                audio_served, t, n = triton.generate(params)
                runs.setdefault(("Triton", steps), []).append(t)
                calls[("Triton", steps)] = n
                diffs[steps] = max(diffs.get(steps, 0.0), float(np.abs(audio_served - audio_local).max()))
            t, n, ok = eager.generate(seconds, sampler_config(params))
            runs.setdefault(("eager", steps), []).append(t)
            calls[("eager", steps)] = n
            finite = finite and ok and bool(np.isfinite(audio_local).all())
        done_repeats, repeat_s = repeat + 1, time.perf_counter() - started

    names = {"Triton": "Triton (gRPC → BLS → compiled torch)", "in-process": "in-process (same compiled runners)",
             "eager": "eager PyTorch, sequential CFG"}
    rows, per_steps = [], {}
    for steps in plan.steps:
        p50 = {path: median(runs.get((path, steps), [])) for path in names}
        per_steps[steps] = {
            "seconds": seconds, "steps": steps,
            **{f"{path}_s": runs.get((path, steps), []) for path in names},
            **{f"{path}_p50_s": p50[path] for path in names},
            **{f"{path}_rtf": ratio(seconds, p50[path]) for path in names},
            **{f"{path}_dit_calls": calls.get((path, steps), -1) for path in names},
            "triton_vs_inprocess": ratio(p50["Triton"], p50["in-process"]),
            "triton_speedup_vs_eager": ratio(p50["eager"], p50["Triton"]),
            "inprocess_speedup_vs_eager": ratio(p50["eager"], p50["in-process"]),
            "max_abs_audio_diff": diffs.get(steps, math.nan),
        }
        for path, label in names.items():
            series = runs.get((path, steps), [])
            rows.append((label, steps, len(series), p50[path], bench.percentile(series, 90), ratio(seconds, p50[path]),
                         calls.get((path, steps), "n/a"), ratio(p50[path], p50["in-process"]),
                         ratio(p50["eager"], p50[path])))
    judged = not plan.dry_run
    table = bench.format_table(("path", "steps", "runs", "p50 s", "p90 s", "RTF", "DiT calls", "vs in-process",
                                "speed-up vs eager"), rows,
                               f"(a)+(b) text2music end to end: {seconds:g} s of audio, batch 1, same seed")
    a_rows = [(s, v["Triton_p50_s"], v["in-process_p50_s"], v["triton_vs_inprocess"], f"<= {GOAL_TRITON_OVERHEAD:g}",
               verdict(v["triton_vs_inprocess"], GOAL_TRITON_OVERHEAD, True, judged), v["max_abs_audio_diff"])
              for s, v in per_steps.items()]
    a_table = bench.format_table(("steps", "Triton p50 s", "in-process p50 s", "Triton / in-process", "goal", "met",
                                  "max abs audio diff"), a_rows, "(a) Triton vs the same components in-process")
    b_rows = [(s, v["eager_rtf"], v["Triton_rtf"], v["in-process_rtf"], v["triton_speedup_vs_eager"],
               f">= {GOAL_SPEEDUP_VS_EAGER:g}",
               verdict(v["triton_speedup_vs_eager"], GOAL_SPEEDUP_VS_EAGER, False, judged))
              for s, v in per_steps.items()]
    b_table = bench.format_table(("steps", "eager RTF", "Triton RTF", "in-process RTF", "Triton speed-up", "goal",
                                  "met"), b_rows, "(b) Triton + compiled torch vs eager sequential CFG")
    explain = ("Latency: request sent → audio on the host (Triton: the gRPC client's whole request; in-process: "
               "`generate` + copy to the host; eager: sampling loop + DCAE decode + vocoder, prompt encoding not "
               "timed). RTF = audio seconds / latency. Medians over the interleaved runs.")
    report.add("a_b_end_to_end", {"per_steps": per_steps, "repeats": done_repeats, "finite": finite,
                                  "triton_measured": triton is not None},
               "\n\n".join((table, a_table, b_table, explain)))


def measure_load(plan: Plan, url: str, report: Report, deadline: Deadline) -> None:
    """(c): per request duration, an unmeasured warm-up level at the highest concurrency (every
    batch shape the level will merge into gets compiled and captured), then each level."""
    top = max(plan.concurrency)
    by_duration: dict[float, list[dict[str, Any]]] = {}
    texts: list[str] = []
    index = 1
    for duration in plan.load_durations:
        if deadline.left() < 20:
            report.note(f"(c): {duration:g} s requests skipped (time budget)")
            continue
        started = time.perf_counter()
        warm = asyncio.run(load.run_level(url, ENDPOINT, top, top, [duration], plan.load_steps,
                                          plan.request_timeout_s, first_index=100_000))
        warm_s = time.perf_counter() - started
        if warm["errors"]:
            report.note(f"(c) warm-up at {duration:g} s failed: {warm['error_messages']}")
        levels = []
        for concurrency in plan.concurrency:
            if deadline.left() < 10:
                report.note(f"(c): {duration:g} s at concurrency {concurrency} skipped (time budget)")
                break
            total = plan.requests if plan.requests is not None else max(2 * concurrency, 4)
            before = dit_counts(url)
            level = asyncio.run(load.run_level(url, ENDPOINT, concurrency, total, [duration], plan.load_steps,
                                               plan.request_timeout_s, index))
            level["dit"] = dit_delta(before, dit_counts(url))
            level["warmup_s"] = warm_s
            index += total
            levels.append(level)
            print(f"(c) {duration:g} s, concurrency {concurrency}: {level['throughput_rps']:.3g} req/s, "
                  f"p50 {level['p50_s']:.3g} s, DiT rows/exec {level['dit']['rows_per_execution']:.3g}",
                  file=sys.stderr, flush=True)
        if not levels:
            continue
        by_duration[duration] = levels
        lines: list[str] = [f"**{duration:g} s requests**, {plan.load_steps} steps (unmeasured warm-up level at "
                            f"concurrency {top} first: {warm_s:.1f} s)", ""]
        load.print_tables(levels, out=lines.append)
        batching = [(lv["concurrency"], lv["dit"]["requests"], lv["dit"]["inferences"], lv["dit"]["executions"],
                     lv["dit"]["requests_per_execution"], lv["dit"]["rows_per_execution"]) for lv in levels]
        lines += ["", bench.format_table(("concurrency", "DiT requests", "inference_count (rows)", "execution_count",
                                          "requests/exec", "rows/exec"), batching,
                                         "dit_decoder batching (Triton statistics)")]
        texts.append("\n".join(lines))
    headers, rows = throughput_rows(by_duration, judged=not plan.dry_run)
    summary = bench.format_table(headers, rows, f"(c) throughput: concurrency {plan.concurrency} vs 1")
    ratios = {f"{d:g}": throughput_ratio(levels) for d, levels in by_duration.items()}
    errors = sum(lv["errors"] for levels in by_duration.values() for lv in levels)
    report.add("c_throughput", {"levels": {f"{d:g}": v for d, v in by_duration.items()},
                                "ratio_top_vs_1": ratios, "top_concurrency": top, "steps": plan.load_steps,
                                "errors": errors},
               "\n\n".join(["## (c) Throughput under concurrency", *texts, summary]))


def memory_section(sampler: MemorySampler, peaks: CudaPeaks | None, report: Report) -> None:
    """(d): peaks in MiB; on a CPU the device rows are n/a and host RSS carries the numbers."""
    sampler.stop()
    nan = math.nan
    gpu = {"inprocess_weights_mib": peaks.weights.get("in-process", nan) if peaks else nan,
           "inprocess_peak_mib": peaks.peak("in-process") if peaks else nan,
           "eager_weights_mib": peaks.weights.get("eager", nan) if peaks else nan,
           "eager_peak_mib": peaks.peak("eager") if peaks else nan}
    values = {
        **gpu,
        "process_max_allocated_mib": peaks.process_peak if peaks else math.nan,
        "gpu_baseline_mib": sampler.baseline_gpu_mib,
        "gpu_used_peak_mib": sampler.peaks.get("gpu_used_mib", math.nan),
        "server_gpu_process_mib": sampler.peaks.get("server_gpu_process_mib", math.nan),
        "server_gpu_estimate_mib": sampler.peaks.get("server_gpu_estimate_mib", math.nan),
        "server_rss_mib": sampler.peaks.get("server_rss_mib", math.nan),
        "inprocess_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "model_rss_mib": dict(sampler.model_rss), "model_gpu_mib": dict(sampler.model_gpu),
        "samples": sampler.samples, "interval_s": sampler.interval,
    }
    rows = [
        ("in-process compiled runners: weights", gpu.get("inprocess_weights_mib"), "torch.cuda.memory_allocated"),
        ("in-process compiled runners: peak", gpu.get("inprocess_peak_mib"),
         "weights + max_memory_allocated above them per request"),
        ("eager baseline: weights", gpu.get("eager_weights_mib"), "torch.cuda.memory_allocated"),
        ("eager baseline: peak", gpu.get("eager_peak_mib"), "weights + max_memory_allocated above them per request"),
        ("this process, whole run", values["process_max_allocated_mib"], "torch.cuda.max_memory_allocated"),
        ("GPU memory.used, peak (all processes)", values["gpu_used_peak_mib"], "nvidia-smi, sampled"),
        ("GPU memory.used before the run", values["gpu_baseline_mib"], "nvidia-smi"),
        ("server processes on the GPU", values["server_gpu_process_mib"], "nvidia-smi per process (if listed)"),
        ("server on the GPU, estimate", values["server_gpu_estimate_mib"],
         "memory.used − before − this process's torch reserved (includes CUDA contexts)"),
        ("server processes, host RSS", values["server_rss_mib"], "/proc, sampled"),
        ("this process, host RSS", values["inprocess_rss_mib"], "getrusage"),
    ]
    rows += [(f"  {model}: host RSS", mib, "/proc, all its processes")
             for model, mib in sorted(sampler.model_rss.items())]
    rows += [(f"  {model}: GPU", mib, "nvidia-smi, all its processes")
             for model, mib in sorted(sampler.model_gpu.items())]
    report.add("d_memory", values, bench.format_table(("what", "peak MiB", "how"), rows,
                                                      f"(d) memory at peak ({sampler.samples} samples)"))


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


# ------------------------------------------------------------------------------- measure
class ServerStarter(threading.Thread):
    """Starts tritonserver in the background: its models load while this process loads its own."""

    def __init__(self, server: Any) -> None:
        super().__init__(name="tritonserver-start", daemon=True)
        self.server = server
        self.error: BaseException | None = None
        self.seconds = math.nan

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self.server.start()
        except BaseException as exc:  # reported by the caller, with the log tail
            self.error = exc
        self.seconds = time.perf_counter() - started


def triton_install(root: Path | None) -> Any:
    """The tritonserver to run: a carried ``nvidia-pytriton`` tree (``root`` holds ``pytriton/`` and
    ``nvidia_pytriton.libs/`` as in site-packages), else this environment's (``TritonInstall.locate``)."""
    from acestep_triton.serving.server import TritonInstall

    if root is None:
        return TritonInstall.locate()
    libs = root / "nvidia_pytriton.libs"
    return TritonInstall.from_root(root / "pytriton" / "tritonserver", libs_dir=libs if libs.is_dir() else None)


def describe(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    cuda = plan.device.startswith("cuda")
    info = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, "
            f"{os.cpu_count()} cores)", "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "numpy": np.__version__, "placeholders": active_placeholders(),
            "checkpoint": str(args.checkpoint), "repository": str(args.repository),
            "triton_root": str(args.triton_root) if args.triton_root else "this environment's nvidia-pytriton",
            "plan": plan.__dict__}
    try:
        info["tritonclient"] = importlib.metadata.version("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        info["tritonclient"] = "missing"
    return info


def measure_lora(plan: Plan, report: Report, deadline: Deadline) -> None:
    """(e), only with ``--lora``: what runtime LoRA adapters cost per DiT step on this device
    (``benchmarks/lora_runtime.py``: one DiT block at the real width, bf16 on a GPU, r = 16, 64,
    256 against none, every row or half the rows with the adapter). In-process: it measures the
    adapter arithmetic, not Triton."""
    import lora_runtime

    if deadline.left() < 30:
        report.note("(e) skipped: the time budget is spent")
        return
    cuda = plan.device.startswith("cuda")
    argv = ["--device", plan.device, "--dtype", "bf16" if cuda else "fp32", "--threads", "0",
            "--repeats", "2" if plan.dry_run else "10"]
    argv += ["--width", "256", "--frames", "8"] if plan.dry_run else ["--frames", "645"]
    try:
        texts = lora_runtime.tables(lora_runtime.parse_args(argv))
    except Exception as exc:  # optional: never lose the other sections to it
        report.note(f"(e) runtime LoRA failed: {type(exc).__name__}: {exc}")
        return
    report.add("e_lora", {"argv": argv}, "\n\n".join(["(e) runtime LoRA adapters (in-process)", *texts]))


def measure(args: argparse.Namespace) -> int:
    """Every section; 0 when all ran without errors (the goals are reported, not enforced).

    Order: the server starts in the background while this process loads and warms its own copy
    of the runners (their TorchInductor compilations land in the on-disk cache the server's
    models then hit) and builds the eager baseline; then warm-up requests through Triton for
    every shape measured, (a)+(b), (c), and (d) whatever happened before. A server that fails
    still leaves the in-process numbers, and the log tail is printed.
    """
    plan = Plan.for_args(args)
    deadline = Deadline(plan.time_budget_s)
    report = Report(args.out)
    bench.stub_soundfile_if_missing()
    import torch

    from acestep_triton.pipeline import sampler_config
    from acestep_triton.serving.server import TritonServer, tail

    if plan.threads > 0:
        torch.set_num_threads(plan.threads)  # as the served components have (dry run: 1 thread each)
    info = describe(plan, args)
    header = (f"Device: {info['device']}; Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), "
              f"numpy {info['numpy']}, tritonclient {info['tritonclient']}; placeholders: "
              f"{', '.join(info['placeholders']) or 'none'}"
              + ("; DRY RUN (tiny model, CPU): checks the code, says nothing about speed" if plan.dry_run else ""))
    report.add("meta", info, f"## GPU serving check\n\n{header}")

    sampler = MemorySampler(interval=0.5 if plan.dry_run else 1.0)
    sampler.start()
    server = TritonServer(args.repository, log_path=args.out / "tritonserver.log",
                          startup_timeout=args.server_timeout, install=triton_install(args.triton_root),
                          extra_args=["--model-control-mode=explicit",
                                      *(f"--load-model={m}" for m in TEXT2MUSIC_MODELS),
                                      f"--model-load-thread-count={len(TEXT2MUSIC_MODELS)}"])
    sampler.server_pid = lambda: server.pid
    starter = ServerStarter(server)
    starter.start()
    failures: list[str] = []
    peaks: CudaPeaks | None = None
    triton: TritonPath | None = None
    timings: dict[str, float] = {}
    try:
        device = torch.device(plan.device)
        peaks = CudaPeaks(device)
        inproc = InProcess(args.checkpoint, plan.device, peaks)
        timings["in-process runners: load"] = inproc.load_s
        if device.type == "cuda":
            sampler.self_reserved = lambda: torch.cuda.memory_reserved(device) / 2**20
        warm_durations = sorted({plan.e2e_seconds, *plan.load_durations})
        started = time.perf_counter()
        for seconds in warm_durations:
            inproc.generate(request_params(seconds, plan.warm_steps))
        timings["in-process runners: warm-up (compile, CUDA graphs)"] = time.perf_counter() - started
        prompt, lyrics = load.PROMPTS[0]
        text_tokens, lyric_tokens = inproc.token_counts(prompt, lyrics)
        eager = EagerBaseline(args.checkpoint, plan.device, text_tokens, lyric_tokens,
                              sampler_config(request_params(plan.e2e_seconds, plan.steps[0])), peaks)
        eager.generate(plan.e2e_seconds, sampler_config(request_params(plan.e2e_seconds, plan.warm_steps)))
        timings["eager baseline: build on the device"] = eager.build_s

        # wait for the server, keeping a quarter of the budget (at most 90 s) for the measurements
        starter.join(timeout=max(1.0, deadline.left() - min(90.0, plan.time_budget_s / 4)))
        if starter.is_alive():
            failures.append("tritonserver did not become ready within the time budget")
        elif starter.error is not None:
            failures.append(f"tritonserver failed to start: {starter.error}")
        else:
            timings["tritonserver: start until ready"] = starter.seconds
            triton = TritonPath(server.grpc_url, plan.request_timeout_s)
            started = time.perf_counter()
            try:
                for seconds in warm_durations:
                    triton.generate(request_params(seconds, plan.warm_steps))
                timings["tritonserver: warm-up requests"] = time.perf_counter() - started
            except Exception as exc:  # the in-process numbers still get measured and reported
                failures.append(f"a warm-up request through Triton failed: {type(exc).__name__}: {exc}")
                triton = None
        report.add("timings", timings, bench.format_table(
            ("phase", "s"), list(timings.items()), "set-up (loading, compiling, CUDA-graph capture)"))
        for failure in failures:
            report.note(failure)

        measure_end_to_end(plan, triton, inproc, eager, report, deadline)
        if triton is not None:
            measure_load(plan, server.grpc_url, report, deadline)
            if report.data["c_throughput"]["errors"]:
                failures.append(f"{report.data['c_throughput']['errors']} load requests failed")
        else:
            report.note("(c) skipped: no working server")
        if getattr(args, "lora", False):
            measure_lora(plan, report, deadline)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
        report.note(f"the run stopped early: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        try:
            memory_section(sampler, peaks, report)
        except Exception as exc:  # never lose the other sections to the memory table
            report.note(f"(d) failed: {type(exc).__name__}: {exc}")
        server.stop()
    goals_section(plan, report)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures and server.log_path is not None:
        print(f"--- tritonserver log, last lines ({server.log_path}) ---\n{tail(server.log_path, 60)}",
              file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    holders = sub.add_parser("placeholders", help="write stand-ins for missing packages (soundfile, cutlet)")
    holders.add_argument("folder", type=Path)
    build_cmd = sub.add_parser("build", help="the deployment under test (torch runtime, text2music only)")
    build_cmd.add_argument("--checkpoint", type=Path, required=True)
    build_cmd.add_argument("--workdir", type=Path, required=True)
    build_cmd.add_argument("--target", choices=("cpu", "gpu"), default="gpu")
    build_cmd.add_argument("--endpoint-instances", type=int, default=None,
                           help="text2music instances (one request at a time each; default: as rendered)")
    build_cmd.add_argument("--threads", type=int, default=0, help="torch threads per component (0: torch's default)")
    run = sub.add_parser("measure", help="(a)-(d) against a built repository")
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
    run.add_argument("--lora", action="store_true",
                     help="(e) runtime LoRA: extra time per DiT step at r=16,64,256 (benchmarks/lora_runtime.py)")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """``timeout`` stops a phase with SIGTERM: turn it into SystemExit so ``finally`` stops the
    server (started in its own session, it would outlive us otherwise)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "placeholders":
        written = write_placeholders(args.folder)
        print(f"placeholders: {', '.join(written) or 'none needed'} ({args.folder})")
        return 0
    if args.command == "build":
        print(build(args.checkpoint, args.workdir, args.target, args.endpoint_instances, args.threads))
        return 0
    return measure(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""Soak and fault test: mixed requests against a real tritonserver while faults are injected.

The server runs as ``acestep-triton serve`` does (``TritonServer(recover=True)``: a watchdog
reloads a model whose stub process died), so the kill phases measure that recovery.

Each **phase** sends the same mixed workload (text2music, retake, repaint, edit, extend,
audio2audio and a LoRA request, cycled) at a fixed concurrency through the typed client, with
its default retry policy and a deadline per request, and injects one fault once the first
request of the phase is sampling:

``baseline``        no fault; records each request's audio as the reference (same seeds, same audio)
``kill_endpoint``   ``kill -9`` of one endpoint (orchestrator) stub process
``kill_component``  ``kill -9`` of the ``dit_decoder`` stub process
``restart``         SIGTERM of the server (graceful drain), then a new server on the same ports
``disconnect``      a raw gRPC client that drops its connection mid-stream, beside the workload
``burst``           far more requests at once than the endpoints' queue policy admits, no retries
``leak``            (only when named) ``--leak-requests`` (1,000) requests of the same mix, no fault,
                    sampling every process's memory every ``--leak-sample-every`` requests: the
                    slope per process in MiB per 100 requests after ``--leak-warmup`` requests
                    (goal: at most 2), from each process's private memory (``RssAnon``: heap and
                    anonymous mappings; shared memory is counted once, as ``/dev/shm``)

Per phase it counts requests **sent**, answered with **audio**, answered with a **clear error**
(a :class:`ServerUnavailable` the client may retry, or a tagged server error), **lost** (no
answer by the deadline, or an error that says nothing), **wrong** (audio not finite, of another
shape, or not the baseline's audio for the same seeds), the client's **retries**, and the
seconds from the fault until a fresh request succeeds again (**ready again**). The goal: 0 lost,
0 wrong, and serving again within ``--recovery-bound`` seconds.

Everything is loopback and bounded: requests per phase, a deadline per request, a bound on
recovery. Usage::

    python benchmarks/soak.py [--url HOST:PORT] [--concurrency 4] [--requests 14] [--phases ...]

Without ``--url`` it builds the tiny checkpoint and a CPU repository and starts (and, for the
``restart`` phase, restarts) a tritonserver of its own. Against ``--url`` the server-side faults
(kills, restart) need this machine to own the server process, so only ``baseline``,
``disconnect`` and ``burst`` run there. The test suite runs a short form
(``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acestep_bench as bench

bench.ensure_project_importable()

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from process_memory import status_bytes  # noqa: E402

from acestep_client.client import (  # noqa: E402
    AceStepClient,
    AceStepError,
    GenerationTimeout,
    ServerError,
    ServerUnavailable,
)
from acestep_client.params import GenerationParams  # noqa: E402
from acestep_client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy  # noqa: E402
from acestep_triton.serving.faults import kill_stub  # noqa: E402
from acestep_triton.serving.health import SHM_DIR, stub_processes  # noqa: E402
from acestep_triton.serving.server import TritonServer  # noqa: E402

PHASES = ("baseline", "kill_endpoint", "kill_component", "restart", "disconnect", "burst")
LEAK = "leak"
"""The long phase (not in :data:`PHASES`; name it in ``--phases``)."""
LEAK_GOAL_MIB_PER_100 = 2.0
SERVER_FAULTS = frozenset({"kill_endpoint", "kill_component", "restart"})
PROMPT = "pop, upbeat, guitar, 120 BPM"
LYRICS = "[verse]\nfree as a bird\n[chorus]\nsing along"
SOAK_RETRY = DEFAULT_RETRY
"""The workload clients' retries: the client's defaults (issue 19: they must ride out any single
killed stub, and a restart, which reloads every model: about a minute on 2 busy cores)."""
OWN_LORA = ("tiny", 0.5)
"""The adapter of the server this script builds (served fused at 0.5 on the onnx runtime)."""
TOLERANCE = 1e-3
"""Largest difference from the baseline's audio still counted right (dynamic batching may merge
requests differently from one phase to the next; the DiT is padding-exact, so this is float noise)."""


@dataclass(frozen=True)
class Job:
    """One request of the workload: its endpoint, parameters and audio inputs."""

    name: str
    params: GenerationParams
    src_audio: bytes | None = None
    ref_audio: bytes | None = None


@dataclass
class PhaseResult:
    """The counts of one phase (see the module docstring)."""

    phase: str
    sent: int = 0
    audio: int = 0
    clear_error: int = 0
    lost: int = 0
    wrong: int = 0
    retries: int = 0
    ready_again_s: float | None = None
    wall_s: float = 0.0
    fast_rejections: int = 0
    errors: list[str] = field(default_factory=list)
    memory: dict[str, list[float]] = field(default_factory=dict)
    """``leak``: MiB per process (and ``/dev/shm``) at each sample; ``memory_at`` the requests sent then."""
    memory_at: list[int] = field(default_factory=list)
    slopes: dict[str, float] = field(default_factory=dict)
    """``leak``: MiB per 100 requests after the warm-up, per process."""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0 and self.sent == self.audio + self.clear_error


def _status_mib(pid: int, key: str) -> float:
    """A ``/proc/<pid>/status`` field in MiB; NaN for a process that is gone (a leak slope skips it)."""
    value = status_bytes(pid, key)
    return value / 2**20 if value else float("nan")


def memory_sample(server: Any) -> dict[str, float]:
    """Private memory (``RssAnon``, MiB) of tritonserver and of each stub by instance name, and the
    server's ``/dev/shm`` regions (allocated MiB). Stubs of the same instance (a reload) add up."""
    sample = {"tritonserver": _status_mib(server.pid, "RssAnon")}
    for stub in stub_processes(server.pid):
        sample[stub.instance] = sample.get(stub.instance, 0.0) + _status_mib(stub.pid, "RssAnon")
    shm = 0
    for path in SHM_DIR.iterdir():
        if path.name.startswith(server.shm_prefix):
            with contextlib.suppress(OSError):
                shm += path.stat().st_blocks * 512
    sample["/dev/shm"] = shm / 2**20
    return sample


def slope_per_100(at: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` over requests ``at``, in MiB per 100 requests."""
    x = np.asarray(at, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(y)
    if keep.sum() < 2 or np.ptp(x[keep]) == 0:
        return float("nan")
    return float(np.polyfit(x[keep], y[keep], 1)[0] * 100)


def workload(src_audio: bytes, *, duration: float, steps: int, lora: tuple[str, float] | None) -> list[Job]:
    """The mixed requests, one per task (plus LoRA ``(name, strength)`` when the server has one)."""
    def p(task: str, seed: int, **extra: Any) -> GenerationParams:
        return GenerationParams(task=task, prompt=PROMPT, lyrics=LYRICS, audio_duration=duration,
                                infer_step=steps, manual_seeds=str(seed), **extra)

    jobs = [
        Job("text2music", p("text2music", 11)),
        Job("retake", p("retake", 12, retake_seeds="5", retake_variance=0.5)),
        Job("repaint", p("repaint", 13, retake_seeds="6", repaint_start=0.2, repaint_end=0.6),
            src_audio=src_audio),
        Job("edit", p("edit", 14, retake_seeds="7", edit_target_prompt="rock, guitar",
                      edit_target_lyrics=LYRICS), src_audio=src_audio),
        Job("extend", p("extend", 15, retake_seeds="8", right_extend_length=0.5), src_audio=src_audio),
        Job("audio2audio", p("audio2audio", 16, ref_audio_strength=0.5), ref_audio=src_audio),
    ]
    if lora:
        jobs.append(Job("lora", p("text2music", 17, lora_name_or_path=lora[0], lora_weight=lora[1])))
    return jobs


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """A result item as WAV file bytes (what a user uploads as source audio)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio.T, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


class Soak:
    """Runs phases against one server. ``server`` (a :class:`TritonServer`) is needed for the
    server-side faults; ``restart`` replaces it with a new one on the same ports."""

    def __init__(self, url: str, *, server: Any = None, concurrency: int = 4, requests: int = 14,
                 duration: float = 1.0, steps: int = 3, deadline_s: float = 240.0,
                 recovery_bound_s: float = 120.0, lora: tuple[str, float] | None = None,
                 retry: RetryPolicy = SOAK_RETRY, leak_requests: int = 1000, leak_warmup: int = 200,
                 leak_sample_every: int = 50, log: Callable[[str], None] = print) -> None:
        self.url = url
        self.server = server
        self.concurrency = concurrency
        self.requests = requests
        self.duration = duration
        self.steps = steps
        self.deadline_s = deadline_s
        self.recovery_bound_s = recovery_bound_s
        self.lora = lora
        self.retry = retry
        self.leak_requests = leak_requests
        self.leak_warmup = leak_warmup
        self.leak_sample_every = leak_sample_every
        self.log = log
        self.jobs: list[Job] = []
        self.reference: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------- workload
    def prepare(self) -> None:
        """Generate the source audio the audio tasks start from."""
        client = AceStepClient(self.url, retry=self.retry)
        source = client.generate(GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=self.duration,
                                                  infer_step=self.steps, manual_seeds="3"),
                                 timeout_s=self.deadline_s)
        self.jobs = workload(wav_bytes(source.audio[0], source.sample_rate), duration=self.duration,
                             steps=self.steps, lora=self.lora)

    def _send(self, job: Job, result: PhaseResult, lock: threading.Lock, sampling: threading.Event,
              retry: RetryPolicy) -> str:
        """Send one job and count its outcome in ``result``; returns the outcome's name
        (``audio``, ``clear_error``, ``lost`` or ``wrong``)."""
        client = AceStepClient(self.url, retry=retry)
        retries = 0

        def on_retry(*_: Any) -> None:
            nonlocal retries
            retries += 1

        error = ""
        try:
            out = client.generate(job.params, src_audio=job.src_audio, ref_audio=job.ref_audio,
                                  on_progress=lambda *_: sampling.set(), timeout_s=self.deadline_s,
                                  on_retry=on_retry)
        except (ServerUnavailable, ServerError) as exc:
            clear = isinstance(exc, ServerUnavailable) or getattr(exc, "category", None) is not None
            outcome, error = ("clear_error" if clear else "lost"), f"{type(exc).__name__}: {exc}"
        except GenerationTimeout as exc:
            outcome, error = "lost", f"no answer: {exc}"
        except AceStepError as exc:
            outcome, error = "lost", f"{type(exc).__name__}: {exc}"
        else:
            audio = out.audio
            reference = self.reference.get(job.name)
            wrong = not np.isfinite(audio).all() or (reference is not None and (
                audio.shape != reference.shape or float(np.abs(audio - reference).max()) > TOLERANCE))
            outcome = "wrong" if wrong else "audio"
            if wrong:
                error = f"wrong audio {audio.shape}"
        with lock:
            result.retries += retries
            setattr(result, outcome, getattr(result, outcome) + 1)
            if error:
                result.errors.append(f"{job.name}: {error}"[:300])
            if outcome == "audio":
                self.reference.setdefault(job.name, out.audio)
        return outcome

    def _run_workload(self, result: PhaseResult, fault: Callable[[], None] | None,
                      retry: RetryPolicy | None = None, count: int | None = None,
                      concurrency: int | None = None) -> float | None:
        """Send the phase's requests; inject ``fault`` once one is sampling. Returns the fault's time."""
        lock = threading.Lock()
        sampling = threading.Event()
        count = self.requests if count is None else count
        jobs = [self.jobs[i % len(self.jobs)] for i in range(count)]
        fault_at: float | None = None
        with ThreadPoolExecutor(max_workers=concurrency or self.concurrency) as pool:
            futures = [pool.submit(self._send, job, result, lock, sampling, retry or self.retry) for job in jobs]
            result.sent = len(futures)
            if fault is not None:
                sampling.wait(self.deadline_s)
                fault_at = time.monotonic()
                fault()
            for future in futures:
                future.result()
        return fault_at

    def _ready_again(self, since: float) -> float | None:
        """Seconds from ``since`` until a fresh text2music request (no retries) succeeds."""
        params = GenerationParams(prompt=PROMPT, audio_duration=self.duration, infer_step=1, manual_seeds="1")
        client = AceStepClient(self.url, retry=NO_RETRY, connect_timeout=2.0)
        while time.monotonic() - since < self.recovery_bound_s:
            try:
                client.generate(params, timeout_s=30.0)
                return time.monotonic() - since
            except AceStepError:
                time.sleep(0.5)
        return None

    # ------------------------------------------------------------------------- phases
    def run(self, phases: Sequence[str]) -> list[PhaseResult]:
        if not self.jobs:
            self.prepare()
        results = []
        for phase in phases:
            if phase in SERVER_FAULTS and self.server is None:
                self.log(f"skipping {phase}: needs a server this process started")
                continue
            started = time.monotonic()
            result = getattr(self, f"_phase_{phase}")(PhaseResult(phase))
            result.wall_s = time.monotonic() - started
            self.log(f"{phase}: {json.dumps(asdict(result))[:400]}")
            results.append(result)
        return results

    def _phase_baseline(self, result: PhaseResult) -> PhaseResult:
        self.reference.clear()
        self._run_workload(result, None, count=max(self.requests, len(self.jobs)))
        return result

    def _kill_phase(self, result: PhaseResult, model: str) -> PhaseResult:
        fault_at = self._run_workload(result, lambda: kill_stub(self.server, model))
        result.ready_again_s = self._ready_again(fault_at) if fault_at is not None else None
        return result

    def _phase_kill_endpoint(self, result: PhaseResult) -> PhaseResult:
        return self._kill_phase(result, "text2music")

    def _phase_kill_component(self, result: PhaseResult) -> PhaseResult:
        return self._kill_phase(result, "dit_decoder")

    def _phase_restart(self, result: PhaseResult) -> PhaseResult:
        old = self.server

        def restart() -> None:
            old.stop()
            self.server = TritonServer(old.repository, grpc_port=old.grpc_port, http_port=old.http_port,
                                       metrics_port=old.metrics_port, log_path=old.log_path,
                                       startup_timeout=old.startup_timeout, stop_timeout=old.stop_timeout,
                                       extra_args=old.extra_args, recover=old.recover).start()

        fault_at = self._run_workload(result, lambda: threading.Thread(target=restart, daemon=True).start())
        result.ready_again_s = self._ready_again(fault_at) if fault_at is not None else None
        return result

    def _phase_disconnect(self, result: PhaseResult) -> PhaseResult:
        fault_at = self._run_workload(result, self._disconnecting_client)
        result.ready_again_s = self._ready_again(fault_at) if fault_at is not None else None
        return result

    def _disconnecting_client(self) -> None:
        """A raw stream whose client goes away after its first progress message (no cancel)."""
        progress = threading.Event()
        raw = grpcclient.InferenceServerClient(self.url)
        raw.start_stream(callback=lambda result=None, error=None: progress.set())
        job = self.jobs[0]
        long = GenerationParams.from_mapping({**job.params.to_dict(), "infer_step": 50})
        raw.async_stream_infer("text2music", AceStepClient.build_inputs(long), enable_empty_final_response=True)
        progress.wait(30.0)
        raw.close()  # drops the channel with the request in flight

    def _phase_leak(self, result: PhaseResult) -> PhaseResult:
        """The mix, ``leak_requests`` of it, sampling memory every ``leak_sample_every`` requests;
        the slope is fitted to the samples from ``leak_warmup`` requests on."""
        if self.server is None:
            self.log("leak: needs a server this process started (it reads the processes' memory)")
            return result
        sent = 0
        result.memory_at.append(0)
        for name, value in memory_sample(self.server).items():
            result.memory.setdefault(name, []).append(value)
        while sent < self.leak_requests:
            chunk = PhaseResult(LEAK)
            count = min(self.leak_sample_every, self.leak_requests - sent)
            self._run_workload(chunk, None, count=count)
            sent += count
            for name in ("sent", "audio", "clear_error", "lost", "wrong", "retries"):
                setattr(result, name, getattr(result, name) + getattr(chunk, name))
            result.errors += chunk.errors[:5]
            result.memory_at.append(sent)
            sample = memory_sample(self.server)
            for name in set(result.memory) | set(sample):
                series = result.memory.setdefault(name, [float("nan")] * (len(result.memory_at) - 1))
                series.append(sample.get(name, float("nan")))
            self.log(f"leak: {sent}/{self.leak_requests} sent; tritonserver {sample['tritonserver']:.0f} MiB, "
                     f"/dev/shm {sample['/dev/shm']:.0f} MiB")
        after = [i for i, at in enumerate(result.memory_at) if at >= self.leak_warmup]
        for name, series in result.memory.items():
            result.slopes[name] = slope_per_100([result.memory_at[i] for i in after], [series[i] for i in after])
        return result

    def _phase_burst(self, result: PhaseResult) -> PhaseResult:
        """Many requests at once, no retries: what the queue policy does not admit must be
        refused fast (``[unavailable]``), not left to time out."""
        lock = threading.Lock()
        sampling = threading.Event()
        count = self.requests * 3
        job = self.jobs[0]
        timings: list[tuple[float, bool]] = []

        def send() -> None:
            started = time.monotonic()
            refused = self._send(job, result, lock, sampling, NO_RETRY) == "clear_error"
            with lock:
                timings.append((time.monotonic() - started, refused))

        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(send) for _ in range(count)]
            result.sent = count
            for future in futures:
                future.result()
        result.fast_rejections = sum(1 for seconds, refused in timings if refused and seconds < 2.0)
        return result


def markdown_table(results: Sequence[PhaseResult], *, concurrency: int, recovery_bound_s: float) -> str:
    """The soak table of ``benchmarks/RESULTS.md``."""
    lines = [f"concurrency {concurrency}; recovery bound {recovery_bound_s:g} s", "",
             "| phase | sent | audio | clear error | lost | wrong | retries | ready again (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ready = "-" if r.ready_again_s is None else f"{r.ready_again_s:.1f}"
        if r.phase == "burst":
            ready = f"{r.fast_rejections} refused < 2 s"
        lines.append(f"| {r.phase} | {r.sent} | {r.audio} | {r.clear_error} | {r.lost} | {r.wrong} | "
                     f"{r.retries} | {ready} | {r.wall_s:.1f} |")
    return "\n".join(lines)


def leak_table(result: PhaseResult, warmup: int) -> str:
    """Memory per process at the start, after the warm-up and at the end, and the slope after it."""
    at = result.memory_at
    warm = next((i for i, a in enumerate(at) if a >= warmup), len(at) - 1)
    lines = [f"{result.sent} requests ({result.audio} with audio, {result.lost} lost); slope fitted from request "
             f"{at[warm]} on, goal at most {LEAK_GOAL_MIB_PER_100:g} MiB per 100 requests per process", "",
             "| process (private MiB) | start | after warm-up | end | MiB per 100 requests |",
             "|---|---|---|---|---|"]
    for name in sorted(result.memory, key=lambda n: (n != "tritonserver", n == "/dev/shm", n)):
        series = result.memory[name]
        slope = result.slopes.get(name, float("nan"))
        flag = " **over**" if slope > LEAK_GOAL_MIB_PER_100 else ""
        lines.append(f"| {name} | {series[0]:.0f} | {series[warm]:.0f} | {series[-1]:.0f} | {slope:+.2f}{flag} |")
    return "\n".join(lines)


def own_server(workdir: Path) -> Any:
    """Build the tiny checkpoint (with a LoRA adapter) and a CPU repository; start a server."""
    # torch (through the checkpoint, LoRA and deployment code) only when this script builds its own
    # server: against --url the soak needs just the client
    from acestep_triton.lora import SERVING_FILE
    from acestep_triton.serving.deploy import build_deployment
    from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint
    from acestep_triton.synthetic.tiny_lora import write_tiny_lora

    ckpt = write_tiny_checkpoint(workdir / "ckpt")
    write_tiny_lora(ckpt, workdir / "loras" / OWN_LORA[0])
    (workdir / "loras" / OWN_LORA[0] / SERVING_FILE).write_text(json.dumps({"lora_weight": OWN_LORA[1]}))
    deployment = build_deployment(ckpt, workdir / "deploy", lora_dir=workdir / "loras", intra_op_threads=1)
    return TritonServer(deployment.repository, log_path=workdir / "tritonserver.log", startup_timeout=600,
                        recover=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="an existing server (only client-side faults run)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=14, help="requests per phase")
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds per request, retries included")
    parser.add_argument("--recovery-bound", type=float, default=120.0)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma list of {', '.join(PHASES)} and {LEAK} (the long leak phase; own server only)")
    parser.add_argument("--leak-requests", type=int, default=1000)
    parser.add_argument("--leak-warmup", type=int, default=200, help="requests before the slope is fitted")
    parser.add_argument("--leak-sample-every", type=int, default=50)
    parser.add_argument("--lora", default=None, metavar="NAME:STRENGTH",
                        help="adapter of the LoRA request (own server: tiny:0.5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="own server: keep its checkpoint, repository and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES) - {LEAK})
    if unknown:
        parser.error(f"--phases: unknown {unknown}; known: {', '.join(PHASES)}, {LEAK}")
    lora = OWN_LORA if not args.url else None
    if args.lora:
        name, _, strength = args.lora.partition(":")
        lora = (name, float(strength or 1.0))
    with tempfile.TemporaryDirectory(prefix="acestep-soak-") as tmp:
        server = None if args.url else own_server(args.workdir or Path(tmp))
        soak = Soak(args.url or server.grpc_url, server=server, concurrency=args.concurrency,
                    requests=args.requests, duration=args.duration, steps=args.steps, deadline_s=args.deadline,
                    recovery_bound_s=args.recovery_bound, lora=lora, leak_requests=args.leak_requests,
                    leak_warmup=args.leak_warmup, leak_sample_every=args.leak_sample_every)
        try:
            results = soak.run(phases)
        finally:
            if soak.server is not None:
                soak.server.stop()
    print(markdown_table(results, concurrency=args.concurrency, recovery_bound_s=args.recovery_bound))
    for result in results:
        if result.phase == LEAK and result.memory:
            print()
            print(leak_table(result, args.leak_warmup))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    leaks = [r for r in results if r.phase == LEAK and any(v > LEAK_GOAL_MIB_PER_100 for v in r.slopes.values())]
    return 0 if all(r.ok for r in results) and not leaks else 1


if __name__ == "__main__":
    sys.exit(main())

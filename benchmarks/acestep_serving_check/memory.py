"""(d) Memory at peak: per served component (weights and ``max_memory_allocated``, from the
components' own gauges), the in-process paths, the device (``nvidia-smi``) and host RSS.

The server's processes are found with :func:`acestep_triton.serving.health.stub_processes` (the
Python-backend stubs of the server, each naming its model instance) and measured with
:func:`acestep_triton.serving.memory.rss_bytes`: the same readers the watchdog and the memory
release use, not a second copy of them.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import acestep_bench as bench

from acestep_triton.serving.health import stub_processes
from acestep_triton.serving.memory import rss_bytes

from .figures import MiB, nanmax, parse_csv_numbers
from .paths import CudaPeaks
from .report import Report

COMPONENT_GAUGES = {
    "acestep_component_weights_bytes": "weights",
    "acestep_component_cuda_allocated_at_load_bytes": "allocated_at_load",
    "acestep_component_cuda_max_allocated_bytes": "max_allocated",
}
_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')


def parse_component_gauges(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``model → instance → {weights, allocated_at_load, max_allocated}`` (bytes) from the text
    of Triton's ``/metrics`` (the gauges of :mod:`acestep_triton.serving.component_stats`)."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or match.group(1) not in COMPONENT_GAUGES:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        model, instance = labels.get("model", "?"), labels.get("instance", "?")
        found.setdefault(model, {}).setdefault(instance, {})[COMPONENT_GAUGES[match.group(1)]] = value
    return found


def component_rows(gauges: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per model in MiB: instances, weights of one instance, allocated at load, the largest
    instance's ``max_memory_allocated`` and the sum over instances (what the model costs the device)."""
    rows = {}
    for model, instances in sorted(gauges.items()):
        values = list(instances.values())

        def largest(key: str, values: list[Mapping[str, float]] = values) -> float:
            return nanmax(*(v.get(key, math.nan) for v in values)) / MiB

        rows[model] = {"instances": len(values), "weights_mib": largest("weights"),
                       "allocated_at_load_mib": largest("allocated_at_load"),
                       "max_allocated_mib": largest("max_allocated"),
                       "max_allocated_sum_mib": sum(v.get("max_allocated", 0.0) for v in values) / MiB}
    return rows


def scrape_component_gauges(metrics_url: str, timeout: float = 10.0) -> dict[str, dict[str, dict[str, float]]]:
    with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
        return parse_component_gauges(response.read().decode())


class MemorySampler(threading.Thread):
    """Samples memory every ``interval`` s while the run goes on, keeping peaks.

    GPU: ``nvidia-smi`` (whole device, and per process where the driver lists processes: a
    sandboxed machine may list none); host: RSS of this process, of the server and of each
    served model (the sum over its instances' stub processes). Sampling, not tracing: a peak
    shorter than the interval can be missed.
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
        members = [(server, "tritonserver")] if server else []
        members += [(stub.pid, stub.model) for stub in (stub_processes(server) if server else [])]
        with self._lock:
            self.samples += 1
            self._peak("gpu_used_mib", used)
            self._peak("self_rss_mib", rss_bytes() / MiB)
            self._peak("self_gpu_process_mib", apps.get(os.getpid(), math.nan))
            if not members:
                return
            # per model: the sum over its instances' processes (8 text2music stubs, say)
            rss: dict[str, float] = {}
            gpu: dict[str, float] = {}
            for pid, model in members:
                rss[model] = rss.get(model, 0.0) + rss_bytes(pid) / MiB
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


def memory_section(sampler: MemorySampler, peaks: CudaPeaks | None, report: Report,
                   components: Mapping[str, Mapping[str, Mapping[str, float]]] | None) -> None:
    """(d): peaks in MiB. ``components``: the served components' gauges (None: no server to ask).
    On a CPU the device rows are n/a (0 from the gauges) and host RSS carries the numbers."""
    sampler.stop()
    nan = math.nan
    gpu = {"inprocess_weights_mib": peaks.weights.get("in-process", nan) if peaks else nan,
           "inprocess_peak_mib": peaks.peak("in-process") if peaks else nan,
           "eager_weights_mib": peaks.weights.get("eager", nan) if peaks else nan,
           "eager_peak_mib": peaks.peak("eager") if peaks else nan}
    served = component_rows(components or {})
    values: dict[str, Any] = {
        **gpu,
        "process_max_allocated_mib": peaks.process_peak if peaks else math.nan,
        "gpu_baseline_mib": sampler.baseline_gpu_mib,
        "gpu_used_peak_mib": sampler.peaks.get("gpu_used_mib", math.nan),
        "server_gpu_process_mib": sampler.peaks.get("server_gpu_process_mib", math.nan),
        "server_gpu_estimate_mib": sampler.peaks.get("server_gpu_estimate_mib", math.nan),
        "server_rss_mib": sampler.peaks.get("server_rss_mib", math.nan),
        "inprocess_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "model_rss_mib": dict(sampler.model_rss), "model_gpu_mib": dict(sampler.model_gpu),
        "components": served, "components_gauges": components,
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
    tables = [bench.format_table(("what", "peak MiB", "how"), rows, f"(d) memory at peak ({sampler.samples} samples)")]
    if served:
        tables.append(bench.format_table(
            ("served model", "instances", "weights MiB", "allocated at load MiB", "max_memory_allocated MiB",
             "max_memory_allocated, all instances MiB"),
            [(m, r["instances"], r["weights_mib"], r["allocated_at_load_mib"], r["max_allocated_mib"],
              r["max_allocated_sum_mib"]) for m, r in served.items()],
            "(d) per served component (its own gauges: parameters + buffers; torch.cuda.max_memory_allocated "
            "of its process since start, largest instance; 0 on a CPU)"))
    else:
        tables.append("(d) per served component: no gauges (no server answered /metrics)")
    report.add("d_memory", values, "\n\n".join(tables))

"""The orchestrators' own Prometheus metrics, exported by Triton beside its ``nv_*`` metrics.

Triton's metrics say how busy each *model* is; these say what the service *did*: requests and
failures per task, seconds of audio generated, denoising steps, and the real-time factor. They
are registered through the Python backend's custom-metrics API, so they appear on the same
``:8002/metrics`` endpoint that Prometheus already scrapes (ServiceMonitor in ``deploy/``).

Counters rather than histograms (Triton 2.51's Python backend has counters and gauges), so the
rates are derived in PromQL, e.g. RTF over 5 minutes =
``rate(acestep_audio_seconds_total[5m]) / rate(acestep_generation_seconds_total[5m])``.
"""

from __future__ import annotations

from typing import Any

OUTCOMES = ("success", "invalid", "unavailable", "cancelled", "error")

FAMILIES = {
    "acestep_requests_total": ("counter", "Generation requests finished, by task and outcome"),
    "acestep_audio_seconds_total": ("counter", "Seconds of audio generated (all batch items), by task"),
    "acestep_generation_seconds_total": ("counter", "Wall seconds spent on successful generations, by task"),
    "acestep_denoising_steps_total": ("counter", "Denoising steps run (model evaluation points), by task"),
    "acestep_realtime_factor": ("gauge", "Audio seconds / wall seconds of the last generation, by task"),
}


class TaskMetrics:
    """The metric handles of one endpoint (``pb_utils`` is passed in: it only exists in the stub)."""

    def __init__(self, pb_utils: Any, task: str) -> None:
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=kinds[kind])
                          for name, (kind, text) in FAMILIES.items()}
        labels = {"task": task}
        self._requests = {o: self._families["acestep_requests_total"].Metric(labels={**labels, "outcome": o})
                          for o in OUTCOMES}
        self._audio = self._families["acestep_audio_seconds_total"].Metric(labels=labels)
        self._wall = self._families["acestep_generation_seconds_total"].Metric(labels=labels)
        self._steps = self._families["acestep_denoising_steps_total"].Metric(labels=labels)
        self._rtf = self._families["acestep_realtime_factor"].Metric(labels=labels)

    def step(self) -> None:
        self._steps.increment(1)

    def finished(self, outcome: str) -> None:
        self._requests[outcome].increment(1)

    def succeeded(self, audio_seconds: float, wall_seconds: float) -> None:
        self.finished("success")
        self._audio.increment(audio_seconds)
        self._wall.increment(wall_seconds)
        if wall_seconds > 0:
            self._rtf.set(audio_seconds / wall_seconds)

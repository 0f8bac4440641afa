"""The front end's one way to the model: the thin client, plus deployment policy and result files.

The front end holds no model. Every request goes through
:class:`~acestep_client.client.AceStepClient` to the Triton endpoints; this module adds what a
public UI needs around that call: a duration policy (the range a "random" duration is drawn
from, and an optional cap on how long any result may be, which bounds the compute one click can
cost), result files written with the client's own writer into a folder Gradio serves, and a
retention limit on that folder.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from acestep_client.client import AceStepClient
from acestep_client.params import MAX_DURATION_S, GenerationParams, ParamError
from acestep_client.retry import RetryCallback, RetryPolicy

log = logging.getLogger(__name__)

UPSTREAM_RANDOM_RANGE = (30.0, 240.0)
"""Upstream draws ``audio_duration <= 0`` uniformly from this range (seconds)."""
OUTPUT_PREFIX = "acestep_"
"""Every result file this front end writes starts with this (only those are ever pruned)."""


@dataclass(frozen=True)
class DurationPolicy:
    """How long results may be in this deployment.

    ``random_range``: where ``audio_duration <= 0`` ("random", upstream's -1) is drawn from.
    ``max_duration``: if set, no request may produce more seconds of audio than this
    (text2music/retake duration, the length of a repaint/edit/audio2audio source, an extended
    song); the random range is clipped to it. Requests above it fail naming the argument.
    """

    random_range: tuple[float, float] = UPSTREAM_RANDOM_RANGE
    max_duration: float | None = None

    def __post_init__(self) -> None:
        low, high = self.random_range
        if not 0 < low <= high <= MAX_DURATION_S:
            raise ValueError(f"random_range must satisfy 0 < low <= high <= {MAX_DURATION_S:g}, "
                             f"got {self.random_range}")
        if self.max_duration is not None and not 0 < self.max_duration <= MAX_DURATION_S:
            raise ValueError(f"max_duration must be in (0, {MAX_DURATION_S:g}], got {self.max_duration}")

    def resolve(self, requested: float, rng: random.Random, field_name: str = "audio_duration") -> float:
        """The duration to ask the server for: ``requested``, or a random draw when it is <= 0."""
        if requested > 0:
            self.check(requested, field_name)
            return float(requested)
        low, high = self.random_range
        if self.max_duration is not None:
            high = min(high, self.max_duration)
            low = min(low, high)
        return rng.uniform(low, high)

    def check(self, seconds: float, field_name: str) -> None:
        if self.max_duration is not None and seconds > self.max_duration + 1e-6:
            raise ParamError(field_name, f"{seconds:.2f} s of audio is above this deployment's limit of "
                                         f"{self.max_duration:g} s")


@dataclass
class Output:
    """One finished request: the audio file written and the parameters JSON shown with it."""

    audio_path: Path
    params: dict[str, Any]


FRONTEND_RETRY = RetryPolicy(max_elapsed_s=30.0)
"""A person waits at the page: resend for 30 s after the first failure (an endpoint's recovery on
the CPU takes 15–25 s, a restarted tritonserver a few), then say that the model server is
unavailable, instead of the client's default 120 s meant for unattended scripts."""


@dataclass
class FrontendService:
    """Runs requests through the client and writes their results into ``output_dir``."""

    client: AceStepClient
    output_dir: Path
    policy: DurationPolicy = field(default_factory=DurationPolicy)
    keep_seconds: float = 24 * 3600.0
    timeout_s: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    retry: RetryPolicy = field(default_factory=lambda: FRONTEND_RETRY)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def generate(self, params: GenerationParams, *, src_audio: str | None = None, ref_audio: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 on_retry: RetryCallback | None = None) -> Output:
        """Apply the policy, run ``params`` on its task's endpoint, save the first item.
        ``should_cancel`` (polled while waiting) abandons the request, also on the server;
        ``on_retry`` hears about each resend after the server was unavailable."""
        self._apply_policy(params, src_audio, ref_audio)
        result = self.client.generate(params, on_progress=on_progress, timeout_s=self.timeout_s,
                                      src_audio=src_audio, ref_audio=ref_audio, should_cancel=should_cancel,
                                      retry=self.retry, on_retry=on_retry)
        stem = f"{OUTPUT_PREFIX}{params.task}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"
        path = result.save(self.output_dir, params.format, stem=stem)[0]
        self.prune()
        # Upstream's JSON carried these too; its UI read them back when loading parameters.
        shown = {**result.params, "audio_path": str(path), "audio2audio_enable": params.task == "audio2audio"}
        return Output(audio_path=path, params=shown)

    def _apply_policy(self, params: GenerationParams, src_audio: str | None, ref_audio: str | None) -> None:
        if params.task in ("text2music", "retake"):
            params.audio_duration = self.policy.resolve(params.audio_duration, self.rng)
            return
        if self.policy.max_duration is None:
            return
        if params.task == "audio2audio" and ref_audio is not None:
            self.policy.check(_seconds(ref_audio, "ref_audio"), "ref_audio")
        elif src_audio is not None:
            seconds = _seconds(src_audio, "src_audio")
            if params.task == "extend":
                self.policy.check(seconds + params.left_extend_length + params.right_extend_length,
                                  "right_extend_length")
            else:
                self.policy.check(seconds, "src_audio")

    def prune(self) -> None:
        """Delete result files older than ``keep_seconds`` (ours only, by prefix)."""
        cutoff = time.time() - self.keep_seconds
        for path in self.output_dir.glob(f"{OUTPUT_PREFIX}*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError as exc:  # another worker may have removed it first
                log.debug("could not prune %s: %s", path, exc)


def _seconds(path: str, field_name: str) -> float:
    """Length of an audio file (needed to apply the cap before any compute is spent)."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as exc:
        raise ParamError(field_name, f"cannot read the audio file ({exc})") from exc
    return info.frames / float(info.samplerate)

"""What one run of the check measures (the plan, its GPU and dry-run defaults, the request of
(a)/(b)) and the goals its figures are judged against."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import load_client as load

from acestep_client.params import GenerationParams

ENDPOINT = "text2music"
TEXT2MUSIC_MODELS = ("text_encoder", "condition_encoder", "dit_decoder", "dcae_decoder", "vocoder", ENDPOINT)
"""What text2music calls (plus itself): the server loads only these (``dcae_encoder`` would be one
more process and model for nothing)."""

GOAL_TRITON_OVERHEAD = 1.10
GOAL_SPEEDUP_VS_EAGER = 3.0
GOAL_THROUGHPUT_RATIO = 3.0
GOAL_THROUGHPUT_MAX_SECONDS = 30.0
"""The throughput goal is for 10-30 s requests; longer ones are reported, not judged."""


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
    lora: bool = True

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
                   threads=pick(args.threads, 0, 1), lora=not getattr(args, "no_lora", False))


def request_params(seconds: float, steps: int, seed: int = 42) -> GenerationParams:
    """The (a)/(b) request: the load mix's first prompt (with lyrics), one fixed seed."""
    prompt, lyrics = load.PROMPTS[0]
    return GenerationParams(prompt=prompt, lyrics=lyrics, audio_duration=seconds, infer_step=steps,
                            manual_seeds=str(seed))

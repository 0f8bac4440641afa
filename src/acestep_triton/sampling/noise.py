"""Seeds and initial noise, drawn exactly the way upstream draws them.

Upstream resolves two seed lists for *every* request, whatever the task:
``manual_seeds`` (the initial noise) and then ``retake_seeds`` (retake/repaint/extend noise,
and edit's forward noise). Each item of the batch gets its own ``torch.Generator`` seeded with
its seed, and its noise is ``torch.randn((1, 8, 16, W), generator=g)`` in float32 on the CPU;
the batch is the concatenation. Seeds that are not given are drawn, one per item, as
``torch.randint(0, 2**32, (1,))`` from torch's *global* generator — manual seeds first, then
retake seeds. That is why the golden text2music cases still report ``actual_retake_seeds``
(their harness called ``torch.manual_seed(0)`` first: 2546248239, 3626093760, …), and why the
parameters JSON of every task must include the resolved retake seeds: replaying a request
("retake from its JSON") needs both lists.

We draw on the CPU whatever device samples: CPU generators give the same numbers everywhere
(upstream on CUDA would use CUDA generators, whose streams differ from the CPU reference).

Seed specs accepted (as upstream's ``set_seeds``): an int; a string "a,b,…" (item i takes the
i-th, missing items repeat the last); a digit string "123"; a list of ints. Anything else —
None, "", "-1", "abc", an empty list — means "draw randomly". Unlike upstream we strip
surrounding whitespace first (upstream would treat " 12" as random).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from acestep_client.limits import MAX_FRAMES as LIMITS_MAX_FRAMES

from .schedule import Schedule

#: Latent layout of the DCAE: [B, 8 channels, 16 height, W frames].
LATENT_CHANNELS = 8
LATENT_HEIGHT = 16
#: Latent frames per second of audio: 44100 Hz / 512 hop / 8 (DCAE downsampling).
FRAMES_PER_SECOND = 44100 / 512 / 8
#: Longest generation upstream supports (240 s → 2583 frames): ``acestep_client.limits``.
MAX_FRAMES = LIMITS_MAX_FRAMES

SeedSpec = int | str | Sequence[int] | None


def latent_frames(duration_s: float) -> int:
    """Latent frames for a duration in seconds: ``int(duration·44100/512/8)`` (3 s → 32)."""
    return int(duration_s * 44100 / 512 / 8)


def resolve_duration(duration_s: float, rng: random.Random | None = None) -> float:
    """``duration ≤ 0`` means a random duration, uniform in [30, 240] s (upstream's rule)."""
    if duration_s > 0:
        return float(duration_s)
    return (rng or random).uniform(30.0, 240.0)


def _parse_seed_spec(spec: SeedSpec, field: str) -> int | list[int] | None:
    if isinstance(spec, bool):
        raise ValueError(f"{field}: expected an int, a list of ints or a string, got {spec!r}")
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            try:
                return [int(part) for part in text.split(",")]
            except ValueError:
                raise ValueError(f"{field}: expected comma-separated integers, got {spec!r}") from None
        if text.isascii() and text.isdigit():
            return int(text)
        return None
    if spec is None:
        return None
    seeds = list(spec)
    if seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        return seeds
    if seeds:
        raise ValueError(f"{field}: expected a list of ints, got {spec!r}")
    return None


def random_seed(rng: torch.Generator | None = None) -> int:
    """One random seed as upstream draws it: ``torch.randint(0, 2**32, (1,))``."""
    return int(torch.randint(0, 2**32, (1,), generator=rng).item())


def resolve_seeds(
    spec: SeedSpec, batch_size: int, rng: torch.Generator | None = None, field: str = "manual_seeds"
) -> list[int]:
    """The actual per-item seeds for ``spec`` (see the module docstring for the rules).

    ``rng`` is the generator random seeds come from (None: torch's global generator, as
    upstream); pass a seeded one for reproducible "random" seeds. ``field`` names the request
    field in error messages.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    parsed = _parse_seed_spec(spec, field)
    seeds: list[int] = []
    for i in range(batch_size):
        if parsed is None:
            seed = random_seed(rng)
        elif isinstance(parsed, int):
            seed = parsed
        else:
            seed = parsed[i] if i < len(parsed) else parsed[-1]
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"{field}: {seed} is outside the 64-bit range torch accepts")
        seeds.append(seed)
    return seeds


@dataclass
class SeededNoise:
    """Per-item seeds and their generators; draws advance the generators (like upstream).

    ``generators[0]`` is also the source of pingpong's per-step noise (after the initial draw).
    """

    seeds: list[int]
    generators: list[torch.Generator]

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> SeededNoise:
        return cls(list(seeds), [torch.Generator(device="cpu").manual_seed(s) for s in seeds])

    @classmethod
    def from_spec(
        cls,
        spec: SeedSpec,
        batch_size: int,
        rng: torch.Generator | None = None,
        field: str = "manual_seeds",
    ) -> SeededNoise:
        return cls.from_seeds(resolve_seeds(spec, batch_size, rng, field))

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def step_generator(self) -> torch.Generator:
        """The generator pingpong (and edit) draw their per-step noise from."""
        return self.generators[0]

    def draw(self, item_shape: Sequence[int]) -> torch.Tensor:
        """float32 CPU noise [B, *item_shape], item i from generator i."""
        shape = (1, *item_shape)
        return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators])

    def draw_latents(self, frames: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Latent-shaped noise [B, 8, 16, frames], drawn on the CPU and then moved to ``device``."""
        noise = self.draw((LATENT_CHANNELS, LATENT_HEIGHT, frames))
        return noise if device is None else noise.to(device)


def resolve_request_seeds(
    manual_seeds: SeedSpec,
    retake_seeds: SeedSpec,
    batch_size: int,
    rng: torch.Generator | None = None,
) -> tuple[SeededNoise, SeededNoise]:
    """Both seed lists of a request, in upstream's order (manual first, then retake).

    Every task resolves both, and the parameters JSON reports both.
    """
    noise = SeededNoise.from_spec(manual_seeds, batch_size, rng, "manual_seeds")
    retake = SeededNoise.from_spec(retake_seeds, batch_size, rng, "retake_seeds")
    return noise, retake


def mix_retake_noise(noise: torch.Tensor, retake_noise: torch.Tensor, variance: float) -> torch.Tensor:
    """Retake's starting point: ``cos(a)·ε + sin(a)·ε_retake`` with ``a = variance·π/2`` (float32).

    Unit-variance noise stays unit-variance; variance 0 reproduces the original, 1 is all new.
    """
    angle = torch.tensor(variance * math.pi / 2, dtype=torch.float32, device=noise.device)
    return torch.cos(angle) * noise + torch.sin(angle) * retake_noise


def noise_reference(reference: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """audio2audio's starting point: ``ref·(1 − σ) + ε·σ`` with σ = ``schedule.noise_level``."""
    sigma = schedule.noise_level
    return reference * (1 - sigma) + noise * sigma

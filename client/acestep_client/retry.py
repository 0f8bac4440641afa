"""When and how often :meth:`AceStepClient.generate` resends a request that the server could
not serve.

Only failures that are safe to repeat are retried: nothing answered (the server is down or
restarting), the endpoint is not ready yet, or the endpoint said ``[unavailable]`` (a component
restarting, no memory free right now, its queue full). A request the server refused as bad
input is never resent, and neither is one whose audio had started to arrive: the caller already
holds part of an answer. Waits grow geometrically with a little jitter, so replicas restarted
together are not hit by every client at the same instant; the request's deadline
(``timeout_s``) bounds all attempts and waits together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

RetryCallback = Callable[[int, int, BaseException, float], None]
"""``on_retry(attempt, attempts, error, delay_s)``: called before waiting ``delay_s`` and sending
attempt ``attempt + 1`` of ``attempts`` (e.g. to print "server unavailable, retrying in 2 s")."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (1 = never retry); the n-th wait is
    ``min(max_backoff_s, backoff_s · multiplier**(n-1))`` ± ``jitter`` of it."""

    attempts: int = 4
    backoff_s: float = 1.0
    multiplier: float = 2.0
    max_backoff_s: float = 10.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff_s and max_backoff_s must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The ``attempts - 1`` waits between attempts, in order."""
        rng = rng or random.Random()
        for n in range(self.attempts - 1):
            base = min(self.max_backoff_s, self.backoff_s * self.multiplier ** n)
            yield max(0.0, base * (1 + rng.uniform(-self.jitter, self.jitter)))


DEFAULT_RETRY = RetryPolicy()
"""Four attempts over about 7 s of waits: rides out a component restart, not a long outage."""
NO_RETRY = RetryPolicy(attempts=1)
"""Send once; report the first failure as it is."""

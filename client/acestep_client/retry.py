"""When and how often :meth:`AceStepClient.generate` resends a request that the server could
not serve.

Only failures that are safe to repeat are retried: nothing answered (the server is down or
restarting), the endpoint is not ready yet, or the endpoint said ``[unavailable]`` (a component
restarting, no memory free right now, its queue full). A request the server refused as bad
input is never resent, and neither is one whose audio had started to arrive: the caller already
holds part of an answer. Waits grow geometrically with a little jitter, so replicas restarted
together are not hit by every client at the same instant; the request's deadline
(``timeout_s``) bounds all attempts and waits together.

The defaults are sized to outlast a recovery, not a blip (issue 19): after ``kill -9`` of an
endpoint's process Triton keeps routing requests to the dead instance until the watchdog's
reload replaced it, 15–40 s on two CPU cores (minutes for a GPU endpoint that compiles), and a
restarted tritonserver loads every model first. So the client keeps resending, with waits capped
at a few seconds, until the request's deadline, or for ``max_elapsed_s`` after the first
failure when the request has none.
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
    ``min(max_backoff_s, backoff_s · multiplier**(n-1))`` ± ``jitter`` of it. Without a request
    deadline, no retry is sent later than ``max_elapsed_s`` after the first failure (``None``:
    attempts alone bound it); with one, the deadline does."""

    attempts: int = 30
    backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 4.0
    jitter: float = 0.1
    max_elapsed_s: float | None = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff_s and max_backoff_s must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.max_elapsed_s is not None and self.max_elapsed_s < 0:
            raise ValueError(f"max_elapsed_s must be >= 0 or None, got {self.max_elapsed_s}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The ``attempts - 1`` waits between attempts, in order."""
        rng = rng or random.Random()
        for n in range(self.attempts - 1):
            base = min(self.max_backoff_s, self.backoff_s * self.multiplier ** n)
            yield max(0.0, base * (1 + rng.uniform(-self.jitter, self.jitter)))


DEFAULT_RETRY = RetryPolicy()
"""Resends for up to 2 minutes after the first failure (waits 0.5, 1, 2, then 4 s), or until the
request's ``timeout_s``: rides out a dead model's reload (15–40 s on CPU) and a server restart."""
NO_RETRY = RetryPolicy(attempts=1)
"""Send once; report the first failure as it is."""

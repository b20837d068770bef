"""Retries of transient service errors, shared by every cloud provider.

A transient error is throttling, an HTTP 5xx response or a dropped connection.
``call_with_retries`` retries it with exponential backoff and full jitter,
within a bounded number of attempts and a bounded total sleep, and counts
every retry by kind in a ``RetryCounter`` that the provider reports in the
case record. Waiting goes through a ``Clock``, so replayed cases do not sleep.

Measured latencies never include a retried attempt silently. Every retry
also adds one to a per-thread count that ``retries_in_thread`` returns, so
the test-set evaluation and the load generator, which time one request per
thread, see whether an ``invoke`` retried and keep its latency out of the
statistics (it is counted as retried instead).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, TypeVar

from imgbench.clock import Clock, RealClock
from imgbench.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Kinds of transient error, as counted in records.
THROTTLING = "throttling"
SERVER_ERROR = "server_error"
CONNECTION_RESET = "connection_reset"
TRANSIENT_KINDS = (THROTTLING, SERVER_ERROR, CONNECTION_RESET)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retries of one call; times are in seconds."""

    # Attempts of one call, the first included.
    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # Total sleep allowed across the retries of one call.
    budget_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"invalid max_attempts {self.max_attempts}; use 1 or more")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ConfigError(f"invalid retry delays base={self.base_delay_s} max={self.max_delay_s}; "
                              "use 0 <= base <= max")
        if self.budget_s < 0:
            raise ConfigError(f"invalid retry budget {self.budget_s}; use 0 or more seconds")

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Return the sleep before attempt ``attempt + 1``: full jitter, at least the server's Retry-After."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        delay = rng.uniform(0, ceiling)
        if retry_after is not None and retry_after > delay:
            return min(retry_after, self.max_delay_s)
        return delay


NO_RETRIES = RetryPolicy(max_attempts=1)


_thread_retries = threading.local()


def retries_in_thread() -> int:
    """Return how many retries ``call_with_retries`` has made in the calling thread so far."""
    return getattr(_thread_retries, "count", 0)


class RetryCounter:
    """Thread-safe counts of retried attempts by kind (see ``TRANSIENT_KINDS``) and of calls that gave up."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            self._counts[name] += count

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class TransientError(Exception):
    """Raised by a call to ask for a retry; ``kind`` is one of ``TRANSIENT_KINDS``."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        if kind not in TRANSIENT_KINDS:
            raise ValueError(f"invalid transient error kind {kind!r}; valid kinds: {', '.join(TRANSIENT_KINDS)}")
        self.kind = kind
        self.retry_after = retry_after


def call_with_retries(call: Callable[[], T], *, operation: str, policy: RetryPolicy, counter: RetryCounter,
                      clock: Clock | None = None, rng: random.Random | None = None,
                      give_up: Callable[[TransientError], Exception] | None = None) -> T:
    """Run ``call``, retrying while it raises ``TransientError``; return its result.

    Each retry adds one to ``counter`` under the error's kind. When the
    attempts or the sleep budget run out, the last ``TransientError`` is
    turned into the exception that ``give_up`` returns (by default a
    ``ServiceFailureError``, or ``ThrottledError`` for throttling), chained
    to it, and ``<kind>_gave_up`` is counted.
    """
    clock = clock or RealClock()
    rng = rng or random.Random()
    slept = 0.0
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except TransientError as exc:
            delay = policy.delay(attempt, rng, exc.retry_after)
            if attempt >= policy.max_attempts or slept + delay > policy.budget_s:
                counter.add(f"{exc.kind}_gave_up")
                raise (give_up or default_give_up)(exc) from exc
            counter.add(exc.kind)
            _thread_retries.count = retries_in_thread() + 1
            logger.warning("%s failed with %s (attempt %d of %d): %s; retrying in %.2f s",
                           operation, exc.kind, attempt, policy.max_attempts, exc, delay)
            clock.sleep(delay)
            slept += delay


def default_give_up(exc: TransientError) -> Exception:
    from imgbench.errors import ServiceFailureError, ThrottledError

    if exc.kind == THROTTLING:
        return ThrottledError(f"{exc}; still throttled after the retry budget: wait until the service's request "
                              "quota recovers (or ask its provider for a higher quota), then run the case again")
    return ServiceFailureError(f"{exc}; still failing after the retry budget")

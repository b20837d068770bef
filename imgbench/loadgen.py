"""Closed-loop load test: N workers send a fixed number of requests.

Each worker owns one ``requests.Session`` (so one keep-alive connection), and
takes the next request number from a shared counter until the request count
or the time limit is reached. Latency runs from just before the request is
sent until its body has been read, on ``time.perf_counter``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import requests

from imgbench.errors import ConfigError, error_kind
from imgbench.metrics import latency_summary

logger = logging.getLogger(__name__)

SendFn = Callable[[requests.Session, bytes], object]


@dataclass(frozen=True)
class LoadConfig:
    """How many requests, how many at once, and the wall-time limit in seconds."""

    requests: int = 1000
    concurrency: int = 10
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ConfigError(f"invalid load-test request count {self.requests}; use 1 or more")
        if self.concurrency < 1:
            raise ConfigError(f"invalid load-test concurrency {self.concurrency}; use 1 or more")
        if self.max_seconds <= 0:
            raise ConfigError(f"invalid load-test time limit {self.max_seconds}; use a positive number of seconds")


@dataclass
class LoadResult:
    """Outcome of one load test; latencies are of successful requests only."""

    config: LoadConfig
    wall_s: float
    sent: int
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    stopped_by_time_limit: bool = False

    def as_dict(self) -> dict:
        ok = len(self.latencies_s)
        return {
            "requests": self.config.requests,
            "concurrency": self.config.concurrency,
            "sent": self.sent,
            "succeeded": ok,
            "failed": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "wall_s": self.wall_s,
            "requests_per_s": ok / self.wall_s if self.wall_s > 0 else 0.0,
            "stopped_by_time_limit": self.stopped_by_time_limit,
            "latency": latency_summary(self.latencies_s),
        }


def request_error_kind(exc: BaseException) -> str:
    """Name a failed request's error for the errors-by-kind table."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"http_{exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection"
    return error_kind(exc)


def run_closed_loop(send: SendFn, payloads: Sequence[bytes], config: LoadConfig,
                    session_factory: Callable[[], requests.Session] = requests.Session) -> LoadResult:
    """Send ``config.requests`` requests from ``config.concurrency`` workers.

    Payloads are used round-robin. ``send`` performs one request and raises on
    failure; its exception is counted by kind and the worker goes on.
    """
    if not payloads:
        raise ConfigError("the load test needs at least one payload (the test set is empty)")
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter = Counter()
    sent = 0
    deadline = time.perf_counter() + config.max_seconds
    timed_out = threading.Event()

    def worker() -> None:
        nonlocal sent
        session = session_factory()
        local_latencies = []
        local_errors: Counter = Counter()
        local_sent = 0
        try:
            while True:
                number = next(counter)
                if number >= config.requests:
                    break
                if time.perf_counter() >= deadline:
                    timed_out.set()
                    break
                payload = payloads[number % len(payloads)]
                local_sent += 1
                started = time.perf_counter()
                try:
                    send(session, payload)
                except Exception as exc:  # counted by kind, the load test goes on
                    local_errors[request_error_kind(exc)] += 1
                    continue
                local_latencies.append(time.perf_counter() - started)
        finally:
            session.close()
            with lock:
                latencies.extend(local_latencies)
                errors.update(local_errors)
                sent += local_sent

    threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(config.concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    result = LoadResult(config=config, wall_s=wall, sent=sent, latencies_s=latencies, errors=errors,
                        stopped_by_time_limit=timed_out.is_set())
    if errors:
        logger.warning("load test: %d of %d requests failed: %s", sum(errors.values()), sent, dict(errors))
    return result

"""Tests of the shared retries: backoff bounds, budgets, counting, and what latency statistics leave out."""

from __future__ import annotations

import random

import pytest
import requests

from imgbench.clock import ReplayClock
from imgbench.errors import ConfigError, ServiceFailureError, ThrottledError
from imgbench.evaluate import evaluate_test_set
from imgbench.loadgen import LoadConfig, run_closed_loop
from imgbench.retry import (CONNECTION_RESET, SERVER_ERROR, THROTTLING, RetryCounter, RetryPolicy, TransientError,
                            call_with_retries, retries_in_thread)
from providers.base import Prediction


class Flaky:
    """A call that raises ``TransientError`` of ``kind`` for its first ``failures`` attempts."""

    def __init__(self, failures: int, kind: str = THROTTLING, retry_after: float | None = None):
        self.failures = failures
        self.kind = kind
        self.retry_after = retry_after
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError(self.kind, f"attempt {self.calls} failed", self.retry_after)
        return "ok"


def retry(call, policy=RetryPolicy(), counter=None, clock=None):
    return call_with_retries(call, operation="test call", policy=policy, counter=counter or RetryCounter(),
                             clock=clock or ReplayClock(), rng=random.Random(1))


def test_success_after_retries_counts_them():
    counter = RetryCounter()
    clock = ReplayClock()

    assert retry(Flaky(2, SERVER_ERROR), counter=counter, clock=clock) == "ok"

    assert counter.as_dict() == {SERVER_ERROR: 2}
    assert clock.sleeps == 2


def test_gives_up_after_max_attempts():
    counter = RetryCounter()
    flaky = Flaky(10)

    with pytest.raises(ThrottledError) as caught:
        retry(flaky, RetryPolicy(max_attempts=3), counter)

    assert flaky.calls == 3
    assert counter.as_dict() == {THROTTLING: 2, f"{THROTTLING}_gave_up": 1}
    assert isinstance(caught.value.__cause__, TransientError)


def test_server_error_gives_up_as_service_failure():
    with pytest.raises(ServiceFailureError, match="still failing"):
        retry(Flaky(10, CONNECTION_RESET), RetryPolicy(max_attempts=2))


def test_budget_bounds_total_sleep():
    clock = ReplayClock()
    flaky = Flaky(100, retry_after=10.0)

    with pytest.raises(ThrottledError):
        retry(flaky, RetryPolicy(max_attempts=100, max_delay_s=10.0, budget_s=35.0), clock=clock)

    assert clock.virtual_seconds <= 35.0
    assert flaky.calls == 4


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 10])
def test_delay_within_jitter_ceiling(attempt):
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(attempt)

    delays = [policy.delay(attempt, rng) for _ in range(200)]

    assert min(delays) >= 0.0
    assert max(delays) <= min(4.0, 0.5 * 2 ** (attempt - 1))


def test_retry_after_is_minimum_delay():
    assert RetryPolicy(max_delay_s=30.0).delay(1, random.Random(0), retry_after=7.0) == 7.0


def test_retry_after_capped_at_max_delay():
    assert RetryPolicy(max_delay_s=5.0).delay(1, random.Random(0), retry_after=60.0) == 5.0


@pytest.mark.parametrize("settings", [{"max_attempts": 0}, {"base_delay_s": 2.0, "max_delay_s": 1.0},
                                      {"budget_s": -1.0}])
def test_invalid_policy_rejected(settings):
    with pytest.raises(ConfigError, match="invalid"):
        RetryPolicy(**settings)


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="invalid transient error kind"):
        TransientError("flaky", "message")


def test_thread_count_grows_with_retries():
    before = retries_in_thread()

    retry(Flaky(3))

    assert retries_in_thread() - before == 3


def invoke_failing_every_other(counter: RetryCounter):
    """An invoke whose odd-numbered calls throttle once before succeeding."""
    calls = {"n": 0}

    def invoke(session, data):
        calls["n"] += 1
        flaky = Flaky(1 if calls["n"] % 2 else 0)
        retry(flaky, counter=counter)
        return Prediction("a", 0.9)

    return invoke


def test_evaluation_keeps_retried_latency_apart(mini_datasets):
    from imgbench.datasets import ImageRecord
    from imgbench.images import sha256_bytes

    paths = sorted((mini_datasets / "beans" / "test" / "healthy").glob("*.jpg"))[:4]
    records = [ImageRecord(path, "healthy", sha256_bytes(path.read_bytes()), "test") for path in paths]

    rows = evaluate_test_set(invoke_failing_every_other(RetryCounter()), records)

    assert [row["retries"] if "retries" in row else 0 for row in rows] == [1, 0, 1, 0]
    assert [row["latency_s"] is None for row in rows] == [True, False, True, False]
    assert all(row["latency_with_retries_s"] > 0 for row in rows if "retries" in row)
    assert all(row["error"] is None for row in rows)


def test_load_test_counts_retried_requests():
    invoke = invoke_failing_every_other(RetryCounter())

    result = run_closed_loop(invoke, [b"x"], LoadConfig(requests=20, concurrency=1),
                             session_factory=requests.Session)

    summary = result.as_dict()
    assert summary["retried"] == 10
    assert summary["succeeded"] == 20
    assert len(result.latencies_s) == 10

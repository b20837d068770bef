"""Clocks for waiting loops: a real one, and a virtual one for replayed cases.

Providers that poll a service (training, deployment) or back off after a
throttled request take a clock instead of calling ``time`` directly. A live or
emulator run uses ``RealClock``. A replayed run uses ``ReplayClock``, whose
``sleep`` advances virtual time at once, so a training wait recorded over an
hour replays in milliseconds. ``ReplayClock`` raises ``ReplayClockExhausted``
after a bounded number of sleeps or virtual seconds, so a cassette that never
reaches the awaited state cannot make a replay spin forever.

Measured latencies never use these clocks: they come from
``time.perf_counter`` in the suite.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from imgbench.errors import ImgbenchError

# Limits of one replayed case. A recorded training wait polls about once every
# few seconds for at most an hour or so, far below both limits.
DEFAULT_MAX_SLEEPS = 100_000
DEFAULT_MAX_VIRTUAL_S = 7 * 24 * 3600.0


class ReplayClockExhausted(ImgbenchError):
    """A replayed case slept more often, or longer, than a replay can need."""

    kind = "replay_clock_exhausted"


class Clock(Protocol):
    """Interface of waiting loops: a monotonic reading in seconds, and a sleep."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Wall-clock time from ``time.monotonic`` and ``time.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ReplayClock:
    """Virtual time that moves only when someone sleeps; safe to share between threads.

    Raises ``ReplayClockExhausted`` from ``sleep`` once more than
    ``max_sleeps`` sleeps or ``max_virtual_s`` virtual seconds have passed.
    """

    def __init__(self, max_sleeps: int = DEFAULT_MAX_SLEEPS, max_virtual_s: float = DEFAULT_MAX_VIRTUAL_S,
                 start: float = 0.0):
        self.max_sleeps = max_sleeps
        self.max_virtual_s = max_virtual_s
        self._start = start
        self._now = start
        self._sleeps = 0
        self._lock = threading.Lock()

    @property
    def sleeps(self) -> int:
        """Number of sleeps so far."""
        return self._sleeps

    @property
    def virtual_seconds(self) -> float:
        """Virtual seconds slept so far."""
        return self._now - self._start

    def monotonic(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._sleeps += 1
            self._now += max(seconds, 0.0)
            sleeps, elapsed = self._sleeps, self._now - self._start
        if sleeps > self.max_sleeps or elapsed > self.max_virtual_s:
            raise ReplayClockExhausted(
                f"the replay slept {sleeps} times for {elapsed:.0f} virtual seconds, more than the limit of "
                f"{self.max_sleeps} sleeps or {self.max_virtual_s:.0f} s; the cassette probably never reaches "
                "the state the provider waits for (for example, training never finishes): re-record it"
            )

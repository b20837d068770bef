"""Test HTTP server with known response delays and injectable faults.

``TimingServer`` listens on 127.0.0.1 on an OS-chosen port and responds to
every GET and POST after a delay taken from a delay plan (fixed, uniform, seeded
lognormal or an explicit sequence). For each request it records the delay it
actually applied, measured on ``time.perf_counter`` from just before the sleep
until the last body byte was written. Those records are the ground truth that
the load generator's latency figures are checked against.

Fault modes, each by request number (requests are numbered from 1 in the
order the server finished reading them):

* ``Stall``: one request waits an extra number of seconds before responding.
* ``Drip``: headers go out at once, then the body follows in chunks with a
  pause before each, so time-to-headers is much shorter than time-to-body.
* ``reset_on``: the server sets ``SO_LINGER`` to 0 and closes the socket, so
  the client gets a TCP reset instead of a response.

Use it as a context manager::

    with TimingServer(UniformDelay(0.02, 0.08, seed=1)) as server:
        ...  # send requests to server.url
    delays = server.applied_delays_s()
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from imgbench.errors import ConfigError

logger = logging.getLogger(__name__)

# Largest request body the server reads, in bytes; larger requests get HTTP 400.
MAX_BODY_BYTES = 64 * 1024 * 1024

# Bytes of each request body kept in its record, so a test can tell requests apart.
BODY_PREFIX_BYTES = 64

# Seconds an idle keep-alive connection stays open before its handler thread exits.
IDLE_TIMEOUT_S = 30.0


class DelayPlan:
    """Source of response delays in seconds; ``delays()`` yields one per request, in request order."""

    def delays(self) -> Iterator[float]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _check_delay(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid {name} {value!r}; use a finite number of seconds, 0 or more")


@dataclass(frozen=True)
class FixedDelay(DelayPlan):
    """The same delay, in seconds, for every request."""

    delay_s: float = 0.0

    def __post_init__(self) -> None:
        _check_delay("fixed delay", self.delay_s)

    def delays(self) -> Iterator[float]:
        return itertools.repeat(self.delay_s)

    def describe(self) -> str:
        return f"fixed {self.delay_s} s"


@dataclass(frozen=True)
class UniformDelay(DelayPlan):
    """Delays drawn uniformly from [low_s, high_s] by a generator seeded with ``seed``."""

    low_s: float
    high_s: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_delay("uniform delay low_s", self.low_s)
        _check_delay("uniform delay high_s", self.high_s)
        if self.high_s < self.low_s:
            raise ConfigError(f"invalid uniform delay: high_s {self.high_s} is below low_s {self.low_s}; swap them")

    def delays(self) -> Iterator[float]:
        rng = random.Random(self.seed)
        while True:
            yield rng.uniform(self.low_s, self.high_s)

    def describe(self) -> str:
        return f"uniform({self.low_s}, {self.high_s}) s, seed {self.seed}"


@dataclass(frozen=True)
class LogNormalDelay(DelayPlan):
    """Lognormal delays with the given median and shape ``sigma``, clipped to [min_s, max_s].

    The clip keeps a test's run time bounded; a draw outside the range is
    replaced by the nearest bound, not redrawn.
    """

    median_s: float
    sigma: float
    seed: int = 0
    min_s: float = 0.0
    max_s: float = 10.0

    def __post_init__(self) -> None:
        _check_delay("lognormal median_s", self.median_s)
        _check_delay("lognormal min_s", self.min_s)
        _check_delay("lognormal max_s", self.max_s)
        if self.median_s <= 0:
            raise ConfigError(f"invalid lognormal median_s {self.median_s}; use a positive number of seconds")
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ConfigError(f"invalid lognormal sigma {self.sigma!r}; use a finite number, 0 or more")
        if self.max_s < self.min_s:
            raise ConfigError(f"invalid lognormal clip: max_s {self.max_s} is below min_s {self.min_s}")

    def delays(self) -> Iterator[float]:
        rng = random.Random(self.seed)
        mu = math.log(self.median_s)
        while True:
            yield min(self.max_s, max(self.min_s, rng.lognormvariate(mu, self.sigma)))

    def describe(self) -> str:
        return (f"lognormal(median {self.median_s} s, sigma {self.sigma}) clipped to "
                f"[{self.min_s}, {self.max_s}] s, seed {self.seed}")


@dataclass(frozen=True)
class DelaySequence(DelayPlan):
    """An explicit delay per request, in seconds, repeated from the start when used up."""

    delays_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays_s:
            raise ConfigError("the delay sequence is empty; give at least one delay in seconds")
        for value in self.delays_s:
            _check_delay("sequence delay", value)

    def delays(self) -> Iterator[float]:
        return itertools.cycle(self.delays_s)

    def describe(self) -> str:
        return f"sequence of {len(self.delays_s)} delays, repeated"


@dataclass(frozen=True)
class Stall:
    """Request number ``request_number`` (from 1) waits ``seconds`` more than its planned delay."""

    request_number: int
    seconds: float

    def __post_init__(self) -> None:
        if self.request_number < 1:
            raise ConfigError(f"invalid stall request number {self.request_number}; requests count from 1")
        _check_delay("stall", self.seconds)


@dataclass(frozen=True)
class Drip:
    """Send the body in ``chunks`` pieces after the headers, pausing ``pause_s`` before each."""

    chunks: int
    pause_s: float

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ConfigError(f"invalid drip chunk count {self.chunks}; use 1 or more")
        _check_delay("drip pause", self.pause_s)


@dataclass
class RequestRecord:
    """Server-side record of one request; times are ``time.perf_counter`` values or seconds.

    ``applied_s`` runs from just before the delay until the last body byte
    was written (for a reset, until the socket was closed). ``headers_after_s``
    is the time from the same start until the headers were written, and None
    for a reset. A client's latency can fall short of ``applied_s`` by the
    time between the last write and the server's clock reading (microseconds,
    more if the handler thread is descheduled), but never below
    ``headers_after_s``, which is therefore the strict lower bound. ``body_prefix`` contains the first ``BODY_PREFIX_BYTES`` bytes
    of the request body. ``client_port`` identifies the client connection.
    """

    number: int
    client_port: int
    method: str
    path: str
    body_bytes: int
    body_prefix: bytes
    planned_delay_s: float
    fault: str | None = None
    started_at: float = 0.0
    applied_s: float | None = None
    headers_after_s: float | None = None


def split_body(body: bytes, chunks: int) -> list[bytes]:
    """Split ``body`` into ``chunks`` pieces of nearly equal size, none empty."""
    if len(body) < chunks:
        raise ConfigError(f"the response body has {len(body)} bytes, fewer than the {chunks} drip chunks; "
                          f"use a longer body or fewer chunks")
    size, extra = divmod(len(body), chunks)
    pieces, offset = [], 0
    for index in range(chunks):
        length = size + (1 if index < extra else 0)
        pieces.append(body[offset:offset + length])
        offset += length
    return pieces


class TimingHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps each client's connection open, as a real service would.
    protocol_version = "HTTP/1.1"
    # Headers and body (or drip chunks) go out in separate writes. With Nagle's
    # algorithm a small write can wait for the client's delayed ACK, about 40 ms on Linux.
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_S
    server: TimingServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond()

    def _respond(self) -> None:
        declared = self.headers.get("Content-Length") or "0"
        length = int(declared) if declared.isdigit() else -1
        if length < 0 or length > MAX_BODY_BYTES:
            logger.warning("timing server rejected Content-Length %r from port %d", declared, self.client_address[1])
            self.close_connection = True
            self.send_error(400, explain=f"invalid Content-Length {declared!r}; send 0 to {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length)
        record = self.server.begin_request(self.client_address[1], self.command, self.path, body)
        record.started_at = time.perf_counter()
        try:
            if record.fault == "reset":
                self._wait(record.planned_delay_s)
                self._reset()
            else:
                self._wait(record.planned_delay_s)
                self._write_response(record, self.server.response_body(body))
            record.applied_s = time.perf_counter() - record.started_at
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.close_connection = True
            logger.debug("client closed the connection during request %d: %s", record.number, exc)
        finally:
            self.server.end_request(record)

    def _wait(self, seconds: float) -> None:
        # An event wait rather than time.sleep, so stop() can cut a long stall short.
        if seconds > 0:
            self.server.stopping.wait(seconds)

    def _write_response(self, record: RequestRecord, body: bytes) -> None:
        server = self.server
        self.send_response(server.status)
        self.send_header("Content-Type", server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        record.headers_after_s = time.perf_counter() - record.started_at
        if server.drip is None:
            self.wfile.write(body)
            return
        for piece in split_body(body, server.drip.chunks):
            self._wait(server.drip.pause_s)
            self.wfile.write(piece)

    def _reset(self) -> None:
        # With SO_LINGER on and a zero timeout, close() discards unsent data and
        # sends RST instead of FIN. The file objects hold references to the
        # socket, so they are closed first for close() to take effect now.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.wfile.close()
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("timing server: " + format, *args)


class TimingServer(ThreadingHTTPServer):
    """Threaded HTTP server on 127.0.0.1 that responds after planned delays (see the module docstring).

    Every response has ``status`` and ``body`` unless a fault applies.
    ``body`` is either bytes or a function from the request body to the
    response body (a stand-in classifier, say). Records are kept for every
    request, so keep test runs bounded.
    """

    daemon_threads = True
    # Listen backlog. socketserver's default of 5 drops connection attempts when
    # dozens of workers connect at once, and each dropped SYN is retried after
    # about 1 s, which would show up as latency.
    request_queue_size = 128

    def __init__(self, delays: DelayPlan | None = None, *, stall: Stall | None = None,
                 drip: Drip | None = None, reset_on: Iterable[int] = (), status: int = 200,
                 body: bytes | Callable[[bytes], bytes] = b"ok", content_type: str = "text/plain"):
        self.delay_plan = delays if delays is not None else FixedDelay(0.0)
        self.stall = stall
        self.drip = drip
        self.reset_on = frozenset(reset_on)
        self.status = status
        self.body = body
        self.content_type = content_type
        if drip is not None and isinstance(body, bytes):
            split_body(body, drip.chunks)  # reject a body too short to drip now, not in a handler thread
        if any(number < 1 for number in self.reset_on):
            raise ConfigError(f"invalid reset request numbers {sorted(self.reset_on)}; requests count from 1")

        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._delays = self.delay_plan.delays()
        self._records: list[RequestRecord] = []
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self.max_in_flight = 0
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", 0), TimingHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/predict"

    def response_body(self, request_body: bytes) -> bytes:
        return self.body(request_body) if callable(self.body) else self.body

    def begin_request(self, client_port: int, method: str, path: str, body: bytes) -> RequestRecord:
        """Number the request, take its planned delay and fault, and count it in flight."""
        with self._lock:
            number = len(self._records) + 1
            delay = next(self._delays)
            fault = None
            if self.stall is not None and number == self.stall.request_number:
                delay += self.stall.seconds
                fault = "stall"
            if number in self.reset_on:
                fault = "reset"
            elif self.drip is not None and fault is None:
                fault = "drip"
            record = RequestRecord(number, client_port, method, path, len(body), body[:BODY_PREFIX_BYTES],
                                   planned_delay_s=delay, fault=fault)
            self._records.append(record)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return record

    def end_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._in_flight -= 1
            self._idle.notify_all()

    def records(self, wait_s: float = 2.0) -> list[RequestRecord]:
        """Return a copy of the request records, in request-number order.

        Waits up to ``wait_s`` seconds for requests in progress to finish,
        because a client can read the last body byte before the handler
        thread has stored ``applied_s``.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout=wait_s):
                logger.warning("timing server on %s: %d requests still in progress after %.1f s; "
                               "their records are incomplete", self.url, self._in_flight, wait_s)
            return list(self._records)

    def applied_delays_s(self, include_faults: bool = False) -> list[float]:
        """Return the applied delays of requests that got a response, without faulted ones unless ``include_faults``."""
        return [record.applied_s for record in self.records()
                if record.applied_s is not None and (include_faults or record.fault is None)]

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._records)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def start(self) -> TimingServer:
        """Serve requests on a background thread; returns the server."""
        if self._thread is not None:
            raise RuntimeError("the timing server is already started")
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="timing-server", daemon=True)
        self._thread.start()
        logger.info("timing server listening on %s, delays %s", self.url, self.delay_plan.describe())
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, cut pending delays short, close open connections and wait for handlers.

        Handlers still running after ``timeout_s`` seconds are left to finish
        on their own (they are daemon threads) and a warning is logged.
        """
        self.stopping.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=timeout_s)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler or the client
        deadline = time.monotonic() + timeout_s
        while self._in_flight_now() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._in_flight_now():
            logger.warning("timing server on %s stopped with %d requests still in progress",
                           self.url, self._in_flight_now())
        self.server_close()
        logger.info("timing server on %s stopped after %d requests", self.url, self.request_count)

    def _in_flight_now(self) -> int:
        with self._lock:
            return self._in_flight

    def __enter__(self) -> TimingServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

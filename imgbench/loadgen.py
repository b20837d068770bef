"""Load tests of an endpoint: closed loop (N workers) and open loop (fixed send rate).

Closed loop (``run_closed_loop``): N workers each own one client (by default a
``requests.Session``, so one keep-alive connection) and take the next request
number from a shared counter until the request count or the time limit is
reached. Each worker waits for its response before sending again, so a slow
response delays the requests behind it and the slow period is sampled only
once per worker ("coordinated omission").

Open loop (``run_open_loop``): request i is due at ``i / rate_per_s`` seconds
after the start, whatever happened to earlier requests. A pool of
``max_in_flight`` workers sends them. Latency runs from the request's
scheduled send time, so time spent waiting for a free worker counts
(coordinated-omission correction). The service time, from the actual send,
is kept beside it, and requests that found every worker busy are counted.

In both modes latency runs until the response body has been read, on
``time.perf_counter`` (a monotonic clock). Time-to-headers is kept as a
second figure: a response hook on each ``requests.Session``, or the
``KeepAliveClient`` itself, notes when the headers arrived. The first
``warmup`` requests are sent but summarised apart from the measured ones.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import math
import queue
import select
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import requests
from requests.adapters import HTTPAdapter

from imgbench.errors import ConfigError, ImgbenchError, error_kind
from imgbench.metrics import latency_summary
from imgbench.retry import retries_in_thread

logger = logging.getLogger(__name__)

# send(client, payload) performs one request and reads the whole response. The
# client is what session_factory returned for the worker: a requests.Session
# unless the caller chose another client, such as KeepAliveClient.
SendFn = Callable[[requests.Session, bytes], object]
ClientFactory = Callable[[], Any]

# Largest response head (status line and headers) KeepAliveClient accepts, in bytes.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

# Per-thread perf_counter time at which the headers of the thread's latest
# response arrived, in attribute ``at``. It is reset to None before each request.
_headers_clock = threading.local()


def mark_headers_received() -> None:
    """Note, for the calling thread, that the headers of the current response have arrived.

    The load generator's response hook calls this for ``requests`` clients. A
    custom client calls it after reading the status line and headers, before
    reading the body.
    """
    _headers_clock.at = time.perf_counter()


def _record_headers_time(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    # requests dispatches response hooks once the headers are parsed and before
    # it reads the body (requests 2.x, Session.send), with or without stream=True.
    mark_headers_received()
    return response


@dataclass(frozen=True)
class LoadConfig:
    """Closed-loop load test: measured requests, workers, wall-time limit in seconds and warm-up requests.

    The ``warmup`` requests come first and are sent on top of ``requests``.
    Use a warm-up of at least ``concurrency`` to open every worker's
    connection before measuring.
    """

    requests: int = 1000
    concurrency: int = 10
    max_seconds: float = 600.0
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ConfigError(f"invalid load-test request count {self.requests}; use 1 or more")
        if self.concurrency < 1:
            raise ConfigError(f"invalid load-test concurrency {self.concurrency}; use 1 or more")
        if not self.max_seconds > 0:
            raise ConfigError(f"invalid load-test time limit {self.max_seconds}; use a positive number of seconds")
        if self.warmup < 0:
            raise ConfigError(f"invalid load-test warm-up count {self.warmup}; use 0 or more")


@dataclass(frozen=True)
class OpenLoopConfig:
    """Open-loop load test: send rate per second, measured requests, time limit, worker pool size, warm-up.

    Request i (warm-up requests included) is due ``i / rate_per_s`` seconds
    after the start. ``max_in_flight`` workers send them, so at most that
    many requests are outstanding at once.
    """

    rate_per_s: float
    requests: int
    max_seconds: float
    max_in_flight: int
    warmup: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ConfigError(f"invalid open-loop rate {self.rate_per_s!r}; "
                              f"use a positive number of requests per second")
        if self.requests < 1:
            raise ConfigError(f"invalid open-loop request count {self.requests}; use 1 or more")
        if not self.max_seconds > 0:
            raise ConfigError(f"invalid open-loop time limit {self.max_seconds}; use a positive number of seconds")
        if self.max_in_flight < 1:
            raise ConfigError(f"invalid open-loop max_in_flight {self.max_in_flight}; use 1 or more workers")
        if self.warmup < 0:
            raise ConfigError(f"invalid open-loop warm-up count {self.warmup}; use 0 or more")

    @property
    def schedule_s(self) -> float:
        """Seconds from the first to the last scheduled send time."""
        return (self.warmup + self.requests - 1) / self.rate_per_s


class RequestSample(NamedTuple):
    """Timing of one sent request, in ``time.perf_counter`` seconds.

    ``scheduled`` equals ``started`` in closed loop. ``headers_at`` is None
    when the client did not report header arrival (a send function that
    bypasses the worker's client, or a failure before the headers).
    """

    number: int
    scheduled: float
    started: float
    finished: float
    headers_at: float | None
    error: str | None
    found_pool_busy: bool = False
    # Retries the send made (imgbench.retry); a retried request is left out of the latencies.
    retries: int = 0


@dataclass
class ConnectionPoolReport:
    """Connection pools of the worker clients, and how often urllib3 discarded a connection."""

    clients: int = 0
    requests_sessions: int = 0
    min_pool_maxsize: int | None = None
    pool_block: bool = False
    pool_full_warnings: int = 0

    def as_dict(self) -> dict:
        return {
            "clients": self.clients,
            "requests_sessions": self.requests_sessions,
            "min_pool_maxsize": self.min_pool_maxsize,
            "pool_block": self.pool_block,
            "pool_full_warnings": self.pool_full_warnings,
        }


def phase_summary(samples: Sequence[RequestSample]) -> dict:
    """Count and latency summary of a group of requests (used for the warm-up requests)."""
    errors = Counter(sample.error for sample in samples if sample.error is not None)
    latencies = [sample.finished - sample.scheduled for sample in samples if sample.error is None]
    return {
        "sent": len(samples),
        "succeeded": len(latencies),
        "failed": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "latency": latency_summary(latencies),
    }


def _measured_window_s(samples: Sequence[RequestSample]) -> float:
    """Seconds from the first measured request's scheduled send to the last one's completion."""
    if not samples:
        return 0.0
    return max(sample.finished for sample in samples) - min(sample.scheduled for sample in samples)


@dataclass
class LoadResult:
    """Outcome of one closed-loop load test; latencies are of successful measured requests only.

    ``wall_s`` runs from starting the workers to the last one finishing, warm-up
    included. ``measured_s`` runs from the first measured request's send to the
    last one's completion, and ``requests_per_s`` uses it.
    """

    config: LoadConfig
    wall_s: float
    sent: int
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    stopped_by_time_limit: bool = False
    headers_latencies_s: list[float] = field(default_factory=list)
    measured_s: float | None = None
    warmup_samples: list[RequestSample] = field(default_factory=list)
    connection_pool: ConnectionPoolReport = field(default_factory=ConnectionPoolReport)
    # Successful requests that retried: counted, but kept out of the latencies.
    retried: int = 0

    @property
    def requests_per_s(self) -> float:
        window = self.measured_s if self.measured_s is not None else self.wall_s
        return (len(self.latencies_s) + self.retried) / window if window > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": "closed_loop",
            "requests": self.config.requests,
            "concurrency": self.config.concurrency,
            "sent": self.sent,
            "succeeded": len(self.latencies_s) + self.retried,
            "retried": self.retried,
            "failed": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "wall_s": self.wall_s,
            "measured_s": self.measured_s,
            "requests_per_s": self.requests_per_s,
            "stopped_by_time_limit": self.stopped_by_time_limit,
            "latency": latency_summary(self.latencies_s),
            "headers_latency": latency_summary(self.headers_latencies_s),
            "warmup_requests": self.config.warmup,
            "warmup": phase_summary(self.warmup_samples),
            "connection_pool": self.connection_pool.as_dict(),
        }


@dataclass
class OpenLoopResult:
    """Outcome of one open-loop load test; latencies are of successful measured requests only.

    ``latencies_s`` run from each request's scheduled send time (corrected for
    coordinated omission); ``service_times_s`` from its actual send;
    ``headers_latencies_s`` from its actual send to the headers. A request
    counts in ``late_starts`` when every worker was busy at its scheduled
    time. ``start_lags_s`` contains actual minus scheduled send time for every
    measured request that was sent.
    """

    config: OpenLoopConfig
    wall_s: float
    sent: int
    latencies_s: list[float] = field(default_factory=list)
    service_times_s: list[float] = field(default_factory=list)
    headers_latencies_s: list[float] = field(default_factory=list)
    start_lags_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    late_starts: int = 0
    not_sent: int = 0
    stopped_by_time_limit: bool = False
    measured_s: float = 0.0
    achieved_rate_per_s: float | None = None
    warmup_samples: list[RequestSample] = field(default_factory=list)
    connection_pool: ConnectionPoolReport = field(default_factory=ConnectionPoolReport)
    # Successful requests that retried: counted, but kept out of the latencies.
    retried: int = 0

    @property
    def requests_per_s(self) -> float:
        return (len(self.latencies_s) + self.retried) / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def max_start_lag_s(self) -> float:
        return max(self.start_lags_s, default=0.0)

    def as_dict(self) -> dict:
        return {
            "mode": "open_loop",
            "requests": self.config.requests,
            "concurrency": self.config.max_in_flight,
            "max_in_flight": self.config.max_in_flight,
            "target_rate_per_s": self.config.rate_per_s,
            "achieved_rate_per_s": self.achieved_rate_per_s,
            "sent": self.sent,
            "not_sent": self.not_sent,
            "succeeded": len(self.latencies_s) + self.retried,
            "retried": self.retried,
            "failed": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "wall_s": self.wall_s,
            "measured_s": self.measured_s,
            "requests_per_s": self.requests_per_s,
            "stopped_by_time_limit": self.stopped_by_time_limit,
            "latency": latency_summary(self.latencies_s),
            "service_time": latency_summary(self.service_times_s),
            "headers_latency": latency_summary(self.headers_latencies_s),
            "late_starts": self.late_starts,
            "max_start_lag_s": self.max_start_lag_s,
            "start_lag": latency_summary(self.start_lags_s),
            "warmup_requests": self.config.warmup,
            "warmup": phase_summary(self.warmup_samples),
            "connection_pool": self.connection_pool.as_dict(),
        }


class HTTPStatusError(Exception):
    """The endpoint returned an HTTP error status (4xx or 5xx)."""

    def __init__(self, status: int, url: str):
        super().__init__(f"HTTP {status} from {url}")
        self.status = status
        self.url = url


def request_error_kind(exc: BaseException) -> str:
    """Name a failed request's error for the errors-by-kind table."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"http_{exc.response.status_code}"
    if isinstance(exc, HTTPStatusError):
        return f"http_{exc.status}"
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection"
    if isinstance(exc, ImgbenchError):
        return exc.kind
    # http.client and socket errors, as KeepAliveClient raises them. TimeoutError
    # comes first because socket.timeout is an alias of it and also an OSError.
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ConnectionError, http.client.HTTPException)):
        return "connection"
    return error_kind(exc)


class KeepAliveClient:
    """Minimal HTTP/1.1 client on one keep-alive socket that POSTs payloads to one ``http://`` URL.

    The load generator's fast path: it measures the same as the ``requests``
    path with about a twentieth of its CPU time per request. That was 21 to
    34 against 420 to 600 microseconds in ``python -m imgbench.harness_bench``
    on a busy 2-core AMD EPYC with Python 3.11.
    ``post`` sends the request in one write, notes header arrival with
    ``mark_headers_received`` and returns after the whole body is read. Bodies
    framed by Content-Length, chunked transfer coding or connection close are
    read; 1xx interim responses are skipped. Before reusing the socket it
    checks that the server has not closed it, as urllib3 does. It raises
    ``HTTPStatusError`` for 4xx and 5xx responses (after reading the body)
    and ``TimeoutError`` after ``timeout_s`` seconds without data. A closed
    connection or a malformed response raises ``ConnectionError`` or an
    ``http.client.HTTPException``. After any of these but an HTTP error
    status, the next request opens a new connection. Use it with ``keepalive_client_factory`` and
    ``keepalive_send``.
    """

    def __init__(self, url: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"invalid endpoint URL {url!r} for KeepAliveClient; use http://HOST[:PORT]/PATH "
                              f"(for https use the default requests session)")
        if not timeout_s > 0:
            raise ConfigError(f"invalid request timeout {timeout_s!r}; use a positive number of seconds")
        self.url = url
        self._address = (parts.hostname, parts.port or 80)
        self._timeout_s = timeout_s
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        header_lines = "".join(f"{name}: {value}\r\n" for name, value in
                               {"Content-Type": "application/octet-stream", **(headers or {})}.items())
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.port is not None:
            host += f":{parts.port}"
        self._request_head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{header_lines}".encode("latin-1")
        self._socket: socket.socket | None = None
        self._poller: select.poll | None = None
        self._buffer = bytearray()

    def post(self, payload: bytes) -> bytes:
        if self._socket is not None and self._is_dropped():
            self.close()
        if self._socket is None:
            self._connect()
        try:
            self._socket.sendall(b"%sContent-Length: %d\r\n\r\n%s" % (self._request_head, len(payload), payload))
            status, headers, keep_alive = self._read_head()
            mark_headers_received()
            body, reusable = self._read_body(status, headers)
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if not (keep_alive and reusable):
            self.close()
        if status >= 400:
            raise HTTPStatusError(status, self.url)
        return body

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self._poller = None
        self._buffer.clear()

    def _connect(self) -> None:
        self._socket = socket.create_connection(self._address, timeout=self._timeout_s)
        # The request goes out in one write, so Nagle's algorithm only adds delay.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._poller = select.poll()
        self._poller.register(self._socket, select.POLLIN)

    def _is_dropped(self) -> bool:
        # Between responses the socket must have nothing to read: readable
        # means the server closed it (EOF) or sent bytes no request asked for.
        return bool(self._buffer) or bool(self._poller.poll(0))

    def _fill(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected(f"{self.url} closed the connection during a response")
        self._buffer += chunk

    def _read_until(self, delimiter: bytes, limit: int) -> bytes:
        """Remove and return the buffered bytes up to and including ``delimiter``."""
        while (end := self._buffer.find(delimiter)) < 0:
            if len(self._buffer) > limit:
                raise http.client.LineTooLong(f"response head from {self.url} over {limit} bytes")
            self._fill()
        end += len(delimiter)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def _read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                self._fill()
            except http.client.RemoteDisconnected:
                raise http.client.IncompleteRead(bytes(self._buffer), count - len(self._buffer)) from None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _read_head(self) -> tuple[int, dict[str, str], bool]:
        """Read one final response's status line and headers; return status, headers and keep-alive."""
        while True:
            lines = self._read_until(b"\r\n\r\n", MAX_RESPONSE_HEAD_BYTES).decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise http.client.BadStatusLine(lines[0])
            status = int(code)
            if 100 <= status < 200 and status != 101:
                continue  # interim response; the final one follows
            headers = {}
            for line in lines[1:]:
                name, separator, value = line.partition(":")
                if separator:
                    headers[name.strip().lower()] = value.strip()
            connection = headers.get("connection", "").lower()
            keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
            return status, headers, keep_alive

    def _read_body(self, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
        """Read the body, framed by chunked coding, Content-Length or connection close in that order of precedence.

        Returns the body and whether the connection can carry another request.
        """
        if status in (204, 304) or 100 <= status < 200:
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked(), True
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise http.client.HTTPException(
                    f"invalid Content-Length {headers['content-length']!r} from {self.url}") from None
            return self._read_exact(length), True
        return self._read_to_eof(), False

    def _read_chunked(self) -> bytes:
        pieces = []
        while True:
            size_line = self._read_until(b"\r\n", MAX_RESPONSE_HEAD_BYTES)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise http.client.HTTPException(f"invalid chunk size line {size_line!r} from {self.url}") from None
            if size == 0:
                break
            chunk = self._read_exact(size + 2)
            if not chunk.endswith(b"\r\n"):
                raise http.client.HTTPException(f"chunk of {size} bytes from {self.url} not followed by CRLF")
            pieces.append(chunk[:-2])
        while self._read_until(b"\r\n", MAX_RESPONSE_HEAD_BYTES) != b"\r\n":
            pass  # trailer fields, not used
        return b"".join(pieces)

    def _read_to_eof(self) -> bytes:
        while True:
            chunk = self._socket.recv(65536)
            if not chunk:
                break
            self._buffer += chunk
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def keepalive_client_factory(url: str, timeout_s: float = 30.0) -> ClientFactory:
    """Return a session_factory that gives each worker its own ``KeepAliveClient`` for ``url``."""
    KeepAliveClient(url, timeout_s)  # reject an invalid URL before any worker starts

    def create() -> KeepAliveClient:
        return KeepAliveClient(url, timeout_s)

    return create


def keepalive_send(client: KeepAliveClient, payload: bytes) -> bytes:
    """Send function for ``KeepAliveClient`` workers."""
    return client.post(payload)


def post_sender(url: str, timeout_s: float = 30.0) -> SendFn:
    """Return a send function that POSTs the payload with a ``requests.Session``.

    It streams the response and then reads ``.content``, so the headers and
    the body arrive in two steps, and raises ``requests.HTTPError`` on 4xx
    and 5xx responses.
    """

    def send(session: requests.Session, payload: bytes) -> bytes:
        response = session.post(url, data=payload, timeout=timeout_s, stream=True)
        body = response.content
        response.raise_for_status()
        return body

    return send


class _PoolFullCounter(logging.Handler):
    """Counts urllib3's "Connection pool is full, discarding connection" warnings while installed.

    NOTE: the count covers every thread of the process, and urllib3 emits the
    warning only while its ``urllib3.connectionpool`` logger is enabled for
    WARNING (the default).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0
        self._logger = logging.getLogger("urllib3.connectionpool")

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Connection pool is full"):
            self.count += 1

    def __enter__(self) -> _PoolFullCounter:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)


def check_connection_pools(clients: Sequence[Any]) -> ConnectionPoolReport:
    """Check that the worker clients' connection pools can serve every worker at once.

    Raises ``ConfigError`` when a ``requests.Session`` mounts an HTTP adapter
    whose pool keeps fewer connections than the workers that share the
    session: such a pool blocks (``pool_block=True``) or opens and discards
    connections, and either skews latency. Other clients are not inspected.
    """
    shared_by = Counter(id(client) for client in clients)
    distinct = {id(client): client for client in clients}
    report = ConnectionPoolReport(clients=len(distinct))
    sizes = []
    for key, client in distinct.items():
        if not isinstance(client, requests.Session):
            continue
        report.requests_sessions += 1
        for prefix, adapter in client.adapters.items():
            pool_options = getattr(getattr(adapter, "poolmanager", None), "connection_pool_kw", None)
            if not isinstance(adapter, HTTPAdapter) or pool_options is None:
                continue
            maxsize = int(pool_options.get("maxsize", 1))
            block = bool(pool_options.get("block", False))
            workers = shared_by[key]
            if maxsize < max(1, workers):
                raise ConfigError(
                    f"the requests session for {prefix!r} has a connection pool of {maxsize} "
                    f"(pool_block={block}) shared by {workers} workers, so requests would "
                    f"{'wait for a connection' if block else 'open and discard connections'}; "
                    f"mount HTTPAdapter(pool_maxsize={max(1, workers)}) or let session_factory "
                    f"return a new session per worker")
            sizes.append(maxsize)
            report.pool_block = report.pool_block or block
    report.min_pool_maxsize = min(sizes, default=None)
    return report


def _prepare_clients(session_factory: ClientFactory, workers: int) -> tuple[list[Any], ConnectionPoolReport]:
    """Create one client per worker, check their pools and install the headers hook."""
    clients = [session_factory() for _ in range(workers)]
    try:
        report = check_connection_pools(clients)
    except ConfigError:
        _close_clients(clients)
        raise
    for client in {id(c): c for c in clients}.values():
        if isinstance(client, requests.Session) and _record_headers_time not in client.hooks["response"]:
            client.hooks["response"].append(_record_headers_time)
    return clients, report


def _close_clients(clients: Sequence[Any]) -> None:
    for client in {id(c): c for c in clients}.values():
        if isinstance(client, requests.Session) and _record_headers_time in client.hooks["response"]:
            client.hooks["response"].remove(_record_headers_time)
        close = getattr(client, "close", None)
        if close is not None:
            close()


def _send_one(send: SendFn, client: Any, payload: bytes, number: int, scheduled: float | None,
              found_pool_busy: bool = False) -> RequestSample:
    """Send one request and time it; an exception from ``send`` becomes the sample's error kind.

    ``scheduled`` is None in closed loop, where the request is due when it is sent.
    """
    _headers_clock.at = None
    retries_before = retries_in_thread()
    started = time.perf_counter()
    error = None
    try:
        send(client, payload)
    except Exception as exc:  # counted by kind, the load test goes on
        error = request_error_kind(exc)
        logger.debug("request %d failed: %s: %s", number, error, exc)
    finished = time.perf_counter()
    return RequestSample(number, scheduled if scheduled is not None else started, started, finished,
                         _headers_clock.at, error, found_pool_busy, retries_in_thread() - retries_before)


def _check_payloads(payloads: Sequence[bytes]) -> None:
    if not payloads:
        raise ConfigError("the load test needs at least one payload (the test set is empty)")


def run_closed_loop(send: SendFn, payloads: Sequence[bytes], config: LoadConfig,
                    session_factory: ClientFactory = requests.Session) -> LoadResult:
    """Send ``config.warmup + config.requests`` requests from ``config.concurrency`` workers.

    Payloads are used round-robin by request number. ``send`` performs one
    request, reads the whole response and raises on failure; its exception
    is counted by kind and the worker goes on. ``session_factory`` is called
    once per worker.
    """
    _check_payloads(payloads)
    total = config.warmup + config.requests
    counter = itertools.count()
    lock = threading.Lock()
    samples: list[RequestSample] = []
    deadline = time.perf_counter() + config.max_seconds
    timed_out = threading.Event()
    clients, pool_report = _prepare_clients(session_factory, config.concurrency)

    def worker(client: Any) -> None:
        local_samples = []
        try:
            while True:
                number = next(counter)
                if number >= total:
                    break
                if time.perf_counter() >= deadline:
                    timed_out.set()
                    break
                local_samples.append(_send_one(send, client, payloads[number % len(payloads)], number, None))
        finally:
            with lock:
                samples.extend(local_samples)

    logger.info("closed-loop load test: %d requests (+%d warm-up) from %d workers, time limit %.0f s",
                config.requests, config.warmup, config.concurrency, config.max_seconds)
    threads = [threading.Thread(target=worker, args=(client,), name=f"load-{i}", daemon=True)
               for i, client in enumerate(clients)]
    try:
        with _PoolFullCounter() as pool_full:
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
    finally:
        _close_clients(clients)
    pool_report.pool_full_warnings = pool_full.count

    result = _closed_loop_result(config, samples, wall, timed_out.is_set(), pool_report)
    _log_outcome("closed-loop", result.sent, result.errors, result.requests_per_s, pool_report)
    return result


def _closed_loop_result(config: LoadConfig, samples: list[RequestSample], wall: float, timed_out: bool,
                        pool_report: ConnectionPoolReport) -> LoadResult:
    samples.sort(key=lambda sample: sample.number)
    warmup = [sample for sample in samples if sample.number < config.warmup]
    measured = [sample for sample in samples if sample.number >= config.warmup]
    retried = sum(1 for sample in measured if sample.error is None and sample.retries)
    succeeded = [sample for sample in measured if sample.error is None and not sample.retries]
    return LoadResult(
        config=config,
        wall_s=wall,
        sent=len(measured),
        latencies_s=[sample.finished - sample.started for sample in succeeded],
        errors=Counter(sample.error for sample in measured if sample.error is not None),
        stopped_by_time_limit=timed_out,
        headers_latencies_s=[sample.headers_at - sample.started for sample in succeeded
                             if sample.headers_at is not None],
        measured_s=_measured_window_s(measured),
        warmup_samples=warmup,
        connection_pool=pool_report,
        retried=retried,
    )


def _log_outcome(mode: str, sent: int, errors: Counter, rate: float, pool_report: ConnectionPoolReport) -> None:
    logger.info("%s load test finished: %d requests sent, %d failed, %.1f requests/s",
                mode, sent, sum(errors.values()), rate)
    if errors:
        logger.warning("%s load test: %d of %d requests failed: %s", mode, sum(errors.values()), sent, dict(errors))
    if pool_report.pool_full_warnings:
        logger.warning("%s load test: urllib3 discarded %d connections because a connection pool was full; "
                       "give each worker its own session or a larger pool_maxsize",
                       mode, pool_report.pool_full_warnings)


def run_open_loop(send: SendFn, payloads: Sequence[bytes], config: OpenLoopConfig,
                  session_factory: ClientFactory = requests.Session) -> OpenLoopResult:
    """Send requests at ``config.rate_per_s`` from a pool of ``config.max_in_flight`` workers.

    The calling thread keeps the schedule and puts each request on the
    pool's unbounded queue when it is due, so it never waits for a free
    worker. A request that finds every worker busy waits in the queue, is
    counted in ``late_starts``, and its wait is part of its latency. When the
    time limit passes, scheduling stops and queued requests that have not
    started are counted in ``not_sent``, while requests already sent finish.
    ``send`` and ``session_factory`` are as in ``run_closed_loop``.
    """
    _check_payloads(payloads)
    total = config.warmup + config.requests
    if config.schedule_s > config.max_seconds:
        logger.warning("open-loop schedule of %d requests at %.1f/s lasts %.1f s, longer than the %.1f s time "
                       "limit; the run will stop early", total, config.rate_per_s, config.schedule_s,
                       config.max_seconds)
    clients, pool_report = _prepare_clients(session_factory, config.max_in_flight)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()
    samples: list[RequestSample] = []
    not_sent: list[int] = []
    outstanding = 0  # requests handed to the pool and not yet finished or dropped

    def worker(client: Any) -> None:
        nonlocal outstanding
        local_samples, local_not_sent = [], []
        try:
            while (job := jobs.get()) is not None:
                number, scheduled, found_pool_busy = job
                if time.perf_counter() >= deadline:
                    local_not_sent.append(number)
                else:
                    payload = payloads[number % len(payloads)]
                    local_samples.append(_send_one(send, client, payload, number, scheduled, found_pool_busy))
                with lock:
                    outstanding -= 1
        finally:
            with lock:
                samples.extend(local_samples)
                not_sent.extend(local_not_sent)

    logger.info("open-loop load test: %d requests (+%d warm-up) at %.1f/s, %d workers, time limit %.0f s",
                config.requests, config.warmup, config.rate_per_s, config.max_in_flight, config.max_seconds)
    threads = [threading.Thread(target=worker, args=(client,), name=f"open-load-{i}", daemon=True)
               for i, client in enumerate(clients)]
    timed_out = False
    try:
        with _PoolFullCounter() as pool_full:
            for thread in threads:
                thread.start()
            # The schedule starts once the workers wait for jobs; they read
            # ``deadline`` only after taking a job, so it is set by then.
            start = time.perf_counter()
            deadline = start + config.max_seconds
            for number in range(total):
                due = start + number / config.rate_per_s
                if due >= deadline:
                    timed_out = True
                    break
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                with lock:
                    found_pool_busy = outstanding >= config.max_in_flight
                    outstanding += 1
                jobs.put((number, due, found_pool_busy))
            for _ in threads:
                jobs.put(None)
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
    finally:
        _close_clients(clients)
    pool_report.pool_full_warnings = pool_full.count

    dropped = sum(1 for number in not_sent if number >= config.warmup)
    result = _open_loop_result(config, samples, wall, timed_out or bool(not_sent), dropped, pool_report)
    _log_outcome("open-loop", result.sent, result.errors, result.requests_per_s, pool_report)
    if result.late_starts:
        logger.warning("open-loop load test fell behind: %d of %d requests found all %d workers busy "
                       "(max start lag %.3f s); raise max_in_flight or lower rate_per_s",
                       result.late_starts, result.sent, config.max_in_flight, result.max_start_lag_s)
    return result


def _open_loop_result(config: OpenLoopConfig, samples: list[RequestSample], wall: float, timed_out: bool,
                      not_sent: int, pool_report: ConnectionPoolReport) -> OpenLoopResult:
    samples.sort(key=lambda sample: sample.number)
    warmup = [sample for sample in samples if sample.number < config.warmup]
    measured = [sample for sample in samples if sample.number >= config.warmup]
    retried = sum(1 for sample in measured if sample.error is None and sample.retries)
    succeeded = [sample for sample in measured if sample.error is None and not sample.retries]
    achieved = None
    if len(measured) >= 2:
        span = max(sample.started for sample in measured) - min(sample.started for sample in measured)
        achieved = (len(measured) - 1) / span if span > 0 else None
    return OpenLoopResult(
        config=config,
        wall_s=wall,
        sent=len(measured),
        latencies_s=[sample.finished - sample.scheduled for sample in succeeded],
        service_times_s=[sample.finished - sample.started for sample in succeeded],
        headers_latencies_s=[sample.headers_at - sample.started for sample in succeeded
                             if sample.headers_at is not None],
        start_lags_s=[sample.started - sample.scheduled for sample in measured],
        errors=Counter(sample.error for sample in measured if sample.error is not None),
        late_starts=sum(1 for sample in measured if sample.found_pool_busy),
        not_sent=not_sent,
        stopped_by_time_limit=timed_out,
        measured_s=_measured_window_s(measured),
        achieved_rate_per_s=achieved,
        warmup_samples=warmup,
        connection_pool=pool_report,
        retried=retried,
    )

"""Tests of imgbench.loadgen.run_closed_loop against a real HTTP server.

Each test starts a ``ThreadingHTTPServer`` on 127.0.0.1 with an OS-chosen
port. The handler records how many requests are in flight at once, so the
tests can check the worker count from the server's side. Every test sends at
most a few dozen requests and finishes well under 2 seconds.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from imgbench.errors import ConfigError
from imgbench.loadgen import LoadConfig, request_error_kind, run_closed_loop

PAYLOADS = [b"image-a", b"image-b", b"image-c"]


@dataclass
class ServerState:
    """Settings and counters of one test server. The counters are guarded by ``lock``."""

    delay_s: float = 0.0
    # Every n-th request, counting from 1, gets a 503 response. Zero means none do.
    fail_every: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: Counter = field(default_factory=Counter)


class RecordingHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps each worker's connection open, as a real service would.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes. With Nagle's algorithm the body
    # waits for the client's delayed ACK, which added about 40 ms per request on Linux.
    disable_nagle_algorithm = True
    server: "RecordingServer"

    def do_POST(self) -> None:
        state = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with state.lock:
            state.received += 1
            number = state.received
            state.bodies[body] += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            time.sleep(state.delay_s)
            failing = state.fail_every and number % state.fail_every == 0
            self._answer(503 if failing else 200, b"" if failing else b'{"label": "cat"}')
        finally:
            with state.lock:
                state.in_flight -= 1

    def _answer(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as in the timeout test

    def log_message(self, format: str, *args) -> None:
        pass  # keep the test output free of access logs


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.state = state

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/predict"


@pytest.fixture
def start_server(request: pytest.FixtureRequest) -> Callable[..., RecordingServer]:
    """Return a function that starts a test server. Each server stops when the test ends."""

    def start(delay_s: float = 0.0, fail_every: int = 0) -> RecordingServer:
        server = RecordingServer(ServerState(delay_s=delay_s, fail_every=fail_every))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            thread.join(timeout=2)
            # Let handlers that are still sleeping, as in the timeout test, finish before the socket closes.
            deadline = time.monotonic() + 2
            while server.state.in_flight and time.monotonic() < deadline:
                time.sleep(0.01)
            server.server_close()

        request.addfinalizer(stop)
        return server

    return start


def make_session() -> requests.Session:
    # Ignore proxy settings from the environment, so requests go straight to 127.0.0.1.
    session = requests.Session()
    session.trust_env = False
    return session


def post_to(url: str, timeout_s: float = 5.0):
    """Return a send function that POSTs the payload to ``url`` and raises on HTTP errors."""

    def send(session: requests.Session, payload: bytes) -> bytes:
        response = session.post(url, data=payload, timeout=timeout_s)
        response.raise_for_status()
        return response.content

    return send


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """URL of a local port that was free a moment ago and has nothing listening now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}/predict"


def run(url: str, requests_count: int, concurrency: int, max_seconds: float = 10.0, **send_options):
    config = LoadConfig(requests=requests_count, concurrency=concurrency, max_seconds=max_seconds)
    return run_closed_loop(post_to(url, **send_options), PAYLOADS, config, session_factory=make_session)


def test_every_request_counted(start_server) -> None:
    server = start_server()

    result = run(server.url, requests_count=30, concurrency=3)

    assert result.sent == 30
    assert server.state.received == 30
    assert len(result.latencies_s) == 30
    assert not result.errors
    assert not result.stopped_by_time_limit


def test_payloads_used_round_robin(start_server) -> None:
    server = start_server()

    run(server.url, requests_count=9, concurrency=2)

    assert server.state.bodies == Counter({payload: 3 for payload in PAYLOADS})


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_reaches_limit(start_server, concurrency: int) -> None:
    # 10 rounds of 20 ms requests per worker: long enough for every worker to
    # be in flight at once, short enough to finish in about 0.2 s.
    server = start_server(delay_s=0.02)

    result = run(server.url, requests_count=10 * concurrency, concurrency=concurrency)

    assert server.state.max_in_flight == concurrency
    assert result.sent == 10 * concurrency


def test_latency_covers_server_delay(start_server) -> None:
    server = start_server(delay_s=0.02)

    result = run(server.url, requests_count=8, concurrency=2)

    assert min(result.latencies_s) >= 0.02
    assert result.as_dict()["latency"]["count"] == 8


def test_http_503_counted_by_kind(start_server) -> None:
    server = start_server(fail_every=3)

    result = run(server.url, requests_count=30, concurrency=3)

    assert result.errors == Counter({"http_503": 10})
    assert len(result.latencies_s) == 20
    assert result.sent == 30


def test_result_dict_counts(start_server) -> None:
    server = start_server(fail_every=3)

    summary = run(server.url, requests_count=30, concurrency=3).as_dict()

    assert summary["succeeded"] == 20
    assert summary["failed"] == 10
    assert summary["errors_by_kind"] == {"http_503": 10}
    assert summary["requests_per_s"] > 0


def test_closed_port_counted_as_connection(closed_port_url: str) -> None:
    result = run(closed_port_url, requests_count=6, concurrency=2)

    assert result.errors == Counter({"connection": 6})
    assert result.sent == 6
    assert result.latencies_s == []


def test_client_timeout_counted(start_server) -> None:
    server = start_server(delay_s=0.3)

    result = run(server.url, requests_count=2, concurrency=2, timeout_s=0.05)

    assert result.errors == Counter({"timeout": 2})


def test_time_limit_stops_run(start_server) -> None:
    server = start_server(delay_s=0.02)

    started = time.perf_counter()
    result = run(server.url, requests_count=10_000, concurrency=2, max_seconds=0.15)
    elapsed = time.perf_counter() - started

    assert result.stopped_by_time_limit
    assert result.sent < 10_000
    assert result.sent == server.state.received
    assert elapsed < 1.0


def test_no_payloads_rejected() -> None:
    with pytest.raises(ConfigError, match="at least one payload"):
        run_closed_loop(post_to("http://127.0.0.1:9/"), [], LoadConfig(requests=1, concurrency=1))


def test_unexpected_error_kind() -> None:
    assert request_error_kind(RuntimeError("bug in send")) == "crash"

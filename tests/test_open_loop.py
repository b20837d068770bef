"""Tests of the open-loop load generator and of what it shares with the closed loop.

Covers ``run_open_loop`` (schedule, coordinated-omission correction, late
starts, time limit), the warm-up option and the connection-pool checks of
both modes, and the fast client ``KeepAliveClient``. Servers are
``TimingServer`` instances, or a canned-response socket server for HTTP
framing cases, all on 127.0.0.1 with OS-chosen ports. Each test sends at most
about a hundred requests and takes at most about a second.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

from imgbench.errors import ConfigError
from imgbench.loadgen import (KeepAliveClient, LoadConfig, OpenLoopConfig, keepalive_client_factory,
                              keepalive_send, post_sender, run_closed_loop, run_open_loop)
from imgbench.timing_server import DelaySequence, Drip, FixedDelay, TimingServer

# Timing-sensitive: tox runs these after the other tests, alone on the machine.
pytestmark = pytest.mark.timing


def make_session() -> requests.Session:
    # Ignore proxy settings from the environment, so requests go straight to 127.0.0.1.
    session = requests.Session()
    session.trust_env = False
    return session


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[TimingServer]:
    """A started TimingServer; ``@pytest.mark.parametrize("server", [kwargs], indirect=True)`` sets its options."""
    options = getattr(request, "param", {})
    with TimingServer(**options) as started:
        yield started


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """URL of a local port that was free a moment ago and has nothing listening now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}/predict"


def open_loop(url: str, rate_per_s: float, requests_count: int, max_in_flight: int, max_seconds: float = 10.0,
              warmup: int = 0, **factory_options):
    config = OpenLoopConfig(rate_per_s=rate_per_s, requests=requests_count, max_seconds=max_seconds,
                            max_in_flight=max_in_flight, warmup=warmup)
    session_factory = factory_options.get("session_factory", make_session)
    return run_open_loop(factory_options.get("send", post_sender(url, timeout_s=5.0)), [b"image"], config,
                         session_factory=session_factory)


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.01)}], indirect=True)
def test_open_loop_keeps_rate(server: TimingServer) -> None:
    """50 requests at 50/s: sends are 20 ms apart and no request waits for a worker.

    Each request needs one worker for about 10 ms; 20 workers leave room for a
    burst of overdue requests after the process was not scheduled for a while.
    """
    result = open_loop(server.url, rate_per_s=50.0, requests_count=50, max_in_flight=20)

    summary = result.as_dict()
    assert summary["sent"] == 50
    assert server.request_count == 50
    assert summary["late_starts"] == 0
    assert summary["target_rate_per_s"] == 50.0
    assert summary["achieved_rate_per_s"] == pytest.approx(50.0, rel=0.1)
    assert summary["latency"]["count"] == 50
    assert summary["service_time"]["count"] == 50
    assert not summary["stopped_by_time_limit"]


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.1)}], indirect=True)
def test_saturated_pool_reported(server: TimingServer) -> None:
    """One worker, 100 ms responses, one request due every 50 ms: each request starts later than the last.

    Request i is due at 0.05 i s and cannot start before the 0.1 s requests
    ahead of it have finished, at 0.1 i s or later. So the last request waits
    at least 0.45 s, and at most the measured service times of the 9 before
    it minus 0.45 s (plus a little for handing over the job). Every request but
    the first finds the worker busy; one may not, if the scheduling thread
    alone was held up for more than 50 ms.
    """
    result = open_loop(server.url, rate_per_s=20.0, requests_count=10, max_in_flight=1)

    summary = result.as_dict()
    assert summary["late_starts"] >= 8
    assert summary["max_start_lag_s"] >= 0.44
    assert summary["max_start_lag_s"] <= sum(result.service_times_s[:9]) - 0.45 + 0.05
    assert summary["latency"]["max_s"] >= 0.54
    assert summary["service_time"]["min_s"] >= 0.1
    assert summary["achieved_rate_per_s"] < 0.6 * summary["target_rate_per_s"]
    assert all(latency >= service for latency, service in zip(result.latencies_s, result.service_times_s))


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.2)}], indirect=True)
def test_open_loop_time_limit(server: TimingServer) -> None:
    """At the time limit scheduling stops and requests still waiting for the worker are not sent.

    Requests 0 to 24 are due in the first 0.5 s. The one worker starts a
    0.2 s request at about 0, 0.2 and 0.4 s, and the rest are dropped.
    """
    result = open_loop(server.url, rate_per_s=50.0, requests_count=100, max_in_flight=1, max_seconds=0.5)

    assert result.stopped_by_time_limit
    assert result.sent + result.not_sent == 25
    assert 2 <= result.sent <= 4
    assert server.request_count == result.sent
    assert result.wall_s < 1.5


@pytest.mark.parametrize("server", [{"status": 503}], indirect=True)
def test_open_loop_counts_http_errors(server: TimingServer) -> None:
    result = open_loop(server.url, rate_per_s=100.0, requests_count=10, max_in_flight=2)

    assert result.errors == Counter({"http_503": 10})
    assert result.latencies_s == []
    assert result.as_dict()["failed"] == 10


# The first 5 requests to reach the server take 0.3 s, the next 10 take 0.01 s.
WARMUP_DELAYS = {"delays": DelaySequence((0.3,) * 5 + (0.01,) * 10)}
WARMUP_PAYLOADS = [b"warm-up-%d" % number for number in range(5)] + [b"measured-%d" % number for number in range(10)]


def check_warmup_kept_apart(summary: dict, server: TimingServer) -> None:
    """Check counts, and latencies against the server's delays for the warm-up and the measured payloads.

    The requests' payloads identify the group of each server record, so
    the check stays valid even if two requests reached the server out of order.
    A latency is never below the time its request took until the server
    wrote the headers. A measured latency of 0.3 s or more, where every
    measured request took 0.01 s, means warm-up requests were mixed in.
    """
    records = server.records()
    warmup_records = [record for record in records if record.body_prefix.startswith(b"warm-up")]
    measured_records = [record for record in records if record.body_prefix.startswith(b"measured")]
    assert len(warmup_records) == 5
    assert len(measured_records) == 10
    assert summary["sent"] == 10
    assert summary["warmup_requests"] == 5
    assert summary["warmup"]["sent"] == 5
    assert summary["latency"]["count"] == 10
    assert summary["warmup"]["latency"]["min_s"] >= min(record.headers_after_s for record in warmup_records)
    assert summary["latency"]["min_s"] >= min(record.headers_after_s for record in measured_records)
    assert summary["latency"]["max_s"] < max(record.applied_s for record in measured_records) + 0.25


@pytest.mark.parametrize("server", [WARMUP_DELAYS], indirect=True)
def test_open_loop_warmup_kept_apart(server: TimingServer) -> None:
    config = OpenLoopConfig(rate_per_s=10.0, requests=10, max_seconds=10.0, max_in_flight=8, warmup=5)

    result = run_open_loop(post_sender(server.url, timeout_s=5.0), WARMUP_PAYLOADS, config,
                           session_factory=make_session)

    check_warmup_kept_apart(result.as_dict(), server)


@pytest.mark.parametrize("server", [WARMUP_DELAYS], indirect=True)
def test_closed_loop_warmup_kept_apart(server: TimingServer) -> None:
    config = LoadConfig(requests=10, concurrency=1, max_seconds=10.0, warmup=5)

    result = run_closed_loop(post_sender(server.url, timeout_s=5.0), WARMUP_PAYLOADS, config,
                             session_factory=make_session)

    summary = result.as_dict()
    check_warmup_kept_apart(summary, server)
    assert summary["measured_s"] < summary["wall_s"] - 1.0


@pytest.mark.parametrize(("options", "message"), [
    ({"rate_per_s": 0.0}, "open-loop rate"),
    ({"rate_per_s": float("inf")}, "open-loop rate"),
    ({"requests": 0}, "request count"),
    ({"max_seconds": 0.0}, "time limit"),
    ({"max_in_flight": 0}, "max_in_flight"),
    ({"warmup": -1}, "warm-up count"),
])
def test_open_loop_config_rejected(options: dict, message: str) -> None:
    valid = {"rate_per_s": 10.0, "requests": 10, "max_seconds": 5.0, "max_in_flight": 2}

    with pytest.raises(ConfigError, match=message):
        OpenLoopConfig(**{**valid, **options})


def test_closed_loop_warmup_rejected() -> None:
    with pytest.raises(ConfigError, match="warm-up count -1"):
        LoadConfig(requests=10, concurrency=2, warmup=-1)


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.01)}], indirect=True)
def test_result_dicts_keep_closed_loop_keys(server: TimingServer) -> None:
    """Both result dicts keep every key the closed-loop dict had, so existing reports still read them."""
    original_keys = {"requests", "concurrency", "sent", "succeeded", "failed", "errors_by_kind", "wall_s",
                     "requests_per_s", "stopped_by_time_limit", "latency"}

    closed = run_closed_loop(post_sender(server.url), [b"image"], LoadConfig(requests=4, concurrency=2),
                             session_factory=make_session).as_dict()
    opened = open_loop(server.url, rate_per_s=100.0, requests_count=4, max_in_flight=2).as_dict()

    assert original_keys <= closed.keys()
    assert original_keys <= opened.keys()
    assert closed["mode"] == "closed_loop"
    assert opened["mode"] == "open_loop"
    assert closed["headers_latency"]["count"] == 4
    assert opened["headers_latency"]["count"] == 4


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.02)}], indirect=True)
def test_worker_sessions_own_connections(server: TimingServer) -> None:
    config = LoadConfig(requests=20, concurrency=4, max_seconds=10.0, warmup=4)

    result = run_closed_loop(post_sender(server.url), [b"image"], config, session_factory=make_session)

    pool = result.as_dict()["connection_pool"]
    assert pool == {"clients": 4, "requests_sessions": 4, "min_pool_maxsize": 10, "pool_block": False,
                    "pool_full_warnings": 0}
    assert len({record.client_port for record in server.records()}) == 4


def shared_session(pool_maxsize: int, pool_block: bool) -> requests.Session:
    session = make_session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize, pool_block=pool_block)
    session.mount("http://", adapter)
    return session


@pytest.mark.parametrize("pool_block", [False, True])
def test_small_shared_pool_rejected(pool_block: bool) -> None:
    session = shared_session(pool_maxsize=2, pool_block=pool_block)
    config = LoadConfig(requests=8, concurrency=4)

    with pytest.raises(ConfigError, match="pool_maxsize=4"):
        run_closed_loop(post_sender("http://127.0.0.1:9/"), [b"image"], config, session_factory=lambda: session)


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.02)}], indirect=True)
def test_pool_full_warnings_counted(server: TimingServer) -> None:
    """A send function that bypasses the worker sessions for one shared pool of 1 is caught at run time.

    Four workers send at once through a session whose pool keeps one
    connection, so urllib3 opens extra connections and discards them with a
    "Connection pool is full" warning, which the result counts.
    """
    bypass = shared_session(pool_maxsize=1, pool_block=False)
    send_through_bypass = post_sender(server.url)
    config = LoadConfig(requests=20, concurrency=4, max_seconds=10.0)

    result = run_closed_loop(lambda _session, payload: send_through_bypass(bypass, payload), [b"image"], config,
                             session_factory=make_session)
    bypass.close()

    summary = result.as_dict()
    assert summary["connection_pool"]["pool_full_warnings"] >= 1
    assert summary["headers_latency"]["count"] == 0
    assert summary["succeeded"] == 20


def keepalive_run(url: str, requests_count: int = 20, concurrency: int = 2, timeout_s: float = 5.0):
    config = LoadConfig(requests=requests_count, concurrency=concurrency, max_seconds=10.0)
    return run_closed_loop(keepalive_send, [b"image"], config,
                           session_factory=keepalive_client_factory(url, timeout_s=timeout_s))


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.005)}], indirect=True)
def test_keepalive_client_reuses_connections(server: TimingServer) -> None:
    result = keepalive_run(server.url, requests_count=20, concurrency=2)

    summary = result.as_dict()
    assert summary["succeeded"] == 20
    assert summary["headers_latency"]["count"] == 20
    assert server.request_count == 20
    assert len({record.client_port for record in server.records()}) == 2
    assert {record.body_prefix for record in server.records()} == {b"image"}


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.005), "reset_on": {3, 6}}], indirect=True)
def test_keepalive_client_reset_counted(server: TimingServer) -> None:
    result = keepalive_run(server.url, requests_count=10, concurrency=2)

    assert result.errors == Counter({"connection": 2})
    assert len(result.latencies_s) == 8
    assert server.request_count == 10


@pytest.mark.parametrize("server", [{"status": 503}], indirect=True)
def test_keepalive_client_http_error(server: TimingServer) -> None:
    result = keepalive_run(server.url, requests_count=6)

    assert result.errors == Counter({"http_503": 6})
    assert len({record.client_port for record in server.records()}) == 2


@pytest.mark.parametrize("server", [{"delays": FixedDelay(0.5)}], indirect=True)
def test_keepalive_client_timeout(server: TimingServer) -> None:
    result = keepalive_run(server.url, requests_count=2, concurrency=2, timeout_s=0.05)

    assert result.errors == Counter({"timeout": 2})


def test_keepalive_client_closed_port(closed_port_url: str) -> None:
    result = keepalive_run(closed_port_url, requests_count=4)

    assert result.errors == Counter({"connection": 4})


@pytest.mark.parametrize("server", [{"drip": Drip(chunks=3, pause_s=0.2), "body": b"x" * 3000}], indirect=True)
def test_keepalive_client_drip(server: TimingServer) -> None:
    """Headers arrive at once; the body 0.6 s later, after three 0.2 s pauses."""
    result = keepalive_run(server.url, requests_count=2, concurrency=2)

    summary = result.as_dict()
    assert summary["succeeded"] == 2
    assert summary["headers_latency"]["max_s"] < 0.2
    assert summary["latency"]["min_s"] >= 0.6


def test_keepalive_client_rejects_https() -> None:
    with pytest.raises(ConfigError, match="https"):
        KeepAliveClient("https://127.0.0.1:8443/predict")


class CannedServer:
    """Socket server on 127.0.0.1 that responds to each request with the next canned response.

    It closes the connection after each response whose index is in
    ``close_after``, and stops after ``len(responses)`` requests.
    """

    def __init__(self, responses: list[bytes], close_after: set[int] = frozenset()):
        self.responses = responses
        self.close_after = close_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5.0)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/predict"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        index = 0
        while index < len(self.responses):
            connection, _ = self.listener.accept()
            with connection:
                connection.settimeout(5.0)
                while index < len(self.responses) and self._read_request(connection):
                    connection.sendall(self.responses[index])
                    index += 1
                    if index - 1 in self.close_after:
                        break

    @staticmethod
    def _read_request(connection: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += connection.recv(65536)
        return True

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize(("response", "body"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n5;ext=1\r\n then\r\n0\r\nX-Trailer: 1\r\n\r\n",
     b"ok then"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nConnection: keep-alive\r\n\r\nhello", b"hello"),
], ids=["chunked", "interim-100", "no-content", "lowercase-length"])
def test_keepalive_client_framing(response: bytes, body: bytes) -> None:
    """Each framing is read exactly: a second response on the same connection still parses."""
    canned = CannedServer([response, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"])
    client = KeepAliveClient(canned.url, timeout_s=5.0)
    try:
        first = client.post(b"image")
        second = client.post(b"image")
    finally:
        client.close()
        canned.close()

    assert first == body
    assert second == b"next"


def test_keepalive_client_reads_until_close() -> None:
    """An HTTP/1.0 response without Content-Length ends at connection close; the next request reconnects."""
    canned = CannedServer([b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"],
                          close_after={0})
    client = KeepAliveClient(canned.url, timeout_s=5.0)
    try:
        first = client.post(b"image")
        second = client.post(b"image")
    finally:
        client.close()
        canned.close()

    assert first == b"until close"
    assert second == b"next"


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"SPDY/3 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\nok",
], ids=["truncated-body", "bad-status-line", "bad-chunk-end", "bad-length"])
def test_keepalive_client_malformed_response(response: bytes) -> None:
    """A malformed response is a 'connection' error, as requests reports one, and the client recovers."""
    canned = CannedServer([response, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"], close_after={0})
    try:
        result = run_closed_loop(keepalive_send, [b"image"], LoadConfig(requests=2, concurrency=1),
                                 session_factory=keepalive_client_factory(canned.url, timeout_s=5.0))
    finally:
        canned.close()

    assert result.errors == Counter({"connection": 1})
    assert len(result.latencies_s) == 1

"""Measure the load generator's own speed against wrk on a no-op endpoint.

Run ``python -m imgbench.harness_bench`` (wrk must be on PATH: ``apt-get
install -y wrk``). It starts a no-op HTTP/1.1 endpoint on 127.0.0.1 in a child
process and, in one run, measures:

* imgbench's closed loop at concurrency 10 with the default client
  (``requests.Session``) and with the fast client (``KeepAliveClient``):
  per-request latency until the body is read, and the request rate;
* ``wrk -t2 -c10 -d5s --latency`` against the same endpoint, sending the
  same 2-byte POST body;
* both again at concurrency 1 (``wrk -t1 -c1``), where latency is the
  client's own overhead plus one loopback round trip.

It prints the figures and the ratios harness/wrk, where a lower latency ratio
and a higher rate ratio favour the harness. The machine, the load average and
the CPU time per request of the endpoint and of the client are printed too.

The endpoint is a single asyncio ``Protocol`` that finds request boundaries
by Content-Length and writes a fixed 2-byte response. It runs in its own
process, so it does not share the harness's GIL.

NOTE: wrk 4 rewrites its latency histogram before printing it (function
``stats_correct`` in wrk's src/wrk.c): for every response slower than the
mean interval between requests on a connection, it adds synthetic samples,
as a correction for coordinated omission. imgbench's closed loop adds none.
wrk's mean, p90 and p99 can therefore exceed what its request rate allows
(concurrency / rate), and p50 is the fairest latency to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from imgbench.errors import ConfigError
from imgbench.loadgen import (LoadConfig, keepalive_client_factory, keepalive_send, post_sender,
                              run_closed_loop)

logger = logging.getLogger(__name__)

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
PAYLOAD = b"xx"
# Upper bound on requests per harness phase; the phase's duration stops it first.
MAX_PHASE_REQUESTS = 5_000_000
WRK_SCRIPT = """wrk.method = "POST"
wrk.body = "xx"
wrk.headers["Content-Type"] = "application/octet-stream"
"""


class NoOpProtocol(asyncio.Protocol):
    """Respond to every complete HTTP/1.1 request on the connection with ``RESPONSE``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        responses = 0
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end].lower()
            length = 0
            if (start := head.find(b"content-length:")) >= 0:
                line_end = head.find(b"\r\n", start)
                length = int(head[start + 15:line_end if line_end >= 0 else None])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length:]
            responses += 1
        self.buffer = buffer
        if responses:
            self.transport.write(RESPONSE * responses)


async def serve_noop() -> None:
    """Serve the no-op endpoint until standard input closes (the parent process has exited)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NoOpProtocol, "127.0.0.1", 0, backlog=128)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}/predict", flush=True)
    stdin_closed = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stdin_closed.set)),
                     daemon=True).start()
    async with server:
        await stdin_closed.wait()


class NoOpEndpoint:
    """The no-op endpoint in a child process; a context manager that stops it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "imgbench.harness_bench", "--serve"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the no-op endpoint did not start; its first output line was {line!r}")
        self.url = line.removeprefix("listening on ")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the endpoint process has used so far, from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> NoOpEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class PhaseResult:
    """One client's figures against the endpoint; latencies in milliseconds."""

    client: str
    concurrency: int
    requests_per_s: float
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    requests: int
    errors: int
    seconds: float
    client_cpu_per_s: float
    endpoint_cpu_per_s: float
    load_average_1min: float

    @property
    def client_cpu_us_per_request(self) -> float:
        return 1e6 * self.client_cpu_per_s / self.requests_per_s if self.requests_per_s else 0.0

    @property
    def endpoint_cpu_us_per_request(self) -> float:
        return 1e6 * self.endpoint_cpu_per_s / self.requests_per_s if self.requests_per_s else 0.0


def machine_info() -> dict:
    """Describe the machine: CPUs, CPU model, Python, and the load average at the start."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0],
    }


def run_harness(endpoint: NoOpEndpoint, client: str, concurrency: int, seconds: float) -> PhaseResult:
    """Run imgbench's closed loop with ``client`` ("requests" or "keepalive") for ``seconds``."""
    if client == "requests":
        def new_session() -> requests.Session:
            session = requests.Session()
            session.trust_env = False  # no proxy from the environment for 127.0.0.1
            return session

        send, factory = post_sender(endpoint.url, timeout_s=10.0), new_session
    else:
        send, factory = keepalive_send, keepalive_client_factory(endpoint.url, timeout_s=10.0)
    config = LoadConfig(requests=MAX_PHASE_REQUESTS, concurrency=concurrency, max_seconds=seconds,
                        warmup=10 * concurrency)
    load = os.getloadavg()[0]
    endpoint_cpu, own_cpu = endpoint.cpu_seconds(), time.process_time()
    result = run_closed_loop(send, [PAYLOAD], config, session_factory=factory)
    endpoint_cpu, own_cpu = endpoint.cpu_seconds() - endpoint_cpu, time.process_time() - own_cpu
    latency = result.as_dict()["latency"]
    return PhaseResult(
        client=f"imgbench/{client}", concurrency=concurrency, requests_per_s=result.requests_per_s,
        latency_mean_ms=latency["mean_s"] * 1e3, latency_p50_ms=latency["p50_s"] * 1e3,
        latency_p90_ms=latency["p90_s"] * 1e3, latency_p99_ms=latency["p99_s"] * 1e3,
        requests=len(result.latencies_s), errors=sum(result.errors.values()), seconds=result.wall_s,
        client_cpu_per_s=own_cpu / result.wall_s, endpoint_cpu_per_s=endpoint_cpu / result.wall_s,
        load_average_1min=load,
    )


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unrecognised wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict:
    """Read latency mean and percentiles (ms), request count, errors and rate from wrk's --latency output."""
    figures = {}
    mean = re.search(r"^\s*Latency\s+(\S+)", output, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    count = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.MULTILINE)
    if not (mean and rate and count):
        raise ValueError(f"unrecognised wrk output:\n{output}")
    figures["latency_mean_ms"] = _wrk_ms(mean.group(1))
    for percent in (50, 90, 99):
        line = re.search(rf"^\s*{percent}%\s+(\S+)", output, re.MULTILINE)
        if not line:
            raise ValueError(f"wrk output has no {percent}% latency; was --latency given?\n{output}")
        figures[f"latency_p{percent}_ms"] = _wrk_ms(line.group(1))
    figures["requests_per_s"] = float(rate.group(1))
    figures["requests"] = int(count.group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    figures["errors"] = (int(errors.group(1)) if errors else 0) + (
        sum(int(value) for value in socket_errors.groups()) if socket_errors else 0)
    return figures


def run_wrk(wrk: str, endpoint: NoOpEndpoint, threads: int, concurrency: int, seconds: float) -> PhaseResult:
    """Run wrk against the endpoint with the same POST body; wrk stops itself after ``seconds``."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "post.lua"
        script.write_text(WRK_SCRIPT)
        command = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script),
                   endpoint.url]
        load = os.getloadavg()[0]
        endpoint_cpu, children = endpoint.cpu_seconds(), os.times()
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
        wall = time.perf_counter() - started
        endpoint_cpu = endpoint.cpu_seconds() - endpoint_cpu
        after = os.times()
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {completed.returncode}: "
                           f"{completed.stderr.strip()}")
    figures = parse_wrk(completed.stdout)
    wrk_cpu = (after.children_user - children.children_user) + (after.children_system - children.children_system)
    return PhaseResult(
        client=f"wrk -t{threads}", concurrency=concurrency, requests_per_s=figures["requests_per_s"],
        latency_mean_ms=figures["latency_mean_ms"], latency_p50_ms=figures["latency_p50_ms"],
        latency_p90_ms=figures["latency_p90_ms"], latency_p99_ms=figures["latency_p99_ms"],
        requests=figures["requests"], errors=figures["errors"], seconds=wall,
        client_cpu_per_s=wrk_cpu / wall, endpoint_cpu_per_s=endpoint_cpu / wall, load_average_1min=load,
    )


def ratios(harness: PhaseResult, wrk: PhaseResult) -> dict:
    """Harness/wrk ratios: latency (mean, p50, p99; lower is better) and request rate (higher is better)."""
    return {
        "harness": harness.client,
        "concurrency": harness.concurrency,
        "latency_mean_ratio": harness.latency_mean_ms / wrk.latency_mean_ms,
        "latency_p50_ratio": harness.latency_p50_ms / wrk.latency_p50_ms,
        "latency_p99_ratio": harness.latency_p99_ms / wrk.latency_p99_ms,
        "rate_ratio": harness.requests_per_s / wrk.requests_per_s,
    }


def format_table(phases: list[PhaseResult], comparisons: list[dict]) -> str:
    lines = [f"{'client':<20} {'conc':>4} {'req/s':>9} {'mean ms':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'errors':>6} {'client CPU':>10} {'endpoint CPU':>12} {'load1':>6}",
             f"{'':<20} {'':>4} {'':>9} {'':>8} {'':>8} {'':>8} {'':>8} {'':>6} {'us/req':>10} {'us/req':>12}"]
    for phase in phases:
        lines.append(f"{phase.client:<20} {phase.concurrency:>4} {phase.requests_per_s:>9.0f} "
                     f"{phase.latency_mean_ms:>8.3f} {phase.latency_p50_ms:>8.3f} {phase.latency_p90_ms:>8.3f} "
                     f"{phase.latency_p99_ms:>8.3f} {phase.errors:>6} {phase.client_cpu_us_per_request:>10.1f} "
                     f"{phase.endpoint_cpu_us_per_request:>12.1f} {phase.load_average_1min:>6.2f}")
    lines.append("")
    lines.append(f"{'harness/wrk':<20} {'conc':>4} {'mean lat':>9} {'p50 lat':>8} {'p99 lat':>8} {'rate':>8}")
    for item in comparisons:
        lines.append(f"{item['harness']:<20} {item['concurrency']:>4} {item['latency_mean_ratio']:>8.2f}x "
                     f"{item['latency_p50_ratio']:>7.2f}x {item['latency_p99_ratio']:>7.2f}x "
                     f"{item['rate_ratio']:>7.2f}x")
    return "\n".join(lines)


def run_benchmark(wrk: str, seconds: float, concurrency: int, wrk_threads: int) -> dict:
    """Run every phase against one endpoint and return the figures and ratios."""
    info = machine_info()
    phases: list[PhaseResult] = []
    comparisons: list[dict] = []
    with NoOpEndpoint() as endpoint:
        logger.info("no-op endpoint at %s", endpoint.url)
        for level, threads in ((concurrency, wrk_threads), (1, 1)):
            wrk_phase = run_wrk(wrk, endpoint, threads, level, seconds)
            harness_phases = [run_harness(endpoint, client, level, seconds) for client in ("requests", "keepalive")]
            phases += [*harness_phases, wrk_phase]
            comparisons += [ratios(phase, wrk_phase) for phase in harness_phases]
    return {"machine": info, "seconds_per_phase": seconds, "ratios": comparisons,
            "phases": [{**asdict(phase), "client_cpu_us_per_request": phase.client_cpu_us_per_request,
                        "endpoint_cpu_us_per_request": phase.endpoint_cpu_us_per_request} for phase in phases]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgbench.harness_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each phase in seconds (default: 5)")
    parser.add_argument("--concurrency", type=int, default=10,
                        help="connections for the main comparison (default: 10); a second pass uses 1")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads for the main comparison (default: 2)")
    parser.add_argument("--wrk", default="wrk", help="wrk executable (default: wrk on PATH)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve_noop())
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    wrk = shutil.which(args.wrk)
    if wrk is None:
        parser.error(f"wrk executable {args.wrk!r} not found; install it (apt-get install -y wrk) or pass --wrk PATH")
    if not 0 < args.seconds <= 60:
        parser.error(f"invalid --seconds {args.seconds}; use more than 0 and at most 60")
    if args.concurrency < 1 or args.wrk_threads < 1 or args.wrk_threads > args.concurrency:
        parser.error(f"invalid --concurrency {args.concurrency} or --wrk-threads {args.wrk_threads}; "
                     f"use 1 or more, with no more threads than connections (wrk requires it)")
    try:
        report = run_benchmark(wrk, args.seconds, args.concurrency, args.wrk_threads)
    except (ConfigError, RuntimeError, ValueError) as exc:
        print(f"harness benchmark failed: {exc}", file=sys.stderr)
        return 1

    machine = report["machine"]
    print(f"machine: {machine['cpus_usable']} CPUs, {machine['cpu_model']}, Python {machine['python']}, "
          f"load average {machine['load_average_1min']:.2f} at the start")
    fields = PhaseResult.__dataclass_fields__
    phases = [PhaseResult(**{key: value for key, value in phase.items() if key in fields})
              for phase in report["phases"]]
    print(format_table(phases, report["ratios"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers that run ``pytest bench_tests`` against the Nyckel emulator in a child process.

Fault-injection tests start the run with ``subprocess.Popen`` so that the
emulator can signal or kill it (or its pytest-xdist worker) when a request
reaches a chosen route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.interrupts import child_pids
from imgbench.ledger import RunLedger, ledger_path
from imgbench.results import iter_records
from tests.conftest import CREDENTIAL_VARIABLES, MINI_DATASETS, REPO_ROOT

# Wall-time limit of one benchmark run in these tests, in seconds.
RUN_TIMEOUT_S = 180


@dataclass
class BenchRun:
    """The outcome of one benchmark run in a child process."""

    returncode: int
    output: str
    results: Path
    run_id: str

    def records(self) -> dict[str, dict]:
        if not self.results.is_file():
            return {}
        return {record["case_id"]: record for record in iter_records(json.loads(self.results.read_text()))}

    def ledger(self) -> RunLedger:
        return RunLedger(ledger_path(self.results, self.run_id), self.run_id)


def bench_environment(cache_dir: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in CREDENTIAL_VARIABLES and not key.startswith(("PYTEST_", "IMGBENCH_"))}
    environment["IMGBENCH_CACHE_DIR"] = str(cache_dir)
    return environment


def bench_command(emulator: NyckelEmulator, results: Path, run_id: str, *extra: str, ablations: str = "5") -> list[str]:
    return [sys.executable, "-m", "pytest", "bench_tests", "-p", "no:cacheprovider", "--providers", "nyckel",
            "--nyckel-url", emulator.url, "--datasets-dir", str(MINI_DATASETS), "--datasets", "beans",
            "--ablations", ablations, "--load-requests", "10", "--load-concurrency", "2",
            "--results", str(results), "--run-id", run_id, *extra]


def start_benchmark(emulator: NyckelEmulator, results: Path, run_id: str, cache_dir: Path, *extra: str,
                    ablations: str = "5") -> subprocess.Popen:
    """Start a benchmark run in its own session, so signals sent to it reach no other process."""
    return subprocess.Popen(bench_command(emulator, results, run_id, *extra, ablations=ablations), cwd=REPO_ROOT,
                            env=bench_environment(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, results: Path, run_id: str) -> BenchRun:
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the benchmark run did not end within {RUN_TIMEOUT_S} s:\n{output[-4000:]}") from None
    return BenchRun(process.returncode, output, results, run_id)


def run_benchmark_against(emulator: NyckelEmulator, results: Path, run_id: str, cache_dir: Path, *extra: str,
                          ablations: str = "5") -> BenchRun:
    return finish(start_benchmark(emulator, results, run_id, cache_dir, *extra, ablations=ablations),
                  results, run_id)


def signal_process(process_holder: list, signum: int):
    """Return a callback that sends ``signum`` to the benchmark process in ``process_holder[0]``."""
    def send() -> None:
        os.kill(process_holder[0].pid, signum)
    return send


def kill_workers(process_holder: list):
    """Return a callback that kills the pytest-xdist workers of the benchmark process with SIGKILL."""
    def kill() -> None:
        for pid in child_pids(process_holder[0].pid):
            os.kill(pid, signal.SIGKILL)
    return kill


def run_sweep(emulator: NyckelEmulator, results: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imgbench", "sweep", "--run-id", run_id, "--ledger-dir",
               str(ledger_path(results, run_id).parent), "--service-url", f"nyckel={emulator.url}", *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=bench_environment(results.parent), capture_output=True,
                          text=True, timeout=120, check=False)

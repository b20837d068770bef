"""Helpers that run ``pytest bench_tests`` against provider emulators in a child process.

Fault-injection tests start the run with ``subprocess.Popen`` so that an
emulator can signal or kill it (or its pytest-xdist worker) when a request
reaches a chosen route. Every helper takes one emulator or a sequence of
them (Nyckel, AWS, Vertex AI, Hugging Face). Each emulator selects its
provider, and its URL goes to the run as ``--<provider>-url`` and to the
sweep command as ``--service-url <provider>=URL``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from imgbench.emulators.aws import RekognitionEmulator
from imgbench.emulators.huggingface import HuggingFaceEmulator
from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.emulators.vertex import VertexEmulator
from imgbench.interrupts import child_pids
from imgbench.ledger import RunLedger, ledger_path
from imgbench.results import iter_records
from tests.conftest import CREDENTIAL_VARIABLES, MINI_DATASETS, REPO_ROOT

# Wall-time limit of one benchmark run in these tests, in seconds.
RUN_TIMEOUT_S = 180
# Wall-time limit of one sweep command, in seconds.
SWEEP_TIMEOUT_S = 120

# The provider that each emulator class emulates.
PROVIDER_OF_EMULATOR = {NyckelEmulator: "nyckel", RekognitionEmulator: "aws", VertexEmulator: "vertex",
                        HuggingFaceEmulator: "huggingface"}

Emulator = Union[NyckelEmulator, RekognitionEmulator, VertexEmulator, HuggingFaceEmulator]
Emulators = Union[Emulator, Sequence[Emulator]]


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


def provider_urls(emulators: Emulators) -> dict[str, str]:
    """Map each emulator's provider name to its URL, in the order given."""
    if not isinstance(emulators, Sequence):
        emulators = [emulators]
    urls = {}
    for emulator in emulators:
        provider = PROVIDER_OF_EMULATOR.get(type(emulator))
        if provider is None:
            raise TypeError(f"no provider runs against {type(emulator).__name__}; pass one of "
                            f"{', '.join(cls.__name__ for cls in PROVIDER_OF_EMULATOR)}")
        urls[provider] = emulator.url
    return urls


def bench_command(emulators: Emulators, results: Path, run_id: str, *extra: str, ablations: str = "5",
                  load_requests: int = 10, provider_options: Sequence[str] = ()) -> list[str]:
    """Build the ``pytest bench_tests`` command of a run against ``emulators`` on the mini datasets.

    ``provider_options`` are ``PROVIDER.KEY=VALUE`` settings, each passed as ``--provider-option``.
    """
    urls = provider_urls(emulators)
    command = [sys.executable, "-m", "pytest", "bench_tests", "-p", "no:cacheprovider",
               "--providers", ",".join(urls)]
    for provider, url in urls.items():
        command += [f"--{provider}-url", url]
    for option in provider_options:
        command += ["--provider-option", option]
    return [*command, "--datasets-dir", str(MINI_DATASETS), "--datasets", "beans", "--ablations", ablations,
            "--load-requests", str(load_requests), "--load-concurrency", "2",
            "--results", str(results), "--run-id", run_id, *extra]


def start_benchmark(emulators: Emulators, results: Path, run_id: str, cache_dir: Path, *extra: str,
                    ablations: str = "5", load_requests: int = 10,
                    provider_options: Sequence[str] = ()) -> subprocess.Popen:
    """Start a benchmark run in its own session, so signals sent to it reach no other process."""
    command = bench_command(emulators, results, run_id, *extra, ablations=ablations, load_requests=load_requests,
                            provider_options=provider_options)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=bench_environment(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, results: Path, run_id: str) -> BenchRun:
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the benchmark run did not end within {RUN_TIMEOUT_S} s:\n{output[-4000:]}") from None
    return BenchRun(process.returncode, output, results, run_id)


def run_benchmark_against(emulators: Emulators, results: Path, run_id: str, cache_dir: Path, *extra: str,
                          ablations: str = "5", load_requests: int = 10,
                          provider_options: Sequence[str] = ()) -> BenchRun:
    process = start_benchmark(emulators, results, run_id, cache_dir, *extra, ablations=ablations,
                              load_requests=load_requests, provider_options=provider_options)
    return finish(process, results, run_id)


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


def run_sweep(emulators: Emulators, results: Path, run_id: str, *extra: str,
              provider_options: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run ``python -m imgbench sweep`` on the run's ledger, with each emulator as its provider's service."""
    command = [sys.executable, "-m", "imgbench", "sweep", "--run-id", run_id, "--ledger-dir",
               str(ledger_path(results, run_id).parent)]
    for provider, url in provider_urls(emulators).items():
        command += ["--service-url", f"{provider}={url}"]
    for option in provider_options:
        command += ["--provider-option", option]
    return subprocess.run([*command, *extra], cwd=REPO_ROOT, env=bench_environment(results.parent),
                          capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S, check=False)

"""Interrupting a Rekognition case during training, then resuming it or sweeping what it kept.

The in-process tests drive the provider against the AWS emulator on a virtual
clock: a training timeout stands in for the interrupt, and ``keep_model``
is set before teardown as the suite sets it after SIGINT. The end-to-end
tests run ``pytest bench_tests`` in a child process, send it SIGINT while the
emulator's version is training, then run the same command again or the
``python -m imgbench sweep`` command, and count in the emulator what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.cases import reuse_earlier_model
from imgbench.clock import ReplayClock
from imgbench.emulators.aws import RekognitionEmulator
from imgbench.errors import ProviderTimeoutError
from imgbench.ledger import RunLedger, ledger_path
from imgbench.recording import block_network
from imgbench.retry import RetryPolicy
from providers.aws import EMULATOR_BUCKET, RekognitionOptions, RekognitionProvider
from tests.benchrun import BenchRun, bench_environment, finish
from tests.conftest import MINI_DATASETS, REPO_ROOT
from tests.test_aws import assert_nothing_left, beans_records, training_set

RUN_ID = "20260103T000000Z-resume"
CASE_ID = "aws-beans-test"
# Kept entries of a case interrupted during training: model, project, S3 prefix and two datasets.
KEPT_KINDS = ["dataset", "dataset", "model", "project", "s3_prefix"]
# Bound on the wait for the child run to reach training, in seconds.
TRAINING_START_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


def make_provider(emulator: RekognitionEmulator, ledger: RunLedger, **options) -> RekognitionProvider:
    settings = {"bucket": "imgbench-resume-bucket", "region": "us-east-1", "endpoint_url": emulator.url,
                "poll_interval_s": 1.0, "retry_policy": RetryPolicy(max_attempts=2, base_delay_s=0.1), **options}
    provider = RekognitionProvider(RekognitionOptions(**settings), run_mode="emulator", run_id=RUN_ID,
                                   clock=ReplayClock(), credentials=("test-access-key", "test-secret-key"))
    provider.case_id = CASE_ID
    provider.ledger = ledger
    return provider


def interrupt_during_training(emulator: RekognitionEmulator, ledger: RunLedger, cases) -> str:
    """Start training, give up while it runs, and tear down with ``keep_model``; return the version ARN."""
    provider = make_provider(emulator, ledger, training_timeout_s=2.0)
    upload = provider.upload(cases)
    with pytest.raises(ProviderTimeoutError):
        provider.train(upload)
    provider.keep_model = True
    provider.teardown()
    [version_arn] = emulator.version_states()
    return version_arn


def resume(provider: RekognitionProvider, cases):
    record = {"seconds": {}}
    model = reuse_earlier_model(provider, cases, SimpleNamespace(case_id=CASE_ID), record)
    return model, record


# In process -----------------------------------------------------------------------------------

def test_resume_waits_for_training_and_reuses(tmp_path, mini_datasets):
    cases = training_set(mini_datasets)
    ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    with RekognitionEmulator(training_polls=8, start_polls=1, stop_polls=1) as emulator:
        version_arn = interrupt_during_training(emulator, ledger, cases)
        kept = sorted(entry.kind for entry in ledger.outstanding() if entry.state == "kept")
        assert kept == KEPT_KINDS
        assert emulator.version_states() == {version_arn: "TRAINING_IN_PROGRESS"}

        provider = make_provider(emulator, ledger)
        model, record = resume(provider, cases)
        assert model is not None
        assert model.version_arn == version_arn
        assert model.status == "TRAINING_COMPLETED"
        assert record["reused_model"] is True
        assert provider.clock.sleeps >= 1
        endpoint = provider.deploy(model)
        prediction = provider.invoke(endpoint, beans_records(mini_datasets, "test", 1)[0].read_bytes(), None)
        provider.teardown()

        assert prediction.label in cases.classes
        assert emulator.operation_counts["CreateProject"] == 1
        assert emulator.operation_counts["CreateProjectVersion"] == 1
        assert_nothing_left(emulator, "imgbench-resume-bucket")
    assert ledger.outstanding() == []


def test_resume_after_failed_training_starts_afresh(tmp_path, mini_datasets):
    cases = training_set(mini_datasets)
    ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    with RekognitionEmulator(training_polls=8, start_polls=1, stop_polls=1) as emulator:
        first_version = interrupt_during_training(emulator, ledger, cases)
        emulator.fail_training()

        provider = make_provider(emulator, ledger)
        model, record = resume(provider, cases)
        assert model is None
        assert "reused_model" not in record
        emulator.faults.fail_training = False
        model = provider.train(provider.upload(cases))
        assert model.version_arn != first_version
        assert list(emulator.version_states().values()) == ["TRAINING_COMPLETED"]
        assert len(emulator.project_arns()) == 1
        provider.teardown()

        assert emulator.operation_counts["CreateProject"] == 2
        assert_nothing_left(emulator, "imgbench-resume-bucket")
    assert ledger.outstanding() == []


def test_resume_without_version_deletes_earlier_attempt(tmp_path, mini_datasets):
    cases = training_set(mini_datasets)
    ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    with RekognitionEmulator(training_polls=2, start_polls=1, stop_polls=1) as emulator:
        crashed = make_provider(emulator, ledger)
        crashed.upload(cases)  # a crash after the upload: the ledger lists everything as created
        assert len(emulator.project_arns()) == 1

        provider = make_provider(emulator, ledger)
        model, _ = resume(provider, cases)
        assert model is None
        model = provider.train(provider.upload(cases))
        provider.teardown()

        assert model.status == "TRAINING_COMPLETED"
        assert_nothing_left(emulator, "imgbench-resume-bucket")
    assert ledger.outstanding() == []


def test_sweep_waits_bounded_for_training(tmp_path, mini_datasets):
    from imgbench.config import BenchConfig

    cases = training_set(mini_datasets)
    ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    with RekognitionEmulator(training_polls=1000, start_polls=1, stop_polls=1) as emulator:
        interrupt_during_training(emulator, ledger, cases)
        config = BenchConfig(providers=("aws",), run_id="sweep", provider_modes={"aws": "emulator"},
                             service_urls={"aws": emulator.url},
                             provider_options={"aws": {"bucket": "imgbench-resume-bucket",
                                                       "sweep_training_wait_s": "0.5"}})
        [model] = [leftover for leftover in RekognitionProvider.find_leftovers(config, RUN_ID)
                   if leftover.kind == "model"]

        started = time.monotonic()
        with pytest.raises(ProviderTimeoutError) as caught:
            RekognitionProvider.delete_leftover(config, model)
        waited = time.monotonic() - started
        emulator.training_polls = 0
        for version in emulator._versions.values():
            version.polls_left = 1
        for leftover in RekognitionProvider.find_leftovers(config, RUN_ID):
            RekognitionProvider.delete_leftover(config, leftover)

        assert "still training" in str(caught.value)
        assert "sweep again later" in str(caught.value)
        assert waited < 10
        assert_nothing_left(emulator, "imgbench-resume-bucket")


# End to end: pytest bench_tests and the sweep command in child processes ---------------------------

def bench_command(emulator: RekognitionEmulator, results: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "bench_tests", "-p", "no:cacheprovider", "--providers", "aws",
            "--aws-url", emulator.url, "--datasets-dir", str(MINI_DATASETS), "--datasets", "beans",
            "--ablations", "5", "--load-requests", "10", "--load-concurrency", "2",
            "--results", str(results), "--run-id", run_id]


def start_run(emulator: RekognitionEmulator, results: Path, run_id: str, cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(bench_command(emulator, results, run_id), cwd=REPO_ROOT,
                            env=bench_environment(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def interrupt_run_during_training(emulator: RekognitionEmulator, results: Path, run_id: str,
                                  cache_dir: Path) -> BenchRun:
    """Run the benchmark and send it SIGINT once the emulator holds a version in training."""
    process = start_run(emulator, results, run_id, cache_dir)
    deadline = time.monotonic() + TRAINING_START_TIMEOUT_S
    while "TRAINING_IN_PROGRESS" not in emulator.version_states().values():
        if process.poll() is not None or time.monotonic() > deadline:
            output = finish(process, results, run_id).output
            raise AssertionError(f"the run never reached training:\n{output[-3000:]}")
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    return finish(process, results, run_id)


def run_sweep(emulator: RekognitionEmulator, results: Path, run_id: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imgbench", "sweep", "--run-id", run_id, "--ledger-dir",
               str(ledger_path(results, run_id).parent), "--service-url", f"aws={emulator.url}", "--yes"]
    return subprocess.run(command, cwd=REPO_ROOT, env=bench_environment(results.parent), capture_output=True,
                          text=True, timeout=300, check=False)


def test_interrupted_run_resumes_on_training_version(tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    with RekognitionEmulator(training_polls=40) as emulator:
        interrupted = interrupt_run_during_training(emulator, results, "aws-resume", shared_cache_dir)
        kept = sorted(entry.kind for entry in interrupted.ledger().outstanding() if entry.state == "kept")
        assert interrupted.returncode == 2, interrupted.output[-3000:]
        assert kept == KEPT_KINDS

        resumed = finish(start_run(emulator, results, "aws-resume", shared_cache_dir), results, "aws-resume")

        assert resumed.returncode == 0, resumed.output[-3000:]
        record = resumed.records()["aws-beans-5"]
        assert record["status"] == "passed"
        assert record["reused_model"] is True
        assert emulator.operation_counts["CreateProject"] == 1
        assert emulator.operation_counts["CreateProjectVersion"] == 1
        assert resumed.ledger().outstanding() == []
        assert_nothing_left(emulator, EMULATOR_BUCKET)


def test_sweep_deletes_what_interrupt_kept(tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    with RekognitionEmulator(training_polls=40) as emulator:
        interrupted = interrupt_run_during_training(emulator, results, "aws-sweep", shared_cache_dir)
        kept = sorted(entry.kind for entry in interrupted.ledger().outstanding() if entry.state == "kept")
        assert interrupted.returncode == 2, interrupted.output[-3000:]
        assert kept == KEPT_KINDS, interrupted.output[-3000:]

        swept = run_sweep(emulator, results, "aws-sweep")
        again = run_sweep(emulator, results, "aws-sweep")

        assert swept.returncode == 0, swept.stdout + swept.stderr
        assert "5 resources left by run aws-sweep" in swept.stdout
        assert "deleted 5 of 5 resources" in swept.stdout
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing left by run aws-sweep" in again.stdout
        assert_nothing_left(emulator, EMULATOR_BUCKET)
        assert interrupted.ledger().outstanding() == []

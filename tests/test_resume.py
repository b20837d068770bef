"""Resuming an interrupted run: finished cases are kept, a trained model is reused.

Each test runs ``pytest bench_tests`` in a child process against the Nyckel
emulator on 127.0.0.1 and counts in the emulator what was created, so a
resumed run that uploaded or trained again would show it.
"""

from __future__ import annotations

import signal

import pytest

from imgbench.emulators.nyckel import NyckelEmulator
from tests.benchrun import finish, run_benchmark_against, signal_process, start_benchmark

# Training images of the nyckel-beans-5 case: 5 per class, 3 classes.
CASE_IMAGES = 15


@pytest.fixture
def emulator():
    with NyckelEmulator(training_polls=2) as running:
        yield running


def test_resume_skips_finished_case(emulator, tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    first = run_benchmark_against(emulator, results, "resume-a", shared_cache_dir)
    assert first.returncode == 0, first.output[-3000:]
    record = first.records()["nyckel-beans-5"]

    second = run_benchmark_against(emulator, results, "resume-a", shared_cache_dir, "-rs")

    assert second.returncode == 0, second.output[-3000:]
    assert "finished in an earlier attempt of run resume-a" in second.output
    assert second.records()["nyckel-beans-5"] == record
    assert emulator.functions_created == 1
    assert emulator.samples_created == CASE_IMAGES
    assert emulator.functions == {}


def test_other_run_id_starts_afresh(emulator, tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    assert run_benchmark_against(emulator, results, "resume-b", shared_cache_dir).returncode == 0

    other = run_benchmark_against(emulator, results, "resume-c", shared_cache_dir)

    assert other.returncode == 0, other.output[-3000:]
    assert other.records()["nyckel-beans-5"]["run_id"] == "resume-c"
    assert emulator.functions_created == 2


def test_interrupted_case_reuses_model(emulator, tmp_path, shared_cache_dir):
    results = tmp_path / "results.json"
    holder: list = []
    emulator.on_request("invoke", signal_process(holder, signal.SIGTERM))
    holder.append(start_benchmark(emulator, results, "resume-d", shared_cache_dir))
    interrupted = finish(holder[0], results, "resume-d")

    assert interrupted.returncode == 2, interrupted.output[-3000:]
    kept = interrupted.ledger().outstanding()
    assert [entry.state for entry in kept] == ["kept"]
    assert "imgbench sweep --run-id resume-d" in interrupted.output
    assert len(emulator.functions) == 1

    resumed = run_benchmark_against(emulator, results, "resume-d", shared_cache_dir)

    assert resumed.returncode == 0, resumed.output[-3000:]
    record = resumed.records()["nyckel-beans-5"]
    assert record["status"] == "passed"
    assert record["reused_model"] is True
    seconds = record["seconds"]
    assert seconds["training"] > 0
    assert seconds["upload"] > 0
    assert record["upload_to_endpoint_spans_attempts"] is True
    assert seconds["upload_to_endpoint"] >= seconds["upload"] + seconds["training"] + seconds["deployment"]
    assert emulator.functions_created == 1
    assert emulator.samples_created == CASE_IMAGES
    assert emulator.functions == {}
    assert resumed.ledger().outstanding() == []

"""Fault injection at each lifecycle step of a Nyckel case, against the emulator.

For each step (function creation, sample upload, training status, invoke,
deletion) a child ``pytest bench_tests`` run meets an error response, a
signal (SIGTERM or SIGINT to the pytest process, or SIGTERM to the
controller of a pytest-xdist run) or a killed pytest-xdist worker when its
first request of that step arrives. Every test ends with zero functions in
the emulator, after the ``imgbench sweep`` command wherever the run itself
could not delete them, and with the ledger showing nothing outstanding.
"""

from __future__ import annotations

import signal
from http import HTTPStatus

import pytest

from imgbench.emulators.nyckel import NyckelEmulator
from tests.benchrun import (finish, kill_workers, run_benchmark_against, run_sweep, signal_process,
                            start_benchmark)

STEPS = ("create", "samples", "metrics", "invoke", "delete")
CASE_ID = "nyckel-beans-5"


@pytest.fixture
def emulator():
    with NyckelEmulator(training_polls=2) as running:
        yield running


def sweep_to_zero(emulator: NyckelEmulator, run) -> None:
    swept = run_sweep(emulator, run.results, run.run_id, "--yes")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert emulator.functions == {}
    assert run.ledger().outstanding() == []


@pytest.mark.parametrize("step", STEPS)
def test_error_at_step(step, emulator, tmp_path, shared_cache_dir):
    # One failure only, so that the deletion retried by the sweep succeeds.
    emulator.fail_route(step, HTTPStatus.BAD_REQUEST, count=1)

    run = run_benchmark_against(emulator, tmp_path / "results.json", f"error-{step}", shared_cache_dir)

    assert run.returncode == 1, run.output[-3000:]
    record = run.records()[CASE_ID]
    assert record["status"] == "failed"
    if step == "delete":
        assert record["teardown_error"].startswith("InvalidInputError")
        assert "load_test" in record  # the measurements made before the failure are kept
        assert f"imgbench sweep --run-id error-{step}" in run.output
        assert f"--service-url nyckel={emulator.url}" in run.output
        assert f"--nyckel-url {emulator.url}" in run.output
        assert len(emulator.functions) == 1
        sweep_to_zero(emulator, run)
    elif step == "invoke":
        # A failed request is a row of the record; the case goes on and fails at the end.
        assert record["error"]["kind"] == "assertion"
        failed_rows = [row for row in record["predictions"] if row["error"] is not None]
        assert [row["error"]["kind"] for row in failed_rows] == ["invalid_input"]
        assert emulator.functions == {}
    else:
        assert record["error"]["kind"] == "invalid_input"
        assert "HTTP 400" in record["error"]["message"]
        assert emulator.functions == {}
        assert run.ledger().outstanding() == []
    if step in ("metrics", "invoke"):
        assert record["seconds"]["upload"] > 0
    if step == "invoke":
        assert record["seconds"]["training"] > 0
        assert len(record["predictions"]) > 0


# SIGINT runs the same handler as SIGTERM, so it is sent at the middle steps only.
SIGNAL_CASES = [pytest.param(step, signal.SIGTERM, id=f"sigterm-{step}") for step in STEPS] + [
    pytest.param(step, signal.SIGINT, id=f"sigint-{step}") for step in STEPS if step not in ("create", "delete")]


@pytest.mark.parametrize(("step", "signum"), SIGNAL_CASES)
def test_signal_at_step(step, signum, emulator, tmp_path, shared_cache_dir):
    holder: list = []
    emulator.on_request(step, signal_process(holder, signum))
    results = tmp_path / "results.json"
    holder.append(start_benchmark(emulator, results, f"signal-{step}", shared_cache_dir))

    run = finish(holder[0], results, f"signal-{step}")

    assert run.returncode == 2, run.output[-3000:]
    outstanding = run.ledger().outstanding()
    if step == "delete":
        # Interrupted while its deletion was in flight: the ledger cannot know whether it went through.
        assert len(outstanding) == 1
        assert len(emulator.functions) <= 1
    else:
        assert all(entry.state == "kept" for entry in outstanding)
        assert len(emulator.functions) == len(outstanding)
    if outstanding:
        assert f"imgbench sweep --run-id signal-{step}" in run.output
    sweep_to_zero(emulator, run)


@pytest.mark.parametrize("step", STEPS)
def test_killed_worker_at_step(step, emulator, tmp_path, shared_cache_dir):
    holder: list = []
    emulator.on_request(step, kill_workers(holder))
    results = tmp_path / "results.json"
    holder.append(start_benchmark(emulator, results, f"crash-{step}", shared_cache_dir, "-n", "1"))

    run = finish(holder[0], results, f"crash-{step}")

    assert run.returncode == 1, run.output[-3000:]
    record = run.records()[CASE_ID]
    assert record["status"] == "failed"
    assert record["error"]["kind"] == "worker_crashed"
    assert f"worker crashed while running {CASE_ID}" in run.output
    assert f"imgbench sweep --run-id crash-{step}" in run.output
    sweep_to_zero(emulator, run)


def test_sigterm_to_xdist_controller_tears_down(emulator, tmp_path, shared_cache_dir):
    holder: list = []
    emulator.on_request("invoke", signal_process(holder, signal.SIGTERM))
    results = tmp_path / "results.json"
    holder.append(start_benchmark(emulator, results, "xdist-sigterm", shared_cache_dir, "-n", "1"))

    run = finish(holder[0], results, "xdist-sigterm")

    assert run.returncode == 2, run.output[-3000:]
    outstanding = run.ledger().outstanding()
    assert [entry.state for entry in outstanding] == ["kept"]
    assert len(emulator.functions) == 1
    sweep_to_zero(emulator, run)


def test_resumed_after_crash_trains_once(emulator, tmp_path, shared_cache_dir):
    holder: list = []
    emulator.on_request("invoke", kill_workers(holder))
    results = tmp_path / "results.json"
    holder.append(start_benchmark(emulator, results, "crash-resume", shared_cache_dir, "-n", "1"))
    crashed = finish(holder[0], results, "crash-resume")
    assert crashed.returncode == 1, crashed.output[-3000:]

    resumed = run_benchmark_against(emulator, results, "crash-resume", shared_cache_dir)

    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.records()[CASE_ID]["reused_model"] is True
    assert emulator.functions_created == 1
    assert emulator.samples_created == 15
    assert emulator.functions == {}
    assert resumed.ledger().outstanding() == []

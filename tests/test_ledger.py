"""Tests of the run ledger: states, sharing between processes, and crash safety of its writes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest

from imgbench.errors import ConfigError
from imgbench.ledger import NullLedger, RunLedger, ledger_path


def test_ledger_path_beside_results(tmp_path):
    assert ledger_path(tmp_path / "run.json", "r1") == tmp_path / "ledgers" / "r1.json"


def test_created_then_deleted(tmp_path):
    ledger = RunLedger(tmp_path / "r1.json", "r1")

    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-r1-nyckel-beans-5", name="x")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-r1-nyckel-beans-5", function_id="f1")
    assert [entry.details for entry in ledger.outstanding()] == [{"name": "x", "function_id": "f1"}]

    ledger.note_deleted("nyckel", "function", "imgbench-r1-nyckel-beans-5")
    assert ledger.outstanding() == []
    assert [entry.state for entry in ledger.entries()] == ["deleted"]


def test_kept_stays_outstanding(tmp_path):
    ledger = RunLedger(tmp_path / "r1.json", "r1")
    ledger.note_created("aws", "aws-beans-5", "model", "arn:1")

    ledger.note_state("aws", "model", "arn:1", "kept", version="v1")

    [entry] = ledger.outstanding(provider="aws", case_id="aws-beans-5")
    assert entry.state == "kept"
    assert entry.details == {"version": "v1"}


def test_outstanding_filters(tmp_path):
    ledger = RunLedger(tmp_path / "r1.json", "r1")
    ledger.note_created("aws", "aws-beans-5", "model", "m1")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "f1")

    assert [entry.resource_id for entry in ledger.outstanding(provider="aws")] == ["m1"]
    assert [entry.resource_id for entry in ledger.outstanding(case_id="nyckel-beans-5")] == ["f1"]


def test_unlisted_resource_state_ignored(tmp_path):
    ledger = RunLedger(tmp_path / "r1.json", "r1")

    ledger.note_deleted("nyckel", "function", "never-created")

    assert ledger.entries() == []


def test_invalid_state_rejected(tmp_path):
    ledger = RunLedger(tmp_path / "r1.json", "r1")

    with pytest.raises(ValueError, match="invalid ledger state 'gone'"):
        ledger.note_state("nyckel", "function", "f1", "gone")


def test_other_run_ledger_rejected(tmp_path):
    RunLedger(tmp_path / "r1.json", "r1").note_created("nyckel", "c", "function", "f1")

    with pytest.raises(ConfigError, match="belongs to run 'r1', not 'r2'"):
        RunLedger(tmp_path / "r1.json", "r2").entries()


def test_corrupt_ledger_names_sweep(tmp_path):
    path = tmp_path / "r1.json"
    path.write_text("{not json")

    with pytest.raises(ConfigError, match="imgbench sweep --all"):
        RunLedger(path, "r1").entries()


def test_newer_format_rejected(tmp_path):
    path = tmp_path / "r1.json"
    path.write_text(json.dumps({"format": 99, "run_id": "r1", "resources": []}))

    with pytest.raises(ConfigError, match="format 99"):
        RunLedger(path, "r1").entries()


def test_null_ledger_stores_nothing():
    ledger = NullLedger()

    ledger.note_created("nyckel", "c", "function", "f1")
    ledger.note_deleted("nyckel", "function", "f1")

    assert ledger.entries() == []


def _write_entries(path: str, worker: int, count: int) -> None:
    ledger = RunLedger(path, "r1")
    for number in range(count):
        ledger.note_created("nyckel", f"case-{worker}", "function", f"f-{worker}-{number}")


def test_processes_keep_each_others_entries(tmp_path):
    path = tmp_path / "r1.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_entries, args=(str(path), worker, 25)) for worker in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert len(RunLedger(path, "r1").entries()) == 100


def test_killed_writer_leaves_readable_ledger(tmp_path):
    path = tmp_path / "r1.json"
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        writer = context.Process(target=_write_entries, args=(str(path), attempt, 10_000))
        writer.start()
        time.sleep(0.2 + 0.05 * attempt)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=10)

        entries = RunLedger(path, "r1").entries()  # raises if the file were half written

        assert len(entries) > 0

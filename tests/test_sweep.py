"""Tests of ``imgbench sweep`` against the Nyckel emulator: ledgers, the service's listing, confirmation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from imgbench.emulators.nyckel import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, NyckelEmulator
from imgbench.ledger import RunLedger
from tests.benchrun import bench_environment
from tests.conftest import REPO_ROOT


@pytest.fixture
def emulator():
    with NyckelEmulator() as running:
        yield running


def create_function(emulator: NyckelEmulator, name: str) -> str:
    token = requests.post(f"{emulator.url}/connect/token", timeout=10, data={
        "grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
    }).json()["access_token"]
    response = requests.post(f"{emulator.url}/v1/functions", headers={"Authorization": f"Bearer {token}"},
                             json={"input": "Image", "output": "Classification", "name": name}, timeout=10)
    return response.json()["id"]


def sweep(ledger_dir, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imgbench", "sweep", "--ledger-dir", str(ledger_dir), *args]
    if url:
        command += ["--service-url", f"nyckel={url}"]
    return subprocess.run(command, cwd=REPO_ROOT, env=bench_environment(ledger_dir), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, check=False)


def test_lists_without_deleting(emulator, tmp_path):
    ledger = RunLedger(tmp_path / "run1.json", "run1")
    function_id = create_function(emulator, "imgbench-run1-nyckel-beans-5")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-run1-nyckel-beans-5",
                        name="imgbench-run1-nyckel-beans-5", function_id=function_id)
    create_function(emulator, "imgbench-run1-nyckel-beans-20")  # found only by the listing

    completed = sweep(tmp_path, "--run-id", "run1", url=emulator.url)

    assert completed.returncode == 1, completed.stderr
    assert "2 resources left by run run1" in completed.stdout
    assert "found in ledger+listing" in completed.stdout
    assert "found in listing" in completed.stdout
    assert "run again with --yes" in completed.stdout
    assert len(emulator.functions) == 2


def test_yes_deletes_and_marks_ledger(emulator, tmp_path):
    ledger = RunLedger(tmp_path / "run1.json", "run1")
    function_id = create_function(emulator, "imgbench-run1-nyckel-beans-5")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-run1-nyckel-beans-5",
                        name="imgbench-run1-nyckel-beans-5", function_id=function_id)
    create_function(emulator, "imgbench-run2-nyckel-beans-5")
    create_function(emulator, "production-model")

    completed = sweep(tmp_path, "--run-id", "run1", "--yes", url=emulator.url)

    assert completed.returncode == 0, completed.stderr
    assert "deleted 1 of 1 resources" in completed.stdout
    assert sorted(emulator.function_names()) == ["imgbench-run2-nyckel-beans-5", "production-model"]
    assert ledger.outstanding() == []


def test_all_runs_leaves_foreign_functions(emulator, tmp_path):
    for name in ("imgbench-run1-nyckel-beans-5", "imgbench-run2-nyckel-xrays-80", "production-model",
                 "imgbench-notes"):
        create_function(emulator, name)

    completed = sweep(tmp_path, "--all", "--providers", "nyckel", "--yes", url=emulator.url)

    assert completed.returncode == 0, completed.stderr
    assert sorted(emulator.function_names()) == ["imgbench-notes", "production-model"]


def test_ledger_entry_already_gone(emulator, tmp_path):
    ledger = RunLedger(tmp_path / "run1.json", "run1")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-run1-nyckel-beans-5",
                        name="imgbench-run1-nyckel-beans-5", function_id="function_missing")

    completed = sweep(tmp_path, "--run-id", "run1", "--yes", url=emulator.url)

    assert completed.returncode == 0, completed.stderr
    assert ledger.outstanding() == []


def test_ledger_entry_without_id_found_by_name(emulator, tmp_path):
    ledger = RunLedger(tmp_path / "run1.json", "run1")
    # Noted before the create request; the process died before the response.
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-run1-nyckel-beans-5",
                        name="imgbench-run1-nyckel-beans-5")
    create_function(emulator, "imgbench-run1-nyckel-beans-5")

    completed = sweep(tmp_path, "--run-id", "run1", "--yes", url=emulator.url)

    assert completed.returncode == 0, completed.stderr
    assert emulator.functions == {}
    assert ledger.outstanding() == []


def test_listing_failure_reported(tmp_path):
    ledger = RunLedger(tmp_path / "run1.json", "run1")
    ledger.note_created("nyckel", "nyckel-beans-5", "function", "imgbench-run1-nyckel-beans-5")

    completed = sweep(tmp_path, "--run-id", "run1")

    assert completed.returncode == 1
    assert "cannot list nyckel resources" in completed.stderr
    assert "NYCKEL_CLIENT_ID" in completed.stderr
    assert "1 resources left by run run1" in completed.stdout


def test_nothing_left(emulator, tmp_path):
    completed = sweep(tmp_path, "--run-id", "clean", url=emulator.url)

    assert completed.returncode == 0, completed.stderr
    assert "nothing left by run clean" in completed.stdout


@pytest.mark.parametrize("args", [[], ["--run-id", "r", "--all"], ["--run-id", "r", "--service-url", "x=1"],
                                  ["--run-id", "r", "--providers", "nope"]])
def test_usage_errors(args, tmp_path):
    completed = sweep(tmp_path, *args)

    assert completed.returncode == 2, completed.stdout + completed.stderr

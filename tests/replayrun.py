"""Replay of a provider's committed beans cassettes in a fresh pytest process, shared by the replay tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imgbench.datasets import DATASETS_DIR_ENV
from imgbench.results import iter_records
from tests.conftest import run_benchmark


def replay_committed(provider: str, results_dir: Path, cache_dir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Replay ``provider``'s beans 5 and 20 cassettes; return the process and the records by case id.

    Skips the calling test where ``IMGBENCH_DATASETS_DIR`` is unset, because
    the cassettes hold requests for the full beans dataset.
    """
    datasets_dir = os.environ.get(DATASETS_DIR_ENV)
    if not datasets_dir:
        pytest.skip(f"{DATASETS_DIR_ENV} is unset; the committed cassettes replay only on the full beans "
                    f"dataset, so point {DATASETS_DIR_ENV} at a folder that holds beans/<split>/<class>/<image>")
    results = results_dir / "results.json"
    completed = run_benchmark(["--providers", provider, "--datasets", "beans", "--ablations", "5,20",
                               "--datasets-dir", datasets_dir, "--results", str(results)], cache_dir)
    records = {}
    if results.is_file():
        records = {record["case_id"]: record for record in iter_records(json.loads(results.read_text()))}
    return completed, records

"""Replay of every committed Nyckel cassette, offline, in a fresh pytest process.

The committed cassettes were recorded on the full beans dataset (128 test
images, 1034 training images), so this test needs that dataset in the folder
that ``IMGBENCH_DATASETS_DIR`` names and is skipped where the variable is
unset. Each replayed case must pass and reproduce the predictions stored in
its cassette's sidecar file exactly, in test-set order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgbench.datasets import DATASETS_DIR_ENV
from imgbench.recording import meta_path
from imgbench.results import iter_records
from tests.conftest import REPO_ROOT, run_benchmark
from tests.replayrun import replay_committed

pytestmark = pytest.mark.slow

CASSETTE_DIR = REPO_ROOT / "cassettes" / "nyckel"
CASES = ("nyckel-beans-5", "nyckel-beans-20")


@pytest.fixture(scope="module")
def replay_run(shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return replay_committed("nyckel", tmp_path_factory.mktemp("replay"), shared_cache_dir)


def test_replay_run_passes(replay_run):
    completed, records = replay_run

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(records) == sorted(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_replayed_record_is_marked(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]

    assert record["status"] == "passed"
    assert record["mode"] == "replay"
    assert record["timings_measured"] is False
    assert record["network_blocked"] is True
    assert record["cassette"]["recorded_against"] == "emulator"
    assert record["cassette"]["versions"]["vcrpy"]


@pytest.mark.parametrize("case_id", CASES)
def test_replay_reproduces_recorded_predictions(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]
    meta = json.loads(meta_path(CASSETTE_DIR / f"{case_id}.yaml").read_text())

    assert record["manifest_sha256"] == meta["manifest_sha256"]
    assert [row["sha256"] for row in record["predictions"]] == [row["sha256"] for row in meta["predictions"]]
    assert [row["predicted"] for row in record["predictions"]] == [row["predicted"] for row in meta["predictions"]]


@pytest.mark.parametrize("case_id", CASES)
def test_replay_runs_the_load_test(replay_run, case_id):
    _, records = replay_run
    load = records[case_id]["load_test"]

    assert load["requests"] == 1000
    assert load["succeeded"] == 1000
    assert load["errors_by_kind"] == {}


def test_other_training_set_names_cause(shared_cache_dir, tmp_path):
    datasets_dir = os.environ.get(DATASETS_DIR_ENV)
    if not datasets_dir:
        pytest.skip(f"{DATASETS_DIR_ENV} is unset; the committed cassettes replay only on the full beans dataset")
    results = tmp_path / "results.json"

    completed = run_benchmark(["--providers", "nyckel", "--datasets", "beans", "--ablations", "5",
                               "--ablation-seed", "another-seed", "--datasets-dir", datasets_dir,
                               "--results", str(results)], shared_cache_dir, timeout=300)

    assert completed.returncode == 1
    record = iter_records(json.loads(results.read_text()))[0]
    assert record["error"]["kind"] == "cassette_miss"
    assert "recorded with the training images of manifest" in record["error"]["message"]
    assert "--ablation-seed" in record["error"]["message"]

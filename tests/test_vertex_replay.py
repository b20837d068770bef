"""Replay of the committed Vertex AI cassettes, offline, in a fresh pytest process.

The cassettes were recorded against ``imgbench.emulators.vertex`` on the full
beans dataset, so this test needs that dataset in the folder that
``IMGBENCH_DATASETS_DIR`` names and is skipped where the variable is unset.
Each replayed case must pass with the network blocked and reproduce the
predictions stored in its cassette's sidecar file exactly, in test-set order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgbench.recording import meta_path
from tests.conftest import REPO_ROOT
from tests.replayrun import replay_committed

pytestmark = pytest.mark.slow

CASSETTE_DIR = REPO_ROOT / "cassettes" / "vertex"
CASES = ("vertex-beans-5", "vertex-beans-20")


@pytest.fixture(scope="module")
def replay_run(shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return replay_committed("vertex", tmp_path_factory.mktemp("vertex-replay"), shared_cache_dir)


def test_vertex_replay_run_passes(replay_run):
    completed, records = replay_run

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(records) == sorted(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_vertex_replayed_record_is_marked(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]

    assert record["status"] == "passed"
    assert record["mode"] == "replay"
    assert record["timings_measured"] is False
    assert record["network_blocked"] is True
    assert record["cassette"]["recorded_against"] == "emulator"
    assert record["provider_settings"]["run_mode"] == "replay"


@pytest.mark.parametrize("case_id", CASES)
def test_vertex_replay_reproduces_recorded_predictions(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]
    meta = json.loads(meta_path(CASSETTE_DIR / f"{case_id}.yaml").read_text())

    assert meta["recorded_against"] == "emulator"
    assert record["manifest_sha256"] == meta["manifest_sha256"]
    assert [row["sha256"] for row in record["predictions"]] == [row["sha256"] for row in meta["predictions"]]
    assert [row["predicted"] for row in record["predictions"]] == [row["predicted"] for row in meta["predictions"]]


@pytest.mark.parametrize("case_id", CASES)
def test_vertex_replay_runs_the_load_test(replay_run, case_id):
    _, records = replay_run
    load = records[case_id]["load_test"]

    assert load["requests"] == 1000
    assert load["succeeded"] == 1000
    assert load["errors_by_kind"] == {}


@pytest.mark.parametrize("case_id", CASES)
def test_vertex_cassette_holds_no_run_values(case_id):
    text = (CASSETTE_DIR / f"{case_id}.yaml").read_text(encoding="utf-8")

    assert "emulated-project" not in text
    assert "emulated-bucket" not in text
    assert "481516234200" not in text
    assert "<IMGBENCH_RUN_LABEL>" in text
    assert "Authorization" not in text

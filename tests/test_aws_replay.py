"""Recording and replay of Rekognition traffic: scrubbing on disk, and the committed cassettes offline.

The scrubbing tests record a small case against the AWS emulator with
credentials shaped like real ones, then read the cassette file. The replay
tests run ``pytest bench_tests`` on the committed cassettes in a fresh
process with the network blocked; they need the full beans dataset (128 test
images) in ``IMGBENCH_DATASETS_DIR`` and are skipped where it is unset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imgbench.clock import ReplayClock
from imgbench.emulators.aws import ACCOUNT_ID, RekognitionEmulator
from imgbench.recording import block_network, meta_path, scan_for_secrets, use_case_cassette
from providers.aws import RekognitionOptions, RekognitionProvider
from tests.conftest import REPO_ROOT
from tests.replayrun import replay_committed
from tests.test_aws import beans_records, training_set

CASSETTE_DIR = REPO_ROOT / "cassettes" / "aws"
CASES = ("aws-beans-5", "aws-beans-20")
# Shaped like a real access key pair, so the secret scanner would catch a leak.
ACCESS_KEY = "AKIAIMGBENCHTEST0001"
SECRET_KEY = "imgbenchTestSecretKey0000000000000000000"
BUCKET = "imgbench-scrub-test-bucket"
RUN_ID = "20260102T000000Z-def456"


@pytest.fixture(scope="module")
def recorded_text(tmp_path_factory: pytest.TempPathFactory, mini_datasets: Path) -> str:
    """Record one small case against the emulator and return the cassette file's text."""
    path = tmp_path_factory.mktemp("aws-recording") / "aws-scrub.yaml"
    with block_network(), RekognitionEmulator(training_polls=2) as emulator:
        provider = RekognitionProvider(
            RekognitionOptions(bucket=BUCKET, region="us-east-1", endpoint_url=emulator.url, poll_interval_s=1.0),
            run_mode="emulator", run_id=RUN_ID, clock=ReplayClock(), credentials=(ACCESS_KEY, SECRET_KEY))
        provider.case_id = "aws-scrub"
        with use_case_cassette(provider.recording_rules(), path, "all", "aws-scrub"):
            endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
            provider.invoke(endpoint, beans_records(mini_datasets, "test", 1)[0].read_bytes(), None)
            provider.teardown()
    return path.read_text(encoding="utf-8")


def test_recording_has_no_credentials(recorded_text):
    assert scan_for_secrets(recorded_text, (ACCESS_KEY, SECRET_KEY)) == []
    assert ACCESS_KEY not in recorded_text
    assert SECRET_KEY not in recorded_text


def test_recording_has_no_signatures(recorded_text):
    assert "AWS4-HMAC-SHA256" not in recorded_text
    assert "Signature=" not in recorded_text
    assert not re.search(r"(?i)x-amz-(date|security-token|content-sha256)", recorded_text)
    assert not re.search(r"(?i)amz-sdk-(invocation-id|request)", recorded_text)
    assert not re.search(r"(?i)x-amzn-requestid", recorded_text)


def test_recording_has_no_account_or_bucket(recorded_text):
    assert ACCOUNT_ID not in recorded_text
    assert BUCKET not in recorded_text
    assert RUN_ID not in recorded_text
    assert "<AWS_ACCOUNT_ID>" in recorded_text
    assert "<AWS_BUCKET>" in recorded_text


def test_recording_digests_image_bytes(recorded_text):
    assert '"Bytes":"sha256:' in recorded_text
    assert "X-Amz-Target" in recorded_text
    # A base64 JPEG starts with /9j/; none may reach the file.
    assert "/9j/" not in recorded_text


@pytest.mark.parametrize("case_id", CASES)
def test_committed_cassette_is_scrubbed(case_id):
    text = (CASSETTE_DIR / f"{case_id}.yaml").read_text(encoding="utf-8")

    assert scan_for_secrets(text) == []
    assert "AWS4-HMAC-SHA256" not in text
    assert not re.search(r"arn:aws:[a-z-]+:[a-z0-9-]*:\d{12}:", text)
    assert "imgbench-emulator-bucket" not in text
    assert "/9j/" not in text


# Replay of the committed cassettes ---------------------------------------------------------

@pytest.fixture(scope="module")
def replay_run(shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return replay_committed("aws", tmp_path_factory.mktemp("aws-replay"), shared_cache_dir)


@pytest.mark.slow
def test_aws_replay_run_passes(replay_run):
    completed, records = replay_run

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(records) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_aws_replayed_record_is_marked(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]

    assert record["status"] == "passed"
    assert record["mode"] == "replay"
    assert record["timings_measured"] is False
    assert record["network_blocked"] is True
    assert record["cassette"]["recorded_against"] == "emulator"
    assert record["model"]["billable_training_s"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_aws_replay_reproduces_recorded_predictions(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]
    meta = json.loads(meta_path(CASSETTE_DIR / f"{case_id}.yaml").read_text())

    assert meta["recorded_against"] == "emulator"
    assert record["manifest_sha256"] == meta["manifest_sha256"]
    assert [row["sha256"] for row in record["predictions"]] == [row["sha256"] for row in meta["predictions"]]
    assert [row["predicted"] for row in record["predictions"]] == [row["predicted"] for row in meta["predictions"]]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_aws_replay_runs_the_load_test(replay_run, case_id):
    _, records = replay_run
    load = records[case_id]["load_test"]

    assert load["requests"] == 1000
    assert load["succeeded"] == 1000
    assert load["errors_by_kind"] == {}

"""Recording and replay of the Hugging Face provider's traffic.

The in-process tests record a case against the emulator into a temporary
cassette, read the file and check that no token, namespace, run prefix or
emulator address reached disk, then replay it with the network blocked.

The committed cassettes were recorded against the emulator on the full beans
dataset. Their replay runs ``pytest bench_tests`` in a fresh process, so it
needs ``IMGBENCH_DATASETS_DIR`` and is skipped where that is unset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml

from imgbench.clock import ReplayClock
from imgbench.emulators.huggingface import HuggingFaceEmulator, whoami_profile
from imgbench.recording import REDACTED, block_network, meta_path, scan_for_secrets, use_case_cassette
from providers.huggingface import HuggingFaceOptions, HuggingFaceProvider
from tests.conftest import REPO_ROOT
from tests.replayrun import replay_committed
from tests.test_huggingface import beans_records, training_set

CASSETTE_DIR = REPO_ROOT / "cassettes" / "huggingface"
CASES = ("huggingface-beans-5", "huggingface-beans-20")
CASE_ID = "huggingface-beans-3"
TOKEN = "hf_scrubCheckToken7731"
USER = "scrub-check-user"
RECORD_PREFIX = "imgbench-20250101T000000Z-abc123"
REPLAY_PREFIX = "imgbench-20990101T000000Z-fff000"


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


def run_case(provider: HuggingFaceProvider, mini_datasets: Path, images: list[bytes]) -> list[str]:
    """Upload, train, deploy and invoke once per image; return the predicted labels."""
    provider.case_id = CASE_ID
    try:
        endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
        with requests.Session() as session:
            return [provider.invoke(endpoint, image, session).label for image in images]
    finally:
        provider.teardown()


@pytest.fixture
def recorded(mini_datasets: Path, tmp_path: Path):
    """Record one case against a fresh emulator; return the cassette path, predictions and emulator."""
    path = tmp_path / "huggingface" / f"{CASE_ID}.yaml"
    images = [record.read_bytes() for record in beans_records(mini_datasets, "test", 1)]
    with HuggingFaceEmulator(tokens={TOKEN: USER}, training_reads=2, startup_reads=2, startup_503=1) as emulator:
        provider = HuggingFaceProvider(
            HuggingFaceOptions(hub_url=emulator.url, endpoints_api_url=f"{emulator.url}/v2", poll_interval_s=0.5),
            run_mode="emulator", token=TOKEN, run_prefix=RECORD_PREFIX, clock=ReplayClock())
        provider.case_id = CASE_ID
        with use_case_cassette(provider.recording_rules(), path, "once", CASE_ID):
            labels = run_case(provider, mini_datasets, images)
        return path, labels, images, emulator.url


def test_secrets_absent_on_disk(recorded):
    path, _, _, emulator_url = recorded
    text = path.read_text()

    assert TOKEN not in text
    assert USER not in text
    assert RECORD_PREFIX not in text
    assert emulator_url.split("//")[1] not in text
    assert "authorization" not in text.lower()
    assert scan_for_secrets(text, (TOKEN,)) == []


def identifying_values(value, key: str = "") -> list[str]:
    """Return every string in a whoami response except the type and role fields, which name no one."""
    if isinstance(value, dict):
        return [found for item_key, item in value.items() for found in identifying_values(item, item_key)]
    if isinstance(value, list):
        return [found for item in value for found in identifying_values(item, key)]
    if isinstance(value, str) and key not in ("type", "role", "roleInOrg"):
        return [value]
    return []


def test_whoami_profile_absent_on_disk(recorded):
    path, *_ = recorded
    text = path.read_text()
    profile = whoami_profile(USER)
    values = identifying_values(profile)

    assert profile["email"] in values
    assert profile["orgs"][0]["id"] in values
    assert profile["auth"]["accessToken"]["displayName"] in values
    for value in values:
        assert value not in text, f"whoami value {value!r} reached the cassette"


def test_whoami_stored_without_account_fields(recorded):
    path, *_ = recorded
    interactions = yaml.safe_load(path.read_text())["interactions"]

    stored = [json.loads(item["response"]["body"]["string"]) for item in interactions
              if item["request"]["uri"].endswith("/api/whoami-v2")]

    assert stored == [{"auth": {"accessToken": {"role": "write"}, "type": "access_token"},
                       "name": "<HF_NAMESPACE>", "type": "user"}]


def test_job_secrets_are_redacted(recorded):
    path, *_ = recorded
    interactions = yaml.safe_load(path.read_text())["interactions"]

    jobs = [item for item in interactions
            if item["request"]["method"] == "POST" and item["request"]["uri"].endswith("/api/jobs/<HF_NAMESPACE>")]
    body = json.loads(jobs[0]["request"]["body"])

    assert body["secrets"] == REDACTED
    assert "<HF_NAMESPACE>" in body["environment"]["AUTOTRAIN_CONFIG"]


def test_uploaded_files_stored_as_digests(recorded):
    path, *_ = recorded
    interactions = yaml.safe_load(path.read_text())["interactions"]

    commits = [item["request"]["body"] for item in interactions if "/commit/" in item["request"]["uri"]]
    lines = [json.loads(line) for line in commits[0].splitlines()]
    files = [line["value"] for line in lines if line["key"] == "file"]

    assert files
    assert all(item["content"].startswith("sha256:") for item in files)
    assert path.stat().st_size < 200_000


def test_replay_reproduces_predictions(recorded, mini_datasets):
    path, labels, images, _ = recorded
    provider = HuggingFaceProvider(HuggingFaceOptions(poll_interval_s=0.5), run_mode="replay",
                                   token="hf_replayToken", run_prefix=REPLAY_PREFIX, clock=ReplayClock())
    provider._namespace = "replay-user"
    provider.case_id = CASE_ID

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        replayed = run_case(provider, mini_datasets, images)

    assert replayed == labels
    assert provider.counters()["endpoint_startup_503"] == 1


@pytest.fixture(scope="module")
def replay_run(shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return replay_committed("huggingface", tmp_path_factory.mktemp("replay"), shared_cache_dir)


@pytest.mark.slow
def test_replay_run_passes(replay_run):
    completed, records = replay_run

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(records) == sorted(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_replayed_record_is_marked(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]

    assert record["status"] == "passed"
    assert record["mode"] == "replay"
    assert record["network_blocked"] is True
    assert record["cassette"]["recorded_against"] == "emulator"
    assert record["cassette"]["versions"]["huggingface_hub"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_replay_reproduces_recorded_predictions(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]
    meta = json.loads(meta_path(CASSETTE_DIR / f"{case_id}.yaml").read_text())

    assert record["manifest_sha256"] == meta["manifest_sha256"]
    assert [row["sha256"] for row in record["predictions"]] == [row["sha256"] for row in meta["predictions"]]
    assert [row["predicted"] for row in record["predictions"]] == [row["predicted"] for row in meta["predictions"]]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASES)
def test_replay_waits_out_recorded_startup(replay_run, case_id):
    _, records = replay_run
    record = records[case_id]

    assert record["provider_counters"]["endpoint_startup_503"] == 2
    assert record["load_test"]["succeeded"] == record["load_test"]["requests"] == 1000

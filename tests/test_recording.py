"""Tests of imgbench.recording and imgbench.clock: scrubbing, matching, replay and the secret scan.

Cassettes are recorded against the Nyckel emulator into ``tmp_path`` through
the real provider, then read back from disk or replayed by a fresh provider
in replay mode. Connections to anything but loopback addresses are blocked.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from imgbench.clock import ReplayClock, ReplayClockExhausted
from imgbench.emulators.nyckel import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, NyckelEmulator
from imgbench.errors import ConfigError
from imgbench.recording import (
    CassetteMissError,
    NetworkBlockedError,
    block_network,
    scan_for_secrets,
    scrub_body,
    use_case_cassette,
    validate_record_mode,
)
from providers.nyckel import NyckelOptions, NyckelProvider
from tests.test_nyckel import CLIENT_ID, CLIENT_SECRET, beans_records, training_set

REPO_ROOT = Path(__file__).resolve().parents[1]
CASE_ID = "nyckel-beans-test"
SECRET_FREE = frozenset()


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


@pytest.fixture
def emulator():
    with NyckelEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, training_polls=4) as running:
        yield running


def emulator_provider(emulator: NyckelEmulator, **options) -> NyckelProvider:
    return NyckelProvider(NyckelOptions(base_url=emulator.url, poll_interval_s=0.0, **options),
                          run_mode="emulator", client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                          run_prefix="imgbench-20250101T000000Z-abc123", clock=ReplayClock())


def replay_provider(**options) -> NyckelProvider:
    return NyckelProvider(NyckelOptions(**options), run_mode="replay", client_id="replay-client-id",
                          client_secret="replay-client-secret", run_prefix="imgbench-20990101T000000Z-fff000")


def run_case(provider: NyckelProvider, mini_datasets: Path, sample_images: list[bytes]) -> list[str]:
    """Upload, train and invoke once per image; return the predicted labels."""
    try:
        endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
        with requests.Session() as session:
            return [provider.invoke(endpoint, image, session).label for image in sample_images]
    finally:
        provider.teardown()


def record(emulator: NyckelEmulator, path: Path, mini_datasets: Path, sample_images: list[bytes],
           **options) -> list[str]:
    provider = emulator_provider(emulator, **options)
    with use_case_cassette(provider.recording_rules(), path, "once", CASE_ID):
        return run_case(provider, mini_datasets, sample_images)


def interactions(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["interactions"]


@pytest.fixture
def sample_images(mini_datasets: Path) -> list[bytes]:
    return [record.read_bytes() for record in beans_records(mini_datasets, "test", 1)]


def test_secrets_absent_on_disk(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / "nyckel" / f"{CASE_ID}.yaml"

    record(emulator, path, mini_datasets, sample_images)
    text = path.read_text()

    assert emulator.tokens_issued == 1
    assert CLIENT_SECRET not in text
    assert CLIENT_ID not in text
    for token in emulator.tokens:
        assert token not in text
    assert "authorization" not in text.lower()
    assert "imgbench-20250101T000000Z-abc123" not in text
    assert scan_for_secrets(text, (CLIENT_ID, CLIENT_SECRET, *emulator.tokens)) == []


def test_image_bodies_stored_as_digests(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"

    record(emulator, path, mini_datasets, sample_images)
    bodies = [item["request"]["body"] or "" for item in interactions(path)]

    assert not any("base64," in body for body in bodies)
    assert sum('"data":"sha256:' in body for body in bodies) == 9 + len(sample_images)
    assert path.stat().st_size < 100_000


def test_replay_reproduces_predictions(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    recorded = record(emulator, path, mini_datasets, sample_images)
    provider = replay_provider()

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        replayed = run_case(provider, mini_datasets, sample_images)

    assert replayed == recorded


def test_different_image_does_not_match(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    record(emulator, path, mini_datasets, sample_images[:1])
    unrecorded = sample_images[1]
    provider = replay_provider()

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        with pytest.raises(CassetteMissError) as caught:
            run_case(provider, mini_datasets, [sample_images[0], unrecorded])

    message = str(caught.value)
    assert caught.value.kind == "cassette_miss"
    assert f"case {CASE_ID}" in message
    assert "POST /v1/functions/function_" in message
    assert "/invoke?capture=false" in message
    assert "Closest recorded requests" in message
    assert "body_digest" in message
    assert "--record-mode=once" in message


def test_exhausted_cassette_names_request(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    record(emulator, path, mini_datasets, sample_images)
    provider = replay_provider()

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        run_case(provider, mini_datasets, sample_images)
        with pytest.raises(CassetteMissError) as caught:
            provider.sweep_leftovers("imgbench-never-recorded")

    message = str(caught.value)
    assert f"case {CASE_ID}" in message
    assert "GET /v1/functions" in message
    assert str(path) in message


def test_replay_clock_skips_training_wait(mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    with NyckelEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, training_polls=40) as emulator:
        record(emulator, path, mini_datasets, sample_images[:1])
    provider = replay_provider(poll_interval_s=10.0)

    started = time.perf_counter()
    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        run_case(provider, mini_datasets, sample_images[:1])
    wall_s = time.perf_counter() - started

    assert provider.clock.virtual_seconds >= 190  # 19 sleeps between 20 status checks, 10 s apart
    assert wall_s < 1.0


def test_repeats_stored_once_and_replayed_concurrently(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    image = sample_images[0]
    recorded = record(emulator, path, mini_datasets, [image] * 30)
    invokes = [item for item in interactions(path) if item["request"]["uri"].endswith("/invoke?capture=false")]
    provider = replay_provider()
    labels: list[str] = []
    errors: list[Exception] = []

    def invoke_many(endpoint) -> None:
        with requests.Session() as session:
            for _ in range(20):
                try:
                    labels.append(provider.invoke(endpoint, image, session).label)
                except Exception as exc:  # collected for the assertion below
                    errors.append(exc)

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
        threads = [threading.Thread(target=invoke_many, args=(endpoint,)) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        provider.teardown()

    assert len(invokes) == 1
    assert errors == []
    assert labels == [recorded[0]] * 200


def test_throttled_retry_replays_in_order(emulator, mini_datasets, sample_images, tmp_path):
    path = tmp_path / f"{CASE_ID}.yaml"
    emulator.throttle(2)
    recorded = record(emulator, path, mini_datasets, sample_images[:1])
    provider = replay_provider()

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        replayed = run_case(provider, mini_datasets, sample_images[:1])

    assert replayed == recorded
    assert provider.counters()["throttled_429"] == 2


def test_network_blocked_except_loopback(emulator):
    with pytest.raises(NetworkBlockedError, match="192.0.2.1"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)

    with socket.create_connection(("127.0.0.1", int(emulator.url.rsplit(":", 1)[1])), timeout=5):
        pass


def test_replay_clock_caps_sleeps():
    clock = ReplayClock(max_sleeps=3)
    for _ in range(3):
        clock.sleep(10)

    with pytest.raises(ReplayClockExhausted, match="re-record"):
        clock.sleep(10)
    assert clock.virtual_seconds == 40


def test_replay_clock_caps_virtual_time():
    clock = ReplayClock(max_virtual_s=60)

    with pytest.raises(ReplayClockExhausted):
        clock.sleep(61)


def test_scrub_body_forms_and_json():
    form = scrub_body(b"grant_type=client_credentials&client_id=abc&client_secret=xyz",
                      "application/x-www-form-urlencoded", frozenset({"client_id", "client_secret"}))
    data_uri = b'{"data": "data:image/jpeg;base64,/9j/4AAQ", "externalId": "e1"}'
    scrubbed_json = scrub_body(data_uri, "application/json", SECRET_FREE)
    binary = scrub_body(b"\xff\xd8\xff\xe0 jpeg bytes", "image/jpeg", SECRET_FREE)

    assert form == b"client_id=REDACTED&client_secret=REDACTED&grant_type=client_credentials"
    assert scrubbed_json.startswith(b'{"data":"sha256:')
    assert scrub_body(scrubbed_json, "application/json", SECRET_FREE) == scrubbed_json
    assert binary.startswith(b"sha256:")
    assert scrub_body(binary, "image/jpeg", SECRET_FREE) == binary


def test_invalid_record_mode_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid modes: none, once, new_episodes, all"):
        validate_record_mode("sometimes")


def committed_cassettes() -> list[Path]:
    return sorted((REPO_ROOT / "cassettes").glob("**/*.yaml"))


def test_committed_cassettes_exist():
    names = {path.name for path in committed_cassettes()}

    assert {"nyckel-beans-5.yaml", "nyckel-beans-20.yaml"} <= names


@pytest.mark.parametrize("path", committed_cassettes(), ids=lambda path: path.name)
def test_committed_cassette_has_no_secrets(path):
    text = path.read_text()

    assert scan_for_secrets(text, (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, CLIENT_ID, CLIENT_SECRET)) == []
    assert "authorization" not in text.lower()
    assert path.stat().st_size < 1_000_000


@pytest.mark.parametrize("planted", [
    "Authorization: Bearer abcdef0123456789",
    "body: grant_type=client_credentials&client_secret=s3cr3t-value",
    """string: '{"access_token":"eyJhbGciOiJSUzI1NiJ9"}'""",
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    "-----BEGIN RSA PRIVATE KEY-----",
    f"body: name={CLIENT_SECRET}",
])
def test_scanner_finds_planted_secret(planted, tmp_path):
    cassette = tmp_path / "planted.yaml"
    original = (REPO_ROOT / "cassettes" / "nyckel" / "nyckel-beans-5.yaml").read_text()
    cassette.write_text(original + f"# {planted}\n")

    findings = scan_for_secrets(cassette.read_text(), (CLIENT_ID, CLIENT_SECRET))

    assert len(findings) == 1, findings


@pytest.mark.parametrize("clean", [
    "client_id=REDACTED&client_secret=REDACTED&grant_type=client_credentials",
    """'{"access_token":"REDACTED","expires_in":3600,"token_type":"Bearer"}'""",
    '{"name":"<IMGBENCH_RUN_PREFIX>-nyckel-beans-5"}',
])
def test_scanner_accepts_scrubbed_values(clean):
    assert scan_for_secrets(clean) == []

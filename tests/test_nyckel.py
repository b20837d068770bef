"""Tests of the Nyckel provider against the Nyckel emulator on 127.0.0.1.

The provider runs in-process against a real HTTP server (the emulator), with a
virtual clock wherever it would wait, so backoff and polling take no wall
time. Cases that go through the benchmark's fixtures (quota, failed training)
run ``pytest bench_tests`` in a fresh process against an emulator started
here. Connections to anything but loopback addresses are blocked.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from imgbench.ablation import PlannedImage
from imgbench.clock import ReplayClock
from imgbench.datasets import ImageRecord
from imgbench.emulators.nyckel import NyckelEmulator
from imgbench.errors import (
    AuthenticationError,
    ConfigError,
    QuotaError,
    ServiceFailureError,
    ThrottledError,
    TrainingFailedError,
    error_kind,
)
from imgbench.images import sha256_bytes
from imgbench.pytest_plugin import markexpr_selects_live
from imgbench.recording import block_network
from imgbench.retry import TransientError
from imgbench.results import iter_records
from providers import TrainingSet
from providers.nyckel import NyckelOptions, NyckelProvider
from tests.conftest import run_benchmark

CLIENT_ID = "test-client-id-3f9a"
CLIENT_SECRET = "test-client-secret-7c1e"


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock()


@pytest.fixture
def emulator(clock: ReplayClock):
    with NyckelEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, training_polls=4,
                        time_source=clock.monotonic) as running:
        yield running


def make_provider(emulator: NyckelEmulator, clock: ReplayClock, **options) -> NyckelProvider:
    return NyckelProvider(NyckelOptions(base_url=emulator.url, **options), run_mode="emulator",
                          client_id=CLIENT_ID, client_secret=CLIENT_SECRET, run_prefix="imgbench-test",
                          clock=clock)


def beans_records(mini_datasets: Path, split: str, per_class: int) -> list[ImageRecord]:
    records = []
    for class_dir in sorted((mini_datasets / "beans" / split).iterdir()):
        for path in sorted(class_dir.glob("*.jpg"))[:per_class]:
            records.append(ImageRecord(path, class_dir.name, sha256_bytes(path.read_bytes()), split))
    return records


def training_set(mini_datasets: Path, per_class: int = 3) -> TrainingSet:
    images = tuple(PlannedImage(record, "train") for record in beans_records(mini_datasets, "train", per_class))
    classes = tuple(sorted({image.label for image in images}))
    return TrainingSet("nyckel-beans-test", classes, images)


def test_full_case_predicts_known_labels(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    endpoint = provider.deploy(model)

    with requests.Session() as session:
        predictions = [provider.invoke(endpoint, record.read_bytes(), session)
                       for record in beans_records(mini_datasets, "test", 2)]
    provider.teardown()

    assert {prediction.label for prediction in predictions} <= {"angular_leaf_spot", "bean_rust", "healthy"}
    assert all(0.0 <= prediction.confidence <= 1.0 for prediction in predictions)
    assert model.sample_count == 9
    assert model.polls >= 2
    assert emulator.functions == {}


def test_training_waits_on_the_clock(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, poll_interval_s=5.0)

    provider.train(provider.upload(training_set(mini_datasets)))

    assert clock.sleeps >= 1
    assert clock.virtual_seconds == pytest.approx(5.0 * clock.sleeps)


def test_repeated_upload_counts_as_uploaded(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    image = training_set(mini_datasets, per_class=1).images[0]
    duplicated = TrainingSet("nyckel-beans-dup", (image.label,), (image, image))

    upload = provider.upload(duplicated)

    assert upload.already_present == 1
    assert len(upload.sample_ids) == 2
    assert upload.sample_ids[0] == upload.sample_ids[1]
    assert len(emulator.samples(upload.function_id)) == 1
    assert provider.counters()["samples_already_present"] == 1


def test_invoke_never_captures(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    samples_before = len(emulator.samples(model.function_id))

    with requests.Session() as session:
        for record in beans_records(mini_datasets, "test", 2):
            provider.invoke(provider.deploy(model), record.read_bytes(), session)

    assert emulator.invocations == 6
    assert emulator.captured_invocations == 0
    assert len(emulator.samples(model.function_id)) == samples_before


def test_emulator_captures_without_flag(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    data = provider._prepare(beans_records(mini_datasets, "test", 1)[0].read_bytes(), "test image")
    token = provider._access_token()

    response = requests.post(f"{emulator.url}/v1/functions/{model.function_id}/invoke", json={"data": data},
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)

    assert response.status_code == 200
    assert emulator.captured_invocations == 1


def test_throttling_backs_off_and_counts(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.throttle(3)

    upload = provider.upload(training_set(mini_datasets, per_class=1))

    assert provider.counters()["throttled_429"] == 3
    assert emulator.throttled == 3
    assert clock.sleeps == 3
    assert len(emulator.samples(upload.function_id)) == 3


def test_throttling_gives_up_after_max_attempts(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, max_attempts=3)
    emulator.throttle(100)

    with pytest.raises(ThrottledError) as caught:
        provider.upload(training_set(mini_datasets, per_class=1))

    assert error_kind(caught.value) == "throttling"
    assert "after 3 attempts" in str(caught.value)
    assert provider.counters()["throttled_429"] == 3
    assert provider.counters()["retried_throttling"] == 2
    assert provider.counters()["throttling_gave_up"] == 1
    assert isinstance(caught.value.__cause__, TransientError)
    assert isinstance(caught.value.__cause__.__cause__, requests.HTTPError)


def test_quota_on_upload_is_quota_error(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.exceed_quota("samples")

    with pytest.raises(QuotaError) as caught:
        provider.upload(training_set(mini_datasets, per_class=1))

    assert error_kind(caught.value) == "quota"
    assert "HTTP 402" in str(caught.value)
    assert caught.value.__cause__.response.status_code == 402


def test_server_error_is_service_failure(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, max_attempts=3)
    emulator.fail_with_server_error(100)

    with pytest.raises(ServiceFailureError) as caught:
        provider.upload(training_set(mini_datasets, per_class=1))

    assert error_kind(caught.value) == "service_failure"
    assert "HTTP 500" in str(caught.value)
    assert provider.counters()["retried_server_error"] == 2
    assert provider.counters()["server_error_gave_up"] == 1


def test_single_server_error_retried(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.fail_with_server_error(1)

    upload = provider.upload(training_set(mini_datasets, per_class=1))

    assert len(emulator.samples(upload.function_id)) == 3
    assert provider.counters()["retried_server_error"] == 1


def test_wrong_secret_is_authentication_error(emulator, clock, mini_datasets):
    provider = NyckelProvider(NyckelOptions(base_url=emulator.url), run_mode="emulator", client_id=CLIENT_ID,
                              client_secret="wrong", clock=clock)

    with pytest.raises(AuthenticationError) as caught:
        provider.upload(training_set(mini_datasets, per_class=1))

    assert "HTTP 401" in str(caught.value)
    assert "NYCKEL_CLIENT_SECRET" in str(caught.value)


def test_token_renewed_before_expiry(clock, mini_datasets):
    with NyckelEmulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_ttl_s=1200,
                        time_source=clock.monotonic) as emulator:
        provider = make_provider(emulator, clock)
        provider.sweep_leftovers("imgbench-none")
        clock.sleep(500)
        provider.sweep_leftovers("imgbench-none")
        assert emulator.tokens_issued == 1

        clock.sleep(200)  # 700 s in: less than the 600 s margin is left
        provider.sweep_leftovers("imgbench-none")

        assert emulator.tokens_issued == 2
        assert provider.counters()["tokens_fetched"] == 2


def test_expired_token_rejected(emulator, clock):
    token = requests.post(f"{emulator.url}/connect/token", timeout=10, data={
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
    }).json()["access_token"]
    clock.sleep(emulator.token_ttl_s + 1)

    response = requests.get(f"{emulator.url}/v1/functions", headers={"Authorization": f"Bearer {token}"},
                            timeout=10)

    assert response.status_code == 401
    assert "expired" in response.json()["message"]


def test_failed_training_raises(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.fail_training()
    upload = provider.upload(training_set(mini_datasets, per_class=1))

    with pytest.raises(TrainingFailedError) as caught:
        provider.train(upload)
    provider.teardown()

    assert error_kind(caught.value) == "training_failed"
    assert emulator.functions == {}
    assert emulator.deleted_functions == [upload.function_id]


def test_sweep_deletes_only_prefixed_functions(emulator, clock):
    provider = make_provider(emulator, clock)
    for name in ("imgbench-old-run-nyckel-beans-5", "imgbench-old-run-nyckel-beans-20", "production-model"):
        provider._call("POST", "/v1/functions", operation="function creation",
                       json_body={"input": "Image", "output": "Classification", "name": name})

    deleted = provider.sweep_leftovers("imgbench-old-run")

    assert len(deleted) == 2
    assert [function.name for function in emulator.functions.values()] == ["production-model"]


def test_sweep_rejects_foreign_prefix(emulator, clock):
    provider = make_provider(emulator, clock)

    with pytest.raises(ConfigError, match="must start with 'imgbench-'"):
        provider.sweep_leftovers("production")


def test_large_image_resized_to_limit(emulator, clock):
    provider = make_provider(emulator, clock)
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(buffer, format="PNG")

    uri = provider._prepare(buffer.getvalue(), "large image")

    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as sent:
        assert sent.size == (1024, 512)
    assert "longest-side<=1024" in provider.settings()["image_policy"]


@pytest.mark.parametrize(("expression", "live"), [
    ("live", True),
    ("live and not slow", True),
    ("not local", False),
    ("live or replay", False),
    ("replay", False),
    ("", False),
])
def test_markexpr_decides_live(expression, live):
    assert markexpr_selects_live(expression) is live


@pytest.mark.parametrize("selection", [["-m", "live"], ["--live"]])
def test_live_without_credentials_is_usage_error(selection, shared_cache_dir):
    completed = run_benchmark(["--providers", "nyckel", *selection], shared_cache_dir, timeout=120)

    assert completed.returncode == 4
    assert "NYCKEL_CLIENT_ID" in completed.stderr
    assert "NYCKEL_CLIENT_SECRET" in completed.stderr


@pytest.mark.parametrize(("options", "selected", "deselected"), [
    (["-m", "replay"], "nyckel-beans-5", "local-beans-5"),
    (["-m", "local"], "local-beans-5", "nyckel-beans-5"),
    (["-m", "emulator", "--nyckel-url", "http://127.0.0.1:9"], "nyckel-beans-5", "local-beans-5"),
])
def test_cases_marked_by_mode(options, selected, deselected, shared_cache_dir):
    completed = run_benchmark(["--providers", "local,nyckel", "--datasets", "beans", "--ablations", "5",
                               "--collect-only", "-q", *options], shared_cache_dir, timeout=120)

    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert selected in completed.stdout
    assert deselected not in completed.stdout


def test_record_mode_without_service_is_usage_error(shared_cache_dir):
    completed = run_benchmark(["--providers", "nyckel", "--record-mode", "once"], shared_cache_dir, timeout=120)

    assert completed.returncode == 4
    assert "--nyckel-url" in completed.stderr


def run_against_emulator(emulator: NyckelEmulator, mini_datasets: Path, cache_dir: Path, results: Path):
    completed = run_benchmark(["--providers", "nyckel", "--nyckel-url", emulator.url, "--datasets-dir",
                               str(mini_datasets), "--datasets", "beans", "--ablations", "5",
                               "--load-requests", "20", "--results", str(results)], cache_dir)
    records = {record["case_id"]: record for record in iter_records(json.loads(results.read_text()))}
    return completed, records["nyckel-beans-5"]


@pytest.mark.slow
def test_quota_ends_case_with_record(mini_datasets, shared_cache_dir, tmp_path):
    with NyckelEmulator(training_polls=2) as emulator:
        emulator.exceed_quota("invoke")
        completed, record = run_against_emulator(emulator, mini_datasets, shared_cache_dir, tmp_path / "r.json")

    assert completed.returncode == 1, completed.stdout[-3000:]
    assert record["status"] == "failed"
    assert record["mode"] == "emulator"
    assert record["error"]["kind"] == "quota"
    assert record["error"]["type"] == "QuotaError"
    assert "HTTP 402" in record["error"]["message"]
    assert "load_test" not in record
    assert emulator.invocations == 0  # the 402 response comes before a prediction is counted
    assert emulator.functions == {}


@pytest.mark.slow
def test_failed_training_case_deletes_function(mini_datasets, shared_cache_dir, tmp_path):
    with NyckelEmulator(training_polls=2) as emulator:
        emulator.fail_training()
        completed, record = run_against_emulator(emulator, mini_datasets, shared_cache_dir, tmp_path / "r.json")

    assert completed.returncode == 1
    assert record["status"] == "failed"
    assert record["error"]["kind"] == "training_failed"
    assert emulator.functions == {}
    assert len(emulator.deleted_functions) == 1
    assert record["provider_counters"]["throttled_429"] == 0


@pytest.mark.slow
def test_emulator_run_records_counters(mini_datasets, shared_cache_dir, tmp_path):
    with NyckelEmulator(training_polls=2) as emulator:
        emulator.throttle(2)
        completed, record = run_against_emulator(emulator, mini_datasets, shared_cache_dir, tmp_path / "r.json")

    assert completed.returncode == 0, completed.stdout[-3000:]
    assert record["status"] == "passed"
    assert record["timings_measured"] is True
    assert record["provider_counters"]["throttled_429"] == 2
    assert record["load_test"]["succeeded"] == 20
    assert emulator.captured_invocations == 0

"""Tests of the Hugging Face provider against the Hugging Face emulator on 127.0.0.1.

The provider drives the real huggingface_hub client (``HfApi``) and
``requests`` against a real HTTP server (the emulator), with a virtual clock
wherever it would wait. The emulator's trainer builds per-label colour
centroids from the uploaded images, so predictions depend on the training
set. Connections to anything but loopback addresses are blocked.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from imgbench.ablation import PlannedImage
from imgbench.clock import ReplayClock
from imgbench.datasets import ImageRecord
from imgbench.emulators.huggingface import DEFAULT_USER, ApiError, HuggingFaceEmulator
from imgbench.errors import (
    AuthenticationError,
    ConfigError,
    MissingCredentialsError,
    ProviderError,
    ProviderTimeoutError,
    ServiceFailureError,
    TrainingFailedError,
)
from imgbench.images import sha256_bytes
from imgbench.ledger import RunLedger
from imgbench.recording import block_network
from imgbench.results import iter_records
from imgbench.retry import CONNECTION_RESET
from providers import TrainingSet
from providers.huggingface import HuggingFaceOptions, HuggingFaceProvider
from tests.benchrun import bench_environment
from tests.conftest import REPO_ROOT, run_benchmark

TOKEN = "hf_testTokenForTheEmulator4821"
RUN_ID = "20261204T000000Z-abc123"
RUN_PREFIX = f"imgbench-{RUN_ID}"


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock()


@pytest.fixture
def emulator():
    with HuggingFaceEmulator(tokens={TOKEN: DEFAULT_USER}, training_reads=4, startup_reads=3,
                             startup_503=2) as running:
        yield running


def make_provider(emulator: HuggingFaceEmulator, clock: ReplayClock, *, token: str = TOKEN,
                  ledger: RunLedger | None = None, run_prefix: str = RUN_PREFIX, **options) -> HuggingFaceProvider:
    provider = HuggingFaceProvider(
        HuggingFaceOptions(hub_url=emulator.url, endpoints_api_url=f"{emulator.url}/v2", poll_interval_s=1.0,
                           **options),
        run_mode="emulator", token=token, run_prefix=run_prefix, clock=clock)
    provider.case_id = "huggingface-beans-3"
    if ledger is not None:
        provider.ledger = ledger
    return provider


def beans_records(mini_datasets: Path, split: str, per_class: int) -> list[ImageRecord]:
    records = []
    for class_dir in sorted((mini_datasets / "beans" / split).iterdir()):
        for path in sorted(class_dir.glob("*.jpg"))[:per_class]:
            records.append(ImageRecord(path, class_dir.name, sha256_bytes(path.read_bytes()), split))
    return records


def training_set(mini_datasets: Path, per_class: int = 4) -> TrainingSet:
    records = beans_records(mini_datasets, "train", per_class)
    images = tuple(PlannedImage(record, "validation" if index % 4 == 3 else "train")
                   for index, record in enumerate(records))
    classes = tuple(sorted({image.label for image in images}))
    return TrainingSet("huggingface-beans-3", classes, images)


def run_to_endpoint(provider: HuggingFaceProvider, mini_datasets: Path):
    upload = provider.upload(training_set(mini_datasets))
    model = provider.train(upload)
    return upload, model, provider.deploy(model)


def test_case_predicts_from_training_images(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)

    _, model, endpoint = run_to_endpoint(provider, mini_datasets)
    with requests.Session() as session:
        predictions = [provider.invoke(endpoint, record.read_bytes(), session)
                       for record in beans_records(mini_datasets, "train", 2)]
    provider.teardown()

    assert model.model_repo == f"{DEFAULT_USER}/{RUN_PREFIX}-huggingface-beans-3"
    assert [p.label for p in predictions] == ["angular_leaf_spot"] * 2 + ["bean_rust"] * 2 + ["healthy"] * 2
    assert all(0 < p.confidence <= 1 for p in predictions)
    assert emulator.counts["predictions"] == 1 + len(predictions)
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_dataset_upload_uses_image_folder_layout(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    uploaded = training_set(mini_datasets)

    upload = provider.upload(uploaded)
    repo = emulator.repos[("dataset", upload.dataset_repo)]

    assert upload.dataset_repo == f"{DEFAULT_USER}/{RUN_PREFIX}-huggingface-beans-3-data"
    assert repo.private is True
    assert len(repo.files) == len(uploaded.images) == upload.image_count
    assert sum(path.startswith("validation/") for path in repo.files) == 3
    assert all(data.startswith(b"\xff\xd8") for data in repo.files.values())
    assert {path.split("/")[1] for path in repo.files} == {"angular_leaf_spot", "bean_rust", "healthy"}
    provider.teardown()
    assert emulator.resources()["datasets"] == []


def test_autotrain_config_carries_options(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, base_model="google/vit-base-patch16-224", epochs=5,
                             learning_rate=3e-5, batch_size=16)

    provider.train(provider.upload(training_set(mini_datasets)))
    job = next(iter(emulator.jobs.values()))
    config = yaml.safe_load(job.spec["environment"]["AUTOTRAIN_CONFIG"])
    provider.teardown()

    assert job.spec["dockerImage"] == "huggingface/autotrain-advanced:latest"
    assert config["task"] == "image_classification"
    assert config["params"]["epochs"] == 5
    assert config["params"]["lr"] == 3e-5
    assert config["params"]["batch_size"] == 16
    assert config["data"]["valid_split"] == "validation"
    assert TOKEN not in job.spec["environment"]["AUTOTRAIN_CONFIG"]
    assert emulator.job_secrets == [{"HF_TOKEN": TOKEN}]


def test_training_waits_on_the_clock(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)

    model = provider.train(provider.upload(training_set(mini_datasets)))
    provider.teardown()

    assert model.status_reads == 4
    assert model.job_stage == "COMPLETED"
    assert clock.virtual_seconds == pytest.approx(3.0)


def test_failed_training_cleans_up(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.fail_training()

    with pytest.raises(TrainingFailedError, match="ERROR"):
        provider.train(provider.upload(training_set(mini_datasets)))
    provider.teardown()

    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_endpoint_startup_503_is_waited_out(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)

    _, _, endpoint = run_to_endpoint(provider, mini_datasets)
    spec = emulator.endpoints[(DEFAULT_USER, endpoint.name)].spec
    counters = provider.counters()
    provider.teardown()

    assert counters["endpoint_startup_503"] == 2
    assert counters["endpoint_startup_ms"] == 2000
    assert emulator.counts["startup_503"] == 2
    assert emulator.counts["predictions"] == 1
    assert spec["compute"]["scaling"] == {"minReplica": 1, "maxReplica": 1, "scaleToZeroTimeout": None}
    assert len(endpoint.name) <= 32


def test_failed_build_cleans_up(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.fail_build()

    with pytest.raises(ServiceFailureError, match="failed to start"):
        run_to_endpoint(provider, mini_datasets)
    provider.teardown()

    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_connection_resets_are_counted(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    _, _, endpoint = run_to_endpoint(provider, mini_datasets)
    image = beans_records(mini_datasets, "train", 1)[0].read_bytes()

    emulator.reset_connections(2)
    with requests.Session() as session:
        prediction = provider.invoke(endpoint, image, session)
    counters = provider.counters()
    provider.teardown()

    assert prediction.label == "angular_leaf_spot"
    assert emulator.counts["resets"] == 2
    assert counters[f"retried_{CONNECTION_RESET}"] == 2


def test_resets_give_up_after_attempts(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, invoke_attempts=2)
    _, _, endpoint = run_to_endpoint(provider, mini_datasets)
    image = beans_records(mini_datasets, "train", 1)[0].read_bytes()

    emulator.reset_connections(5)
    with requests.Session() as session, pytest.raises(ServiceFailureError, match="connection failed"):
        provider.invoke(endpoint, image, session)
    counters = provider.counters()
    provider.teardown()

    assert counters[f"retried_{CONNECTION_RESET}"] == 1
    assert counters[f"retried_{CONNECTION_RESET}_gave_up"] == 1


def test_hub_connection_resets_are_retried(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.reset_connections(2, route="job_read")

    model = provider.train(provider.upload(training_set(mini_datasets)))
    counters = provider.counters()
    provider.teardown()

    assert model.job_stage == "COMPLETED"
    assert emulator.counts["resets"] == 2
    assert counters[f"retried_{CONNECTION_RESET}"] == 2


def test_hub_server_errors_are_retried(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    emulator.fail_route("commit", status=502, count=2)

    provider.upload(training_set(mini_datasets))
    counters = provider.counters()
    provider.teardown()

    assert counters["retried_server_error"] == 2
    assert emulator.resources()["datasets"] == []


# A failure injected at each step, as (route, status, phase that fails).
FAILURE_STEPS = [
    ("repo_create", 403, "upload"),
    ("commit", 400, "upload"),
    ("job_create", 400, "train"),
    ("job_read", 404, "train"),
    ("model_info", 404, "train"),
    ("endpoint_create", 400, "deploy"),
    ("endpoint_read", 403, "deploy"),
    ("serve", 400, "deploy"),
]


def failing_phase(provider: HuggingFaceProvider, mini_datasets: Path) -> str | None:
    """Run upload, training and deployment; return the name of the phase that raised, or None."""
    phase = "upload"
    try:
        upload = provider.upload(training_set(mini_datasets))
        phase = "train"
        model = provider.train(upload)
        phase = "deploy"
        provider.deploy(model)
    except ProviderError:
        return phase
    return None


@pytest.mark.parametrize(("route", "status", "phase"), FAILURE_STEPS, ids=[step[0] for step in FAILURE_STEPS])
def test_teardown_after_failure_leaves_nothing(emulator, clock, mini_datasets, tmp_path, route, status, phase):
    ledger = RunLedger(tmp_path / "ledger.json", "test-run")
    provider = make_provider(emulator, clock, ledger=ledger)
    emulator.fail_route(route, status=status)

    failed = failing_phase(provider, mini_datasets)
    provider.teardown()
    provider.teardown()

    assert failed == phase
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}
    assert [entry.resource_id for entry in ledger.entries() if entry.outstanding] == []


def test_teardown_cancels_a_running_job(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, training_timeout_s=1.0)

    with pytest.raises(ProviderTimeoutError, match="did not finish"):
        provider.train(provider.upload(training_set(mini_datasets)))
    job_id = next(iter(emulator.jobs))
    assert emulator.resources()["running_jobs"] == [job_id]
    provider.teardown()

    assert emulator.jobs[job_id].stage == "CANCELED"
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_kept_model_is_reused(emulator, clock, mini_datasets, tmp_path):
    ledger = RunLedger(tmp_path / "ledger.json", "test-run")
    provider = make_provider(emulator, clock, ledger=ledger)
    uploaded = training_set(mini_datasets)
    run_to_endpoint(provider, mini_datasets)

    provider.keep_model = True
    provider.teardown()
    kept = [entry for entry in ledger.entries() if entry.state == "kept"]
    resumed = make_provider(emulator, clock, ledger=ledger)
    model = resumed.reuse_model(uploaded, kept[0].details)
    endpoint = resumed.deploy(model)
    with requests.Session() as session:
        prediction = resumed.invoke(endpoint, beans_records(mini_datasets, "train", 1)[0].read_bytes(), session)
    resumed.teardown()

    assert [entry.kind for entry in kept] == ["model"]
    assert model.reused is True
    assert prediction.label == "angular_leaf_spot"
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_leftovers_found_by_run_id(emulator, clock, mini_datasets, monkeypatch):
    provider = make_provider(emulator, clock)
    run_to_endpoint(provider, mini_datasets)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = _bench_config(emulator)

    leftovers = HuggingFaceProvider.find_leftovers(config, RUN_ID)
    others = HuggingFaceProvider.find_leftovers(config, "19990101T000000Z-ffffff")
    longer = HuggingFaceProvider.find_leftovers(config, RUN_ID[:-1])
    for leftover in leftovers:
        HuggingFaceProvider.delete_leftover(config, leftover)

    assert sorted(leftover.kind for leftover in leftovers) == ["dataset", "endpoint", "model"]
    assert {leftover.run_marker for leftover in leftovers} == {RUN_PREFIX}
    assert others == []
    assert longer == []
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_leftovers_of_any_run(emulator, clock, mini_datasets, monkeypatch):
    provider = make_provider(emulator, clock)
    run_to_endpoint(provider, mini_datasets)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    leftovers = HuggingFaceProvider.find_leftovers(_bench_config(emulator), None)

    assert sorted(leftover.kind for leftover in leftovers) == ["dataset", "endpoint", "model"]
    provider.teardown()


def test_interrupted_training_cancels_job(emulator, clock, mini_datasets, tmp_path):
    ledger = RunLedger(tmp_path / "ledger.json", "test-run")
    provider = make_provider(emulator, clock, ledger=ledger, training_timeout_s=1.0)
    with pytest.raises(ProviderTimeoutError):
        provider.train(provider.upload(training_set(mini_datasets)))

    provider.keep_model = True
    provider.teardown()
    entries = {entry.kind: entry for entry in ledger.entries()}

    assert entries["job"].state == "deleted"
    assert "resumed run trains again" in entries["job"].details["ended"]
    assert entries["model"].state == "deleted"
    assert [entry.kind for entry in ledger.entries() if entry.state == "kept"] == []
    assert emulator.resources() == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


def test_wrong_token_is_authentication_error(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock, token="hf_notTheRightToken")

    with pytest.raises(AuthenticationError, match="HF_TOKEN"):
        provider.upload(training_set(mini_datasets))
    provider.teardown()


def test_options_reject_invalid_values():
    with pytest.raises(ConfigError, match="replicas"):
        HuggingFaceOptions(replicas=0)
    with pytest.raises(ConfigError, match="training_backend"):
        HuggingFaceOptions(training_backend="space")


def test_provider_options_are_read(emulator, monkeypatch):
    config = _bench_config(emulator, {"epochs": "7", "instance_size": "x4", "namespace": "someone"})

    provider = HuggingFaceProvider.from_config(config)

    assert provider.options.epochs == 7
    assert provider.options.instance_size == "x4"
    assert provider.namespace == "someone"
    assert provider.settings()["endpoint_hardware"] == "aws/us-east-1/cpu/intel-spr/x4"


def test_invalid_provider_option_is_config_error(emulator):
    with pytest.raises(ConfigError, match="huggingface.epochs"):
        HuggingFaceProvider.from_config(_bench_config(emulator, {"epochs": "many"}))


def _bench_config(emulator: HuggingFaceEmulator, options: dict | None = None):
    from imgbench.config import BenchConfig

    return BenchConfig(providers=("huggingface",), provider_modes={"huggingface": "emulator"},
                       service_urls={"huggingface": emulator.url},
                       provider_options={"huggingface": options or {}}, run_id=RUN_ID)


def test_emulator_rejects_foreign_images(emulator):
    response = requests.post(f"{emulator.url}/api/jobs/{DEFAULT_USER}", timeout=5,
                             headers={"Authorization": f"Bearer {TOKEN}"},
                             json={"dockerImage": "python:3.12", "command": ["true"], "environment": {}})

    assert response.status_code == 400
    assert "AutoTrain" in json.loads(response.content)["error"]


def run_against_emulator(emulator: HuggingFaceEmulator, mini_datasets: Path, cache_dir: Path, results: Path):
    completed = run_benchmark(["--providers", "huggingface", "--huggingface-url", emulator.url, "--datasets-dir",
                               str(mini_datasets), "--datasets", "beans", "--ablations", "5",
                               "--load-requests", "20", "--results", str(results)], cache_dir)
    records = {record["case_id"]: record for record in iter_records(json.loads(results.read_text()))}
    return completed, records["huggingface-beans-5"]


@pytest.mark.slow
def test_emulator_run_passes_and_cleans_up(mini_datasets, shared_cache_dir, tmp_path):
    with HuggingFaceEmulator(training_reads=2, startup_reads=2, startup_503=1) as emulator:
        completed, record = run_against_emulator(emulator, mini_datasets, shared_cache_dir, tmp_path / "r.json")
        resources = emulator.resources()

    assert completed.returncode == 0, completed.stdout[-3000:]
    assert record["status"] == "passed"
    assert record["provider_counters"]["endpoint_startup_503"] == 1
    assert record["provider_settings"]["replicas"] == 1
    assert record["load_test"]["succeeded"] == 20
    assert resources == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}


@pytest.mark.slow
def test_failed_build_case_cleans_up(mini_datasets, shared_cache_dir, tmp_path):
    with HuggingFaceEmulator(training_reads=2, startup_reads=2) as emulator:
        emulator.fail_build()
        completed, record = run_against_emulator(emulator, mini_datasets, shared_cache_dir, tmp_path / "r.json")
        resources = emulator.resources()
    ledgers = list((tmp_path / "ledgers").glob("*.json"))
    entries = json.loads(ledgers[0].read_text())["resources"]

    assert completed.returncode == 1
    assert record["status"] == "failed"
    assert record["error"]["kind"] == "service_failure"
    assert "failed to start" in record["error"]["message"]
    assert resources == {"models": [], "datasets": [], "endpoints": [], "running_jobs": []}
    assert sorted(entry["kind"] for entry in entries) == ["dataset", "endpoint", "job", "model"]
    assert {entry["state"] for entry in entries} == {"deleted"}


def live_config():
    from imgbench.config import BenchConfig

    return BenchConfig(providers=("huggingface",), provider_modes={"huggingface": "live"}, run_id="test-run")


def test_live_without_token_is_missing_credentials():
    provider = HuggingFaceProvider.from_config(live_config())

    with pytest.raises(MissingCredentialsError, match="HF_TOKEN"):
        provider.check_ready()


def test_live_reads_isolated_token_file():
    from huggingface_hub import constants

    token_path = Path(constants.HF_TOKEN_PATH)
    token_path.parent.mkdir(parents=True, exist_ok=True)
    token_path.write_text("hf_tokenFileForTheTest\n")
    try:
        provider = HuggingFaceProvider.from_config(live_config())
        provider.check_ready()
    finally:
        token_path.unlink()

    assert "hf-home" in str(token_path)
    assert provider.credentials_needed() is False


def test_endpoint_creation_retry_accepts_conflict(emulator, clock, mini_datasets):
    provider = make_provider(emulator, clock)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    original = emulator._create_endpoint

    def create_then_fail(namespace, **kwargs):
        original(namespace, **kwargs)
        emulator._create_endpoint = original
        raise ApiError(502, "the response was lost after the endpoint was created")

    emulator._create_endpoint = create_then_fail
    endpoint = provider.deploy(model)
    counters = provider.counters()
    provider.teardown()

    assert endpoint.url.endswith(endpoint.name)
    assert counters["retried_server_error"] == 1
    assert emulator.resources()["endpoints"] == []


# A run id as the benchmark generates it by default: UTC time and six hex digits.
SWEPT_RUN_ID = "20261204T230959Z-a7ff77"


def sweep_command(emulator: HuggingFaceEmulator, ledger_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "imgbench", "sweep", "--ledger-dir", str(ledger_dir),
               "--service-url", f"huggingface={emulator.url}", *args]
    environment = bench_environment(ledger_dir)
    environment["HF_TOKEN"] = TOKEN
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def test_sweep_command_deletes_unledgered_resources(emulator, clock, mini_datasets, tmp_path):
    ledger = RunLedger(tmp_path / f"{SWEPT_RUN_ID}.json", SWEPT_RUN_ID)
    swept_prefix = f"imgbench-{SWEPT_RUN_ID}"
    # One case ran to its endpoint with a ledger; a second one has no ledger
    # and stopped while its job was still running.
    run_to_endpoint(make_provider(emulator, clock, ledger=ledger, run_prefix=swept_prefix), mini_datasets)
    unledgered = make_provider(emulator, clock, run_prefix=swept_prefix, training_timeout_s=1.0)
    second_case = dataclasses.replace(training_set(mini_datasets), case_id="huggingface-beans-4")
    with pytest.raises(ProviderTimeoutError):
        unledgered.train(unledgered.upload(second_case))
    running_job = emulator.resources()["running_jobs"]
    # A run whose id starts with the swept run id keeps its dataset.
    other = make_provider(emulator, clock, run_prefix=f"{swept_prefix}0")
    other.upload(training_set(mini_datasets))
    other_dataset = f"{DEFAULT_USER}/{swept_prefix}0-huggingface-beans-3-data"

    completed = sweep_command(emulator, tmp_path, "--run-id", SWEPT_RUN_ID, "--yes")
    again = sweep_command(emulator, tmp_path, "--run-id", SWEPT_RUN_ID)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "cannot list" not in completed.stderr
    assert "deleted 5 of 5 resources" in completed.stdout
    assert f"job {running_job[0]}" in completed.stdout
    assert "found in listing" in completed.stdout
    assert emulator.jobs[running_job[0]].stage == "CANCELED"
    assert emulator.resources() == {"models": [], "datasets": [other_dataset], "endpoints": [], "running_jobs": []}
    assert ledger.outstanding() == []
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"nothing left by run {SWEPT_RUN_ID}" in again.stdout

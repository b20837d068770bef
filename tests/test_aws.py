"""Tests of the Rekognition Custom Labels provider against the AWS emulator on 127.0.0.1.

The provider's real boto3 clients talk to one emulator that serves
Rekognition and S3 (moto), so botocore validates every request against its
service model. Waits run on a virtual clock. Connections to anything but
loopback addresses are blocked.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from imgbench.ablation import PlannedImage
from imgbench.clock import ReplayClock
from imgbench.datasets import ImageRecord
from imgbench.emulators.aws import RekognitionEmulator, _manifest_entry
from imgbench.errors import ServiceFailureError, ThrottledError, TrainingFailedError, error_kind
from imgbench.images import sha256_bytes
from imgbench.labels import safe_labels
from imgbench.ledger import RunLedger
from imgbench.recording import block_network
from imgbench.retry import RetryPolicy
from providers import TrainingSet
from providers.aws import RekognitionOptions, RekognitionProvider, manifest_line

RUN_ID = "20260101T000000Z-abc123"


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


@pytest.fixture
def clock() -> ReplayClock:
    return ReplayClock()


@pytest.fixture(scope="module")
def emulator():
    with RekognitionEmulator(training_polls=3, start_polls=2, stop_polls=2) as running:
        yield running


@pytest.fixture
def bucket() -> str:
    return f"imgbench-test-{uuid.uuid4().hex[:12]}"


def make_provider(emulator: RekognitionEmulator, clock: ReplayClock, bucket: str, **options) -> RekognitionProvider:
    settings = {"bucket": bucket, "region": "us-east-1", "endpoint_url": emulator.url, "poll_interval_s": 1.0,
                "retry_policy": RetryPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=1.0), **options}
    provider = RekognitionProvider(RekognitionOptions(**settings), run_mode="emulator", run_id=RUN_ID, clock=clock,
                                   credentials=("test-access-key", "test-secret-key"))
    provider.case_id = "aws-beans-test"
    return provider


def beans_records(mini_datasets: Path, split: str, per_class: int) -> list[ImageRecord]:
    records = []
    for class_dir in sorted((mini_datasets / "beans" / split).iterdir()):
        for path in sorted(class_dir.glob("*.jpg"))[:per_class]:
            records.append(ImageRecord(path, class_dir.name, sha256_bytes(path.read_bytes()), split))
    return records


def training_set(mini_datasets: Path, per_class: int = 4) -> TrainingSet:
    records = beans_records(mini_datasets, "train", per_class)
    images = []
    for record in records:
        index = int(record.path.stem.rsplit("_", 1)[1]) if record.path.stem[-1].isdigit() else 0
        images.append(PlannedImage(record, "validation" if index % 4 == 0 else "train"))
    classes = tuple(sorted({image.label for image in images}))
    return TrainingSet("aws-beans-test", classes, tuple(images))


def assert_nothing_left(emulator: RekognitionEmulator, bucket: str) -> None:
    assert emulator.project_arns() == []
    assert emulator.dataset_arns() == []
    assert emulator.version_states() == {}
    assert emulator.object_keys(bucket) == []


# Manifests --------------------------------------------------------------------------------

def test_manifest_line_is_ground_truth_classification():
    labels = safe_labels(("bean rust", "healthy"), service="Rekognition Custom Labels", allowed=r"A-Za-z0-9_\-")

    line = json.loads(manifest_line("s3://bucket/key.jpg", "bean rust", ("bean rust", "healthy"), labels))

    assert line["source-ref"] == "s3://bucket/key.jpg"
    assert line["class"] == 0
    assert line["class-metadata"]["class-name"] == "bean_rust"
    assert line["class-metadata"]["type"] == "groundtruth/image-classification"
    assert line["class-metadata"]["human-annotated"] == "yes"
    assert line["class-metadata"]["confidence"] == 1
    assert "creation-date" in line["class-metadata"]
    assert _manifest_entry(line) == ("s3://bucket/key.jpg", "bean_rust")


def test_manifests_hold_train_and_validation_images(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    cases = training_set(mini_datasets)

    upload = provider.upload(cases)
    train_text = _object_text(provider, bucket, upload.manifests["TRAIN"])
    test_text = _object_text(provider, bucket, upload.manifests["TEST"])
    provider.teardown()

    train_lines = [json.loads(line) for line in train_text.splitlines()]
    test_lines = [json.loads(line) for line in test_text.splitlines()]
    assert len(train_lines) == len(cases.by_role("train"))
    assert len(test_lines) == len(cases.by_role("validation"))
    assert all(line["source-ref"].startswith(f"s3://{bucket}/imgbench/imgbench-{RUN_ID}/") for line in train_lines)
    assert {line["class-metadata"]["class-name"] for line in test_lines} == set(cases.classes)
    assert_nothing_left(emulator, bucket)


def _object_text(provider: RekognitionProvider, bucket: str, key: str) -> str:
    return provider._client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")


# Lifecycle ----------------------------------------------------------------------------------

def test_full_case_predicts_and_cleans_up(emulator, clock, bucket, mini_datasets, tmp_path):
    provider = make_provider(emulator, clock, bucket)
    provider.ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)

    model = provider.train(provider.upload(training_set(mini_datasets)))
    endpoint = provider.deploy(model)
    with requests.Session() as session:
        predictions = [provider.invoke(endpoint, record.read_bytes(), session)
                       for record in beans_records(mini_datasets, "test", 2)]
    assert emulator.version_states() == {model.version_arn: "RUNNING"}
    provider.teardown()

    assert {prediction.label for prediction in predictions} <= {"angular_leaf_spot", "bean_rust", "healthy"}
    assert all(0.0 <= prediction.confidence <= 1.0 for prediction in predictions)
    assert model.status == "TRAINING_COMPLETED"
    assert model.billable_training_s == emulator.billable_training_s
    assert model.polls >= 3
    assert provider.describe_model(model)["billable_training_s"] == emulator.billable_training_s
    assert "<AWS_ACCOUNT_ID>" in provider.describe_model(model)["project_version_arn"]
    assert_nothing_left(emulator, bucket)
    assert provider.ledger.outstanding() == []
    assert {entry.kind for entry in provider.ledger.entries()} == {"s3_prefix", "project", "dataset", "model"}


def test_project_and_version_carry_run_tags(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    client = provider._client("rekognition")

    project_tags = client.list_tags_for_resource(ResourceArn=model.project_arn)["Tags"]
    version_tags = client.list_tags_for_resource(ResourceArn=model.version_arn)["Tags"]
    provider.teardown()

    assert project_tags == {"imgbench-run": f"imgbench-{RUN_ID}", "imgbench-case": "aws-beans-test"}
    assert version_tags == project_tags


def test_invoke_client_pool_fits_load_concurrency(emulator, clock, bucket):
    provider = make_provider(emulator, clock, bucket, max_pool_connections=32)

    client = provider._client("runtime")

    assert client.meta.config.max_pool_connections == 32
    assert client.meta.config.retries["total_max_attempts"] == 1


def test_teardown_twice_is_safe(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))

    provider.teardown()
    provider.teardown()

    assert_nothing_left(emulator, bucket)


def test_training_waits_on_the_clock(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket, poll_interval_s=30.0)

    provider.train(provider.upload(training_set(mini_datasets)))
    provider.teardown()

    assert clock.sleeps >= 2
    assert clock.virtual_seconds >= 60.0


# Failures and teardown --------------------------------------------------------------------------

def test_failed_training_raises_and_cleans_up(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    emulator.fail_training()
    try:
        with pytest.raises(TrainingFailedError) as caught:
            provider.train(provider.upload(training_set(mini_datasets)))
        provider.teardown()
    finally:
        emulator.faults.fail_training = False

    assert error_kind(caught.value) == "training_failed"
    assert "TRAINING_FAILED" in str(caught.value)
    assert_nothing_left(emulator, bucket)


STEP_OPERATIONS = ("CreateProject", "CreateDataset", "DescribeDataset", "CreateProjectVersion",
                   "DescribeProjectVersions", "StartProjectVersion", "DetectCustomLabels")


@pytest.mark.parametrize("operation", STEP_OPERATIONS)
def test_teardown_after_failure_at_each_step(emulator, clock, bucket, mini_datasets, operation):
    provider = make_provider(emulator, clock, bucket, retry_policy=RetryPolicy(max_attempts=1))
    emulator.fail_operation(operation)
    try:
        with pytest.raises(ServiceFailureError):
            model = provider.train(provider.upload(training_set(mini_datasets)))
            endpoint = provider.deploy(model)
            provider.invoke(endpoint, beans_records(mini_datasets, "test", 1)[0].read_bytes(), None)
    finally:
        emulator.fail_operation(operation, failing=False)
    provider.teardown()

    assert_nothing_left(emulator, bucket)


def test_teardown_stops_running_model_first(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    model = provider.train(provider.upload(training_set(mini_datasets)))
    provider.deploy(model)
    client = provider._client("rekognition")

    with pytest.raises(client.exceptions.ResourceInUseException):
        client.delete_project_version(ProjectVersionArn=model.version_arn)
    provider.teardown()

    assert emulator.operation_counts.get("StopProjectVersion", 0) >= 1
    assert_nothing_left(emulator, bucket)


def test_teardown_after_reset_on_create(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket, retry_policy=RetryPolicy(max_attempts=1))
    emulator.reset_connections(1, operations=("CreateProjectVersion",))

    with pytest.raises(ServiceFailureError):
        provider.train(provider.upload(training_set(mini_datasets)))
    provider.teardown()

    assert_nothing_left(emulator, bucket)


def test_keep_model_stops_and_keeps(emulator, clock, bucket, mini_datasets, tmp_path):
    provider = make_provider(emulator, clock, bucket)
    provider.ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    cases = training_set(mini_datasets)
    model = provider.train(provider.upload(cases))
    provider.deploy(model)
    provider.keep_model = True

    provider.teardown()
    kept = {entry.kind: entry for entry in provider.ledger.entries() if entry.state == "kept"}

    assert emulator.version_states() == {model.version_arn: "STOPPED"}
    assert set(kept) == {"model", "project", "dataset", "s3_prefix"}
    assert kept["model"].resource_id == model.version_arn
    assert kept["project"].resource_id == model.project_arn

    resumed = make_provider(emulator, clock, bucket)
    reused = resumed.reuse_model(cases, kept["model"].details)
    assert reused is not None
    assert reused.version_arn == model.version_arn
    endpoint = resumed.deploy(reused)
    prediction = resumed.invoke(endpoint, beans_records(mini_datasets, "test", 1)[0].read_bytes(), None)
    resumed.teardown()

    assert prediction.label in cases.classes
    assert_nothing_left(emulator, bucket)


def test_leftovers_found_by_run_and_deleted(emulator, clock, bucket, mini_datasets):
    from imgbench.config import BenchConfig

    provider = make_provider(emulator, clock, bucket)
    provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    config = BenchConfig(providers=("aws",), run_id="other", provider_modes={"aws": "emulator"},
                         service_urls={"aws": emulator.url}, provider_options={"aws": {"bucket": bucket}})

    leftovers = RekognitionProvider.find_leftovers(config, RUN_ID)
    for leftover in leftovers:
        RekognitionProvider.delete_leftover(config, leftover)

    assert sorted(leftover.kind for leftover in leftovers) == ["dataset", "dataset", "model", "project", "s3_prefix"]
    assert [leftover.resource_id for leftover in leftovers if leftover.kind == "s3_prefix"] == [
        f"s3://{bucket}/imgbench/imgbench-{RUN_ID}/aws-beans-test/"]
    assert all(leftover.run_marker for leftover in leftovers)
    assert_nothing_left(emulator, bucket)
    assert RekognitionProvider.find_leftovers(config, RUN_ID) == []


# Throttling ------------------------------------------------------------------------------------------

def test_control_plane_throttling_retries_and_counts(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    emulator.throttle(2, "ThrottlingException", operations=("CreateProject",))

    provider.upload(training_set(mini_datasets))
    provider.teardown()

    assert provider.counters()["throttling"] == 2
    assert clock.sleeps >= 2


@pytest.mark.parametrize("error_type", ["ThrottlingException", "ProvisionedThroughputExceededException"])
def test_invoke_throttling_counted_by_kind(emulator, clock, bucket, mini_datasets, error_type):
    provider = make_provider(emulator, clock, bucket)
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    image = beans_records(mini_datasets, "test", 1)[0].read_bytes()
    emulator.throttle(3, error_type, operations=("DetectCustomLabels",))

    for _ in range(3):
        with pytest.raises(ThrottledError) as caught:
            provider.invoke(endpoint, image, None)
    prediction = provider.invoke(endpoint, image, None)
    provider.teardown()

    assert error_kind(caught.value) == "throttling"
    assert error_type in str(caught.value)
    assert provider.counters()[f"invoke_{error_type}"] == 3
    assert prediction.label in ("angular_leaf_spot", "bean_rust", "healthy")


def test_connection_reset_is_retried_and_counted(emulator, clock, bucket, mini_datasets):
    provider = make_provider(emulator, clock, bucket)
    emulator.reset_connections(1, operations=("CreateProject",))

    provider.upload(training_set(mini_datasets))
    provider.teardown()

    assert provider.counters()["connection_reset"] == 1
    assert_nothing_left(emulator, bucket)

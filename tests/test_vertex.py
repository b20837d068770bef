"""Tests of the Vertex AI provider with the real SDKs against the Vertex AI emulator on 127.0.0.1.

google-cloud-aiplatform (``aiplatform_v1``, REST transport) and
google-cloud-storage talk HTTP to ``imgbench.emulators.vertex``, with anonymous
credentials and a virtual clock wherever the provider waits. Connections to
anything but loopback addresses are blocked.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1
from PIL import Image

from imgbench.ablation import PlannedImage
from imgbench.clock import ReplayClock
from imgbench.datasets import ImageRecord
from imgbench.emulators.vertex import PREDICT_PAYLOAD_LIMIT_BYTES, VertexEmulator
from imgbench.errors import (
    ConfigError,
    InvalidInputError,
    ProviderError,
    QuotaError,
    ServiceFailureError,
    TrainingFailedError,
)
from imgbench.images import sha256_bytes
from imgbench.labels import safe_labels
from imgbench.ledger import RunLedger
from imgbench.recording import block_network
from imgbench.retry import RetryPolicy
from providers import TrainingSet
from providers.vertex import (
    CASE_LABEL,
    RUN_LABEL,
    VertexOptions,
    VertexProvider,
    build_import_file,
)

RUN_ID = "20261204T120000Z-abc123"
RUN_LABEL_VALUE = "20261204t120000z-abc123"
CASE_ID = "vertex-beans-3"
# The project and bucket that the provider uses against an emulator by default.
EMULATED_PROJECT = "emulated-project"
EMULATED_BUCKET = "emulated-bucket"


@pytest.fixture(autouse=True)
def loopback_only():
    with block_network():
        yield


@pytest.fixture
def emulator():
    with VertexEmulator(operation_polls=2, training_polls=3) as running:
        yield running


def make_provider(emulator: VertexEmulator, tmp_path: Path, **options) -> VertexProvider:
    settings = dict(project="test-project", bucket="test-bucket", api_endpoint=emulator.url,
                    training_poll_interval_s=30.0, operation_poll_interval_s=5.0,
                    retry=RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05))
    settings.update(options)
    provider = VertexProvider(VertexOptions(**settings), run_mode="emulator", run_id=RUN_ID, clock=ReplayClock())
    provider.case_id = CASE_ID
    provider.ledger = RunLedger(tmp_path / "ledger.json", RUN_ID)
    return provider


def beans_records(mini_datasets: Path, split: str, per_class: int) -> list[ImageRecord]:
    records = []
    for class_dir in sorted((mini_datasets / "beans" / split).iterdir()):
        for path in sorted(class_dir.glob("*.jpg"))[:per_class]:
            records.append(ImageRecord(path, class_dir.name, sha256_bytes(path.read_bytes()), split))
    return records


def training_set(mini_datasets: Path, per_class: int = 4) -> TrainingSet:
    """Plan ``per_class`` images per class, the last of each class as a validation image."""
    images = []
    for index, record in enumerate(beans_records(mini_datasets, "train", per_class)):
        images.append(PlannedImage(record, "validation" if index % per_class == per_class - 1 else "train"))
    classes = tuple(sorted({image.label for image in images}))
    return TrainingSet(CASE_ID, classes, tuple(images))


def run_lifecycle(provider: VertexProvider, mini_datasets: Path) -> list:
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    with requests.Session() as session:
        return [provider.invoke(endpoint, record.path.read_bytes(), session)
                for record in beans_records(mini_datasets, "test", 2)]


def outstanding_kinds(provider: VertexProvider) -> list[str]:
    return sorted(entry.kind for entry in provider.ledger.outstanding())


# Import file ------------------------------------------------------------------

def test_import_file_rows(mini_datasets):
    plan = training_set(mini_datasets)
    labels = safe_labels(plan.classes, service="Vertex AI", max_length=32)

    text = build_import_file(plan, labels, lambda image: f"gs://b/p/{image.record.sha256}.jpg")
    rows = list(csv.reader(io.StringIO(text)))

    assert len(rows) == len(plan.images)
    assert [row[0] for row in rows] == ["validation" if image.role == "validation" else "training"
                                        for image in plan.images]
    assert [row[1] for row in rows] == [f"gs://b/p/{image.record.sha256}.jpg" for image in plan.images]
    assert [row[2] for row in rows] == [image.label for image in plan.images]


def test_import_file_uses_safe_labels(mini_datasets):
    plan = training_set(mini_datasets)
    renamed = TrainingSet(plan.case_id, ("leaf spot", "bean_rust", "healthy"), tuple(
        PlannedImage(ImageRecord(image.record.path, "leaf spot" if image.label == "angular_leaf_spot"
                                 else image.label, image.record.sha256, "train"), image.role)
        for image in plan.images))
    labels = safe_labels(renamed.classes, service="Vertex AI", max_length=32)

    rows = list(csv.reader(io.StringIO(build_import_file(renamed, labels, lambda image: "gs://b/x.jpg"))))

    assert "leaf_spot" in {row[2] for row in rows}
    assert "leaf spot" not in {row[2] for row in rows}


def test_import_file_rejects_unknown_role(mini_datasets):
    plan = training_set(mini_datasets)
    odd = TrainingSet(plan.case_id, plan.classes, (PlannedImage(plan.images[0].record, "holdout"),))
    labels = safe_labels(plan.classes, service="Vertex AI")

    with pytest.raises(InvalidInputError, match="holdout"):
        build_import_file(odd, labels, lambda image: "gs://b/x.jpg")


# Lifecycle ----------------------------------------------------------------------

def test_lifecycle_against_emulator(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)

    predictions = run_lifecycle(provider, mini_datasets)

    classes = {"angular_leaf_spot", "bean_rust", "healthy"}
    assert len(predictions) == 6
    assert {prediction.label for prediction in predictions} <= classes
    assert all(0.0 < prediction.confidence <= 1.0 for prediction in predictions)
    assert emulator.predictions == 6
    dataset_items = next(iter(emulator.data_items.values()))
    assert sorted(item["mlUse"] for item in dataset_items).count("validation") == 3
    assert sorted(item["mlUse"] for item in dataset_items).count("training") == 9
    for kind in ("datasets", "pipelines", "models", "endpoints"):
        for resource in getattr(emulator, kind).values():
            assert resource["labels"] == {RUN_LABEL: RUN_LABEL_VALUE, CASE_LABEL: CASE_ID}, kind
    assert all(name.startswith(f"imgbench/{RUN_LABEL_VALUE}/{CASE_ID}/") for _, name in emulator.objects)

    provider.teardown()

    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)
    assert outstanding_kinds(provider) == []
    assert {entry.kind for entry in provider.ledger.entries()} == {
        "objects", "dataset", "training_pipeline", "model", "endpoint"}


def test_lifecycle_sends_training_budget_and_split(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path, budget_milli_node_hours=24000)
    provider.train(provider.upload(training_set(mini_datasets)))

    pipeline = next(iter(emulator.pipelines.values()))

    assert int(pipeline["trainingTaskInputs"]["budgetMilliNodeHours"]) == 24000
    assert pipeline["trainingTaskInputs"]["multiLabel"] is False
    assert pipeline["inputDataConfig"]["filterSplit"]["trainingFilter"] == \
        "labels.aiplatform.googleapis.com/ml_use=training"
    assert pipeline["inputDataConfig"]["filterSplit"]["validationFilter"] == \
        "labels.aiplatform.googleapis.com/ml_use=validation"
    provider.teardown()
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_teardown_twice_is_safe(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    run_lifecycle(provider, mini_datasets)

    provider.teardown()
    provider.teardown()

    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_sdk_predict_matches_provider_invoke(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    image = beans_records(mini_datasets, "test", 1)[0].path.read_bytes()
    client = aiplatform_v1.PredictionServiceClient(credentials=AnonymousCredentials(), transport="rest",
                                                   client_options=ClientOptions(api_endpoint=emulator.url))

    with requests.Session() as session:
        ours = provider.invoke(endpoint, image, session)
    body = json.loads(provider._predict_body(image, "test image"))
    answer = client.predict(endpoint=endpoint.endpoint_name, instances=body["instances"],
                            parameters=body["parameters"])

    assert answer.predictions[0]["displayNames"][0] == ours.label
    assert answer.predictions[0]["confidences"][0] == pytest.approx(ours.confidence)
    provider.teardown()


# Payload size ----------------------------------------------------------------------

def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_oversize_image_is_resized_for_predict(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path, jpeg_quality=95)
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    large = noise_png(1600)
    unresized = len(base64.b64encode(provider._encode_jpeg(large, "large")))

    with requests.Session() as session:
        prediction = provider.invoke(endpoint, large, session)
        provider.invoke(endpoint, large, session)

    assert unresized > PREDICT_PAYLOAD_LIMIT_BYTES
    assert len(provider._predict_body(large, "large")) <= PREDICT_PAYLOAD_LIMIT_BYTES
    assert prediction.label in {"angular_leaf_spot", "bean_rust", "healthy"}
    assert provider.counters()["images_resized_for_predict"] == 1
    assert "predict-request<=1572864B" in provider.settings()["image_policy"]
    provider.teardown()


def test_small_image_is_not_resized(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    image = beans_records(mini_datasets, "test", 1)[0].path.read_bytes()

    body = json.loads(provider._predict_body(image, "small"))

    decoded = Image.open(io.BytesIO(base64.b64decode(body["instances"][0]["content"])))
    assert decoded.size == Image.open(io.BytesIO(image)).size
    assert body["parameters"] == {"confidenceThreshold": 0, "maxPredictions": 100}
    assert provider.counters()["images_resized_for_predict"] == 0


def test_emulator_rejects_oversize_predict_body(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    body = json.dumps({"instances": [{"content": "A" * PREDICT_PAYLOAD_LIMIT_BYTES}]})

    response = requests.post(f"{emulator.url}/v1/{endpoint.endpoint_name}:predict", data=body, timeout=30)

    assert response.status_code == 400
    assert "payload size exceeds" in response.json()["error"]["message"]
    provider.teardown()


# Failures and teardown ----------------------------------------------------------------

FAILURES = {
    "image upload": (lambda emulator: emulator.fail_requests(r"^POST /upload/storage/v1/b/[^/]+/o$", 400, 1),
                     InvalidInputError),
    "dataset creation": (lambda emulator: emulator.fail_requests(r"^POST .*/datasets$", 400, 1), InvalidInputError),
    "data import": (lambda emulator: emulator.fail_imports(), InvalidInputError),
    "training": (lambda emulator: emulator.fail_training(), TrainingFailedError),
    "training pipeline creation": (lambda emulator: emulator.fail_requests(r"^POST .*/trainingPipelines$", 400, 1),
                                   InvalidInputError),
    "endpoint creation": (lambda emulator: emulator.fail_requests(r"^POST .*/endpoints$", 400, 1),
                          InvalidInputError),
    "model deployment": (lambda emulator: emulator.fail_requests(r":deployModel$", 400, 1), InvalidInputError),
    "prediction": (lambda emulator: emulator.fail_requests(r":predict$", 400, 1), InvalidInputError),
}


@pytest.mark.parametrize("step", list(FAILURES))
def test_teardown_after_failure_leaves_nothing(emulator, mini_datasets, tmp_path, step):
    inject, error = FAILURES[step]
    provider = make_provider(emulator, tmp_path)
    inject(emulator)

    with pytest.raises(error):
        run_lifecycle(provider, mini_datasets)
    provider.teardown()

    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)
    assert outstanding_kinds(provider) == []


def test_teardown_deletes_resource_whose_create_response_was_lost(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    endpoint = provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    # A second endpoint with this case's labels, as a retried create would leave.
    extra = aiplatform_v1.EndpointServiceClient(
        credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=emulator.url)
    ).create_endpoint(parent="projects/test-project/locations/us-central1",
                      endpoint=aiplatform_v1.Endpoint(display_name="orphan", labels=provider._case_labels()))

    provider.teardown()

    assert endpoint.endpoint_name not in {e["name"] for e in emulator.endpoints.values()}
    assert extra.operation.name.split("/operations/")[0] not in {e["name"] for e in emulator.endpoints.values()}
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_teardown_failure_is_reported_and_others_deleted(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    run_lifecycle(provider, mini_datasets)
    emulator.fail_requests(r"^DELETE .*/datasets/", 400, 1)

    with pytest.raises(ServiceFailureError, match="dataset"):
        provider.teardown()

    counts = emulator.resource_counts()
    assert counts["datasets"] == 1
    assert counts["endpoints"] == counts["models"] == counts["training_pipelines"] == counts["objects"] == 0
    assert outstanding_kinds(provider) == ["dataset"]
    provider.teardown()
    assert emulator.resource_counts()["datasets"] == 0


# Quota, throttling and dropped connections ---------------------------------------------

def test_quota_error_is_retried_and_counted(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    emulator.exceed_quota(r"^POST .*/datasets$", count=2)

    upload = provider.upload(training_set(mini_datasets))

    assert upload.dataset_name
    assert provider.counters()["throttling"] == 2
    provider.teardown()


def test_lasting_quota_error_raises_quota_error(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    emulator.exceed_quota(r"^POST .*/trainingPipelines$", count=10)

    with pytest.raises(QuotaError, match="throttled|quota"):
        provider.train(provider.upload(training_set(mini_datasets)))

    assert provider.counters()["throttling_gave_up"] == 1
    provider.teardown()
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_connection_reset_is_retried(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    emulator.reset_connections(1, r"^POST .*/endpoints$")

    run_lifecycle(provider, mini_datasets)

    assert provider.counters()["connection_reset"] == 1
    provider.teardown()
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_server_errors_are_retried(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    emulator.fail_requests(r"^GET .*/trainingPipelines/", 503, 2)

    run_lifecycle(provider, mini_datasets)

    assert provider.counters()["server_error"] == 2
    provider.teardown()


def test_errors_map_to_the_error_vocabulary(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    emulator.fail_requests(r"^POST .*/datasets$", 403, 1)

    with pytest.raises(ProviderError) as caught:
        provider.upload(training_set(mini_datasets))

    assert caught.value.kind == "authentication"
    assert caught.value.__cause__ is not None
    provider.teardown()


# Kept models and leftovers ---------------------------------------------------------------

def test_keep_model_keeps_only_the_model(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    run_lifecycle(provider, mini_datasets)
    provider.keep_model = True

    provider.teardown()

    counts = emulator.resource_counts()
    assert counts["models"] == 1
    assert counts["endpoints"] == counts["datasets"] == counts["training_pipelines"] == counts["objects"] == 0
    kept = [entry for entry in provider.ledger.entries() if entry.kind == "model"]
    assert kept[0].state == "kept"


def test_reuse_model_serves_a_kept_model(emulator, mini_datasets, tmp_path):
    first = make_provider(emulator, tmp_path)
    run_lifecycle(first, mini_datasets)
    first.keep_model = True
    first.teardown()
    details = next(entry.details for entry in first.ledger.entries() if entry.kind == "model")

    second = make_provider(emulator, tmp_path)
    model = second.reuse_model(training_set(mini_datasets), dict(details))
    endpoint = second.deploy(model)
    with requests.Session() as session:
        prediction = second.invoke(endpoint, beans_records(mini_datasets, "test", 1)[0].path.read_bytes(), session)
    second.teardown()

    assert prediction.label in {"angular_leaf_spot", "bean_rust", "healthy"}
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_reuse_model_returns_none_for_deleted_model(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    missing = "projects/481516234200/locations/us-central1/models/999999"

    assert provider.reuse_model(training_set(mini_datasets), {"model_name": missing}) is None


def test_leftovers_are_found_by_run_label_and_deleted(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path)
    provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    sweeper = make_provider(emulator, tmp_path)

    leftovers = sweeper.list_leftovers(RUN_ID)
    other_run = sweeper.list_leftovers("20000101T000000Z-ffffff")
    for leftover in leftovers:
        sweeper.remove_leftover(leftover)

    assert sorted(leftover.kind for leftover in leftovers) == [
        "dataset", "endpoint", "model", "objects", "training_pipeline"]
    assert all(leftover.run_marker == RUN_LABEL_VALUE for leftover in leftovers)
    assert other_run == []
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


# Settings ----------------------------------------------------------------------------------

def test_options_reject_budget_below_minimum():
    with pytest.raises(ConfigError, match="8000"):
        VertexOptions(project="p", bucket="b", budget_milli_node_hours=1000)


def test_options_name_missing_project():
    with pytest.raises(ConfigError, match="IMGBENCH_VERTEX_PROJECT"):
        VertexOptions(project="", bucket="b")


def test_price_model_says_idle_endpoints_bill():
    prices = VertexProvider.price_model

    assert prices.training_per_hour == pytest.approx(3.465)
    assert prices.endpoint_per_hour == pytest.approx(1.375)
    assert "even when idle" in prices.notes
    assert prices.source.startswith("https://cloud.google.com/")


# Cassettes ------------------------------------------------------------------------------------

TOKEN = "ya29.test-token-5d2c9e41b7"


def record_case(emulator: VertexEmulator, mini_datasets: Path, tmp_path: Path) -> tuple[Path, list]:
    """Run the lifecycle against the emulator with a bearer token, recording it to a cassette."""
    from google.oauth2.credentials import Credentials

    from imgbench.recording import cassette_path, use_case_cassette

    options = VertexOptions(project="secret-project-7781", bucket="secret-bucket-4410", api_endpoint=emulator.url,
                            training_poll_interval_s=30.0, operation_poll_interval_s=5.0)
    provider = VertexProvider(options, run_mode="emulator", run_id=RUN_ID, clock=ReplayClock(),
                              credentials=Credentials(token=TOKEN))
    provider.case_id = CASE_ID
    path = cassette_path(tmp_path / "cassettes", "vertex", CASE_ID)
    with use_case_cassette(provider.recording_rules(), path, "once", CASE_ID):
        try:
            predictions = run_lifecycle(provider, mini_datasets)
        finally:
            provider.teardown()
    return path, predictions


def test_cassette_on_disk_is_scrubbed(emulator, mini_datasets, tmp_path):
    from imgbench.recording import scan_for_secrets

    path, _ = record_case(emulator, mini_datasets, tmp_path)
    text = path.read_text(encoding="utf-8")
    test_image = base64.b64encode(beans_records(mini_datasets, "test", 1)[0].path.read_bytes()[:60]).decode()

    assert TOKEN not in text
    assert "secret-project-7781" not in text
    assert "secret-bucket-4410" not in text
    assert emulator.project_number not in text
    assert RUN_LABEL_VALUE not in text
    assert test_image[:40] not in text
    assert "<VERTEX_PROJECT>" in text
    assert "<VERTEX_PROJECT_NUMBER>" in text
    assert "<VERTEX_BUCKET>" in text
    assert "<IMGBENCH_RUN_LABEL>" in text
    assert '\\"content\\":\\"sha256:' in text or '"content":"sha256:' in text
    assert scan_for_secrets(text, (TOKEN,)) == []


def test_recorded_case_replays_offline(emulator, mini_datasets, tmp_path):
    from imgbench.recording import use_case_cassette

    path, recorded = record_case(emulator, mini_datasets, tmp_path)
    emulator.stop()
    options = VertexOptions(project="imgbench-replay-project", bucket="imgbench-replay-bucket",
                            api_endpoint="http://127.0.0.1:9")
    provider = VertexProvider(options, run_mode="replay", run_id="20270101T000000Z-ffffff")
    provider.case_id = CASE_ID

    with use_case_cassette(provider.recording_rules(), path, "none", CASE_ID):
        replayed = run_lifecycle(provider, mini_datasets)
        provider.teardown()

    assert [p.label for p in replayed] == [p.label for p in recorded]
    assert [p.confidence for p in replayed] == [p.confidence for p in recorded]
    assert provider.clock.sleeps > 0


def test_token_exchange_and_service_account_are_scrubbed():
    from vcr.request import Request

    from imgbench.recording import request_scrubber, response_scrubber

    options = VertexOptions(project="p", bucket="b", api_endpoint="http://127.0.0.1:9")
    rules = VertexProvider(options, run_mode="replay", run_id=RUN_ID).recording_rules()
    exchange = Request("POST", "https://oauth2.googleapis.com/token",
                       b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=eyJhbGciOi.x.y",
                       {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {TOKEN}"})
    listing = Request("GET", "https://us-central1-aiplatform.googleapis.com/v1/x?sa=bench-runner@proj-1."
                      "iam.gserviceaccount.com", None, {})
    response = {"status": {"code": 200, "message": "OK"},
                "headers": {"Content-Type": ["application/json"], "Set-Cookie": ["a=b"]},
                "body": {"string": json.dumps({"access_token": TOKEN, "expires_in": 3599,
                                               "serviceAccount": "bench-runner@proj-1.iam.gserviceaccount.com"}
                                              ).encode()}}

    scrubbed_exchange = request_scrubber(rules)(exchange)
    scrubbed_listing = request_scrubber(rules)(listing)
    scrubbed_response = response_scrubber(rules)(response)

    assert b"eyJhbGciOi" not in scrubbed_exchange.body
    assert b"assertion=REDACTED" in scrubbed_exchange.body
    assert "Authorization" not in scrubbed_exchange.headers
    assert "bench-runner" not in scrubbed_listing.uri
    assert TOKEN.encode() not in scrubbed_response["body"]["string"]
    assert b"bench-runner" not in scrubbed_response["body"]["string"]
    assert b"<SERVICE_ACCOUNT_EMAIL>" in scrubbed_response["body"]["string"]
    assert "Set-Cookie" not in scrubbed_response["headers"]


# Configuration and the benchmark's fixtures ------------------------------------------------------

def bench_config(emulator: VertexEmulator, **provider_options: str):
    from imgbench.config import BenchConfig

    return BenchConfig(providers=("vertex",), run_id=RUN_ID, provider_modes={"vertex": "emulator"},
                       service_urls={"vertex": emulator.url}, provider_options={"vertex": provider_options})


def test_from_config_reads_options_before_environment(emulator, monkeypatch):
    monkeypatch.setenv("IMGBENCH_VERTEX_PROJECT", "env-project")
    monkeypatch.setenv("IMGBENCH_VERTEX_BUCKET", "env-bucket")
    config = bench_config(emulator, project="option-project", budget_milli_node_hours="16000", location="europe-west4")

    provider = VertexProvider.from_config(config)

    assert provider.options.project == "option-project"
    assert provider.options.bucket == "env-bucket"
    assert provider.options.location == "europe-west4"
    assert provider.options.budget_milli_node_hours == 16000
    assert provider.options.api_endpoint == emulator.url
    assert provider.run_mode == "emulator"


def test_from_config_rejects_invalid_budget(emulator):
    with pytest.raises(ConfigError, match="'lots'"):
        VertexProvider.from_config(bench_config(emulator, budget_milli_node_hours="lots"))


def test_replay_uses_fixed_project_and_anonymous_credentials():
    from imgbench.config import BenchConfig

    config = BenchConfig(providers=("vertex",), run_id=RUN_ID, provider_modes={"vertex": "replay"},
                         provider_options={"vertex": {"project": "real-project"}})
    provider = VertexProvider.from_config(config)

    assert provider.options.project == "imgbench-replay-project"
    assert provider.options.bucket == "imgbench-replay-bucket"
    assert isinstance(provider._credentials_for(), AnonymousCredentials)
    assert isinstance(provider.clock, ReplayClock)


def test_live_without_adc_names_the_fix(monkeypatch, tmp_path):
    from imgbench.errors import AuthenticationError

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    provider = VertexProvider(VertexOptions(project="p", bucket="b"), run_mode="live", run_id=RUN_ID)

    with pytest.raises(AuthenticationError, match="application-default login"):
        provider._credentials_for()


def test_leftover_classmethods_use_the_config(emulator, mini_datasets, tmp_path):
    provider = make_provider(emulator, tmp_path, project=EMULATED_PROJECT, bucket=EMULATED_BUCKET)
    provider.deploy(provider.train(provider.upload(training_set(mini_datasets))))
    config = bench_config(emulator)

    leftovers = VertexProvider.find_leftovers(config, RUN_ID)
    for leftover in leftovers:
        VertexProvider.delete_leftover(config, leftover)

    assert len(leftovers) == 5
    assert VertexProvider.find_leftovers(config, None) == []
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)


def test_failed_training_case_cleans_up(emulator, mini_datasets, shared_cache_dir, tmp_path):
    from imgbench.results import iter_records
    from tests.conftest import run_benchmark

    emulator.fail_training()
    results = tmp_path / "results.json"

    completed = run_benchmark(["--providers", "vertex", "--datasets", "beans", "--ablations", "5",
                               "--datasets-dir", str(mini_datasets), "--vertex-url", emulator.url,
                               "--load-requests", "10", "--results", str(results)], shared_cache_dir, timeout=300)

    records = list(iter_records(json.loads(results.read_text())))
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert records[0]["status"] == "failed"
    assert records[0]["error"]["kind"] == "training_failed"
    assert "teardown_error" not in records[0]
    assert emulator.resource_counts() == dict.fromkeys(emulator.resource_counts(), 0)

"""The Google Vertex AI AutoML image classification provider.

One case uploads its training images to ``gs://<bucket>/<prefix>/<run>/<case>/``
and writes a CSV import file with each image's ML_USE (``training`` or
``validation``, as the ablation plan assigns them). It creates an image
dataset, imports that file, and trains an AutoML single-label classification
model with a filter split on those ML_USE labels. The model is deployed to a
new endpoint with automatic resources (one replica), and ``invoke`` sends
``:predict`` the image's base64 bytes with ``confidenceThreshold`` 0 and takes
the top prediction.
``teardown`` undeploys the model and deletes the endpoint, model, training
pipeline, dataset and uploaded objects, also after a failure. Every resource
carries the labels ``imgbench-run`` and ``imgbench-case``, so leftovers are
found by label.

The lifecycle goes through the ``aiplatform_v1`` GAPIC clients of
google-cloud-aiplatform with the REST transport (cassettes record HTTP, not
gRPC) and through google-cloud-storage. The high-level ``aiplatform.init``
and ``AutoMLImageTrainingJob`` are not used: ``init`` sets process-wide
state that concurrent cases would share, and their blocking waits poll on
wall-clock time, which a replay cannot skip. Here every wait polls on this
provider's ``Clock`` at its own interval. ``:predict`` is sent with the
suite's ``requests.Session`` so the load test times exactly one HTTP request.

Both clients take an ``http://`` endpoint as it is: the GAPIC REST transport
keeps a scheme given in ``api_endpoint`` (``url_scheme`` applies only to a bare
host), and google-cloud-storage uses ``client_options.api_endpoint`` as its
base URL.

Run modes: ``live`` uses Application Default Credentials and the real
service; ``emulator`` sends every request to ``--vertex-url`` (see
``imgbench.emulators.vertex``) with anonymous credentials; ``replay`` takes
responses from a cassette with anonymous credentials, a fixed project and
bucket, and a virtual clock.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import random
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import requests

from imgbench.clock import Clock, RealClock, ReplayClock
from imgbench.errors import (
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    ProviderTimeoutError,
    ServiceFailureError,
    TrainingFailedError,
)
from imgbench.images import CONVERSION_POLICY, ImageDecodeError, decode_rgb
from imgbench.labels import ClassLabels, safe_labels
from imgbench.recording import RecordingRules, cassette_miss_error
from imgbench.retry import (
    CONNECTION_RESET,
    SERVER_ERROR,
    THROTTLING,
    RetryCounter,
    RetryPolicy,
    TransientError,
    call_with_retries,
)
from providers.base import Leftover, Prediction, PriceModel, Provider, TrainingSet

logger = logging.getLogger(__name__)

T = TypeVar("T")

RUN_MODES = ("replay", "emulator", "live")
PROJECT_ENV = "IMGBENCH_VERTEX_PROJECT"
LOCATION_ENV = "IMGBENCH_VERTEX_LOCATION"
BUCKET_ENV = "IMGBENCH_VERTEX_BUCKET"
PREFIX_ENV = "IMGBENCH_VERTEX_PREFIX"
BUDGET_ENV = "IMGBENCH_VERTEX_BUDGET_MILLI_NODE_HOURS"
DEFAULT_LOCATION = "us-central1"
DEFAULT_PREFIX = "imgbench"

# The project and bucket that replays and emulator runs use.
REPLAY_PROJECT = "imgbench-replay-project"
REPLAY_BUCKET = "imgbench-replay-bucket"
REPLAY_PROJECT_NUMBER = "100000000001"
EMULATOR_PROJECT = "emulated-project"
EMULATOR_BUCKET = "emulated-bucket"

# Labels on every resource; values follow the label rules (lowercase, at most 63 characters).
RUN_LABEL = "imgbench-run"
CASE_LABEL = "imgbench-case"

DATASET_SCHEMA = "gs://google-cloud-aiplatform/schema/dataset/metadata/image_1.0.0.yaml"
IMPORT_SCHEMA = ("gs://google-cloud-aiplatform/schema/dataset/ioformat/"
                 "image_classification_single_label_io_format_1.0.0.yaml")
TRAINING_DEFINITION = ("gs://google-cloud-aiplatform/schema/trainingjob/definition/"
                       "automl_image_classification_1.0.0.yaml")
ML_USE_FILTER = "labels.aiplatform.googleapis.com/ml_use={}"
ML_USE_BY_ROLE = {"train": "training", "validation": "validation", "test": "test"}

# The service's minimum training budget for AutoML image classification.
MIN_BUDGET_MILLI_NODE_HOURS = 8000
# Online prediction rejects request bodies over 1.5 MB, per
# https://cloud.google.com/sdk/gcloud/reference/ai/endpoints/predict.
PREDICT_PAYLOAD_LIMIT_BYTES = 1_572_864
# Each resize step scales the longest side by this factor.
RESIZE_STEP = 0.75

# Placeholders that stand for per-run values in cassettes.
PROJECT_PLACEHOLDER = "<VERTEX_PROJECT>"
PROJECT_NUMBER_PLACEHOLDER = "<VERTEX_PROJECT_NUMBER>"
BUCKET_PLACEHOLDER = "<VERTEX_BUCKET>"
RUN_PLACEHOLDER = "<IMGBENCH_RUN_LABEL>"
# A service-account email, also with its '@' percent-encoded as in a query string.
SERVICE_ACCOUNT_PATTERN = (r"[a-z0-9][a-z0-9-]*(?:@|%40)[a-z0-9-]+\.iam\.gserviceaccount\.com",
                           "<SERVICE_ACCOUNT_EMAIL>")

PIPELINE_DONE_STATES = ("PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED")

# Vertex AI list prices for AutoML image classification, per node hour.
PRICES = PriceModel(
    currency="USD",
    training_per_hour=3.465,
    endpoint_per_hour=1.375,
    per_1000_requests=None,
    storage_per_gb_month=None,
    source="https://cloud.google.com/vertex-ai/pricing",
    retrieved="2026-12-04",
    notes=("AutoML image classification: training $3.465 per node hour (the default budget caps it at 8 node "
           "hours), deployment and "
           "online prediction $1.375 per node hour. A deployed model bills per node hour even when idle, until "
           "it is undeployed. Cloud Storage for the uploaded images is billed apart."),
)

PAYLOAD_CACHE_SIZE = 4096


@dataclass(frozen=True)
class VertexOptions:
    """Settings of the Vertex AI provider; times are in seconds."""

    project: str
    bucket: str
    location: str = DEFAULT_LOCATION
    prefix: str = DEFAULT_PREFIX
    # None sends requests to the real service; otherwise an emulator's base URL.
    api_endpoint: str | None = None
    budget_milli_node_hours: int = MIN_BUDGET_MILLI_NODE_HOURS
    training_poll_interval_s: float = 60.0
    operation_poll_interval_s: float = 10.0
    training_timeout_s: float = 6 * 3600.0
    operation_timeout_s: float = 3600.0
    request_timeout_s: float = 60.0
    jpeg_quality: int = 90
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if not self.project:
            raise ConfigError(f"the Vertex AI project is missing; set --provider-option vertex.project=ID "
                              f"or {PROJECT_ENV}")
        if not self.bucket:
            raise ConfigError(f"the Cloud Storage bucket is missing; set --provider-option vertex.bucket=NAME "
                              f"or {BUCKET_ENV}")
        if self.budget_milli_node_hours < MIN_BUDGET_MILLI_NODE_HOURS:
            raise ConfigError(f"invalid budget_milli_node_hours {self.budget_milli_node_hours}; the service's "
                              f"minimum is {MIN_BUDGET_MILLI_NODE_HOURS}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", self.prefix):
            raise ConfigError(f"invalid prefix {self.prefix!r}; use letters, digits, '_', '.', '-' and '/'")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"invalid jpeg_quality {self.jpeg_quality}; use 1 to 95")


@dataclass
class VertexUpload:
    dataset_name: str
    import_file: str
    object_count: int
    labels: ClassLabels


@dataclass
class VertexModel:
    model_name: str
    pipeline_name: str
    labels: ClassLabels
    polls: int = 0
    state: str = "PIPELINE_STATE_SUCCEEDED"


@dataclass(frozen=True)
class VertexEndpoint:
    endpoint_name: str
    deployed_model_id: str
    labels: ClassLabels


@dataclass
class _Created:
    """Names of the resources of one case, for teardown."""

    objects: bool = False
    datasets: list[str] = field(default_factory=list)
    pipelines: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)


def label_value(text: str) -> str:
    """Return ``text`` as a label value: lowercase letters, digits, '-' and '_', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")[:63]


def build_import_file(training_set: TrainingSet, labels: ClassLabels, object_uri: Callable[[Any], str]) -> str:
    """Return the CSV import file: one ``ML_USE,gs://URI,LABEL`` row per image, in plan order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for image in training_set.images:
        try:
            ml_use = ML_USE_BY_ROLE[image.role]
        except KeyError:
            raise InvalidInputError(f"image {image.record.path} has role {image.role!r}; valid roles: "
                                    f"{', '.join(ML_USE_BY_ROLE)}") from None
        writer.writerow([ml_use, object_uri(image), labels.label_of(image.label)])
    return buffer.getvalue()


class VertexProvider(Provider):
    name = "vertex"
    description = "Google Vertex AI AutoML image classification, through the REST API"
    mode = "live"
    validates_internally = False
    credential_env = ()
    extra = "vertex"
    required_modules = ("google.cloud.aiplatform_v1", "google.cloud.storage")
    option_keys = ("project", "location", "bucket", "prefix", "budget_milli_node_hours")
    price_model = PRICES

    def __init__(self, options: VertexOptions, *, run_mode: str = "live", run_id: str = "local",
                 clock: Clock | None = None, credentials: Any = None):
        if run_mode not in RUN_MODES:
            raise ConfigError(f"invalid Vertex AI run mode {run_mode!r}; valid modes: {', '.join(RUN_MODES)}")
        self.options = options
        self.run_mode = run_mode
        self.run_label = label_value(run_id)
        self.clock = clock or (ReplayClock() if run_mode == "replay" else RealClock())
        self._credentials = credentials
        self._credentials_lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._project_number = REPLAY_PROJECT_NUMBER if run_mode == "replay" else None
        self._retries = RetryCounter()
        self._random = random.Random()
        self._payloads: OrderedDict[str, str] = OrderedDict()
        self._payload_lock = threading.Lock()
        self._resized = 0
        self._created = _Created()
        self._labels: ClassLabels | None = None

    @classmethod
    def from_config(cls, bench_config) -> "VertexProvider":
        run_mode = bench_config.provider_modes.get(cls.name, "replay")
        option = lambda key, env, default=None: bench_config.provider_option(cls.name, key, env=env, default=default)
        budget_text = option("budget_milli_node_hours", BUDGET_ENV, str(MIN_BUDGET_MILLI_NODE_HOURS))
        try:
            budget = int(budget_text)
        except ValueError:
            raise ConfigError(f"invalid budget_milli_node_hours {budget_text!r}; use a whole number such as "
                              f"{MIN_BUDGET_MILLI_NODE_HOURS}") from None
        common = dict(location=option("location", LOCATION_ENV, DEFAULT_LOCATION),
                      prefix=option("prefix", PREFIX_ENV, DEFAULT_PREFIX), budget_milli_node_hours=budget)
        if run_mode == "replay":
            options = VertexOptions(project=REPLAY_PROJECT, bucket=REPLAY_BUCKET, api_endpoint="http://127.0.0.1:9",
                                    **common)
        elif run_mode == "emulator":
            options = VertexOptions(project=option("project", PROJECT_ENV, EMULATOR_PROJECT),
                                    bucket=option("bucket", BUCKET_ENV, EMULATOR_BUCKET),
                                    api_endpoint=bench_config.service_urls[cls.name].rstrip("/"),
                                    training_poll_interval_s=0.2, operation_poll_interval_s=0.1,
                                    retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.5), **common)
        else:
            options = VertexOptions(project=option("project", PROJECT_ENV) or "",
                                    bucket=option("bucket", BUCKET_ENV) or "", **common)
        return cls(options, run_mode=run_mode, run_id=bench_config.run_id)

    # Description --------------------------------------------------------------

    def settings(self) -> dict:
        return {
            "run_mode": self.run_mode,
            "api": "Vertex AI v1 REST (google-cloud-aiplatform aiplatform_v1), Cloud Storage JSON API",
            "location": self.options.location,
            "model_type": "CLOUD",
            "budget_milli_node_hours": self.options.budget_milli_node_hours,
            "deployment": "automatic resources, 1 replica",
            "split": "filter split on ML_USE from the ablation plan",
            "image_format": f"jpeg quality {self.options.jpeg_quality}",
            "image_policy": (f"{CONVERSION_POLICY};predict-request<={PREDICT_PAYLOAD_LIMIT_BYTES}B-else-longest-side"
                             f"*{RESIZE_STEP}-until-it-fits"),
            "confidence_threshold": 0,
            "training_poll_interval_s": self.options.training_poll_interval_s,
            "operation_poll_interval_s": self.options.operation_poll_interval_s,
            "training_timeout_s": self.options.training_timeout_s,
            "max_attempts_on_transient_errors": self.options.retry.max_attempts,
        }

    def describe_model(self, model: VertexModel) -> dict:
        return {"model": self._short(model.model_name), "training_pipeline": self._short(model.pipeline_name),
                "state": model.state, "status_polls": model.polls}

    def counters(self) -> dict[str, int]:
        return {**self._retries.as_dict(), "images_resized_for_predict": self._resized}

    def credentials_needed(self) -> bool:
        return False

    def recording_rules(self) -> RecordingRules:
        return RecordingRules(
            provider=self.name,
            base_url=f"https://{self.options.location}-aiplatform.googleapis.com",
            sensitive_values={PROJECT_PLACEHOLDER: self.options.project,
                              PROJECT_NUMBER_PLACEHOLDER: lambda request, response: self._project_number,
                              BUCKET_PLACEHOLDER: self.options.bucket,
                              RUN_PLACEHOLDER: self.run_label},
            base64_fields=frozenset({"content"}),
            text_patterns=(SERVICE_ACCOUNT_PATTERN,),
        )

    # The provider contract ----------------------------------------------------

    def upload(self, training_set: TrainingSet) -> VertexUpload:
        # NOTE: 32 characters is a conservative guess at the service's label limit; not checked live.
        labels = safe_labels(training_set.classes, service="Vertex AI", max_length=32)
        self._labels = labels
        folder = self._case_folder(training_set.case_id)
        bucket = self._storage().bucket(self.options.bucket)
        self._created.objects = True
        self.note_created("objects", f"gs://{self.options.bucket}/{folder}", run=self.run_label)
        for image in training_set.images:
            data = self._encode_jpeg(image.record.read_bytes(), str(image.record.path))
            name = f"{folder}{image.record.sha256}.jpg"
            self._call(lambda: bucket.blob(name).upload_from_string(
                data, content_type="image/jpeg", retry=None, timeout=self.options.request_timeout_s),
                "image upload")
        uri = lambda image: f"gs://{self.options.bucket}/{folder}{image.record.sha256}.jpg"
        import_text = build_import_file(training_set, labels, uri)
        import_name = f"{folder}import.csv"
        self._call(lambda: bucket.blob(import_name).upload_from_string(
            import_text, content_type="text/csv", retry=None, timeout=self.options.request_timeout_s),
            "import file upload")
        logger.info("Vertex AI: %d images and the import file uploaded to gs://%s/%s",
                    len(training_set.images), self.options.bucket, folder)

        from google.cloud import aiplatform_v1

        dataset = aiplatform_v1.Dataset(display_name=self._display_name(training_set.case_id),
                                        metadata_schema_uri=DATASET_SCHEMA, labels=self._labels_for(training_set))
        operation = self._call(lambda: self._client("dataset").create_dataset(
            parent=self._parent(), dataset=dataset, retry=None), "dataset creation")
        dataset_name = self._resource_of(operation)
        self._created.datasets.append(dataset_name)
        self.note_created("dataset", dataset_name, run=self.run_label)
        self._wait_operation(operation, "dataset creation")
        import_config = aiplatform_v1.ImportDataConfig(
            gcs_source=aiplatform_v1.GcsSource(uris=[f"gs://{self.options.bucket}/{import_name}"]),
            import_schema_uri=IMPORT_SCHEMA)
        operation = self._call(lambda: self._client("dataset").import_data(
            name=dataset_name, import_configs=[import_config], retry=None), "data import")
        self._wait_operation(operation, "data import")
        logger.info("Vertex AI dataset %s: %d images imported", dataset_name, len(training_set.images))
        return VertexUpload(dataset_name, f"gs://{self.options.bucket}/{import_name}", len(training_set.images),
                            labels)

    def train(self, upload: VertexUpload) -> VertexModel:
        from google.cloud import aiplatform_v1

        case_labels = self._case_labels()
        pipeline = aiplatform_v1.TrainingPipeline(
            display_name=self._display_name(self.case_id),
            training_task_definition=TRAINING_DEFINITION,
            training_task_inputs={"modelType": "CLOUD", "multiLabel": False,
                                  "budgetMilliNodeHours": self.options.budget_milli_node_hours,
                                  "disableEarlyStopping": False},
            input_data_config=aiplatform_v1.InputDataConfig(
                dataset_id=upload.dataset_name.rsplit("/", 1)[-1],
                # NOTE: a test filter that matches nothing leaves the service no test split; the
                # benchmark tests on its own held-out images. Not verified against the live service.
                filter_split=aiplatform_v1.FilterSplit(training_filter=ML_USE_FILTER.format("training"),
                                                       validation_filter=ML_USE_FILTER.format("validation"),
                                                       test_filter=ML_USE_FILTER.format("test"))),
            model_to_upload=aiplatform_v1.Model(display_name=self._display_name(self.case_id), labels=case_labels),
            labels=case_labels,
        )
        created = self._call(lambda: self._client("pipeline").create_training_pipeline(
            parent=self._parent(), training_pipeline=pipeline, retry=None), "training pipeline creation")
        self._learn_project_number(created.name)
        self._created.pipelines.append(created.name)
        self.note_created("training_pipeline", created.name, run=self.run_label)
        logger.info("Vertex AI training pipeline %s created (budget %d milli node hours)", created.name,
                    self.options.budget_milli_node_hours)
        return self._wait_training(created.name, upload.labels)

    def deploy(self, model: VertexModel) -> VertexEndpoint:
        from google.cloud import aiplatform_v1

        endpoint = aiplatform_v1.Endpoint(display_name=self._display_name(self.case_id), labels=self._case_labels())
        operation = self._call(lambda: self._client("endpoint").create_endpoint(
            parent=self._parent(), endpoint=endpoint, retry=None), "endpoint creation")
        endpoint_name = self._resource_of(operation)
        self._created.endpoints.append(endpoint_name)
        self.note_created("endpoint", endpoint_name, run=self.run_label)
        self._wait_operation(operation, "endpoint creation")
        deployed = aiplatform_v1.DeployedModel(
            model=model.model_name, display_name=self._display_name(self.case_id),
            automatic_resources=aiplatform_v1.AutomaticResources(min_replica_count=1, max_replica_count=1))
        operation = self._call(lambda: self._client("endpoint").deploy_model(
            endpoint=endpoint_name, deployed_model=deployed, traffic_split={"0": 100}, retry=None),
            "model deployment")
        response = self._wait_operation(operation, "model deployment")
        deployed_id = response.deployed_model.id
        logger.info("Vertex AI model %s deployed to %s as %s", model.model_name, endpoint_name, deployed_id)
        return VertexEndpoint(endpoint_name, deployed_id, model.labels)

    def invoke(self, endpoint: VertexEndpoint, image: bytes, session: requests.Session) -> Prediction:
        body = self._predict_body(image, "test image")
        url = f"{self._api_base()}/v1/{endpoint.endpoint_name}:predict"
        headers = {"Content-Type": "application/json"}
        self._authorize(headers, "POST", url)
        try:
            response = session.post(url, data=body, headers=headers, timeout=self.options.request_timeout_s)
        except Exception as exc:
            raise self._mapped(exc, "prediction") from exc
        if response.status_code != 200:
            raise self._mapped(_http_error(response), "prediction")
        try:
            answer = response.json()["predictions"][0]
            confidences = [float(value) for value in answer["confidences"]]
            best = max(range(len(confidences)), key=confidences.__getitem__)
            label = str(answer["displayNames"][best])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServiceFailureError(f"Vertex AI prediction returned no displayNames and confidences: "
                                      f"{response.text[:200]}") from exc
        return Prediction(label=endpoint.labels.class_of(label), confidence=confidences[best])

    def teardown(self) -> None:
        """Delete the case's resources, newest first; with ``keep_model``, keep the model and note it kept."""
        failures: list[str] = []
        created = self._created
        for endpoint_name in list(created.endpoints):
            self._cleanup(failures, "endpoint", endpoint_name, self._delete_endpoint)
        for model_name in list(created.models):
            if self.keep_model:
                self.note_kept("model", model_name, run=self.run_label)
                logger.info("Vertex AI model %s kept for a resumed run", model_name)
                continue
            self._cleanup(failures, "model", model_name, lambda name: self._delete_resource("model", name))
        for pipeline_name in list(created.pipelines):
            self._cleanup(failures, "training_pipeline", pipeline_name,
                          lambda name: self._delete_resource("training_pipeline", name))
        for dataset_name in list(created.datasets):
            self._cleanup(failures, "dataset", dataset_name, lambda name: self._delete_resource("dataset", name))
        if self.case_id:
            self._sweep_case(failures)
        if created.objects and self.case_id:
            folder = f"gs://{self.options.bucket}/{self._case_folder(self.case_id)}"
            if self._cleanup(failures, "objects", folder,
                             lambda _: self._delete_objects(self._case_folder(self.case_id))):
                created.objects = False
        if failures:
            raise ServiceFailureError("Vertex AI teardown left resources behind: " + "; ".join(failures)
                                      + "; delete them with the sweep command or in the console")

    # Resumption and leftovers ---------------------------------------------------

    def reuse_model(self, training_set: TrainingSet, details: dict) -> VertexModel | None:
        model_name = details.get("model_name") or details.get("resource_id")
        if not model_name:
            return None
        from google.api_core import exceptions as core

        try:
            self._call(lambda: self._client("model").get_model(name=model_name, retry=None), "model read")
        except ServiceFailureError as exc:
            if isinstance(exc.__cause__, core.NotFound):
                return None
            raise
        labels = safe_labels(training_set.classes, service="Vertex AI", max_length=32)
        self._created.models.append(model_name)
        return VertexModel(model_name, str(details.get("pipeline_name", "")), labels)

    @classmethod
    def find_leftovers(cls, bench_config: Any, run_marker: str | None) -> list[Leftover]:
        provider = cls.from_config(bench_config)
        return provider.list_leftovers(run_marker)

    @classmethod
    def delete_leftover(cls, bench_config: Any, leftover: Leftover) -> None:
        provider = cls.from_config(bench_config)
        provider.remove_leftover(leftover)

    def list_leftovers(self, run_marker: str | None) -> list[Leftover]:
        """List the resources labelled with ``run_marker`` (any imgbench run when None), objects included."""
        label_filter = (f'labels.{RUN_LABEL}="{label_value(run_marker)}"' if run_marker
                        else f"labels.{RUN_LABEL}:*")
        found = []
        for kind in ("endpoint", "model", "training_pipeline", "dataset"):
            for name, labels in self._list_resources(kind, label_filter):
                found.append(Leftover(self.name, kind, name, labels.get(RUN_LABEL, ""),
                                      tuple(sorted(labels.items()))))
        prefix = f"{self.options.prefix}/{label_value(run_marker)}/" if run_marker else f"{self.options.prefix}/"
        names = self._call(lambda: [blob.name for blob in self._storage().list_blobs(
            self.options.bucket, prefix=prefix, retry=None)], "object listing")
        folders = sorted({name[:len(prefix)] + name[len(prefix):].split("/", 1)[0] + "/" for name in names})
        for folder in folders:
            marker = folder.removeprefix(f"{self.options.prefix}/").split("/", 1)[0]
            found.append(Leftover(self.name, "objects", f"gs://{self.options.bucket}/{folder}", marker))
        return found

    def remove_leftover(self, leftover: Leftover) -> None:
        if leftover.kind == "endpoint":
            self._delete_endpoint(leftover.resource_id)
        elif leftover.kind in ("model", "training_pipeline", "dataset"):
            self._delete_resource(leftover.kind, leftover.resource_id)
        elif leftover.kind == "objects":
            prefix = f"gs://{self.options.bucket}/"
            if not leftover.resource_id.startswith(prefix):
                raise ConfigError(f"leftover {leftover.resource_id} is not in the bucket {self.options.bucket}; "
                                  "run the sweep with that bucket")
            self._delete_objects(leftover.resource_id.removeprefix(prefix))
        else:
            raise ConfigError(f"unknown Vertex AI leftover kind {leftover.kind!r}; valid kinds: endpoint, model, "
                              "training_pipeline, dataset, objects")
        self.note_deleted(leftover.kind, leftover.resource_id)

    # Waiting ---------------------------------------------------------------------

    def _wait_operation(self, operation, description: str):
        """Poll a long-running operation on this provider's clock; return its result."""
        from google.api_core import exceptions as core

        deadline = self.clock.monotonic() + self.options.operation_timeout_s
        while not self._call(lambda: operation.done(retry=None), f"{description} status read"):
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(f"Vertex AI {description} ({operation.operation.name}) did not finish within "
                                           f"{self.options.operation_timeout_s:.0f} s")
            self.clock.sleep(self.options.operation_poll_interval_s)
        try:
            return operation.result(timeout=0, retry=None)
        except core.GoogleAPICallError as exc:
            raise self._mapped(exc, description) from exc

    def _wait_training(self, pipeline_name: str, labels: ClassLabels) -> VertexModel:
        deadline = self.clock.monotonic() + self.options.training_timeout_s
        polls = 0
        while True:
            pipeline = self._call(lambda: self._client("pipeline").get_training_pipeline(
                name=pipeline_name, retry=None), "training status read")
            polls += 1
            state = pipeline.state.name
            if state in PIPELINE_DONE_STATES:
                break
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(f"Vertex AI training pipeline {pipeline_name} did not finish within "
                                           f"{self.options.training_timeout_s:.0f} s ({polls} polls, state {state})")
            logger.info("Vertex AI training pipeline %s: %s after %d polls", pipeline_name, state, polls)
            self.clock.sleep(self.options.training_poll_interval_s)
        model_name = pipeline.model_to_upload.name
        if model_name:
            self._created.models.append(model_name)
            self.note_created("model", model_name, run=self.run_label, model_name=model_name,
                              pipeline_name=pipeline_name)
        if state != "PIPELINE_STATE_SUCCEEDED" or not model_name:
            raise TrainingFailedError(f"Vertex AI training pipeline {pipeline_name} ended in {state} after {polls} "
                                      f"polls: {pipeline.error.message or 'no model was uploaded'}")
        logger.info("Vertex AI training pipeline %s succeeded after %d polls: model %s", pipeline_name, polls,
                    model_name)
        return VertexModel(model_name, pipeline_name, labels, polls, state)

    # Deletion --------------------------------------------------------------------

    def _cleanup(self, failures: list[str], kind: str, name: str, delete: Callable[[str], None]) -> bool:
        """Run ``delete(name)``; return True when it succeeded, else add the failure to ``failures``."""
        try:
            delete(name)
        except Exception as exc:  # teardown goes on, so one failure does not strand the other resources
            logger.error("Vertex AI teardown: deleting %s %s failed: %s", kind, name, exc)
            failures.append(f"{kind} {name} ({exc})")
            return False
        self.note_deleted(kind, name)
        for names in (self._created.endpoints, self._created.models, self._created.pipelines,
                      self._created.datasets):
            if name in names:
                names.remove(name)
        return True

    def _sweep_case(self, failures: list[str]) -> None:
        """Delete resources labelled with this case that teardown does not know by name.

        A create request whose response was lost (a dropped connection, then
        a retry) can leave a second resource behind; its labels still tie it
        to this case.
        """
        # NOTE: the filter syntax for label keys with '-' follows the Vertex AI list
        # documentation; only the emulator has checked it.
        label_filter = " AND ".join(f'labels.{key}="{value}"' for key, value in self._case_labels().items())
        for kind in ("endpoint", "model", "training_pipeline", "dataset"):
            if kind == "model" and self.keep_model:
                continue
            try:
                found = self._list_resources(kind, label_filter)
            except Exception as exc:  # listing is a safety net; the failure is reported like a deletion's
                failures.append(f"{kind} listing ({exc})")
                continue
            known = set(self._created.endpoints + self._created.models + self._created.pipelines
                        + self._created.datasets)
            for name, _ in found:
                if name in known:
                    continue  # its deletion failed above and is reported already
                logger.warning("Vertex AI teardown: %s %s was not known by name; deleting it by its labels",
                               kind, name)
                delete = self._delete_endpoint if kind == "endpoint" else (
                    lambda resource, kind=kind: self._delete_resource(kind, resource))
                self._cleanup(failures, kind, name, delete)

    def _delete_endpoint(self, endpoint_name: str) -> None:
        from google.api_core import exceptions as core

        client = self._client("endpoint")
        try:
            endpoint = self._call(lambda: client.get_endpoint(name=endpoint_name, retry=None), "endpoint read")
        except ServiceFailureError as exc:
            if isinstance(exc.__cause__, core.NotFound):
                return
            raise
        for deployed in endpoint.deployed_models:
            operation = self._call(lambda: client.undeploy_model(
                endpoint=endpoint_name, deployed_model_id=deployed.id, retry=None), "model undeployment")
            self._wait_operation(operation, "model undeployment")
            logger.info("Vertex AI model %s undeployed from %s", deployed.model, endpoint_name)
        self._delete_resource("endpoint", endpoint_name)

    def _delete_resource(self, kind: str, name: str) -> None:
        from google.api_core import exceptions as core

        client_kind, method = {"endpoint": ("endpoint", "delete_endpoint"), "model": ("model", "delete_model"),
                               "training_pipeline": ("pipeline", "delete_training_pipeline"),
                               "dataset": ("dataset", "delete_dataset")}[kind]
        delete = getattr(self._client(client_kind), method)
        try:
            operation = self._call(lambda: delete(name=name, retry=None), f"{kind} deletion")
        except ServiceFailureError as exc:
            if isinstance(exc.__cause__, core.NotFound):
                return
            raise
        self._wait_operation(operation, f"{kind} deletion")
        logger.info("Vertex AI %s %s deleted", kind, name)

    def _delete_objects(self, folder: str) -> None:
        from google.api_core import exceptions as core

        storage = self._storage()
        names = self._call(lambda: [blob.name for blob in storage.list_blobs(
            self.options.bucket, prefix=folder, retry=None)], "object listing")
        bucket = storage.bucket(self.options.bucket)
        for name in names:
            try:
                self._call(lambda: bucket.blob(name).delete(retry=None, timeout=self.options.request_timeout_s),
                           "object deletion")
            except ServiceFailureError as exc:
                if not isinstance(exc.__cause__, core.NotFound):
                    raise
        logger.info("Vertex AI: %d objects under gs://%s/%s deleted", len(names), self.options.bucket, folder)

    def _list_resources(self, kind: str, label_filter: str) -> list[tuple[str, dict]]:
        client_kind, method = {"endpoint": ("endpoint", "list_endpoints"), "model": ("model", "list_models"),
                               "training_pipeline": ("pipeline", "list_training_pipelines"),
                               "dataset": ("dataset", "list_datasets")}[kind]
        listing = getattr(self._client(client_kind), method)
        request = {"parent": self._parent(), "filter": label_filter}
        return self._call(lambda: [(item.name, dict(item.labels)) for item in listing(request=request, retry=None)],
                          f"{kind} listing")

    # Clients and names -------------------------------------------------------------

    def _parent(self) -> str:
        return f"projects/{self.options.project}/locations/{self.options.location}"

    def _api_base(self) -> str:
        return self.options.api_endpoint or f"https://{self.options.location}-aiplatform.googleapis.com"

    def _case_folder(self, case_id: str) -> str:
        return f"{self.options.prefix}/{self.run_label}/{label_value(case_id)}/"

    def _display_name(self, case_id: str) -> str:
        return f"imgbench-{self.run_label}-{label_value(case_id)}"[:128]

    def _case_labels(self) -> dict[str, str]:
        return {RUN_LABEL: self.run_label, CASE_LABEL: label_value(self.case_id)}

    def _labels_for(self, training_set: TrainingSet) -> dict[str, str]:
        return {RUN_LABEL: self.run_label, CASE_LABEL: label_value(training_set.case_id)}

    def _short(self, name: str) -> str:
        """Return a resource name without its project, which cassettes and records leave out."""
        return re.sub(r"^projects/[^/]+/", "", name)

    def _learn_project_number(self, name: str) -> None:
        match = re.match(r"^projects/(\d+)/", name)
        if match and self._project_number is None:
            self._project_number = match.group(1)

    def _resource_of(self, operation) -> str:
        """Return the resource name that an operation's name starts with."""
        name = operation.operation.name.split("/operations/")[0]
        self._learn_project_number(name)
        return name

    def _credentials_for(self):
        with self._credentials_lock:
            if self._credentials is None:
                if self.run_mode == "live":
                    import google.auth
                    from google.auth.exceptions import DefaultCredentialsError

                    try:
                        self._credentials, _ = google.auth.default(
                            scopes=["https://www.googleapis.com/auth/cloud-platform"])
                    except DefaultCredentialsError as exc:
                        raise AuthenticationError(
                            "no Application Default Credentials found; run `gcloud auth application-default "
                            "login` or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from exc
                else:
                    from google.auth.credentials import AnonymousCredentials

                    self._credentials = AnonymousCredentials()
            return self._credentials

    def _authorize(self, headers: dict, method: str, url: str) -> None:
        credentials = self._credentials_for()
        if self.run_mode != "live":
            return
        import google.auth.transport.requests

        with self._credentials_lock:
            credentials.before_request(google.auth.transport.requests.Request(), method, url, headers)

    def _client(self, kind: str):
        """Return the ``aiplatform_v1`` client of ``kind``, created once, on the REST transport."""
        if kind not in self._clients:
            from google.api_core.client_options import ClientOptions
            from google.cloud import aiplatform_v1

            classes = {"dataset": aiplatform_v1.DatasetServiceClient,
                       "pipeline": aiplatform_v1.PipelineServiceClient,
                       "model": aiplatform_v1.ModelServiceClient,
                       "endpoint": aiplatform_v1.EndpointServiceClient}
            endpoint = self.options.api_endpoint or f"{self.options.location}-aiplatform.googleapis.com"
            self._clients[kind] = classes[kind](credentials=self._credentials_for(), transport="rest",
                                                client_options=ClientOptions(api_endpoint=endpoint))
        return self._clients[kind]

    def _storage(self):
        if "storage" not in self._clients:
            from google.cloud import storage

            client_options = {"api_endpoint": self.options.api_endpoint} if self.options.api_endpoint else None
            client = storage.Client(project=self.options.project, credentials=self._credentials_for(),
                                    client_options=client_options)
            # google-cloud-storage 3.x reads bucket metadata in a background thread for
            # OpenTelemetry span attributes. That request adds nothing here and would land
            # in cassettes at a random point, so the cache is switched off.
            if getattr(client, "_bucket_metadata_cache", None) is not None:
                client._bucket_metadata_cache = None
            self._clients["storage"] = client
        return self._clients["storage"]

    # Images ------------------------------------------------------------------------

    def _encode_jpeg(self, data: bytes, label: str, scale: float = 1.0) -> bytes:
        try:
            image = decode_rgb(data, label)
        except ImageDecodeError as exc:
            raise InvalidInputError(str(exc)) from exc
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.options.jpeg_quality)
        return buffer.getvalue()

    def _predict_body(self, data: bytes, label: str) -> str:
        """Return the ``:predict`` JSON body, resizing the image until the body fits the request limit."""
        key = hashlib.sha256(data).hexdigest()
        with self._payload_lock:
            cached = self._payloads.get(key)
            if cached is not None:
                self._payloads.move_to_end(key)
                return cached
        scale, resized = 1.0, False
        while True:
            content = base64.b64encode(self._encode_jpeg(data, label, scale)).decode("ascii")
            body = json.dumps({"instances": [{"content": content}],
                               "parameters": {"confidenceThreshold": 0, "maxPredictions": 100}})
            if len(body) <= PREDICT_PAYLOAD_LIMIT_BYTES:
                break
            scale *= RESIZE_STEP
            resized = True
            if scale < 0.01:
                raise InvalidInputError(f"{label}: the prediction request stays over "
                                        f"{PREDICT_PAYLOAD_LIMIT_BYTES} bytes after resizing; use a smaller image")
        with self._payload_lock:
            if resized and key not in self._payloads:
                self._resized += 1
                logger.info("%s resized to %.0f%% for a prediction request under %d bytes", label, scale * 100,
                            PREDICT_PAYLOAD_LIMIT_BYTES)
            self._payloads[key] = body
            if len(self._payloads) > PAYLOAD_CACHE_SIZE:
                self._payloads.popitem(last=False)
        return body

    # Errors and retries --------------------------------------------------------------

    def _call(self, call: Callable[[], T], operation: str) -> T:
        """Run one SDK call, retrying transient errors and mapping the rest to ``imgbench.errors``."""

        def attempt() -> T:
            try:
                return call()
            except Exception as exc:
                transient = _transient(exc, operation)
                if transient is not None:
                    raise transient from exc
                raise self._mapped(exc, operation) from exc

        return call_with_retries(attempt, operation=f"Vertex AI {operation}", policy=self.options.retry,
                                 counter=self._retries, clock=self.clock, rng=self._random)

    def _mapped(self, exc: BaseException, operation: str) -> Exception:
        from google.api_core import exceptions as core
        from vcr.errors import CannotOverwriteExistingCassetteException

        from imgbench.errors import ImgbenchError, QuotaError

        if isinstance(exc, ImgbenchError):
            return exc
        if isinstance(exc, CannotOverwriteExistingCassetteException):
            return cassette_miss_error(exc)
        detail = f"Vertex AI {operation} failed: {exc}"
        if isinstance(exc, (core.Unauthenticated, core.PermissionDenied, core.Unauthorized, core.Forbidden)):
            return AuthenticationError(f"{detail}; check Application Default Credentials and the project's IAM roles")
        if isinstance(exc, (core.ResourceExhausted, core.TooManyRequests)):
            return QuotaError(f"{detail}; the project's quota is used up: request more or wait")
        if isinstance(exc, (core.DeadlineExceeded, requests.Timeout)):
            return ProviderTimeoutError(detail)
        if isinstance(exc, (core.InvalidArgument, core.BadRequest, core.FailedPrecondition)):
            return InvalidInputError(detail)
        return ServiceFailureError(detail)


def _transient(exc: BaseException, operation: str) -> TransientError | None:
    """Return the ``TransientError`` for throttling, 5xx and dropped connections, else None."""
    from google.api_core import exceptions as core

    message = f"Vertex AI {operation}: {exc}"
    if isinstance(exc, (core.ResourceExhausted, core.TooManyRequests)):
        return TransientError(THROTTLING, message)
    if isinstance(exc, (core.InternalServerError, core.ServiceUnavailable, core.BadGateway)):
        return TransientError(SERVER_ERROR, message)
    if isinstance(exc, requests.ConnectionError):
        return TransientError(CONNECTION_RESET, message)
    return None


def _http_error(response: requests.Response) -> Exception:
    from google.api_core import exceptions as core

    return core.from_http_response(response)

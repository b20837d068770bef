"""An emulator of Amazon S3 and the Rekognition Custom Labels API subset that ``providers.aws`` uses.

One HTTP server on 127.0.0.1 serves both boto3 clients. A request with an
``X-Amz-Target: RekognitionService.<Operation>`` header goes to the
Rekognition emulator here, and every other request goes to moto's S3
implementation (moto's own Flask app, so S3 behaves as moto documents it).

Rekognition operations, with the request and response shapes of botocore's
service model ``rekognition/2016-06-27``: ``CreateProject``,
``DescribeProjects``, ``DeleteProject``, ``CreateDataset``,
``DescribeDataset``, ``DeleteDataset``, ``CreateProjectVersion``,
``DescribeProjectVersions``, ``StartProjectVersion``,
``StopProjectVersion``, ``DeleteProjectVersion``, ``DetectCustomLabels``,
``ListTagsForResource``. Errors are JSON 1.1 errors (``__type`` and
``Message``).

``CreateDataset`` reads its SageMaker Ground Truth manifest and every image
it names from moto's S3 store. The "model" is the Nyckel emulator's: a
64-bin colour histogram per image, and the label with the nearest mean
histogram wins. Datasets, training, starting and stopping finish after a set
number of ``Describe*`` polls, so a provider's waits are exercised. Fault
injection makes training fail, throttles requests, or resets connections;
``on_request`` runs a callback (such as sending a signal to the process
under test) when an operation is first requested.
The rules the service documents are enforced: a running model cannot be
deleted, and a project with datasets or versions cannot be deleted.

Use it as a context manager in tests, or run
``python -m imgbench.emulators.aws --port 8766`` to record cassettes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np

from imgbench.emulators.nyckel import ImagePayloadError, image_histogram

logger = logging.getLogger(__name__)

# moto's default account id; the emulator's ARNs carry it.
ACCOUNT_ID = "123456789012"
TARGET_PREFIX = "RekognitionService."
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
# Rekognition's documented limit on the ``Image.Bytes`` of DetectCustomLabels.
MAX_IMAGE_BYTES = 4 * 1024 * 1024
# Softmax temperature over L1 histogram distances, which lie in 0..2.
CONFIDENCE_TEMPERATURE = 0.05
GROUND_TRUTH_TYPE = "groundtruth/image-classification"

# Version states in which DeleteProjectVersion is rejected with ResourceInUseException.
BUSY_VERSION_STATES = ("TRAINING_IN_PROGRESS", "STARTING", "RUNNING", "STOPPING")


class RekognitionError(Exception):
    """A JSON 1.1 error response: HTTP status, ``__type`` and message."""

    def __init__(self, error_type: str, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.error_type = error_type
        self.status = status


@dataclass
class DatasetEntry:
    key: str
    label: str
    histogram: np.ndarray


@dataclass
class EmulatedDataset:
    arn: str
    project_arn: str
    dataset_type: str
    created: float
    status: str = "CREATE_IN_PROGRESS"
    final_status: str = "CREATE_COMPLETE"
    status_message: str = ""
    polls_left: int = 0
    entries: list[DatasetEntry] = field(default_factory=list)
    error_entries: int = 0


@dataclass
class EmulatedVersion:
    arn: str
    project_arn: str
    name: str
    created: float
    output_config: dict
    status: str = "TRAINING_IN_PROGRESS"
    status_message: str = "The model is being trained."
    polls_left: int = 0
    min_inference_units: int | None = None
    centroids: dict[str, np.ndarray] = field(default_factory=dict)
    billable_training_s: int | None = None
    training_end: float | None = None
    f1_score: float | None = None
    # The datasets' entries when training started, so deleting a dataset
    # during training does not change what the version learns.
    train_entries: list[DatasetEntry] = field(default_factory=list)
    test_entries: list[DatasetEntry] = field(default_factory=list)


@dataclass
class EmulatedProject:
    arn: str
    name: str
    created: float
    datasets: dict[str, str] = field(default_factory=dict)  # dataset type -> ARN
    versions: dict[str, str] = field(default_factory=dict)  # version name -> ARN


@dataclass
class Faults:
    """Faults to inject; the emulator reads and updates them under its lock."""

    fail_training: bool = False
    # Error type, and the operations it applies to (every operation when empty).
    throttle_next: int = 0
    throttle_type: str = "ThrottlingException"
    throttle_operations: frozenset[str] = frozenset()
    # Close the connection without a response for the next N requests to these operations.
    reset_next: int = 0
    reset_operations: frozenset[str] = frozenset()
    # Operations that respond with InternalServerError until cleared.
    failing_operations: set[str] = field(default_factory=set)


class RekognitionEmulator:
    """S3 (moto) and Rekognition Custom Labels on one loopback port."""

    def __init__(self, *, port: int = 0, region: str = "us-east-1", dataset_polls: int = 1,
                 training_polls: int = 3, start_polls: int = 2, stop_polls: int = 1,
                 billable_training_s: int = 3600, time_source: Callable[[], float] = time.time):
        from moto.moto_server.werkzeug_app import create_backend_app

        self.region = region
        self.dataset_polls = dataset_polls
        self.training_polls = training_polls
        self.start_polls = start_polls
        self.stop_polls = stop_polls
        self.billable_training_s = billable_training_s
        self.faults = Faults()
        self._time = time_source
        self._lock = threading.RLock()
        self._projects: dict[str, EmulatedProject] = {}
        self._datasets: dict[str, EmulatedDataset] = {}
        self._versions: dict[str, EmulatedVersion] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._sequence = int(time_source() * 1000)
        self.operation_counts: dict[str, int] = {}
        self.request_callbacks: dict[str, Callable[[], None]] = {}
        self.s3_app = create_backend_app("s3")
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.emulator = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RekognitionEmulator":
        self._thread = threading.Thread(target=self._server.serve_forever, name="aws-emulator", daemon=True)
        self._thread.start()
        logger.info("AWS emulator (S3 and Rekognition Custom Labels) listening on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        logger.info("AWS emulator on %s stopped", self.url)

    def __enter__(self) -> "RekognitionEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Fault injection ------------------------------------------------------------

    def fail_training(self) -> None:
        """Make every later training end in TRAINING_FAILED."""
        with self._lock:
            self.faults.fail_training = True

    def throttle(self, count: int, error_type: str = "ThrottlingException",
                 operations: tuple[str, ...] = ()) -> None:
        """Reject the next ``count`` Rekognition requests (of ``operations``, or any) with ``error_type``."""
        if error_type not in ("ThrottlingException", "ProvisionedThroughputExceededException"):
            raise ValueError(f"invalid throttling error {error_type!r}; use ThrottlingException or "
                             "ProvisionedThroughputExceededException")
        with self._lock:
            self.faults.throttle_next = count
            self.faults.throttle_type = error_type
            self.faults.throttle_operations = frozenset(operations)

    def reset_connections(self, count: int, operations: tuple[str, ...] = ()) -> None:
        """Close the connection without a response for the next ``count`` Rekognition requests."""
        with self._lock:
            self.faults.reset_next = count
            self.faults.reset_operations = frozenset(operations)

    def fail_operation(self, operation: str, failing: bool = True) -> None:
        """Make ``operation`` respond with InternalServerError until called with ``failing=False``."""
        with self._lock:
            if failing:
                self.faults.failing_operations.add(operation)
            else:
                self.faults.failing_operations.discard(operation)

    def on_request(self, operation: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, in the server thread, when the first ``operation`` request arrives.

        ``operation`` is a Rekognition operation name such as ``CreateProjectVersion``.
        """
        with self._lock:
            self.request_callbacks[operation] = callback

    def run_request_callback(self, operation: str) -> None:
        with self._lock:
            callback = self.request_callbacks.pop(operation, None)
        if callback is not None:
            callback()

    # Inspection, for tests --------------------------------------------------------

    def project_arns(self) -> list[str]:
        with self._lock:
            return sorted(self._projects)

    def dataset_arns(self) -> list[str]:
        with self._lock:
            return sorted(self._datasets)

    def version_states(self) -> dict[str, str]:
        """Return the status of every project version, by ARN."""
        with self._lock:
            return {arn: version.status for arn, version in self._versions.items()}

    def object_keys(self, bucket: str) -> list[str]:
        """Return the keys stored in a bucket of the emulated S3 (empty when the bucket does not exist)."""
        backend = _s3_backend()
        if bucket not in backend.buckets:
            return []
        return sorted(key for key in backend.buckets[bucket].keys.keys())

    def create_bucket(self, bucket: str) -> None:
        _s3_backend().create_bucket(bucket, self.region)

    # Request handling ---------------------------------------------------------------

    def should_reset(self, operation: str) -> bool:
        with self._lock:
            faults = self.faults
            if faults.reset_next > 0 and (not faults.reset_operations or operation in faults.reset_operations):
                faults.reset_next -= 1
                return True
            return False

    def handle(self, operation: str, body: bytes) -> tuple[int, dict]:
        """Run one Rekognition operation; return the HTTP status and the JSON response."""
        with self._lock:
            self.operation_counts[operation] = self.operation_counts.get(operation, 0) + 1
            try:
                self._inject_faults(operation)
                request = _json_body(body)
                handler = getattr(self, f"_op_{operation}", None)
                if handler is None:
                    raise RekognitionError("UnknownOperationException",
                                           f"the emulator does not implement {operation}")
                return HTTPStatus.OK, handler(request)
            except RekognitionError as exc:
                logger.info("Rekognition %s -> %s: %s", operation, exc.error_type, exc)
                return exc.status, {"__type": exc.error_type, "Message": str(exc)}

    def _inject_faults(self, operation: str) -> None:
        faults = self.faults
        if faults.throttle_next > 0 and (not faults.throttle_operations or operation in faults.throttle_operations):
            faults.throttle_next -= 1
            # ThrottlingException is a server fault in the service model; the other is a client error.
            status = (HTTPStatus.INTERNAL_SERVER_ERROR if faults.throttle_type == "ThrottlingException"
                      else HTTPStatus.BAD_REQUEST)
            raise RekognitionError(faults.throttle_type, "Rate exceeded", status)
        if operation in faults.failing_operations:
            raise RekognitionError("InternalServerError", f"injected failure of {operation}",
                                   HTTPStatus.INTERNAL_SERVER_ERROR)

    def _next_number(self) -> int:
        self._sequence += 1
        return self._sequence

    def _arn(self, resource: str) -> str:
        return f"arn:aws:rekognition:{self.region}:{ACCOUNT_ID}:project/{resource}"

    def _project(self, arn: str) -> EmulatedProject:
        project = self._projects.get(arn)
        if project is None:
            raise RekognitionError("ResourceNotFoundException", f"project {arn} not found")
        return project

    def _dataset(self, arn: str) -> EmulatedDataset:
        dataset = self._datasets.get(arn)
        if dataset is None:
            raise RekognitionError("ResourceNotFoundException", f"dataset {arn} not found")
        return dataset

    def _version(self, arn: str) -> EmulatedVersion:
        version = self._versions.get(arn)
        if version is None:
            raise RekognitionError("ResourceNotFoundException", f"project version {arn} not found")
        return version

    # Projects -------------------------------------------------------------------------

    def _op_CreateProject(self, request: dict) -> dict:
        name = _required(request, "ProjectName")
        if any(project.name == name for project in self._projects.values()):
            raise RekognitionError("ResourceInUseException", f"a project named {name} exists already")
        arn = self._arn(f"{name}/{self._next_number()}")
        self._projects[arn] = EmulatedProject(arn, name, self._time())
        self._tags[arn] = dict(request.get("Tags") or {})
        return {"ProjectArn": arn}

    def _op_DescribeProjects(self, request: dict) -> dict:
        names = request.get("ProjectNames")
        descriptions = []
        for project in self._projects.values():
            if names and project.name not in names:
                continue
            datasets = [self._dataset_metadata(self._datasets[arn]) for arn in project.datasets.values()]
            descriptions.append({"ProjectArn": project.arn, "CreationTimestamp": project.created,
                                 "Status": "CREATED", "Datasets": datasets, "Feature": "CUSTOM_LABELS"})
        return {"ProjectDescriptions": descriptions}

    def _op_DeleteProject(self, request: dict) -> dict:
        project = self._project(_required(request, "ProjectArn"))
        if project.versions or project.datasets:
            raise RekognitionError("ResourceInUseException",
                                   f"project {project.arn} still has {len(project.versions)} versions and "
                                   f"{len(project.datasets)} datasets; delete them first")
        del self._projects[project.arn]
        self._tags.pop(project.arn, None)
        return {"Status": "DELETING"}

    # Datasets ---------------------------------------------------------------------------

    def _op_CreateDataset(self, request: dict) -> dict:
        project = self._project(_required(request, "ProjectArn"))
        dataset_type = _required(request, "DatasetType")
        if dataset_type not in ("TRAIN", "TEST"):
            raise RekognitionError("InvalidParameterException", f"invalid DatasetType {dataset_type!r}")
        if dataset_type in project.datasets:
            raise RekognitionError("ResourceAlreadyExistsException",
                                   f"project {project.arn} has a {dataset_type} dataset already")
        source = ((request.get("DatasetSource") or {}).get("GroundTruthManifest") or {}).get("S3Object") or {}
        if not source.get("Bucket") or not source.get("Name"):
            raise RekognitionError("InvalidParameterException",
                                   "DatasetSource.GroundTruthManifest.S3Object needs Bucket and Name "
                                   "(the emulator supports no empty datasets)")
        arn = f"{project.arn.rsplit('/', 1)[0]}/dataset/{dataset_type.lower()}/{self._next_number()}"
        dataset = EmulatedDataset(arn, project.arn, dataset_type, self._time(), polls_left=self.dataset_polls)
        self._load_manifest(dataset, source["Bucket"], source["Name"])
        self._datasets[arn] = dataset
        project.datasets[dataset_type] = arn
        self._tags[arn] = dict(request.get("Tags") or {})
        return {"DatasetArn": arn}

    def _load_manifest(self, dataset: EmulatedDataset, bucket: str, key: str) -> None:
        """Read a Ground Truth image-classification manifest and its images from S3."""
        try:
            text = _read_object(bucket, key).decode("utf-8")
        except (KeyError, UnicodeDecodeError) as exc:
            dataset.final_status = "CREATE_FAILED"
            dataset.status_message = f"the manifest s3://{bucket}/{key} cannot be read ({exc})"
            return
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = _manifest_entry(json.loads(line))
                source_bucket, source_key = _split_s3_uri(entry[0])
                histogram = image_histogram(_read_object(source_bucket, source_key))
            except (ValueError, KeyError, ImagePayloadError) as exc:
                logger.info("manifest s3://%s/%s line %d rejected: %s", bucket, key, number, exc)
                dataset.error_entries += 1
                continue
            dataset.entries.append(DatasetEntry(source_key, entry[1], histogram))
        if not dataset.entries:
            dataset.final_status = "CREATE_FAILED"
            dataset.status_message = f"the manifest s3://{bucket}/{key} has no valid entries"

    def _dataset_metadata(self, dataset: EmulatedDataset) -> dict:
        return {"CreationTimestamp": dataset.created, "DatasetType": dataset.dataset_type,
                "DatasetArn": dataset.arn, "Status": dataset.status,
                "StatusMessage": dataset.status_message or "The dataset is being created.",
                "StatusMessageCode": "CLIENT_ERROR" if dataset.status == "CREATE_FAILED" else "SUCCESS"}

    def _op_DescribeDataset(self, request: dict) -> dict:
        dataset = self._dataset(_required(request, "DatasetArn"))
        if dataset.status == "CREATE_IN_PROGRESS":
            dataset.polls_left -= 1
            if dataset.polls_left <= 0:
                dataset.status = dataset.final_status
                if not dataset.status_message:
                    dataset.status_message = "The dataset was created successfully."
        labels = {entry.label for entry in dataset.entries}
        description = {
            "CreationTimestamp": dataset.created, "LastUpdatedTimestamp": self._time(),
            "Status": dataset.status, "StatusMessage": dataset.status_message or "The dataset is being created.",
            "StatusMessageCode": "CLIENT_ERROR" if dataset.status == "CREATE_FAILED" else "SUCCESS",
            "DatasetStats": {"LabeledEntries": len(dataset.entries),
                             "TotalEntries": len(dataset.entries) + dataset.error_entries,
                             "TotalLabels": len(labels), "ErrorEntries": dataset.error_entries},
        }
        return {"DatasetDescription": description}

    def _op_DeleteDataset(self, request: dict) -> dict:
        dataset = self._dataset(_required(request, "DatasetArn"))
        project = self._projects.get(dataset.project_arn)
        if project is not None:
            project.datasets.pop(dataset.dataset_type, None)
        del self._datasets[dataset.arn]
        self._tags.pop(dataset.arn, None)
        return {}

    # Project versions ---------------------------------------------------------------------

    def _op_CreateProjectVersion(self, request: dict) -> dict:
        project = self._project(_required(request, "ProjectArn"))
        name = _required(request, "VersionName")
        output = _required(request, "OutputConfig")
        if name in project.versions:
            raise RekognitionError("ResourceInUseException", f"project {project.arn} has a version {name} already")
        for dataset_type in ("TRAIN", "TEST"):
            arn = project.datasets.get(dataset_type)
            if arn is None or self._datasets[arn].status != "CREATE_COMPLETE":
                raise RekognitionError("InvalidParameterException",
                                       f"project {project.arn} has no {dataset_type} dataset in CREATE_COMPLETE")
        arn = f"{project.arn.rsplit('/', 1)[0]}/version/{name}/{self._next_number()}"
        self._versions[arn] = EmulatedVersion(arn, project.arn, name, self._time(), dict(output),
                                              polls_left=self.training_polls,
                                              train_entries=list(self._datasets[project.datasets["TRAIN"]].entries),
                                              test_entries=list(self._datasets[project.datasets["TEST"]].entries))
        project.versions[name] = arn
        self._tags[arn] = dict(request.get("Tags") or {})
        return {"ProjectVersionArn": arn}

    def _advance(self, version: EmulatedVersion) -> None:
        """Move a version one poll closer to the end of its current transition."""
        if version.status not in ("TRAINING_IN_PROGRESS", "STARTING", "STOPPING"):
            return
        version.polls_left -= 1
        if version.polls_left > 0:
            return
        if version.status == "STARTING":
            version.status, version.status_message = "RUNNING", "The model is running."
        elif version.status == "STOPPING":
            version.status, version.status_message = "STOPPED", "The model is stopped."
        elif self.faults.fail_training:
            version.status = "TRAINING_FAILED"
            version.status_message = "The model training failed (injected by the emulator)."
        else:
            self._train(version)

    def _train(self, version: EmulatedVersion) -> None:
        train = version.train_entries
        by_label: dict[str, list[np.ndarray]] = {}
        for entry in train:
            by_label.setdefault(entry.label, []).append(entry.histogram)
        version.centroids = {label: np.mean(rows, axis=0) for label, rows in sorted(by_label.items())}
        test = version.test_entries
        version.f1_score = _macro_f1([(entry.label, _nearest(version.centroids, entry.histogram)) for entry in test])
        version.status = "TRAINING_COMPLETED"
        version.status_message = "The model is ready to run."
        version.billable_training_s = self.billable_training_s
        version.training_end = self._time()

    def _version_description(self, version: EmulatedVersion) -> dict:
        description = {"ProjectVersionArn": version.arn, "CreationTimestamp": version.created,
                       "Status": version.status, "StatusMessage": version.status_message,
                       "OutputConfig": version.output_config, "Feature": "CUSTOM_LABELS"}
        if version.min_inference_units is not None:
            description["MinInferenceUnits"] = version.min_inference_units
            description["MaxInferenceUnits"] = version.min_inference_units
        if version.billable_training_s is not None:
            description["BillableTrainingTimeInSeconds"] = version.billable_training_s
            description["TrainingEndTimestamp"] = version.training_end
        if version.f1_score is not None:
            description["EvaluationResult"] = {"F1Score": version.f1_score}
        return description

    def _op_DescribeProjectVersions(self, request: dict) -> dict:
        project = self._project(_required(request, "ProjectArn"))
        names = request.get("VersionNames")
        descriptions = []
        for name, arn in project.versions.items():
            if names and name not in names:
                continue
            version = self._versions[arn]
            self._advance(version)
            descriptions.append(self._version_description(version))
        return {"ProjectVersionDescriptions": descriptions}

    def _op_StartProjectVersion(self, request: dict) -> dict:
        version = self._version(_required(request, "ProjectVersionArn"))
        units = int(_required(request, "MinInferenceUnits"))
        if units < 1:
            raise RekognitionError("InvalidParameterException", f"invalid MinInferenceUnits {units}; use 1 or more")
        if version.status not in ("TRAINING_COMPLETED", "STOPPED"):
            raise RekognitionError("ResourceInUseException",
                                   f"project version {version.arn} is {version.status}; it can start only "
                                   "when TRAINING_COMPLETED or STOPPED")
        version.status, version.status_message = "STARTING", "The model is starting."
        version.polls_left = self.start_polls
        version.min_inference_units = units
        return {"Status": version.status}

    def _op_StopProjectVersion(self, request: dict) -> dict:
        version = self._version(_required(request, "ProjectVersionArn"))
        if version.status not in ("RUNNING", "STARTING"):
            raise RekognitionError("ResourceInUseException",
                                   f"project version {version.arn} is {version.status}; only a RUNNING or "
                                   "STARTING model can be stopped")
        version.status, version.status_message = "STOPPING", "The model is stopping."
        version.polls_left = self.stop_polls
        return {"Status": version.status}

    def _op_DeleteProjectVersion(self, request: dict) -> dict:
        version = self._version(_required(request, "ProjectVersionArn"))
        if version.status in BUSY_VERSION_STATES:
            raise RekognitionError("ResourceInUseException",
                                   f"project version {version.arn} is {version.status}; stop it before deleting it")
        project = self._projects.get(version.project_arn)
        if project is not None:
            project.versions.pop(version.name, None)
        del self._versions[version.arn]
        self._tags.pop(version.arn, None)
        # NOTE: the service reports DELETING and removes the version later; the emulator removes it at once.
        return {"Status": "DELETING"}

    def _op_ListTagsForResource(self, request: dict) -> dict:
        arn = _required(request, "ResourceArn")
        if arn not in self._tags:
            raise RekognitionError("ResourceNotFoundException", f"resource {arn} not found")
        return {"Tags": dict(self._tags[arn])}

    # Inference -------------------------------------------------------------------------------

    def _op_DetectCustomLabels(self, request: dict) -> dict:
        version = self._version(_required(request, "ProjectVersionArn"))
        if version.status != "RUNNING":
            raise RekognitionError("ResourceNotReadyException",
                                   f"project version {version.arn} is {version.status}, not RUNNING")
        encoded = (_required(request, "Image") or {}).get("Bytes")
        if not encoded:
            raise RekognitionError("InvalidParameterException", "Image.Bytes is missing (S3Object is not emulated)")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RekognitionError("InvalidParameterException", f"Image.Bytes is not base64 ({exc})") from exc
        if len(data) > MAX_IMAGE_BYTES:
            raise RekognitionError("ImageTooLargeException",
                                   f"the image has {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
        try:
            histogram = image_histogram(data)
        except ImagePayloadError as exc:
            raise RekognitionError("InvalidImageFormatException", str(exc)) from exc
        labels = list(version.centroids)
        distances = np.array([np.abs(version.centroids[label] - histogram).sum() for label in labels])
        weights = np.exp(-(distances - distances.min()) / CONFIDENCE_TEMPERATURE)
        confidences = 100.0 * weights / weights.sum()
        min_confidence = float(request.get("MinConfidence", 50.0))
        ranked = sorted(zip(labels, confidences), key=lambda pair: -pair[1])
        found = [{"Name": label, "Confidence": round(float(confidence), 4)}
                 for label, confidence in ranked if confidence >= min_confidence]
        if "MaxResults" in request:
            found = found[:int(request["MaxResults"])]
        return {"CustomLabels": found}


def _nearest(centroids: dict[str, np.ndarray], histogram: np.ndarray) -> str:
    return min(centroids, key=lambda label: float(np.abs(centroids[label] - histogram).sum()))


def _macro_f1(pairs: list[tuple[str, str]]) -> float:
    labels = sorted({truth for truth, _ in pairs} | {predicted for _, predicted in pairs})
    scores = []
    for label in labels:
        true_positive = sum(1 for truth, predicted in pairs if truth == label and predicted == label)
        predicted_count = sum(1 for _, predicted in pairs if predicted == label)
        actual_count = sum(1 for truth, _ in pairs if truth == label)
        total = predicted_count + actual_count
        scores.append(2 * true_positive / total if total else 0.0)
    return round(float(np.mean(scores)), 6) if scores else 0.0


def _manifest_entry(line: dict) -> tuple[str, str]:
    """Return (source-ref, class name) of a Ground Truth image-classification manifest line."""
    source = line["source-ref"]
    attributes = [key for key in line if key != "source-ref" and not key.endswith("-metadata")]
    if len(attributes) != 1:
        raise ValueError(f"expected one label attribute beside source-ref, found {attributes}")
    metadata = line[f"{attributes[0]}-metadata"]
    if metadata.get("type") != GROUND_TRUTH_TYPE:
        raise ValueError(f"metadata type {metadata.get('type')!r} is not {GROUND_TRUTH_TYPE}")
    if not isinstance(line[attributes[0]], int):
        raise ValueError(f"label attribute {attributes[0]} must be a class index, not {line[attributes[0]]!r}")
    return source, str(metadata["class-name"])


def _split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"invalid source-ref {uri!r}; use s3://BUCKET/KEY")
    return parts.netloc, unquote(parts.path.lstrip("/"))


def _s3_backend():
    from moto.s3.models import s3_backends

    return s3_backends[ACCOUNT_ID]["aws"]


def _read_object(bucket: str, key: str) -> bytes:
    """Return an object's bytes from moto's S3 store; raise KeyError when it is missing."""
    backend = _s3_backend()
    if bucket not in backend.buckets:
        raise KeyError(f"bucket {bucket} does not exist")
    stored = backend.buckets[bucket].keys.get(key)
    if stored is None:
        raise KeyError(f"object s3://{bucket}/{key} does not exist")
    return stored.value


def _required(request: dict, name: str):
    if name not in request:
        raise RekognitionError("InvalidParameterException", f"missing required parameter {name}")
    return request[name]


def _json_body(body: bytes) -> dict:
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise RekognitionError("SerializationException", f"the request body is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise RekognitionError("SerializationException", "the request body must be a JSON object")
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imgbench-aws-emulator"
    # Both paths (Rekognition JSON and moto's S3 app) write the headers and the
    # body separately. With Nagle's algorithm, the client's delayed ACK would
    # hold the body back by about 40 ms on every keep-alive response.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        target = self.headers.get("X-Amz-Target") or ""
        if target.startswith(TARGET_PREFIX):
            self._rekognition(target.removeprefix(TARGET_PREFIX), body)
        else:
            self._s3(body)

    def _rekognition(self, operation: str, body: bytes) -> None:
        emulator: RekognitionEmulator = self.server.emulator
        emulator.run_request_callback(operation)
        if emulator.should_reset(operation):
            logger.info("Rekognition %s: connection reset (injected)", operation)
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        status, answer = emulator.handle(operation, body)
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", JSON_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", f"{time.time_ns():x}")
        self.end_headers()
        self.wfile.write(data)

    def _s3(self, body: bytes) -> None:
        """Hand the request to moto's S3 app through a minimal WSGI call."""
        parts = urlsplit(self.path)
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": unquote(parts.path),
            "QUERY_STRING": parts.query, "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(self.server.server_address[1]), "SERVER_PROTOCOL": self.request_version,
            "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "RAW_URI": self.path, "REQUEST_URI": self.path,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[key] = value
        started: dict = {}

        def start_response(status: str, headers: list, exc_info=None):
            started["status"], started["headers"] = status, headers

        chunks = self.server.emulator.s3_app(environ, start_response)
        try:
            data = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        code, _, reason = started["status"].partition(" ")
        self.send_response(int(code), reason)
        for name, value in started["headers"]:
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the S3 and Rekognition Custom Labels emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8766, help="TCP port to listen on (0 picks a free one)")
    parser.add_argument("--training-polls", type=int, default=3,
                        help="DescribeProjectVersions polls before training ends")
    parser.add_argument("--fail-training", action="store_true", help="make every training end in TRAINING_FAILED")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    emulator = RekognitionEmulator(port=args.port, training_polls=args.training_polls)
    if args.fail_training:
        emulator.fail_training()
    with emulator:
        print(f"AWS emulator listening on {emulator.url}; press Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

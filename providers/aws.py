"""The AWS Rekognition Custom Labels provider, through boto3 and Amazon S3.

One case uploads its training and validation images under
``s3://<bucket>/<prefix>/<run prefix>/<case id>/`` and writes two SageMaker
Ground Truth image-classification manifests (JSON Lines). It creates a
project named ``<run prefix>-<case id>`` with a TRAIN dataset from the
training images and a TEST dataset from the validation images (the 2023
study gave Rekognition its 20% validation images as the test dataset), trains
one project version, starts it with ``inference_units`` inference units and
invokes ``DetectCustomLabels`` with ``MinConfidence=0``, taking the top label.
``teardown`` stops the model, waits for STOPPED, then deletes the version,
the datasets, the project and every object under the case's S3 prefix.
Project and version carry the tags ``imgbench-run`` and ``imgbench-case``.

Ledger ids: projects, datasets and versions (kind ``model``) are noted by
ARN, and the case's objects by ``s3://<bucket>/<case prefix>/``;
``find_leftovers`` names them the same way, so a sweep merges the two
sources. Before a create request, the project is noted by name and the
version by ``<project name>/<version name>``; the ARN entry replaces that
entry once the response arrives. A resumed case reuses a kept version (and
waits for one still in training); otherwise ``upload`` first deletes
whatever an earlier attempt of the case left.

Control-plane calls are retried on throttling, HTTP 5xx and dropped
connections through ``imgbench.retry`` and counted. ``invoke`` runs with
botocore's retries off, so every throttled invoke is counted by its error
code and never hidden in a latency.

Run modes: ``live`` takes credentials and region from boto3's usual chain.
``emulator`` sends both clients to the URL of ``--aws-url`` (see
``imgbench.emulators.aws``) with dummy credentials. ``replay`` uses dummy
credentials and a fixed region, reads no AWS configuration files, and takes
responses from a cassette.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import requests
from vcr.errors import CannotOverwriteExistingCassetteException

from imgbench.clock import Clock, RealClock, ReplayClock
from imgbench.errors import (
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    MissingCredentialsError,
    ProviderTimeoutError,
    QuotaError,
    ServiceFailureError,
    ThrottledError,
    TrainingFailedError,
)
from imgbench.images import CONVERSION_POLICY, ImageDecodeError, decode_rgb
from imgbench.labels import ClassLabels, safe_labels
from imgbench.recording import CassetteMissError, RecordingRules, cassette_miss_error
from imgbench.retry import (
    CONNECTION_RESET,
    SERVER_ERROR,
    THROTTLING,
    RetryCounter,
    RetryPolicy,
    TransientError,
    call_with_retries,
)
from providers.base import Leftover, Prediction, Provider, TrainingSet

logger = logging.getLogger(__name__)

RUN_MODES = ("replay", "emulator", "live")
BUCKET_ENV = "IMGBENCH_AWS_BUCKET"
PREFIX_ENV = "IMGBENCH_AWS_PREFIX"
REGION_ENV = "IMGBENCH_AWS_REGION"

# Region, bucket and credentials of replayed and emulated runs. They are no
# real account's, and the cassettes store placeholders in their place.
FIXED_REGION = "us-east-1"
EMULATOR_BUCKET = "imgbench-emulator-bucket"
DUMMY_ACCESS_KEY = "imgbench-dummy-access-key"
DUMMY_SECRET_KEY = "imgbench-dummy-secret-key"

RUN_TAG = "imgbench-run"
CASE_TAG = "imgbench-case"
LABEL_ATTRIBUTE = "class"
GROUND_TRUTH_TYPE = "groundtruth/image-classification"
# A fixed annotation date, so a case's manifests are byte-identical across
# runs and a replayed upload matches the recorded one.
ANNOTATION_DATE = "2023-01-01T00:00:00.000000"

# Placeholders that stand for per-run values in cassettes.
RUN_PREFIX_PLACEHOLDER = "<IMGBENCH_RUN_PREFIX>"
BUCKET_PLACEHOLDER = "<AWS_BUCKET>"
ACCOUNT_ID_PLACEHOLDER = "<AWS_ACCOUNT_ID>"

THROTTLING_CODES = frozenset({"ThrottlingException", "ProvisionedThroughputExceededException",
                              "Throttling", "SlowDown", "RequestLimitExceeded"})
AUTH_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
                        "InvalidSignatureException", "SignatureDoesNotMatch", "ExpiredTokenException",
                        "InvalidAccessKeyId"})
INVALID_INPUT_CODES = frozenset({"InvalidParameterException", "InvalidImageFormatException",
                                 "ImageTooLargeException", "InvalidS3ObjectException", "ValidationException"})
QUOTA_CODES = frozenset({"LimitExceededException", "ServiceQuotaExceededException"})
NOT_FOUND_CODES = frozenset({"ResourceNotFoundException", "NoSuchBucket", "NoSuchKey", "404"})

# NOTE: Rekognition Custom Labels documents 4.0 MB as the limit of image bytes
# sent to DetectCustomLabels; the 4096-pixel side limit is from its image
# guidelines and was not checked against the live service here.
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_SIDE = 4096

PAYLOAD_CACHE_SIZE = 4096
EMULATOR_POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class RekognitionOptions:
    """Settings of the Rekognition provider; times are in seconds."""

    bucket: str | None = None
    prefix: str = "imgbench"
    region: str | None = None
    # One endpoint for Rekognition and S3 (the emulator); None for AWS's own.
    endpoint_url: str | None = None
    inference_units: int = 1
    max_inference_units: int | None = None
    max_image_side: int = MAX_IMAGE_SIDE
    jpeg_quality: int = 90
    poll_interval_s: float = 60.0
    dataset_timeout_s: float = 3600.0
    training_timeout_s: float = 24 * 3600.0
    start_timeout_s: float = 3600.0
    stop_timeout_s: float = 1800.0
    # How long a sweep waits for a version in training, which Rekognition can
    # neither stop nor delete, before reporting it and moving on.
    sweep_training_wait_s: float = 180.0
    upload_workers: int = 8
    # Connections per client: at least the load test's concurrency.
    max_pool_connections: int = 10
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.inference_units < 1:
            raise ConfigError(f"invalid inference_units {self.inference_units}; use 1 or more")
        if self.max_inference_units is not None and self.max_inference_units < self.inference_units:
            raise ConfigError(f"invalid max_inference_units {self.max_inference_units}; use at least "
                              f"inference_units ({self.inference_units})")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"invalid jpeg_quality {self.jpeg_quality}; use 1 to 95")
        if self.max_pool_connections < 1 or self.upload_workers < 1:
            raise ConfigError("max_pool_connections and upload_workers must be 1 or more")
        if self.bucket is not None and not self.bucket:
            raise ConfigError(f"the S3 bucket name is empty; set --provider-option aws.bucket=NAME or {BUCKET_ENV}")


@dataclass
class RekognitionUpload:
    project_arn: str
    manifests: dict[str, str]  # dataset type -> S3 key
    dataset_arns: dict[str, str]
    image_count: int


@dataclass
class RekognitionModel:
    project_arn: str
    version_arn: str
    version_name: str
    status: str
    billable_training_s: int | None
    f1_score: float | None
    polls: int


@dataclass(frozen=True)
class RekognitionEndpoint:
    version_arn: str


class RekognitionProvider(Provider):
    name = "aws"
    description = "AWS Rekognition Custom Labels, through boto3 with images in Amazon S3"
    mode = "live"
    validates_internally = False
    extra = "aws"
    required_modules = ("boto3",)
    option_keys = ("bucket", "prefix", "region", "inference_units", "max_inference_units",
                   "sweep_training_wait_s")
    # NOTE: no list price is recorded because AWS's Rekognition pricing page
    # could not be opened from here; fill it in from
    # https://aws.amazon.com/rekognition/pricing/ (training per hour,
    # inference per hour per inference unit).
    price_model = None

    def __init__(self, options: RekognitionOptions | None = None, *, run_mode: str = "live",
                 run_id: str = "local", clock: Clock | None = None, credentials: tuple[str, str] | None = None):
        if run_mode not in RUN_MODES:
            raise ConfigError(f"invalid AWS run mode {run_mode!r}; valid modes: {', '.join(RUN_MODES)}")
        self.options = options or RekognitionOptions()
        self.run_mode = run_mode
        self.run_id = run_id
        self.run_prefix = f"imgbench-{run_id}"
        self.clock = clock or (ReplayClock() if run_mode == "replay" else RealClock())
        self._credentials = credentials
        self._clients: dict[str, Any] = {}
        self._client_lock = threading.Lock()
        self._retries = RetryCounter()
        self._invoke_errors = RetryCounter()
        self._random = random.Random()
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._payload_lock = threading.Lock()
        self._labels: ClassLabels | None = None
        self._region: str | None = None
        # Resources of this case, as far as they exist.
        self._project_name: str | None = None
        self._project_arn: str | None = None
        self._dataset_arns: dict[str, str] = {}
        # Dataset types whose CreateDataset request was sent but whose response has not come.
        self._unanswered_dataset_types: set[str] = set()
        self._version_name: str | None = None
        self._version_arn: str | None = None
        self._case_prefix: str | None = None

    @classmethod
    def from_config(cls, bench_config) -> "RekognitionProvider":
        run_mode = bench_config.provider_modes.get(cls.name, "replay")
        option = bench_config.provider_option
        bucket = option(cls.name, "bucket", env=BUCKET_ENV)
        region = option(cls.name, "region", env=REGION_ENV)
        endpoint_url = None
        poll_interval_s = 60.0
        if run_mode == "emulator":
            endpoint_url = bench_config.service_urls[cls.name].rstrip("/")
            bucket, region, poll_interval_s = bucket or EMULATOR_BUCKET, FIXED_REGION, EMULATOR_POLL_INTERVAL_S
        elif run_mode == "replay":
            bucket, region = bucket or EMULATOR_BUCKET, FIXED_REGION
        options = RekognitionOptions(
            bucket=bucket, prefix=option(cls.name, "prefix", env=PREFIX_ENV, default="imgbench"), region=region,
            endpoint_url=endpoint_url,
            inference_units=_int_option(option(cls.name, "inference_units", default="1"), "inference_units"),
            max_inference_units=_int_option(option(cls.name, "max_inference_units"), "max_inference_units"),
            poll_interval_s=poll_interval_s,
            max_pool_connections=max(10, bench_config.load.concurrency),
            sweep_training_wait_s=_seconds_option(option(cls.name, "sweep_training_wait_s", default="180"),
                                                  "sweep_training_wait_s"),
        )
        credentials = None if run_mode == "live" else (DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY)
        return cls(options, run_mode=run_mode, run_id=bench_config.run_id, credentials=credentials)

    # Description ------------------------------------------------------------------

    def settings(self) -> dict:
        return {
            "run_mode": self.run_mode,
            "api": "Rekognition 2016-06-27 (boto3), S3 path-style addressing",
            "region": self.options.region or "from the boto3 chain",
            "image_format": f"jpeg quality {self.options.jpeg_quality}",
            "image_policy": f"{CONVERSION_POLICY};longest-side<={self.options.max_image_side};"
                            f"bytes<={MAX_IMAGE_BYTES}",
            "test_dataset": "the validation images",
            "inference_units": self.options.inference_units,
            "max_inference_units": self.options.max_inference_units,
            "min_confidence": 0,
            "invoke_retries": "off (botocore total_max_attempts 1)",
            "max_pool_connections": self.options.max_pool_connections,
            "poll_interval_s": self.options.poll_interval_s,
            "training_timeout_s": self.options.training_timeout_s,
            "max_attempts": self.options.retry_policy.max_attempts,
        }

    def describe_model(self, model: RekognitionModel) -> dict:
        return {"project_version_arn": _scrub_account(model.version_arn), "status": model.status,
                "billable_training_s": model.billable_training_s, "f1_score": model.f1_score,
                "status_polls": model.polls,
                "label_map": self._labels.changed if self._labels else {}}

    def counters(self) -> dict[str, int]:
        counts = dict(self._retries.as_dict())
        for code, count in self._invoke_errors.as_dict().items():
            counts[f"invoke_{code}"] = count
        return counts

    def credentials_needed(self) -> bool:
        return False

    def check_ready(self) -> None:
        super().check_ready()
        if self.run_mode == "live" and not self.options.bucket:
            raise ConfigError(f"the AWS provider needs an S3 bucket you own; set --provider-option "
                              f"aws.bucket=NAME or {BUCKET_ENV}")
        if self.run_mode == "live" and self._session().get_credentials() is None:
            raise MissingCredentialsError("boto3 found no AWS credentials; configure them as for the AWS CLI "
                                          "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)")

    def recording_rules(self) -> RecordingRules:
        return RecordingRules(
            provider=self.name,
            # Rekognition and S3 share this base in cassettes; X-Amz-Target distinguishes them.
            base_url="https://amazonaws.com",
            match_on=("method", "path", "query", "amz_target", "body_digest"),
            kept_request_headers=frozenset({"content-type", "x-amz-target"}),
            base64_fields=frozenset({"Bytes"}),
            text_patterns=((r"(arn:aws[a-z-]*:[a-z0-9-]+:[a-z0-9-]*:)\d{12}(:)", rf"\g<1>{ACCOUNT_ID_PLACEHOLDER}\g<2>"),),
            sensitive_values={RUN_PREFIX_PLACEHOLDER: self.run_prefix, BUCKET_PLACEHOLDER: self.options.bucket},
        )

    # The provider contract ---------------------------------------------------------

    def upload(self, training_set: TrainingSet) -> RekognitionUpload:
        self._labels = safe_labels(training_set.classes, service="Rekognition Custom Labels",
                                   allowed=r"A-Za-z0-9_\-")
        self._case_prefix = f"{self.options.prefix.strip('/')}/{self.run_prefix}/{training_set.case_id}"
        if self.run_mode != "live":
            self._ensure_bucket()
        self._delete_earlier_attempt(training_set.case_id)
        self.note_created("s3_prefix", f"s3://{self.options.bucket}/{self._case_prefix}/",
                          bucket=self.options.bucket, prefix=f"{self._case_prefix}/")
        manifests = {}
        for dataset_type, role in (("TRAIN", "train"), ("TEST", "validation")):
            images = training_set.by_role(role)
            if not images:
                raise InvalidInputError(f"case {training_set.case_id} has no {role} images for the {dataset_type} "
                                        "dataset; Rekognition needs both, so use an ablation of at least 2 per class")
            manifests[dataset_type] = self._upload_images(images, training_set.classes, role)
        self._create_project(training_set.case_id)
        for dataset_type, key in manifests.items():
            self._create_dataset(dataset_type, key)
        for dataset_type, arn in self._dataset_arns.items():
            self._wait_dataset(dataset_type, arn)
        return RekognitionUpload(self._project_arn, manifests, dict(self._dataset_arns), len(training_set.images))

    def train(self, upload: RekognitionUpload) -> RekognitionModel:
        version_name = f"{self.run_prefix}-v1"
        self._version_name = version_name
        self.note_created("model", f"{self._project_name}/{version_name}", project_arn=upload.project_arn,
                          version_name=version_name)
        response = self._call("rekognition", "create_project_version", ProjectArn=upload.project_arn,
                              VersionName=version_name,
                              OutputConfig={"S3Bucket": self.options.bucket,
                                            "S3KeyPrefix": f"{self._case_prefix}/output"},
                              Tags=self._tags())
        self._version_arn = response["ProjectVersionArn"]
        self.note_created("model", self._version_arn, project_arn=upload.project_arn, version_name=version_name)
        # The ARN entry replaces the one noted before the request.
        self.note_deleted("model", f"{self._project_name}/{version_name}")
        logger.info("Rekognition project version %s created; training", version_name)
        description, polls = self._wait_version(("TRAINING_COMPLETED",), ("TRAINING_FAILED",),
                                                self.options.training_timeout_s, "training")
        return RekognitionModel(upload.project_arn, self._version_arn, version_name, description["Status"],
                                description.get("BillableTrainingTimeInSeconds"),
                                (description.get("EvaluationResult") or {}).get("F1Score"), polls)

    def deploy(self, model: RekognitionModel) -> RekognitionEndpoint:
        arguments = {"ProjectVersionArn": model.version_arn, "MinInferenceUnits": self.options.inference_units}
        if self.options.max_inference_units is not None:
            arguments["MaxInferenceUnits"] = self.options.max_inference_units
        self._call("rekognition", "start_project_version", **arguments)
        logger.info("Rekognition model %s starting with %d inference units", model.version_name,
                    self.options.inference_units)
        self._wait_version(("RUNNING",), ("FAILED",), self.options.start_timeout_s, "model start")
        return RekognitionEndpoint(model.version_arn)

    def invoke(self, endpoint: RekognitionEndpoint, image: bytes, session: requests.Session) -> Prediction:
        # ``session`` serves HTTP providers; boto3 keeps its own connection pool.
        from botocore.exceptions import ClientError

        payload = self._prepare(image, "test image")
        client = self._client("runtime")
        try:
            answer = client.detect_custom_labels(ProjectVersionArn=endpoint.version_arn, Image={"Bytes": payload},
                                                 MinConfidence=0)
        except CannotOverwriteExistingCassetteException as exc:
            raise cassette_miss_error(exc) from exc
        except ClientError as exc:
            code = _error_code(exc)
            self._invoke_errors.add(code)
            raise _mapped_error(exc, "DetectCustomLabels") from exc
        except Exception as exc:
            mapped = _connection_error(exc, "DetectCustomLabels")
            if mapped is None:
                raise
            if not isinstance(mapped, CassetteMissError):
                self._invoke_errors.add(type(exc).__name__)
            raise mapped from exc
        labels = answer.get("CustomLabels") or []
        if not labels:
            raise ServiceFailureError("Rekognition DetectCustomLabels returned no labels with MinConfidence=0")
        top = max(labels, key=lambda label: float(label.get("Confidence", 0)))
        name = str(top["Name"])
        return Prediction(label=self._labels.class_of(name) if self._labels else name,
                          confidence=float(top["Confidence"]) / 100.0)

    def teardown(self) -> None:
        """Stop the model, then delete the version, datasets, project and S3 objects, in that order.

        Every step runs even when an earlier one failed where the service
        allows it; the first error is raised at the end.
        """
        errors: list[Exception] = []
        if self.keep_model and self._version_arn is not None:
            self._keep_model(errors)
        else:
            self._run_step(errors, self._remove_version)
            self._run_step(errors, self._find_unanswered_datasets)
            for dataset_type in list(self._dataset_arns):
                self._run_step(errors, lambda dataset_type=dataset_type: self._delete_dataset(dataset_type))
            self._run_step(errors, self._delete_project)
            self._run_step(errors, self._delete_objects)
        if errors:
            raise errors[0]

    def reuse_model(self, training_set: TrainingSet, details: dict) -> RekognitionModel | None:
        """Return the version an earlier attempt of this case trained, once it can start; else None.

        A version still in training is waited for on the provider's clock,
        within ``training_timeout_s``. A running one is stopped first. Entries
        without a version (project, dataset, S3 objects) return None, and so
        does a version that failed or no longer exists. In that case
        ``upload`` deletes what the earlier attempt left.
        """
        project_arn, version_name = details.get("project_arn"), details.get("version_name")
        if not project_arn or not version_name:
            return None
        self._project_arn, self._version_name = project_arn, version_name
        self._project_name = _project_name_of(project_arn)
        description = self._describe_version(missing_ok=True)
        if description is not None:
            self._version_arn = description["ProjectVersionArn"]
            description = self._reusable_version(description)
        if description is None:
            self._project_arn = self._project_name = self._version_name = self._version_arn = None
            return None
        self._labels = safe_labels(training_set.classes, service="Rekognition Custom Labels",
                                   allowed=r"A-Za-z0-9_\-")
        self._case_prefix = f"{self.options.prefix.strip('/')}/{self.run_prefix}/{training_set.case_id}"
        found = self._call("rekognition", "describe_projects", ProjectNames=[self._project_name])
        for project in found.get("ProjectDescriptions") or []:
            for dataset in project.get("Datasets") or []:
                self._dataset_arns[dataset["DatasetType"]] = dataset["DatasetArn"]
        # Teardown deletes the reused resources unless this attempt is interrupted too.
        for entry in self.ledger.outstanding(self.name, training_set.case_id):
            if entry.state == "kept":
                self.ledger.note_state(self.name, entry.kind, entry.resource_id, "created")
        logger.info("reusing Rekognition model %s (%s)", version_name, description["Status"])
        return RekognitionModel(project_arn, self._version_arn, version_name, description["Status"],
                                description.get("BillableTrainingTimeInSeconds"),
                                (description.get("EvaluationResult") or {}).get("F1Score"), 0)

    def _reusable_version(self, description: dict) -> dict | None:
        """Bring an earlier attempt's version to TRAINING_COMPLETED or STOPPED; return None when it cannot be."""
        status = description.get("Status")
        if status == "TRAINING_IN_PROGRESS":
            logger.info("Rekognition model %s of an earlier attempt is still training; waiting for it (at most "
                        "%.0f s)", self._version_name, self.options.training_timeout_s)
            try:
                description, _ = self._wait_version(("TRAINING_COMPLETED",), ("TRAINING_FAILED",),
                                                    self.options.training_timeout_s, "training")
            except TrainingFailedError as exc:
                logger.warning("not reusing Rekognition model %s: %s", self._version_name, exc)
                return None
        elif status in ("RUNNING", "STARTING", "STOPPING"):
            description = self._stop_version()
        if description is None or description.get("Status") not in ("TRAINING_COMPLETED", "STOPPED"):
            logger.info("not reusing Rekognition model %s of an earlier attempt: it is %s", self._version_name,
                        None if description is None else description.get("Status"))
            return None
        return description

    # Leftovers -------------------------------------------------------------------------

    @classmethod
    def find_leftovers(cls, bench_config: Any, run_marker: str | None) -> list[Leftover]:
        """List the projects, datasets, versions and case S3 prefixes of run ``run_marker`` (any run when None).

        Ids are the ones the ledger uses: ARNs, and ``s3://<bucket>/<prefix>/<run prefix>/<case id>/``.
        """
        provider = cls.from_config(bench_config)
        run_prefix = f"imgbench-{run_marker}" if run_marker else None
        found = []
        for project in provider._paginate("rekognition", "describe_projects", "ProjectDescriptions"):
            arn = project["ProjectArn"]
            name = _project_name_of(arn)
            tags = provider._call("rekognition", "list_tags_for_resource", ResourceArn=arn,
                                  missing_ok=True).get("Tags") or {}
            run = tags.get(RUN_TAG)
            if run_prefix is not None:
                if run != run_prefix and not name.startswith(f"{run_prefix}-"):
                    continue
            elif not (name.startswith("imgbench-") or (run or "").startswith("imgbench-")):
                continue
            found.extend(provider._project_leftovers(project, run or name))
        if provider.options.bucket:
            found.extend(provider._object_leftovers(run_prefix))
        return found

    def _project_leftovers(self, project: dict, marker: str) -> list[Leftover]:
        """Return a project, its datasets and its versions as leftovers."""
        arn = project["ProjectArn"]
        name = _project_name_of(arn)
        found = [Leftover(self.name, "project", arn, marker, (("name", name),))]
        for dataset in project.get("Datasets") or []:
            found.append(Leftover(self.name, "dataset", dataset["DatasetArn"], marker,
                                  (("dataset_type", str(dataset.get("DatasetType"))), ("project", name))))
        for version in self._paginate("rekognition", "describe_project_versions", "ProjectVersionDescriptions",
                                      ProjectArn=arn):
            version_arn = version["ProjectVersionArn"]
            found.append(Leftover(self.name, "model", version_arn, marker,
                                  (("project_arn", arn), ("status", str(version.get("Status"))),
                                   ("version_name", _version_name_of(version_arn)))))
        return found

    def _object_leftovers(self, run_prefix: str | None) -> list[Leftover]:
        """Return the S3 objects of imgbench runs grouped by case prefix (by run prefix for loose objects)."""
        base = self.options.prefix.strip("/")
        keys = [item["Key"] for item in self._paginate("s3", "list_objects_v2", "Contents", Bucket=self.options.bucket,
                                                       Prefix=f"{base}/{run_prefix or 'imgbench-'}")]
        groups: dict[tuple[str, ...], int] = {}
        for key in keys:
            parts = key[len(base) + 1:].split("/")
            if run_prefix is not None and parts[0] != run_prefix:
                continue
            group = tuple(parts[:2]) if len(parts) >= 3 else tuple(parts[:1])
            groups[group] = groups.get(group, 0) + 1
        return [Leftover(self.name, "s3_prefix", f"s3://{self.options.bucket}/{base}/{'/'.join(group)}/", group[0],
                         (("objects", str(count)),))
                for group, count in sorted(groups.items())]

    @classmethod
    def delete_leftover(cls, bench_config: Any, leftover: Leftover) -> None:
        """Delete one project (with its versions and datasets), dataset, version or S3 prefix.

        A project or version may be named by ARN or, as noted before its
        create request, by name. A version in training is waited for at most
        ``sweep_training_wait_s``, because Rekognition can neither stop nor
        delete it, and then reported as still training.
        """
        provider = cls.from_config(bench_config)
        kind, resource_id = leftover.kind, leftover.resource_id
        if kind == "project":
            provider._sweep_project(resource_id, provider.options.sweep_training_wait_s)
        elif kind == "dataset":
            if not resource_id.startswith("arn:"):
                raise ConfigError(f"invalid dataset leftover {resource_id!r}: expected a Rekognition dataset ARN; "
                                  "nothing was deleted")
            provider._call("rekognition", "delete_dataset", DatasetArn=resource_id, missing_ok=True)
        elif kind == "model":
            provider._sweep_version(resource_id, dict(leftover.details).get("project_arn"))
        elif kind == "s3_prefix":
            bucket, _, prefix = resource_id.removeprefix("s3://").partition("/")
            parts = prefix.rstrip("/").split("/")
            if not bucket or not (parts[-1].startswith("imgbench-") or
                                  (len(parts) >= 2 and parts[-2].startswith("imgbench-"))):
                raise ConfigError(f"invalid leftover prefix s3://{bucket}/{prefix}: it must end in a run prefix "
                                  "that starts with 'imgbench-', or in a case folder under one; nothing was deleted")
            provider._delete_prefix(bucket, prefix.rstrip("/") + "/")
        else:
            raise ConfigError(f"unknown AWS leftover kind {kind!r}; valid kinds: dataset, model, project, s3_prefix")

    def _sweep_project(self, resource_id: str, training_wait_s: float | None) -> None:
        """Delete a project named by ARN or name, after its versions and datasets.

        ``training_wait_s`` bounds the wait for a version in training (None: ``training_timeout_s``).
        """
        name = _project_name_of(resource_id) if resource_id.startswith("arn:") else resource_id
        found = self._call("rekognition", "describe_projects", ProjectNames=[name])
        for project in found.get("ProjectDescriptions") or []:
            if resource_id.startswith("arn:") and project["ProjectArn"] != resource_id:
                continue
            self._project_arn, self._project_name = project["ProjectArn"], name
            for version in self._paginate("rekognition", "describe_project_versions", "ProjectVersionDescriptions",
                                          ProjectArn=self._project_arn):
                self._version_arn = version["ProjectVersionArn"]
                self._version_name = _version_name_of(self._version_arn)
                self._remove_version(training_wait_s)
            for dataset in project.get("Datasets") or []:
                self._dataset_arns[dataset["DatasetType"]] = dataset["DatasetArn"]
            for dataset_type in list(self._dataset_arns):
                self._delete_dataset(dataset_type)
            self._delete_project()

    def _sweep_version(self, resource_id: str, project_arn: str | None) -> None:
        """Delete a version named by ARN or by ``<project name>/<version name>``."""
        if resource_id.startswith("arn:"):
            project_name, version_name = _project_name_of(resource_id), _version_name_of(resource_id)
        else:
            project_name, _, version_name = resource_id.partition("/")
        if not project_arn:
            found = self._call("rekognition", "describe_projects", ProjectNames=[project_name])
            arns = [project["ProjectArn"] for project in found.get("ProjectDescriptions") or []]
            if not arns:
                return
            project_arn = arns[0]
        self._project_arn, self._project_name, self._version_name = project_arn, project_name, version_name
        description = self._describe_version(missing_ok=True)
        if description is None:
            return
        self._version_arn = description["ProjectVersionArn"]
        self._remove_version(self.options.sweep_training_wait_s)

    # Steps: upload ------------------------------------------------------------------------

    def _ensure_bucket(self) -> None:
        """Create the bucket in an emulated or replayed run; a live run uses a bucket the user owns."""
        from botocore.exceptions import ClientError

        try:
            self._call("s3", "head_bucket", Bucket=self.options.bucket)
        except ServiceFailureError as exc:
            cause = exc.__cause__
            if not isinstance(cause, ClientError) or _error_code(cause) not in NOT_FOUND_CODES:
                raise
            self._call("s3", "create_bucket", Bucket=self.options.bucket)

    def _upload_images(self, images: list, classes: tuple[str, ...], role: str) -> str:
        """Upload one role's images and its manifest; return the manifest's key."""
        def put(image) -> str:
            data = self._prepare(image.record.read_bytes(), str(image.record.path))
            key = f"{self._case_prefix}/{role}/{image.record.sha256}.jpg"
            self._call("s3", "put_object", Bucket=self.options.bucket, Key=key, Body=data, ContentType="image/jpeg")
            return key

        with concurrent.futures.ThreadPoolExecutor(self.options.upload_workers) as pool:
            keys = list(pool.map(put, images))
        lines = [manifest_line(f"s3://{self.options.bucket}/{key}", image.label, classes, self._labels)
                 for key, image in zip(keys, images)]
        manifest_key = f"{self._case_prefix}/manifests/{role}.manifest"
        self._call("s3", "put_object", Bucket=self.options.bucket, Key=manifest_key,
                   Body=("\n".join(lines) + "\n").encode("utf-8"), ContentType="application/jsonlines")
        logger.info("uploaded %d %s images and the manifest %s", len(images), role, manifest_key)
        return manifest_key

    def _create_project(self, case_id: str) -> None:
        self._project_name = f"{self.run_prefix}-{case_id}"
        self.note_created("project", self._project_name)
        response = self._call("rekognition", "create_project", ProjectName=self._project_name, Tags=self._tags())
        self._project_arn = response["ProjectArn"]
        self.note_created("project", self._project_arn, name=self._project_name)
        # The ARN entry replaces the one noted before the request.
        self.note_deleted("project", self._project_name)
        logger.info("Rekognition project %s created", self._project_name)

    def _create_dataset(self, dataset_type: str, manifest_key: str) -> None:
        self._unanswered_dataset_types.add(dataset_type)
        try:
            response = self._call("rekognition", "create_dataset", ProjectArn=self._project_arn,
                                  DatasetType=dataset_type,
                                  DatasetSource={"GroundTruthManifest": {"S3Object": {
                                      "Bucket": self.options.bucket, "Name": manifest_key}}},
                                  Tags=self._tags())
        except Exception:
            # An error response means the service created no dataset, so only an interrupt (a
            # KeyboardInterrupt, not an Exception) leaves the type for teardown to look up.
            # NOTE: a connection lost after the request was sent may still have created one. The sweep
            # command then deletes it with the project.
            self._unanswered_dataset_types.discard(dataset_type)
            raise
        self._dataset_arns[dataset_type] = response["DatasetArn"]
        self._unanswered_dataset_types.discard(dataset_type)
        self.note_created("dataset", response["DatasetArn"], project=self._project_name, dataset_type=dataset_type)

    def _wait_dataset(self, dataset_type: str, arn: str) -> None:
        deadline = self.clock.monotonic() + self.options.dataset_timeout_s
        while True:
            description = self._call("rekognition", "describe_dataset", DatasetArn=arn)["DatasetDescription"]
            status = description.get("Status")
            if status == "CREATE_COMPLETE":
                stats = description.get("DatasetStats") or {}
                if stats.get("ErrorEntries"):
                    logger.warning("Rekognition %s dataset has %s entries with errors", dataset_type,
                                   stats["ErrorEntries"])
                return
            if status == "CREATE_FAILED":
                raise InvalidInputError(f"Rekognition {dataset_type} dataset creation failed: "
                                        f"{description.get('StatusMessage')}; check the manifest and images")
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(f"Rekognition {dataset_type} dataset still {status} after "
                                           f"{self.options.dataset_timeout_s:.0f} s")
            self.clock.sleep(self.options.poll_interval_s)

    # Steps: versions -------------------------------------------------------------------------

    def _describe_version(self, missing_ok: bool = False) -> dict | None:
        response = self._call("rekognition", "describe_project_versions", ProjectArn=self._project_arn,
                              VersionNames=[self._version_name], missing_ok=missing_ok)
        descriptions = response.get("ProjectVersionDescriptions") or []
        return descriptions[0] if descriptions else None

    def _wait_version(self, targets: tuple[str, ...], failures: tuple[str, ...], timeout_s: float,
                      phase: str) -> tuple[dict, int]:
        """Poll the version until its status is one of ``targets``; return the description and the poll count."""
        started = self.clock.monotonic()
        polls = 0
        while True:
            description = self._describe_version()
            polls += 1
            if description is None:
                raise ServiceFailureError(f"Rekognition project version {self._version_name} vanished during {phase}")
            status = description.get("Status")
            if status in targets:
                logger.info("Rekognition %s of %s ended with %s after %d polls", phase, self._version_name,
                            status, polls)
                return description, polls
            if status in failures:
                message = f"Rekognition {phase} of {self._version_name} ended with {status}: " \
                          f"{description.get('StatusMessage')}"
                raise TrainingFailedError(message) if phase == "training" else ServiceFailureError(message)
            elapsed = self.clock.monotonic() - started
            if elapsed >= timeout_s:
                raise ProviderTimeoutError(f"Rekognition {phase} of {self._version_name} still {status} after "
                                           f"{timeout_s:.0f} s; raise its timeout or check the AWS console")
            logger.info("Rekognition %s of %s: %s after %.0f s (poll %d)", phase, self._version_name, status,
                        elapsed, polls)
            self.clock.sleep(self.options.poll_interval_s)

    def _stop_version(self) -> dict | None:
        """Stop the model when it runs or starts, and wait until it is no longer billed; return its description."""
        description = self._describe_version()
        if description is None:
            return None
        status = description.get("Status")
        if status in ("RUNNING", "STARTING"):
            self._call("rekognition", "stop_project_version", ProjectVersionArn=self._version_arn)
            logger.info("Rekognition model %s stopping", self._version_name)
            status = "STOPPING"
        if status == "STOPPING":
            description, _ = self._wait_version(("STOPPED",), ("FAILED",), self.options.stop_timeout_s, "model stop")
        return description

    def _remove_version(self, training_wait_s: float | None = None) -> None:
        """Stop and delete the version, waiting for a training one to end (``training_timeout_s`` by default)."""
        if self._version_arn is None:
            if self._version_name is None or self._project_arn is None:
                return
            # The create request was sent but its response never came: look the version up by name.
            found = self._describe_version(missing_ok=True)
            if found is None:
                self.note_deleted("model", f"{self._project_name}/{self._version_name}")
                return
            self._version_arn = found["ProjectVersionArn"]
        description = self._stop_version()
        if description is not None and description.get("Status") == "TRAINING_IN_PROGRESS":
            self._wait_training_end(training_wait_s)
        if description is not None:
            self._call("rekognition", "delete_project_version", ProjectVersionArn=self._version_arn,
                       missing_ok=True)
            logger.info("Rekognition project version %s deleted", self._version_name)
        self.note_deleted("model", self._version_arn)
        self.note_deleted("model", f"{self._project_name}/{self._version_name}")
        self._version_arn = None

    def _wait_training_end(self, wait_s: float | None) -> None:
        """Wait for training to end, because a version in training can be neither stopped nor deleted."""
        sweeping = wait_s is not None
        wait_s = self.options.training_timeout_s if wait_s is None else wait_s
        logger.warning("Rekognition project version %s is still training; waiting for it to end (at most %.0f s) "
                       "before deleting it", self._version_name, wait_s)
        try:
            self._wait_version(("TRAINING_COMPLETED", "TRAINING_FAILED"), (), wait_s, "training before deletion")
        except ProviderTimeoutError as exc:
            if not sweeping:
                raise
            raise ProviderTimeoutError(
                f"Rekognition project version {self._version_arn} is still training after {wait_s:.0f} s; "
                "Rekognition cannot stop or delete a version in training, so sweep again later (or raise "
                "--provider-option aws.sweep_training_wait_s)") from exc

    def _keep_model(self, errors: list[Exception]) -> None:
        """Stop the model but keep project, datasets, version and objects for a resumed run."""
        self._run_step(errors, self._stop_version)
        self.note_kept("model", self._version_arn, project_arn=self._project_arn, version_name=self._version_name)
        for kind, resource_id in (("project", self._project_arn),
                                  ("s3_prefix", f"s3://{self.options.bucket}/{self._case_prefix}/"),
                                  *(("dataset", arn) for arn in self._dataset_arns.values())):
            self.note_kept(kind, resource_id)
        logger.info("Rekognition model %s stopped (or left training) and kept for a resumed run", self._version_name)

    def _delete_earlier_attempt(self, case_id: str) -> None:
        """Delete the project, datasets, versions and S3 objects an earlier attempt of this case left.

        Runs only when the ledger lists outstanding entries of the case, so a
        fresh run sends no extra requests (and replays its cassette as
        recorded).
        """
        earlier = self.ledger.outstanding(self.name, case_id)
        if not earlier:
            return
        logger.info("deleting what an earlier attempt of case %s left (%d ledger entries)", case_id, len(earlier))
        self._sweep_project(f"{self.run_prefix}-{case_id}", None)
        self._project_arn = self._project_name = self._version_arn = self._version_name = None
        self._delete_prefix(self.options.bucket, f"{self._case_prefix}/")
        for entry in earlier:
            self.note_deleted(entry.kind, entry.resource_id)

    # Steps: deletion ---------------------------------------------------------------------------

    def _find_unanswered_datasets(self) -> None:
        """Look up the datasets whose create request was sent but whose response never came.

        An interrupt during CreateDataset leaves a dataset the provider has no
        ARN for, and the project cannot be deleted while it exists.
        """
        if not self._unanswered_dataset_types or self._project_arn is None:
            return
        found = self._call("rekognition", "describe_projects", ProjectNames=[self._project_name])
        for project in found.get("ProjectDescriptions") or []:
            for dataset in project.get("Datasets") or []:
                if dataset["DatasetType"] in self._unanswered_dataset_types:
                    self._dataset_arns[dataset["DatasetType"]] = dataset["DatasetArn"]
        self._unanswered_dataset_types.clear()

    def _delete_dataset(self, dataset_type: str) -> None:
        arn = self._dataset_arns[dataset_type]
        self._call("rekognition", "delete_dataset", DatasetArn=arn, missing_ok=True)
        self.note_deleted("dataset", arn)
        del self._dataset_arns[dataset_type]

    def _delete_project(self) -> None:
        if self._project_arn is None:
            if self._project_name is not None:
                # The create request was sent but its response never came: look the project up by name.
                found = self._call("rekognition", "describe_projects", ProjectNames=[self._project_name])
                for description in found.get("ProjectDescriptions") or []:
                    self._project_arn = description["ProjectArn"]
            if self._project_arn is None:
                if self._project_name is not None:
                    self.note_deleted("project", self._project_name)
                return
        self._call("rekognition", "delete_project", ProjectArn=self._project_arn, missing_ok=True)
        self.note_deleted("project", self._project_arn)
        if self._project_name is not None:
            self.note_deleted("project", self._project_name)
        logger.info("Rekognition project %s deleted", self._project_name)
        self._project_arn = None

    def _delete_objects(self) -> None:
        if self._case_prefix is None:
            return
        self._delete_prefix(self.options.bucket, f"{self._case_prefix}/")
        self.note_deleted("s3_prefix", f"s3://{self.options.bucket}/{self._case_prefix}/")
        self._case_prefix = None

    def _delete_prefix(self, bucket: str, prefix: str) -> int:
        keys = [item["Key"] for item in self._paginate("s3", "list_objects_v2", "Contents", Bucket=bucket,
                                                       Prefix=prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            response = self._call("s3", "delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise ServiceFailureError(f"S3 could not delete {len(response['Errors'])} objects under {prefix}; "
                                          f"first: {first.get('Key')}: {first.get('Code')} {first.get('Message')}")
        logger.info("deleted %d S3 objects under the case prefix", len(keys))
        return len(keys)

    def _run_step(self, errors: list[Exception], step: Callable[[], Any]) -> None:
        try:
            step()
        except CannotOverwriteExistingCassetteException as exc:
            errors.append(cassette_miss_error(exc))
        except Exception as exc:  # collected and re-raised after the later steps ran
            logger.error("teardown step %s failed: %s", getattr(step, "__name__", "step"), exc)
            errors.append(exc)

    # Images ---------------------------------------------------------------------------------------

    def _prepare(self, data: bytes, label: str) -> bytes:
        """Return ``data`` as JPEG: decoded with ``decode_rgb``, longest side at most the limit."""
        key = hashlib.sha256(data).hexdigest()
        with self._payload_lock:
            cached = self._payloads.get(key)
            if cached is not None:
                self._payloads.move_to_end(key)
                return cached
        try:
            image = decode_rgb(data, label)
        except ImageDecodeError as exc:
            raise InvalidInputError(str(exc)) from exc
        limit = self.options.max_image_side
        if max(image.size) > limit:
            scale = limit / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.options.jpeg_quality)
        payload = buffer.getvalue()
        if len(payload) > MAX_IMAGE_BYTES:
            raise InvalidInputError(f"{label}: {len(payload)} bytes as JPEG exceeds Rekognition's "
                                    f"{MAX_IMAGE_BYTES}-byte limit; lower max_image_side")
        with self._payload_lock:
            self._payloads[key] = payload
            if len(self._payloads) > PAYLOAD_CACHE_SIZE:
                self._payloads.popitem(last=False)
        return payload

    # boto3 ---------------------------------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        return {RUN_TAG: self.run_prefix, CASE_TAG: self.case_id or "none"}

    def _session(self):
        import boto3
        import botocore.session

        core = botocore.session.Session()
        if self.run_mode != "live":
            # No AWS configuration file is read: replays and emulated runs must not depend on ~/.aws.
            core.set_config_variable("config_file", os.devnull)
            core.set_config_variable("credentials_file", os.devnull)
        access_key, secret_key = self._credentials or (None, None)
        return boto3.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                             region_name=self.options.region, botocore_session=core)

    def _client(self, kind: str):
        """Return the "s3", "rekognition" (control plane, retried here) or "runtime" (invoke) client."""
        with self._client_lock:
            client = self._clients.get(kind)
            if client is not None:
                return client
            from botocore.config import Config

            session = self._session()
            self._region = session.region_name
            if not self._region:
                raise ConfigError("no AWS region is set; set --provider-option aws.region=REGION, "
                                  f"{REGION_ENV} or AWS_DEFAULT_REGION")
            config = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=self.options.max_pool_connections,
                s3={"addressing_style": "path"},
                # Whole-body checksums only where S3 requires them, so bodies stay plain bytes.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=10, read_timeout=60,
            )
            service = "s3" if kind == "s3" else "rekognition"
            client = session.client(service, region_name=self._region, endpoint_url=self.options.endpoint_url,
                                    config=config)
            self._clients[kind] = client
            return client

    def _call(self, kind: str, operation: str, *, missing_ok: bool = False, **arguments) -> dict:
        """Run one control-plane call with bounded retries of transient errors, mapping the rest."""
        from botocore.exceptions import ClientError

        method = getattr(self._client(kind), operation)
        label = f"{'S3' if kind == 's3' else 'Rekognition'} {operation}"

        def attempt() -> dict:
            try:
                return method(**arguments)
            except CannotOverwriteExistingCassetteException as exc:
                raise cassette_miss_error(exc) from exc
            except ClientError as exc:
                code = _error_code(exc)
                if missing_ok and code in NOT_FOUND_CODES:
                    return {}
                if code in THROTTLING_CODES:
                    raise TransientError(THROTTLING, f"{label} throttled ({code})") from exc
                if code in ("InternalServerError", "InternalError", "ServiceUnavailable") or _status(exc) >= 500:
                    raise TransientError(SERVER_ERROR, f"{label} failed with {code}") from exc
                raise _mapped_error(exc, label) from exc
            except Exception as exc:
                mapped = _connection_error(exc, label)
                if mapped is None:
                    raise
                if isinstance(mapped, (ProviderTimeoutError, CassetteMissError, MissingCredentialsError)):
                    raise mapped from exc
                raise TransientError(CONNECTION_RESET, f"{label}: {exc}") from exc

        return call_with_retries(attempt, operation=label, policy=self.options.retry_policy, counter=self._retries,
                                 clock=self.clock, rng=self._random, give_up=_give_up)

    def _paginate(self, kind: str, operation: str, items: str, **arguments) -> list[dict]:
        """Collect ``items`` over every page of a listing call; bounded to 100 pages."""
        collected: list[dict] = []
        token_in = "ContinuationToken" if kind == "s3" else "NextToken"
        token_out = "NextContinuationToken" if kind == "s3" else "NextToken"
        for _ in range(100):
            response = self._call(kind, operation, **arguments)
            collected.extend(response.get(items) or [])
            token = response.get(token_out)
            if not token:
                return collected
            arguments[token_in] = token
        raise ServiceFailureError(f"{operation} returned more than 100 pages; narrow the prefix")


def manifest_line(source_ref: str, class_name: str, classes: tuple[str, ...], labels: ClassLabels) -> str:
    """Return one SageMaker Ground Truth image-classification manifest line (JSON, no newline)."""
    line = {
        "source-ref": source_ref,
        LABEL_ATTRIBUTE: classes.index(class_name),
        f"{LABEL_ATTRIBUTE}-metadata": {
            "confidence": 1,
            "job-name": "labeling-job/imgbench",
            "class-name": labels.label_of(class_name),
            "human-annotated": "yes",
            "creation-date": ANNOTATION_DATE,
            "type": GROUND_TRUTH_TYPE,
        },
    }
    return json.dumps(line, separators=(",", ":"))


def _int_option(value: str | None, key: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"invalid aws.{key} {value!r}; use a whole number such as 1") from None


def _seconds_option(value: str, key: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"invalid aws.{key} {value!r}; use a number of seconds such as 180") from None
    if seconds < 0:
        raise ConfigError(f"invalid aws.{key} {value!r}; use 0 or more seconds")
    return seconds


def _project_name_of(arn: str) -> str:
    """Return the project name in a project, dataset or version ARN (``...:project/<name>/...``)."""
    return arn.split(":project/", 1)[-1].split("/", 1)[0]


def _version_name_of(arn: str) -> str:
    """Return the version name in a version ARN (``...:project/<name>/version/<version>/<stamp>``)."""
    return arn.split("/version/", 1)[-1].split("/", 1)[0]


def _error_code(exc) -> str:
    return str((exc.response.get("Error") or {}).get("Code") or "Unknown")


def _status(exc) -> int:
    return int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)


def _scrub_account(arn: str) -> str:
    parts = arn.split(":")
    if len(parts) > 4 and parts[4].isdigit():
        parts[4] = ACCOUNT_ID_PLACEHOLDER
    return ":".join(parts)


def _mapped_error(exc, label: str) -> Exception:
    code = _error_code(exc)
    message = (exc.response.get("Error") or {}).get("Message") or str(exc)
    detail = f"{label} failed with {code} (HTTP {_status(exc)}): {message[:200]}"
    if code in THROTTLING_CODES:
        return ThrottledError(f"{detail}; lower --load-concurrency or start more inference units")
    if code in AUTH_CODES:
        return AuthenticationError(f"{detail}; check the AWS credentials and their IAM permissions")
    if code in QUOTA_CODES:
        return QuotaError(f"{detail}; raise the account's Rekognition quota or delete unused resources")
    if code in INVALID_INPUT_CODES:
        return InvalidInputError(detail)
    return ServiceFailureError(detail)


def _connection_error(exc: Exception, label: str) -> Exception | None:
    """Map botocore's connection errors; return None for anything else."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, NoCredentialsError, ReadTimeoutError

    if isinstance(exc, NoCredentialsError):
        return MissingCredentialsError(f"{label}: boto3 found no AWS credentials; configure them as for the AWS CLI")
    if isinstance(exc, ReadTimeoutError):
        return ProviderTimeoutError(f"{label} timed out: {exc}")
    if isinstance(exc, HTTPClientError) and isinstance(exc.kwargs.get("error"), CannotOverwriteExistingCassetteException):
        # botocore wraps every exception of its HTTP layer, vcrpy's replay miss included.
        return cassette_miss_error(exc.kwargs["error"])
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return ServiceFailureError(f"{label} lost its connection: {exc}")
    return None


def _give_up(exc: TransientError) -> Exception:
    if exc.kind == THROTTLING:
        return ThrottledError(f"{exc}; still throttled after the retry budget: wait or raise the account's limits")
    return ServiceFailureError(f"{exc}; still failing after the retry budget")

"""The Hugging Face provider: AutoTrain training in a Hugging Face Job, serving on an Inference Endpoint.

One case creates, all named with the run prefix ``imgbench-<run id>``:

* a private dataset repository ``<namespace>/<prefix>-<case id>-data`` in the
  image-folder layout ``train|validation/<label>/<sha256>.jpg``, uploaded in
  one commit through the Hub's commit API;
* a Hugging Face Job that runs AutoTrain's published container
  (autotrain-advanced brings its own environment, so it is never installed
  beside the suite) with a generated AutoTrain configuration, and pushes the
  model repository ``<namespace>/<prefix>-<case id>``;
* an Inference Endpoint ``imgbench-<hash>`` with a fixed replica count
  (min = max, no scale-to-zero) that serves the model. Endpoint names are
  limited to 32 characters, so the name carries a hash of the run prefix and
  case id, and the endpoint is tied to its run through its model repository.

``deploy`` waits until the endpoint reports ``running`` and then until it
returns a prediction for a probe image: HTTP 503 while the replica starts is waited out,
counted and recorded as start-up time, never as a prediction. ``invoke``
sends the raw image bytes; the top label is the prediction. ``teardown``
deletes the endpoint, cancels an unfinished job and deletes both
repositories, also after a failure at any step. With ``keep_model`` set (an
interrupted run) it keeps a trained model repository but still cancels a job
that has not finished, because a running job bills by the hour; a resumed
run then trains again.

The token comes from ``HF_TOKEN``, else from the Hub's token file (live
runs only). It is sent only to the Hub, the
Inference Endpoints API and the endpoint URL, all run by Hugging Face, and
the job receives it as a secret so AutoTrain can read the dataset and push
the model.

Run modes: ``live`` uses https://huggingface.co and
https://api.endpoints.huggingface.cloud. ``emulator`` sends everything to
``--huggingface-url`` (see ``imgbench.emulators.huggingface``). ``replay``
takes responses from a cassette and waits on a virtual clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import threading
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import httpx2
import requests
import yaml
from vcr.errors import CannotOverwriteExistingCassetteException

# Xet uploads go through a native client that bypasses Python's HTTP
# libraries, so cassettes could not record them. huggingface_hub reads the
# variable when it is first imported, so the constant is set as well below.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from huggingface_hub import CommitOperationAdd, HfApi, get_token  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

hub_constants.HF_HUB_DISABLE_XET = True

from imgbench.clock import Clock, RealClock, ReplayClock  # noqa: E402
from imgbench.emulators.huggingface import DEFAULT_TOKEN  # noqa: E402
from imgbench.errors import (  # noqa: E402
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    ProviderError,
    ProviderTimeoutError,
    QuotaError,
    ServiceFailureError,
    TrainingFailedError,
)
from imgbench.images import CONVERSION_POLICY, ImageDecodeError, decode_rgb  # noqa: E402
from imgbench.labels import ClassLabels, safe_labels  # noqa: E402
from imgbench.recording import SECRET_FIELDS, RecordingRules, cassette_miss_error  # noqa: E402
from imgbench.retry import (  # noqa: E402
    CONNECTION_RESET,
    SERVER_ERROR,
    THROTTLING,
    RetryCounter,
    RetryPolicy,
    TransientError,
    call_with_retries,
)
from providers.base import Leftover, Prediction, PriceModel, Provider, TrainingSet  # noqa: E402

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_HUB_URL = "https://huggingface.co"
DEFAULT_ENDPOINTS_API_URL = "https://api.endpoints.huggingface.cloud/v2"
TOKEN_ENV = "HF_TOKEN"
NAMESPACE_ENV = "IMGBENCH_HF_NAMESPACE"
RUN_MODES = ("replay", "emulator", "live")
RUN_PREFIX_ROOT = "imgbench-"

# AutoTrain's published container and its command-line entry point.
# NOTE: the image tag follows AutoTrain's documentation; no live job has run it.
AUTOTRAIN_IMAGE = "huggingface/autotrain-advanced:latest"
AUTOTRAIN_COMMAND = ["bash", "-c", 'printf "%s" "$AUTOTRAIN_CONFIG" > /tmp/imgbench-autotrain.yml '
                                   "&& autotrain --config /tmp/imgbench-autotrain.yml"]

JOB_RUNNING_STAGES = ("SCHEDULING", "RUNNING")
# Ledger detail of a job cancelled at teardown, interrupted runs included.
JOB_CANCELLED_NOTE = "cancelled before training finished; not kept, so a resumed run trains again"
ENDPOINT_STARTING_STATES = ("pending", "initializing", "updating")
ENDPOINT_FAILED_STATES = ("failed", "updateFailed")

# Placeholders that stand for per-run values in cassettes.
RUN_PREFIX_PLACEHOLDER = "<IMGBENCH_RUN_PREFIX>"
NAMESPACE_PLACEHOLDER = "<HF_NAMESPACE>"
TOKEN_PLACEHOLDER = "<HF_TOKEN>"
ENDPOINT_NAME_PLACEHOLDER = "<HF_ENDPOINT_NAME>"
ENDPOINT_HOST_PLACEHOLDER = "<HF_ENDPOINT_HOST>"
HUB_URL_PLACEHOLDER = "<HF_HUB_URL>"
ACCOUNT_ID_PLACEHOLDER = "<HF_ACCOUNT_ID>"
# Jobs responses name the account that owns and started a job by its id
# (huggingface_hub 2.x JobOwner and JobInitiator). Stored bodies are canonical
# JSON with sorted keys, so "id" comes first in these objects.
# NOTE: no live response was recorded. An account field elsewhere in a live
# response is hidden only where it equals whoami's "id" or the namespace.
ACCOUNT_ID_PATTERNS = ((r'"(owner|initiator)":\{"id":"[^"]*"', rf'"\1":{{"id":"{ACCOUNT_ID_PLACEHOLDER}"'),)
# Values a replay runs with. A replay restores the cassette's placeholders to these.
REPLAY_NAMESPACE = "replay-user"
REPLAY_TOKEN = "hf_replayToken"
REPLAY_ENDPOINT_HOST = "https://imgbench-replay.endpoints.huggingface.cloud"

# The account profile that whoami returns. A cassette keeps only the fields
# below, because the rest identify the account: "id", "fullname", "email",
# "avatarUrl", billing fields, "orgs" (names, ids, emails) and the token's
# "displayName" and dates. Field names follow huggingface.js's ApiWhoAmI types
# and huggingface_hub 2.x, which reads "name", "orgs[].name" and
# "auth.accessToken.displayName"/"role" of this response.
WHOAMI_PATH = "/api/whoami-v2"
WHOAMI_KEPT_FIELDS = ("type", "error")
WHOAMI_KEPT_AUTH_FIELDS = ("type",)
WHOAMI_KEPT_TOKEN_FIELDS = ("role",)

# JSON fields that hold secrets or file contents in Hub, Jobs and Endpoints requests.
HUGGINGFACE_SECRET_FIELDS = SECRET_FIELDS | {"secrets", "hf_token"}
HUGGINGFACE_DIGEST_FIELDS = frozenset({"content", "sample"})

# Poll interval against an emulator, which finishes after a few reads.
EMULATOR_POLL_INTERVAL_S = 0.05

# List prices of the default hardware. Training: a Job on "t4-small"; serving:
# an aws intel-spr x2 CPU endpoint (one replica). Both are billed per minute.
PRICE_MODEL = PriceModel(
    currency="USD",
    training_per_hour=0.40,
    endpoint_per_hour=0.067,
    per_1000_requests=None,
    storage_per_gb_month=None,
    source="https://huggingface.co/docs/hub/jobs-pricing; "
           "https://huggingface.co/docs/inference-endpoints/support/pricing",
    retrieved="2026-12-04",
    notes="training: Jobs flavor t4-small; endpoint: aws intel-spr x2 per replica; other hardware options "
          "have other prices; private repository storage is not billed per case",
)


@dataclass(frozen=True)
class HuggingFaceOptions:
    """Settings of the Hugging Face provider; times are in seconds."""

    hub_url: str = DEFAULT_HUB_URL
    endpoints_api_url: str = DEFAULT_ENDPOINTS_API_URL
    # None: the token owner's user name (whoami).
    namespace: str | None = None
    # AutoTrain's image-classification defaults (autotrain-advanced 0.8 ImageClassificationParams).
    base_model: str = "google/vit-base-patch16-224"
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 8
    training_backend: str = "job"
    job_flavor: str = "t4-small"
    autotrain_image: str = AUTOTRAIN_IMAGE
    # Endpoint hardware; see PRICE_MODEL for the price of the default.
    vendor: str = "aws"
    region: str = "us-east-1"
    accelerator: str = "cpu"
    instance_type: str = "intel-spr"
    instance_size: str = "x2"
    replicas: int = 1
    jpeg_quality: int = 95
    max_image_side: int = 1024
    request_timeout_s: float = 60.0
    poll_interval_s: float = 15.0
    training_timeout_s: float = 4 * 3600.0
    deployment_timeout_s: float = 3600.0
    # Attempts of one invoke that hits a connection reset or a 5xx, the first included.
    invoke_attempts: int = 3

    def __post_init__(self) -> None:
        if self.training_backend != "job":
            raise ConfigError(f"invalid huggingface training_backend {self.training_backend!r}; "
                              "the only backend is 'job' (AutoTrain in a Hugging Face Job)")
        if self.replicas < 1:
            raise ConfigError(f"invalid huggingface replicas {self.replicas}; use 1 or more "
                              "(scale-to-zero is never used while measuring)")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ConfigError(f"invalid AutoTrain hyper-parameters epochs={self.epochs} "
                              f"batch_size={self.batch_size} learning_rate={self.learning_rate}; "
                              "use positive values")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"invalid jpeg_quality {self.jpeg_quality}; use 1 to 95")
        if self.invoke_attempts < 1:
            raise ConfigError(f"invalid invoke_attempts {self.invoke_attempts}; use 1 or more")


@dataclass
class HuggingFaceUpload:
    dataset_repo: str
    labels: ClassLabels
    image_count: int
    probe_image: bytes


@dataclass
class HuggingFaceModel:
    model_repo: str
    labels: ClassLabels
    job_id: str | None
    job_stage: str
    status_reads: int
    probe_image: bytes
    reused: bool = False


@dataclass(frozen=True)
class HuggingFaceEndpoint:
    name: str
    url: str
    labels: ClassLabels


class HuggingFaceProvider(Provider):
    name = "huggingface"
    description = "Hugging Face AutoTrain (in a Hugging Face Job) with an Inference Endpoint"
    mode = "live"
    validates_internally = False
    credential_env = (TOKEN_ENV,)
    extra = "huggingface"
    required_modules = ("huggingface_hub", "yaml")
    option_keys = ("namespace", "base_model", "epochs", "learning_rate", "batch_size", "training_backend",
                   "job_flavor", "autotrain_image", "vendor", "region", "accelerator", "instance_type",
                   "instance_size", "replicas")
    price_model = PRICE_MODEL

    def __init__(self, options: HuggingFaceOptions | None = None, *, run_mode: str = "live",
                 token: str | None = None, run_prefix: str = "imgbench-local", clock: Clock | None = None):
        if run_mode not in RUN_MODES:
            raise ConfigError(f"invalid Hugging Face run mode {run_mode!r}; valid modes: {', '.join(RUN_MODES)}")
        if not run_prefix.startswith(RUN_PREFIX_ROOT):
            raise ConfigError(f"invalid run prefix {run_prefix!r}; it must start with {RUN_PREFIX_ROOT!r}")
        self.options = options or HuggingFaceOptions()
        self.run_mode = run_mode
        self.run_prefix = run_prefix
        self.clock = clock or (ReplayClock() if run_mode == "replay" else RealClock())
        self._token = token
        self._api = HfApi(endpoint=self.options.hub_url, token=token, library_name="imgbench")
        self._namespace = self.options.namespace
        # The account id from whoami, hidden in cassettes wherever it appears.
        self._account_id: str | None = None
        self._retries = RetryCounter()
        self._random = random.Random()
        self._counts_lock = threading.Lock()
        self._startup_503 = 0
        self._startup_ms = 0
        # What this object created, for teardown; names are set before the create request.
        self._dataset_repo: str | None = None
        self._model_repo: str | None = None
        self._job_id: str | None = None
        self._job_requested = False
        self._job_finished = False
        self._endpoint_name: str | None = None
        self._endpoint_requested = False
        self._endpoint_url: str | None = None
        self._model_trained = False

    @classmethod
    def from_config(cls, bench_config) -> "HuggingFaceProvider":
        run_mode = bench_config.provider_modes.get(cls.name, "replay")

        def option(key: str, env: str | None = None) -> str | None:
            return bench_config.provider_option(cls.name, key, env=env)

        values: dict[str, Any] = {}
        for key, convert in (("base_model", str), ("epochs", int), ("learning_rate", float),
                             ("batch_size", int), ("training_backend", str), ("job_flavor", str),
                             ("autotrain_image", str), ("vendor", str), ("region", str),
                             ("accelerator", str), ("instance_type", str), ("instance_size", str),
                             ("replicas", int)):
            raw = option(key)
            if raw is not None:
                try:
                    values[key] = convert(raw)
                except ValueError as exc:
                    raise ConfigError(f"invalid huggingface.{key} value {raw!r}; expected {convert.__name__}") from exc
        values["namespace"] = option("namespace", env=NAMESPACE_ENV)
        token = os.environ.get(TOKEN_ENV) or None
        if run_mode == "live":
            # HF_TOKEN first, then the token file that `hf auth login` writes.
            token = token or get_token()
        elif run_mode == "emulator":
            base = bench_config.service_urls[cls.name].rstrip("/")
            values.update(hub_url=base, endpoints_api_url=f"{base}/v2", poll_interval_s=EMULATOR_POLL_INTERVAL_S)
            token = token or DEFAULT_TOKEN
        elif run_mode == "replay":
            # The recorded requests carry no token, and the namespace is a placeholder.
            token = REPLAY_TOKEN
            values["namespace"] = values["namespace"] or REPLAY_NAMESPACE
        return cls(HuggingFaceOptions(**values), run_mode=run_mode, token=token,
                   run_prefix=f"imgbench-{bench_config.run_id}")

    # Description --------------------------------------------------------------

    def settings(self) -> dict:
        options = self.options
        return {
            "run_mode": self.run_mode,
            "training_backend": "Hugging Face Job running AutoTrain",
            "autotrain_image": options.autotrain_image,
            "job_flavor": options.job_flavor,
            "base_model": options.base_model,
            "epochs": options.epochs,
            "learning_rate": options.learning_rate,
            "batch_size": options.batch_size,
            "endpoint_hardware": f"{options.vendor}/{options.region}/{options.accelerator}/"
                                 f"{options.instance_type}/{options.instance_size}",
            "replicas": options.replicas,
            "scale_to_zero": False,
            "image_format": f"jpeg quality {options.jpeg_quality} (training); raw bytes (invoke)",
            "image_policy": f"{CONVERSION_POLICY};longest-side<={options.max_image_side}",
            "poll_interval_s": options.poll_interval_s,
            "training_timeout_s": options.training_timeout_s,
            "deployment_timeout_s": options.deployment_timeout_s,
            "invoke_attempts": options.invoke_attempts,
            "xet_uploads": False,
        }

    def describe_model(self, model: HuggingFaceModel) -> dict:
        return {"model_repo": model.model_repo, "job_id": model.job_id, "job_stage": model.job_stage,
                "status_reads": model.status_reads, "reused": model.reused,
                "labels": model.labels.changed}

    def counters(self) -> dict[str, int]:
        counts = {f"retried_{kind}": count for kind, count in self._retries.as_dict().items()}
        with self._counts_lock:
            counts["endpoint_startup_503"] = self._startup_503
            counts["endpoint_startup_ms"] = self._startup_ms
        return counts

    def credentials_needed(self) -> bool:
        """Return True for a live run that found no token in ``HF_TOKEN`` or the Hub's token file."""
        return self.run_mode == "live" and not self._token

    def recording_rules(self) -> RecordingRules:
        # vcrpy calls a callable value with (request, response) when it hides or restores it,
        # so values learnt during the case (namespace, endpoint URL) are scrubbed too.
        return RecordingRules(
            provider=self.name,
            base_url=DEFAULT_HUB_URL,
            secret_fields=HUGGINGFACE_SECRET_FIELDS,
            digest_fields=HUGGINGFACE_DIGEST_FIELDS,
            sensitive_values={
                ENDPOINT_HOST_PLACEHOLDER: self._endpoint_host,
                RUN_PREFIX_PLACEHOLDER: self.run_prefix,
                TOKEN_PLACEHOLDER: self._token,
                HUB_URL_PLACEHOLDER: lambda *_: self.options.hub_url,
                NAMESPACE_PLACEHOLDER: lambda *_: self._namespace,
                ACCOUNT_ID_PLACEHOLDER: lambda *_: self._account_id,
                ENDPOINT_NAME_PLACEHOLDER: lambda *_: self._endpoint_name or self.endpoint_name_for(self.case_id),
            },
            response_filters={WHOAMI_PATH: whoami_for_cassette},
            text_patterns=ACCOUNT_ID_PATTERNS,
        )

    def _endpoint_host(self, *_) -> str | None:
        """Return the scheme and host of the endpoint URL where it differs from the hub's, for scrubbing.

        Stored request URIs keep only their path, so a replay restores the
        placeholder to a fixed host and the paths still match. An emulator
        serves endpoints on its own host and port, which the hub URL placeholder covers.
        """
        if self.run_mode == "replay":
            return REPLAY_ENDPOINT_HOST
        if self._endpoint_url is None:
            return None
        parts = urlsplit(self._endpoint_url)
        host = f"{parts.scheme}://{parts.netloc}"
        hub = urlsplit(self.options.hub_url)
        return None if host == f"{hub.scheme}://{hub.netloc}" else host

    # Names ----------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            profile = self._hub("whoami", self._api.whoami)
            self._namespace = str(profile["name"])
            self._account_id = profile.get("id")
        return self._namespace

    def endpoint_name_for(self, case_id: str) -> str:
        """Return the endpoint name of a case: ``imgbench-`` and 16 hex digits (names allow 32 characters)."""
        digest = hashlib.sha256(f"{self.run_prefix}/{case_id}".encode()).hexdigest()[:16]
        return f"{RUN_PREFIX_ROOT}{digest}"

    # The provider contract ----------------------------------------------------

    def upload(self, training_set: TrainingSet) -> HuggingFaceUpload:
        labels = safe_labels(training_set.classes, service="Hugging Face", allowed=r"A-Za-z0-9_")
        repo_id = f"{self.namespace}/{self.run_prefix}-{training_set.case_id}-data"
        self._endpoint_name = self.endpoint_name_for(training_set.case_id)
        operations, probe = [], b""
        for image in training_set.images:
            data = self._prepare(image.record.read_bytes(), str(image.record.path))
            probe = probe or data
            split = "train" if image.role == "train" else "validation"
            path = f"{split}/{labels.label_of(image.label)}/{image.record.sha256[:32]}.jpg"
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=data))
        if not probe:
            raise InvalidInputError(f"case {training_set.case_id} has no training images; nothing to upload")

        self._dataset_repo = repo_id
        self.note_created("dataset", repo_id, run_prefix=self.run_prefix)
        self._hub("dataset repository creation", lambda: self._api.create_repo(
            repo_id, repo_type="dataset", private=True, exist_ok=True))
        self._hub("dataset upload", lambda: self._api.create_commit(
            repo_id, operations, repo_type="dataset", commit_message=f"imgbench training set {training_set.case_id}"))
        logger.info("Hugging Face dataset %s: %d images uploaded", repo_id, len(operations))
        return HuggingFaceUpload(repo_id, labels, len(operations), probe)

    def train(self, upload: HuggingFaceUpload) -> HuggingFaceModel:
        """Run AutoTrain in a Hugging Face Job and wait until it has pushed the model repository."""
        model_repo = upload.dataset_repo.removesuffix("-data")
        self._model_repo = model_repo
        self.note_created("model", model_repo, run_prefix=self.run_prefix, model_repo=model_repo,
                          labels=upload.labels.by_class)
        config = self.autotrain_config(upload.dataset_repo, model_repo)
        self._job_requested = True
        job = self._hub("job creation", lambda: self._api.run_job(
            image=self.options.autotrain_image, command=AUTOTRAIN_COMMAND,
            env={"AUTOTRAIN_CONFIG": config}, secrets={"HF_TOKEN": self._token},
            flavor=self.options.job_flavor, timeout=int(self.options.training_timeout_s),
            labels={"imgbench-run": self.run_prefix}, name=model_repo.split("/", 1)[1],
            namespace=self.namespace))
        self._job_id = job.id
        self.note_created("job", job.id, run_prefix=self.run_prefix, model_repo=model_repo)
        logger.info("Hugging Face job %s started: AutoTrain %s -> %s", job.id, upload.dataset_repo, model_repo)

        stage, reads = self._wait_for_job(job.id)
        self._job_finished = True
        self.note_deleted("job", job.id)  # a finished job holds no hardware
        info = self._hub("model repository read", lambda: self._api.model_info(model_repo))
        files = {sibling.rfilename for sibling in info.siblings or []}
        if "config.json" not in files:
            raise TrainingFailedError(f"Hugging Face job {job.id} completed but the model repository {model_repo} "
                                      f"has no config.json (files: {sorted(files)[:10]}); check the job logs")
        self._model_trained = True
        return HuggingFaceModel(model_repo, upload.labels, job.id, stage, reads, upload.probe_image)

    def deploy(self, model: HuggingFaceModel) -> HuggingFaceEndpoint:
        name = self._endpoint_name or self.endpoint_name_for(self.case_id)
        self._endpoint_name = name
        options = self.options
        self.note_created("endpoint", name, run_prefix=self.run_prefix, model_repo=model.model_repo)
        self._endpoint_requested = True
        try:
            with self._endpoints_api():
                self._hub("endpoint creation", lambda: self._api.create_inference_endpoint(
                    name, repository=model.model_repo, framework="pytorch", task="image-classification",
                    accelerator=options.accelerator, instance_size=options.instance_size,
                    instance_type=options.instance_type, region=options.region, vendor=options.vendor,
                    min_replica=options.replicas, max_replica=options.replicas, scale_to_zero_timeout=None,
                    type="authenticated", namespace=self.namespace))
        except InvalidInputError as exc:
            # A creation retried after a lost response finds the endpoint that the first attempt made.
            if "HTTP 409" not in str(exc) or not self._retries.as_dict():
                raise
            logger.warning("Hugging Face endpoint %s existed after a retried creation; using it", name)
        deadline = self.clock.monotonic() + options.deployment_timeout_s
        url = self._wait_for_endpoint(name, deadline)
        self._endpoint_url = url
        endpoint = HuggingFaceEndpoint(name, url, model.labels)
        self._wait_for_first_answer(endpoint, model.probe_image, deadline)
        return endpoint

    def invoke(self, endpoint: HuggingFaceEndpoint, image: bytes, session: requests.Session) -> Prediction:
        # NOTE: a retried request's latency includes the failed attempt and the backoff. Retries are
        # counted in counters(), but the load test cannot tell which request was retried.
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": _image_media_type(image),
                   "Accept": "application/json"}
        policy = RetryPolicy(max_attempts=self.options.invoke_attempts, base_delay_s=0.1, max_delay_s=2.0,
                             budget_s=10.0)

        def attempt() -> requests.Response:
            response = self._post_image(session, endpoint.url, image, headers, "invoke")
            if response.status_code >= 500:
                raise TransientError(SERVER_ERROR, f"Hugging Face endpoint {endpoint.name} returned HTTP "
                                                   f"{response.status_code}: {response.text[:200]}")
            return response

        response = call_with_retries(attempt, operation=f"Hugging Face invoke on {endpoint.name}", policy=policy,
                                     counter=self._retries, clock=self.clock, rng=self._random)
        return _top_prediction(_checked(response, endpoint.name), endpoint)

    def teardown(self) -> None:
        """Delete the endpoint, cancel an unfinished job, and delete the repositories; raise the first failure."""
        failures: list[ProviderError] = []
        for step in (self._delete_endpoint, self._cancel_job, self._delete_model, self._delete_dataset):
            try:
                step()
            except ProviderError as exc:
                logger.error("Hugging Face teardown step %s failed: %s", step.__name__, exc)
                failures.append(exc)
        if failures:
            raise failures[0]

    # Bookkeeping hooks ------------------------------------------------------------

    def reuse_model(self, training_set: TrainingSet, details: dict) -> HuggingFaceModel | None:
        repo_id = details.get("model_repo")
        labels = safe_labels(training_set.classes, service="Hugging Face", allowed=r"A-Za-z0-9_")
        if not repo_id or details.get("labels") not in (None, labels.by_class):
            return None
        try:
            info = self._hub("model repository read", lambda: self._api.model_info(repo_id))
        except ProviderError as exc:
            logger.info("kept Hugging Face model %s cannot be reused: %s", repo_id, exc)
            return None
        if "config.json" not in {sibling.rfilename for sibling in info.siblings or []}:
            return None
        probe = self._prepare(training_set.images[0].record.read_bytes(), str(training_set.images[0].record.path))
        self._model_repo = repo_id
        self._model_trained = True
        self._endpoint_name = self.endpoint_name_for(training_set.case_id)
        return HuggingFaceModel(repo_id, labels, None, "reused", 0, probe, reused=True)

    @classmethod
    def find_leftovers(cls, bench_config, run_marker: str | None) -> list[Leftover]:
        """List the resources of run ``run_marker``, a run id as the sweep passes it (of any imgbench run when None).

        Repositories are named ``imgbench-<run id>-<case id>[-data]`` and
        endpoints are matched by their model repository, so the prefix ends
        with a hyphen: run ``R`` never matches run ``R2``. Jobs carry the run
        prefix ``imgbench-<run id>`` in their ``imgbench-run`` label.
        """
        provider = cls.from_config(bench_config)
        run_prefix = f"{RUN_PREFIX_ROOT}{run_marker}" if run_marker else None
        name_prefix = f"{run_prefix}-" if run_prefix else RUN_PREFIX_ROOT
        marker = run_prefix or RUN_PREFIX_ROOT
        namespace = provider.namespace
        leftovers = []
        with provider._endpoints_api():
            endpoints = provider._hub("endpoint list", lambda: provider._api.list_inference_endpoints(
                namespace=namespace))
        for endpoint in endpoints:
            repository = endpoint.repository.split("/", 1)[-1]
            if repository.startswith(name_prefix):
                leftovers.append(Leftover(cls.name, "endpoint", endpoint.name, marker,
                                          (("model_repo", endpoint.repository),)))
        for kind, lister in (("model", provider._api.list_models), ("dataset", provider._api.list_datasets)):
            repos = provider._hub(f"{kind} list", lambda lister=lister: list(lister(author=namespace,
                                                                                   search=name_prefix)))
            leftovers.extend(Leftover(cls.name, kind, repo.id, marker) for repo in repos
                             if repo.id.split("/", 1)[-1].startswith(name_prefix))
        jobs = provider._hub("job list", lambda: provider._api.list_jobs(namespace=namespace))
        for job in jobs:
            label = str((job.labels or {}).get("imgbench-run", ""))
            matches = label == run_prefix if run_prefix else label.startswith(RUN_PREFIX_ROOT)
            if job.status.stage in JOB_RUNNING_STAGES and matches:
                leftovers.append(Leftover(cls.name, "job", job.id, marker))
        return leftovers

    @classmethod
    def delete_leftover(cls, bench_config, leftover: Leftover) -> None:
        provider = cls.from_config(bench_config)
        if leftover.kind == "endpoint":
            provider._endpoint_name, provider._endpoint_requested = leftover.resource_id, True
            provider._delete_endpoint()
        elif leftover.kind == "job":
            provider._job_id = leftover.resource_id
            provider._cancel_job()
        elif leftover.kind in ("model", "dataset"):
            provider._delete_repo(leftover.resource_id, leftover.kind)
        else:
            raise ConfigError(f"unknown Hugging Face leftover kind {leftover.kind!r}; "
                              "valid kinds: endpoint, job, model, dataset")

    # Steps ----------------------------------------------------------------------

    def autotrain_config(self, dataset_repo: str, model_repo: str) -> str:
        """Return the AutoTrain configuration (YAML) that trains ``model_repo`` on ``dataset_repo``."""
        options = self.options
        config = {
            "task": "image_classification",
            "base_model": options.base_model,
            "project_name": model_repo.split("/", 1)[1],
            "log": "tensorboard",
            "backend": "local",
            "data": {"path": dataset_repo, "train_split": "train", "valid_split": "validation",
                     "column_mapping": {"image_column": "image", "target_column": "label"}},
            "params": {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.learning_rate,
                       "optimizer": "adamw_torch", "scheduler": "linear", "gradient_accumulation": 1,
                       "mixed_precision": "fp16"},
            # AutoTrain's config parser reads a "${NAME}" token value from the environment,
            # here the job's HF_TOKEN secret (autotrain-advanced src/autotrain/parser.py).
            "hub": {"username": model_repo.split("/", 1)[0], "token": "${HF_TOKEN}", "push_to_hub": True},
        }
        return yaml.safe_dump(config, sort_keys=True)

    def _wait_for_job(self, job_id: str) -> tuple[str, int]:
        deadline = self.clock.monotonic() + self.options.training_timeout_s
        reads = 0
        while True:
            job = self._hub("job status read", lambda: self._api.inspect_job(job_id=job_id, namespace=self.namespace))
            reads += 1
            stage = str(job.status.stage)
            if stage == "COMPLETED":
                logger.info("Hugging Face job %s completed after %d status reads", job_id, reads)
                return stage, reads
            if stage not in JOB_RUNNING_STAGES:
                raise TrainingFailedError(f"Hugging Face job {job_id} ended in stage {stage} after {reads} status "
                                          f"reads: {job.status.message}; check the job logs")
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(f"Hugging Face job {job_id} did not finish within "
                                           f"{self.options.training_timeout_s:.0f} s (stage {stage} after {reads} "
                                           "reads); raise training_timeout_s or check the job logs")
            self.clock.sleep(self.options.poll_interval_s)

    def _wait_for_endpoint(self, name: str, deadline: float) -> str:
        reads = 0
        while True:
            with self._endpoints_api():
                endpoint = self._hub("endpoint status read", lambda: self._api.get_inference_endpoint(
                    name, namespace=self.namespace))
            reads += 1
            if endpoint.status == "running" and endpoint.url:
                logger.info("Hugging Face endpoint %s running after %d status reads", name, reads)
                return endpoint.url
            if endpoint.status in ENDPOINT_FAILED_STATES:
                message = (endpoint.raw.get("status") or {}).get("message")
                raise ServiceFailureError(f"Hugging Face endpoint {name} failed to start ({endpoint.status}: "
                                          f"{message}); check its logs in the Inference Endpoints console")
            if endpoint.status not in ENDPOINT_STARTING_STATES + ("running",):
                raise ServiceFailureError(f"Hugging Face endpoint {name} is in state {endpoint.status!r}, which "
                                          "cannot serve; min_replica is never 0 here, so it was paused or scaled "
                                          "down from outside")
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(f"Hugging Face endpoint {name} did not start within "
                                           f"{self.options.deployment_timeout_s:.0f} s (state {endpoint.status})")
            self.clock.sleep(self.options.poll_interval_s)

    def _wait_for_first_answer(self, endpoint: HuggingFaceEndpoint, probe: bytes, deadline: float) -> None:
        """Send the probe image until the endpoint responds; 503 and resets while the replica starts are waited out."""
        started = self.clock.monotonic()
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "image/jpeg",
                   "Accept": "application/json"}
        with requests.Session() as session:
            while True:
                try:
                    response = self._post_image(session, endpoint.url, probe, headers, "start-up probe")
                except TransientError as exc:
                    self._retries.add(exc.kind)
                    response = None
                if response is not None and response.status_code != HTTPStatus.SERVICE_UNAVAILABLE:
                    _checked(response, endpoint.name)
                    break
                if response is not None:
                    with self._counts_lock:
                        self._startup_503 += 1
                if self.clock.monotonic() >= deadline:
                    raise ProviderTimeoutError(f"Hugging Face endpoint {endpoint.name} still responded with HTTP 503 "
                                               f"after {self.options.deployment_timeout_s:.0f} s; check its logs")
                self.clock.sleep(min(self.options.poll_interval_s, 5.0))
        with self._counts_lock:
            self._startup_ms = int(round((self.clock.monotonic() - started) * 1000))
        logger.info("Hugging Face endpoint %s responded after %d start-up 503s", endpoint.name, self._startup_503)

    def _post_image(self, session: requests.Session, url: str, image: bytes, headers: dict,
                    operation: str) -> requests.Response:
        try:
            return session.post(url, data=image, headers=headers, timeout=self.options.request_timeout_s)
        except CannotOverwriteExistingCassetteException as exc:
            raise cassette_miss_error(exc) from exc
        except requests.Timeout as exc:
            raise ProviderTimeoutError(f"Hugging Face {operation} timed out after "
                                       f"{self.options.request_timeout_s:.0f} s") from exc
        except requests.ConnectionError as exc:
            raise TransientError(CONNECTION_RESET, f"Hugging Face {operation}: connection failed ({exc})") from exc

    def _delete_endpoint(self) -> None:
        name = self._endpoint_name
        if name is None or not self._endpoint_requested:
            return
        with self._endpoints_api():
            self._hub("endpoint deletion", lambda: self._api.delete_inference_endpoint(name, namespace=self.namespace),
                      missing_ok=True)
        self.note_deleted("endpoint", name)
        self._endpoint_requested = False
        logger.info("Hugging Face endpoint %s deleted", name)

    def _cancel_job(self) -> None:
        """Cancel a job that has not finished, also with ``keep_model`` set.

        A running job bills its hardware by the hour and cannot be resumed, so
        ``keep_model`` does not keep it: the job is cancelled, its ledger entry
        says so, and a resumed run trains again.
        """
        if self._job_finished or (self._job_id is None and not self._job_requested):
            return
        job_ids = [self._job_id] if self._job_id else self._find_jobs()
        for job_id in job_ids:
            self._hub("job cancellation", lambda job_id=job_id: self._api.cancel_job(
                job_id=job_id, namespace=self.namespace), missing_ok=True)
            self.ledger.note_state(self.name, "job", job_id, "deleted", ended=JOB_CANCELLED_NOTE)
            if self.keep_model:
                logger.info("Hugging Face job %s cancelled before training finished; the job is not kept, "
                            "so a resumed run trains again", job_id)
            else:
                logger.info("Hugging Face job %s cancelled", job_id)
        self._job_finished = True

    def _find_jobs(self) -> list[str]:
        """Return the unfinished jobs of this case, for a creation whose response never arrived."""
        jobs = self._hub("job list", lambda: self._api.list_jobs(namespace=self.namespace))
        name = (self._model_repo or "").split("/", 1)[-1]
        return [job.id for job in jobs if job.status.stage in JOB_RUNNING_STAGES
                and (job.labels or {}).get("name") == name]

    def _delete_model(self) -> None:
        repo_id = self._model_repo
        if repo_id is None:
            return
        if self.keep_model and self._model_trained:
            self.note_kept("model", repo_id, run_prefix=self.run_prefix, model_repo=repo_id)
            logger.info("Hugging Face model %s kept for a resumed run", repo_id)
            return
        self._delete_repo(repo_id, "model")
        self._model_repo = None

    def _delete_dataset(self) -> None:
        if self._dataset_repo is not None:
            self._delete_repo(self._dataset_repo, "dataset")
            self._dataset_repo = None

    def _delete_repo(self, repo_id: str, kind: str) -> None:
        self._hub(f"{kind} repository deletion", lambda: self._api.delete_repo(
            repo_id, repo_type=kind, missing_ok=True), missing_ok=True)
        self.note_deleted(kind, repo_id)
        logger.info("Hugging Face %s repository %s deleted", kind, repo_id)

    def _prepare(self, data: bytes, label: str) -> bytes:
        """Return ``data`` as JPEG: decoded with ``decode_rgb``, longest side at most the limit."""
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
        return buffer.getvalue()

    # HTTP ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _endpoints_api(self):
        """Point huggingface_hub's Inference Endpoints calls at ``endpoints_api_url`` for one call.

        huggingface_hub 2.x reads the API's base URL from the module constant
        ``constants.INFERENCE_ENDPOINTS_ENDPOINT`` at each call and offers no
        argument for it, so the constant is swapped under a lock.
        """
        with _ENDPOINTS_API_LOCK:
            previous = hub_constants.INFERENCE_ENDPOINTS_ENDPOINT
            hub_constants.INFERENCE_ENDPOINTS_ENDPOINT = self.options.endpoints_api_url
            try:
                yield
            finally:
                hub_constants.INFERENCE_ENDPOINTS_ENDPOINT = previous

    def _hub(self, operation: str, call: Callable[[], T], *, missing_ok: bool = False) -> T | None:
        """Run one huggingface_hub call with retries of transient errors; map its errors to imgbench errors."""

        def attempt():
            try:
                return call()
            except CannotOverwriteExistingCassetteException as exc:
                raise cassette_miss_error(exc) from exc
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status == HTTPStatus.NOT_FOUND and missing_ok:
                    return None
                if status == HTTPStatus.TOO_MANY_REQUESTS:
                    raise TransientError(THROTTLING, f"Hugging Face {operation} was throttled (HTTP 429)") from exc
                if status >= 500:
                    raise TransientError(SERVER_ERROR, f"Hugging Face {operation} returned HTTP {status}: "
                                                       f"{_hub_message(exc)}") from exc
                raise _mapped_error(operation, status, exc) from exc
            except httpx2.TimeoutException as exc:
                raise ProviderTimeoutError(f"Hugging Face {operation} timed out: {exc}") from exc
            except httpx2.TransportError as exc:
                raise TransientError(CONNECTION_RESET, f"Hugging Face {operation}: connection failed ({exc})") from exc

        return call_with_retries(attempt, operation=f"Hugging Face {operation}", policy=HUB_RETRY_POLICY,
                                 counter=self._retries, clock=self.clock, rng=self._random)


_ENDPOINTS_API_LOCK = threading.RLock()

# Retries of one Hub, Jobs or Endpoints API call.
HUB_RETRY_POLICY = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=20.0, budget_s=60.0)


def whoami_for_cassette(profile: Any) -> Any:
    """Return the part of a whoami response that a cassette may store.

    The account name becomes the namespace placeholder, and every other
    field is dropped except the account type and the token's type and role.
    A replay never sends whoami, because it runs with a fixed namespace.
    """
    if not isinstance(profile, dict):
        return profile
    kept: dict[str, Any] = {key: profile[key] for key in WHOAMI_KEPT_FIELDS if key in profile}
    if "name" in profile:
        kept["name"] = NAMESPACE_PLACEHOLDER
    auth = profile.get("auth")
    if isinstance(auth, dict):
        kept["auth"] = {key: auth[key] for key in WHOAMI_KEPT_AUTH_FIELDS if key in auth}
        token = auth.get("accessToken")
        if isinstance(token, dict):
            kept["auth"]["accessToken"] = {key: token[key] for key in WHOAMI_KEPT_TOKEN_FIELDS if key in token}
    return kept


def _hub_message(exc: HfHubHTTPError) -> str:
    return (getattr(exc, "server_message", None) or str(exc)).splitlines()[0][:200]


def _mapped_error(operation: str, status: int, exc: HfHubHTTPError) -> ProviderError:
    detail = f"Hugging Face {operation} returned HTTP {status}: {_hub_message(exc)}"
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        return AuthenticationError(f"{detail}; check that {TOKEN_ENV} has write access to the namespace")
    if status == HTTPStatus.PAYMENT_REQUIRED:
        return QuotaError(f"{detail}; add a payment method or credits to the account")
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.CONFLICT, HTTPStatus.UNPROCESSABLE_ENTITY):
        return InvalidInputError(detail)
    return ServiceFailureError(detail)


def _checked(response: requests.Response, name: str) -> Any:
    status = response.status_code
    detail = f"Hugging Face endpoint {name} returned HTTP {status}: {response.text[:200]}"
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        raise AuthenticationError(f"{detail}; check {TOKEN_ENV}")
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        raise QuotaError(f"{detail}; lower --load-concurrency or add replicas")
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNSUPPORTED_MEDIA_TYPE):
        raise InvalidInputError(detail)
    if not 200 <= status < 300:
        raise ServiceFailureError(detail)
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceFailureError(f"{detail}, with a body that is not JSON") from exc


def _top_prediction(answer: Any, endpoint: HuggingFaceEndpoint) -> Prediction:
    """Return the highest-scoring label of an image-classification response ``[{"label", "score"}, ...]``."""
    try:
        best = max(answer, key=lambda item: float(item["score"]))
        return Prediction(label=endpoint.labels.class_of(str(best["label"])), confidence=float(best["score"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ServiceFailureError(f"Hugging Face endpoint {endpoint.name} returned a response without label and "
                                  f"score: {str(answer)[:200]}") from exc


def _image_media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "application/octet-stream"


__all__ = ["HuggingFaceEndpoint", "HuggingFaceModel", "HuggingFaceOptions", "HuggingFaceProvider",
           "HuggingFaceUpload", "PRICE_MODEL"]

"""The Nyckel provider, through Nyckel's REST API (https://www.nyckel.com/docs).

One case creates one Nyckel function named ``<run prefix>-<case id>``, adds a
label per class and one sample per training image. Nyckel cross-validates
internally, so it gets all N images of an ablation. The provider then waits
until the function has a prediction for every sample, and invokes it with
``capture=false`` so test images never become samples. ``teardown`` deletes
the function, unless ``keep_model`` is set: then it keeps the function (the
trained model, which Nyckel bills by request, not by the hour) for a resumed
run to reuse.

Bookkeeping: the function is noted in the run ledger under its name before
the create request is sent, and its id is added once known, so a crash at any
point leaves a ledger entry that ``find_leftovers`` and ``delete_leftover``
can resolve by name.

Every call goes through ``requests`` and ``imgbench.retry``: HTTP 429 (Nyckel
allows 25 requests per second and 25 in flight), HTTP 500/502/503/504 and
dropped connections are retried a bounded number of times with exponential
backoff and jitter, and counted. Other errors are mapped to
``imgbench.errors`` classes at the boundary, chaining the original.

Run modes: ``live`` sends requests to https://www.nyckel.com with the
credentials in ``NYCKEL_CLIENT_ID`` and ``NYCKEL_CLIENT_SECRET``.
``emulator`` sends them to the URL given by ``--nyckel-url`` (see
``imgbench.emulators.nyckel``). ``replay`` takes responses from a cassette and
waits on a virtual clock.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import logging
import os
import random
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import requests
from vcr.errors import CannotOverwriteExistingCassetteException

from imgbench.clock import Clock, RealClock, ReplayClock
from imgbench.emulators.nyckel import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from imgbench.errors import (
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    ProviderTimeoutError,
    QuotaError,
    ServiceFailureError,
    ThrottledError,
    TrainingFailedError,
)
from imgbench.images import CONVERSION_POLICY, ImageDecodeError, decode_rgb
from imgbench.recording import RecordingRules, cassette_miss_error
from imgbench.retry import (CONNECTION_RESET, SERVER_ERROR, THROTTLING, TRANSIENT_KINDS, RetryCounter, RetryPolicy,
                            TransientError, call_with_retries)
from providers.base import Leftover, Prediction, PriceModel, Provider, TrainingSet

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://www.nyckel.com"
CLIENT_ID_ENV = "NYCKEL_CLIENT_ID"
CLIENT_SECRET_ENV = "NYCKEL_CLIENT_SECRET"
RUN_MODES = ("replay", "emulator", "live")

# Function states in which a trained function serves invokes.
TRAINED_STATES = ("Browsing", "Tuning")
# NOTE: Nyckel's documentation names no failed-training state; these are the
# emulator's and a guess at the service's.
FAILED_STATES = ("Failed", "Error")

# Placeholders that stand for per-run values in cassettes.
RUN_PREFIX_PLACEHOLDER = "<IMGBENCH_RUN_PREFIX>"
CLIENT_ID_PLACEHOLDER = "<NYCKEL_CLIENT_ID>"
CLIENT_SECRET_PLACEHOLDER = "<NYCKEL_CLIENT_SECRET>"

# Poll interval against an emulator, which finishes training after a few polls.
EMULATOR_POLL_INTERVAL_S = 0.2

# HTTP statuses retried as transient server errors.
RETRIED_SERVER_STATUSES = (HTTPStatus.INTERNAL_SERVER_ERROR, HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE,
                           HTTPStatus.GATEWAY_TIMEOUT)

# Ledger kind of a Nyckel function, which is both the uploaded data and the model.
FUNCTION_KIND = "function"

# NOTE: unverified. No Nyckel price list could be opened while writing this;
# the per-request price is a placeholder of the right order, so check
# https://www.nyckel.com/pricing and update it before relying on an estimate.
NYCKEL_PRICES = PriceModel(
    currency="USD",
    training_per_hour=None,
    endpoint_per_hour=None,
    per_1000_requests=2.0,
    storage_per_gb_month=None,
    source="https://www.nyckel.com/pricing",
    retrieved="unverified",
    notes="Nyckel bills invokes per request; training and hosting a function have no hourly price.",
    verified=False,
)

# Prepared request bodies kept for repeated test images (the load test sends
# each test image many times).
PAYLOAD_CACHE_SIZE = 4096


@dataclass(frozen=True)
class NyckelOptions:
    """Settings of the Nyckel provider; times are in seconds."""

    base_url: str = DEFAULT_BASE_URL
    # The Nyckel SDK's default: images are resized so the longest side is at most this.
    max_image_side: int = 1024
    jpeg_quality: int = 90
    request_timeout_s: float = 60.0
    # A token is renewed this long before it expires (at most half its lifetime).
    token_renew_margin_s: float = 600.0
    poll_interval_s: float = 5.0
    training_timeout_s: float = 3600.0
    # Attempts of one request that keeps getting HTTP 429, the first included.
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"invalid max_attempts {self.max_attempts}; use 1 or more")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"invalid jpeg_quality {self.jpeg_quality}; use 1 to 95")


@dataclass
class NyckelUpload:
    function_id: str
    sample_ids: list[str]
    expected_samples: int
    already_present: int


@dataclass
class NyckelModel:
    function_id: str
    sample_count: int
    state: str
    polls: int
    label_counts: dict[str, int]


@dataclass(frozen=True)
class NyckelEndpoint:
    function_id: str


class NyckelProvider(Provider):
    name = "nyckel"
    description = "Nyckel image classification functions, through the REST API"
    mode = "live"
    validates_internally = True
    credential_env = (CLIENT_ID_ENV, CLIENT_SECRET_ENV)
    price_model = NYCKEL_PRICES
    model_kind = FUNCTION_KIND

    def __init__(self, options: NyckelOptions | None = None, *, run_mode: str = "live",
                 client_id: str | None = None, client_secret: str | None = None,
                 run_prefix: str = "imgbench-local", clock: Clock | None = None):
        if run_mode not in RUN_MODES:
            raise ConfigError(f"invalid Nyckel run mode {run_mode!r}; valid modes: {', '.join(RUN_MODES)}")
        self.options = options or NyckelOptions()
        self.run_mode = run_mode
        self.run_prefix = run_prefix
        self.clock = clock or (ReplayClock() if run_mode == "replay" else RealClock())
        self._client_id = client_id
        self._client_secret = client_secret
        self._session = requests.Session()
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_lock = threading.Lock()
        self._counters: Counter = Counter()
        self._counter_lock = threading.Lock()
        self._retries = RetryCounter()
        self._retry_policy = RetryPolicy(max_attempts=self.options.max_attempts,
                                         base_delay_s=self.options.backoff_base_s,
                                         max_delay_s=self.options.backoff_max_s)
        self._random = random.Random()
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._payload_lock = threading.Lock()
        self._function_id: str | None = None
        self._function_name: str | None = None

    @classmethod
    def from_config(cls, bench_config) -> "NyckelProvider":
        run_mode = bench_config.provider_modes.get(cls.name, "replay")
        base_url = DEFAULT_BASE_URL
        client_id = os.environ.get(CLIENT_ID_ENV)
        client_secret = os.environ.get(CLIENT_SECRET_ENV)
        if run_mode == "emulator":
            base_url = bench_config.service_urls[cls.name]
            client_id = client_id or DEFAULT_CLIENT_ID
            client_secret = client_secret or DEFAULT_CLIENT_SECRET
        elif run_mode == "replay":
            # The recorded token request has these fields redacted, so any value matches.
            client_id, client_secret = "replay-client-id", "replay-client-secret"
        options = NyckelOptions(base_url=base_url.rstrip("/"))
        if run_mode == "emulator":
            options = dataclasses.replace(options, poll_interval_s=EMULATOR_POLL_INTERVAL_S)
        return cls(options, run_mode=run_mode, client_id=client_id,
                   client_secret=client_secret, run_prefix=f"imgbench-{bench_config.run_id}")

    # Description --------------------------------------------------------------

    def settings(self) -> dict:
        return {
            "run_mode": self.run_mode,
            "api": "REST v1 (metrics and state: v0.9)",
            "image_format": f"jpeg quality {self.options.jpeg_quality}",
            "image_policy": f"{CONVERSION_POLICY};longest-side<={self.options.max_image_side}",
            "capture": False,
            "poll_interval_s": self.options.poll_interval_s,
            "training_timeout_s": self.options.training_timeout_s,
            "max_attempts_on_429": self.options.max_attempts,
            "token_renew_margin_s": self.options.token_renew_margin_s,
        }

    def describe_model(self, model: NyckelModel) -> dict:
        return {"function_id": model.function_id, "sample_count": model.sample_count, "state": model.state,
                "status_polls": model.polls, "annotated_label_counts": model.label_counts}

    def counters(self) -> dict[str, int]:
        """Event counts; ``retried_<kind>`` counts retries and ``<kind>_gave_up`` requests that failed after them."""
        retries = self._retries.as_dict()
        with self._counter_lock:
            counts = {"throttled_429": retries.get(THROTTLING, 0) + retries.get(f"{THROTTLING}_gave_up", 0),
                      "tokens_fetched": self._counters["tokens_fetched"],
                      "samples_already_present": self._counters["samples_already_present"]}
        for kind in TRANSIENT_KINDS:
            counts[f"retried_{kind}"] = retries.get(kind, 0)
            counts[f"{kind}_gave_up"] = retries.get(f"{kind}_gave_up", 0)
        return counts

    def credentials_needed(self) -> bool:
        return self.run_mode == "live"

    def recording_rules(self) -> RecordingRules:
        return RecordingRules(
            provider=self.name,
            base_url=DEFAULT_BASE_URL,
            sensitive_values={RUN_PREFIX_PLACEHOLDER: self.run_prefix,
                              CLIENT_ID_PLACEHOLDER: self._client_id,
                              CLIENT_SECRET_PLACEHOLDER: self._client_secret},
        )

    # The provider contract ----------------------------------------------------

    def upload(self, training_set: TrainingSet) -> NyckelUpload:
        name = f"{self.run_prefix}-{training_set.case_id}"
        self._delete_earlier_attempt(name)
        function_id = self._create_function(name)
        for label in training_set.classes:
            self._call("POST", f"/v1/functions/{function_id}/labels", json_body={"name": label},
                       operation="label creation")
        sample_ids, already_present = [], 0
        for image in training_set.images:
            body = {"data": self._prepare(image.record.read_bytes(), str(image.record.path)),
                    "externalId": image.record.sha256, "annotation": {"labelName": image.label}}
            response = self._call("POST", f"/v1/functions/{function_id}/samples", json_body=body,
                                  accept=(HTTPStatus.CONFLICT,), operation="sample upload")
            if response.status_code == HTTPStatus.CONFLICT:
                # A retried upload of a sample that arrived the first time.
                sample_ids.append(_json(response, "sample upload").get("existingSampleId"))
                already_present += 1
                self._count("samples_already_present")
            else:
                sample_ids.append(_json(response, "sample upload")["id"])
        logger.info("Nyckel function %s: %d samples uploaded (%d were present already)",
                    function_id, len(sample_ids), already_present)
        return NyckelUpload(function_id, sample_ids, len(training_set.images), already_present)

    def train(self, upload: NyckelUpload) -> NyckelModel:
        """Wait until the function has a prediction for every sample.

        Nyckel trains on its own after each upload. Training counts as done
        when the function is not training, ``predictionCount`` equals
        ``sampleCount``, and its state is one of ``TRAINED_STATES``.
        """
        deadline = self.clock.monotonic() + self.options.training_timeout_s
        polls = 0
        while True:
            metrics = _json(self._call("GET", f"/v0.9/functions/{upload.function_id}/metrics",
                                       operation="metrics read"), "metrics read")
            state = _json(self._call("GET", f"/v0.9/functions/{upload.function_id}", operation="function read"),
                          "function read").get("state")
            polls += 1
            if state in FAILED_STATES:
                raise TrainingFailedError(f"Nyckel function {upload.function_id} reports state {state!r} "
                                          f"after {polls} status polls; training failed")
            if _is_trained(metrics, state, upload.expected_samples):
                logger.info("Nyckel function %s trained after %d status polls", upload.function_id, polls)
                return NyckelModel(upload.function_id, int(metrics["sampleCount"]), state, polls,
                                   dict(metrics.get("annotatedLabelCounts") or {}))
            if self.clock.monotonic() >= deadline:
                raise ProviderTimeoutError(
                    f"Nyckel function {upload.function_id} did not finish training within "
                    f"{self.options.training_timeout_s:.0f} s ({polls} polls; last metrics: "
                    f"sampleCount {metrics.get('sampleCount')}, predictionCount {metrics.get('predictionCount')}, "
                    f"isTraining {metrics.get('isTraining')}, state {state!r})"
                )
            self.clock.sleep(self.options.poll_interval_s)

    def deploy(self, model: NyckelModel) -> NyckelEndpoint:
        # A Nyckel function serves invokes as soon as it is trained.
        return NyckelEndpoint(model.function_id)

    def invoke(self, endpoint: NyckelEndpoint, image: bytes, session: requests.Session) -> Prediction:
        body = {"data": self._prepare(image, "test image")}
        response = self._call("POST", f"/v1/functions/{endpoint.function_id}/invoke", json_body=body,
                              params={"capture": "false"}, session=session, operation="invoke")
        answer = _json(response, "invoke")
        try:
            return Prediction(label=str(answer["labelName"]), confidence=float(answer["confidence"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceFailureError(f"Nyckel invoke returned a response without labelName and confidence: "
                                      f"{str(answer)[:200]}") from exc

    def teardown(self) -> None:
        function_id, name = self._function_id, self._function_name
        if function_id is not None and self.keep_model:
            self.note_kept(FUNCTION_KIND, name, function_id=function_id)
            logger.info("Nyckel function %s (%s) kept for a resumed run", function_id, name)
        elif function_id is not None:
            self._delete_function(function_id, name)
        elif name is not None:
            # Creation was sent but its response never arrived, so find the function by name.
            self._delete_functions_named(name)
        self._function_id = self._function_name = None
        self._session.close()

    def reuse_model(self, training_set: TrainingSet, details: dict) -> NyckelModel | None:
        """Return the function of an earlier attempt of this case once it holds every sample, trained.

        A function that lacks samples (the attempt stopped during the upload)
        is deleted, and None returned, so the case uploads afresh.
        """
        function_id, name = details.get("function_id"), details.get("name")
        if not function_id or not name:
            return None
        response = self._call("GET", f"/v0.9/functions/{function_id}/metrics", accept=(HTTPStatus.NOT_FOUND,),
                              operation="metrics read")
        if response.status_code == HTTPStatus.NOT_FOUND:
            self.note_deleted(FUNCTION_KIND, name)
            logger.info("Nyckel function %s of an earlier attempt no longer exists", function_id)
            return None
        expected = len(training_set.images)
        samples = int(_json(response, "metrics read").get("sampleCount") or 0)
        if samples < expected:
            logger.info("Nyckel function %s of an earlier attempt holds %d of %d samples; deleting it",
                        function_id, samples, expected)
            self._delete_function(function_id, name)
            return None
        self._function_id, self._function_name = function_id, name
        self.ledger.note_state(self.name, FUNCTION_KIND, name, "created")
        logger.info("reusing Nyckel function %s (%s) with %d samples", function_id, name, samples)
        return self.train(NyckelUpload(function_id, [], expected, expected))

    @classmethod
    def find_leftovers(cls, bench_config, run_marker: str | None) -> list[Leftover]:
        """List the functions named after a case of run ``run_marker`` (of any imgbench run when None)."""
        provider = cls.from_config(bench_config)
        pattern = _leftover_pattern(run_marker)
        try:
            functions = _json(provider._call("GET", "/v1/functions", operation="function list"), "function list")
        finally:
            provider._session.close()
        return [Leftover(cls.name, FUNCTION_KIND, str(item["name"]), run_marker or "imgbench-",
                         (("function_id", str(item["id"])),))
                for item in functions if pattern.match(str(item.get("name", "")))]

    @classmethod
    def delete_leftover(cls, bench_config, leftover: Leftover) -> None:
        provider = cls.from_config(bench_config)
        try:
            function_id = dict(leftover.details).get("function_id")
            if function_id:
                provider._delete_function(function_id, leftover.resource_id)
            else:
                provider._delete_functions_named(leftover.resource_id)
        finally:
            provider._session.close()

    def sweep_leftovers(self, prefix: str) -> list[str]:
        """Delete every function whose name starts with ``prefix``; return their ids."""
        if not prefix.startswith("imgbench-"):
            raise ConfigError(f"refusing to sweep functions with prefix {prefix!r}; "
                              "it must start with 'imgbench-'")
        functions = _json(self._call("GET", "/v1/functions", operation="function list"), "function list")
        leftovers = [(item["id"], item["name"]) for item in functions if str(item.get("name", "")).startswith(prefix)]
        for function_id, name in leftovers:
            self._delete_function(function_id, name)
        if leftovers:
            logger.info("deleted %d leftover Nyckel functions named %s*", len(leftovers), prefix)
        return [function_id for function_id, _ in leftovers]

    # Steps ----------------------------------------------------------------------

    def _create_function(self, name: str) -> str:
        self._function_name = name
        self.note_created(FUNCTION_KIND, name, name=name)
        response = self._call("POST", "/v1/functions", operation="function creation",
                              json_body={"input": "Image", "output": "Classification", "name": name})
        created = _json(response, "function creation")
        if not isinstance(created, dict) or not created.get("id"):
            raise ServiceFailureError(f"Nyckel function creation returned no function id: {str(created)[:200]}")
        self._function_id = str(created["id"])
        self.note_created(FUNCTION_KIND, name, name=name, function_id=self._function_id)
        logger.info("Nyckel function %s created (%s)", self._function_id, name)
        return self._function_id

    def _delete_function(self, function_id: str, name: str | None) -> None:
        self._call("DELETE", f"/v1/functions/{function_id}", accept=(HTTPStatus.NOT_FOUND,),
                   operation="function deletion")
        if name is not None:
            self.note_deleted(FUNCTION_KIND, name)
        logger.info("Nyckel function %s deleted", function_id)

    def _delete_functions_named(self, name: str) -> list[str]:
        """Delete every function named exactly ``name``; return their ids."""
        functions = _json(self._call("GET", "/v1/functions", operation="function list"), "function list")
        matching = [str(item["id"]) for item in functions if item.get("name") == name]
        for function_id in matching:
            self._delete_function(function_id, name)
        if not matching:
            self.note_deleted(FUNCTION_KIND, name)
        return matching

    def _delete_earlier_attempt(self, name: str) -> None:
        """Delete the function an earlier attempt of this case left, which the ledger lists as created."""
        earlier = [entry for entry in self.ledger.outstanding(self.name)
                   if entry.kind == FUNCTION_KIND and entry.resource_id == name]
        if earlier:
            logger.info("deleting the Nyckel function %s that an earlier attempt of this run left", name)
            self._delete_functions_named(name)

    def _prepare(self, data: bytes, label: str) -> str:
        """Return ``data`` as a JPEG data URI: decoded with ``decode_rgb``, longest side at most the limit."""
        key = hashlib.sha256(data).hexdigest()
        with self._payload_lock:
            cached = self._payloads.get(key)
            if cached is not None:
                self._payloads.move_to_end(key)
                return cached.decode("ascii")
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
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        with self._payload_lock:
            self._payloads[key] = uri.encode("ascii")
            if len(self._payloads) > PAYLOAD_CACHE_SIZE:
                self._payloads.popitem(last=False)
        return uri

    # HTTP ----------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._counter_lock:
            self._counters[name] += 1

    def _access_token(self) -> str:
        """Return a valid bearer token, fetching a new one when it is near expiry."""
        with self._token_lock:
            if self._token is None or self.clock.monotonic() >= self._token_renew_at:
                self._fetch_token()
            return self._token

    def _fetch_token(self) -> None:
        if not self._client_id or not self._client_secret:
            raise AuthenticationError(f"Nyckel needs {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}; set both")
        form = {"grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._client_secret}
        response = self._send("POST", "/connect/token", self._session, data=form, operation="token request")
        body = _json(response, "token request")
        try:
            token, lifetime = str(body["access_token"]), float(body["expires_in"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AuthenticationError("the Nyckel token response lacks access_token or expires_in") from exc
        margin = min(self.options.token_renew_margin_s, lifetime / 2)
        self._token = token
        self._token_renew_at = self.clock.monotonic() + lifetime - margin
        self._count("tokens_fetched")
        logger.info("Nyckel access token fetched, valid for %.0f s", lifetime)

    def _call(self, method: str, path: str, *, operation: str, json_body: Any = None, params: dict | None = None,
              session: requests.Session | None = None, accept: tuple[int, ...] = ()) -> requests.Response:
        """Send an authenticated API request and map its errors."""
        return self._send(method, path, session or self._session, json=json_body, params=params,
                          authenticated=True, accept=accept, operation=operation)

    def _send(self, method: str, path: str, session: requests.Session, *, operation: str,
              authenticated: bool = False, accept: tuple[int, ...] = (), **kwargs) -> requests.Response:
        """Send one request, retrying transient failures; return a 2xx response or one whose status is in ``accept``."""
        url = f"{self.options.base_url}{path}"
        what = f"Nyckel {operation} ({method} {path})"

        def attempt() -> requests.Response:
            headers = {"Authorization": f"Bearer {self._access_token()}"} if authenticated else {}
            try:
                response = session.request(method, url, headers=headers, timeout=self.options.request_timeout_s,
                                           **kwargs)
            except CannotOverwriteExistingCassetteException as exc:
                raise cassette_miss_error(exc) from exc
            except requests.Timeout as exc:
                raise ProviderTimeoutError(f"{what} timed out after {self.options.request_timeout_s:.0f} s") from exc
            except requests.ConnectionError as exc:
                raise TransientError(CONNECTION_RESET, f"{what} lost its connection: {exc}") from exc
            except requests.RequestException as exc:
                raise ServiceFailureError(f"{what} failed: {exc}") from exc
            status = response.status_code
            if status == HTTPStatus.TOO_MANY_REQUESTS:
                raise TransientError(THROTTLING, f"{what} was throttled (HTTP 429)",
                                     _retry_after(response)) from requests.HTTPError(response=response)
            if status in RETRIED_SERVER_STATUSES and status not in accept:
                raise TransientError(SERVER_ERROR, f"{what} returned HTTP {status}: {_message(response)}",
                                     ) from requests.HTTPError(response=response)
            return _checked(response, method, path, operation, accept)

        return call_with_retries(attempt, operation=f"Nyckel {operation}", policy=self._retry_policy, counter=self._retries,
                                 clock=self.clock, rng=self._random, give_up=self._give_up)

    def _give_up(self, exc: TransientError) -> Exception:
        attempts = self.options.max_attempts
        if exc.kind == THROTTLING:
            return ThrottledError(f"{exc}; still throttled after {attempts} attempts: lower --load-concurrency "
                                  "or wait")
        return ServiceFailureError(f"{exc}; still failing after {attempts} attempts or the retry budget")


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _leftover_pattern(run_id: str | None) -> re.Pattern:
    """Match the function names ``<run prefix>-<case id>`` of run ``run_id`` (any run when None)."""
    run = re.escape(run_id) if run_id else ".+"
    return re.compile(rf"^imgbench-{run}-nyckel-[A-Za-z0-9_]+-[0-9]+$")


def _is_trained(metrics: dict, state: str | None, expected_samples: int) -> bool:
    sample_count = int(metrics.get("sampleCount") or 0)
    return (not metrics.get("isTraining")
            and sample_count >= expected_samples
            and int(metrics.get("predictionCount") or 0) == sample_count
            and state in TRAINED_STATES)


def _json(response: requests.Response, operation: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServiceFailureError(f"Nyckel {operation} returned HTTP {response.status_code} with a body that is "
                                  f"not JSON: {response.text[:200]!r}") from exc


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:200]
    return str(body)[:200]


def _checked(response: requests.Response, method: str, path: str, operation: str,
             accept: tuple[int, ...]) -> requests.Response:
    """Return ``response`` when it succeeded; raise the matching imgbench error otherwise."""
    status = response.status_code
    if 200 <= status < 300 or status in accept:
        return response
    detail = f"Nyckel {operation} ({method} {path}) returned HTTP {status}: {_message(response)}"
    cause = requests.HTTPError(detail, response=response)
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        raise AuthenticationError(f"{detail}; check {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}") from cause
    if status == HTTPStatus.PAYMENT_REQUIRED:
        raise QuotaError(f"{detail}; the account's quota is used up") from cause
    if status >= 500:
        raise ServiceFailureError(detail) from cause
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                  HTTPStatus.UNPROCESSABLE_ENTITY):
        raise InvalidInputError(detail) from cause
    raise ServiceFailureError(detail) from cause

"""An emulator of the Nyckel REST API subset that ``providers.nyckel`` uses.

Routes, with the shapes of Nyckel's documented API:

* ``POST /connect/token``: OAuth client-credentials token (form body).
* ``GET|POST /v1/functions``, ``DELETE /v1/functions/{id}``.
* ``POST /v1/functions/{id}/labels``, ``POST /v1/functions/{id}/samples``
  (409 with ``existingSampleId`` for a repeated ``externalId``).
* ``GET /v0.9/functions/{id}`` and ``GET /v0.9/functions/{id}/metrics``.
* ``POST /v1/functions/{id}/invoke`` (``capture=false`` keeps the image out of
  the function's samples).

State lives in memory. Every API request needs an unexpired bearer token.
The "model" is deterministic and cheap: each image becomes a 64-bin joint
colour histogram (4 levels per RGB channel on a 32x32 thumbnail), and a
function predicts the label whose training samples have the nearest mean
histogram (L1 distance). Training finishes after a set number of status
polls, so a provider's waiting loop is exercised. Fault injection returns 429,
402 or 500 responses, fails one route with a chosen status, or makes training
fail; ``on_request`` runs a callback (such as sending a signal to the process
under test) when a route is first reached. ``functions_created`` and
``samples_created`` count what was ever created, so a test can check that a
resumed run uploaded nothing twice.

Use it as a context manager in tests, or run
``python -m imgbench.emulators.nyckel --port 8765`` to record cassettes by
hand.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgbench.emulators.server import LoopbackEmulator, read_json_object, serve_until_interrupted

logger = logging.getLogger(__name__)

# Credentials the emulator accepts unless it is given others.
DEFAULT_CLIENT_ID = "imgbench-emulator-client"
DEFAULT_CLIENT_SECRET = "imgbench-emulator-secret"

# Nyckel states a trained function reports.
TRAINED_STATE = "Browsing"
UNTRAINED_STATE = "Annotating"
# NOTE: the state name of a function whose training failed is this emulator's
# choice; Nyckel's documentation does not name one.
FAILED_STATE = "Failed"

HISTOGRAM_LEVELS = 4
THUMBNAIL_SIZE = (32, 32)
# Softmax temperature over L1 histogram distances, which lie in 0..2.
CONFIDENCE_TEMPERATURE = 0.05

_FUNCTION_PATH = re.compile(r"^/(?P<version>v1|v0\.9)/functions/(?P<id>[^/]+)(?:/(?P<part>[a-z]+))?$")


@dataclass
class EmulatedSample:
    id: str
    label_name: str | None
    external_id: str | None
    histogram: np.ndarray
    captured: bool = False


@dataclass
class EmulatedFunction:
    id: str
    name: str
    input: str
    output: str
    labels: dict[str, str] = field(default_factory=dict)  # label id -> name
    samples: dict[str, EmulatedSample] = field(default_factory=dict)
    is_training: bool = False
    polls_left: int = 0
    prediction_count: int = 0
    state: str = UNTRAINED_STATE
    centroids: dict[str, np.ndarray] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"id": self.id, "name": self.name, "input": self.input, "output": self.output}


@dataclass
class Faults:
    """Faults to inject; the emulator reads and updates them under its lock."""

    throttle_next: int = 0  # respond 429 to the next N API requests
    server_error_next: int = 0  # respond 500 to the next N API requests
    quota_routes: set[str] = field(default_factory=set)  # "samples" and/or "invoke" respond 402
    fail_training: bool = False
    # Route name -> (HTTP status, requests left to fail); see NyckelEmulator.route_name.
    failing_routes: dict[str, list[int]] = field(default_factory=dict)


class ImagePayloadError(ValueError):
    """A request's ``data`` field is not a base64 data URI of a decodable image."""


def image_histogram(data: bytes) -> np.ndarray:
    """Return the normalised 64-bin joint colour histogram of an encoded image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            thumbnail = image.convert("RGB").resize(THUMBNAIL_SIZE, Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImagePayloadError(f"the image cannot be decoded ({exc})") from exc
    levels = np.asarray(thumbnail, dtype=np.uint16) * HISTOGRAM_LEVELS // 256
    bins = (levels[..., 0] * HISTOGRAM_LEVELS + levels[..., 1]) * HISTOGRAM_LEVELS + levels[..., 2]
    counts = np.bincount(bins.ravel(), minlength=HISTOGRAM_LEVELS ** 3).astype(np.float64)
    return counts / counts.sum()


def decode_data_uri(value) -> bytes:
    if not isinstance(value, str) or not value.startswith("data:") or ";base64," not in value:
        raise ImagePayloadError("'data' must be a base64 data URI such as data:image/jpeg;base64,...")
    try:
        return base64.b64decode(value.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImagePayloadError(f"'data' is not valid base64 ({exc})") from exc


class ApiError(Exception):
    """An error response: HTTP status and Nyckel-style JSON body."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"message": message, **extra}


class NyckelEmulator(LoopbackEmulator):
    """A threaded HTTP server on 127.0.0.1 that behaves like the Nyckel API subset above.

    ``training_polls`` is the number of status polls (metrics or function
    reads) after the last upload before training finishes. ``token_ttl_s`` is
    the token lifetime it reports and enforces, measured on ``time_source``
    (seconds, monotonic), which tests may replace to make tokens expire.
    """

    service_name = "Nyckel"

    def __init__(self, *, port: int = 0, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, token_ttl_s: float = 3600.0,
                 training_polls: int = 3, seed: int = 0, time_source: Callable[[], float] = time.monotonic):
        self.port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl_s = token_ttl_s
        self.training_polls = training_polls
        self.time_source = time_source
        self.faults = Faults()
        self.functions: dict[str, EmulatedFunction] = {}
        self.deleted_functions: list[str] = []
        self.tokens: dict[str, float] = {}  # token -> expiry on time_source
        self.tokens_issued = 0
        self.invocations = 0
        self.captured_invocations = 0
        self.throttled = 0
        self.requests = 0
        self.functions_created = 0
        self.samples_created = 0
        self.request_callbacks: dict[str, Callable[[], None]] = {}
        self._lock = threading.RLock()
        self._random = random.Random(seed)

    # Fault injection and inspection -------------------------------------------

    def throttle(self, count: int) -> None:
        """Respond with HTTP 429 to the next ``count`` API requests."""
        with self._lock:
            self.faults.throttle_next = count

    def fail_with_server_error(self, count: int) -> None:
        """Respond with HTTP 500 to the next ``count`` API requests."""
        with self._lock:
            self.faults.server_error_next = count

    def exceed_quota(self, route: str) -> None:
        """Respond with HTTP 402 to every request on ``route``: "samples" or "invoke"."""
        if route not in ("samples", "invoke"):
            raise ValueError(f"invalid quota route {route!r}; use 'samples' or 'invoke'")
        with self._lock:
            self.faults.quota_routes.add(route)

    def fail_training(self) -> None:
        """Make every training that finishes from now on fail."""
        with self._lock:
            self.faults.fail_training = True

    def fail_route(self, route: str, status: int = HTTPStatus.BAD_REQUEST, count: int = 1_000_000) -> None:
        """Respond with ``status`` to the next ``count`` requests on ``route`` (see ``route_name``)."""
        with self._lock:
            self.faults.failing_routes[route] = [int(status), count]

    def on_request(self, route: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, in the server thread, when the first request on ``route`` arrives."""
        with self._lock:
            self.request_callbacks[route] = callback

    @staticmethod
    def route_name(method: str, path: str) -> str:
        """Name a request's route: create, list, delete, labels, samples, metrics, read, invoke or token."""
        if path == "/connect/token":
            return "token"
        if path == "/v1/functions":
            return "create" if method == "POST" else "list"
        match = _FUNCTION_PATH.match(path)
        if match is None:
            return "unknown"
        if match["part"] is None:
            return "delete" if method == "DELETE" else "read"
        return match["part"]

    def function_names(self) -> list[str]:
        with self._lock:
            return [function.name for function in self.functions.values()]

    def samples(self, function_id: str) -> list[EmulatedSample]:
        with self._lock:
            return list(self.functions[function_id].samples.values())

    # Request handling ---------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes) -> tuple[int, dict | list]:
        """Handle one request and return (HTTP status, JSON body)."""
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        route = self.route_name(method, path)
        with self._lock:
            self.requests += 1
            callback = self.request_callbacks.pop(route, None)
        if callback is not None:
            callback()
        try:
            if method == "POST" and path == "/connect/token":
                return HTTPStatus.OK, self._issue_token(headers, body)
            self._authenticate(headers)
            self._inject_faults()
            self._fail_route(route)
            return self._route(method, path, query, body)
        except ApiError as exc:
            return exc.status, exc.body

    def _issue_token(self, headers, body: bytes) -> dict:
        if "application/x-www-form-urlencoded" not in headers.get("Content-Type", ""):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the token request must be form-encoded")
        form = {key: values[0] for key, values in parse_qs(body.decode("utf-8")).items()}
        if form.get("grant_type") != "client_credentials":
            raise ApiError(HTTPStatus.BAD_REQUEST, "unsupported_grant_type", error="unsupported_grant_type")
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "invalid_client", error="invalid_client")
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[token] = self.time_source() + self.token_ttl_s
            self.tokens_issued += 1
        return {"access_token": token, "expires_in": int(self.token_ttl_s), "token_type": "Bearer"}

    def _authenticate(self, headers) -> None:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing bearer token")
        with self._lock:
            expiry = self.tokens.get(token)
        if expiry is None:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "invalid bearer token")
        if self.time_source() >= expiry:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "the bearer token has expired")

    def _inject_faults(self) -> None:
        with self._lock:
            if self.faults.throttle_next > 0:
                self.faults.throttle_next -= 1
                self.throttled += 1
                raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, "rate limit exceeded")
            if self.faults.server_error_next > 0:
                self.faults.server_error_next -= 1
                raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "injected server error")

    def _fail_route(self, route: str) -> None:
        with self._lock:
            failing = self.faults.failing_routes.get(route)
            if not failing or failing[1] <= 0:
                return
            failing[1] -= 1
            status = failing[0]
        raise ApiError(status, f"injected failure of the {route} route")

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict | list]:
        if path == "/v1/functions":
            if method == "GET":
                with self._lock:
                    return HTTPStatus.OK, [function.as_json() for function in self.functions.values()]
            if method == "POST":
                return HTTPStatus.OK, self._create_function(read_json_object(body, ApiError))
        match = _FUNCTION_PATH.match(path)
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route for {method} {path}")
        function = self._function(match["id"])
        version, part = match["version"], match["part"]
        routes = {
            ("DELETE", "v1", None): lambda: self._delete_function(function),
            ("POST", "v1", "labels"): lambda: self._create_label(function, read_json_object(body, ApiError)),
            ("POST", "v1", "samples"): lambda: self._create_sample(function, read_json_object(body, ApiError)),
            ("POST", "v1", "invoke"): lambda: self._invoke(function, read_json_object(body, ApiError), query),
            ("GET", "v0.9", None): lambda: self._read_function(function),
            ("GET", "v0.9", "metrics"): lambda: self._metrics(function),
        }
        action = routes.get((method, version, part))
        if action is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route for {method} {path}")
        return action()

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}_{self._random.getrandbits(64):016x}"

    def _function(self, function_id: str) -> EmulatedFunction:
        with self._lock:
            function = self.functions.get(function_id)
        if function is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"function {function_id} not found")
        return function

    def _create_function(self, body: dict) -> dict:
        if body.get("input") != "Image" or body.get("output") != "Classification":
            raise ApiError(HTTPStatus.BAD_REQUEST, "only Image input and Classification output are emulated")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'name' is required")
        function = EmulatedFunction(id=self._new_id("function"), name=name, input="Image",
                                    output="Classification")
        with self._lock:
            self.functions[function.id] = function
            self.functions_created += 1
        return function.as_json()

    def _delete_function(self, function: EmulatedFunction) -> tuple[int, dict]:
        with self._lock:
            del self.functions[function.id]
            self.deleted_functions.append(function.id)
        return HTTPStatus.OK, {}

    def _create_label(self, function: EmulatedFunction, body: dict) -> tuple[int, dict]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'name' is required")
        with self._lock:
            if name in function.labels.values():
                raise ApiError(HTTPStatus.CONFLICT, f"label {name!r} exists")
            label_id = self._new_id("label")
            function.labels[label_id] = name
        return HTTPStatus.OK, {"id": label_id, "name": name}

    def _create_sample(self, function: EmulatedFunction, body: dict) -> tuple[int, dict]:
        if "samples" in self.faults.quota_routes:
            raise ApiError(HTTPStatus.PAYMENT_REQUIRED, "sample quota exceeded for this account")
        label_name = (body.get("annotation") or {}).get("labelName")
        external_id = body.get("externalId")
        with self._lock:
            if label_name is not None and label_name not in function.labels.values():
                raise ApiError(HTTPStatus.BAD_REQUEST, f"label {label_name!r} does not exist in the function")
            for sample in function.samples.values():
                if external_id is not None and sample.external_id == external_id:
                    raise ApiError(HTTPStatus.CONFLICT, "a sample with this externalId exists",
                                   existingSampleId=sample.id)
        histogram = self._histogram(body)
        sample = EmulatedSample(id=self._new_id("sample"), label_name=label_name, external_id=external_id,
                                histogram=histogram)
        with self._lock:
            function.samples[sample.id] = sample
            self.samples_created += 1
            function.is_training = True
            function.polls_left = self.training_polls
        result = {"id": sample.id, "externalId": external_id}
        if label_name is not None:
            result["annotation"] = {"labelName": label_name}
        return HTTPStatus.OK, result

    def _histogram(self, body: dict) -> np.ndarray:
        try:
            return image_histogram(decode_data_uri(body.get("data")))
        except ImagePayloadError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc

    def _poll(self, function: EmulatedFunction) -> None:
        """Count one status poll; the last one of a training run finishes it."""
        with self._lock:
            if not function.is_training:
                return
            function.polls_left -= 1
            if function.polls_left > 0:
                return
            function.is_training = False
            if self.faults.fail_training:
                function.state = FAILED_STATE
                return
            by_label: dict[str, list[np.ndarray]] = {}
            for sample in function.samples.values():
                if sample.label_name is not None:
                    by_label.setdefault(sample.label_name, []).append(sample.histogram)
            function.centroids = {label: np.mean(histograms, axis=0) for label, histograms in by_label.items()}
            function.prediction_count = len(function.samples)
            function.state = TRAINED_STATE if len(function.centroids) >= 2 else UNTRAINED_STATE

    def _read_function(self, function: EmulatedFunction) -> tuple[int, dict]:
        self._poll(function)
        with self._lock:
            return HTTPStatus.OK, {**function.as_json(), "state": function.state}

    def _metrics(self, function: EmulatedFunction) -> tuple[int, dict]:
        self._poll(function)
        with self._lock:
            annotated = [sample for sample in function.samples.values() if sample.label_name is not None]
            counts: dict[str, int] = {}
            for sample in annotated:
                counts[sample.label_name] = counts.get(sample.label_name, 0) + 1
            return HTTPStatus.OK, {
                "sampleCount": len(function.samples),
                "annotatedSampleCount": len(annotated),
                "predictionCount": function.prediction_count,
                "isTraining": function.is_training,
                "annotatedLabelCounts": counts,
            }

    def _invoke(self, function: EmulatedFunction, body: dict, query: dict) -> tuple[int, dict]:
        if "invoke" in self.faults.quota_routes:
            raise ApiError(HTTPStatus.PAYMENT_REQUIRED, "invoke quota exceeded for this account")
        histogram = self._histogram(body)
        with self._lock:
            centroids = dict(function.centroids)
            labels = {name: label_id for label_id, name in function.labels.items()}
            self.invocations += 1
            capture = query.get("capture", ["true"])[0].lower() != "false"
            if capture:
                # Nyckel keeps captured inputs as unlabelled samples of the function.
                self.captured_invocations += 1
                sample = EmulatedSample(id=self._new_id("sample"), label_name=None, external_id=None,
                                        histogram=histogram, captured=True)
                function.samples[sample.id] = sample
        if not centroids:
            raise ApiError(HTTPStatus.CONFLICT, "the function has no trained model yet")
        names = sorted(centroids)
        distances = np.array([float(np.abs(histogram - centroids[name]).sum()) for name in names])
        weights = np.exp(-(distances - distances.min()) / CONFIDENCE_TEMPERATURE)
        best = int(np.argmin(distances))
        confidence = float(weights[best] / weights.sum())
        return HTTPStatus.OK, {"labelName": names[best], "labelId": labels.get(names[best]),
                               "confidence": round(confidence, 4)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm and
    # delayed ACKs that adds about 40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    emulator: NyckelEmulator

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload = self.emulator.handle(self.command, self.path, self.headers, body)
        except Exception:  # a bug in the emulator: respond with 500 so the client sees it, and log it
            logger.exception("Nyckel emulator failed on %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"message": "emulator error"}
        data = json.dumps(payload).encode("utf-8")
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _dispatch

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


NyckelEmulator.handler_base = _Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Nyckel API emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: 0, any free port)")
    parser.add_argument("--training-polls", type=int, default=3,
                        help="status polls before training finishes (default: 3)")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="token lifetime in seconds (default: 3600)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID, help="client id to accept")
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET, help="client secret to accept")
    args = parser.parse_args(argv)
    emulator = NyckelEmulator(port=args.port, client_id=args.client_id, client_secret=args.client_secret,
                              token_ttl_s=args.token_ttl, training_polls=args.training_polls)
    serve_until_interrupted(emulator)


if __name__ == "__main__":
    main()

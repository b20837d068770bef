"""An emulator of the Vertex AI and Cloud Storage REST calls that ``providers.vertex`` makes.

Vertex AI routes (``/v1``, JSON as the ``aiplatform_v1`` REST transport of
google-cloud-aiplatform sends it):

* ``POST|GET .../datasets``, ``GET|DELETE .../datasets/{id}``,
  ``POST .../datasets/{id}:import``.
* ``POST|GET .../trainingPipelines``, ``GET|DELETE .../trainingPipelines/{id}``.
* ``GET .../models`` and ``GET|DELETE .../models/{id}``.
* ``POST|GET .../endpoints``, ``GET|DELETE .../endpoints/{id}``,
  ``POST .../endpoints/{id}:deployModel``, ``:undeployModel``, ``:predict``.
* ``GET .../operations/{id}`` under any resource, below ``/v1`` or ``/ui``:
  long-running operations.

Cloud Storage routes (the JSON API as google-cloud-storage calls it):
``POST /upload/storage/v1/b/{bucket}/o`` (``uploadType=multipart`` or
``media``), ``GET /storage/v1/b/{bucket}`` (bucket metadata), ``GET /storage/v1/b/{bucket}/o``
(list by prefix), and
``GET|DELETE /storage/v1/b/{bucket}/o/{object}``.

Resource names carry a project number, as the service returns them, whatever
project id the request named. Lists accept ``filter`` expressions of the forms
``labels.KEY="VALUE"`` and ``labels.KEY:*``, joined by ``AND``.

The "model" is deterministic and cheap: the nearest mean 64-bin colour
histogram of the images imported with ML_USE ``training`` (see
``imgbench.emulators.nyckel.image_histogram``). Operations finish after
``operation_polls`` reads and training after ``training_polls`` reads, so a
provider's waiting loops run. Fault injection fails imports or training,
responds to matching requests with an error status (429 RESOURCE_EXHAUSTED
for quota), or closes the connection without a response; ``on_request``
runs a callback (such as sending a signal to the process under test) when
a matching request first arrives.

Use it as a context manager in tests, or run
``python -m imgbench.emulators.vertex --port 8766`` to record cassettes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from imgbench.emulators.nyckel import ImagePayloadError, image_histogram

from imgbench.emulators.server import LoopbackEmulator, read_json_object, serve_until_interrupted

logger = logging.getLogger(__name__)

# The project number that resource names carry.
DEFAULT_PROJECT_NUMBER = "481516234200"

# Online prediction rejects larger request bodies: 1.5 MB, per
# https://cloud.google.com/sdk/gcloud/reference/ai/endpoints/predict.
PREDICT_PAYLOAD_LIMIT_BYTES = 1_572_864

ML_USE_LABEL = "aiplatform.googleapis.com/ml_use"
ML_USES = ("training", "validation", "test")

# google.rpc.Code values and the HTTP statuses the REST API maps them to.
RPC_STATUS = {
    HTTPStatus.BAD_REQUEST: (3, "INVALID_ARGUMENT"),
    HTTPStatus.NOT_FOUND: (5, "NOT_FOUND"),
    HTTPStatus.CONFLICT: (6, "ALREADY_EXISTS"),
    HTTPStatus.FORBIDDEN: (7, "PERMISSION_DENIED"),
    HTTPStatus.TOO_MANY_REQUESTS: (8, "RESOURCE_EXHAUSTED"),
    HTTPStatus.PRECONDITION_FAILED: (9, "FAILED_PRECONDITION"),
    HTTPStatus.INTERNAL_SERVER_ERROR: (13, "INTERNAL"),
    HTTPStatus.SERVICE_UNAVAILABLE: (14, "UNAVAILABLE"),
}

TYPE_PREFIX = "type.googleapis.com/"
# Operation reads come under /ui/ as well: the REST operations client of
# google-api-core lists those URI patterns first (seen with aiplatform 2.7).
LOCATION_PATH = re.compile(r"^/(?:v1|ui)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/:]+)(?P<rest>/.*)?$")
LABEL_EQUALS = re.compile(r'^labels\.(?P<key>[\w./-]+)\s*=\s*"?(?P<value>[^"]*)"?$')
LABEL_PRESENT = re.compile(r"^labels\.(?P<key>[\w./-]+)\s*:\s*\*$")


class ApiError(Exception):
    """An error response with a ``google.rpc.Status``-shaped JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        code, name = RPC_STATUS.get(HTTPStatus(self.status), (2, "UNKNOWN"))
        self.rpc_code = code
        self.body = {"error": {"code": self.status, "message": message, "status": name}}


class ResetConnection(Exception):
    """Close the connection without a response."""


@dataclass
class Faults:
    fail_import: bool = False
    fail_training: bool = False
    # (compiled "METHOD /path" pattern, HTTP status, remaining count) for each rule.
    error_rules: list = field(default_factory=list)
    resets_left: int = 0
    reset_pattern: re.Pattern | None = None


@dataclass
class StoredObject:
    bucket: str
    name: str
    data: bytes
    content_type: str
    generation: int

    def as_json(self) -> dict:
        return {"kind": "storage#object", "id": f"{self.bucket}/{self.name}/{self.generation}",
                "bucket": self.bucket, "name": self.name, "size": str(len(self.data)),
                "contentType": self.content_type, "generation": str(self.generation),
                "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode("ascii")}


@dataclass
class Operation:
    name: str
    polls_left: int
    response: dict | None = None
    error: dict | None = None
    # Called once when the operation finishes; returns (response, error).
    finish: object = None

    def as_json(self) -> dict:
        body: dict = {"name": self.name, "done": self.polls_left <= 0}
        if self.polls_left <= 0:
            if self.error is not None:
                body["error"] = self.error
            else:
                body["response"] = self.response or {"@type": TYPE_PREFIX + "google.protobuf.Empty"}
        return body


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _matches_filter(labels: dict, expression: str) -> bool:
    """Return True when ``labels`` satisfy a filter of ``labels.KEY="VALUE"`` / ``labels.KEY:*`` terms."""
    for term in (part.strip() for part in re.split(r"\s+AND\s+", expression.strip()) if part.strip()):
        equals, present = LABEL_EQUALS.match(term), LABEL_PRESENT.match(term)
        if equals:
            if labels.get(equals["key"]) != equals["value"]:
                return False
        elif present:
            if present["key"] not in labels:
                return False
        else:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unsupported filter term {term!r}; the emulator supports "
                                                   'labels.KEY="VALUE" and labels.KEY:*')
    return True


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """Split a ``multipart/related`` body into (content type, data) parts."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"multipart content type without boundary: {content_type!r}")
    separator = b"--" + match.group(1).encode("latin-1")
    parts = []
    for chunk in body.split(separator)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        part_type = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.strip()
        parts.append((part_type, data.removesuffix(b"\r\n")))
    return parts


class VertexEmulator(LoopbackEmulator):
    """A threaded HTTP server on 127.0.0.1 that behaves like the Vertex AI and Storage subset above."""

    service_name = "Vertex AI"

    def __init__(self, *, port: int = 0, project_number: str = DEFAULT_PROJECT_NUMBER,
                 operation_polls: int = 1, training_polls: int = 3):
        self.port = port
        self.project_number = project_number
        self.operation_polls = operation_polls
        self.training_polls = training_polls
        self.faults = Faults()
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.datasets: dict[str, dict] = {}
        self.data_items: dict[str, list[dict]] = {}
        self.pipelines: dict[str, dict] = {}
        self.pipeline_polls: dict[str, int] = {}
        self.models: dict[str, dict] = {}
        self.centroids: dict[str, tuple[list[str], np.ndarray]] = {}
        self.endpoints: dict[str, dict] = {}
        self.operations: dict[str, Operation] = {}
        # (compiled "METHOD /path" pattern, callback) pairs; each runs once.
        self.request_callbacks: list[tuple[re.Pattern, Callable[[], None]]] = []
        self.requests = 0
        self.predictions = 0
        self._next_id = 1000
        self._generation = 1
        self._lock = threading.RLock()

    # Fault injection and inspection -------------------------------------------

    def fail_imports(self) -> None:
        """Make every data import finish with an error."""
        with self._lock:
            self.faults.fail_import = True

    def fail_training(self) -> None:
        """Make every training pipeline end in PIPELINE_STATE_FAILED."""
        with self._lock:
            self.faults.fail_training = True

    def fail_requests(self, pattern: str, status: int = HTTPStatus.INTERNAL_SERVER_ERROR, count: int = 1) -> None:
        """Respond to the next ``count`` requests whose ``METHOD /path`` matches the regex ``pattern`` with ``status``."""
        with self._lock:
            self.faults.error_rules.append([re.compile(pattern), int(status), count])

    def exceed_quota(self, pattern: str, count: int = 1) -> None:
        """Respond to matching requests with HTTP 429 RESOURCE_EXHAUSTED, as a quota error."""
        self.fail_requests(pattern, HTTPStatus.TOO_MANY_REQUESTS, count)

    def reset_connections(self, count: int, pattern: str = ".*") -> None:
        """Close the connection of the next ``count`` matching requests without a response."""
        with self._lock:
            self.faults.resets_left = count
            self.faults.reset_pattern = re.compile(pattern)

    def on_request(self, pattern: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, in the server thread, when a request whose ``METHOD /path`` matches arrives."""
        with self._lock:
            self.request_callbacks.append((re.compile(pattern), callback))

    def resource_counts(self) -> dict[str, int]:
        """Count the resources that exist now, by kind; all zero once a case cleaned up."""
        with self._lock:
            return {"objects": len(self.objects), "datasets": len(self.datasets),
                    "training_pipelines": len(self.pipelines), "models": len(self.models),
                    "endpoints": len(self.endpoints),
                    "deployed_models": sum(len(e["deployedModels"]) for e in self.endpoints.values())}

    # Request handling ---------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes) -> tuple[int, dict | None]:
        """Handle one request and return (HTTP status, JSON body or None for an empty body)."""
        parts = urlsplit(target)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self._run_request_callback(f"{method} {path}")
        with self._lock:
            self.requests += 1
            try:
                self._inject_faults(f"{method} {path}")
                if path.startswith(("/storage/v1/", "/upload/storage/v1/")):
                    return self._route_storage(method, path, query, headers, body)
                return self._route_vertex(method, path, query, body)
            except ApiError as exc:
                logger.info("emulator responded to %s %s with HTTP %d: %s", method, path, exc.status, exc)
                return exc.status, exc.body

    def _run_request_callback(self, request_line: str) -> None:
        with self._lock:
            matching = next((entry for entry in self.request_callbacks if entry[0].search(request_line)), None)
            if matching is not None:
                self.request_callbacks.remove(matching)
        if matching is not None:
            matching[1]()

    def _inject_faults(self, request_line: str) -> None:
        faults = self.faults
        if faults.resets_left > 0 and faults.reset_pattern.search(request_line):
            faults.resets_left -= 1
            raise ResetConnection(request_line)
        for rule in faults.error_rules:
            pattern, status, remaining = rule
            if remaining > 0 and pattern.search(request_line):
                rule[2] -= 1
                reason = "Quota exceeded" if status == HTTPStatus.TOO_MANY_REQUESTS else "Injected failure"
                raise ApiError(status, f"{reason} for {request_line} (emulator fault injection)")

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _parent(self, location: str) -> str:
        return f"projects/{self.project_number}/locations/{location}"

    # Cloud Storage ------------------------------------------------------------

    def _route_storage(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict | None]:
        upload = re.match(r"^/upload/storage/v1/b/([^/]+)/o$", path)
        if upload and method == "POST":
            return HTTPStatus.OK, self._upload(upload.group(1), query, headers, body)
        bucket = re.match(r"^/storage/v1/b/([^/]+)$", path)
        if bucket and method == "GET":
            return HTTPStatus.OK, {"kind": "storage#bucket", "id": bucket.group(1), "name": bucket.group(1),
                                   "projectNumber": self.project_number, "location": "US-CENTRAL1",
                                   "locationType": "region"}
        listing = re.match(r"^/storage/v1/b/([^/]+)/o$", path)
        if listing and method == "GET":
            prefix = query.get("prefix", [""])[0]
            items = [stored.as_json() for (bucket, name), stored in sorted(self.objects.items())
                     if bucket == listing.group(1) and name.startswith(prefix)]
            return HTTPStatus.OK, {"kind": "storage#objects", "items": items}
        single = re.match(r"^/storage/v1/b/([^/]+)/o/(.+)$", path)
        if single:
            key = (single.group(1), single.group(2))
            if key not in self.objects:
                raise ApiError(HTTPStatus.NOT_FOUND, f"No such object: {key[0]}/{key[1]}")
            if method == "GET":
                return HTTPStatus.OK, self.objects[key].as_json()
            if method == "DELETE":
                del self.objects[key]
                return HTTPStatus.NO_CONTENT, None
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown storage route {method} {path}")

    def _upload(self, bucket: str, query: dict, headers, body: bytes) -> dict:
        upload_type = query.get("uploadType", [""])[0]
        if upload_type == "multipart":
            parts = parse_multipart(body, headers.get("Content-Type", ""))
            if len(parts) != 2:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"a multipart upload needs 2 parts, not {len(parts)}")
            metadata = read_json_object(parts[0][1], ApiError)
            name, content_type, data = metadata.get("name"), parts[1][0], parts[1][1]
        elif upload_type == "media":
            name, content_type, data = query.get("name", [None])[0], headers.get("Content-Type", ""), body
        else:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unsupported uploadType {upload_type!r}; use multipart or media")
        if not name:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the upload names no object")
        self._generation += 1
        stored = StoredObject(bucket, name, data, content_type or "application/octet-stream", self._generation)
        self.objects[(bucket, name)] = stored
        return stored.as_json()

    def _read_gcs(self, uri: str) -> bytes:
        match = re.match(r"^gs://([^/]+)/(.+)$", uri)
        if not match or (match.group(1), match.group(2)) not in self.objects:
            raise ApiError(HTTPStatus.NOT_FOUND, f"the Cloud Storage object {uri} does not exist")
        return self.objects[(match.group(1), match.group(2))].data

    # Vertex AI ------------------------------------------------------------------

    def _route_vertex(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        match = LOCATION_PATH.match(path)
        if not match:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown Vertex AI route {method} {path}")
        location, rest = match["location"], match["rest"] or ""
        operation = re.match(r"^/.*/operations/([^/]+)$", rest)
        if operation and method == "GET":
            return HTTPStatus.OK, self._read_operation(operation.group(1))
        collection = re.match(r"^/(datasets|trainingPipelines|models|endpoints)$", rest)
        if collection:
            kind = collection.group(1)
            if method == "GET":
                return HTTPStatus.OK, self._list(kind, query.get("filter", [""])[0])
            if method == "POST" and kind != "models":
                return HTTPStatus.OK, self._create(kind, location, read_json_object(body, ApiError))
        resource = re.match(r"^/(datasets|trainingPipelines|models|endpoints)/([^/:]+)(?::(\w+))?$", rest)
        if resource:
            kind, resource_id, verb = resource.groups()
            store = self._store(kind)
            if resource_id not in store:
                raise ApiError(HTTPStatus.NOT_FOUND, f"the {kind[:-1]} {resource_id} does not exist")
            if verb is None and method == "GET":
                return HTTPStatus.OK, self._read(kind, resource_id)
            if verb is None and method == "DELETE":
                return HTTPStatus.OK, self._delete(kind, resource_id)
            if method == "POST":
                return HTTPStatus.OK, self._act(kind, resource_id, verb, read_json_object(body, ApiError), len(body))
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown Vertex AI route {method} {path}")

    def _store(self, kind: str) -> dict:
        return {"datasets": self.datasets, "trainingPipelines": self.pipelines,
                "models": self.models, "endpoints": self.endpoints}[kind]

    def _operation(self, resource_name: str, response: dict | None = None, finish=None) -> dict:
        operation_id = self._new_id()
        name = f"{resource_name}/operations/{operation_id}"
        self.operations[operation_id] = Operation(name, self.operation_polls, response, finish=finish)
        return self.operations[operation_id].as_json()

    def _read_operation(self, operation_id: str) -> dict:
        operation = self.operations.get(operation_id)
        if operation is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"the operation {operation_id} does not exist")
        operation.polls_left -= 1
        if operation.polls_left == 0 and operation.finish is not None:
            operation.response, operation.error = operation.finish()
        return operation.as_json()

    def _list(self, kind: str, expression: str) -> dict:
        items = [self._read(kind, key) for key, value in self._store(kind).items()
                 if _matches_filter(value.get("labels") or {}, expression)]
        return {kind: items} if items else {}

    def _read(self, kind: str, resource_id: str) -> dict:
        if kind == "trainingPipelines":
            self._advance_training(resource_id)
        return dict(self._store(kind)[resource_id])

    # Creation -----------------------------------------------------------------

    def _create(self, kind: str, location: str, body: dict) -> dict:
        resource_id = self._new_id()
        name = f"{self._parent(location)}/{kind}/{resource_id}"
        labels = body.get("labels") or {}
        common = {"name": name, "displayName": body.get("displayName", ""), "labels": labels,
                  "createTime": _now(), "updateTime": _now()}
        if kind == "datasets":
            if not body.get("metadataSchemaUri"):
                raise ApiError(HTTPStatus.BAD_REQUEST, "metadataSchemaUri is required")
            self.datasets[resource_id] = {**common, "metadataSchemaUri": body["metadataSchemaUri"]}
            self.data_items[resource_id] = []
            response = {"@type": TYPE_PREFIX + "google.cloud.aiplatform.v1.Dataset", **self.datasets[resource_id]}
            return self._operation(name, response)
        if kind == "endpoints":
            self.endpoints[resource_id] = {**common, "deployedModels": [], "trafficSplit": {}}
            response = {"@type": TYPE_PREFIX + "google.cloud.aiplatform.v1.Endpoint", **self.endpoints[resource_id]}
            return self._operation(name, response)
        return self._create_pipeline(resource_id, name, common, body)

    def _create_pipeline(self, resource_id: str, name: str, common: dict, body: dict) -> dict:
        inputs = body.get("inputDataConfig") or {}
        dataset_id = str(inputs.get("datasetId", ""))
        if dataset_id not in self.datasets:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"inputDataConfig.datasetId {dataset_id!r} names no dataset")
        task = body.get("trainingTaskInputs") or {}
        budget = int(task.get("budgetMilliNodeHours") or 0)
        if not 8000 <= budget <= 800000:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"budgetMilliNodeHours {budget} is outside 8000..800000")
        self.pipelines[resource_id] = {
            **common, "state": "PIPELINE_STATE_PENDING",
            "trainingTaskDefinition": body.get("trainingTaskDefinition", ""),
            "trainingTaskInputs": task, "inputDataConfig": inputs,
            "modelToUpload": dict(body.get("modelToUpload") or {}),
        }
        self.pipeline_polls[resource_id] = 0
        return dict(self.pipelines[resource_id])

    def _advance_training(self, pipeline_id: str) -> None:
        pipeline = self.pipelines[pipeline_id]
        if pipeline["state"] not in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
            return
        self.pipeline_polls[pipeline_id] += 1
        if self.pipeline_polls[pipeline_id] < self.training_polls:
            pipeline["state"] = "PIPELINE_STATE_RUNNING"
            return
        pipeline["endTime"] = pipeline["updateTime"] = _now()
        if self.faults.fail_training:
            pipeline["state"] = "PIPELINE_STATE_FAILED"
            pipeline["error"] = {"code": 13, "message": "Training failed (emulator fault injection)"}
            return
        try:
            classes, centroids = self._train(str(pipeline["inputDataConfig"]["datasetId"]))
        except ApiError as exc:
            pipeline["state"] = "PIPELINE_STATE_FAILED"
            pipeline["error"] = {"code": exc.rpc_code, "message": str(exc)}
            return
        model_id = self._new_id()
        location = pipeline["name"].split("/")[3]
        model_name = f"{self._parent(location)}/models/{model_id}"
        upload = pipeline["modelToUpload"]
        self.models[model_id] = {
            "name": model_name, "displayName": upload.get("displayName", ""), "labels": upload.get("labels") or {},
            "trainingPipeline": pipeline["name"], "createTime": _now(), "updateTime": _now(),
            "supportedDeploymentResourcesTypes": ["AUTOMATIC_RESOURCES"], "deployedModels": [],
        }
        self.centroids[model_id] = (classes, centroids)
        pipeline["state"] = "PIPELINE_STATE_SUCCEEDED"
        pipeline["modelToUpload"] = {**upload, "name": model_name}
        pipeline["modelId"] = model_id

    def _train(self, dataset_id: str) -> tuple[list[str], np.ndarray]:
        training = [item for item in self.data_items.get(dataset_id, []) if item["mlUse"] == "training"]
        if not training:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the dataset {dataset_id} has no items with ML_USE training")
        by_class: dict[str, list[np.ndarray]] = {}
        for item in training:
            by_class.setdefault(item["label"], []).append(item["histogram"])
        if len(by_class) < 2:
            raise ApiError(HTTPStatus.BAD_REQUEST, "single-label classification needs at least 2 labels")
        classes = sorted(by_class)
        return classes, np.stack([np.mean(by_class[name], axis=0) for name in classes])

    # Actions on one resource ------------------------------------------------------

    def _delete(self, kind: str, resource_id: str) -> dict:
        store = self._store(kind)
        name = store[resource_id]["name"]
        if kind == "endpoints" and store[resource_id]["deployedModels"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the endpoint {name} has deployed models; undeploy them first")
        if kind == "models" and any(d["model"] == name for e in self.endpoints.values()
                                    for d in e["deployedModels"]):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the model {name} is deployed; undeploy it first")
        del store[resource_id]
        if kind == "datasets":
            self.data_items.pop(resource_id, None)
        if kind == "models":
            self.centroids.pop(resource_id, None)
        return self._operation(name)

    def _act(self, kind: str, resource_id: str, verb: str | None, body: dict, size: int) -> dict:
        if kind == "datasets" and verb == "import":
            return self._import(resource_id, body)
        if kind == "endpoints" and verb == "deployModel":
            return self._deploy(resource_id, body)
        if kind == "endpoints" and verb == "undeployModel":
            return self._undeploy(resource_id, body)
        if kind == "endpoints" and verb == "predict":
            return self._predict(resource_id, body, size)
        raise ApiError(HTTPStatus.NOT_FOUND, f"unknown method {kind}:{verb}")

    def _import(self, dataset_id: str, body: dict) -> dict:
        configs = body.get("importConfigs") or []
        if not configs:
            raise ApiError(HTTPStatus.BAD_REQUEST, "importConfigs is empty")
        name = self.datasets[dataset_id]["name"]

        def finish():
            if self.faults.fail_import:
                return None, {"code": 3, "message": "Import failed (emulator fault injection)"}
            try:
                items = [item for config in configs for uri in config.get("gcsSource", {}).get("uris", [])
                         for item in self._read_import_file(uri)]
            except ApiError as exc:
                return None, {"code": exc.rpc_code, "message": str(exc)}
            if dataset_id in self.data_items:
                self.data_items[dataset_id].extend(items)
            return {"@type": TYPE_PREFIX + "google.cloud.aiplatform.v1.ImportDataResponse"}, None

        return self._operation(name, finish=finish)

    def _read_import_file(self, uri: str) -> list[dict]:
        text = self._read_gcs(uri).decode("utf-8")
        if uri.endswith(".jsonl"):
            rows = []
            for line in filter(None, text.splitlines()):
                entry = json.loads(line)
                rows.append(((entry.get("dataItemResourceLabels") or {}).get(ML_USE_LABEL, ""),
                             entry.get("imageGcsUri", ""), (entry.get("classificationAnnotation") or {})
                             .get("displayName", "")))
        else:
            rows = [tuple(row) for row in csv.reader(io.StringIO(text)) if row]
        items = []
        for row in rows:
            if len(row) != 3 or row[0] not in ML_USES or not row[1].startswith("gs://") or not row[2]:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid import row {row!r} in {uri}; "
                                                       "expected ML_USE,gs://BUCKET/OBJECT,LABEL")
            try:
                histogram = image_histogram(self._read_gcs(row[1]))
            except ImagePayloadError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"{row[1]}: {exc}") from exc
            items.append({"mlUse": row[0], "uri": row[1], "label": row[2], "histogram": histogram})
        return items

    def _deploy(self, endpoint_id: str, body: dict) -> dict:
        deployed = body.get("deployedModel") or {}
        model_name = deployed.get("model", "")
        model_id = model_name.rsplit("/", 1)[-1]
        if model_id not in self.models:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"deployedModel.model {model_name!r} names no model")
        resources = deployed.get("automaticResources") or {}
        if not resources.get("minReplicaCount"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "AutoML image models need automaticResources.minReplicaCount")
        endpoint = self.endpoints[endpoint_id]
        deployed_id = self._new_id()

        def finish():
            if endpoint_id not in self.endpoints or model_id not in self.models:
                return None, {"code": 5, "message": "the endpoint or the model was deleted during deployment"}
            entry = {"id": deployed_id, "model": model_name, "displayName": deployed.get("displayName", ""),
                     "automaticResources": resources, "createTime": _now()}
            endpoint["deployedModels"].append(entry)
            endpoint["trafficSplit"] = {deployed_id: 100}
            return {"@type": TYPE_PREFIX + "google.cloud.aiplatform.v1.DeployModelResponse",
                    "deployedModel": entry}, None

        return self._operation(endpoint["name"], finish=finish)

    def _undeploy(self, endpoint_id: str, body: dict) -> dict:
        endpoint = self.endpoints[endpoint_id]
        deployed_id = str(body.get("deployedModelId", ""))
        if not any(entry["id"] == deployed_id for entry in endpoint["deployedModels"]):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"deployedModelId {deployed_id!r} is not deployed here")
        endpoint["deployedModels"] = [entry for entry in endpoint["deployedModels"] if entry["id"] != deployed_id]
        endpoint["trafficSplit"] = {}
        return self._operation(endpoint["name"], {
            "@type": TYPE_PREFIX + "google.cloud.aiplatform.v1.UndeployModelResponse"})

    def _predict(self, endpoint_id: str, body: dict, size: int) -> dict:
        if size > PREDICT_PAYLOAD_LIMIT_BYTES:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Request payload size exceeds the limit: "
                                                   f"{PREDICT_PAYLOAD_LIMIT_BYTES} bytes.")
        endpoint = self.endpoints[endpoint_id]
        if not endpoint["deployedModels"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the endpoint {endpoint['name']} has no deployed model")
        deployed = endpoint["deployedModels"][0]
        classes, centroids = self.centroids[deployed["model"].rsplit("/", 1)[-1]]
        parameters = body.get("parameters") or {}
        threshold = float(parameters.get("confidenceThreshold", 0.5))
        limit = int(parameters.get("maxPredictions", 10))
        predictions = []
        for instance in body.get("instances") or []:
            try:
                data = base64.b64decode(str(instance.get("content", "")), validate=True)
                histogram = image_histogram(data)
            except (binascii.Error, ValueError, ImagePayloadError) as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"instances[].content is not a base64 image ({exc})") from exc
            weights = 1.0 / (np.abs(centroids - histogram).sum(axis=1) + 1e-6)
            confidences = weights / weights.sum()
            order = [int(i) for i in np.argsort(-confidences, kind="stable") if confidences[i] >= threshold][:limit]
            predictions.append({"ids": [str(i) for i in order], "displayNames": [classes[i] for i in order],
                                "confidences": [round(float(confidences[i]), 4) for i in order]})
        self.predictions += len(predictions)
        return {"predictions": predictions, "deployedModelId": deployed["id"], "model": deployed["model"],
                "modelDisplayName": deployed["displayName"]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    emulator: VertexEmulator

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload = self.emulator.handle(self.command, self.path, self.headers, body)
        except ResetConnection:
            logger.info("emulator reset the connection of %s %s (fault injection)", self.command, self.path)
            self.close_connection = True
            self.connection.close()
            return
        except Exception:  # a bug in the emulator: respond with 500 so the client sees it, and log it
            logger.exception("Vertex AI emulator failed on %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"code": 500, "message": "emulator error",
                                                                          "status": "INTERNAL"}}
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(int(status))
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _dispatch

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


VertexEmulator.handler_base = _Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Vertex AI and Cloud Storage emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: 0, any free port)")
    parser.add_argument("--operation-polls", type=int, default=1,
                        help="reads of a long-running operation before it is done (default: 1)")
    parser.add_argument("--training-polls", type=int, default=3,
                        help="reads of a training pipeline before training ends (default: 3)")
    parser.add_argument("--project-number", default=DEFAULT_PROJECT_NUMBER,
                        help=f"project number in resource names (default: {DEFAULT_PROJECT_NUMBER})")
    args = parser.parse_args(argv)
    emulator = VertexEmulator(port=args.port, project_number=args.project_number,
                              operation_polls=args.operation_polls, training_polls=args.training_polls)
    serve_until_interrupted(emulator)


if __name__ == "__main__":
    main()

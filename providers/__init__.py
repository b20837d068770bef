"""Provider registry: resolves provider names to classes.

Modules are imported lazily, so benchmarking one service never imports
another service's SDK.
"""

from __future__ import annotations

import importlib

from imgbench.errors import ConfigError
from providers.base import Prediction, Provider, TrainingSet

# name -> "module:Class"
PROVIDERS: dict[str, str] = {
    "huggingface": "providers.huggingface:HuggingFaceProvider",
    "local": "providers.local:LocalProvider",
    "nyckel": "providers.nyckel:NyckelProvider",
    "aws": "providers.aws:RekognitionProvider",
    "vertex": "providers.vertex:VertexProvider",
}


def provider_names() -> list[str]:
    return sorted(PROVIDERS)


def get_provider_class(name: str) -> type[Provider]:
    try:
        target = PROVIDERS[name]
    except KeyError:
        raise ConfigError(f"unknown provider {name!r}; valid providers: {', '.join(provider_names())}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_provider(name: str, bench_config: object) -> Provider:
    """Build a fresh provider object for one case."""
    return get_provider_class(name).from_config(bench_config)


__all__ = ["PROVIDERS", "Prediction", "Provider", "TrainingSet", "create_provider", "get_provider_class", "provider_names"]

"""Exception types shared by the suite, the providers and the command line.

Every provider maps its SDK's or HTTP client's errors to one of the
``ProviderError`` subclasses below, chaining the original exception, so a
report can count failures per service by ``kind``.
"""

from __future__ import annotations


class ImgbenchError(Exception):
    """Base class of every error that imgbench raises on purpose."""

    kind = "error"


class ConfigError(ImgbenchError):
    """An option, environment variable or configuration value is invalid."""

    kind = "config"


class DatasetError(ImgbenchError):
    """A dataset cannot be found, read or used as asked."""

    kind = "dataset"


class AblationSkipped(ImgbenchError):
    """An ablation requests more images per class than the dataset has."""

    kind = "skipped"


class ProviderError(ImgbenchError):
    """A provider's operation failed; subclasses name the kind of failure."""

    kind = "service_failure"


class AuthenticationError(ProviderError):
    kind = "authentication"


class MissingCredentialsError(AuthenticationError):
    kind = "missing_credentials"


class QuotaError(ProviderError):
    """The service rejected a request for quota, rate or spending limits."""

    kind = "quota"


class ThrottledError(QuotaError):
    kind = "throttling"


class ProviderTimeoutError(ProviderError):
    kind = "timeout"


class InvalidInputError(ProviderError):
    kind = "invalid_input"


class ServiceFailureError(ProviderError):
    kind = "service_failure"


class TrainingFailedError(ProviderError):
    kind = "training_failed"


def error_kind(exc: BaseException) -> str:
    """Return the error-vocabulary kind of ``exc`` (``"crash"`` for a bug)."""
    if isinstance(exc, ImgbenchError):
        return exc.kind
    if isinstance(exc, AssertionError):
        return "assertion"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "crash"

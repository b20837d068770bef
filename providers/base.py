"""The contract every provider implements, and the values that cross it.

A provider object serves one benchmark case: it uploads that case's training
set, trains, deploys, serves ``invoke`` calls, and ``teardown`` deletes
everything it created. Phases are separate methods so the suite can time
upload, training and deployment on its own clock.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import requests

from imgbench.ablation import PlannedImage
from imgbench.errors import ConfigError, MissingCredentialsError
from imgbench.ledger import NullLedger, RunLedger


@dataclass(frozen=True)
class Prediction:
    """The top label a service returned for one image, with its confidence (0..1)."""

    label: str
    confidence: float


@dataclass(frozen=True)
class TrainingSet:
    """The training data a provider uploads for one case: class names and labelled images."""

    case_id: str
    classes: tuple[str, ...]
    images: tuple[PlannedImage, ...]

    def by_role(self, role: str) -> list[PlannedImage]:
        return [image for image in self.images if image.role == role]


@dataclass(frozen=True)
class Leftover:
    """A resource found on a service that a run created and did not delete."""

    provider: str
    kind: str
    resource_id: str
    # The run prefix, tag or label that ties the resource to a run.
    run_marker: str = ""
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PriceModel:
    """A service's list prices in US dollars, with where and when they were read.

    ``None`` marks a price the service does not charge this way.
    """

    currency: str
    training_per_hour: float | None
    endpoint_per_hour: float | None
    per_1000_requests: float | None
    storage_per_gb_month: float | None
    source: str
    retrieved: str
    notes: str = ""
    # False when the prices could not be checked against the source; estimates then say so.
    verified: bool = True


class Provider(ABC):
    """One image-classification service under test.

    Resource bookkeeping: a cloud provider calls ``note_created`` as soon as a
    resource's id (or its name, before the create request) is known, and
    ``note_deleted`` after deleting it, so the run ledger lists whatever a
    crash leaves behind. When ``keep_model`` is True at teardown (the case was
    interrupted after training), ``teardown`` deletes everything billed by
    the hour but keeps the trained model, notes it with state ``kept``, and a
    resumed run gets it back through ``reuse_model``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # "local" for a provider that runs on this machine, "live" for a cloud service.
    # A cloud service's cases run in one of the run modes "replay", "emulator" or
    # "live", which the plugin chooses per run (see imgbench/config.py).
    mode: ClassVar[str]
    # True when the service holds out its own validation images, so it receives
    # all N images of an ablation as training images.
    validates_internally: ClassVar[bool] = False
    # Environment variables that must be set before a live run.
    credential_env: ClassVar[tuple[str, ...]] = ()
    # The pip extra that installs the provider's SDKs, and the modules it needs.
    extra: ClassVar[str | None] = None
    required_modules: ClassVar[tuple[str, ...]] = ()
    # Keys this provider reads from --provider-option (see BenchConfig.provider_option).
    option_keys: ClassVar[tuple[str, ...]] = ()
    # List prices for the cost estimate; None for a free provider.
    price_model: ClassVar[PriceModel | None] = None
    # Ledger kind of the resource that holds the trained model; a resumed run
    # offers the outstanding entries of this kind (and kept ones) to reuse_model.
    model_kind: ClassVar[str] = "model"

    # Set by the suite for each case; the defaults serve a provider used on its own.
    ledger: RunLedger = NullLedger()
    case_id: str = ""
    keep_model: bool = False

    @classmethod
    def from_config(cls, bench_config: Any) -> "Provider":
        """Build the provider for one case of a run configured by ``bench_config``."""
        return cls()

    def settings(self) -> dict:
        """Settings worth recording beside the results (never secrets)."""
        return {}

    def describe_model(self, model: Any) -> dict:
        """Facts about a trained model worth recording (ids, sizes, counts)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Event counts worth recording, such as throttled requests; read after teardown."""
        return {}

    def recording_rules(self) -> Any:
        """Return the cloud provider's ``imgbench.recording.RecordingRules``, or None where nothing is recorded."""
        return None

    def credentials_needed(self) -> bool:
        """Return True when ``check_ready`` must find the ``credential_env`` variables set."""
        return True

    def check_ready(self) -> None:
        """Raise a clear error when a required module or credential is missing."""
        missing_modules = [m for m in self.required_modules if importlib.util.find_spec(m) is None]
        if missing_modules:
            hint = f"pip install 'imgbench[{self.extra}]'" if self.extra else "install them"
            raise ConfigError(
                f"provider {self.name!r} needs the modules {', '.join(missing_modules)}; {hint}"
            )
        if not self.credentials_needed():
            return
        missing_env = [name for name in self.credential_env if not os.environ.get(name)]
        if missing_env:
            raise MissingCredentialsError(
                f"provider {self.name!r} needs the environment variables {', '.join(missing_env)}; "
                "set them to the service's credentials"
            )

    # Resource bookkeeping ----------------------------------------------------

    def note_created(self, kind: str, resource_id: str, **details: Any) -> None:
        """List a resource this case created (or is about to create) in the run ledger."""
        self.ledger.note_created(self.name, self.case_id, kind, resource_id, **details)

    def note_kept(self, kind: str, resource_id: str, **details: Any) -> None:
        """Mark a resource as left on purpose for a resumed run."""
        self.ledger.note_state(self.name, kind, resource_id, "kept", **details)

    def note_deleted(self, kind: str, resource_id: str) -> None:
        self.ledger.note_deleted(self.name, kind, resource_id)

    def reuse_model(self, training_set: "TrainingSet", details: dict) -> Any | None:
        """Return the model that a ledger entry of an earlier attempt describes, or None when it cannot serve.

        The suite calls this before ``upload`` when the run ledger lists an
        outstanding entry of this case that is ``kept`` or of kind
        ``model_kind``. ``details`` are the keyword arguments the provider
        gave ``note_created`` and ``note_kept`` for it, plus the suite's own
        fields, whose names start with ``imgbench_``. The default reuses nothing.
        """
        return None

    @classmethod
    def find_leftovers(cls, bench_config: Any, run_marker: str | None) -> list[Leftover]:
        """List the service's resources made by the run with ``run_marker`` (every imgbench run when None)."""
        return []

    @classmethod
    def delete_leftover(cls, bench_config: Any, leftover: Leftover) -> None:
        """Delete one resource that ``find_leftovers`` returned."""
        raise NotImplementedError(f"provider {cls.name!r} cannot delete leftovers")

    @abstractmethod
    def upload(self, training_set: TrainingSet) -> Any:
        """Send the training images to the service; return a handle for ``train``."""

    @abstractmethod
    def train(self, upload: Any) -> Any:
        """Train a model on an upload and wait until training ends; return the model."""

    @abstractmethod
    def deploy(self, model: Any) -> Any:
        """Make ``model`` serve requests; return once the endpoint responds."""

    @abstractmethod
    def invoke(self, endpoint: Any, image: bytes, session: requests.Session) -> Prediction:
        """Classify one image through the endpoint, reading the whole response."""

    @abstractmethod
    def teardown(self) -> None:
        """Delete everything this provider object created (but a kept model, see above); safe to call twice."""

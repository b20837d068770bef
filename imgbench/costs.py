"""Cost estimates of a benchmark matrix at the services' list prices, and the spend recorded so far.

A case's cost has three parts, each priced by the provider's ``PriceModel``:

* training: expected training hours x ``training_per_hour``;
* endpoint: hours the endpoint is up while the case needs it (deployment,
  the test set one request at a time, the load test at its concurrency)
  x ``endpoint_per_hour``;
* requests: test-set requests plus load-test requests (warm-up included)
  x ``per_1000_requests`` / 1000.

Expected durations are data in ``EXPECTED_DURATIONS``, each with its source;
every one of them is an estimate until live runs measure it. The spend so
far is computed the same way from the durations and request counts a case
record stores. Both are list prices before free tiers, discounts and taxes,
and storage is left out (it is small next to training for these datasets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from imgbench.config import BenchConfig, CaseSpec
from imgbench.errors import ConfigError

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class ExpectedDurations:
    """How long a provider's phases are expected to take; ``source`` names where each figure comes from."""

    training_hours_base: float
    training_hours_per_1000_images: float
    deployment_hours: float
    # Expected latency of one invoke in seconds.
    request_s: float
    source: str


# NOTE: every figure below is an estimate, not a measurement: replace them
# with the medians of recorded live runs once there are some.
EXPECTED_DURATIONS: dict[str, ExpectedDurations] = {
    "nyckel": ExpectedDurations(0.05, 0.05, 0.0, 0.3,
                                "estimate: Nyckel trains within minutes of the last upload and serves at once"),
    "aws": ExpectedDurations(1.0, 0.5, 0.5, 0.3,
                             "estimate: Rekognition Custom Labels training runs about an hour for small sets; "
                             "starting a model takes tens of minutes"),
    "vertex": ExpectedDurations(8.0, 0.0, 0.5, 0.2,
                                "estimate: AutoML image classification bills its training budget, 8 node hours "
                                "by default; deploying an endpoint takes tens of minutes"),
    "huggingface": ExpectedDurations(0.5, 0.5, 0.25, 0.2,
                                     "estimate: AutoTrain image classification on one GPU for small sets; an "
                                     "Inference Endpoint starts in minutes"),
}
DEFAULT_DURATIONS = ExpectedDurations(1.0, 0.5, 0.5, 0.3, "estimate: no figures for this provider; a guess")

# Test-set sizes and class counts from the datasets' published splits.
DATASET_SIZES: dict[str, tuple[int, int]] = {
    "beans": (128, 3),
    "cars": (8041, 196),
    "clothing": (10526, 14),
    "food": (25250, 101),
    "intel": (3000, 6),
    "pets": (3669, 37),
    "xrays": (624, 2),
}


@dataclass(frozen=True)
class CaseEstimate:
    """The expected cost of one case in US dollars, with the durations behind it."""

    case_id: str
    provider: str
    training_hours: float
    endpoint_hours: float
    requests: int
    training_usd: float
    endpoint_usd: float
    requests_usd: float
    prices_verified: bool
    # False for a cloud provider without price data, whose cost is unknown (counted as 0 here).
    prices_known: bool = True

    @property
    def total_usd(self) -> float:
        return self.training_usd + self.endpoint_usd + self.requests_usd

    def as_dict(self) -> dict:
        return {**asdict(self), "total_usd": self.total_usd}


@dataclass(frozen=True)
class MatrixEstimate:
    """The expected cost of a selected matrix."""

    cases: tuple[CaseEstimate, ...]

    @property
    def total_usd(self) -> float:
        return sum(case.total_usd for case in self.cases)

    def billed_usd(self, provider_modes: dict[str, str]) -> float:
        """Return the total over the cases that run live; replayed and emulated cases cost nothing."""
        return sum(case.total_usd for case in self.cases if provider_modes.get(case.provider) == "live")

    def by_case(self) -> dict[str, CaseEstimate]:
        return {case.case_id: case for case in self.cases}

    def unverified_providers(self) -> list[str]:
        return sorted({case.provider for case in self.cases if not case.prices_verified and case.prices_known})

    def unpriced_providers(self) -> list[str]:
        """Return the cloud providers whose cost is unknown because they have no price data."""
        return sorted({case.provider for case in self.cases if not case.prices_known})

    def format(self) -> str:
        """Return the estimate as a text table, one line per case and a total."""
        lines = [f"{'case':<32} {'train h':>8} {'endpoint h':>10} {'requests':>8} {'USD':>10}"]
        for case in self.cases:
            lines.append(f"{case.case_id:<32} {case.training_hours:>8.2f} {case.endpoint_hours:>10.2f} "
                         f"{case.requests:>8d} {case.total_usd:>10.2f}")
        lines.append(f"{'total':<32} {'':>8} {'':>10} {'':>8} {self.total_usd:>10.2f}")
        unverified = self.unverified_providers()
        if unverified:
            lines.append(f"prices of {', '.join(unverified)} are unverified placeholders; check the provider's "
                         "price_model source before trusting this total")
        unpriced = self.unpriced_providers()
        if unpriced:
            lines.append(f"no price data for {', '.join(unpriced)}: their cases count as 0 USD above, so the "
                         "real total is higher")
        lines.append("durations are estimates (imgbench/costs.py); prices are list prices before free tiers")
        return "\n".join(lines)


def price_model_of(provider: str):
    from providers import get_provider_class

    return get_provider_class(provider).price_model


def request_count(case: CaseSpec, bench_config: BenchConfig) -> int:
    test_images, _ = dataset_size(case.dataset)
    return test_images + bench_config.load.requests + bench_config.load.warmup


def dataset_size(dataset: str) -> tuple[int, int]:
    try:
        return DATASET_SIZES[dataset]
    except KeyError:
        raise ConfigError(f"no test-set size known for dataset {dataset!r}; add it to DATASET_SIZES in "
                          "imgbench/costs.py") from None


def estimate_case(case: CaseSpec, bench_config: BenchConfig) -> CaseEstimate:
    """Estimate one case's cost at list prices.

    A local provider costs nothing. A cloud provider without a price model
    gets its expected hours and requests but zero dollars, with
    ``prices_known=False``, so callers can tell unknown from free.
    """
    from providers import get_provider_class

    if get_provider_class(case.provider).mode == "local":
        return CaseEstimate(case.case_id, case.provider, 0.0, 0.0, 0, 0.0, 0.0, 0.0, True)
    prices = price_model_of(case.provider)
    durations = EXPECTED_DURATIONS.get(case.provider, DEFAULT_DURATIONS)
    test_images, classes = dataset_size(case.dataset)
    training_images = case.ablation * classes
    training_hours = durations.training_hours_base + durations.training_hours_per_1000_images * training_images / 1000
    load_requests = bench_config.load.requests + bench_config.load.warmup
    serving_s = test_images * durations.request_s + load_requests * durations.request_s / bench_config.load.concurrency
    endpoint_hours = durations.deployment_hours + serving_s / SECONDS_PER_HOUR
    requests = test_images + load_requests
    if prices is None:
        return CaseEstimate(case.case_id, case.provider, training_hours, endpoint_hours, requests, 0.0, 0.0, 0.0,
                            True, prices_known=False)
    return CaseEstimate(
        case_id=case.case_id, provider=case.provider, training_hours=training_hours,
        endpoint_hours=endpoint_hours, requests=requests,
        training_usd=training_hours * (prices.training_per_hour or 0.0),
        endpoint_usd=endpoint_hours * (prices.endpoint_per_hour or 0.0),
        requests_usd=requests / 1000 * (prices.per_1000_requests or 0.0),
        prices_verified=prices.verified,
    )


def estimate_matrix(bench_config: BenchConfig, skip: set[str] | frozenset[str] = frozenset()) -> MatrixEstimate:
    """Estimate every selected case but those whose ids are in ``skip`` (finished in an earlier attempt)."""
    return MatrixEstimate(tuple(estimate_case(case, bench_config) for case in bench_config.cases()
                                if case.case_id not in skip))


def recorded_spend(record: dict) -> float:
    """Return what a case record's durations and request counts cost at its provider's list prices.

    Only a live record costs anything; a replayed or emulated one returns 0.
    """
    if record.get("mode") != "live":
        return 0.0
    try:
        prices = price_model_of(record["provider"])
    except (KeyError, ConfigError):
        return 0.0
    if prices is None:
        return 0.0
    seconds = record.get("seconds", {})
    load = record.get("load_test") or {}
    predictions = record.get("predictions") or []
    test_s = sum(row.get("latency_s") or row.get("latency_with_retries_s") or 0.0 for row in predictions)
    endpoint_s = (seconds.get("deployment", 0.0) + test_s + load.get("wall_s", 0.0)
                  + seconds.get("teardown", 0.0)) if "deployment" in seconds else 0.0
    requests = len(predictions) + load.get("sent", 0) + load.get("warmup_requests", 0)
    return (seconds.get("training", 0.0) / SECONDS_PER_HOUR * (prices.training_per_hour or 0.0)
            + endpoint_s / SECONDS_PER_HOUR * (prices.endpoint_per_hour or 0.0)
            + requests / 1000 * (prices.per_1000_requests or 0.0))


def unenforceable_reason(estimate: MatrixEstimate, provider_modes: dict[str, str]) -> str | None:
    """Return why ``--max-cost`` cannot hold a run, because a live provider has no price data, or None."""
    unpriced = [name for name in estimate.unpriced_providers() if provider_modes.get(name) == "live"]
    if not unpriced:
        return None
    return (f"--max-cost cannot be enforced: there is no price data for {', '.join(unpriced)}; add its "
            "price_model in providers/, or leave it out of --providers in a live run")


def over_budget_reason(max_cost: float, spent: float, next_case: CaseEstimate) -> str | None:
    """Return why ``next_case`` must not start under ``max_cost``, or None when it fits."""
    if spent + next_case.total_usd <= max_cost:
        return None
    return (f"not started: spend so far {spent:.2f} USD plus this case's estimate {next_case.total_usd:.2f} USD "
            f"exceeds --max-cost {max_cost:.2f} USD; raise --max-cost to run it")

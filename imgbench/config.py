"""The benchmark run's configuration and the case matrix it selects.

Precedence: built-in defaults, then environment variables, then command-line
options. Unknown providers, datasets or ablations fail with the valid values.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from imgbench.ablation import STANDARD_ABLATIONS, validate_ablation
from imgbench.datasets import DATASETS_DIR_ENV, REGISTRY, get_spec
from imgbench.errors import ConfigError
from imgbench.loadgen import LoadConfig

DEFAULT_PROVIDERS = ("local",)
DEFAULT_DATASETS = ("beans", "xrays")


@dataclass(frozen=True)
class CaseSpec:
    """One (provider, dataset, ablation) case of the matrix."""

    provider: str
    dataset: str
    ablation: int

    @property
    def case_id(self) -> str:
        return f"{self.provider}-{self.dataset}-{self.ablation}"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run was asked to do."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    ablations: tuple[int, ...] = STANDARD_ABLATIONS
    datasets_dir: str | None = None
    dataset_paths: dict[str, str] = field(default_factory=dict)
    results_path: Path = Path("results/latest.json")
    run_id: str = ""
    load: LoadConfig = LoadConfig()
    seed: str = "imgbench-2023"
    cache_dir: Path | None = None

    def cases(self) -> list[CaseSpec]:
        return [CaseSpec(p, d, a) for p in self.providers for d in self.datasets for a in self.ablations]


def split_names(value: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise ConfigError(f"{option} is empty; give a comma-separated list")
    return names


def parse_providers(value: str) -> tuple[str, ...]:
    from providers import provider_names

    names = split_names(value, "--providers")
    unknown = [name for name in names if name not in provider_names()]
    if unknown:
        raise ConfigError(f"unknown provider(s) {', '.join(unknown)} in --providers; "
                          f"valid providers: {', '.join(provider_names())}")
    return names


def parse_datasets(value: str) -> tuple[str, ...]:
    names = split_names(value, "--datasets")
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {', '.join(unknown)} in --datasets; "
                          f"valid datasets: {', '.join(sorted(REGISTRY))}")
    for name in names:
        get_spec(name)
    return names


def parse_ablations(value: str) -> tuple[int, ...]:
    ablations = []
    for part in split_names(value, "--ablations"):
        try:
            number = int(part)
        except ValueError:
            raise ConfigError(f"invalid ablation {part!r} in --ablations; use whole numbers such as "
                              f"{','.join(map(str, STANDARD_ABLATIONS))}") from None
        validate_ablation(number)
        ablations.append(number)
    return tuple(ablations)


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def build_config(*, providers: str | None, datasets: str | None, ablations: str | None,
                 datasets_dir: str | None, dataset_paths: dict[str, str], results: str | None,
                 run_id: str | None, load_requests: int, load_concurrency: int, load_max_seconds: float,
                 seed: str, cache_dir: str | None) -> BenchConfig:
    run = run_id or new_run_id()
    return BenchConfig(
        providers=parse_providers(providers) if providers is not None else DEFAULT_PROVIDERS,
        datasets=parse_datasets(datasets) if datasets is not None else DEFAULT_DATASETS,
        ablations=parse_ablations(ablations) if ablations is not None else STANDARD_ABLATIONS,
        datasets_dir=datasets_dir or os.environ.get(DATASETS_DIR_ENV) or None,
        dataset_paths=dataset_paths,
        results_path=Path(results) if results else Path("results") / f"imgbench-{run}.json",
        run_id=run,
        load=LoadConfig(requests=load_requests, concurrency=load_concurrency, max_seconds=load_max_seconds),
        seed=seed,
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
    )

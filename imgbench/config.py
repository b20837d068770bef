"""The benchmark run's configuration and the case matrix it selects.

Precedence: built-in defaults, then environment variables, then command-line
options. Unknown providers, datasets or ablations fail with the valid values.

Each provider runs in one mode per run: ``local`` for a provider that runs on
this machine; for a cloud service ``replay`` (the default: responses come from
its cassettes), ``emulator`` (a service URL such as ``--nyckel-url`` was
given) or ``live`` (the real service).
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
from imgbench.recording import DEFAULT_RECORD_MODE, validate_record_mode

DEFAULT_PROVIDERS = ("local",)
DEFAULT_DATASETS = ("beans", "xrays")
DEFAULT_CASSETTE_DIR = Path("cassettes")
RUN_MODES = ("local", "replay", "emulator", "live")
# Environment variables that set a cloud provider's service URL (emulator mode).
SERVICE_URL_ENV = {
    "nyckel": "IMGBENCH_NYCKEL_URL",
    "aws": "IMGBENCH_AWS_URL",
    "vertex": "IMGBENCH_VERTEX_URL",
    "huggingface": "IMGBENCH_HUGGINGFACE_URL",
}


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
    # Run mode of each selected provider, one of RUN_MODES.
    provider_modes: dict[str, str] = field(default_factory=dict)
    # Service base URLs of providers in emulator mode.
    service_urls: dict[str, str] = field(default_factory=dict)
    # Provider settings from --provider-option, by provider name; see provider_option().
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    record_mode: str = DEFAULT_RECORD_MODE
    cassette_dir: Path = DEFAULT_CASSETTE_DIR

    def cases(self) -> list[CaseSpec]:
        return [CaseSpec(p, d, a) for p in self.providers for d in self.datasets for a in self.ablations]

    def case_mode(self, case: CaseSpec) -> str:
        return self.provider_modes.get(case.provider, "local")

    def provider_option(self, provider: str, key: str, env: str | None = None, default: str | None = None) -> str | None:
        """Return a provider setting: ``--provider-option``, then the environment variable ``env``, then ``default``."""
        value = self.provider_options.get(provider, {}).get(key)
        if value is None and env:
            value = os.environ.get(env) or None
        return default if value is None else value


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


def resolve_provider_modes(providers: tuple[str, ...], live: bool, service_urls: dict[str, str],
                           record_mode: str) -> dict[str, str]:
    """Choose each provider's run mode; raise ConfigError for a combination that cannot run."""
    from providers import get_provider_class

    modes = {}
    for name in providers:
        provider_class = get_provider_class(name)
        if provider_class.mode == "local":
            modes[name] = "local"
        elif live and name in service_urls:
            raise ConfigError(f"a live run and a {name} service URL ({service_urls[name]}) exclude each other; "
                              f"drop --{name}-url (or ${SERVICE_URL_ENV.get(name, 'its variable')}) for a live run, "
                              "or drop -m live / --live to use the emulator")
        elif live:
            modes[name] = "live"
        elif name in service_urls:
            modes[name] = "emulator"
        else:
            modes[name] = "replay"
            if record_mode != "none":
                raise ConfigError(
                    f"--record-mode {record_mode} needs a service to record {name} against: add "
                    f"--{name}-url http://127.0.0.1:PORT for the emulator, or -m live for the real service"
                )
    return modes


def missing_live_credentials(providers: tuple[str, ...], modes: dict[str, str]) -> list[str]:
    """Return the credential variables that live providers need and the environment lacks."""
    from providers import get_provider_class

    missing = []
    for name in providers:
        if modes.get(name) == "live":
            missing += [variable for variable in get_provider_class(name).credential_env
                        if not os.environ.get(variable) and variable not in missing]
    return missing


def parse_provider_options(values: list[str] | None) -> dict[str, dict[str, str]]:
    """Parse ``PROVIDER.KEY=VALUE`` settings; providers check their own keys in ``check_provider_options``."""
    from providers import provider_names

    options: dict[str, dict[str, str]] = {}
    for item in values or []:
        target, equals, value = item.partition("=")
        provider, dot, key = target.partition(".")
        if not equals or not dot or not provider or not key:
            raise ConfigError(f"invalid --provider-option {item!r}; use PROVIDER.KEY=VALUE, such as aws.bucket=NAME")
        if provider not in provider_names():
            raise ConfigError(f"unknown provider {provider!r} in --provider-option {item!r}; "
                              f"valid providers: {', '.join(provider_names())}")
        options.setdefault(provider, {})[key] = value
    return options


def check_provider_options(options: dict[str, dict[str, str]]) -> None:
    """Raise ConfigError for a key that its provider does not read (``Provider.option_keys``)."""
    from providers import get_provider_class

    for provider, values in options.items():
        known = get_provider_class(provider).option_keys
        unknown = sorted(set(values) - set(known))
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"unknown {provider} setting(s) {', '.join(unknown)} in --provider-option; "
                              f"valid keys: {valid}")


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def build_config(*, providers: str | None, datasets: str | None, ablations: str | None,
                 datasets_dir: str | None, dataset_paths: dict[str, str], results: str | None,
                 run_id: str | None, load_requests: int, load_concurrency: int, load_max_seconds: float,
                 load_warmup: int = 0,
                 seed: str, cache_dir: str | None, live: bool = False, service_urls: dict[str, str] | None = None,
                 record_mode: str = DEFAULT_RECORD_MODE, cassette_dir: str | None = None,
                 provider_options: dict[str, dict[str, str]] | None = None) -> BenchConfig:
    run = run_id or new_run_id()
    selected = parse_providers(providers) if providers is not None else DEFAULT_PROVIDERS
    urls = dict(service_urls or {})
    for name, variable in SERVICE_URL_ENV.items():
        if name not in urls and os.environ.get(variable):
            urls[name] = os.environ[variable]
    for name, url in urls.items():
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"invalid {name} service URL {url!r}; use http://HOST:PORT, "
                              "for example http://127.0.0.1:8765")
    record_mode = validate_record_mode(record_mode)
    check_provider_options(provider_options or {})
    return BenchConfig(
        providers=selected,
        datasets=parse_datasets(datasets) if datasets is not None else DEFAULT_DATASETS,
        ablations=parse_ablations(ablations) if ablations is not None else STANDARD_ABLATIONS,
        datasets_dir=datasets_dir or os.environ.get(DATASETS_DIR_ENV) or None,
        dataset_paths=dataset_paths,
        results_path=Path(results) if results else Path("results") / f"imgbench-{run}.json",
        run_id=run,
        load=LoadConfig(requests=load_requests, concurrency=load_concurrency, max_seconds=load_max_seconds,
                        warmup=load_warmup),
        seed=seed,
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
        provider_modes=resolve_provider_modes(selected, live, urls, record_mode),
        service_urls=urls,
        provider_options=dict(provider_options or {}),
        record_mode=record_mode,
        cassette_dir=Path(cassette_dir).expanduser() if cassette_dir else DEFAULT_CASSETTE_DIR,
    )

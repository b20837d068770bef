"""Finding and deleting what benchmark runs left on the services.

Two sources name leftovers: the run ledgers (``<ledger dir>/<run id>.json``,
see ``imgbench.ledger``), which list every resource not marked deleted, and
each provider's own listing (``Provider.find_leftovers``), which finds
resources by run tag or name prefix even where a ledger was lost. Both are
merged by (provider, kind, resource id). Deleting goes through
``Provider.delete_leftover`` and marks the resource deleted in every ledger
that lists it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from imgbench.config import SERVICE_URL_ENV, BenchConfig
from imgbench.errors import ConfigError
from imgbench.ledger import LedgerEntry, RunLedger
from providers.base import Leftover

logger = logging.getLogger(__name__)


@dataclass
class SweepItem:
    """One resource left behind, with where it was found."""

    leftover: Leftover
    sources: set[str] = field(default_factory=set)
    state: str = "created"
    case_id: str = ""
    ledgers: list[RunLedger] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.leftover.provider, self.leftover.kind, self.leftover.resource_id)

    def describe(self) -> str:
        details = " ".join(f"{key}={value}" for key, value in self.leftover.details)
        where = "+".join(sorted(self.sources))
        case = f" case {self.case_id}" if self.case_id else ""
        return (f"{self.leftover.provider} {self.leftover.kind} {self.leftover.resource_id} {details}"
                f"{case} [{self.state}; found in {where}]").replace("  ", " ")


@dataclass
class SweepPlan:
    """Everything found to delete, and the listings that failed."""

    items: list[SweepItem]
    problems: list[str]


def ledger_files(ledger_dir: Path, run_id: str | None) -> list[tuple[Path, str]]:
    """Return (path, run id) of the ledger of ``run_id``, or of every ledger in ``ledger_dir`` when None."""
    if run_id is not None:
        return [(ledger_dir / f"{run_id}.json", run_id)]
    return [(path, path.stem) for path in sorted(ledger_dir.glob("*.json"))]


def sweep_config(providers: tuple[str, ...], service_urls: dict[str, str],
                 provider_options: dict[str, dict[str, str]] | None = None, run_id: str = "sweep") -> BenchConfig:
    """Build the configuration providers list and delete with: emulator mode where a URL is given, else live."""
    modes = {name: "emulator" if name in service_urls else "live" for name in providers}
    return BenchConfig(providers=providers, run_id=run_id, provider_modes=modes, service_urls=dict(service_urls),
                       provider_options=dict(provider_options or {}))


def plan_sweep(ledger_dir: Path, run_id: str | None, providers: tuple[str, ...], service_urls: dict[str, str],
               provider_options: dict[str, dict[str, str]] | None = None) -> tuple[SweepPlan, BenchConfig]:
    """Collect the leftovers of run ``run_id`` (every run when None) from the ledgers and the providers' listings.

    Providers listed are ``providers`` plus every provider a ledger names.
    """
    from providers import get_provider_class

    items: dict[tuple[str, str, str], SweepItem] = {}
    problems: list[str] = []
    named = list(providers)
    for path, ledger_run in ledger_files(ledger_dir, run_id):
        ledger = RunLedger(path, ledger_run)
        try:
            outstanding = ledger.outstanding()
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        for entry in outstanding:
            item = items.setdefault(_key(entry), SweepItem(_leftover(entry, ledger_run)))
            item.sources.add("ledger")
            item.state, item.case_id = entry.state, entry.case_id
            item.ledgers.append(ledger)
            if entry.provider not in named:
                named.append(entry.provider)
    config = sweep_config(tuple(named), service_urls, provider_options, run_id or "sweep")
    for name in named:
        try:
            found = get_provider_class(name).find_leftovers(config, run_id)
        except Exception as exc:  # one provider's listing failing must not hide the others' leftovers
            problems.append(f"cannot list {name} resources ({type(exc).__name__}: {exc}); check its credentials "
                            f"or give its emulator with --service-url {name}=URL")
            continue
        for leftover in found:
            key = (leftover.provider, leftover.kind, leftover.resource_id)
            item = items.setdefault(key, SweepItem(leftover))
            item.sources.add("listing")
            if not item.leftover.details and leftover.details:
                item.leftover = leftover
    return SweepPlan(sorted(items.values(), key=lambda item: item.key), problems), config


def delete_items(items: list[SweepItem], config: BenchConfig) -> list[str]:
    """Delete each item and mark it deleted in its ledgers; return one message per failed deletion."""
    from providers import get_provider_class

    failures = []
    for item in items:
        try:
            get_provider_class(item.leftover.provider).delete_leftover(config, item.leftover)
        except Exception as exc:  # reported, and the sweep goes on with the next resource
            logger.error("deleting %s failed: %s", item.describe(), exc)
            failures.append(f"deleting {item.describe()} failed: {type(exc).__name__}: {exc}")
            continue
        for ledger in item.ledgers:
            ledger.note_deleted(*item.key)
        logger.info("deleted %s", item.describe())
    return failures


def parse_service_urls(values: list[str]) -> dict[str, str]:
    """Parse ``PROVIDER=URL`` values; the ``IMGBENCH_<PROVIDER>_URL`` variables fill in the rest."""
    import os

    urls = {name: os.environ[variable] for name, variable in SERVICE_URL_ENV.items() if os.environ.get(variable)}
    for value in values:
        name, equals, url = value.partition("=")
        if not equals or name not in SERVICE_URL_ENV or not url.startswith(("http://", "https://")):
            raise ConfigError(f"invalid --service-url {value!r}; use PROVIDER=http://HOST:PORT with PROVIDER one of "
                              f"{', '.join(SERVICE_URL_ENV)}")
        urls[name] = url
    return urls


def _key(entry: LedgerEntry) -> tuple[str, str, str]:
    return (entry.provider, entry.kind, entry.resource_id)


def _leftover(entry: LedgerEntry, run_id: str) -> Leftover:
    details = tuple(sorted((key, str(value)) for key, value in entry.details.items()
                           if not key.startswith("imgbench_")))
    return Leftover(entry.provider, entry.kind, entry.resource_id, run_id, details)

"""The run ledger: every cloud resource a run creates, and whether it was deleted.

A live run can leave billed resources behind when it crashes, so each
provider notes a resource in the ledger as soon as its id is known (or its
name, before the create request is sent), and notes its deletion. The ledger
is one JSON file per run. Every change takes an exclusive ``fcntl`` lock on a
side file, rewrites the whole ledger to a temporary file, flushes it to disk
and renames it into place. So concurrent pytest-xdist workers never lose each
other's entries, and a crash at any point leaves the previous or the new
complete file.

Entry states: ``created``; ``kept`` (left on purpose after an interrupted
case, such as a trained model that a resumed run reuses); ``deleted``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from imgbench.errors import ConfigError

LEDGER_FORMAT = 1
STATES = ("created", "kept", "deleted")


@dataclass
class LedgerEntry:
    """One resource that a case created on a service."""

    provider: str
    case_id: str
    kind: str
    resource_id: str
    state: str = "created"
    details: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.provider, self.kind, self.resource_id)

    @property
    def outstanding(self) -> bool:
        return self.state != "deleted"


class RunLedger:
    """The ledger file of one run; safe to share between processes."""

    def __init__(self, path: Path, run_id: str):
        self.path = Path(path)
        self.run_id = run_id

    # Writing ---------------------------------------------------------------

    def note_created(self, provider: str, case_id: str, kind: str, resource_id: str, **details: Any) -> None:
        """Add a resource, or update its details when it is already listed."""
        with self._changing() as entries:
            now = time.time()
            entry = _find(entries, provider, kind, resource_id)
            if entry is None:
                entries.append(LedgerEntry(provider, case_id, kind, resource_id, "created", dict(details), now, now))
            else:
                entry.details.update(details)
                entry.state = "created" if entry.state == "deleted" else entry.state
                entry.updated_at = now

    def note_state(self, provider: str, kind: str, resource_id: str, state: str | None = None,
                   **details: Any) -> None:
        """Change a listed resource's state or details; an unlisted resource is ignored."""
        if state is not None and state not in STATES:
            raise ValueError(f"invalid ledger state {state!r}; valid states: {', '.join(STATES)}")
        with self._changing() as entries:
            entry = _find(entries, provider, kind, resource_id)
            if entry is None:
                return
            if state is not None:
                entry.state = state
            entry.details.update(details)
            entry.updated_at = time.time()

    def note_deleted(self, provider: str, kind: str, resource_id: str) -> None:
        self.note_state(provider, kind, resource_id, "deleted")

    # Reading ---------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        return _read(self.path, self.run_id)

    def outstanding(self, provider: str | None = None, case_id: str | None = None) -> list[LedgerEntry]:
        """Return the resources not yet deleted, optionally of one provider or case."""
        return [entry for entry in self.entries() if entry.outstanding
                and (provider is None or entry.provider == provider)
                and (case_id is None or entry.case_id == case_id)]

    # Internals -------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[LedgerEntry]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = _read(self.path, self.run_id)
                yield entries
                _write(self.path, self.run_id, entries)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class NullLedger(RunLedger):
    """A ledger that stores nothing, for providers used outside a benchmark run."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), "")

    def note_created(self, *args: Any, **details: Any) -> None:
        pass

    def note_state(self, *args: Any, **details: Any) -> None:
        pass

    def entries(self) -> list[LedgerEntry]:
        return []


def ledger_path(results_path: Path, run_id: str) -> Path:
    """Return the ledger file of run ``run_id``: ``ledgers/<run id>.json`` beside its result file."""
    return Path(results_path).parent / "ledgers" / f"{run_id}.json"


def _find(entries: list[LedgerEntry], provider: str, kind: str, resource_id: str) -> LedgerEntry | None:
    for entry in entries:
        if entry.key == (provider, kind, resource_id):
            return entry
    return None


def _read(path: Path, run_id: str) -> list[LedgerEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        data = json.loads(text)
        if data.get("format") != LEDGER_FORMAT:
            raise ConfigError(f"ledger {path} has format {data.get('format')!r}; this imgbench reads format "
                              f"{LEDGER_FORMAT}: upgrade imgbench")
        if run_id and data.get("run_id") != run_id:
            raise ConfigError(f"ledger {path} belongs to run {data.get('run_id')!r}, not {run_id!r}; "
                              "give the matching --run-id or another --results path")
        return [LedgerEntry(**item) for item in data["resources"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"ledger {path} is not a valid imgbench ledger ({exc}); move it aside, then run "
                          "`imgbench sweep --all` to find what the run left on the services") from exc


def _write(path: Path, run_id: str, entries: list[LedgerEntry]) -> None:
    data = {"format": LEDGER_FORMAT, "run_id": run_id, "resources": [asdict(entry) for entry in entries]}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise

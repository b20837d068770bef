"""Loading and validating result files for the report and compare commands.

A result file is the pytest-benchmark JSON that ``imgbench.results`` writes.
``load_result_file`` checks the parts that the report and compare read,
raises ``ResultFileError`` when the whole file is unusable, and keeps the
valid case records of a partly damaged file with one warning per record it
left out. Every message names the file and what to do next.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imgbench
from imgbench.errors import ImgbenchError
from imgbench.results import FORMAT_VERSION

logger = logging.getLogger(__name__)

REQUIRED_RECORD_KEYS = {"case_id": str, "provider": str, "dataset": str, "ablation": int, "status": str}
KNOWN_STATUSES = ("passed", "failed", "skipped")
WRITTEN_BY = "a result file written by `pytest bench_tests` (results/imgbench-<run id>.json)"


class ResultFileError(ImgbenchError):
    """A result file cannot be read, or is not an imgbench result file it can use."""

    kind = "result_file"


@dataclass(frozen=True)
class LoadedResults:
    """The valid case records of one result file, and what was wrong with the rest.

    ``latencies_s`` maps a case id to the per-request latencies in seconds
    from its pytest-benchmark ``stats.data``. Cases without latency data are
    absent from it.
    """

    path: Path
    run_id: str
    machine_info: dict
    records: list[dict]
    latencies_s: dict[str, tuple[float, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.path)


def load_result_file(path: str | Path) -> LoadedResults:
    """Read and validate one result file.

    Raises ``ResultFileError`` for a file that is missing, empty, not JSON,
    not in pytest-benchmark's layout, without an ``imgbench`` section, or in
    a newer result format than this version reads.
    """
    path = Path(path)
    document = _read_document(path)
    _check_layout(path, document)
    section = document["imgbench"]
    run_id = str(section.get("run_id") or path.stem)
    machine_info = document.get("machine_info") if isinstance(document.get("machine_info"), dict) else {}

    records: list[dict] = []
    latencies: dict[str, tuple[float, ...]] = {}
    warnings: list[str] = []
    seen: set[str] = set()
    for where, record, stats in _candidate_records(document):
        problem = record_problem(record)
        if problem is None and record["case_id"] in seen:
            problem = f"repeats case {record['case_id']!r}; only its first record is used"
        if problem is not None:
            warnings.append(f"{path}: {where} {problem}; it is left out of the results. "
                            f"Rerun that case to get a complete record.")
            continue
        seen.add(record["case_id"])
        records.append(record)
        data = _latency_data(stats)
        if data:
            latencies[record["case_id"]] = data

    warnings.extend(_content_warnings(path, records))
    for message in warnings:
        logger.debug("%s", message)
    return LoadedResults(path, run_id, machine_info, records, latencies, warnings)


def load_result_files(paths: Iterable[str | Path]) -> tuple[list[LoadedResults], list[str]]:
    """Load several result files, keeping the usable ones.

    Returns the loaded files and one message per file that could not be used,
    so a caller can go on with the rest.
    """
    loaded: list[LoadedResults] = []
    errors: list[str] = []
    for path in paths:
        try:
            loaded.append(load_result_file(path))
        except ResultFileError as exc:
            errors.append(str(exc))
    return loaded, errors


def record_problem(record: object) -> str | None:
    """Return why ``record`` is not a usable case record, or None when it is."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not a case record"
    for key, expected in REQUIRED_RECORD_KEYS.items():
        if key not in record:
            return f"has no {key!r}"
        value = record[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            return f"has an invalid {key!r} ({value!r}, expected {expected.__name__})"
    if record["status"] not in KNOWN_STATUSES:
        return f"has the unknown status {record['status']!r} (known: {', '.join(KNOWN_STATUSES)})"
    for key in ("classification", "seconds", "test_latency", "load_test", "error"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"has an invalid {key!r} (a JSON {type(record[key]).__name__}, expected an object)"
    return None


def _read_document(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ResultFileError(f"result file {path} not found; check the path, or pass {WRITTEN_BY}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"cannot read result file {path}: {exc}; check that it is {WRITTEN_BY}") from exc
    if not text.strip():
        raise ResultFileError(f"result file {path} is empty; pass {WRITTEN_BY}, or rerun the benchmark")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultFileError(
            f"result file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"it is truncated or damaged. The benchmark replaces its result file in one step after every "
            f"case, so copy it again from where the run wrote it, or rerun the benchmark"
        ) from exc


def _check_layout(path: Path, document: object) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise ResultFileError(
            f"{path} is not a pytest-benchmark result file: it has no 'benchmarks' list; pass {WRITTEN_BY}")
    section = document.get("imgbench")
    if section is None:
        raise ResultFileError(
            f"{path} is a pytest-benchmark result file without an 'imgbench' section, so it contains no imgbench "
            f"case records: plain pytest-benchmark or an imgbench older than result format {FORMAT_VERSION} "
            f"wrote it. Read it with `pytest-benchmark compare`, or rerun the benchmark with this imgbench")
    if not isinstance(section, dict):
        raise ResultFileError(f"{path} has an invalid 'imgbench' section (a JSON {type(section).__name__}, "
                              f"expected an object); pass {WRITTEN_BY}")
    version = section.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ResultFileError(f"{path} has an invalid imgbench format_version {version!r}; pass {WRITTEN_BY}")
    if version > FORMAT_VERSION:
        raise ResultFileError(
            f"{path} uses imgbench result format {version}, newer than format {FORMAT_VERSION} that "
            f"imgbench {imgbench.__version__} reads; upgrade imgbench (pip install --upgrade imgbench)")
    if version < 1:
        raise ResultFileError(f"{path} has an invalid imgbench format_version {version}; pass {WRITTEN_BY}")
    if not isinstance(section.get("unmeasured_cases", []), list):
        raise ResultFileError(f"{path} has an invalid 'imgbench.unmeasured_cases' (expected a list); "
                              f"pass {WRITTEN_BY}")


def _candidate_records(document: dict) -> Iterable[tuple[str, object, object]]:
    """Yield (location, record, stats) for every case record in ``document``."""
    for index, entry in enumerate(document["benchmarks"]):
        if not isinstance(entry, dict) or "extra_info" not in entry:
            yield f"benchmarks[{index}]", None, None
            continue
        yield f"benchmarks[{index}]", entry["extra_info"], entry.get("stats")
    for index, record in enumerate(document["imgbench"].get("unmeasured_cases", [])):
        yield f"imgbench.unmeasured_cases[{index}]", record, None


def _latency_data(stats: object) -> tuple[float, ...]:
    if not isinstance(stats, dict) or not isinstance(stats.get("data"), list):
        return ()
    values = stats["data"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return ()
    return tuple(float(v) for v in values)


def _content_warnings(path: Path, records: Sequence[dict]) -> list[str]:
    if not records:
        return [f"{path} holds no case records; the run stopped before its first case finished. "
                f"Rerun the benchmark, or pass another file"]
    if not any(record["status"] == "passed" for record in records):
        statuses = ", ".join(sorted({record["status"] for record in records}))
        return [f"{path} holds only {statuses} cases ({len(records)}), so it adds no accuracy, time or "
                f"latency figures; see the errors table for why they failed, fix that and rerun them"]
    return []

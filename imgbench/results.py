"""Case records and the result file, in pytest-benchmark's JSON format.

A measured case becomes one entry of ``benchmarks``. Its statistics are the
latencies of the test-set requests (one round per test image, one iteration
each, never auto-calibrated), computed with pytest-benchmark's own ``Stats``.
Everything else (accuracy, timings, load test, manifest hash, versions) is in
``extra_info``. A case without one measured test-set request (it
failed or was skipped before, every request failed, or it was replayed, so
its times are not the service's) has no statistics, so it goes to
``imgbench.unmeasured_cases`` instead, where ``pytest-benchmark compare``
does not look.

imgbench writes this file itself instead of through the ``benchmark`` fixture
because pytest-benchmark turns itself off under pytest-xdist; this way
``pytest -n 2`` writes the same records, merged on the controller. The file is
rewritten atomically after every case, so an interrupted run keeps every
finished case. A run started again with the same run id and result path
starts from the records already in the file (``earlier_records``): a new
record of a case replaces the earlier one, the others are kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pytest_benchmark import __version__ as pytest_benchmark_version
from pytest_benchmark.stats import Stats

import imgbench

FORMAT_VERSION = 1
RECORD_PROPERTY = "imgbench_record"

VERSIONED_PACKAGES = ("imgbench", "pytest", "pytest-benchmark", "numpy", "pillow", "requests", "torch",
                      "scikit-learn", "efficientnet-lite-pytorch", "vcrpy", "boto3",
                      "google-cloud-aiplatform", "huggingface_hub", "datasets")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions.setdefault("imgbench", imgbench.__version__)
    return versions


def latency_stats(latencies_s: list[float]) -> dict:
    """pytest-benchmark statistics of per-request latencies, with the raw data."""
    stats = Stats()
    for value in latencies_s:
        stats.update(value)
    result = stats.as_dict()
    result["data"] = list(latencies_s)
    result["iterations"] = 1
    return result


def has_latency_data(record: dict) -> bool:
    """True when at least one test-set request succeeded and its latency is a measurement.

    A replayed record's latencies time the replay, not the service, so it has
    no latency data in this sense.
    """
    if not record.get("timings_measured", True):
        return False
    return any(row.get("error") is None and row.get("latency_s") is not None
               for row in record.get("predictions", []))


def record_to_benchmark(record: dict) -> dict:
    """Turn a finished case record into a pytest-benchmark ``benchmarks`` entry."""
    latencies = [row["latency_s"] for row in record.get("predictions", [])
                 if row.get("error") is None and row.get("latency_s") is not None]
    return {
        "group": f"{record['provider']}-{record['dataset']}",
        "name": f"test_case[{record['case_id']}]",
        "fullname": record.get("nodeid", record["case_id"]),
        "params": {"case": record["case_id"]},
        "param": record["case_id"],
        "extra_info": record,
        "options": {"rounds": len(latencies), "iterations": 1, "timer": "perf_counter", "warmup": False,
                    "disable_gc": False, "min_rounds": len(latencies), "max_time": None, "min_time": None},
        "stats": latency_stats(latencies),
    }


class ResultWriter:
    """Collects case records and keeps the result file up to date."""

    def __init__(self, path: Path, run_id: str, machine_info: dict, commit_info: dict, settings: dict,
                 records: list[dict] | None = None):
        self.path = path
        self.run_id = run_id
        self.machine_info = machine_info
        self.commit_info = commit_info
        self.settings = settings
        self.records: list[dict] = list(records or [])
        self.started = datetime.now(timezone.utc).isoformat()

    def add(self, record: dict) -> None:
        """Add a case record, replacing an earlier record of the same case, and rewrite the file."""
        self.records = [r for r in self.records if r.get("case_id") != record.get("case_id")]
        self.records.append(record)
        self.write()

    def document(self) -> dict:
        measured = [r for r in self.records if has_latency_data(r)]
        unmeasured = [r for r in self.records if not has_latency_data(r)]
        return {
            "machine_info": self.machine_info,
            "commit_info": self.commit_info,
            "benchmarks": [record_to_benchmark(r) for r in sorted(measured, key=lambda r: r["case_id"])],
            "datetime": datetime.now(timezone.utc).isoformat(),
            "version": pytest_benchmark_version,
            "imgbench": {
                "format_version": FORMAT_VERSION,
                "run_id": self.run_id,
                "started": self.started,
                "settings": self.settings,
                "versions": package_versions(),
                "unmeasured_cases": sorted(unmeasured, key=lambda r: r["case_id"]),
            },
        }

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.document(), indent=1, default=str) + "\n"
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def iter_records(document: dict) -> list[dict]:
    """Return every case record of a result document, measured or not."""
    records = [entry["extra_info"] for entry in document.get("benchmarks", []) if "extra_info" in entry]
    records += document.get("imgbench", {}).get("unmeasured_cases", [])
    return records


FINISHED_STATUS = "passed"


def earlier_records(path: Path, run_id: str) -> list[dict]:
    """Return the records of run ``run_id`` in the result file at ``path``; none when it is absent or another run's.

    Raises ``ValueError`` when the file exists but is not a result file.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    if not isinstance(document, dict) or "imgbench" not in document:
        raise ValueError(f"{path} is not an imgbench result file")
    if document["imgbench"].get("run_id") != run_id:
        return []
    return iter_records(document)


def finished_case_ids(records: list[dict]) -> list[str]:
    """Return the ids of the cases whose records show they finished (status ``passed``)."""
    return sorted(record["case_id"] for record in records if record.get("status") == FINISHED_STATUS)

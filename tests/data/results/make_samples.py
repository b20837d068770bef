"""Build the sample result files of this folder from one real benchmark run.

Usage: python tests/data/results/make_samples.py SOURCE.json

SOURCE.json is a result file of the main benchmark (local provider on beans
and xrays). Each measured case keeps its first PREDICTIONS_PER_CASE test-set
predictions, spread evenly over the classes, and its classification,
test-set latency summary and pytest-benchmark statistics are recomputed from
those rows, so every file stays self-consistent and small. The other files
are derived from that trimmed run; see README.md for what each one plants.
After rebuilding, regenerate the golden outputs with
IMGBENCH_UPDATE_GOLDEN=1 pytest tests/test_report.py tests/test_compare.py.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from imgbench.metrics import classification_summary, latency_summary
from imgbench.results import record_to_benchmark

HERE = Path(__file__).resolve().parent
# 40 rows per case make a 5-point accuracy drop exactly two predictions.
PREDICTIONS_PER_CASE = 40
DATASETS_ROOT = "mirror:/srv/imgbench-datasets"
REGRESSED_CASE = "local-beans-20"
LATENCY_FACTOR = 1.3


def trim_predictions(record: dict) -> None:
    """Keep PREDICTIONS_PER_CASE rows, as evenly spread over the classes as the order allows."""
    classes = record["classification"]["classes"]
    quota = {name: PREDICTIONS_PER_CASE // len(classes) for name in classes}
    for name in classes[:PREDICTIONS_PER_CASE % len(classes)]:
        quota[name] += 1
    kept = []
    for row in record["predictions"]:
        if quota.get(row["label"], 0) > 0:
            quota[row["label"]] -= 1
            kept.append(row)
    record["predictions"] = kept
    rescore(record)


def rescore(record: dict) -> None:
    """Recompute every figure that derives from the prediction rows."""
    rows = record["predictions"]
    classes = record["classification"]["classes"]
    record["classification"] = classification_summary([r["label"] for r in rows], [r["predicted"] for r in rows],
                                                      classes)
    record["test_latency"] = latency_summary([r["latency_s"] for r in rows if r["error"] is None])
    record["test_images"] = len(rows)


def relocate(record: dict, stem: str) -> None:
    """Replace machine-specific paths with neutral ones."""
    record["dataset_source"] = f"{DATASETS_ROOT}/{record['dataset']}"
    if "manifest_path" in record:
        record["manifest_path"] = f"results/manifests/{stem}/{record['case_id']}.json"


def build_document(template: dict, records: list[dict], run_id: str) -> dict:
    document = copy.deepcopy(template)
    measured = [r for r in records if r.get("predictions")]
    unmeasured = [r for r in records if not r.get("predictions")]
    for record in records:
        record["run_id"] = run_id
    document["benchmarks"] = [record_to_benchmark(r) for r in sorted(measured, key=lambda r: r["case_id"])]
    document["imgbench"]["run_id"] = run_id
    document["imgbench"]["unmeasured_cases"] = sorted(unmeasured, key=lambda r: r["case_id"])
    return document


def write(name: str, document: dict) -> None:
    (HERE / name).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def run_a(source: dict) -> tuple[dict, list[dict]]:
    """The trimmed real run, and its records."""
    template = copy.deepcopy(source)
    template["machine_info"]["cpu"]["flags"] = template["machine_info"]["cpu"]["flags"][:8]
    records = []
    for record in [entry["extra_info"] for entry in source["benchmarks"]] + source["imgbench"]["unmeasured_cases"]:
        record = copy.deepcopy(record)
        relocate(record, "run-a")
        if record.get("predictions"):
            trim_predictions(record)
        records.append(record)
    return template, records


def regressed(records: list[dict]) -> list[dict]:
    """Plant a 5-point accuracy drop and a 30 % latency rise in one case; leave the others as they are."""
    records = copy.deepcopy(records)
    record = next(r for r in records if r["case_id"] == REGRESSED_CASE)
    classes = record["classification"]["classes"]
    flipped = 0
    for row in record["predictions"]:
        if flipped < 2 and row["predicted"] == row["label"]:
            row["predicted"] = next(name for name in classes if name != row["label"])
            flipped += 1
    for row in record["predictions"]:
        row["latency_s"] *= LATENCY_FACTOR
    rescore(record)
    return records


def replayed(records: list[dict]) -> list[dict]:
    """The same cases as a replay: same predictions, but timings that are not measurements."""
    records = copy.deepcopy(records)
    for record in records:
        record["mode"] = "replay"
        record["timings_measured"] = False
        record["seconds"] = {key: 0.001 for key in record.get("seconds", {})}
        for row in record.get("predictions", []):
            row["latency_s"] = 0.001
        if record.get("predictions"):
            rescore(record)
        if record.get("load_test"):
            record["load_test"]["wall_s"] = 0.5
    return records


def emulated(records: list[dict]) -> list[dict]:
    """A second service on beans: an emulator run with a failed case and load-test errors."""
    result = []
    for record in copy.deepcopy(records):
        if record["dataset"] != "beans" or record["status"] != "passed":
            continue
        record["provider"] = "nyckel"
        record["mode"] = "emulator"
        record["case_id"] = f"nyckel-beans-{record['ablation']}"
        record["nodeid"] = f"bench_tests/test_benchmark.py::test_case[{record['case_id']}]"
        record["dataset_source"] = "hub:AI-Lab-Makerere/beans"
        record["seconds"] = {key: value * 3 for key, value in record["seconds"].items()}
        for row in record["predictions"]:
            row["latency_s"] *= 2
        rescore(record)
        if record["ablation"] == 80:
            load = record["load_test"]
            load.update(failed=4, succeeded=load["sent"] - 4, errors_by_kind={"throttling": 4})
        if record["ablation"] == 320:
            record["status"] = "failed"
            record["error"] = {"phase": "setup", "kind": "timeout", "type": "ProviderTimeoutError",
                               "message": "training did not finish within 3600 s; raise --train-timeout"}
            for key in ("predictions", "classification", "test_latency", "load_test"):
                record.pop(key, None)
            record["seconds"] = {"upload": record["seconds"]["upload"]}
        result.append(record)
    return result


def failed_only(records: list[dict]) -> list[dict]:
    """Two cases that failed before any request was measured."""
    result = []
    for record, kind in zip([r for r in records if r["status"] == "passed"][:2], ("authentication", "quota"),
                            strict=True):
        record = copy.deepcopy(record)
        record["status"] = "failed"
        record["error"] = {"phase": "setup", "kind": kind, "type": "ProviderError",
                           "message": f"the service rejected the upload ({kind})"}
        for key in ("predictions", "classification", "test_latency", "load_test"):
            record.pop(key, None)
        result.append(record)
    return result


def main(source_path: str) -> None:
    source = json.loads(Path(source_path).read_text(encoding="utf-8"))
    template, records = run_a(source)
    write("run-a.json", build_document(template, copy.deepcopy(records), "sample-run-a"))
    write("regressed.json", build_document(template, regressed(records), "sample-regressed"))
    write("replayed.json", build_document(template, replayed(records), "sample-replayed"))
    write("emulator.json", build_document(template, emulated(records), "sample-emulator"))
    write("failed-only.json", build_document(template, failed_only(records), "sample-failed-only"))

    single = [copy.deepcopy(next(r for r in records if r["case_id"] == REGRESSED_CASE))]
    future = build_document(template, single, "sample-future-format")
    future["imgbench"]["format_version"] = 99
    write("future-format.json", future)
    plain = build_document(template, single, "sample-plain")
    del plain["imgbench"]
    plain["benchmarks"][0]["extra_info"] = {}
    write("plain-pytest-benchmark.json", plain)

    text = (HERE / "run-a.json").read_text(encoding="utf-8")
    (HERE / "truncated.json").write_text(text[:3000], encoding="utf-8")
    (HERE / "empty.json").write_text("", encoding="utf-8")
    write("foreign.json", {"name": "not a result file", "values": [1, 2, 3]})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

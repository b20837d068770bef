"""End-to-end runs of the benchmark matrix in a fresh pytest process.

Each run uses the local provider on real sample images, so these tests cover
the whole path: dataset scan, ablation plan, training, the HTTP endpoint, the
load test, the result file and the summary table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imgbench.results import iter_records
from tests.conftest import run_benchmark

pytestmark = pytest.mark.slow

RECORD_FIELDS = ("case_id", "provider", "dataset", "ablation", "status", "mode", "dataset_source",
                 "manifest_sha256", "seconds", "classification", "test_latency", "load_test", "predictions")


@pytest.fixture(scope="module")
def serial_run(mini_datasets: Path, shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    results = tmp_path_factory.mktemp("serial") / "results.json"
    completed = run_benchmark(["--datasets-dir", str(mini_datasets), "--datasets", "beans",
                               "--ablations", "5,10,20", "--load-requests", "30", "--load-concurrency", "4",
                               "--results", str(results), "--report-dir", str(results.parent / "report")],
                              shared_cache_dir)
    return completed, json.loads(results.read_text())


@pytest.fixture(scope="module")
def parallel_run(mini_datasets: Path, shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    results = tmp_path_factory.mktemp("parallel") / "results.json"
    completed = run_benchmark(["-n", "2", "--datasets-dir", str(mini_datasets), "--datasets", "beans",
                               "--ablations", "5,10,20", "--load-requests", "30", "--load-concurrency", "4",
                               "--results", str(results)], shared_cache_dir)
    return completed, json.loads(results.read_text())


def by_case(document: dict) -> dict[str, dict]:
    return {record["case_id"]: record for record in iter_records(document)}


def test_serial_run_passes(serial_run):
    completed, _ = serial_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def test_summary_table_printed(serial_run):
    completed, _ = serial_run
    assert "imgbench results" in completed.stdout
    assert "local     local  beans" in completed.stdout


def test_report_rendered_after_run(serial_run, tmp_path_factory):
    completed, document = serial_run
    assert "report written to" in completed.stdout
    html_path = Path(completed.stdout.split("report written to ", 1)[1].splitlines()[0])
    html = html_path.read_text()
    assert "local-beans-10" in html
    assert "data:image/png;base64," in html


def test_records_hold_every_field(serial_run):
    _, document = serial_run
    records = by_case(document)
    for case_id in ("local-beans-5", "local-beans-10"):
        missing = [name for name in RECORD_FIELDS if name not in records[case_id]]
        assert not missing, f"{case_id} lacks {missing}"


def test_record_values_are_plausible(serial_run):
    _, document = serial_run
    record = by_case(document)["local-beans-10"]
    assert record["status"] == "passed"
    assert record["mode"] == "local"
    assert record["training_images"] == 3 * 8
    assert record["validation_images"] == 3 * 2
    assert record["sent_as_training"] == 3 * 10
    assert record["sent_as_validation"] == 0
    assert record["test_images"] == 12
    assert 0.0 <= record["classification"]["accuracy"] <= 1.0
    assert len(record["classification"]["confusion_matrix"]) == 3
    assert record["load_test"]["succeeded"] == 30
    assert record["load_test"]["concurrency"] == 4
    assert record["seconds"]["training"] > 0
    assert record["seconds"]["upload_to_endpoint"] >= record["seconds"]["training"]


def test_latency_stats_are_explicit_rounds(serial_run):
    _, document = serial_run
    entry = next(b for b in document["benchmarks"] if b["param"] == "local-beans-5")
    assert entry["stats"]["rounds"] == 12
    assert entry["stats"]["iterations"] == 1
    assert len(entry["stats"]["data"]) == 12
    assert entry["stats"]["min"] > 0


def test_large_ablation_skipped_with_reason(serial_run):
    _, document = serial_run
    record = by_case(document)["local-beans-20"]
    assert record["status"] == "skipped"
    assert "has only 10 training images" in record["error"]["message"]
    assert "angular_leaf_spot" in record["error"]["message"]


def test_file_has_pytest_benchmark_shape(serial_run):
    _, document = serial_run
    for key in ("machine_info", "commit_info", "benchmarks", "datetime", "version"):
        assert key in document
    assert document["imgbench"]["format_version"] == 1


def test_parallel_run_matches_serial(serial_run, parallel_run):
    completed, parallel = parallel_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    _, serial = serial_run
    serial_records, parallel_records = by_case(serial), by_case(parallel)
    assert sorted(serial_records) == sorted(parallel_records)
    for case_id, record in serial_records.items():
        other = parallel_records[case_id]
        assert other["status"] == record["status"], case_id
        assert other.get("manifest_sha256") == record.get("manifest_sha256"), case_id
        predicted = [row["predicted"] for row in record.get("predictions", [])]
        assert [row["predicted"] for row in other.get("predictions", [])] == predicted, case_id


def test_unknown_provider_is_usage_error(shared_cache_dir):
    completed = run_benchmark(["--providers", "local,acme"], shared_cache_dir, timeout=120)
    assert completed.returncode == 4
    assert "unknown provider(s) acme" in completed.stderr
    assert "valid providers: " in completed.stderr
    assert "local" in completed.stderr.split("valid providers: ")[1].splitlines()[0].split(", ")


def test_unknown_dataset_is_usage_error(shared_cache_dir):
    completed = run_benchmark(["--datasets", "beans,flowers"], shared_cache_dir, timeout=120)
    assert completed.returncode == 4
    assert "unknown dataset(s) flowers" in completed.stderr


def test_bad_ablation_is_usage_error(shared_cache_dir):
    completed = run_benchmark(["--ablations", "5,abc"], shared_cache_dir, timeout=120)
    assert completed.returncode == 4
    assert "invalid ablation 'abc'" in completed.stderr


def test_failed_dataset_keeps_other_records(mini_datasets, shared_cache_dir, tmp_path):
    results = tmp_path / "results.json"
    completed = run_benchmark(["--datasets-dir", str(mini_datasets), "--datasets", "beans,xrays",
                               "--dataset-path", f"xrays={tmp_path / 'missing'}", "--ablations", "5",
                               "--load-requests", "10", "--results", str(results)], shared_cache_dir)
    assert completed.returncode == 1
    records = by_case(json.loads(results.read_text()))
    assert records["local-beans-5"]["status"] == "passed"
    assert records["local-xrays-5"]["status"] == "failed"
    assert records["local-xrays-5"]["error"]["kind"] == "dataset"
    assert "does not exist" in records["local-xrays-5"]["error"]["message"]


def test_corrupt_image_is_reported(mini_datasets, shared_cache_dir, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(mini_datasets / "beans", mirror / "beans")
    broken = mirror / "beans" / "train" / "healthy" / "broken.jpg"
    broken.write_bytes((mirror / "beans" / "test" / "healthy").glob("*.jpg").__next__().read_bytes()[:300])
    (mirror / "beans" / "train" / "healthy" / ".DS_Store").write_bytes(b"\x00\x01junk")
    results = tmp_path / "results.json"
    completed = run_benchmark(["--datasets-dir", str(mirror), "--datasets", "beans", "--ablations", "5",
                               "--load-requests", "10", "--results", str(results)], shared_cache_dir)
    assert completed.returncode == 0, completed.stdout[-3000:]
    record = by_case(json.loads(results.read_text()))["local-beans-5"]
    assert record["dataset_scan"]["undecodable"] == 1
    assert record["dataset_scan"]["junk"] == 1
    paths = {row["path"] for row in json.loads(Path(record["manifest_path"]).read_text())["images"]}
    assert not any(path.endswith("broken.jpg") for path in paths)


def test_unwritable_results_is_usage_error(shared_cache_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    completed = run_benchmark(["--results", str(blocker / "deep" / "results.json")], shared_cache_dir, timeout=120)
    assert completed.returncode == 4
    assert "cannot write results to" in completed.stderr
    assert "--results" in completed.stderr


def test_bad_local_setting_is_usage_error(shared_cache_dir, monkeypatch):
    monkeypatch.setenv("IMGBENCH_LOCAL_C", "nan")
    completed = run_benchmark(["--ablations", "5"], shared_cache_dir, timeout=120)
    assert completed.returncode == 4
    assert "invalid IMGBENCH_LOCAL_C 'nan'" in completed.stderr

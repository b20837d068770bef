"""Tests of `imgbench compare`: thresholds, warnings, significance and output files.

The sample files in tests/data/results are described in its README.md.
Golden outputs live in tests/data/results/golden; regenerate them after an
intended change with IMGBENCH_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgbench.cli import main
from imgbench.compare import (METRICS, NOT_MEASURED, SINGLE_SAMPLE, InvalidThresholdError, compare_results,
                              mann_whitney_p, mann_whitney_p_normal, parse_threshold)
from imgbench.resultfiles import load_result_file

from .conftest import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "data" / "results"
GOLDEN = RESULTS / "golden"
UPDATE_GOLDEN = os.environ.get("IMGBENCH_UPDATE_GOLDEN") == "1"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"golden file {path} is missing; create it with IMGBENCH_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"output differs from {path}"


@pytest.fixture
def in_results(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the sample folder, so outputs name the files as relative paths."""
    monkeypatch.chdir(RESULTS)
    return RESULTS


def write_variant(tmp_path: Path, source: str, change) -> Path:
    """Copy a sample file with ``change(document)`` applied."""
    document = json.loads((RESULTS / source).read_text(encoding="utf-8"))
    change(document)
    path = tmp_path / f"variant-{source}"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def records_of(document: dict) -> list[dict]:
    return [entry["extra_info"] for entry in document["benchmarks"]] + document["imgbench"]["unmeasured_cases"]


def test_planted_regression_fails_gate(in_results, capsys):
    code = main(["compare", "run-a.json", "regressed.json", "--fail-on", "accuracy:-2pt",
                 "--fail-on", "latency_p50:+10%"])
    output = capsys.readouterr()
    assert code == 1
    check_golden("compare-regression.txt", output.out)
    assert "local-beans-20: accuracy (test-set accuracy) fell by 5.0 pt" in output.err
    assert "local-beans-20: latency_p50 (test-set median latency) rose by 30.0%" in output.err
    assert "beyond the limit latency_p50:+10%" in output.err


def test_planted_regression_marks_direction(in_results):
    comparison = compare_results(load_result_file("run-a.json"), load_result_file("regressed.json"))
    changes = {(c.case_id, c.metric): c for c in comparison.changes}
    latency = changes[("local-beans-20", "latency_p50")]
    assert latency.new / latency.base == pytest.approx(1.3)
    assert latency.significance.startswith("significant")
    accuracy = changes[("local-beans-20", "accuracy")]
    assert (accuracy.new - accuracy.base) * 100 == pytest.approx(-5.0)
    assert accuracy.significance == SINGLE_SAMPLE


def test_unchanged_cases_not_significant(in_results):
    comparison = compare_results(load_result_file("run-a.json"), load_result_file("regressed.json"))
    unchanged = [c for c in comparison.changes if c.case_id == "local-beans-80" and c.metric == "latency_p50"]
    assert len(unchanged) == 1
    assert unchanged[0].significance == "not significant (p=1.000)"


def test_single_samples_never_significant(in_results):
    comparison = compare_results(load_result_file("run-a.json"), load_result_file("regressed.json"))
    for change in comparison.changes:
        if not METRICS[change.metric].per_request and change.compared:
            assert change.significance == SINGLE_SAMPLE, change


def test_gate_passes_within_limits(in_results, capsys):
    code = main(["compare", "run-a.json", "regressed.json", "--fail-on", "accuracy:-6pt",
                 "--fail-on", "latency_p50:+31%"])
    assert code == 0
    assert "threshold" not in capsys.readouterr().err


def test_mode_mismatch_warns(in_results, capsys):
    code = main(["compare", "run-a.json", "replayed.json", "--fail-on", "latency_p50:+10%"])
    output = capsys.readouterr()
    assert code == 0
    check_golden("compare-mode-mismatch.txt", output.out)
    assert "mode differs in 10 case(s)" in output.err
    assert "local-beans-20 (local -> replay)" in output.err
    assert "warning: mode differs" in output.out


def test_replayed_timings_not_compared(in_results):
    comparison = compare_results(load_result_file("run-a.json"), load_result_file("replayed.json"))
    for change in comparison.changes:
        if METRICS[change.metric].timing:
            assert change.missing == NOT_MEASURED, change
        else:
            assert change.compared, change


@pytest.mark.parametrize("text", [
    "latency:+10%", "accuracy:2pt", "accuracy:-2", "accuracy:-2s", "training_s:+5pt", "latency_p50:+ten%",
    "latency_p50", "",
])
def test_invalid_threshold_is_usage_error(in_results, capsys, text):
    with pytest.raises(SystemExit) as raised:
        main(["compare", "run-a.json", "regressed.json", "--fail-on", text])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "Valid metrics: accuracy, macro_f1, training_s, latency_p50, latency_p99, load_s" in error
    assert "METRIC:+N%" in error


@pytest.mark.parametrize(("text", "metric", "sign", "amount", "unit"), [
    ("accuracy:-2pt", "accuracy", -1, 2.0, "pt"),
    ("macro_f1:-1.5%", "macro_f1", -1, 1.5, "%"),
    ("latency_p50:+10%", "latency_p50", 1, 10.0, "%"),
    ("latency_p99:+0.05s", "latency_p99", 1, 0.05, "s"),
    ("training_s:+30s", "training_s", 1, 30.0, "s"),
    ("load_s:-5%", "load_s", -1, 5.0, "%"),
])
def test_threshold_parses(text, metric, sign, amount, unit):
    threshold = parse_threshold(text)
    assert (threshold.metric, threshold.sign, threshold.amount, threshold.unit) == (metric, sign, amount, unit)


@pytest.mark.parametrize(("text", "base", "new", "breached"), [
    ("accuracy:-2pt", 0.80, 0.79, False),
    ("accuracy:-2pt", 0.80, 0.75, True),
    ("accuracy:-2pt", 0.80, 0.90, False),
    ("latency_p50:+10%", 0.100, 0.109, False),
    ("latency_p50:+10%", 0.100, 0.130, True),
    ("latency_p50:+10%", 0.100, 0.050, False),
    ("training_s:+30s", 100.0, 140.0, True),
    ("load_s:-50%", 10.0, 4.0, True),
])
def test_threshold_breach_rule(text, base, new, breached):
    assert parse_threshold(text).is_breached(base, new) is breached


def test_threshold_rejects_unit_mismatch():
    with pytest.raises(InvalidThresholdError, match="training_s takes % or s, not pt"):
        parse_threshold("training_s:+5pt")


def test_machine_mismatch_warns(tmp_path):
    def other_machine(document):
        document["machine_info"]["node"] = "ci-runner"
        document["machine_info"]["cpu"]["brand_raw"] = "Intel Xeon"

    other = write_variant(tmp_path, "run-a.json", other_machine)
    comparison = compare_results(load_result_file(RESULTS / "run-a.json"), load_result_file(other))
    warning = next(w for w in comparison.warnings if "different machines" in w)
    assert "node 'vm' vs 'ci-runner'" in warning
    assert "cpu 'AMD EPYC' vs 'Intel Xeon'" in warning


def test_dataset_copy_and_images_mismatch_warn(tmp_path):
    def other_copy(document):
        for record in records_of(document):
            if record["case_id"] == "local-beans-5":
                record["dataset_source"] = "hub:AI-Lab-Makerere/beans"
                record["manifest_sha256"] = "0" * 64

    other = write_variant(tmp_path, "run-a.json", other_copy)
    comparison = compare_results(load_result_file(RESULTS / "run-a.json"), load_result_file(other))
    copy_warning = next(w for w in comparison.warnings if w.startswith("dataset copy differs"))
    assert "local-beans-5 (mirror:/srv/imgbench-datasets/beans -> hub:AI-Lab-Makerere/beans)" in copy_warning
    image_warning = next(w for w in comparison.warnings if w.startswith("different images"))
    assert "local-beans-5" in image_warning
    assert "-> 000000000000)" in image_warning


def test_case_failing_in_new_breaches(tmp_path, capsys):
    def fail_case(document):
        entry = next(e for e in document["benchmarks"] if e["extra_info"]["case_id"] == "local-beans-5")
        entry["extra_info"]["status"] = "failed"
        entry["extra_info"]["error"] = {"phase": "call", "kind": "timeout", "type": "ProviderTimeoutError",
                                        "message": "invoke timed out"}

    other = write_variant(tmp_path, "run-a.json", fail_case)
    code = main(["compare", str(RESULTS / "run-a.json"), str(other), "--fail-on", "accuracy:-2pt"])
    output = capsys.readouterr()
    assert code == 1
    assert "local-beans-5: passed in" in output.err
    assert "status: local-beans-5: passed -> failed (timeout)" in output.out


def test_unreadable_file_exits_2(in_results, capsys):
    code = main(["compare", "run-a.json", "truncated.json"])
    error = capsys.readouterr().err
    assert code == 2
    assert "truncated.json is not valid JSON" in error


def test_csv_and_markdown_written(in_results, tmp_path, capsys):
    csv_path, markdown_path = tmp_path / "compare.csv", tmp_path / "compare.md"
    main(["compare", "run-a.json", "regressed.json", "--fail-on", "accuracy:-2pt", "--csv", str(csv_path),
          "--markdown", str(markdown_path)])
    capsys.readouterr()
    header = csv_path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "base_file,new_file,case,metric,base,new,delta,ratio,change,significance,p_value"
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "| local-beans-20 | accuracy | 82.50% | 77.50% | -5.00 pt | 0.94x | -5.0 pt worse |" in markdown
    assert "**Threshold breaches (1):**" in markdown


def test_several_new_files_compared_to_base(in_results, capsys):
    code = main(["compare", "run-a.json", "regressed.json", "replayed.json"])
    output = capsys.readouterr().out
    assert code == 0
    assert output.count("base: run-a.json") == 2
    assert "new:  regressed.json" in output
    assert "new:  replayed.json" in output


def test_normal_approximation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    generator = random.Random(7)
    for _ in range(20):
        base = [round(generator.gauss(0.1, 0.02), 3) for _ in range(generator.randint(9, 60))]
        new = [round(generator.gauss(0.105, 0.02), 3) for _ in range(generator.randint(9, 60))]
        expected = stats.mannwhitneyu(base, new, alternative="two-sided", method="asymptotic").pvalue
        assert mann_whitney_p_normal(base, new) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fallback_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    base = [0.10 + 0.001 * i for i in range(30)]
    assert mann_whitney_p(base, [value * 1.3 for value in base]) < 0.001
    assert mann_whitney_p(base, list(reversed(base))) == pytest.approx(1.0)


def test_identical_samples_p_is_one():
    assert mann_whitney_p_normal([0.1] * 10, [0.1] * 10) == 1.0


def test_pytest_benchmark_reads_sample():
    executable = shutil.which("pytest-benchmark", path=str(Path(sys.executable).parent))
    assert executable, "pytest-benchmark's command is missing beside this Python; install pytest-benchmark"
    result = subprocess.run([executable, "compare", str(RESULTS / "run-a.json")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "test_case[local-beans-20]" in result.stdout


def test_module_entry_end_to_end(tmp_path):
    command = [sys.executable, "-m", "imgbench", "compare", "run-a.json", "regressed.json",
               "--fail-on", "latency_p50:+10%", "--csv", str(tmp_path / "out.csv")]
    result = subprocess.run(command, cwd=RESULTS, capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 1, result.stderr
    assert "threshold breached: local-beans-20: latency_p50" in result.stderr
    assert re.search(r"local-beans-20 +latency_p50 +99.8 ms +129.8 ms", result.stdout)
    assert (tmp_path / "out.csv").exists()

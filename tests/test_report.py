"""Tests of `imgbench report`, the result-file loader and the packaged reference figures.

The sample files in tests/data/results are described in its README.md.
Golden report tables live in tests/data/results/golden/report; regenerate
them after an intended change with IMGBENCH_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from imgbench.cli import main
from imgbench.reference import published_results, published_throughput
from imgbench.report import generate_report
from imgbench.resultfiles import ResultFileError, load_result_file

from .conftest import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "data" / "results"
GOLDEN_TABLES = RESULTS / "golden" / "report"
UPDATE_GOLDEN = os.environ.get("IMGBENCH_UPDATE_GOLDEN") == "1"
REPORT_INPUTS = ("run-a.json", "emulator.json", "replayed.json")
# Tables compare numbers to this absolute tolerance; the report rounds to 6 decimals.
TOLERANCE = 2e-6
NOT_MEASURED = "not measured (replayed)"


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the three sample runs with the published overlay, written once per module."""
    out = tmp_path_factory.mktemp("report")
    generate_report([RESULTS / name for name in REPORT_INPUTS], out, published=True)
    return out


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def test_tables_match_golden(sample_report):
    written = sorted(path.name for path in (sample_report / "tables").glob("*.csv"))
    if UPDATE_GOLDEN:
        shutil.rmtree(GOLDEN_TABLES, ignore_errors=True)
        shutil.copytree(sample_report / "tables", GOLDEN_TABLES)
    expected = sorted(path.name for path in GOLDEN_TABLES.glob("*.csv"))
    assert written == expected
    for name in written:
        actual, golden = read_table(sample_report / "tables" / name), read_table(GOLDEN_TABLES / name)
        pd.testing.assert_frame_equal(actual, golden, check_exact=False, atol=TOLERANCE, rtol=0,
                                      obj=f"tables/{name}")


def test_markdown_has_every_table(sample_report):
    markdown = (sample_report / "tables.md").read_text(encoding="utf-8")
    for path in (sample_report / "tables").glob("*.csv"):
        assert f"`tables/{path.name}`" in markdown


def test_html_is_self_contained(sample_report):
    page = (sample_report / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "url(" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 8
    assert all(source.startswith("data:image/png;base64,") for source in sources)


def test_html_captions_name_mode_and_copy(sample_report):
    page = (sample_report / "report.html").read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page, flags=re.S)
    assert captions
    for caption in captions:
        assert "Mode" in caption, caption
        assert "ataset cop" in caption, caption
    assert "Training time is seconds.upload_to_endpoint" in page


def test_replayed_timings_never_measured(sample_report):
    cases = read_table(sample_report / "tables" / "cases.csv")
    replayed = cases[cases["mode"] == "replay"]
    assert len(replayed) == 10
    assert (replayed["timings"] == NOT_MEASURED).all()
    time_columns = ["training_s", "upload_s", "deployment_s", "latency_p50_s", "latency_p99_s", "load_wall_s"]
    assert replayed[time_columns].isna().all().all()
    assert replayed.loc[replayed["status"] == "passed", "accuracy"].notna().all()

    latency = read_table(sample_report / "tables" / "latency.csv").set_index("service")
    assert latency.at["local (replay)", "timings"] == NOT_MEASURED
    assert pd.isna(latency.at["local (replay)", "median_s"])
    training = read_table(sample_report / "tables" / "training_time_largest_ablation.csv")
    assert training.loc[training["service"] == "local (replay)", "training_s"].isna().all()


def test_service_names_show_mode(sample_report):
    summary = read_table(sample_report / "tables" / "service_summary.csv")
    assert list(summary["service"]) == ["local", "local (replay)", "nyckel (emulator)"]


def test_published_figures_kept_apart(sample_report):
    page = (sample_report / "report.html").read_text(encoding="utf-8")
    assert "published 2023 figures (another run)" in page
    assert "stops at the response headers" in page
    for name in ("service_summary", "accuracy_by_ablation", "latency", "load_test"):
        services = set(read_table(sample_report / "tables" / f"{name}.csv")["service"])
        assert not services & {"aws", "vertex", "huggingface", "nyckel"}, name
    published = read_table(sample_report / "tables" / "published_2023_results.csv")
    assert set(published["dataset"]) == {"beans", "xrays"}


def test_published_tables_only_on_request(tmp_path):
    generate_report([RESULTS / "run-a.json"], tmp_path)
    assert not list((tmp_path / "tables").glob("published_*.csv"))
    assert "published 2023" not in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_errors_table_lists_failures(sample_report):
    errors = read_table(sample_report / "tables" / "errors.csv")
    failed = errors[errors["status"] == "failed"]
    assert list(failed["case_id"]) == ["nyckel-beans-320"]
    assert failed.iloc[0]["error_kind"] == "timeout"
    load_errors = read_table(sample_report / "tables" / "load_test_errors.csv")
    assert load_errors[["case_id", "kind", "count"]].values.tolist() == [["nyckel-beans-80", "throttling", 4]]


@pytest.mark.parametrize(("name", "expected"), [
    ("empty.json", "empty.json is empty; pass a result file written by `pytest bench_tests`"),
    ("truncated.json", "truncated.json is not valid JSON (Expecting value at line"),
    ("foreign.json", "foreign.json is not a pytest-benchmark result file: it has no 'benchmarks' list"),
    ("future-format.json", "uses imgbench result format 99, newer than format 1"),
    ("plain-pytest-benchmark.json", "without an 'imgbench' section"),
    ("missing.json", "missing.json not found; check the path"),
])
def test_bad_file_clear_message(name, expected):
    with pytest.raises(ResultFileError) as raised:
        load_result_file(RESULTS / name)
    message = str(raised.value)
    assert expected in message
    assert str(RESULTS / name) in message


def test_future_format_names_fix():
    with pytest.raises(ResultFileError, match=r"upgrade imgbench \(pip install --upgrade imgbench\)"):
        load_result_file(RESULTS / "future-format.json")


def test_failed_only_file_warns():
    loaded = load_result_file(RESULTS / "failed-only.json")
    assert len(loaded.records) == 2
    assert len(loaded.warnings) == 1
    assert "holds only failed cases (2)" in loaded.warnings[0]
    assert "see the errors table" in loaded.warnings[0]


def test_invalid_record_left_out(tmp_path):
    document = json.loads((RESULTS / "run-a.json").read_text(encoding="utf-8"))
    del document["benchmarks"][0]["extra_info"]["provider"]
    document["imgbench"]["unmeasured_cases"].append("not a record")
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    loaded = load_result_file(path)
    assert len(loaded.records) == 9
    assert len(loaded.warnings) == 2
    assert f"{path}: benchmarks[0] has no 'provider'; it is left out" in loaded.warnings[0]
    assert "imgbench.unmeasured_cases[1] is a JSON str, not a case record" in loaded.warnings[1]


def test_latency_data_loaded():
    loaded = load_result_file(RESULTS / "run-a.json")
    assert len(loaded.latencies_s["local-beans-20"]) == 40
    assert "local-beans-1280" not in loaded.latencies_s


def test_bad_files_reported_good_rendered(tmp_path, capsys):
    names = ["empty.json", "truncated.json", "foreign.json", "future-format.json", "plain-pytest-benchmark.json",
             "failed-only.json", "run-a.json"]
    code = main(["report", *[str(RESULTS / name) for name in names], "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 0
    assert error.count("imgbench: warning:") == 6
    for name in names[:-1]:
        assert name in error
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Problems in the input" in page
    assert "truncated.json is not valid JSON" in page
    inputs = read_table(tmp_path / "tables" / "inputs.csv")
    assert list(inputs["source"]) == ["failed-only.json", "run-a.json"]


def test_no_valid_record_exits_1(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["report", str(RESULTS / "empty.json"), str(RESULTS / "foreign.json"), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 1
    assert "no valid case record in 2 result file(s), so no report was written" in error
    assert "empty.json is empty" in error
    assert "foreign.json is not a pytest-benchmark result file" in error
    assert not out.exists()


def test_failed_only_report_renders(tmp_path, capsys):
    code = main(["report", str(RESULTS / "failed-only.json"), "--out", str(tmp_path)])
    assert code == 0
    assert "holds only failed cases" in capsys.readouterr().err
    errors = read_table(tmp_path / "tables" / "errors.csv")
    assert sorted(errors["error_kind"]) == ["authentication", "quota"]
    assert read_table(tmp_path / "tables" / "latency.csv").empty


def test_reference_figures_packaged():
    results = published_results()
    assert list(results.columns) == ["dataset", "service", "ablation", "training_time_s", "accuracy",
                                     "median_latency_s"]
    assert set(results["service"]) == {"aws", "vertex", "huggingface", "nyckel"}
    assert len(results) == 112
    throughput = published_throughput().set_index("service")
    assert throughput.at["huggingface", "seconds_for_1000_requests_at_concurrency_10"] == 35.9


def test_module_entry_end_to_end(tmp_path):
    command = [sys.executable, "-m", "imgbench", "report", str(RESULTS / "run-a.json"), "--out", str(tmp_path),
               "--published"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert f"report: {tmp_path / 'report.html'} (10 records)" in result.stdout
    assert (tmp_path / "tables" / "published_2023_throughput.csv").exists()


def test_replayed_only_report_without_overlay(tmp_path):
    generate_report([RESULTS / "replayed.json"], tmp_path)

    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Training time by dataset" not in html
    assert (tmp_path / "tables" / "training_time_largest_ablation.csv").is_file()

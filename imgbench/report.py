"""The HTML report of one or more result files, with its tables as CSV and Markdown.

``generate_report`` loads result files and writes into one folder:

- ``report.html``: self-contained, with every chart embedded as a base64 PNG
  and no external reference, so it opens offline;
- ``tables/<name>.csv``: every table of the report;
- ``tables.md``: the same tables in Markdown.

The views follow those published with the May 2023 benchmark. They show
training time and accuracy at the largest ablation, mean training time
against mean accuracy, accuracy against ablation size, and the latency
distribution and load-test time per service. Per-case confusion matrices and
errors by kind follow. A "service" is the provider name, followed by the mode in brackets where the
mode is neither ``live`` nor the provider's own name, e.g. "nyckel
(emulator)". Every caption and table names the modes and dataset copies its
records came from. With ``published=True`` the published 2023 figures are
drawn on the charts in a style of their own and listed in separate tables.
They never enter this run's tables or statistics.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import imgbench
from imgbench import report_charts as charts
from imgbench import report_tables as tables
from imgbench.reference import PUBLISHED_LOAD_CONCURRENCY, PUBLISHED_LOAD_REQUESTS
from imgbench.report_charts import NOT_MEASURED, PUBLISHED_LABEL
from imgbench.report_tables import MEASURED, PublishedFigures, provenance
from imgbench.resultfiles import LoadedResults, ResultFileError, load_result_files

logger = logging.getLogger(__name__)

# Decimal places of every number in the written tables, which keeps seconds to the microsecond.
TABLE_DECIMALS = 6
TRAINING_TIME_NOTE = ("Training time is seconds.upload_to_endpoint: from the start of the upload until the "
                      "deployed endpoint answers.")
PUBLISHED_NOTE = (
    f"Hatched bars, hollow diamonds and dashed lines are {PUBLISHED_LABEL}: the figures published with the "
    "May 2023 benchmark of AWS Rekognition Custom Labels, Google Vertex AI AutoML, Hugging Face AutoTrain and "
    "Nyckel (repository ajtatey/image-classification-services-benchmark; values unchanged). They are not part "
    "of this run's tables or statistics. Their median latency stops at the response headers, while this "
    "run's latency includes reading the whole response body, so their latencies read lower for that reason "
    "alone. Their training time runs from upload until the model could be invoked, and their load test sent "
    f"{PUBLISHED_LOAD_REQUESTS} requests, {PUBLISHED_LOAD_CONCURRENCY} at a time.")


@dataclass(frozen=True)
class Table:
    """One table of the report, written as tables/<name>.csv."""

    name: str
    title: str
    caption: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Chart:
    """One chart of the report, as PNG bytes."""

    title: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A heading with its note, charts and tables, in the order they appear."""

    title: str
    note: str = ""
    charts: list[Chart] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


@dataclass
class Report:
    """Everything the report shows, before it is written to files."""

    warnings: list[str]
    sections: list[Section]

    @property
    def tables(self) -> list[Table]:
        return [table for section in self.sections for table in section.tables]


@dataclass(frozen=True)
class WrittenReport:
    """Paths of a written report, its record count and the warnings raised while building it."""

    html_path: Path
    tables_dir: Path
    markdown_path: Path
    records: int
    warnings: list[str]


def generate_report(paths: Sequence[str | Path], out_dir: str | Path, published: bool = False) -> WrittenReport:
    """Load ``paths``, build the report and write it into ``out_dir``.

    A file that cannot be used, or a record that is invalid, becomes a
    warning and the report covers the rest. Raises ``ResultFileError``, and
    writes nothing, when no file contains a single valid record.
    """
    loaded, errors = load_result_files(paths)
    warnings = errors + [message for result in loaded for message in result.warnings]
    record_count = sum(len(result.records) for result in loaded)
    if record_count == 0:
        details = "\n".join(f"  {message}" for message in warnings)
        raise ResultFileError(f"no valid case record in {len(paths)} result file(s), so no report was "
                              f"written:\n{details}")
    report = build_report(loaded, warnings, published=published)
    out = Path(out_dir)
    write_report(report, out)
    return WrittenReport(out / "report.html", out / "tables", out / "tables.md", record_count, warnings)


def build_report(loaded: Sequence[LoadedResults], warnings: Sequence[str], published: bool = False) -> Report:
    """Build every table and chart of the report from the loaded result files."""
    cases = tables.case_frame(loaded)
    records = tables.records_by_key(loaded)
    passed = cases[cases["status"] == "passed"]
    reference = PublishedFigures(cases) if published else None
    palette = charts.Palette(sorted(cases["service"].unique()),
                             sorted(reference.results["service"].unique()) if reference is not None else ())
    sections = [
        _inputs_section(loaded, warnings),
        _training_section(passed, reference, palette),
        _accuracy_section(passed, reference, palette),
        _latency_section(passed, tables.latency_samples(loaded), reference, palette),
        _per_case_section(cases, records),
        _errors_section(cases, records),
        Section("All cases", tables=[Table(
            "cases", "All case records",
            f"One row per record. Time columns are empty where the timings were {NOT_MEASURED}. "
            f"{TRAINING_TIME_NOTE} {provenance(cases)}", cases)]),
    ]
    if reference is not None:
        sections.append(_published_section(reference))
    return Report(list(warnings), sections)


def _overlay_caption(reference: PublishedFigures | None, how: str) -> str:
    if reference is None:
        return ""
    return f"Overlay ({how}): {PUBLISHED_LABEL}, for {reference.scope}; see the note of the published section. "


def _group_labels(largest: dict[str, int]) -> dict[str, str]:
    return {dataset: f"{dataset}\n({ablation}/class)" for dataset, ablation in largest.items()}


def _inputs_section(loaded: Sequence[LoadedResults], warnings: Sequence[str]) -> Section:
    note = "No problems were found in the result files." if not warnings else \
        f"{len(warnings)} problem(s) were found in the result files; they are listed above the tables."
    return Section("Result files", note=note, tables=[Table(
        "inputs", "Result files in this report", "One row per result file that could be read.",
        tables.input_table(loaded))])


def _training_section(passed: pd.DataFrame, reference: PublishedFigures | None,
                      palette: charts.Palette) -> Section:
    section = Section("Training time", note=TRAINING_TIME_NOTE)
    largest = tables.largest_ablations(passed)
    at_largest = tables.at_largest_ablation(passed, largest)
    time_table = tables.per_case_means(at_largest, "training_s")
    source = provenance(at_largest)
    section.tables.append(Table(
        "training_time_largest_ablation", "Training time at the largest ablation",
        f"Per dataset, the largest ablation with a passed case; mean over repeated runs. {TRAINING_TIME_NOTE} "
        f"{source}", time_table))
    # With only replayed cases and no published overlay there is no bar to draw.
    if not time_table.empty and (time_table["training_s"].notna().any() or reference is not None):
        published_rows = tables.at_largest_ablation(reference.results, largest) if reference is not None else None
        section.charts.append(Chart(
            "Training time by dataset at the largest ablation",
            f"Log scale. {TRAINING_TIME_NOTE} {_overlay_caption(reference, 'hatched bars at the same ablation')}"
            f"{source}",
            charts.grouped_bars(time_table, published_rows, "training_s", "training_time_s", _group_labels(largest),
                                palette, "training time (s, log scale)", timing=True, log=True)))

    summary = tables.service_summary(passed)
    section.tables.append(Table(
        "service_summary", "Mean training time and mean accuracy per service",
        f"Over every passed case of the service; the mean training time covers measured records only. "
        f"{TRAINING_TIME_NOTE} {provenance(passed)}", summary))
    if not summary.empty:
        not_measured = summary.loc[summary["timings"] == NOT_MEASURED, "service"].tolist()
        missing = ", ".join(f"{name}: {NOT_MEASURED}" for name in not_measured) or "none"
        section.charts.append(Chart(
            "Mean training time against mean accuracy",
            f"One point per service. {TRAINING_TIME_NOTE} Services without a measured training time get no "
            f"point ({missing}). "
            f"{_overlay_caption(reference, 'hollow diamonds, means over the same (dataset, ablation) pairs')}"
            f"{provenance(passed)}",
            charts.time_against_accuracy(summary, reference.service_means(passed) if reference else None,
                                         palette)))
    return section


def _accuracy_section(passed: pd.DataFrame, reference: PublishedFigures | None,
                      palette: charts.Palette) -> Section:
    section = Section("Accuracy", note="Accuracy is the share of the whole test set predicted correctly.")
    largest = tables.largest_ablations(passed)
    at_largest = tables.at_largest_ablation(passed, largest)
    accuracy_table = tables.per_case_means(at_largest, "accuracy")
    section.tables.append(Table(
        "accuracy_largest_ablation", "Accuracy at the largest ablation",
        f"Per dataset, the largest ablation with a passed case; mean over repeated runs. {provenance(at_largest)}",
        accuracy_table))
    if not accuracy_table.empty:
        published_rows = tables.at_largest_ablation(reference.results, largest) if reference is not None else None
        section.charts.append(Chart(
            "Accuracy by dataset at the largest ablation",
            f"{_overlay_caption(reference, 'hatched bars at the same ablation')}{provenance(at_largest)}",
            charts.grouped_bars(accuracy_table, published_rows, "accuracy", "accuracy", _group_labels(largest),
                                palette, "accuracy", percent=True)))

    per_dataset = tables.per_case_means(passed, "accuracy")
    by_ablation = tables.accuracy_by_ablation(per_dataset)
    section.tables.append(Table(
        "accuracy_by_ablation", "Accuracy against ablation size",
        f"Mean accuracy across datasets with its standard error: the sample standard deviation over the square "
        f"root of the number of datasets, empty for one dataset. {provenance(passed)}", by_ablation))
    section.tables.append(Table(
        "accuracy_by_dataset_and_ablation", "Accuracy per dataset and ablation",
        f"Mean over repeated runs. {provenance(passed)}", per_dataset))
    if not by_ablation.empty:
        published_per_dataset = published_by_ablation = None
        if reference is not None:
            published_per_dataset = reference.results.loc[:, ["dataset", "service", "ablation", "accuracy"]]
            published_by_ablation = tables.accuracy_by_ablation(published_per_dataset)
        section.charts.append(Chart(
            "Accuracy against ablation size, mean across datasets",
            f"Error bars: one standard error across datasets. "
            f"{_overlay_caption(reference, 'dashed lines, over the same datasets')}{provenance(passed)}",
            charts.accuracy_against_ablation(by_ablation, published_by_ablation, palette)))
        section.charts.append(Chart(
            "Accuracy against ablation size, per dataset",
            f"{_overlay_caption(reference, 'dashed lines')}{provenance(passed)}",
            charts.accuracy_against_ablation_per_dataset(per_dataset, published_per_dataset, palette)))
    return section


def _latency_section(passed: pd.DataFrame, samples: dict, reference: PublishedFigures | None,
                     palette: charts.Palette) -> Section:
    section = Section("Latency and load test",
                      note="Latency runs from just before a request is sent until its response body has been read.")
    source = provenance(passed)
    latency_table = tables.latency_distribution(passed, samples)
    section.tables.append(Table(
        "latency", "Per-request latency per service",
        f"Pooled per-request latencies of the test-set pass (pytest-benchmark stats.data) over the service's "
        f"passed cases; whiskers reach the furthest request within 1.5 IQR of the box. {source}", latency_table))
    if not latency_table.empty:
        measured = latency_table[latency_table["timings"] == MEASURED]
        not_measured = latency_table.loc[latency_table["timings"] == NOT_MEASURED, "service"].tolist()
        service_samples = {service: tables.samples_for(passed, samples, service) for service in measured["service"]}
        how = "hollow diamonds: median of the published per-case medians, which stop at the response headers"
        section.charts.append(Chart(
            "Latency distribution per service",
            f"Box: quartiles and median; whiskers at 1.5 IQR; dots: requests beyond them. "
            f"{_overlay_caption(reference, how)}{source}",
            charts.latency_boxes(service_samples, not_measured,
                                 reference.median_latencies() if reference is not None else {}, palette)))

    load_table = tables.load_test_summary(passed)
    section.tables.append(Table(
        "load_test", "Load-test wall time per service",
        f"Closed-loop load test of each passed case: wall seconds to complete all requests; mean, minimum and "
        f"maximum over the service's cases of one load-test size. {source}", load_table))
    if not load_table.empty:
        how = f"hatched bars, {PUBLISHED_LOAD_REQUESTS} requests at concurrency {PUBLISHED_LOAD_CONCURRENCY}"
        section.charts.append(Chart(
            "Load-test time per service",
            f"Bars: mean wall time; range: fastest and slowest case. {_overlay_caption(reference, how)}{source}",
            charts.load_test_bars(load_table, reference.throughput if reference is not None else None,
                                  palette)))
    return section


def _per_case_section(cases: pd.DataFrame, records: dict) -> Section:
    section = Section("Per case: confusion matrix and per-class accuracy",
                      note="Rows of a confusion matrix are true classes, columns predicted classes.")
    per_class, cells, used = tables.classification_tables(cases, records)
    for row, classification in used:
        accuracy = f"{row.accuracy:.1%}" if pd.notna(row.accuracy) else "no accuracy"
        title = f"{row.case_id}: {row.service}, {row.dataset}, {row.ablation} images per class ({row.status})"
        section.charts.append(Chart(
            f"{row.case_id} ({row.source})",
            f"Accuracy {accuracy} on {row.test_images} test images. Mode: {row.mode}. "
            f"Dataset copy: {row.dataset_source}.",
            charts.case_classification(classification["classes"], classification["confusion_matrix"],
                                       classification["per_class_accuracy"], title)))
    section.tables.append(Table("per_class_accuracy", "Per-class accuracy",
                                f"Share of each class's test images predicted correctly, per case. "
                                f"{provenance(cases[cases['case_id'].isin(per_class['case_id'])])}", per_class))
    section.tables.append(Table("confusion_matrices", "Confusion matrices",
                                "One row per (true class, predicted class) cell of each case; a failed request "
                                "lands in no cell.", cells))
    return section


def _errors_section(cases: pd.DataFrame, records: dict) -> Section:
    section = Section("Errors", note="Failed cases come from the result files' error records; skipped cases "
                                     "appear in the table only.")
    errors = tables.error_table(cases)
    load_errors = tables.load_error_table(cases, records)
    with_load_errors = cases[cases["case_id"].isin(load_errors["case_id"])]
    section.tables.append(Table(
        "errors", "Failed and skipped cases",
        f"One row per case that did not pass, with the phase, kind and first line of its error. "
        f"{provenance(cases[cases['status'] != 'passed'])}", errors))
    section.tables.append(Table(
        "load_test_errors", "Load-test errors by kind",
        f"Failed load-test requests per case and error kind. {provenance(with_load_errors)}", load_errors))
    failed = errors[errors["status"] == "failed"]
    if not failed.empty or not load_errors.empty:
        case_errors = failed.loc[:, ["service", "error_kind"]].rename(columns={"error_kind": "kind"})
        case_errors["kind"] = case_errors["kind"].fillna("unknown")
        affected = cases[(cases["status"] == "failed") | cases["case_id"].isin(load_errors["case_id"])]
        section.charts.append(Chart(
            "Errors by kind",
            f"Left: failed cases per service; right: failed load-test requests per service. {provenance(affected)}",
            charts.errors_by_kind(case_errors, load_errors)))
    return section


def _published_section(reference: PublishedFigures) -> Section:
    return Section(f"Reference: {PUBLISHED_LABEL}", note=PUBLISHED_NOTE, tables=[
        Table("published_2023_results", f"Per-case figures, {PUBLISHED_LABEL}",
              f"Rows for {reference.scope}. Training time in seconds, accuracy as a fraction, median latency in "
              f"seconds up to the response headers.", reference.results),
        Table("published_2023_throughput", f"Load-test time, {PUBLISHED_LABEL}",
              f"Seconds for {PUBLISHED_LOAD_REQUESTS} requests, {PUBLISHED_LOAD_CONCURRENCY} at a time.",
              reference.throughput),
    ])


def format_cell(value: object) -> str:
    """Format a table cell: empty for a missing value, numbers rounded to ``TABLE_DECIMALS``."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.{TABLE_DECIMALS}f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(value)


def text_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with every cell formatted as the written tables show it."""
    return pd.DataFrame({column: [format_cell(value) for value in frame[column].tolist()]
                         for column in frame.columns}, columns=frame.columns)


def write_report(report: Report, out_dir: Path) -> Path:
    """Write report.html, tables/*.csv and tables.md into ``out_dir``; return the HTML path."""
    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    for table in report.tables:
        text_frame(table.frame).to_csv(tables_dir / f"{table.name}.csv", index=False, lineterminator="\n")
    (out_dir / "tables.md").write_text(render_markdown(report), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    logger.info("wrote report %s with %d tables", html_path, len(report.tables))
    return html_path


def render_markdown(report: Report) -> str:
    """Render every table of the report, with its title and caption, as Markdown."""
    lines = ["# imgbench report tables", ""]
    for table in report.tables:
        lines += [f"## {table.title}", "", f"`tables/{table.name}.csv`. {table.caption}", ""]
        lines += _markdown_table(text_frame(table.frame)) + [""]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return ["No rows."]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(str(column)) for column in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return lines


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .caption { font-size: 0.9em; color: #444; margin: 0.3em 0; }
.note { background: #f4f4f4; border-left: 4px solid #888; padding: 0.5em 1em; }
.warnings { background: #fff4e5; border-left: 4px solid #e08a00; padding: 0.5em 1em; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
"""


def render_html(report: Report) -> str:
    """Render the whole report as one HTML page with the charts inlined as data URLs."""
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             "<title>imgbench report</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<h1>imgbench report</h1>",
             f'<p class="caption">Generated {generated} by imgbench {html.escape(imgbench.__version__)}.</p>']
    if report.warnings:
        items = "".join(f"<li>{html.escape(message)}</li>" for message in report.warnings)
        parts.append(f'<div class="warnings"><strong>Problems in the input</strong><ul>{items}</ul></div>')
    parts.append("<nav><ul>" + "".join(f'<li><a href="#section-{index}">{html.escape(section.title)}</a></li>'
                                       for index, section in enumerate(report.sections)) + "</ul></nav>")
    for index, section in enumerate(report.sections):
        parts.append(f'<h2 id="section-{index}">{html.escape(section.title)}</h2>')
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        parts += [_chart_html(chart) for chart in section.charts]
        parts += [_table_html(table) for table in section.tables]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _chart_html(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return (f"<figure><h3>{html.escape(chart.title)}</h3>"
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(chart.title, quote=True)}">'
            f"<figcaption>{html.escape(chart.caption)}</figcaption></figure>")


def _table_html(table: Table) -> str:
    heading = f"<h3>{html.escape(table.title)}</h3>"
    caption = f'<p class="caption">{html.escape(table.caption)} (tables/{html.escape(table.name)}.csv)</p>'
    if table.frame.empty:
        return f"{heading}{caption}<p>No rows.</p>"
    body = text_frame(table.frame).to_html(index=False, border=0, escape=True)
    return f'{heading}{caption}<div class="table-wrap">{body}</div>'

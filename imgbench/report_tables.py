"""The report's tables: case records flattened into pandas frames, then aggregated.

``case_frame`` turns every record into one row. The other functions build one
view each from that frame. Only passed cases contribute figures, and
``seconds.upload_to_endpoint`` is the training time throughout. A record
with ``timings_measured`` false keeps its accuracy but gets no time or
latency: its time columns stay empty and its ``timings`` column reads
"not measured (replayed)".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from imgbench.reference import published_results, published_throughput
from imgbench.report_charts import NOT_MEASURED
from imgbench.resultfiles import LoadedResults
from imgbench.summary import mode_label

MEASURED = "measured"
NOT_RECORDED = "not recorded"
# Modes whose records are labelled with the provider name alone.
PLAIN_MODES = ("live",)
MAX_MESSAGE_CHARS = 300

CASE_COLUMNS = (
    "source", "run_id", "case_id", "service", "provider", "mode", "dataset", "ablation", "status", "timings",
    "dataset_source", "manifest_sha256", "accuracy", "macro_f1", "test_images", "failed_predictions",
    "training_s", "upload_s", "training_phase_s", "deployment_s", "latency_mean_s", "latency_p50_s",
    "latency_p90_s", "latency_p95_s", "latency_p99_s", "load_requests", "load_concurrency", "load_succeeded",
    "load_failed", "load_wall_s", "load_requests_per_s", "error_phase", "error_kind", "error_message",
)
INTEGER_COLUMNS = ("ablation", "test_images", "failed_predictions", "load_requests", "load_concurrency",
                   "load_succeeded", "load_failed")
MEANS_COLUMNS = ("service", "dataset", "ablation", "runs", "mode", "timings", "dataset_source")


def service_label(provider: str, mode: str | None) -> str:
    """Return the service name of a record: the provider, plus the mode where it differs.

    ``mode`` is ``imgbench.summary.mode_label``'s text, so a replay names what
    its cassette was recorded against, as in ``nyckel (replay of emulator)``.
    """
    if not mode or mode in PLAIN_MODES or mode == provider:
        return provider
    return f"{provider} ({mode})"


def source_names(loaded: Sequence[LoadedResults]) -> list[str]:
    """Name each input by its file name, or by its whole path where two file names are equal."""
    names = [result.path.name for result in loaded]
    return [name if names.count(name) == 1 else str(result.path) for name, result in zip(names, loaded, strict=True)]


def records_by_key(loaded: Sequence[LoadedResults]) -> dict[tuple[str, str], dict]:
    """Map (source, case id) to the case record, for the parts the case frame leaves out."""
    return {(source, record["case_id"]): record
            for result, source in zip(loaded, source_names(loaded), strict=True) for record in result.records}


def latency_samples(loaded: Sequence[LoadedResults]) -> dict[tuple[str, str], tuple[float, ...]]:
    """Map (source, case id) to the case's per-request latencies in seconds."""
    return {(source, case_id): data
            for result, source in zip(loaded, source_names(loaded), strict=True)
            for case_id, data in result.latencies_s.items()}


def case_frame(loaded: Sequence[LoadedResults]) -> pd.DataFrame:
    """Flatten every record into one row: identity, provenance, figures and error."""
    rows = [_case_row(result, source, record)
            for result, source in zip(loaded, source_names(loaded), strict=True) for record in result.records]
    frame = pd.DataFrame(rows, columns=list(CASE_COLUMNS))
    for column in INTEGER_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    return frame.sort_values(["service", "dataset", "ablation", "source"], kind="stable").reset_index(drop=True)


def _case_row(result: LoadedResults, source: str, record: dict) -> dict:
    mode = record.get("mode")
    measured = record.get("timings_measured", True) is not False
    seconds = record.get("seconds") or {}
    classification = record.get("classification") or {}
    latency = record.get("test_latency") or {}
    load = record.get("load_test") or {}
    error = record.get("error") or {}

    def timing(value):
        return value if measured else None

    return {
        "source": source, "run_id": result.run_id, "case_id": record["case_id"],
        "service": service_label(record["provider"], mode_label(record) if mode else None),
        "provider": record["provider"],
        "mode": mode or NOT_RECORDED, "dataset": record["dataset"], "ablation": record["ablation"],
        "status": record["status"], "timings": MEASURED if measured else NOT_MEASURED,
        "dataset_source": record.get("dataset_source") or NOT_RECORDED,
        "manifest_sha256": record.get("manifest_sha256"),
        "accuracy": classification.get("accuracy"), "macro_f1": classification.get("macro_f1"),
        "test_images": classification.get("test_images"),
        "failed_predictions": classification.get("failed_predictions"),
        "training_s": timing(seconds.get("upload_to_endpoint")), "upload_s": timing(seconds.get("upload")),
        "training_phase_s": timing(seconds.get("training")), "deployment_s": timing(seconds.get("deployment")),
        "latency_mean_s": timing(latency.get("mean_s")), "latency_p50_s": timing(latency.get("p50_s")),
        "latency_p90_s": timing(latency.get("p90_s")), "latency_p95_s": timing(latency.get("p95_s")),
        "latency_p99_s": timing(latency.get("p99_s")),
        "load_requests": load.get("requests"), "load_concurrency": load.get("concurrency"),
        "load_succeeded": load.get("succeeded"), "load_failed": load.get("failed"),
        "load_wall_s": timing(load.get("wall_s")), "load_requests_per_s": timing(load.get("requests_per_s")),
        "error_phase": error.get("phase"), "error_kind": error.get("kind"),
        "error_message": _first_line(error.get("message")),
    }


def _first_line(message: str | None) -> str | None:
    if not message or not message.strip():
        return None
    line = message.strip().splitlines()[0]
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 3] + "..."


def joined(values: Iterable) -> str:
    """Join the distinct values of a column, e.g. the modes behind one aggregated row."""
    distinct = sorted({str(value) for value in values if value is not None and not pd.isna(value)})
    return "; ".join(distinct) if distinct else NOT_RECORDED


def provenance(frame: pd.DataFrame) -> str:
    """Describe which modes and dataset copies the records behind a view came from."""
    if frame.empty:
        return "No records."
    modes = ", ".join(f"{mode} ({count} record{'s' if count != 1 else ''})"
                      for mode, count in frame["mode"].value_counts().sort_index().items())
    copies = "; ".join(f"{dataset} = {joined(rows['dataset_source'])}"
                       for dataset, rows in frame.groupby("dataset", sort=True))
    return f"Modes: {modes}. Dataset copies: {copies}."


def timings_of(frame: pd.DataFrame) -> str:
    """Return "measured" when any record behind an aggregated row has measured timings."""
    return MEASURED if (frame["timings"] == MEASURED).any() else NOT_MEASURED


def largest_ablations(passed: pd.DataFrame) -> dict[str, int]:
    """Return the largest ablation with a passed case, per dataset."""
    return {dataset: int(rows["ablation"].max()) for dataset, rows in passed.groupby("dataset", sort=True)}


def at_largest_ablation(frame: pd.DataFrame, largest: dict[str, int]) -> pd.DataFrame:
    """Keep the rows whose ablation is the largest one of their dataset."""
    return frame[frame["ablation"] == frame["dataset"].map(largest)]


def per_case_means(passed: pd.DataFrame, value: str) -> pd.DataFrame:
    """Average ``value`` over repeated records of one (service, dataset, ablation), e.g. from several runs.

    A row of records without measured timings keeps ``value`` empty when
    ``value`` is a time.
    """
    rows = []
    for (service, dataset, ablation), group in passed.groupby(["service", "dataset", "ablation"], sort=True):
        measured = group[group["timings"] == MEASURED]
        source = group if value in ("accuracy", "macro_f1") else measured
        rows.append({"service": service, "dataset": dataset, "ablation": int(ablation),
                     value: source[value].mean() if not source.empty else np.nan, "runs": len(group),
                     "mode": joined(group["mode"]), "timings": timings_of(group),
                     "dataset_source": joined(group["dataset_source"])})
    columns = list(MEANS_COLUMNS)
    columns.insert(3, value)
    return pd.DataFrame(rows, columns=columns)


def service_summary(passed: pd.DataFrame) -> pd.DataFrame:
    """Mean training time (measured records only) and mean accuracy per service."""
    rows = []
    for service, group in passed.groupby("service", sort=True):
        measured = group[group["timings"] == MEASURED]
        rows.append({
            "service": service, "mode": joined(group["mode"]), "passed_cases": len(group),
            "datasets": joined(group["dataset"]), "timings": timings_of(group),
            "mean_training_s": measured["training_s"].mean() if not measured.empty else np.nan,
            "mean_accuracy": group["accuracy"].mean(), "dataset_source": joined(group["dataset_source"]),
        })
    return pd.DataFrame(rows, columns=["service", "mode", "passed_cases", "datasets", "timings",
                                       "mean_training_s", "mean_accuracy", "dataset_source"])


def accuracy_by_ablation(per_dataset: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and its standard error across datasets, per service and ablation.

    The standard error is the sample standard deviation over the square root
    of the number of datasets, and empty for a single dataset.
    """
    provenance_columns = [column for column in ("mode", "dataset_source") if column in per_dataset]
    rows = []
    for (service, ablation), group in per_dataset.groupby(["service", "ablation"], sort=True):
        values = group["accuracy"].dropna()
        error = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.nan
        row = {"service": service, "ablation": int(ablation), "datasets": len(values),
               "mean_accuracy": values.mean(), "standard_error": error}
        row.update({column: joined(group[column]) for column in provenance_columns})
        rows.append(row)
    return pd.DataFrame(rows, columns=["service", "ablation", "datasets", "mean_accuracy", "standard_error",
                                       *provenance_columns])


def samples_for(passed: pd.DataFrame, samples: dict, service: str) -> list[float]:
    """Pool the per-request latencies of a service's measured, passed cases."""
    rows = passed[(passed["service"] == service) & (passed["timings"] == MEASURED)]
    pooled: list[float] = []
    for row in rows.itertuples():
        pooled.extend(samples.get((row.source, row.case_id), ()))
    return pooled


def latency_distribution(passed: pd.DataFrame, samples: dict) -> pd.DataFrame:
    """Quartiles and 1.5-IQR whiskers of the pooled per-request latencies, per service.

    A service whose records were all replayed gets a row without figures. A
    measured service without per-request data is left out.
    """
    rows = []
    for service, group in passed.groupby("service", sort=True):
        timings = timings_of(group)
        row = {"service": service, "mode": joined(group["mode"]), "cases": len(group), "timings": timings,
               "requests": 0}
        pooled = np.asarray(samples_for(passed, samples, service))
        if timings == MEASURED and pooled.size == 0:
            continue
        if pooled.size:
            q1, median, q3 = np.percentile(pooled, [25, 50, 75])
            spread = 1.5 * (q3 - q1)
            inside = pooled[(pooled >= q1 - spread) & (pooled <= q3 + spread)]
            row.update(requests=int(pooled.size), mean_s=pooled.mean(), q1_s=q1, median_s=median, q3_s=q3,
                       whisker_low_s=inside.min(), whisker_high_s=inside.max(),
                       outliers=int(pooled.size - inside.size))
        row["dataset_source"] = joined(group["dataset_source"])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["service", "mode", "cases", "timings", "requests", "mean_s", "q1_s",
                                        "median_s", "q3_s", "whisker_low_s", "whisker_high_s", "outliers",
                                        "dataset_source"])
    return frame.astype({"outliers": "Int64"})


def load_test_summary(passed: pd.DataFrame) -> pd.DataFrame:
    """Load-test wall time per service and load-test size (requests, concurrency)."""
    with_load = passed.dropna(subset=["load_requests", "load_concurrency"])
    rows = []
    for (service, requests, concurrency), group in with_load.groupby(
            ["service", "load_requests", "load_concurrency"], sort=True):
        wall = group.loc[group["timings"] == MEASURED, "load_wall_s"].dropna()
        rate = group.loc[group["timings"] == MEASURED, "load_requests_per_s"].dropna()
        rows.append({
            "service": service, "requests": int(requests), "concurrency": int(concurrency),
            "mode": joined(group["mode"]), "cases": len(group), "timings": timings_of(group),
            "mean_wall_s": wall.mean() if not wall.empty else np.nan,
            "min_wall_s": wall.min() if not wall.empty else np.nan,
            "max_wall_s": wall.max() if not wall.empty else np.nan,
            "mean_requests_per_s": rate.mean() if not rate.empty else np.nan,
            "failed_requests": int(group["load_failed"].fillna(0).sum()),
            "dataset_source": joined(group["dataset_source"]),
        })
    return pd.DataFrame(rows, columns=["service", "requests", "concurrency", "mode", "cases", "timings",
                                       "mean_wall_s", "min_wall_s", "max_wall_s", "mean_requests_per_s",
                                       "failed_requests", "dataset_source"])


def classification_tables(cases: pd.DataFrame, records: dict[tuple[str, str], dict]
                          ) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[object, dict]]]:
    """Per-class accuracy and confusion-matrix cells of every case with a usable classification.

    Returns both tables and the (case row, classification) pairs they came
    from, in case-table order. A classification whose matrix does not match
    its class list is left out.
    """
    label_columns = ["case_id", "service", "mode", "dataset", "ablation", "status", "dataset_source"]
    class_rows, cell_rows, used = [], [], []
    for row in cases.itertuples():
        classification = records[(row.source, row.case_id)].get("classification")
        if not _usable_classification(classification):
            continue
        used.append((row, classification))
        labels = {column: getattr(row, column) for column in label_columns}
        classes = classification["classes"]
        for name, accuracy in classification["per_class_accuracy"].items():
            class_rows.append({**labels, "class": name, "accuracy": accuracy})
        for true_index, counts in enumerate(classification["confusion_matrix"]):
            for predicted_index, count in enumerate(counts):
                cell_rows.append({**labels, "true_class": classes[true_index],
                                  "predicted_class": classes[predicted_index], "count": count})
    per_class = pd.DataFrame(class_rows, columns=label_columns + ["class", "accuracy"])
    cells = pd.DataFrame(cell_rows, columns=label_columns + ["true_class", "predicted_class", "count"])
    return per_class, cells, used


def _usable_classification(classification: object) -> bool:
    if not isinstance(classification, dict):
        return False
    matrix = classification.get("confusion_matrix")
    classes = classification.get("classes")
    per_class = classification.get("per_class_accuracy")
    if not (isinstance(matrix, list) and isinstance(classes, list) and isinstance(per_class, dict)):
        return False
    return len(matrix) == len(classes) and all(isinstance(counts, list) and len(counts) == len(classes)
                                               for counts in matrix)


def error_table(cases: pd.DataFrame) -> pd.DataFrame:
    """List the cases that did not pass, one row each, with their errors."""
    problems = cases[cases["status"] != "passed"]
    return problems.loc[:, ["case_id", "service", "mode", "dataset", "ablation", "status", "error_phase",
                            "error_kind", "error_message", "dataset_source", "source"]].reset_index(drop=True)


def load_error_table(cases: pd.DataFrame, records: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """Failed load-test requests per case and error kind, from every case's ``errors_by_kind``."""
    rows = []
    for row in cases.itertuples():
        load = records[(row.source, row.case_id)].get("load_test") or {}
        errors = load.get("errors_by_kind") or {}
        for kind, count in sorted(errors.items()):
            rows.append({"case_id": row.case_id, "service": row.service, "mode": row.mode, "dataset": row.dataset,
                         "ablation": row.ablation, "kind": kind, "count": count,
                         "dataset_source": row.dataset_source})
    return pd.DataFrame(rows, columns=["case_id", "service", "mode", "dataset", "ablation", "kind", "count",
                                       "dataset_source"])


def input_table(loaded: Sequence[LoadedResults]) -> pd.DataFrame:
    """Summarise each result file in one row: run, machine and case counts by status."""
    rows = []
    for result, source in zip(loaded, source_names(loaded), strict=True):
        statuses = [record["status"] for record in result.records]
        cpu = result.machine_info.get("cpu") if isinstance(result.machine_info.get("cpu"), dict) else {}
        rows.append({"source": source, "run_id": result.run_id, "records": len(result.records),
                     "passed": statuses.count("passed"), "failed": statuses.count("failed"),
                     "skipped": statuses.count("skipped"),
                     "modes": joined(record.get("mode") for record in result.records),
                     "machine": f"{result.machine_info.get('node', '?')} ({cpu.get('brand_raw', '?')}, "
                                f"{result.machine_info.get('machine', '?')})"})
    return pd.DataFrame(rows, columns=["source", "run_id", "records", "passed", "failed", "skipped", "modes",
                                       "machine"])


class PublishedFigures:
    """Published 2023 figures restricted to the datasets this run can be set against."""

    def __init__(self, cases: pd.DataFrame):
        results = published_results()
        matching = results[results["dataset"].isin(set(cases["dataset"]))]
        if matching.empty:
            self.scope = "all published datasets, since this run shares none with them"
            matching = results
        else:
            self.scope = f"the datasets of this run ({', '.join(sorted(set(matching['dataset'])))})"
        self.results = matching.reset_index(drop=True)
        self.throughput = published_throughput()

    def service_means(self, passed: pd.DataFrame) -> pd.DataFrame:
        """Mean training time and accuracy per published service over this run's (dataset, ablation) pairs.

        Falls back to every published row in scope when no pair matches.
        """
        pairs = set(zip(passed["dataset"], passed["ablation"].astype(int), strict=True))
        same = self.results[[pair in pairs for pair in zip(self.results["dataset"], self.results["ablation"],
                                                           strict=True)]]
        chosen = same if not same.empty else self.results
        return chosen.groupby("service", as_index=False).agg(mean_training_time_s=("training_time_s", "mean"),
                                                              mean_accuracy=("accuracy", "mean"))

    def median_latencies(self) -> dict[str, float]:
        """Median over cases of the published per-case median latency, per service, in seconds."""
        return self.results.groupby("service")["median_latency_s"].median().to_dict()

"""Case-by-case comparison of result files, with thresholds for a regression gate.

``compare_results`` matches the cases of two result files on ``case_id``. It
compares accuracy and macro-F1 in percentage points, and training time
(``seconds.upload_to_endpoint``), test-set p50 and p99 latency and load-test
wall time in seconds. Each change is shown as a delta and a ratio, with the
better direction named ("1.20x slower", "+3.1 pt better").

Significance: latency changes are tested with a two-sided Mann-Whitney U test
on the per-request latencies (pytest-benchmark ``stats.data``) of both
sides, and called "not significant" when p >= 0.05. Every other figure is
a single sample per run, so it is never called significant. A threshold
such as ``latency_p50:+10%`` is checked on the figure itself, whatever the
test's p-value.

Warnings flag comparisons that may not mean what they seem: different
machines, modes, dataset copies, images (``manifest_sha256``) or load-test sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from imgbench.errors import ImgbenchError
from imgbench.resultfiles import LoadedResults

# Significance level of the Mann-Whitney U test on per-request latencies.
ALPHA = 0.05
# Cases named in one warning before the rest are only counted.
MAX_NAMED_CASES = 5
NOT_MEASURED = "not measured (replayed)"
SINGLE_SAMPLE = "single sample: not tested"
NO_LATENCY_DATA = "no per-request data: not tested"
# Relative changes below this count as "no change" in the change column (not in thresholds).
SAME_RATIO = 0.005
SAME_POINTS = 0.05
MACHINE_FIELDS = ("node", "cpu", "machine")


class InvalidThresholdError(ImgbenchError):
    """A ``--fail-on`` threshold is not in the METRIC:+N% / -Npt / +Ns form."""

    kind = "config"


@dataclass(frozen=True)
class Metric:
    """A figure of a case record that compare reports and thresholds can name."""

    name: str
    description: str
    # "fraction" (reported in percent and percentage points) or "seconds".
    unit: str
    higher_is_better: bool
    read: Callable[[dict], object]
    # True for a time, which a replayed record does not measure.
    timing: bool
    # True for latency figures, which are tested on per-request data. The others are single samples.
    per_request: bool = False


def _section(record: dict, key: str) -> dict:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("accuracy", "test-set accuracy", "fraction", True,
           lambda r: _section(r, "classification").get("accuracy"), timing=False),
    Metric("macro_f1", "test-set macro-F1", "fraction", True,
           lambda r: _section(r, "classification").get("macro_f1"), timing=False),
    Metric("training_s", "training time, upload to endpoint", "seconds", False,
           lambda r: _section(r, "seconds").get("upload_to_endpoint"), timing=True),
    Metric("latency_p50", "test-set median latency", "seconds", False,
           lambda r: _section(r, "test_latency").get("p50_s"), timing=True, per_request=True),
    Metric("latency_p99", "test-set 99th-percentile latency", "seconds", False,
           lambda r: _section(r, "test_latency").get("p99_s"), timing=True, per_request=True),
    Metric("load_s", "load-test wall time", "seconds", False,
           lambda r: _section(r, "load_test").get("wall_s"), timing=True),
)}

THRESHOLD_PATTERN = re.compile(r"(?P<metric>[a-z0-9_]+):(?P<sign>[+-])(?P<amount>\d+(?:\.\d+)?)(?P<unit>%|pt|s)")
UNITS_BY_METRIC_UNIT = {"fraction": ("%", "pt"), "seconds": ("%", "s")}
THRESHOLD_FORMS = (
    "Valid forms: METRIC:+N% or METRIC:-N% (relative change), METRIC:+Npt or METRIC:-Npt (percentage points, "
    "for accuracy and macro_f1), METRIC:+Ns or METRIC:-Ns (seconds, for training_s, latency_p50, latency_p99 "
    f"and load_s). Valid metrics: {', '.join(METRICS)}. A + limit fails on a larger rise, a - limit on a larger "
    "fall, e.g. accuracy:-2pt or latency_p50:+10%.")


@dataclass(frozen=True)
class Threshold:
    """A limit on one metric's change: fail when it moves past ``amount`` in direction ``sign``."""

    metric: str
    sign: int
    amount: float
    unit: str
    text: str

    def change(self, base: float, new: float) -> float:
        """Return the change from ``base`` to ``new`` in this threshold's unit."""
        if self.unit == "pt":
            return (new - base) * 100
        if self.unit == "s":
            return new - base
        if base == 0:
            return 0.0 if new == 0 else math.copysign(math.inf, new)
        return (new / base - 1) * 100

    def is_breached(self, base: float, new: float) -> bool:
        return self.sign * self.change(base, new) > self.amount


def parse_threshold(text: str) -> Threshold:
    """Parse ``METRIC:+N%``, ``METRIC:-Npt`` or ``METRIC:+Ns``; raise InvalidThresholdError otherwise."""
    match = THRESHOLD_PATTERN.fullmatch(text.strip())
    if match is None:
        raise InvalidThresholdError(f"invalid threshold {text!r}. {THRESHOLD_FORMS}")
    metric = METRICS.get(match["metric"])
    if metric is None:
        raise InvalidThresholdError(f"invalid threshold {text!r}: unknown metric {match['metric']!r}. "
                                    f"{THRESHOLD_FORMS}")
    if match["unit"] not in UNITS_BY_METRIC_UNIT[metric.unit]:
        allowed = " or ".join(UNITS_BY_METRIC_UNIT[metric.unit])
        raise InvalidThresholdError(f"invalid threshold {text!r}: {metric.name} takes {allowed}, not "
                                    f"{match['unit']}. {THRESHOLD_FORMS}")
    return Threshold(metric.name, 1 if match["sign"] == "+" else -1, float(match["amount"]), match["unit"],
                     text.strip())


@dataclass(frozen=True)
class MetricChange:
    """One figure of one case in both runs, with its significance."""

    case_id: str
    metric: str
    base: float | None
    new: float | None
    significance: str
    p_value: float | None = None
    # Why the figure is not compared, e.g. "not measured (replayed)", or empty when it is compared.
    missing: str = ""

    @property
    def compared(self) -> bool:
        return not self.missing and self.base is not None and self.new is not None


@dataclass
class RunComparison:
    """The comparison of one result file against the base file."""

    base: LoadedResults
    new: LoadedResults
    changes: list[MetricChange] = field(default_factory=list)
    status_changes: list[tuple[str, str, str]] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)
    # Cases that passed in neither file, so have no figures to compare.
    not_passed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)


def compare_results(base: LoadedResults, new: LoadedResults,
                    thresholds: Sequence[Threshold] = ()) -> RunComparison:
    """Compare every case that both files contain, then check ``thresholds`` on the changes."""
    base_records = {record["case_id"]: record for record in base.records}
    new_records = {record["case_id"]: record for record in new.records}
    common = sorted(base_records.keys() & new_records.keys())
    comparison = RunComparison(base, new, only_in_base=sorted(base_records.keys() - new_records.keys()),
                               only_in_new=sorted(new_records.keys() - base_records.keys()))
    comparison.warnings.extend(environment_warnings(base, new, [(base_records[c], new_records[c]) for c in common]))
    if comparison.only_in_base or comparison.only_in_new:
        comparison.warnings.append(_unmatched_warning(comparison))

    for case_id in common:
        base_record, new_record = base_records[case_id], new_records[case_id]
        if base_record["status"] != new_record["status"]:
            comparison.status_changes.append((case_id, _status_text(base_record), _status_text(new_record)))
        if base_record["status"] != "passed" and new_record["status"] != "passed":
            comparison.not_passed.append(case_id)
            continue
        for metric in METRICS.values():
            comparison.changes.append(_metric_change(case_id, metric, base, new, base_record, new_record))

    comparison.breaches.extend(check_thresholds(comparison, thresholds, base_records, new_records, common))
    return comparison


def _status_text(record: dict) -> str:
    error = record.get("error") or {}
    return f"{record['status']} ({error['kind']})" if error.get("kind") else record["status"]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _metric_change(case_id: str, metric: Metric, base: LoadedResults, new: LoadedResults, base_record: dict,
                   new_record: dict) -> MetricChange:
    base_value, new_value = _number(metric.read(base_record)), _number(metric.read(new_record))
    if metric.timing and (base_record.get("timings_measured") is False or new_record.get("timings_measured") is False):
        # A replayed time is no measurement, so it is not shown as one either.
        return MetricChange(case_id, metric.name, _measured(base_record, base_value),
                            _measured(new_record, new_value), "", missing=NOT_MEASURED)
    if base_value is None or new_value is None:
        return MetricChange(case_id, metric.name, base_value, new_value, "", missing="not recorded")
    if metric.name == "load_s" and _load_size(base_record) != _load_size(new_record):
        return MetricChange(case_id, metric.name, base_value, new_value, "",
                            missing=f"different load tests: {_load_size(base_record)} vs {_load_size(new_record)}")
    if not metric.per_request:
        return MetricChange(case_id, metric.name, base_value, new_value, SINGLE_SAMPLE)
    base_data, new_data = base.latencies_s.get(case_id, ()), new.latencies_s.get(case_id, ())
    if len(base_data) < 2 or len(new_data) < 2:
        return MetricChange(case_id, metric.name, base_value, new_value, NO_LATENCY_DATA)
    p_value = mann_whitney_p(base_data, new_data)
    verdict = "significant" if p_value < ALPHA else "not significant"
    return MetricChange(case_id, metric.name, base_value, new_value, f"{verdict} ({format_p(p_value)})", p_value)


def _measured(record: dict, value: float | None) -> float | None:
    return None if record.get("timings_measured") is False else value


def _load_size(record: dict) -> str | None:
    """Return the load-test size as "N req @ C", or None for a case without a load test."""
    load = _section(record, "load_test")
    if load.get("requests") is None:
        return None
    return f"{load['requests']} req @ {load.get('concurrency')}"


def check_thresholds(comparison: RunComparison, thresholds: Sequence[Threshold], base_records: dict,
                     new_records: dict, common: Sequence[str]) -> list[str]:
    """Return one message per breached threshold, naming the case and the figure."""
    if not thresholds:
        return []
    base_name, new_name = comparison.base.label, comparison.new.label
    if not common:
        return [f"{base_name} and {new_name} have no case in common, so no threshold could be checked"]
    messages = []
    for case_id in common:
        if base_records[case_id]["status"] == "passed" and new_records[case_id]["status"] != "passed":
            messages.append(f"{case_id}: passed in {base_name} but {_status_text(new_records[case_id])} in "
                            f"{new_name}, so its figures cannot meet the thresholds")
    for threshold in thresholds:
        for change in comparison.changes:
            if change.metric == threshold.metric and change.compared and threshold.is_breached(change.base,
                                                                                                change.new):
                messages.append(_breach_message(change, threshold))
    return messages


def _breach_message(change: MetricChange, threshold: Threshold) -> str:
    metric = METRICS[change.metric]
    amount = threshold.change(change.base, change.new)
    direction = "rose" if amount > 0 else "fell"
    unit = {"pt": " pt", "s": " s", "%": "%"}[threshold.unit]
    significance = f"; {change.significance}" if change.significance else ""
    return (f"{change.case_id}: {change.metric} ({metric.description}) {direction} by {abs(amount):.1f}{unit} "
            f"({format_value(metric, change.base)} -> {format_value(metric, change.new)}), beyond the limit "
            f"{threshold.text}{significance}")


def environment_warnings(base: LoadedResults, new: LoadedResults, pairs: Sequence[tuple[dict, dict]]) -> list[str]:
    """Return warnings about differences that can explain a change better than the service can."""
    warnings = []
    machine_differences = [f"{name} {_machine_field(base, name)!r} vs {_machine_field(new, name)!r}"
                           for name in MACHINE_FIELDS if _machine_field(base, name) != _machine_field(new, name)]
    if machine_differences:
        warnings.append(f"{base.label} and {new.label} come from different machines "
                        f"({'; '.join(machine_differences)}): time and latency changes may come from the machine, "
                        f"not the service")
    checks = (
        (lambda r: r.get("mode"), "mode differs",
         "figures from different modes are not comparable, because a replayed time is no measurement and an "
         "emulator is not the service"),
        (lambda r: r.get("dataset_source"), "dataset copy differs", "accuracy changes may come from the dataset copy"),
        (lambda r: r.get("manifest_sha256"), "different images (manifest_sha256 differs)",
         "accuracy changes may come from the images, not the service"),
        (_load_size, "load-test size differs", "their load-test times are not compared"),
    )
    for read, what, consequence in checks:
        differing = [(b["case_id"], read(b), read(n)) for b, n in pairs if read(b) != read(n)]
        if read is _load_size:
            # A case without a load test has no load time to compare, which the table already shows.
            differing = [(case_id, old, new) for case_id, old, new in differing if old and new]
        if differing:
            named = ", ".join(f"{case_id} ({_display(old)} -> {_display(new_value)})"
                              for case_id, old, new_value in differing[:MAX_NAMED_CASES])
            more = f" and {len(differing) - MAX_NAMED_CASES} more" if len(differing) > MAX_NAMED_CASES else ""
            warnings.append(f"{what} in {len(differing)} case(s) between {base.label} and {new.label}: "
                            f"{named}{more}; {consequence}")
    return warnings


def _machine_field(results: LoadedResults, name: str) -> object:
    value = results.machine_info.get(name)
    if name == "cpu" and isinstance(value, dict):
        return value.get("brand_raw")
    return value


def _display(value: object) -> str:
    """Format a record value for a warning, with a SHA-256 digest cut to its first 12 hex digits."""
    if value is None:
        return "not recorded"
    text = str(value)
    return text[:12] if re.fullmatch(r"[0-9a-f]{64}", text) else text


def _unmatched_warning(comparison: RunComparison) -> str:
    parts = []
    for names, where in ((comparison.only_in_base, comparison.base.label),
                         (comparison.only_in_new, comparison.new.label)):
        if names:
            listed = ", ".join(names[:MAX_NAMED_CASES])
            more = f" and {len(names) - MAX_NAMED_CASES} more" if len(names) > MAX_NAMED_CASES else ""
            parts.append(f"{len(names)} case(s) only in {where}: {listed}{more}")
    return "; ".join(parts) + "; they are not compared"


def mann_whitney_p(base: Sequence[float], new: Sequence[float]) -> float:
    """Return the two-sided Mann-Whitney U p-value, from scipy when it is installed."""
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        return mann_whitney_p_normal(base, new)
    return float(mannwhitneyu(base, new, alternative="two-sided").pvalue)


def mann_whitney_p_normal(base: Sequence[float], new: Sequence[float]) -> float:
    """Two-sided Mann-Whitney U p-value from the normal approximation.

    Uses the tie-corrected variance and a 0.5 continuity correction, as
    scipy.stats.mannwhitneyu does with ``method="asymptotic"``. scipy 1.17
    itself uses this approximation once both samples have more than 8 values,
    and the exact distribution below that.
    """
    n1, n2 = len(base), len(new)
    if n1 == 0 or n2 == 0:
        raise ValueError("the Mann-Whitney U test needs at least one value on each side")
    ranks = _average_ranks(list(base) + list(new))
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    total = n1 + n2
    tie_term = sum(count ** 3 - count for count in _tie_counts(list(base) + list(new)))
    variance = n1 * n2 / 12 * ((total + 1) - tie_term / (total * (total - 1))) if total > 1 else 0.0
    if variance <= 0:
        return 1.0
    mean = n1 * n2 / 2
    z = (abs(u1 - mean) - 0.5) / math.sqrt(variance)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _tie_counts(values: Sequence[float]) -> list[int]:
    counts: dict[float, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return [count for count in counts.values() if count > 1]


def format_p(p_value: float) -> str:
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.unit == "fraction":
        return f"{value:.2%}"
    return _format_seconds(value)


def _format_seconds(value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if abs(value) < 1:
        return f"{value * 1000:{sign}.1f} ms"
    return f"{value:{sign}.2f} s"


def describe_change(metric: Metric, change: MetricChange) -> tuple[str, str, str]:
    """Return the delta, ratio and verdict texts of a change, e.g. ("+29.0 ms", "1.30x", "1.30x slower")."""
    if not change.compared:
        return "-", "-", change.missing or "-"
    base, new = change.base, change.new
    if base:
        ratio = new / base
    else:
        ratio = math.inf if new else 1.0
    ratio_text = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"
    if metric.unit == "fraction":
        points = (new - base) * 100
        if abs(points) < SAME_POINTS:
            return f"{points:+.2f} pt", ratio_text, "no change"
        better = (points > 0) == metric.higher_is_better
        return f"{points:+.2f} pt", ratio_text, f"{points:+.1f} pt {'better' if better else 'worse'}"
    delta = _format_seconds(new - base, signed=True)
    if not math.isfinite(ratio) or abs(ratio - 1) < SAME_RATIO:
        return delta, ratio_text, "no change" if math.isfinite(ratio) else "was zero"
    if ratio > 1:
        return delta, ratio_text, f"{ratio:.2f}x slower"
    return delta, ratio_text, f"{1 / ratio:.2f}x faster"


COLUMNS = ("case", "metric", "base", "new", "delta", "ratio", "change", "significance")


def comparison_frame(comparisons: Sequence[RunComparison]) -> pd.DataFrame:
    """List every compared figure as one row, for CSV and Markdown output."""
    rows = []
    for comparison in comparisons:
        for change in comparison.changes:
            metric = METRICS[change.metric]
            delta, ratio, verdict = describe_change(metric, change)
            rows.append({"base_file": comparison.base.label, "new_file": comparison.new.label,
                         "case": change.case_id, "metric": change.metric,
                         "base": format_value(metric, change.base), "new": format_value(metric, change.new),
                         "delta": delta, "ratio": ratio, "change": verdict, "significance": change.significance,
                         "p_value": "" if change.p_value is None else f"{change.p_value:.6g}"})
    return pd.DataFrame(rows, columns=["base_file", "new_file", *COLUMNS, "p_value"])


def _header_lines(comparison: RunComparison) -> list[str]:
    lines = []
    for role, results in (("base", comparison.base), ("new", comparison.new)):
        lines.append(f"{role + ':':5} {results.label} (run {results.run_id}, {len(results.records)} cases, "
                     f"machine {_machine_field(results, 'node')!s})")
    return lines


def format_text(comparisons: Sequence[RunComparison]) -> str:
    """Render the comparisons as plain text: headers, warnings, one table each, then breaches."""
    blocks = []
    for comparison in comparisons:
        lines = _header_lines(comparison)
        lines += [f"warning: {message}" for message in comparison.warnings]
        lines += [f"status: {case_id}: {old} -> {new}" for case_id, old, new in comparison.status_changes]
        if comparison.not_passed:
            lines.append(f"not compared, passed in neither file: {', '.join(comparison.not_passed)}")
        frame = comparison_frame([comparison]).loc[:, list(COLUMNS)]
        lines += [""] + (_text_table(frame) if not frame.empty else ["no case in common: nothing to compare"])
        if comparison.breaches:
            lines += ["", f"threshold breaches ({len(comparison.breaches)}):"]
            lines += [f"  {message}" for message in comparison.breaches]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _text_table(frame: pd.DataFrame) -> list[str]:
    rows = [list(frame.columns)] + [list(row) for row in frame.itertuples(index=False)]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(frame.columns))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def format_markdown(comparisons: Sequence[RunComparison]) -> str:
    """Render the comparisons as Markdown, with warnings and breaches as lists."""
    lines = ["# imgbench compare", ""]
    for comparison in comparisons:
        lines += [f"## {comparison.new.label} against {comparison.base.label}", ""]
        lines += [f"- {line}" for line in _header_lines(comparison)]
        lines += [f"- **warning:** {message}" for message in comparison.warnings]
        lines += [f"- status: {case_id}: {old} -> {new}" for case_id, old, new in comparison.status_changes]
        if comparison.not_passed:
            lines.append(f"- not compared, passed in neither file: {', '.join(comparison.not_passed)}")
        frame = comparison_frame([comparison]).loc[:, list(COLUMNS)]
        lines.append("")
        if frame.empty:
            lines.append("No case in common: nothing to compare.")
        else:
            lines.append("| " + " | ".join(COLUMNS) + " |")
            lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
            lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
                      for row in frame.itertuples(index=False)]
        if comparison.breaches:
            lines += ["", f"**Threshold breaches ({len(comparison.breaches)}):**", ""]
            lines += [f"- {message}" for message in comparison.breaches]
        lines.append("")
    return "\n".join(lines)

"""The report's charts, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Each function takes tables that ``imgbench.report`` has already built and
draws them as they are: no statistic is computed here, apart from the
per-request latency box plots. Published 2023 figures, when given, are drawn
hatched, with hollow markers or dashed lines, and their legend entries label
them as another run's figures. Records whose timings were not measured
never become bars, points or boxes. They are written on the chart as "not
measured (replayed)" instead.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

NOT_MEASURED = "not measured (replayed)"
PUBLISHED_LABEL = "published 2023 figures (another run)"
DPI = 100
# Confusion matrices with more classes than this show colours without counts,
# and per-class bar charts show only the lowest accuracies.
MAX_ANNOTATED_CLASSES = 12
MAX_CLASS_BARS = 40
PUBLISHED_HATCH = "///"
PUBLISHED_PALETTE = colormaps["Dark2"]
RUN_PALETTE = colormaps["tab10"]


class Palette:
    """Stable colours: one per service of this run, one per published service."""

    def __init__(self, services: Sequence[str], published_services: Sequence[str] = ()):
        self._run = {name: RUN_PALETTE(i % 10) for i, name in enumerate(sorted(services))}
        self._published = {name: PUBLISHED_PALETTE(i % 8) for i, name in enumerate(sorted(published_services))}

    def run(self, service: str):
        return self._run.get(service, "grey")

    def published(self, service: str):
        return self._published.get(service, "grey")


def published_name(service: str) -> str:
    return f"{service}: {PUBLISHED_LABEL}"


def to_png(figure: Figure) -> bytes:
    """Render ``figure`` to PNG bytes without the Software tag, so output is repeatable."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _legend_below(ax, handles=None, labels=None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, fontsize="small",
                  frameon=False)


def _mark_not_measured(ax, x: float, service: str) -> None:
    """Write "<service>: not measured (replayed)" upwards at data position ``x``, in place of a bar or box."""
    ax.text(x, 0.02, f"{service}: {NOT_MEASURED}", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
            va="bottom", fontsize="x-small", color="dimgrey")


def grouped_bars(run: pd.DataFrame, published: pd.DataFrame | None, value: str, published_value: str,
                 group_labels: Mapping[str, str], palette: Palette, ylabel: str, *, timing: bool = False,
                 log: bool = False, percent: bool = False) -> bytes:
    """Bars grouped by dataset: one per service of this run, then one per published service.

    ``run`` has columns dataset, service, timings and ``value``. When
    ``value`` is a time (``timing``), a row whose timings were not measured
    gets the not-measured label instead of a bar. ``published`` has columns
    dataset, service and ``published_value``.
    """
    groups = list(group_labels)
    services = sorted(run["service"].unique())
    published_services = sorted(published["service"].unique()) if published is not None else []
    slots = len(services) + len(published_services)
    width = 0.8 / max(slots, 1)
    figure = _new_figure(max(6.0, 1.2 + len(groups) * slots * 0.35), 4.8)
    ax = figure.add_subplot()
    centres = np.arange(len(groups))
    all_heights: list[float] = []

    for slot, service in enumerate(services):
        offsets = centres - 0.4 + width * (slot + 0.5)
        rows = run[run["service"] == service].set_index("dataset")
        heights = [rows[value].get(group, np.nan) for group in groups]
        all_heights += heights
        drawn = not all(np.isnan(height) for height in heights)
        ax.bar(offsets, heights, width, color=palette.run(service), label=service if drawn else None)
        for offset, group in zip(offsets, groups, strict=True):
            if timing and group in rows.index and rows.at[group, "timings"] == NOT_MEASURED:
                _mark_not_measured(ax, offset, service)

    for index, service in enumerate(published_services):
        slot = len(services) + index
        offsets = centres - 0.4 + width * (slot + 0.5)
        rows = published[published["service"] == service].set_index("dataset")
        heights = [rows[published_value].get(group, np.nan) for group in groups]
        all_heights += heights
        ax.bar(offsets, heights, width, facecolor="white", edgecolor=palette.published(service),
               hatch=PUBLISHED_HATCH, linestyle="--", label=published_name(service))

    ax.set_xticks(centres, [group_labels[group] for group in groups])
    ax.set_ylabel(ylabel)
    # A log axis needs a positive bar; a run of replayed cases only has none.
    if log and any(np.isfinite(height) and height > 0 for height in all_heights):
        ax.set_yscale("log")
    if percent:
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="y", alpha=0.3)
    _legend_below(ax)
    return to_png(figure)


def time_against_accuracy(summary: pd.DataFrame, published: pd.DataFrame | None, palette: Palette) -> bytes:
    """Plot one point per service: mean training time (log x) against mean accuracy.

    ``summary`` has columns service, mean_training_s, mean_accuracy; a service
    whose training time was not measured has no point. ``published`` has
    service, mean_training_time_s, mean_accuracy.
    """
    figure = _new_figure(7.0, 5.0)
    ax = figure.add_subplot()
    measured = summary.dropna(subset=["mean_training_s", "mean_accuracy"])
    for row in measured.itertuples():
        ax.scatter(row.mean_training_s, row.mean_accuracy, s=70, color=palette.run(row.service), label=row.service)
        ax.annotate(row.service, (row.mean_training_s, row.mean_accuracy), textcoords="offset points",
                    xytext=(6, 4), fontsize="small")
    if published is not None:
        for row in published.itertuples():
            ax.scatter(row.mean_training_time_s, row.mean_accuracy, s=70, marker="D", facecolors="none",
                       edgecolors=palette.published(row.service), linestyle="--", label=published_name(row.service))
    ax.set_xscale("log")
    ax.set_xlabel("mean training time, upload to endpoint (s, log scale)")
    ax.set_ylabel("mean accuracy")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    _legend_below(ax)
    return to_png(figure)


def accuracy_against_ablation(by_ablation: pd.DataFrame, published: pd.DataFrame | None,
                              palette: Palette) -> bytes:
    """Mean accuracy across datasets against images per class, with standard-error bars.

    Both frames have columns service, ablation, mean_accuracy, standard_error.
    """
    figure = _new_figure(7.0, 4.8)
    ax = figure.add_subplot()
    for service, rows in by_ablation.groupby("service", sort=True):
        rows = rows.sort_values("ablation")
        ax.errorbar(rows["ablation"], rows["mean_accuracy"], yerr=rows["standard_error"].fillna(0.0), marker="o",
                    capsize=3, color=palette.run(service), label=service)
    if published is not None:
        for service, rows in published.groupby("service", sort=True):
            rows = rows.sort_values("ablation")
            ax.errorbar(rows["ablation"], rows["mean_accuracy"], yerr=rows["standard_error"].fillna(0.0),
                        marker="D", markerfacecolor="white", linestyle="--", capsize=3,
                        color=palette.published(service), label=published_name(service))
    _ablation_axis(ax, pd.concat([by_ablation["ablation"]] + ([published["ablation"]] if published is not None
                                                              else [])))
    ax.set_ylabel("mean accuracy across datasets")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    _legend_below(ax)
    return to_png(figure)


def accuracy_against_ablation_per_dataset(per_dataset: pd.DataFrame, published: pd.DataFrame | None,
                                          palette: Palette) -> bytes:
    """Plot one panel per dataset: accuracy against images per class, one line per service.

    ``per_dataset`` has dataset, service, ablation, accuracy; ``published``
    the same columns for the published figures.
    """
    datasets = sorted(per_dataset["dataset"].unique())
    columns = min(3, len(datasets))
    rows_count = math.ceil(len(datasets) / columns)
    figure = _new_figure(4.2 * columns, 3.4 * rows_count + 0.8)
    axes = figure.subplots(rows_count, columns, squeeze=False, sharey=True)
    handles: dict[str, object] = {}
    for ax, dataset in zip(axes.flat, datasets, strict=False):
        run_rows = per_dataset[per_dataset["dataset"] == dataset]
        for service, rows in run_rows.groupby("service", sort=True):
            rows = rows.sort_values("ablation")
            (line,) = ax.plot(rows["ablation"], rows["accuracy"], marker="o", color=palette.run(service))
            handles.setdefault(service, line)
        ablations = [run_rows["ablation"]]
        if published is not None:
            for service, rows in published[published["dataset"] == dataset].groupby("service", sort=True):
                rows = rows.sort_values("ablation")
                (line,) = ax.plot(rows["ablation"], rows["accuracy"], marker="D", markerfacecolor="white",
                                  linestyle="--", color=palette.published(service))
                handles.setdefault(published_name(service), line)
                ablations.append(rows["ablation"])
        _ablation_axis(ax, pd.concat(ablations))
        ax.set_title(dataset)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("accuracy")
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2, fontsize="small",
                  frameon=False)
    return to_png(figure)


def _ablation_axis(ax, ablations: pd.Series) -> None:
    ticks = sorted({int(value) for value in ablations.dropna()})
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks, [str(tick) for tick in ticks])
        ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")


def latency_boxes(samples: Mapping[str, Sequence[float]], not_measured: Sequence[str],
                  published_medians: Mapping[str, float], palette: Palette) -> bytes:
    """Box plots of per-request latency per service, whiskers at 1.5 IQR.

    ``samples`` maps a service to its latencies in seconds. Each service in
    ``not_measured`` gets a labelled empty slot. ``published_medians`` maps a
    published service to its median latency, drawn as a hollow diamond.
    """
    services = sorted(samples)
    labels = services + sorted(not_measured) + [f"{name}\npublished\n2023" for name in sorted(published_medians)]
    figure = _new_figure(max(6.0, 1.0 + 1.2 * len(labels)), 4.8)
    ax = figure.add_subplot()
    if services:
        boxes = ax.boxplot([np.asarray(samples[name]) * 1000 for name in services], positions=range(len(services)),
                           whis=1.5, widths=0.6, patch_artist=True, flierprops={"markersize": 3})
        for patch, service in zip(boxes["boxes"], services, strict=True):
            patch.set_facecolor(palette.run(service))
            patch.set_alpha(0.6)
    for offset, service in enumerate(sorted(not_measured)):
        _mark_not_measured(ax, len(services) + offset, service)
    start = len(services) + len(not_measured)
    for offset, service in enumerate(sorted(published_medians)):
        ax.scatter(start + offset, published_medians[service] * 1000, marker="D", s=60, facecolors="none",
                   edgecolors=palette.published(service), label=published_name(service))
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("latency per request (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(ax)
    return to_png(figure)


def load_test_bars(load: pd.DataFrame, published: pd.DataFrame | None, palette: Palette) -> bytes:
    """Load-test wall time per service and load-test size, with min-max range bars.

    ``load`` has service, requests, concurrency, timings, mean_wall_s,
    min_wall_s, max_wall_s; ``published`` has service and
    seconds_for_1000_requests_at_concurrency_10.
    """
    labels, heights, lower, upper, colours, measured = [], [], [], [], [], []
    for row in load.itertuples():
        labels.append(f"{row.service}\n{row.requests} req @ {row.concurrency}")
        is_measured = row.timings != NOT_MEASURED
        measured.append(is_measured)
        heights.append(row.mean_wall_s if is_measured else np.nan)
        lower.append(row.mean_wall_s - row.min_wall_s if is_measured else 0.0)
        upper.append(row.max_wall_s - row.mean_wall_s if is_measured else 0.0)
        colours.append(palette.run(row.service))
    count = len(labels) + (len(published) if published is not None else 0)
    figure = _new_figure(max(6.0, 1.0 + 1.2 * count), 4.8)
    ax = figure.add_subplot()
    positions = np.arange(len(labels))
    ax.bar(positions, heights, 0.6, yerr=[lower, upper], capsize=4, color=colours)
    services = list(load["service"])
    handles = []
    for position, is_measured, service, colour in zip(positions, measured, services, colours, strict=True):
        if is_measured:
            handles.append(Patch(facecolor=colour, label=service))
        else:
            _mark_not_measured(ax, position, service)
    if published is not None:
        start = len(labels)
        for offset, row in enumerate(published.sort_values("service").itertuples()):
            position = start + offset
            ax.bar(position, row.seconds_for_1000_requests_at_concurrency_10, 0.6, facecolor="white",
                   edgecolor=palette.published(row.service), hatch=PUBLISHED_HATCH, linestyle="--")
            labels.append(f"{row.service}\npublished\n2023\n1000 req @ 10")
            handles.append(Patch(facecolor="white", edgecolor=palette.published(row.service), hatch=PUBLISHED_HATCH,
                                 linestyle="--", label=published_name(row.service)))
    ax.set_xticks(range(len(labels)), labels, fontsize="small")
    ax.set_ylabel("load-test wall time (s)")
    ax.grid(axis="y", alpha=0.3)
    unique = {handle.get_label(): handle for handle in handles}
    _legend_below(ax, list(unique.values()), list(unique))
    return to_png(figure)


def case_classification(classes: Sequence[str], matrix: Sequence[Sequence[int]],
                        per_class_accuracy: Mapping[str, float], title: str) -> bytes:
    """Confusion matrix (rows true, columns predicted) beside per-class accuracy."""
    values = np.asarray(matrix, dtype=float)
    count = len(classes)
    side = min(9.0, 2.5 + 0.45 * count)
    figure = _new_figure(side + 5.0, max(3.6, side * 0.85))
    matrix_ax, bars_ax = figure.subplots(1, 2, width_ratios=[side, 5.0])

    matrix_ax.imshow(values, cmap="Blues", aspect="auto")
    if count <= MAX_ANNOTATED_CLASSES:
        threshold = values.max() / 2 if values.size else 0
        for (row, column), cell in np.ndenumerate(values):
            matrix_ax.text(column, row, f"{int(cell)}", ha="center", va="center", fontsize="small",
                           color="white" if cell > threshold else "black")
    if count <= MAX_CLASS_BARS:
        matrix_ax.set_xticks(range(count), classes, rotation=45, ha="right", fontsize="small")
        matrix_ax.set_yticks(range(count), classes, fontsize="small")
    matrix_ax.set_xlabel("predicted class")
    matrix_ax.set_ylabel("true class")
    matrix_ax.set_title("confusion matrix", fontsize="medium")

    ranked = sorted(per_class_accuracy.items(), key=lambda item: (item[1], item[0]))[:MAX_CLASS_BARS]
    names = [name for name, _accuracy in ranked]
    bars_ax.barh(range(len(ranked)), [accuracy for _name, accuracy in ranked], color="tab:blue")
    bars_ax.set_yticks(range(len(ranked)), names, fontsize="small")
    bars_ax.invert_yaxis()
    bars_ax.set_xlim(0, 1)
    bars_ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    shown = "" if len(per_class_accuracy) <= MAX_CLASS_BARS else f" ({MAX_CLASS_BARS} lowest)"
    bars_ax.set_title(f"per-class accuracy{shown}", fontsize="medium")
    bars_ax.grid(axis="x", alpha=0.3)
    figure.suptitle(title, fontsize="medium")
    return to_png(figure)


def errors_by_kind(case_errors: pd.DataFrame, load_errors: pd.DataFrame) -> bytes:
    """Stacked bars per service: failed cases by error kind, and failed load-test requests by kind.

    ``case_errors`` has service and kind, one row per failed case;
    ``load_errors`` has service, kind and count.
    """
    figure = _new_figure(11.0, 4.4)
    cases_ax, load_ax = figure.subplots(1, 2)
    _stacked(cases_ax, case_errors.assign(count=1), "failed cases")
    _stacked(load_ax, load_errors, "failed load-test requests")
    return to_png(figure)


def _stacked(ax, rows: pd.DataFrame, title: str) -> None:
    ax.set_title(f"{title} by error kind", fontsize="medium")
    if rows.empty:
        ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center", va="center", color="dimgrey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    table = rows.pivot_table(index="service", columns="kind", values="count", aggfunc="sum", fill_value=0)
    bottom = np.zeros(len(table))
    for index, kind in enumerate(table.columns):
        ax.bar(range(len(table)), table[kind].to_numpy(), 0.6, bottom=bottom, label=kind,
               color=colormaps["Set1"](index % 9))
        bottom += table[kind].to_numpy()
    ax.set_xticks(range(len(table)), list(table.index), fontsize="small")
    # At least three slots wide, so one service does not become one wall-to-wall bar.
    ax.set_xlim(-0.7, max(len(table), 3) - 0.3)
    ax.set_ylim(0, bottom.max() * 1.25)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("count")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", frameon=False, loc="upper right", title="error kind", title_fontsize="small")

"""The plain-text summary table printed at the end of a benchmark run."""

from __future__ import annotations

COLUMNS = ("provider", "mode", "dataset", "ablation", "status", "accuracy", "train s", "to endpoint s",
           "p50 ms", "p95 ms", "load s", "load errors")


def mode_label(record: dict) -> str:
    """Name where a record's figures come from, such as ``replay of emulator``.

    A replayed record names what its cassette was recorded against, so a
    replay of an emulator recording never reads as the real service's figures.
    """
    mode = record.get("mode") or "unknown"
    if mode == "replay":
        recorded_against = (record.get("cassette") or {}).get("recorded_against")
        return f"replay of {recorded_against}" if recorded_against else "replay"
    return mode


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_row(record: dict) -> tuple[str, ...]:
    seconds = record.get("seconds", {})
    latency = (record.get("test_latency") or {})
    load = record.get("load_test") or {}
    p50 = latency.get("p50_s")
    p95 = latency.get("p95_s")
    measured = record.get("timings_measured", True)

    def timing(value):
        return value if measured else None

    return (
        record["provider"], mode_label(record), record["dataset"], str(record["ablation"]), record["status"],
        _fmt((record.get("classification") or {}).get("accuracy")),
        _fmt(timing(seconds.get("training")), 1),
        _fmt(timing(seconds.get("upload_to_endpoint")), 1),
        _fmt(timing(p50 * 1000 if p50 is not None else None), 1),
        _fmt(timing(p95 * 1000 if p95 is not None else None), 1),
        _fmt(timing(load.get("wall_s")), 1),
        str(load.get("failed", "-")),
    )


def format_summary_table(records: list[dict]) -> str:
    """Render one line per case, ordered by provider, dataset and ablation."""
    ordered = sorted(records, key=lambda r: (r["provider"], r["dataset"], r["ablation"]))
    rows = [COLUMNS] + [summary_row(r) for r in ordered]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) if i >= 3 else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if any(not r.get("timings_measured", True) for r in ordered):
        lines.append("'-' in a time column of a replayed case: replay does not measure the service's timings.")
    problems = [r for r in ordered if r.get("error")]
    for record in problems:
        error = record["error"]
        lines.append(f"{record['case_id']}: {error['kind']}: {error['message'].splitlines()[0][:300]}")
    return "\n".join(lines)

"""Figures published with the May 2023 benchmark, packaged as reference data.

See README.md in this package for the source and the meaning of each column.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

RESULTS_FILE = "published-2023-results.csv"
THROUGHPUT_FILE = "published-2023-throughput.csv"
RESULTS_COLUMNS = ("dataset", "service", "ablation", "training_time_s", "accuracy", "median_latency_s")
THROUGHPUT_COLUMNS = ("service", "seconds_for_1000_requests_at_concurrency_10")
# The load test behind the throughput figures: 1000 requests, 10 at a time.
PUBLISHED_LOAD_REQUESTS = 1000
PUBLISHED_LOAD_CONCURRENCY = 10


def _read_csv(name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    with resources.files(__name__).joinpath(name).open("r", encoding="utf-8") as stream:
        frame = pd.read_csv(stream)
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"packaged reference file {name} lacks the columns {missing}; reinstall imgbench")
    return frame.loc[:, list(columns)]


def published_results() -> pd.DataFrame:
    """Load the published per-case figures: one row per (dataset, service, ablation)."""
    return _read_csv(RESULTS_FILE, RESULTS_COLUMNS)


def published_throughput() -> pd.DataFrame:
    """Load the published load-test times: one row per service."""
    return _read_csv(THROUGHPUT_FILE, THROUGHPUT_COLUMNS)

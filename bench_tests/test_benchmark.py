"""The benchmark matrix: one test per (provider, dataset, ablation) case.

Fixtures upload, train and deploy (see ``fixtures/cases.py``); this test
scores the endpoint on the full test set and runs the load test, writing both
into the case record.

Most failed requests are counted and the case goes on. A few errors end the
case at once, because every later request would fail the same way: a used-up
quota (HTTP 402) and a replayed request missing from the cassette. Requests
after such an error are not sent.
"""

from __future__ import annotations

import threading

from imgbench.evaluate import check_predictions_against_manifest, evaluate_test_set
from imgbench.loadgen import run_closed_loop
from imgbench.metrics import classification_summary, latency_summary

# Error kinds that end a case at the first occurrence.
FATAL_KINDS = ("quota", "cassette_miss", "network_blocked")


class FatalErrorLatch:
    """Remembers the first error that ends the case; later requests raise it without being sent."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def note(self, exc: Exception) -> None:
        if getattr(exc, "kind", None) in FATAL_KINDS:
            with self._lock:
                if self.error is None:
                    self.error = exc


def test_case(case, provider, endpoint, dataset_store, case_record, bench_config):
    dataset = dataset_store.get(case.dataset)
    latch = FatalErrorLatch()

    def invoke(session, image):
        latch.check()
        try:
            return provider.invoke(endpoint, image, session)
        except Exception as exc:
            latch.note(exc)
            raise

    rows = evaluate_test_set(invoke, dataset.test, root=dataset.root)
    check_predictions_against_manifest(rows, dataset.test, root=dataset.root)
    case_record["predictions"] = rows
    case_record["classification"] = classification_summary(
        [row["label"] for row in rows], [row["predicted"] for row in rows], dataset.classes)
    # A retried request has latency_s None (see imgbench.evaluate), so it is left out here.
    case_record["test_latency"] = latency_summary([row["latency_s"] for row in rows if row["latency_s"] is not None])
    latch.check()

    payloads = [record.read_bytes() for record in dataset.test]
    load = run_closed_loop(invoke, payloads, bench_config.load)
    case_record["load_test"] = load.as_dict()
    latch.check()

    failed = [row for row in rows if row["error"] is not None]
    assert not failed, f"{len(failed)} of {len(rows)} test-set requests failed; first: {failed[0]['error']}"

"""The benchmark matrix: one test per (provider, dataset, ablation) case.

Fixtures upload, train and deploy (see ``fixtures/cases.py``); this test
scores the endpoint on the full test set and runs the load test, writing both
into the case record.
"""

from __future__ import annotations

from imgbench.loadgen import run_closed_loop
from imgbench.metrics import classification_summary, latency_summary
from imgbench.evaluate import evaluate_test_set


def test_case(case, provider, endpoint, dataset_store, case_record, bench_config):
    dataset = dataset_store.get(case.dataset)

    def invoke(session, image):
        return provider.invoke(endpoint, image, session)

    rows = evaluate_test_set(invoke, dataset.test, root=dataset.root)
    case_record["predictions"] = rows
    case_record["classification"] = classification_summary(
        [row["label"] for row in rows], [row["predicted"] for row in rows], dataset.classes)
    case_record["test_latency"] = latency_summary([row["latency_s"] for row in rows if row["error"] is None])

    payloads = [record.read_bytes() for record in dataset.test]
    load = run_closed_loop(invoke, payloads, bench_config.load)
    case_record["load_test"] = load.as_dict()

    failed = [row for row in rows if row["error"] is not None]
    assert not failed, f"{len(failed)} of {len(rows)} test-set requests failed; first: {failed[0]['error']}"

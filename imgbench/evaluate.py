"""Scoring a deployed endpoint on the full test set, one request per image."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from imgbench.datasets import ImageRecord
from imgbench.errors import DatasetError
from imgbench.loadgen import request_error_kind
from imgbench.retry import retries_in_thread

logger = logging.getLogger(__name__)

InvokeFn = Callable[[requests.Session, bytes], object]


def evaluate_test_set(invoke: InvokeFn, test_set: Sequence[ImageRecord], root: Path | None = None) -> list[dict]:
    """Invoke the endpoint once per test image, in test-set order, on one session.

    Each row contains the image's path (relative to ``root`` when given), hash,
    true label, predicted label and confidence, and the request's latency in
    seconds until the response body was read. A failed request gives a row
    with ``predicted`` None and the error's kind and message. A request whose
    invoke retried (see ``imgbench.retry``) has ``latency_s`` None, so no
    statistic includes it, and its time in ``latency_with_retries_s`` with
    the number of retries in ``retries``.
    """
    rows = []
    with requests.Session() as session:
        for record in test_set:
            data = record.read_bytes()
            path = record.path.relative_to(root) if root and record.path.is_relative_to(root) else record.path
            row = {"path": str(path), "sha256": record.sha256, "label": record.label,
                   "predicted": None, "confidence": None, "latency_s": None, "error": None}
            retries_before = retries_in_thread()
            started = time.perf_counter()
            try:
                prediction = invoke(session, data)
            except Exception as exc:  # recorded per image; the evaluation goes on
                row["error"] = {"kind": request_error_kind(exc), "message": str(exc)[:500]}
                logger.warning("request for test image %s failed: %s", path, exc)
            else:
                elapsed = time.perf_counter() - started
                retries = retries_in_thread() - retries_before
                if retries:
                    row["retries"] = retries
                    row["latency_with_retries_s"] = elapsed
                else:
                    row["latency_s"] = elapsed
                row["predicted"] = prediction.label
                row["confidence"] = prediction.confidence
            rows.append(row)
    return rows


def check_predictions_against_manifest(rows: Sequence[dict], test_set: Sequence[ImageRecord],
                                       root: Path | None = None) -> None:
    """Raise ``DatasetError`` unless ``rows`` match the test set one to one, in order.

    Each row must carry the path, content hash and label of the test image at
    the same position, so a record can never score one image's prediction
    against another image's label.
    """
    if len(rows) != len(test_set):
        raise DatasetError(f"{len(rows)} prediction rows for {len(test_set)} test images; "
                           "every test image needs exactly one row")
    for position, (row, record) in enumerate(zip(rows, test_set, strict=True)):
        path = str(record.path.relative_to(root)) if root and record.path.is_relative_to(root) else str(record.path)
        wrong = [name for name, value in (("path", path), ("sha256", record.sha256), ("label", record.label))
                 if row.get(name) != value]
        if wrong:
            raise DatasetError(f"prediction row {position} does not match test image {path}: "
                               f"{', '.join(wrong)} differ; the rows must follow test-set order")

"""Classification metrics and latency summaries computed from per-image rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LATENCY_PERCENTILES = (50, 90, 95, 99)


def confusion_matrix(truth: Sequence[str], predicted: Sequence[str | None], classes: Sequence[str]) -> list[list[int]]:
    """Rows are true classes, columns predicted classes, in ``classes`` order.

    A prediction outside ``classes`` (or ``None`` for a failed request) counts
    as wrong but lands in no column.
    """
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true_label, predicted_label in zip(truth, predicted, strict=True):
        if true_label not in index:
            raise ValueError(f"true label {true_label!r} is not one of the classes {list(classes)}")
        if predicted_label in index:
            matrix[index[true_label], index[predicted_label]] += 1
    return matrix.tolist()


def classification_summary(truth: Sequence[str], predicted: Sequence[str | None],
                           classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class accuracy and confusion matrix."""
    if not truth:
        raise ValueError("no predictions to score: the test set is empty")
    matrix = np.asarray(confusion_matrix(truth, predicted, classes))
    correct = sum(1 for t, p in zip(truth, predicted, strict=True) if t == p)
    support = np.array([sum(1 for t in truth if t == name) for name in classes])
    true_positive = np.diag(matrix)
    predicted_count = matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted_count > 0, true_positive / predicted_count, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "accuracy": correct / len(truth),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {name: float(recall[i]) for i, name in enumerate(classes) if present[i]},
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
        "test_images": len(truth),
        "failed_predictions": sum(1 for p in predicted if p is None),
    }


def latency_summary(latencies_s: Sequence[float]) -> dict:
    """Percentiles, mean and extremes of latencies in seconds."""
    if not latencies_s:
        return {"count": 0}
    values = np.asarray(latencies_s, dtype=np.float64)
    summary = {"count": int(values.size), "mean_s": float(values.mean()),
               "min_s": float(values.min()), "max_s": float(values.max())}
    for q in LATENCY_PERCENTILES:
        summary[f"p{q}_s"] = float(np.percentile(values, q))
    return summary

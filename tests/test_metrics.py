"""Tests of imgbench.metrics against hand-computed values, scikit-learn and numpy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from imgbench.metrics import LATENCY_PERCENTILES, classification_summary, confusion_matrix, latency_summary

CLASSES = ["cat", "dog", "fox"]
# Six test images, one of them a failed request (None). Three predictions are correct.
TRUTH = ["cat", "cat", "cat", "dog", "dog", "fox"]
PREDICTED = ["cat", "dog", None, "dog", "cat", "fox"]

# Label that stands for a failed request when comparing with scikit-learn,
# which needs a string in every position. It is outside the classes, so it is
# always wrong and lands in no confusion-matrix column.
NONE_LABEL = "__none__"


@pytest.fixture
def random_predictions() -> tuple[list[str], list[str | None], list[str]]:
    """Return 300 seeded predictions over 4 classes: about 60% correct, 5% failed, the rest wrong."""
    rng = np.random.default_rng(2023)
    classes = ["angular_leaf_spot", "bean_rust", "healthy", "mosaic"]
    truth = [classes[i] for i in rng.integers(0, len(classes), size=300)]
    predicted: list[str | None] = []
    for true_label in truth:
        draw = rng.random()
        if draw < 0.05:
            predicted.append(None)
        elif draw < 0.65:
            predicted.append(true_label)
        else:
            predicted.append(classes[rng.integers(0, len(classes))])
    return truth, predicted, classes


def to_sklearn(predicted: list[str | None]) -> list[str]:
    return [NONE_LABEL if label is None else label for label in predicted]


def test_hand_computed_accuracy() -> None:
    summary = classification_summary(TRUTH, PREDICTED, CLASSES)

    assert summary["accuracy"] == pytest.approx(3 / 6)


def test_hand_computed_confusion_matrix() -> None:
    summary = classification_summary(TRUTH, PREDICTED, CLASSES)

    # The failed request for the third cat is in no column, so the cat row sums to 2.
    assert summary["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_hand_computed_macro_f1() -> None:
    # Precision cat 1/2, dog 1/2, fox 1. Recall cat 1/3, dog 1/2, fox 1.
    # F1 cat 0.4, dog 0.5, fox 1.0.
    summary = classification_summary(TRUTH, PREDICTED, CLASSES)

    assert summary["macro_f1"] == pytest.approx((0.4 + 0.5 + 1.0) / 3)


def test_hand_computed_per_class_accuracy() -> None:
    summary = classification_summary(TRUTH, PREDICTED, CLASSES)

    assert summary["per_class_accuracy"] == pytest.approx({"cat": 1 / 3, "dog": 0.5, "fox": 1.0})


def test_summary_counts_and_classes() -> None:
    summary = classification_summary(TRUTH, PREDICTED, CLASSES)

    assert summary["test_images"] == 6
    assert summary["failed_predictions"] == 1
    assert summary["classes"] == CLASSES


def test_unknown_prediction_counts_wrong() -> None:
    summary = classification_summary(["cat", "dog"], ["cat", "wolf"], CLASSES)

    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["failed_predictions"] == 0
    assert summary["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_class_without_test_images_left_out() -> None:
    # "owl" has no test images, so it has no per-class accuracy and does not
    # lower the macro F1.
    summary = classification_summary(TRUTH, PREDICTED, CLASSES + ["owl"])

    assert "owl" not in summary["per_class_accuracy"]
    assert summary["macro_f1"] == pytest.approx((0.4 + 0.5 + 1.0) / 3)
    assert summary["confusion_matrix"][3] == [0, 0, 0, 0]


def test_all_failed_predictions() -> None:
    summary = classification_summary(["cat", "dog"], [None, None], CLASSES)

    assert summary["accuracy"] == 0.0
    assert summary["macro_f1"] == 0.0
    assert summary["failed_predictions"] == 2


def test_accuracy_matches_sklearn(random_predictions) -> None:
    truth, predicted, classes = random_predictions

    summary = classification_summary(truth, predicted, classes)

    assert summary["accuracy"] == pytest.approx(sk_metrics.accuracy_score(truth, to_sklearn(predicted)))


def test_macro_f1_matches_sklearn(random_predictions) -> None:
    truth, predicted, classes = random_predictions

    summary = classification_summary(truth, predicted, classes)
    expected = sk_metrics.f1_score(truth, to_sklearn(predicted), labels=classes, average="macro",
                                   zero_division=0)

    assert summary["macro_f1"] == pytest.approx(expected)


def test_confusion_matrix_matches_sklearn(random_predictions) -> None:
    truth, predicted, classes = random_predictions

    summary = classification_summary(truth, predicted, classes)
    expected = sk_metrics.confusion_matrix(truth, to_sklearn(predicted), labels=classes)

    assert summary["confusion_matrix"] == expected.tolist()


def test_per_class_accuracy_matches_recall(random_predictions) -> None:
    truth, predicted, classes = random_predictions

    summary = classification_summary(truth, predicted, classes)
    recall = sk_metrics.recall_score(truth, to_sklearn(predicted), labels=classes, average=None,
                                     zero_division=0)

    assert summary["per_class_accuracy"] == pytest.approx(dict(zip(classes, recall, strict=True)))


def test_random_set_has_failures(random_predictions) -> None:
    # The scikit-learn comparisons cover failed requests only if the fixture contains some.
    truth, predicted, classes = random_predictions

    assert classification_summary(truth, predicted, classes)["failed_predictions"] > 0


def test_confusion_matrix_function() -> None:
    assert confusion_matrix(TRUTH, PREDICTED, CLASSES) == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_empty_truth_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        classification_summary([], [], CLASSES)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        classification_summary(["cat", "dog"], ["cat"], CLASSES)


def test_latency_percentiles_match_numpy() -> None:
    latencies = np.random.default_rng(11).lognormal(mean=-3.0, sigma=0.6, size=1001).tolist()

    summary = latency_summary(latencies)

    for q in LATENCY_PERCENTILES:
        assert summary[f"p{q}_s"] == pytest.approx(np.percentile(latencies, q)), q
    assert summary["count"] == 1001
    assert summary["mean_s"] == pytest.approx(np.mean(latencies))
    assert summary["min_s"] == min(latencies)
    assert summary["max_s"] == max(latencies)


def test_latency_hand_computed() -> None:
    summary = latency_summary([0.4, 0.1, 0.3, 0.2])

    # Linear interpolation between the 2nd and 3rd of 4 sorted values.
    assert summary["p50_s"] == pytest.approx(0.25)
    assert summary["p90_s"] == pytest.approx(0.37)
    assert summary["mean_s"] == pytest.approx(0.25)


def test_latency_single_value() -> None:
    summary = latency_summary([0.05])

    assert summary["p99_s"] == pytest.approx(0.05)
    assert summary["count"] == 1


def test_latency_empty() -> None:
    assert latency_summary([]) == {"count": 0}

"""Tests for pkdpipe.metrics: hand-computed values, edge cases, and the task-level helpers."""

import math

import numpy as np
import pytest

from pkdpipe.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews,
    pearson,
    predictions_from_logits,
    spearman,
)
from pkdpipe.tasks import get_task

# predictions / gold with tp=2, tn=1, fp=1, fn=1
PRED = np.array([1, 1, 0, 0, 1])
GOLD = np.array([1, 0, 0, 1, 1])


def test_accuracy_hand_value():
    assert accuracy(PRED, GOLD) == pytest.approx(3 / 5)


def test_f1_hand_value():
    # precision 2/3, recall 2/3
    assert f1(PRED, GOLD) == pytest.approx(2 / 3)


def test_f1_is_zero_without_positives():
    zeros = np.zeros(4, dtype=int)
    assert f1(zeros, zeros) == 0.0


def test_f1_uses_label_one_as_positive():
    # swapping the classes changes F1: only label index 1 counts as positive
    assert f1(1 - PRED, 1 - GOLD) == pytest.approx(1 / 2)


def test_matthews_hand_value():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2)
    assert matthews(PRED, GOLD) == pytest.approx(1 / 6)


def test_matthews_perfect_and_inverted():
    gold = np.array([0, 1, 1, 0, 1])
    assert matthews(gold, gold) == pytest.approx(1.0)
    assert matthews(1 - gold, gold) == pytest.approx(-1.0)


def test_matthews_constant_predictions_is_zero_not_nan():
    gold = np.array([0, 1, 1, 0])
    for constant in (0, 1):
        value = matthews(np.full(4, constant), gold)
        assert value == 0.0 and not math.isnan(value)
    assert matthews(gold, np.ones(4, dtype=int)) == 0.0


def test_matthews_multiclass_matches_covariance_definition():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, size=50)
    pred = np.where(rng.random(50) < 0.6, gold, rng.integers(0, 3, size=50))
    gold_onehot, pred_onehot = np.eye(3)[gold], np.eye(3)[pred]

    def covariance(a, b):
        return np.sum((a - a.mean(axis=0)) * (b - b.mean(axis=0)))

    expected = covariance(pred_onehot, gold_onehot) / np.sqrt(
        covariance(pred_onehot, pred_onehot) * covariance(gold_onehot, gold_onehot)
    )
    assert matthews(pred, gold) == pytest.approx(expected)


def test_pearson_hand_value():
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(
        3 / math.sqrt(84 / 9)
    )


def test_spearman_with_ties_hand_value():
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    value = spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0, 40.0]))
    assert value == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def reference_ranks(values):
    """Average ranks the slow, obvious way: 1 + (number smaller) + (number of other equal ones) / 2."""
    return np.array([1 + np.sum(values < v) + (np.sum(values == v) - 1) / 2 for v in values])


def test_correlations_match_plain_references():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman(x, y) == pytest.approx(np.corrcoef(reference_ranks(x), reference_ranks(y))[0, 1])


def test_correlations_of_constant_input_are_zero():
    constant, varying = np.full(5, 2.0), np.arange(5.0)
    assert pearson(constant, varying) == 0.0
    assert spearman(varying, constant) == 0.0


def test_compute_metrics_returns_the_task_metrics_in_order():
    scores = compute_metrics(get_task("mrpc"), PRED, GOLD)
    assert list(scores) == ["f1", "accuracy"]
    assert scores == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    assert all(isinstance(value, float) for value in scores.values())


def test_compute_metrics_for_cola_and_stsb():
    assert compute_metrics(get_task("cola"), PRED, GOLD) == pytest.approx({"matthews": 1 / 6})
    scores = compute_metrics(get_task("stsb"), np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert list(scores) == ["pearson", "spearman"]
    assert scores["spearman"] == pytest.approx(1.0)


def test_compute_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        compute_metrics(get_task("sst2"), np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(get_task("sst2"), np.array([]), np.array([]))


def test_predictions_from_logits_argmax_and_regression():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    np.testing.assert_array_equal(predictions_from_logits(get_task("mnli"), logits), [1, 0])
    np.testing.assert_allclose(
        predictions_from_logits(get_task("stsb"), np.array([[0.5], [4.2]])), [0.5, 4.2]
    )


def test_predictions_from_logits_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        predictions_from_logits(get_task("sst2"), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="regression"):
        predictions_from_logits(get_task("stsb"), np.zeros((4, 2)))

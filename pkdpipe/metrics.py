"""Evaluation metrics for classification and regression tasks, in plain numpy.

Every metric takes two 1-D arrays of the same length (predictions, gold labels) and returns a
Python float. Accuracy and F1 are fractions in [0, 1], not percentages.

One unit rule: the numbers a program reads (metrics.json, eval_results.json, the card's model-index,
train_log.jsonl) hold fractions, as computed here; everything a person reads (summaries, warnings,
`cache info`, tables, reports, the card's tables) shows percent with two decimals, through
`percent` and `format_metrics`, so 0.5183 is printed as 51.83 everywhere. Where a metric is undefined
(Matthews or a correlation with a constant input, F1 with no positive in either array) it is 0.0,
never NaN, so that picking the best checkpoint by comparing scores always works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class Task(Protocol):
    """What scoring needs of a task (pkdpipe.tasks.Task has it): metrics needs no import of tasks."""

    name: str
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool: ...

    @property
    def num_labels(self) -> int: ...

    @property
    def main_metric(self) -> str: ...


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predicted label indices equal to the gold ones."""
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 with label index 1 as the positive class; 0.0 when neither array has a positive."""
    predicted_pos = predictions == 1
    gold_pos = labels == 1
    true_pos = np.sum(predicted_pos & gold_pos)
    denominator = np.sum(predicted_pos) + np.sum(gold_pos)  # = 2*tp + fp + fn
    if denominator == 0:
        return 0.0
    return float(2 * true_pos / denominator)


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004); 0.0 when undefined.

    Undefined means every prediction (or every gold label) is the same class.
    """
    num_classes = int(max(predictions.max(), labels.max())) + 1
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1.0)
    gold_totals = confusion.sum(axis=1)
    predicted_totals = confusion.sum(axis=0)
    n = confusion.sum()
    correct = np.trace(confusion)
    covariance = correct * n - gold_totals @ predicted_totals
    predicted_spread = n * n - predicted_totals @ predicted_totals
    gold_spread = n * n - gold_totals @ gold_totals
    if predicted_spread == 0 or gold_spread == 0:
        return 0.0
    return float(covariance / np.sqrt(predicted_spread * gold_spread))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either array is constant."""
    x = predictions.astype(np.float64) - predictions.mean()
    y = labels.astype(np.float64) - labels.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    if denominator == 0:
        return 0.0
    return float(np.clip(np.sum(x * y) / denominator, -1.0, 1.0))


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank); 0.0 when either array is constant."""
    return pearson(_average_ranks(predictions), _average_ranks(labels))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (scipy's 'average')."""
    order = np.argsort(values, kind="stable")
    _, first_positions, counts = np.unique(values[order], return_index=True, return_counts=True)
    tied_rank = first_positions + (counts - 1) / 2.0 + 1.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(tied_rank, counts)
    return ranks


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
"""Every metric a task may name, by name."""

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
"""Metrics over label indices; `f1` needs exactly two labels."""

REGRESSION_METRICS = ("pearson", "spearman")
"""Metrics over real-valued predictions."""


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions against gold labels with every metric in `task.metrics`, in that order.

    predictions: (n,) predicted label indices, or (n,) floats for a regression task.
    labels:      (n,) gold label indices, or (n,) floats for a regression task.
    Returns {metric name: value}, accuracy and F1 as fractions in [0, 1].
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must be 1-D arrays of the same length"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if not task.is_regression:
        predictions = predictions.astype(np.int64)
        labels = labels.astype(np.int64)
    return {name: METRICS[name](predictions, labels) for name in task.metrics}


def predictions_from_logits(task: Task, logits: np.ndarray) -> np.ndarray:
    """Turn model outputs into predictions.

    logits: (n, num_labels) scores, or (n, 1) or (n,) values for a regression task.
    Returns (n,) int64 label indices (argmax), or (n,) floats for a regression task.
    """
    logits = np.asarray(logits)
    if task.is_regression:
        if logits.ndim == 2 and logits.shape[1] == 1:
            return logits[:, 0]
        if logits.ndim == 1:
            return logits
        raise ValueError(f"regression logits must have shape (n,) or (n, 1), got {logits.shape}")
    if logits.ndim != 2 or logits.shape[1] != task.num_labels:
        raise ValueError(
            f"logits must have shape (n, {task.num_labels}) for task {task.name}, got {logits.shape}"
        )
    return np.argmax(logits, axis=1).astype(np.int64)


def majority_baseline(task: Task, labels: np.ndarray | None) -> dict[str, float]:
    """The metrics of always answering the most frequent label ({} for regression or no labels)."""
    if task.is_regression or labels is None or not len(labels):
        return {}
    majority = int(np.bincount(np.asarray(labels, dtype=np.int64), minlength=task.num_labels).argmax())
    return compute_metrics(task, np.full(len(labels), majority), labels)


def learned_nothing(task: Task, metrics: dict[str, float], baseline: dict[str, float]) -> bool:
    """True when the main metric is no better than always answering the majority class."""
    main = task.main_metric
    return bool(baseline and metrics) and metrics[main] <= baseline[main] + 1e-9


METRIC_SCALE = "fraction"
"""metrics.json says so in its `metric_scale` field: its accuracy 0.5183 is printed as 51.83."""


def percent(value: float) -> str:
    """A metric as a person reads it: 0.5183 -> '51.83' (see the module's unit rule)."""
    return f"{100 * value:.2f}"


def format_metrics(metrics: dict[str, float]) -> str:
    """'accuracy 51.83, f1 47.10' ('-' when empty): metrics in percent for summaries and warnings."""
    return ", ".join(f"{name} {percent(value)}" for name, value in metrics.items()) if metrics else "-"


def majority_warning(task: Task, metrics: dict[str, float], baseline: dict[str, float], where: str) -> str:
    """The one line that says a model learned nothing (`where`: e.g. "best dev", "test")."""
    main = task.main_metric
    return (
        f"the {where} {main} ({percent(metrics[main])}) is no better than always answering the "
        f"majority class ({percent(baseline[main])}): the model learned nothing"
    )

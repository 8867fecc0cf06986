"""Inference for evaluation and prediction: logits in example order, metrics, size and speed.

`evaluate` is the paper's comparison in one call: for a teacher and its students on one split it
reports the task's metrics, parameter counts, examples per second and the speed-up over the first
model. Batches are length-sorted for speed; results come back in the split's own order.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pkdpipe import cards, progress
from pkdpipe.config import EvaluateConfig
from pkdpipe.data import load_split
from pkdpipe.errors import DataError
from pkdpipe.metrics import compute_metrics, predictions_from_logits
from pkdpipe.models import (
    autocast,
    check_max_seq_len,
    count_parameters,
    load_classifier,
    load_tokenizer,
    pick_device,
)
from pkdpipe.tasks import Task, get_task
from pkdpipe.text import Encoded, collate, encode, length_sorted_order, pad_id_of


def predict_logits(
    model,
    encoded: Encoded,
    *,
    pad_id: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    precision: str = "fp32",
    quiet: bool = True,
    description: str = "predict",
) -> np.ndarray:
    """(n, num_labels) float32 logits for every example of `encoded`, in its order."""
    device = device or next(model.parameters()).device
    order = length_sorted_order(encoded.lengths(), encoded.ids)
    logits = None
    was_training = model.training
    model.eval()
    with progress.bar(description, len(order), quiet=quiet) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            types = [encoded.token_type_ids[i] for i in rows] if encoded.token_type_ids is not None else None
            batch = collate([encoded.input_ids[i] for i in rows], types, pad_id)
            with torch.inference_mode(), autocast(device, precision):
                out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
            if logits is None:
                logits = np.empty((len(order), out.shape[1]), dtype=np.float32)
            logits[rows] = out
            bar.advance(len(rows))
    model.train(was_training)
    return logits if logits is not None else np.zeros((0, 0), dtype=np.float32)


def score(task: Task, logits: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    if labels is None:
        raise DataError(f"the {task.name} split has no labels to score against")
    return compute_metrics(task, predictions_from_logits(task, logits), labels)


@dataclass
class ModelReport:
    model: str
    metrics: dict[str, float]
    parameters: int
    examples_per_s: float
    speedup: float  # against the first model evaluated


def evaluate(config: EvaluateConfig) -> list[ModelReport]:
    """Metrics, parameters and throughput of each model on one split (tokenised once per tokenizer)."""
    task = get_task(config.task)
    examples = load_split(task, config.split, config.data_dir)
    device = pick_device(config.device)
    torch.set_grad_enabled(False)
    reports: list[ModelReport] = []
    try:
        for name in config.models:
            model = load_classifier(name, config.trust_remote_code).to(device).eval()
            check_max_seq_len(model.config, config.max_seq_len, name)
            tokenizer = load_tokenizer(name, config.trust_remote_code)
            encoded = encode(examples, tokenizer, config.max_seq_len)
            start = time.perf_counter()
            logits = predict_logits(
                model,
                encoded,
                pad_id=pad_id_of(tokenizer),
                batch_size=config.batch_size,
                device=device,
                precision=config.precision,
                quiet=config.quiet,
                description=Path(name).name or name,
            )
            seconds = time.perf_counter() - start
            rate = len(encoded) / seconds
            metrics = score(task, logits, encoded.labels)
            if config.record and (Path(name) / "metrics.json").is_file():
                cards.record_results(Path(name), config.split, metrics, task)
            reports.append(
                ModelReport(
                    model=str(name),
                    metrics=metrics,
                    parameters=count_parameters(model),
                    examples_per_s=rate,
                    speedup=rate / reports[0].examples_per_s if reports else 1.0,
                )
            )
    finally:
        torch.set_grad_enabled(True)
    return reports


def predict(model_dir: str, task_name: str, split: str, output: str | Path, data_dir=None, **kwargs) -> Path:
    """Write a GLUE-style submission: a TSV of `index` and the predicted label name (or score)."""
    task = get_task(task_name)
    examples = load_split(task, split, data_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir).to(pick_device(kwargs.get("device", "auto")))
    check_max_seq_len(model.config, kwargs.get("max_seq_len", 128), model_dir)
    encoded = encode(examples, tokenizer, kwargs.get("max_seq_len", 128))
    logits = predict_logits(
        model,
        encoded,
        pad_id=pad_id_of(tokenizer),
        batch_size=kwargs.get("batch_size", 64),
        quiet=kwargs.get("quiet", False),
    )
    preds = predictions_from_logits(task, logits)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "prediction"])
        for example_id, p in zip(encoded.ids, preds):
            writer.writerow([int(example_id), f"{p:.3f}" if task.is_regression else task.labels[int(p)]])
    tmp.replace(output)
    return output

"""Inference for evaluation and prediction: logits in example order, metrics, size and speed.

`evaluate` is the paper's comparison in one call: for a teacher and its students on one split it
reports the task's metrics, parameter counts, examples per second and the speed-up over the first
model, timed in interleaved rounds. Batches are length-sorted for speed; results come back in the
split's own order.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pkdpipe import cards, files, progress, runfolder
from pkdpipe.config import EvaluateConfig
from pkdpipe.data import load_split
from pkdpipe.errors import DataError, ModelError
from pkdpipe.metrics import (
    compute_metrics,
    learned_nothing,
    majority_baseline,
    majority_warning,
    predictions_from_logits,
)
from pkdpipe.models import (
    autocast,
    check_max_seq_len,
    count_parameters,
    load_classifier,
    load_tokenizer,
    pick_device,
    use_threads,
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
    examples_per_s: float  # median over the timing rounds (NaN when not timed)
    speedup: float  # against the first model: the median of the per-round ratios, not a ratio of
    # the examples_per_s column (the rounds' medians may come from different rounds)
    speedup_range: tuple[float, float] = (1.0, 1.0)  # lowest and highest per-round ratio
    warnings: list[str] = field(default_factory=list)  # e.g. no better than the majority class
    majority: dict[str, float] = field(default_factory=dict)  # the split's score of always answering
    # its majority class, the floor the warnings compare against (empty for an unlabelled split)


def evaluate(config: EvaluateConfig) -> list[ModelReport]:
    """Metrics, parameters and throughput of each model on one split.

    Every model is scored on the whole split, then timed on the same sample of it
    (`config.timing_rows` examples) in `config.timing_rounds` rounds, the models in a rotating order
    each round, so the load of a shared machine falls on all of them alike; speed is the median.
    Timing holds every model in memory at once; `timing_rounds=0` skips it (speed is then NaN)."""
    use_threads(config.threads)
    task = get_task(config.task)
    examples = load_split(task, config.split, config.data_dir)
    device = pick_device(config.device)
    torch.set_grad_enabled(False)
    scored, timed = [], []
    sample = np.sort(np.random.default_rng(0).permutation(len(examples))[: config.timing_rows])
    baseline = majority_baseline(task, examples.labels)
    try:
        for name in config.models:
            model = load_classifier(name, config.trust_remote_code).to(device).eval()
            length = config.max_seq_len or trained_length(name)
            check_max_seq_len(model.config, length, name)
            tokenizer = load_tokenizer(name, config.trust_remote_code)
            encoded = encode(examples, tokenizer, length)
            run = partial(
                predict_logits,
                model,
                pad_id=pad_id_of(tokenizer),
                batch_size=config.batch_size,
                device=device,
                precision=config.precision,
                description=Path(name).name or name,
            )
            order = task_columns(model, task, name)
            metrics = score(task, run(encoded, quiet=config.quiet)[:, order], encoded.labels)
            recorded = runfolder.read(name) if config.record else None
            if recorded is not None and recorded.finished:
                cards.record_results(recorded, config.split, metrics, task)
            scored.append((name, metrics, count_parameters(model)))
            if config.timing_rounds:  # keeps the model (not the whole split) for the rounds
                timed.append(partial(run, subset(encoded, sample), quiet=True))
        if timed:
            progress.info(
                f"timing {len(timed)} models on {len(sample)} examples, {config.timing_rounds} rounds",
                config.quiet,
            )
        seconds = time_in_rounds(timed, config.timing_rounds, partial(_say_round, quiet=config.quiet))
    finally:
        torch.set_grad_enabled(True)
    reports = []
    for i, (name, metrics, parameters) in enumerate(scored):
        if timed:
            ratios = [base / mine for base, mine in zip(seconds[0], seconds[i], strict=True)]
            speed = len(sample) / float(np.median(seconds[i]))
            speedup, spread = float(np.median(ratios)), (min(ratios), max(ratios))
        else:
            speed = speedup = math.nan
            spread = (math.nan, math.nan)
        warnings = (
            [majority_warning(task, metrics, baseline, config.split)]
            if learned_nothing(task, metrics, baseline)
            else []
        )
        reports.append(
            ModelReport(str(name), metrics, parameters, speed, speedup, spread, warnings, baseline)
        )
    return reports


DEFAULT_MAX_SEQ_LEN = 128
"""The length a model is scored at when it records none (not a pkdpipe model): finetune's default."""


def trained_length(model_dir: str | Path) -> int:
    """The --max-seq-len a pkdpipe model was trained at, from its recorded settings (distill: the
    cache's length; finetune: its own), so that evaluate scores it as training's dev did; the
    default for a model that records none."""
    return runfolder.read(model_dir).max_seq_len or DEFAULT_MAX_SEQ_LEN


def task_columns(model, task, name: str) -> np.ndarray:
    """The model's output columns in the task's label order, matched by label name: a model whose
    labels are the task's in another order is scored by name, not by position. Models with unnamed
    labels (LABEL_0, LABEL_1, ...) are taken in order; other names must be the task's."""
    width = model.config.num_labels
    if task.is_regression or task.labels is None:
        return np.arange(width)
    names = [str(model.config.id2label.get(i, f"LABEL_{i}")) for i in range(width)]
    if width != len(task.labels):
        raise ModelError(f"{name} has {width} outputs, task {task.name} has {len(task.labels)} labels")
    if names == [f"LABEL_{i}" for i in range(width)]:
        return np.arange(width)
    if sorted(names) != sorted(task.labels):
        other = sorted(set(names) - set(task.labels))
        raise ModelError(
            f"{name} predicts other labels than task {task.name} has ({', '.join(other[:3])} ...): "
            "it was trained for another task"
        )
    return np.array([names.index(label) for label in task.labels])


def subset(encoded: Encoded, rows: np.ndarray) -> Encoded:
    """The examples at positions `rows` (unlabelled: for timing)."""
    types = [encoded.token_type_ids[i] for i in rows] if encoded.token_type_ids is not None else None
    return Encoded(encoded.ids[rows], [encoded.input_ids[i] for i in rows], types, None)


def time_in_rounds(runs: list, rounds: int, on_round=None) -> list[list[float]]:
    """Seconds of each run in each round. Round r starts with run r (mod the count) and goes on in
    order, so warm-up and a shared machine's changing load fall on every run alike.
    `on_round(r, rounds, seconds)` is called after each round (evaluate's progress line)."""
    seconds: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        for i in [(r + j) % len(runs) for j in range(len(runs))]:
            start = time.perf_counter()
            runs[i]()
            seconds[i].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(r + 1, rounds, [s[-1] for s in seconds])
    return seconds


def _say_round(done: int, rounds: int, seconds: list[float], quiet: bool) -> None:
    """A line per timing round: on a loaded machine the rounds take minutes, which must not look
    like a hang."""
    each = ", ".join(f"{s:.1f} s" for s in seconds)
    progress.info(f"timing: round {done}/{rounds} done ({each}, in the models' order)", quiet)


def predict(model_dir: str, task_name: str, split: str, output: str | Path, data_dir=None, **kwargs) -> Path:
    """Write a GLUE-style submission: a TSV of `index` and the predicted label name (or score)."""
    task = get_task(task_name)
    examples = load_split(task, split, data_dir)
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir).to(pick_device(kwargs.get("device", "auto")))
    length = kwargs.get("max_seq_len") or trained_length(model_dir)
    check_max_seq_len(model.config, length, model_dir)
    encoded = encode(examples, tokenizer, length)
    logits = predict_logits(
        model,
        encoded,
        pad_id=pad_id_of(tokenizer),
        batch_size=kwargs.get("batch_size", 64),
        quiet=kwargs.get("quiet", False),
    )
    preds = predictions_from_logits(task, logits[:, task_columns(model, task, model_dir)])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with files.replace_file(output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "prediction"])
        for example_id, p in zip(encoded.ids, preds):
            writer.writerow([int(example_id), f"{p:.3f}" if task.is_regression else task.labels[int(p)]])
    return output

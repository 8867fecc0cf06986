"""Stage two: `distill` (a student from the cache alone) and `finetune` (teacher or baseline).

Both run through one loop, `fit`, which takes a batch source and a loss step; there is no trainer
class tree. `distill` never loads the teacher: its targets stream from the cache's shards.
Only rank 0 writes (logs, checkpoints, the model); under torchrun each rank reads its own share
of every global batch, DistributedDataParallel averages the gradients, and the logged loss terms
are averaged over the ranks, so a log line describes the whole global batch.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pkdpipe import checkpoint, distributed, progress
from pkdpipe.batching import plan_epoch, rank_rows
from pkdpipe.cache.fingerprint import hash_tokenizer
from pkdpipe.cache.reader import TeacherCache, open_cache
from pkdpipe.config import DistillConfig, FinetuneConfig, TrainConfig, to_dict
from pkdpipe.data import load_split
from pkdpipe.errors import CacheError, ConfigError, ModelError
from pkdpipe.evaluate import predict_logits, score
from pkdpipe.layermap import layer_map
from pkdpipe.losses import pkd_loss
from pkdpipe.models import (
    FINETUNE_RECORD,
    autocast,
    cls_vectors,
    count_parameters,
    hidden_size,
    label_config,
    load_classifier,
    load_config,
    load_tokenizer,
    num_layers,
    pick_device,
    quiet_transformers,
)
from pkdpipe.tasks import Task, get_task
from pkdpipe.text import Encoded, collate, encode, pad_id_of

LOG_EVERY = 10  # optimizer steps between training-log lines


# -- batch sources -------------------------------------------------------------------------------
class BatchSource(Protocol):
    def steps_per_epoch(self) -> int: ...
    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]: ...


class EncodedSource:
    """Batches from an in-memory tokenised split (finetune)."""

    def __init__(
        self, encoded: Encoded, batch_size: int, seed: int, pad_id: int, group_by_length: bool = False
    ):
        self.encoded, self.batch_size, self.seed, self.pad_id = encoded, batch_size, seed, pad_id
        self.lengths = encoded.lengths() if group_by_length else None
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def _plan(self, epoch: int) -> list[np.ndarray]:
        return plan_epoch(len(self.encoded), self.batch_size, self.seed, epoch, self.world, self.lengths)

    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def epoch(self, epoch: int, skip: int):
        enc = self.encoded
        for rows in self._plan(epoch)[skip:]:
            idx = rank_rows(rows, self.rank, self.world)
            types = [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None
            batch = collate([enc.input_ids[i] for i in idx], types, self.pad_id)
            batch["labels"] = torch.from_numpy(enc.labels[idx])
            yield batch


class CacheSource:
    """Batches of token ids, labels and teacher targets streamed from a cache split (distill)."""

    def __init__(
        self,
        cache: TeacherCache,
        split: str,
        layers: list[int],
        batch_size: int,
        seed: int,
        pad_id: int,
        group_by_length: bool = False,
    ):
        self.cache, self.split, self.layers = cache, split, layers
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.group_by_length = group_by_length
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def steps_per_epoch(self) -> int:
        return len(self.cache.epoch_plan(self.split, self.batch_size, 0, self.seed, self.world))

    def epoch(self, epoch: int, skip: int):
        for part in self.cache.stream(
            self.split,
            self.batch_size,
            self.layers,
            epoch=epoch,
            seed=self.seed,
            skip=skip,
            rank=self.rank,
            world=self.world,
            group_by_length=self.group_by_length,
        ):
            batch = collate(part["input_ids"], part["token_type_ids"], self.pad_id)
            batch["labels"] = torch.from_numpy(part["labels"])
            batch["teacher_logits"] = torch.from_numpy(part["logits"])
            if self.layers:
                batch["teacher_cls"] = torch.from_numpy(part["hidden"])  # (batch, M, hidden) float16
            yield batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a model's forward takes, from a batch that also carries labels and targets."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


# -- the loop ------------------------------------------------------------------------------------
StepFn = Callable[[torch.nn.Module, dict], dict]  # (model, batch on device) -> {"loss", terms...}
EvalFn = Callable[[torch.nn.Module], dict]  # model -> dev metrics


@dataclass
class TrainResult:
    output: Path
    metrics: dict  # best dev metrics (empty without a dev split)
    best_step: int
    steps: int
    seconds: float


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and LayerNorm weights; the fused kernel where the device has
    one (a third of a small student's CPU step went into torch's per-tensor AdamW; fused, a tenth of
    that, to the same weights within float rounding: tests/test_train.py)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(
                param
            )
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=_fused_ok(decay + no_decay))


FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where torch ships a fused AdamW kernel


def _fused_ok(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


def _scheduler(optimizer, total_steps: int, warmup: float):
    warmup_steps = int(total_steps * warmup)

    def factor(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model,
    source: BatchSource,
    step_fn: StepFn,
    eval_fn: EvalFn | None,
    config: TrainConfig,
    output: Path,
    main_metric: str | None,
    save_final: Callable[[torch.nn.Module, Path], None],
) -> TrainResult:
    """Train `model`; keep the best dev checkpoint in `output/best`; resume from `output/checkpoint`."""
    started = time.time()
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device).train()
    core = model
    if distributed.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _optimizer(core, config)
    steps_per_epoch = source.steps_per_epoch()
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    scheduler = _scheduler(optimizer, total, config.warmup)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None
    ckpt_dir, best_dir, log_path = output / "checkpoint", output / "best", output / "train_log.jsonl"
    staging, previous_best = output / "best.partial", output / "best.old"
    state = {"epoch": 0, "skip": 0, "step": 0, "best": None, "best_step": 0, "best_metrics": {}}
    resuming = config.resume and checkpoint.exists(ckpt_dir)
    if not distributed.all_ok(resuming == distributed.broadcast_object(resuming)):
        # else the ranks would start from different steps and weights, and hang or diverge
        raise ConfigError(
            f"some ranks see the checkpoint in {ckpt_dir} and some do not: on several nodes, "
            "--output must be on a filesystem that every node shares"
        )
    if resuming:
        state = checkpoint.load(ckpt_dir, core, optimizer, scheduler, scaler)
        progress.info(f"resuming from {ckpt_dir} at step {state['step']}", config.quiet)
        if distributed.is_main():
            _truncate_log(log_path, state["step"])
            if not best_dir.exists() and previous_best.exists():  # killed between save_best's renames
                previous_best.rename(best_dir)
    elif distributed.is_main():
        log_path.unlink(missing_ok=True)
        _remove(output, "best", *SCRATCH)  # an earlier run's, which this run must not finish with
    writer = _tensorboard(output, config) if distributed.is_main() else None

    def evaluate_and_keep(step: int) -> dict:
        if eval_fn is None or not distributed.is_main():
            return {}
        metrics = eval_fn(core)
        value = metrics[main_metric]
        if state["best"] is None or value > state["best"]:
            state.update(best=value, best_step=step, best_metrics=metrics)
            save_best()
        return metrics

    def save_best() -> None:
        # written aside, then swapped in by two renames: a kill at any moment leaves a whole best
        # model, the new one or the previous one (in best.old/ between the renames; see above)
        _remove(output, "best.partial", "best.partial.tmp")
        save_final(core, staging)
        if best_dir.exists():
            _remove(output, "best.old")
            best_dir.rename(previous_best)
        staging.rename(best_dir)
        _remove(output, "best.old")

    def save_checkpoint() -> None:
        if distributed.is_main():
            checkpoint.save(ckpt_dir, core, optimizer, scheduler, state, scaler)
        distributed.barrier()

    sums: dict[str, float] = {}
    count = 0
    window_start = time.time()
    extra = (
        "loss {task.fields[loss]:.3f} ce {task.fields[ce]:.3f} kd {task.fields[kd]:.3f} "
        "pt {task.fields[pt]:.3f} lr {task.fields[lr]:.1e}"
    )
    done = False
    with progress.bar("train", total, unit="step", quiet=config.quiet, extra=extra) as bar:
        bar.advance(state["step"])
        for epoch in range(state["epoch"], config.epochs):
            for batch in source.epoch(epoch, state["skip"]):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, config.precision):
                    terms = step_fn(model, batch)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise ModelError(
                        f"the loss became {loss.item()} at step {state['step']}: lower --lr or use fp32"
                    )
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(optimizer)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(core.parameters(), config.max_grad_norm)
                (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["skip"] += 1
                values = {k: float(v.detach()) for k, v in terms.items()}  # one device sync per step
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.advance(1, lr=lr, **values)
                step = state["step"]
                evaluate_now = bool(config.eval_every and step % config.eval_every == 0)
                metrics = evaluate_and_keep(step) if evaluate_now else {}  # {} on ranks other than 0
                # decided alike on every rank: mean_over_ranks is a collective every rank must join
                if step % LOG_EVERY == 0 or evaluate_now or step == total:
                    seconds = time.time() - window_start
                    means = distributed.mean_over_ranks({k: v / max(count, 1) for k, v in sums.items()})
                    _log(
                        log_path,
                        writer,
                        {
                            "step": step,
                            "epoch": epoch,
                            "lr": lr,
                            **means,
                            "steps_per_s": count / max(seconds, 1e-9),
                            **_prefixed(metrics),
                        },
                    )
                    sums, count, window_start = {}, 0, time.time()
                if step >= total:
                    done = True
                    break
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint()
            if not done:
                state.update(epoch=epoch + 1, skip=0)
            metrics = evaluate_and_keep(state["step"]) if not config.eval_every else {}
            if metrics:
                _log(log_path, writer, {"step": state["step"], "epoch": epoch, **_prefixed(metrics)})
            if done:
                break
            save_checkpoint()
    if distributed.is_main():
        if eval_fn is None or not best_dir.is_dir():
            save_best()  # no dev split: the last weights are the result
        for path in best_dir.iterdir():
            path.replace(output / path.name)
        best_dir.rmdir()
        _remove(output, *SCRATCH)  # left by a kill during a save
        checkpoint.remove(ckpt_dir)
    if writer is not None:
        writer.close()
    distributed.barrier()
    return TrainResult(
        output, state["best_metrics"], state["best_step"], state["step"], time.time() - started
    )


SCRATCH = ("best.partial", "best.partial.tmp", "best.old")  # save_best's folders on the way


def _remove(output: Path, *names: str) -> None:
    for name in names:
        shutil.rmtree(output / name, ignore_errors=True)


def _prefixed(metrics: dict) -> dict:
    return {f"dev_{k}": v for k, v in metrics.items()}


def _log(path: Path, writer, record: dict) -> None:
    if not distributed.is_main():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k not in ("step", "epoch"):
                writer.add_scalar(k, v, record["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from, so the log reads as one run."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    """The step of a log line; infinite for a line the kill cut short, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _tensorboard(output: Path, config: TrainConfig):
    if config.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ModelError("--report-to tensorboard needs tensorboard: pip install tensorboard") from None
    return SummaryWriter(str(output / "tensorboard"))


def _check_precision(config: TrainConfig) -> None:
    """Fail before anything is loaded or written when --precision cannot run on the device."""
    autocast(pick_device(config.device), config.precision)  # raises ModelError for fp16 on CPU


def _prepare_output(output: Path, config: TrainConfig) -> None:
    if distributed.is_main():
        output.mkdir(parents=True, exist_ok=True)
    distributed.barrier()


# -- distill -------------------------------------------------------------------------------------
def task_of(cache: TeacherCache) -> Task:
    """The cache's task: from the registry, else rebuilt from the spec in its manifest (a task file
    that is not on this machine)."""
    try:
        return get_task(cache.task)
    except Exception:
        spec = cache.manifest["task_spec"]
        fields = {k: spec[k] for k in ("text_fields", "label_field", "metrics", "main_metric") if k in spec}
        labels = tuple(spec["labels"]) if spec.get("labels") is not None else None
        return Task(
            name=cache.task,
            labels=labels,
            splits=tuple(cache.splits),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
        )


def distill(config: DistillConfig) -> TrainResult:
    """Train a K-layer student from a teacher cache; write it in Hugging Face format."""
    distributed.init(config.device)
    _check_precision(config)
    cache = open_cache(config.cache, config.cache_dir)
    progress.info(f"cache: {cache.path}", config.quiet)
    cache.verify_across_ranks([split for split in ("train", "dev") if split in cache.splits])
    task = task_of(cache)
    teacher_map = layer_map(config.strategy, cache.teacher_layers, config.layers, config.teacher_layers)
    init = (
        config.student_init
        or cache.manifest["teacher"].get("pretrained_from")
        or cache.manifest["teacher"]["name_or_path"]
    )
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation follows --seed too
    student, tokenizer = _student(init, config, cache, teacher_map)
    if "dev" not in cache.splits:
        progress.info("the cache has no dev split: the last weights will be kept", config.quiet)
    output = config.output or config.runs_dir / task.name / f"{config.strategy}-{config.layers}"
    _prepare_output(output, config)
    pad_id = pad_id_of(tokenizer)
    source = CacheSource(
        cache, "train", teacher_map, config.batch_size, config.seed, pad_id, config.group_by_length
    )
    student_layers = list(range(1, config.layers))
    use_teacher = config.strategy != "ft"

    def step(model, batch):
        inputs = model_inputs(batch)
        out = model(**inputs, output_hidden_states=bool(teacher_map))
        return pkd_loss(
            out.logits,
            batch["teacher_logits"] if use_teacher else None,
            batch["labels"],
            cls_vectors(out.hidden_states, student_layers) if teacher_map else None,
            batch.get("teacher_cls") if teacher_map else None,
            alpha=config.alpha,
            beta=config.beta,
            temperature=config.temperature,
            normalize=config.normalize,
            regression=task.is_regression,
        )

    dev = _cached_split(cache, "dev") if "dev" in cache.splits else None
    eval_fn = _eval_fn(task, dev, pad_id, config) if dev is not None and dev.labels is not None else None
    meta = {
        "stage": "distill",
        "config": to_dict(config),
        "cache": {"key": cache.key, "path": str(cache.path), "teacher": cache.manifest["teacher"]},
        "student_init": str(init),
        "layer_map": {"student": student_layers if teacher_map else [], "teacher": teacher_map},
    }

    def save_final(model, folder):
        _save_model(model, tokenizer, folder)

    result = fit(
        student, source, step, eval_fn, config, output, task.main_metric if eval_fn else None, save_final
    )
    if distributed.is_main():
        _write_run_files(
            output, meta, result, cache.manifest.get("teacher_metrics", {}), count_parameters(student)
        )
        _model_card(output, task, meta, result, cache.manifest.get("teacher_metrics", {}))
    cache.close()
    return result


def _student(init: str, config: DistillConfig, cache: TeacherCache, teacher_map: list[int]):
    """The student: the first K layers and the embeddings of `init`, a fresh classifier; checked
    against the cache before any training."""
    init_config = load_config(init, config.trust_remote_code)
    if num_layers(init_config) < config.layers:
        raise ModelError(
            f"student init {init} has {num_layers(init_config)} layers; cannot take the first {config.layers}"
        )
    if teacher_map and hidden_size(init_config) != cache.hidden_size:
        raise ModelError(
            f"student hidden size {hidden_size(init_config)} differs from the teacher's {cache.hidden_size}: "
            "the patient loss compares [CLS] vectors, so use --strategy kd or a student of the same width"
        )
    tokenizer = load_tokenizer(init, config.trust_remote_code)
    if hash_tokenizer(tokenizer) != cache.manifest["tokenizer_sha256"]:
        raise CacheError(
            f"the student's tokenizer ({init}) is not the one the cache was made with: "
            "the cached token ids would be wrong for it; use a student init with the teacher's tokenizer"
        )
    cache.check_layers(teacher_map)
    labels = tuple(cache.label_names) if cache.label_names is not None else None
    model = load_classifier(
        init, config.trust_remote_code, num_hidden_layers=config.layers, **label_config(labels)
    )
    if model.config.num_labels != cache.num_labels:
        raise ModelError(f"student has {model.config.num_labels} labels, the cache {cache.num_labels}")
    return model, tokenizer


def _cached_split(cache: TeacherCache, split: str) -> Encoded:
    data = cache.read(split)
    labels = data["labels"]
    if labels.dtype.kind == "i" and (labels < 0).all() or labels.dtype.kind == "f" and np.isnan(labels).all():
        labels = None
    return Encoded(
        ids=data["example_id"],
        input_ids=data["input_ids"],
        token_type_ids=data["token_type_ids"],
        labels=labels,
    )


def _eval_fn(task: Task, dev: Encoded, pad_id: int, config: TrainConfig) -> EvalFn:
    def run(model) -> dict:
        logits = predict_logits(
            model,
            dev,
            pad_id=pad_id,
            batch_size=max(64, config.batch_size),
            precision=config.precision,
            quiet=True,
        )
        return score(task, logits, dev.labels)

    return run


def _save_model(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _write_run_files(
    output: Path, meta: dict, result: TrainResult, teacher_metrics: dict, parameters: int
) -> None:
    (output / "pkdpipe_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    metrics = {
        "dev": result.metrics,
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "parameters": parameters,
        "teacher_dev": teacher_metrics.get("dev", {}),
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _model_card(output: Path, task: Task, meta: dict, result: TrainResult, teacher_metrics: dict) -> None:
    c = meta["config"]
    teacher = meta["cache"]["teacher"]
    dev = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()) or "not evaluated"
    teacher_dev = ", ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.get("dev", {}).items()) or "-"
    pairs = zip(meta["layer_map"]["student"], meta["layer_map"]["teacher"])
    layer_map = ", ".join(f"{s}<-{t}" for s, t in pairs) or "none"
    schedule = f"{c['lr']} / {c['epochs']} / {c['batch_size']} / {c['warmup']} / {c['weight_decay']}"
    card = f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [pkdpipe, knowledge-distillation, patient-kd]
---
# {task.name} student: {c["strategy"]}, {c["layers"]} layers

Distilled with [pkdpipe](https://pypi.org/project/pkdpipe/) (Patient Knowledge Distillation, Sun et al. 2019)
from a cached teacher; the teacher's weights were not loaded during training.

| | |
|---|---|
| teacher | `{teacher["name_or_path"]}` ({teacher["architecture"]}, {teacher["num_layers"]} layers) |
| cache key | `{meta["cache"]["key"]}` |
| student init | `{meta["student_init"]}` (first {c["layers"]} layers) |
| strategy | {c["strategy"]} |
| layer map (student <- teacher) | {layer_map} |
| alpha / beta / T | {c["alpha"]} / {c["beta"]} / {c["temperature"]} (normalize={c["normalize"]}) |
| lr / epochs / batch / warm-up / weight decay | {schedule} |
| seed | {c["seed"]} |
| dev (best, step {result.best_step}) | {dev} |
| teacher dev | {teacher_dev} |

```python
from transformers import pipeline
classifier = pipeline("text-classification", model="{output}")
```
"""
    (output / "README.md").write_text(card)


# -- finetune ------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig) -> TrainResult:
    """Fine-tune `config.model` on a task (optionally cut to its first K layers)."""
    distributed.init(config.device)
    _check_precision(config)
    task = get_task(config.task)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    overrides = label_config(task.labels)
    if config.layers is not None:
        depth = num_layers(load_config(config.model, config.trust_remote_code))
        if config.layers > depth:
            raise ModelError(f"{config.model} has {depth} layers; cannot keep {config.layers}")
        overrides["num_hidden_layers"] = config.layers
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation follows --seed too
    model = load_classifier(config.model, config.trust_remote_code, **overrides)
    train = encode(load_split(task, "train", config.data_dir), tokenizer, config.max_seq_len)
    dev = (
        encode(load_split(task, "dev", config.data_dir), tokenizer, config.max_seq_len)
        if "dev" in task.splits
        else None
    )
    output = config.output or config.runs_dir / task.name / (
        "teacher" if config.layers is None else f"ft-{config.layers}"
    )
    _prepare_output(output, config)
    source = EncodedSource(
        train, config.batch_size, config.seed, pad_id_of(tokenizer), config.group_by_length
    )

    def step(model, batch):
        inputs = model_inputs(batch)
        out = model(**inputs)
        return pkd_loss(
            out.logits,
            None,
            batch["labels"],
            None,
            None,
            alpha=0.0,
            beta=0.0,
            temperature=1.0,
            regression=task.is_regression,
        )

    eval_fn = (
        _eval_fn(task, dev, pad_id_of(tokenizer), config)
        if dev is not None and dev.labels is not None
        else None
    )

    def save_final(model, folder):
        _save_model(model, tokenizer, folder)

    result = fit(
        model, source, step, eval_fn, config, output, task.main_metric if eval_fn else None, save_final
    )
    if distributed.is_main():
        record = {
            "base_model": str(config.model),
            "task": task.name,
            "layers": config.layers,
            "dev": result.metrics,
            "config": to_dict(config),
            "command": config.command or " ".join(sys.argv),
        }
        (output / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (output / "metrics.json").write_text(
            json.dumps(
                {
                    "dev": result.metrics,
                    "best_step": result.best_step,
                    "steps": result.steps,
                    "train_seconds": round(result.seconds, 1),
                    "parameters": count_parameters(model),
                },
                indent=2,
            )
            + "\n"
        )
    return result


__all__ = ["TrainResult", "distill", "finetune", "fit"]

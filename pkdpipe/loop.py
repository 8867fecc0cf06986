"""The training loop, in small parts that each do one thing and can be tested alone.

`fit` trains a model from a batch source with a step function (model, batch) -> {"loss", terms}.
It composes:

- `make_optimizer` / `make_scheduler`: AdamW (fused where the device has the kernel), linear
  warm-up then linear decay;
- `OptimizerStep`: backward, gradient clipping, the optimizer and scheduler steps, for one loss;
- `TrainingLog`: `train_log.jsonl` (and tensorboard), the loss terms averaged over a window of
  steps and over the ranks;
- `BestKeeper`: the best dev checkpoint in `output/best/`, swapped in whole, and the output's
  final files;
- `start_or_resume`: a fresh start, or the state of `output/checkpoint/`.

There is no trainer class tree: recipes (`pkdpipe.train`) pass a source, a step and an evaluation
function. Only rank 0 writes; under torchrun each rank reads its share of every global batch,
DistributedDataParallel averages the gradients, and the logged terms are averaged over the ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pkdpipe import checkpoint, distributed, faults, files, progress, runfolder
from pkdpipe.config import TrainConfig, to_dict
from pkdpipe.errors import ConfigError, ModelError
from pkdpipe.metrics import format_metrics, percent
from pkdpipe.models import autocast, pick_device
from pkdpipe.settings import changes_result
from pkdpipe.sources import BatchSource
from pkdpipe.strategies import StepFn

LOG_EVERY = 10  # optimizer steps between training-log lines

EvalFn = Callable[[torch.nn.Module], dict]  # model -> dev metrics
SaveFn = Callable[[torch.nn.Module, Path], None]  # write the model into a folder
EvalHook = Callable[[int, dict], None]  # (step, dev metrics) after each evaluation; may raise to stop the run


@dataclass
class TrainResult:
    output: Path
    metrics: dict  # best dev metrics (empty without a dev split)
    best_step: int
    steps: int
    seconds: float
    warnings: list[str] = field(default_factory=list)  # e.g. no better than the majority class
    reused: bool = False  # a finished run of the same settings was already there: nothing trained


# -- the optimizer ---------------------------------------------------------------------------------
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")  # where torch ships a fused AdamW kernel


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and LayerNorm weights; the fused kernel where the device has
    one (a third of a small student's CPU step went into torch's per-tensor AdamW; fused, a tenth of
    that, to the same weights within float rounding: tests/test_loop.py)."""
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
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused)


def make_scheduler(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of the steps, then linear decay to zero."""
    warmup_steps = int(total_steps * warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class OptimizerStep:
    """One optimizer step from a loss: backward (scaled under fp16), then clip, step, schedule, zero.
    The two halves are apart so that a caller can look at the loss between them."""

    def __init__(self, model, optimizer, scheduler, scaler=None, max_grad_norm: float = 0.0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.max_grad_norm = scaler, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def __call__(self, loss: torch.Tensor) -> float:
        """Apply `loss`; return the learning rate this step used."""
        self.backward(loss)
        return self.step()

    def step(self) -> float:
        """Clip, step and schedule from the gradients backward left; return the lr this step used."""
        scaler = self.scaler
        if scaler:
            scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr


# -- the training log ------------------------------------------------------------------------------
class TrainingLog:
    """`train_log.jsonl` (and tensorboard with `--report-to tensorboard`), written by rank 0.

    `add` collects each step's loss terms; `flush` writes one line with their mean over the window
    since the last line, averaged over the ranks too (a collective: every rank calls it alike)."""

    def __init__(self, output: Path, config: TrainConfig, resume_step: int | None):
        self.path = output / runfolder.TRAIN_LOG
        self.main = distributed.is_main()
        if self.main:
            if resume_step is None:
                self.path.unlink(missing_ok=True)
            else:
                _truncate_log(self.path, resume_step)
        self.writer = _tensorboard(output, config) if self.main else None
        self._sums: dict[str, float] = {}
        self._count = 0
        self._started = time.time()

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1

    def flush(self, step: int, epoch: int, lr: float, metrics: dict) -> None:
        seconds = time.time() - self._started
        means = distributed.mean_over_ranks({k: v / max(self._count, 1) for k, v in self._sums.items()})
        rate = self._count / max(seconds, 1e-9)
        self.record({"step": step, "epoch": epoch, "lr": lr, **means, "steps_per_s": rate, **metrics})
        self._sums, self._count, self._started = {}, 0, time.time()

    def record(self, record: dict) -> None:
        """Append one line (rank 0); a full disk stops every rank with one line, not a traceback."""
        distributed.agree(lambda: self._write(record), main_only=True)

    def _write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise files.write_error(self.path, err, ModelError, files.RESUMES) from None
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from, so the log reads as one run."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
        files.write_text(path, "".join(line + "\n" for line in lines))


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
    return SummaryWriter(str(output / runfolder.TENSORBOARD))


def prefixed(metrics: dict) -> dict:
    return {f"dev_{k}": v for k, v in metrics.items()}


# -- the best model --------------------------------------------------------------------------------
class BestKeeper:
    """Keeps the best dev checkpoint in `output/best/` (rank 0), and at the end moves it into
    `output/`. A new best is written aside and swapped in whole (`pkdpipe.files.replace_dir`), so a
    kill at any moment leaves a whole best model, the new one or the previous one."""

    def __init__(self, output: Path, save: SaveFn, main_metric: str | None):
        self.output, self.save, self.main_metric = output, save, main_metric
        self.folder = output / runfolder.BEST
        self.value: float | None = None
        self.step = 0
        self.metrics: dict = {}

    def start(self, resuming: bool, state: dict | None = None) -> None:
        """On resume: the best so far (from the checkpoint's state, and a kill between the renames
        undone). On a fresh start: drop an earlier run's best, which this run must not finish with."""
        if resuming and state:
            self.value, self.step, self.metrics = state["best"], state["best_step"], state["best_metrics"]
        if not distributed.is_main():
            return
        if resuming:
            files.restore_dir(self.folder)
        else:
            files.remove_dir(self.folder)

    def state(self) -> dict:
        return {"best": self.value, "best_step": self.step, "best_metrics": self.metrics}

    def offer(self, model, step: int, metrics: dict) -> None:
        """Keep `model` if its dev metric beats the best so far."""
        value = metrics[self.main_metric]
        if self.value is None or value > self.value:
            self.value, self.step, self.metrics = value, step, metrics
            self.keep(model)

    def keep(self, model) -> None:
        with files.replace_dir(self.folder) as staging:
            self.save(model, staging)

    def complete(self, model, evaluated: bool) -> None:
        """Make `best/` the run's result: the last weights when nothing was evaluated."""
        if not evaluated or not self.folder.is_dir():
            self.keep(model)  # no dev split: the last weights are the result

    def move_into_output(self) -> None:
        """Move the result's files into the output (again after a kill, what is left of them) and
        clear what the saves left on the way."""
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                path.replace(self.output / path.name)
            self.folder.rmdir()
        files.remove_dir(self.folder)


# -- start or resume -------------------------------------------------------------------------------
def start_or_resume(
    config: TrainConfig, ckpt_dir: Path, model, optimizer, scheduler, scaler, settings: dict
) -> dict | None:
    """The trainer state of `output/checkpoint/` loaded into the model and optimizer, or None for a
    fresh start. Every rank must agree, or they would start from different steps and weights; and
    the checkpoint must come from a run with the same `settings`, or the resumed run would follow
    the old ones while its files record the new."""
    resuming = config.resume and checkpoint.exists(ckpt_dir)
    if not distributed.all_ok(resuming == distributed.broadcast_object(resuming)):
        raise ConfigError(
            f"some ranks see the checkpoint in {ckpt_dir} and some do not: on several nodes, "
            "--output must be on a filesystem that every node shares"
        )
    if not resuming:
        if not config.resume and distributed.is_main():
            checkpoint.remove(ckpt_dir)  # --no-resume: an old checkpoint must not be resumed later
        return None
    finished = checkpoint.finished_state(ckpt_dir)
    state = finished or checkpoint.load(ckpt_dir, model, optimizer, scheduler, scaler)
    saved = state.get("settings", settings)
    if runfolder.run_key(saved) != runfolder.run_key(settings):
        raise ConfigError(
            f"{ckpt_dir} is the checkpoint of a run with other settings "
            f"({runfolder.changed_settings(saved, settings)}): rerun with "
            "those settings to resume it, or pass --no-resume to start over"
        )
    if finished:
        progress.info(f"{ckpt_dir}: training had finished; completing the output", config.quiet)
    else:
        progress.info(f"resuming from {ckpt_dir} at step {state['step']}", config.quiet)
    return state


def resume_settings(config: TrainConfig, **extra) -> dict:
    """The settings a checkpoint must share with the run that resumes it: every setting that changes
    what is trained (`changes_result`, not where it is written, how loudly, or on which device),
    the strategy's own included, plus `extra` (the cache's key, say). JSON values, so they compare
    equal after a round trip through the checkpoint."""
    held = getattr(config, "strategy_settings", None)
    fields = [*dataclasses.fields(config), *(dataclasses.fields(held) if held is not None else ())]
    ignored = {f.name for f in fields if not changes_result(f)}
    settings = {k: v for k, v in to_dict(config).items() if k not in ignored}
    return json.loads(json.dumps({**settings, **extra}))


# -- the loop --------------------------------------------------------------------------------------
def fit(
    model,
    source: BatchSource,
    step_fn: StepFn,
    eval_fn: EvalFn | None,
    config: TrainConfig,
    output: Path,
    main_metric: str | None,
    save_final: SaveFn,
    terms: tuple[str, ...] = ("loss",),
    settings: dict | None = None,
    on_evaluate: EvalHook | None = None,
    write_files: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Train `model`; keep the best dev checkpoint; resume from `output/checkpoint`.

    `terms` are the loss terms `step_fn` returns, shown on the progress bar (all of them are logged).
    `settings` (default: `resume_settings(config)`) must match the checkpoint's to resume from it.
    `on_evaluate(step, metrics)` runs after each dev evaluation (a search reports to its pruner
    there, and stops a run by raising); one process only. `write_files(result)` writes the run's own
    files (rank 0) once the model is in the output and before the checkpoint goes, so a kill in
    between is completed by a rerun instead of training again."""
    settings = resume_settings(config) if settings is None else settings
    run = _Run(
        model, source, step_fn, eval_fn, config, output, main_metric, save_final, settings, on_evaluate
    )
    try:
        _train(run, source, terms, config)
        return run.finish(write_files)
    finally:
        run.log.close()


def _train(run: _Run, source: BatchSource, terms: tuple[str, ...], config: TrainConfig) -> None:
    """The epochs, from where the run starts (or resumes); nothing when training had finished."""
    shown = " ".join(f"{t} {{task.fields[{t}]:.3f}}" for t in terms)
    extra = f"{shown} lr {{task.fields[lr]:.1e}}"
    with progress.bar("train", run.total, unit="step", quiet=config.quiet, extra=extra) as bar:
        bar.advance(run.state["step"])
        epochs = () if run.finished else range(run.state["epoch"], config.epochs)
        for epoch in epochs:
            done = False
            for batch in source.epoch(epoch, run.state["skip"]):
                values, lr = run.train_step(batch)
                bar.advance(1, lr=lr, **{t: values[t] for t in terms})
                done = run.after_step(epoch, lr)
                if done:
                    break
            run.end_epoch(epoch, done)
            if done:
                break


class _Run:
    """One training run's parts and counters; `fit` drives it step by step."""

    def __init__(
        self, model, source, step_fn, eval_fn, config: TrainConfig, output, main_metric, save_final, settings,
        on_evaluate: EvalHook | None = None,
    ):  # fmt: skip
        self.started = time.time()
        self.config, self.output, self.step_fn, self.eval_fn = config, output, step_fn, eval_fn
        self.on_evaluate = on_evaluate
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        self.core = model.to(self.device).train()
        self.model = model
        if distributed.world_size() > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = make_optimizer(self.core, config)
        self.total = source.steps_per_epoch() * config.epochs
        if config.max_steps:
            self.total = min(self.total, config.max_steps)
        self.scheduler = make_scheduler(self.optimizer, self.total, config.warmup)
        fp16 = config.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.checkpoint_dir = output / runfolder.CHECKPOINT
        resumed = start_or_resume(
            config, self.checkpoint_dir, self.core, self.optimizer, self.scheduler, self.scaler, settings
        )
        self.state = resumed or {"epoch": 0, "skip": 0, "step": 0}
        self.state["settings"] = settings
        self.finished = bool(resumed and resumed.get("finished"))
        self.best = BestKeeper(output, save_final, main_metric)
        self.best.start(resumed is not None, resumed)
        self.log = TrainingLog(output, config, self.state["step"] if resumed else None)
        self.apply = OptimizerStep(
            self.core, self.optimizer, self.scheduler, self.scaler, config.max_grad_norm
        )

    def train_step(self, batch: dict) -> tuple[dict[str, float], float]:
        """Forward, loss, optimizer step: the step's loss terms as floats, and the lr it used."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, self.config.precision):
            terms = self.step_fn(self.model, batch)
        self.apply.backward(terms["loss"])
        values = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist()))
        # the one device sync of the step; every rank agrees before any weight moves
        if not distributed.all_ok(math.isfinite(values["loss"])):
            raise ModelError(
                f"the loss became {values['loss']} at step {self.state['step']} (on some rank): "
                "lower --lr or use fp32"
            )
        lr = self.apply.step()
        self.state["step"] += 1
        self.state["skip"] += 1
        self.log.add(values)
        return values, lr

    def after_step(self, epoch: int, lr: float) -> bool:
        """Evaluate, log and checkpoint when due; return whether training is done."""
        step, config = self.state["step"], self.config
        evaluate_now = bool(config.eval_every and step % config.eval_every == 0)
        metrics = self.evaluate() if evaluate_now else {}  # {} on ranks other than 0
        # decided alike on every rank: the log's flush is a collective every rank must join
        if step % LOG_EVERY == 0 or evaluate_now or step == self.total:
            self.log.flush(step, epoch, lr, prefixed(metrics))
        if step >= self.total:
            return True
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self.save_checkpoint()
        return False

    def end_epoch(self, epoch: int, done: bool) -> None:
        """The epoch's evaluation (unless --eval-every evaluates by steps) and checkpoint."""
        if not done:
            self.state.update(epoch=epoch + 1, skip=0)
        evaluated = self.eval_fn is not None and not self.config.eval_every  # alike on every rank
        metrics = self.evaluate() if evaluated else {}  # {} on ranks other than 0
        if evaluated:  # a collective: every rank takes part, rank 0 writes
            self.log.record({"step": self.state["step"], "epoch": epoch, **prefixed(metrics)})
        if not done:
            self.save_checkpoint()

    def evaluate(self) -> dict:
        """Dev metrics on rank 0 ({} elsewhere), keeping the best model; a failure there (a full
        disk while saving) stops every rank."""
        if self.eval_fn is None:
            return {}

        def on_main() -> dict:
            metrics = self.eval_fn(self.core)
            self.best.offer(self.core, self.state["step"], metrics)
            return metrics

        metrics = distributed.agree(on_main, main_only=True) or {}
        if metrics:
            self.say_dev(metrics)
        if metrics and self.on_evaluate is not None:
            self.on_evaluate(self.state["step"], metrics)
        return metrics

    def say_dev(self, metrics: dict) -> None:
        """One line per evaluation in the progress output, so a log shows how dev moves while the
        run goes, not only its best at the end: 'dev: step 200/1128 accuracy 71.23 (best 71.23 at
        step 200)'."""
        best = self.best
        main = (
            f" (best {best.main_metric} {percent(best.value)} at step {best.step})"
            if best.value is not None
            else ""
        )
        progress.info(
            f"dev: step {self.state['step']:,}/{self.total:,} {format_metrics(metrics)}{main}",
            self.config.quiet,
        )

    def save_checkpoint(self) -> None:
        if distributed.is_main():
            state = {**self.state, **self.best.state()}
            checkpoint.save(
                self.checkpoint_dir, self.core, self.optimizer, self.scheduler, state, self.scaler
            )
        distributed.barrier()

    def finish(self, write_files: Callable[[TrainResult], None] | None = None) -> TrainResult:
        """Make best/ the result, record that training is over, move the result into the output,
        write the run's files, drop the checkpoint: a rerun completes a kill between any two."""
        best = self.best
        result = TrainResult(
            self.output, best.metrics, best.step, self.state["step"], time.time() - self.started
        )

        def on_main() -> None:
            if not self.finished:
                best.complete(self.core, evaluated=self.eval_fn is not None)
                state = {**self.state, **best.state(), "finished": True}
                checkpoint.mark_finished(self.checkpoint_dir, state)
            faults.point("finishing")
            best.move_into_output()
            if write_files is not None:
                write_files(result)
            faults.point("finished-before-checkpoint-removal")
            checkpoint.remove(self.checkpoint_dir)

        distributed.agree(on_main, main_only=True)
        return result

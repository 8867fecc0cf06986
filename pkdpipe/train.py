"""Stage two, the recipes: `distill` (a student from the cache alone) and `finetune` (a teacher, or a
fine-tuned-only baseline).

Each recipe builds a model, a batch source (`pkdpipe.sources`), a step (a `pkdpipe.strategies`
strategy's, or finetune's cross-entropy) and a dev evaluation, hands them to the loop
(`pkdpipe.loop.fit`), and writes the run's files next to the model. `distill` never loads the
teacher: its targets stream from the cache's shards.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from pkdpipe import cards, checkpoint, distributed, files, learning_rate, progress, runfolder, strategies
from pkdpipe.cache.fingerprint import hash_tokenizer
from pkdpipe.cache.reader import TeacherCache, open_cache
from pkdpipe.config import DistillConfig, FinetuneConfig, TrainConfig, to_dict
from pkdpipe.data import Examples, load_split
from pkdpipe.errors import CacheError, Interrupted, ModelError
from pkdpipe.evaluate import predict_logits, score
from pkdpipe.loop import EvalFn, EvalHook, TrainResult, fit, resume_settings
from pkdpipe.metrics import METRIC_SCALE, format_metrics, learned_nothing, majority_baseline, majority_warning
from pkdpipe.models import (
    autocast,
    check_max_seq_len,
    count_parameters,
    hidden_size,
    label_config,
    load_classifier,
    load_config,
    load_tokenizer,
    num_layers,
    pick_device,
    quiet_transformers,
    use_threads,
)
from pkdpipe.paths import local_first
from pkdpipe.settings import flag
from pkdpipe.sources import BatchSource, CacheSource, EncodedSource
from pkdpipe.tasks import Task, get_task
from pkdpipe.text import Encoded, encode, pad_id_of

SourceHook = Callable[[CacheSource], BatchSource]
"""Wraps (or replaces) distill's batch source: benchmarks record what a run trains on, or run a
teacher online, through this instead of patching pkdpipe."""


def _check_precision(config: TrainConfig) -> None:
    """Fail before anything is loaded or written when --precision cannot run on the device."""
    autocast(pick_device(config.device), config.precision)  # raises ModelError for fp16 on CPU


@contextmanager
def _run_folder(
    output: Path, stage: str, settings: dict, config: TrainConfig
) -> Iterator[TrainResult | None]:
    """Hold the output folder for the run (`pkdpipe.runfolder.claim`, on rank 0); yield the
    recorded result when a finished run with these settings is already there, else None. Ctrl-C
    while training leaves as `Interrupted`, saying what the folder keeps for a rerun."""
    with ExitStack() as held:

        def on_main() -> runfolder.Run | None:
            claim = held.enter_context(runfolder.claim(output, stage, settings, config.resume))
            resuming = config.resume and checkpoint.exists(output / runfolder.CHECKPOINT)
            if claim.done is None and not resuming:
                runfolder.start_fresh(output)
            return claim.done

        done = distributed.broadcast_object(distributed.agree(on_main, main_only=True))
        if done is not None:
            yield _already_finished(output, done, config)
            return
        try:
            yield None
        except KeyboardInterrupt:
            raise Interrupted(runfolder.kept(output, config.checkpoint_every)) from None


def _already_finished(output: Path, run: runfolder.Run, config: TrainConfig) -> TrainResult:
    """The recorded result of the finished run of these settings in `output`, said aloud: a rerun
    returns it instead of training again (marked `reused`, so the summary says so too)."""
    done = run.metrics
    progress.info(
        f"already finished: {output} holds this run with the same settings (best dev "
        f"{format_metrics(done['dev'])} at step {done['best_step']} of {done['steps']}); nothing was "
        "trained (--no-resume to train again)",
        config.quiet,
    )
    return TrainResult(output, done["dev"], done["best_step"], done["steps"], done["train_seconds"],
                       done["warnings"], reused=True)  # fmt: skip


def _make_output(output: Path) -> None:
    """The output folder, checked writable: once the run's inputs are known to be good, so that a
    refused run leaves no folder behind."""
    distributed.agree(lambda: files.probe_writable(output, ModelError, what="output folder"), main_only=True)


# -- distill -------------------------------------------------------------------------------------
def task_of(cache: TeacherCache) -> Task:
    """The cache's task: from the registry, else rebuilt from the spec in its manifest (a task file
    that is not on this machine)."""
    try:
        return get_task(cache.task)
    except Exception:
        spec = cache.manifest.task_spec
        fields = {k: spec[k] for k in ("text_fields", "label_field", "metrics", "main_metric") if k in spec}
        labels = tuple(spec["labels"]) if spec.get("labels") is not None else None
        return Task(
            name=cache.task,
            labels=labels,
            splits=tuple(cache.splits),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
        )


def distill(
    config: DistillConfig, source_hook: SourceHook | None = None, on_evaluate: EvalHook | None = None
) -> TrainResult:
    """Train a K-layer student from a teacher cache; write it in Hugging Face format.
    `on_evaluate(step, dev metrics)` runs after each evaluation (see `pkdpipe.loop.fit`)."""
    distributed.init(config.device)
    use_threads(config.threads)
    _check_precision(config)
    strategy = strategies.get(config.strategy)
    if config.store and config.cache:
        config = dataclasses.replace(config, cache=str(_pull_for(strategy, config)))
    cache = open_cache(config.cache, config.cache_dir, get_task(config.task).name if config.task else None)
    m = cache.manifest
    made = f"task {m.task}, key {m.key}, teacher {m.teacher.name_or_path}, made {m.created}"
    progress.info(f"cache: {cache.path} ({made})", config.quiet)
    splits = [split for split in ("train", "dev") if split in cache.splits]
    cache.verify_across_ranks(splits)
    for split in splits:
        cache.check_rows(split)
    task = task_of(cache)
    teacher_map, teacher_stats = _layer_map(strategy, cache, config)
    signal = {layer: teacher_stats[layer].varying_share for layer in teacher_map}
    low_signal = _low_signal_warning(signal, config, cache.key)
    if low_signal:
        progress.info(f"warning: {low_signal}", config.quiet)
    output = config.output or config.runs_dir / task.name / f"{config.strategy}-{config.layers}"
    chosen = config.student_init
    config, init, lr_rule, settings = distill_settings(config, cache)
    if not chosen:  # a manifest's field picks the model: say which
        progress.info(
            f"student init: {init} (the teacher's, as the cache records it; --student-init to choose)",
            config.quiet,
        )
    if lr_rule:
        progress.info(lr_rule, config.quiet)
    try:
        with _run_folder(output, "distill", settings, config) as done:
            if done is not None:
                return done
            return _distill(config, cache, task, strategy, teacher_map, teacher_stats, init, output, settings,
                            low_signal, source_hook, on_evaluate, lr_rule)  # fmt: skip
    finally:
        cache.close()


Planned = tuple[DistillConfig, str, "str | None", dict]  # distill_settings: config, init, lr rule, settings


def distill_settings(config: DistillConfig, cache: TeacherCache) -> Planned:
    """What a distill run of `config` from `cache` is, before anything trains: `config` with its lr
    resolved (`--lr auto`: `pkdpipe.learning_rate`), the student's init, the rule that chose the lr
    (None: the user gave it), and the run's settings, whose key (`pkdpipe.runfolder.run_key`) is the
    run's identity: what a rerun, a sweep or the demo compare to know whether it is already done."""
    teacher = cache.manifest.teacher
    init = str(config.student_init or teacher.pretrained_from or teacher.name_or_path)
    width = hidden_size(load_config(init, config.trust_remote_code))
    lr, rule = learning_rate.resolve(config.lr, config.layers, width)
    config = dataclasses.replace(config, lr=lr)
    return config, init, rule, resume_settings(config, cache_key=cache.key, student_init=init)


def _distill(
    config, cache, task, strategy, teacher_map, teacher_stats, init, output, settings, low_signal,
    source_hook, on_evaluate, lr_rule,
) -> TrainResult:  # fmt: skip
    """distill's training, once its output folder is held."""
    student_layers = list(range(1, config.layers)) if teacher_map else []
    signal = {layer: teacher_stats[layer].varying_share for layer in teacher_map}
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation follows --seed too
    student, tokenizer = _student(init, config, cache, teacher_map)
    _make_output(output)
    if "dev" not in cache.splits:
        progress.info("the cache has no dev split: the last weights will be kept", config.quiet)
    pad_id = pad_id_of(tokenizer)
    source = CacheSource(
        cache,
        "train",
        teacher_map,
        config.batch_size,
        config.seed,
        pad_id,
        group_by_length=config.group_by_length,
        with_logits=strategy.uses_logits,
    )
    step = strategy.make_step(
        strategies.StepSpec(config, task.is_regression, teacher_map, student_layers, teacher_stats)
    )
    dev = _cached_split(cache, "dev") if "dev" in cache.splits else None
    eval_fn = _eval_fn(task, dev, pad_id, config) if dev is not None and dev.labels is not None else None
    meta = {
        "stage": "distill",
        "settings": settings,  # what a rerun must match to be this run (pkdpipe.runfolder)
        "config": to_dict(config),
        "lr_rule": lr_rule,  # how --lr auto chose config's lr (None: the user gave it)
        "max_seq_len": cache.manifest.max_seq_len,  # the length it trained at: evaluate's default
        "cache": {"key": cache.key, "path": str(cache.path), "teacher": cache.manifest["teacher"]},
        "student_init": str(init),
        "layer_map": {"student": student_layers, "teacher": teacher_map},
        "layer_signal": {str(layer): share for layer, share in signal.items()},  # varying share, train
        "data": _cached_data(cache, task),  # what it trained and was scored on, for the card
    }

    def save_final(model, folder):
        _save_model(model, tokenizer, folder)

    baseline = majority_baseline(task, dev.labels if dev is not None else None)

    def write_files(result: TrainResult) -> None:
        check_learned(task, result, baseline, config, config.layers, hidden_size(student.config))
        if low_signal:
            result.warnings.append(low_signal)
        teacher_dev = cache.manifest.teacher_metrics.get("dev", {})
        metrics = _metrics(result, count_parameters(student), baseline, teacher_dev=teacher_dev)
        cards.write(runfolder.write(output, "distill", meta, metrics), task)

    return fit(
        student,
        source_hook(source) if source_hook else source,
        step,
        eval_fn,
        config,
        output,
        task.main_metric if eval_fn else None,
        save_final,
        terms=strategy.terms,
        settings=settings,
        on_evaluate=on_evaluate,
        write_files=write_files,
    )


def _cached_data(cache: TeacherCache, task: Task) -> dict:
    """The card's account of distill's data: the cache's rows (its --train-rows sample, if any)."""
    splits = cache.manifest.splits
    return cards.data_record(
        task,
        train=splits["train"].examples,
        dev=splits["dev"].examples if "dev" in splits else None,
        train_rows=cache.manifest.dataset.train_rows,
        data_dir=None,
    )


LOW_SIGNAL = 0.01
"""Below this varying share a mapped layer's normalised [CLS] is, to 99%, one vector for every
example (`pkdpipe.cache.stats`): the paper's patient loss has almost nothing to teach there."""


def layers_needed(strategy, config: DistillConfig, manifest) -> list[int]:
    """The teacher layers a run of `config` reads from the cache of `manifest`: its strategy's map
    (all candidate layers for `--teacher-layers auto`, none for a strategy without a patient loss)."""
    if config.teacher_layers == "auto" and strategy.maps_layers:
        return [layer for layer in manifest.layers if 1 <= layer < manifest.teacher.num_layers]
    return list(strategy.layer_map(manifest.teacher.num_layers, config.layers, config.teacher_layers))


def _pull_for(strategy, config: DistillConfig) -> Path:
    """`--store`: the local folder of `--cache`, pulled first with the teacher layers this run maps
    where the local copy lacks them. Under torchrun the ranks pull it once (the key's lock)."""
    from pkdpipe.cache.store import local_or_pull_for  # fsspec only when a store is used

    def needs(manifest) -> list[int]:
        return layers_needed(strategy, config, manifest)

    return local_or_pull_for(config.cache, config.cache_dir, config.store, needs, config.quiet)


def _layer_map(strategy, cache: TeacherCache, config: DistillConfig) -> tuple[list[int], dict]:
    """The teacher layers of the patient loss, and their train statistics ({} without a map).
    `--teacher-layers auto` ranks the cached layers by their varying share."""
    ranked, shares = {}, None
    if config.teacher_layers == "auto" and strategy.maps_layers:
        candidates = [layer for layer in cache.layers if 1 <= layer < cache.teacher_layers]
        ranked = cache.layer_stats("train", candidates)  # the chosen layers' statistics among them
        shares = {layer: s.varying_share for layer, s in ranked.items()}
    teacher_map = strategy.layer_map(cache.teacher_layers, config.layers, config.teacher_layers, shares)
    if not teacher_map:
        return [], {}
    cache.check_layers(teacher_map)
    if all(layer in ranked for layer in teacher_map):
        return teacher_map, {layer: ranked[layer] for layer in teacher_map}
    return teacher_map, cache.layer_stats("train", teacher_map)


def _low_signal_warning(signal: dict[int, float], config: DistillConfig, key: str) -> str | None:
    """A line for mapped layers whose raw normalised [CLS] barely differs between examples."""
    low = {layer: share for layer, share in signal.items() if share < LOW_SIGNAL}
    if not low or getattr(config, "pt_space", "raw") != "raw":  # a strategy may have no patient space
        return None
    shares = ", ".join(f"{layer}: {100 * share:.3g}%" for layer, share in low.items())
    return (
        f"the patient loss has little to teach: of teacher layer(s) {shares} of the normalised [CLS] "
        "varies between examples, the rest is one direction they all share; try --pt-space relational "
        "and compare with --strategy kd (docs/patient-loss.md: what each patient space measured; "
        f"pkdpipe cache stats {key} shows every layer)"
    )


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
    if hash_tokenizer(tokenizer) != cache.manifest.tokenizer_sha256:
        raise CacheError(
            f"the student's tokenizer ({init}) is not the one the cache was made with: "
            "the cached token ids would be wrong for it; use a student init with the teacher's tokenizer"
        )
    labels = tuple(cache.label_names) if cache.label_names is not None else None
    model = load_classifier(
        init,
        config.trust_remote_code,
        fresh_head=True,
        num_hidden_layers=config.layers,
        **label_config(labels),
    )
    if model.config.num_labels != cache.num_labels:
        raise ModelError(f"student has {model.config.num_labels} labels, the cache {cache.num_labels}")
    vocab = model.get_input_embeddings().num_embeddings
    for split in (s for s in ("train", "dev") if s in cache.splits):
        low, high = cache.token_range(split)
        if low < 0 or high >= vocab:  # a damaged cache, or one whose ids are not this tokenizer's
            raise CacheError(
                f"cache {cache.key}: split {split!r} holds token ids {low}..{high}, outside the student's "
                f"vocabulary of {vocab}: cache verify names the shard"
            )
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
    """The model in Hugging Face format (config, safetensors weights, tokenizer) into `folder`."""
    with quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def resolve_lr(config: TrainConfig, layers: int, hidden: int) -> tuple[TrainConfig, str | None]:
    """`config` with the number it trains at in place of `--lr auto` (`pkdpipe.learning_rate`), and
    the rule that chose it (None for a number the user gave): settings, checkpoints and the card
    then all record the number, so a run is named by what it did, not by a word."""
    lr, rule = learning_rate.resolve(config.lr, layers, hidden)
    if rule:
        progress.info(rule, config.quiet)
    return dataclasses.replace(config, lr=lr), rule


def check_learned(task: Task, result: TrainResult, baseline: dict[str, float], config: TrainConfig,
                  layers: int, hidden: int) -> None:  # fmt: skip
    """Warn, in the result (and so in metrics.json, the card and the CLI summary), when the best dev
    metric is no better than always answering the majority class: such a model learned nothing. The
    warning says the likely cause the run shows and the command to try."""
    if learned_nothing(task, result.metrics, baseline):
        result.warnings.append(
            majority_warning(task, result.metrics, baseline, "best dev")
            + "; "
            + what_to_try(
                result, config, _logged_losses(result.output), learning_rate.auto_lr(layers, hidden)[0]
            )
        )


FLAT = 0.05
"""A loss that ends within 5% of where it started learned nothing from the data."""


def _logged_losses(output: Path) -> list[float]:
    """The training loss of each line of the run's train_log.jsonl, in order."""
    return [r["loss"] for r in runfolder.read_log(output) or [] if "loss" in r]


def what_to_try(result: TrainResult, config: TrainConfig, losses: list[float], auto: float) -> str:
    """The likely cause of a run that learned nothing, as far as the run shows it, and the command to
    try: a loss flat from the start means an lr too low (or, at 1e-3 and above, too high); a best
    step at the last step means the run stopped while still learning."""
    lr = float(config.lr)
    flat = len(losses) >= 2 and losses[-1] >= (1 - FLAT) * losses[0]
    if flat and lr >= 1e-3:
        cause, change = f"the loss stayed flat from the start: lr {lr:g} is likely too high", {"lr": lr / 10}
    elif flat:
        cause, change = (
            f"the loss stayed flat from the start: lr {lr:g} is likely too low",
            {"lr": max(auto, 3 * lr)},
        )
    elif result.best_step >= result.steps:
        cause = "the best step is the last one: the run stopped while still learning (under-trained)"
        change = {"lr": max(auto, 3 * lr)} if lr < auto else {"epochs": 2 * config.epochs}
    else:
        cause, change = (
            "the loss fell but dev did not rise: check the labels, or try a lower lr",
            {"lr": lr / 3},
        )
    return f"{cause}; try: {_rerun_command(config, change)}"


def _rerun_command(config: TrainConfig, change: dict) -> str:
    """The run's own command line with `change` applied (and --no-resume, to replace this run)."""
    words = shlex.split(config.command) if config.command else ["pkdpipe", "..."]
    flags = {flag(k): f"{v:g}" if isinstance(v, float) else str(v) for k, v in change.items()}
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        elif word.split("=", 1)[0] not in (*flags, "--no-resume"):
            kept.append(word)
    return shlex.join(
        [*kept, *(x for option, value in flags.items() for x in (option, value)), "--no-resume"]
    )


def _metrics(result: TrainResult, parameters: int, baseline: dict, **extra) -> dict:
    """metrics.json: the best dev metrics and where they were reached, for every training run."""
    return {
        "dev": result.metrics,
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "parameters": parameters,
        "dev_majority_baseline": baseline,
        "metric_scale": METRIC_SCALE,
        "warnings": result.warnings,
        **extra,
    }


# -- finetune ------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig) -> TrainResult:
    """Fine-tune `config.model` on a task (optionally cut to its first K layers). Local files are
    read before the hub is asked for anything (`pkdpipe.paths.local_first`)."""
    distributed.init(config.device)
    use_threads(config.threads)
    _check_precision(config)
    task = get_task(config.task)
    output = config.output or config.runs_dir / task.name / (
        "teacher" if config.layers is None else f"ft-{config.layers}"
    )
    model_config, (train, dev) = local_first(
        config.model, lambda: load_config(config.model, config.trust_remote_code), lambda: _data(config, task)
    )
    depth = num_layers(model_config)
    if config.layers is not None and config.layers > depth:
        raise ModelError(f"{config.model} has {depth} layers; cannot keep {config.layers}")
    check_max_seq_len(model_config, config.max_seq_len, config.model)
    config, lr_rule, settings = finetune_settings(config, model_config)
    if lr_rule:
        progress.info(lr_rule, config.quiet)
    with _run_folder(output, "finetune", settings, config) as done:
        if done is not None:
            return done
        return _finetune(
            config, task, output, settings, (train, dev), (depth, hidden_size(model_config), lr_rule)
        )


def finetune_settings(config: FinetuneConfig, model_config) -> tuple[FinetuneConfig, str | None, dict]:
    """What a finetune run of `config` is, before anything trains (see `distill_settings`): `config`
    with its lr resolved, the rule that chose it, and the run's settings."""
    depth = num_layers(model_config)
    lr, rule = learning_rate.resolve(config.lr, config.layers or depth, hidden_size(model_config))
    config = dataclasses.replace(config, lr=lr)
    return config, rule, resume_settings(config)


def _data(config: FinetuneConfig, task: Task) -> tuple[Examples, Examples | None]:
    """finetune's train split (a --train-rows sample of it, when asked) and dev split (if any)."""
    train = load_split(task, "train", config.data_dir, train_rows=config.train_rows)
    return train, load_split(task, "dev", config.data_dir) if "dev" in task.splits else None


Shape = tuple[int, int, "str | None"]  # a model's depth and width, and the rule that chose its lr


def _finetune(config: FinetuneConfig, task: Task, output: Path, settings: dict,
              data: tuple[Examples, Examples | None], shape: Shape) -> TrainResult:  # fmt: skip
    """finetune's training, once its output folder is held: `data` is (train, dev), `shape` the
    model's (depth, width) and the rule that chose its lr."""
    depth, width, lr_rule = shape
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    overrides = label_config(task.labels)
    if config.layers is not None:
        overrides["num_hidden_layers"] = config.layers
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation follows --seed too
    model = load_classifier(config.model, config.trust_remote_code, fresh_head=True, **overrides)
    train = encode(data[0], tokenizer, config.max_seq_len)
    dev = encode(data[1], tokenizer, config.max_seq_len) if data[1] is not None else None
    _make_output(output)
    pad_id = pad_id_of(tokenizer)
    source = EncodedSource(train, config.batch_size, config.seed, pad_id, config.group_by_length)
    eval_fn = _eval_fn(task, dev, pad_id, config) if dev is not None and dev.labels is not None else None

    def save_final(model, folder):
        _save_model(model, tokenizer, folder)

    baseline = majority_baseline(task, dev.labels if dev is not None else None)

    def write_files(result: TrainResult) -> None:
        check_learned(task, result, baseline, config, config.layers or depth, width)
        record = {
            "base_model": str(config.model),
            "task": task.name,
            "layers": config.layers,
            "dev": result.metrics,
            "settings": settings,  # what a rerun must match to be this run (pkdpipe.runfolder)
            "config": to_dict(config),
            "lr_rule": lr_rule,  # how --lr auto chose config's lr (None: the user gave it)
            "max_seq_len": config.max_seq_len,  # the length it trained at: evaluate's default
            "command": config.command or " ".join(sys.argv),
            "data": cards.data_record(
                task, len(train), len(dev) if dev is not None else None, config.train_rows, config.data_dir
            ),  # fmt: skip
        }
        metrics = _metrics(result, count_parameters(model), baseline)
        cards.write(runfolder.write(output, "finetune", record, metrics), task)

    return fit(
        model,
        source,
        strategies.finetune_step(task.is_regression),
        eval_fn,
        config,
        output,
        task.main_metric if eval_fn else None,
        save_final,
        terms=strategies.FINETUNE_TERMS,
        settings=settings,
        write_files=write_files,
    )


__all__ = ["TrainResult", "distill", "finetune", "fit"]

"""Stage one, `cache_teacher`: run the teacher once over each split and cache its outputs.

Per example the cache holds the token ids, the gold label, the logits and the [CLS] vector of
every stored layer. This module is the model side: it loads the teacher, hashes what the key
covers, runs the teacher under `torch.inference_mode` on batches padded to their own longest
example, and picks the [CLS] vectors. Everything on disk is `pkdpipe.cache.builder.CacheBuilder`'s:
the folder, the shard plan (length-sorted rows, shard by shard; a shard is the unit of resume and
of parallel work under torchrun: rank r writes shards r, r+N, ...), the staging and the manifest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pkdpipe import distributed, faults, progress
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.builder import CacheBuilder, Origin, PlannedShard, SplitPlan
from pkdpipe.cache.fingerprint import hash_tokenizer, hash_weights, sha256_json
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.config import CacheConfig, to_dict
from pkdpipe.data import Examples, load_split
from pkdpipe.errors import CacheError, ConfigError, DataError, ModelError, PkdError
from pkdpipe.models import (
    autocast,
    check_max_seq_len,
    hidden_size,
    label_config,
    load_classifier,
    load_tokenizer,
    num_layers,
    pick_device,
    pretrained_origin,
    use_threads,
)
from pkdpipe.paths import local_first
from pkdpipe.tasks import Task, get_task
from pkdpipe.text import TRUNCATION, Encoded, collate, encode, pad_id_of, uses_token_type_ids


@dataclass
class CacheResult:
    path: Path  # the cache folder
    key: str
    hit: bool  # True when a complete cache was found (locally or in the store) and nothing ran
    manifest: mf.Manifest
    pulled: bool = False  # True when the cache came from the store


def resolve_teacher(config: CacheConfig, task: Task) -> str:
    if config.teacher:
        return config.teacher
    default = config.runs_dir / task.name / "teacher"
    if (default / "config.json").is_file():
        return str(default)
    raise ModelError(
        f"no teacher given and {default} does not exist: pass --teacher NAME_OR_PATH (or run finetune first)"
    )


def cache_teacher(
    config: CacheConfig, teacher_hook: Callable[[torch.nn.Module], None] | None = None
) -> CacheResult:
    """Build (or find) the cache for `config`; return where it is and whether it was a hit.

    `teacher_hook` is called with the teacher once it is loaded (a benchmark attaches forward
    hooks through it to time the teacher's forwards)."""
    distributed.init(config.device)
    use_threads(config.threads)
    autocast(pick_device(config.device), config.precision)  # fp16 on CPU fails here, before any work
    started = time.time()
    task = get_task(config.task)
    for split in config.splits:
        if split not in task.splits:
            raise ConfigError(f"task {task.name} has no split {split!r}; it has {', '.join(task.splits)}")
    teacher_name = resolve_teacher(config, task)
    (model, tokenizer, layers), examples = local_first(
        teacher_name, lambda: _load_teacher(teacher_name, task, config), lambda: _examples(config, task)
    )
    if teacher_hook is not None:
        teacher_hook(model)
    builder = _builder(config, task, teacher_name, model, tokenizer, layers, examples)
    fingerprint_seconds = time.time() - started

    # rank 0 decides (and pulls): every rank must take the same road, or some would wait for the others
    found = None if config.force else distributed.agree(lambda: builder.find(config.store), main_only=True)
    if distributed.broadcast_object(found is not None):
        return CacheResult(builder.folder, builder.key, True, builder.manifest(), pulled=found == "pulled")
    device = pick_device(config.device)
    model.to(device).eval()
    with _build_lock(builder) as already_built:
        if already_built and not config.force:
            return CacheResult(builder.folder, builder.key, hit=True, manifest=builder.manifest())
        if config.force and distributed.is_main():
            builder.clear()
        distributed.barrier()
        timings = {"fingerprint_s": round(fingerprint_seconds, 2)}
        plans = {}
        for split, ex in examples.items():
            encoded = encode(ex, tokenizer, config.max_seq_len)
            t0 = time.time()
            # a rank whose disk fills stops every rank, not only itself
            plans[split] = distributed.agree(
                lambda: _cache_split(split, encoded, model, tokenizer, builder, config, device)  # noqa: B023
            )
            timings[f"{split}_s"] = round(time.time() - t0, 2)
        faults.point("before-manifest")
        origin = _origin(config, task, tokenizer, started)
        distributed.agree(lambda: builder.finish(plans, origin, timings), main_only=True)
    result = CacheResult(builder.folder, builder.key, hit=False, manifest=builder.manifest())
    if config.push and distributed.is_main():
        builder.push(config.store)
    return result


def _examples(config: CacheConfig, task: Task) -> dict[str, Examples]:
    """Each split to cache; a --train-rows sample hashes differently from the full split (its ids
    and texts), so it names its own key."""
    examples = {split: load_split(task, split, config.data_dir, config.train_rows) for split in config.splits}
    for split, ex in examples.items():
        if not len(ex):
            raise DataError(f"split {split!r} of task {task.name} has no examples: nothing to cache")
    return examples


def _builder(
    config: CacheConfig, task: Task, teacher_name, model, tokenizer, layers, examples
) -> CacheBuilder:
    """The builder of this cache: the key's inputs hashed from the teacher, tokenizer and data."""
    inputs = mf.KeyInputs(
        task=task.fingerprint_dict(),
        teacher_weights=hash_weights(model),
        tokenizer=hash_tokenizer(tokenizer),
        datasets={split: sha256_json(ex.fingerprint_dict()) for split, ex in examples.items()},
        max_seq_len=config.max_seq_len,
        truncation=TRUNCATION,
        layers=list(layers),
        hidden_dtype=config.hidden_dtype,
        logits_dtype="float32",
        precision=config.precision,  # bf16/fp16 autocast changes the stored values
        codec=config.codec,
    )
    teacher = mf.Teacher(
        name_or_path=str(teacher_name),
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        num_layers=num_layers(model.config),
        hidden_size=hidden_size(model.config),
        pretrained_from=pretrained_origin(teacher_name) if Path(teacher_name).is_dir() else None,
        weights_sha256=inputs.teacher_weights,
    )
    with_types = uses_token_type_ids(tokenizer)
    return CacheBuilder(config.cache_dir, task, inputs, teacher, with_types, config.shard_size, config.quiet)


def _origin(config: CacheConfig, task: Task, tokenizer, started: float) -> Origin:
    """What the manifest records of this run beyond the key's inputs."""
    return Origin(
        data_source=str(config.data_dir or (task.task_dir if task.hub_name is None else "huggingface-hub")),
        train_rows=config.train_rows or None,  # a seeded sample of the train split (None: all)
        vocab_size=len(tokenizer),
        command=config.command or " ".join(sys.argv),
        config=to_dict(config),
        started=started,
    )


def _load_teacher(teacher_name: str, task: Task, config: CacheConfig):
    """The teacher, its tokenizer and the hidden layers to store, checked against the task."""
    # the model first, so that a wrong --teacher reads "model not found", not "tokenizer not found"
    # a head that was never trained is made for the task's labels (its logits mean nothing either way)
    head = label_config(task.labels) if config.untrained_head else {}
    model = load_classifier(teacher_name, config.trust_remote_code, fresh_head=config.untrained_head, **head)
    tokenizer = load_tokenizer(teacher_name, config.trust_remote_code)
    if model.config.num_labels != task.num_labels:
        raise ModelError(
            f"teacher {teacher_name} has {model.config.num_labels} labels but task {task.name} has "
            f"{task.num_labels}: fine-tune a teacher for this task first"
        )
    check_max_seq_len(model.config, config.max_seq_len, teacher_name)
    depth = num_layers(model.config)
    layers = config.layers if config.layers is not None else tuple(range(depth + 1))
    if not layers or min(layers) < 0 or max(layers) > depth:
        raise ConfigError(
            f"--layers must be within 0..{depth} for this {depth}-layer teacher; got {list(layers)}"
        )
    return model, tokenizer, layers


def _cache_split(
    split, encoded: Encoded, model, tokenizer, builder: CacheBuilder, config, device
) -> SplitPlan:
    """Run the teacher over this rank's shards of one split that are not finished yet; return the plan."""
    rank, world = distributed.rank(), distributed.world_size()
    plan = builder.plan(split, encoded.ids, encoded.lengths(), rank, world)
    total = sum(len(shard.rows) for shard in plan.todo)
    with progress.bar(f"teacher {split}", total, quiet=config.quiet) as bar:
        for shard in plan.todo:
            _write_shard(builder, plan, shard, encoded, model, tokenizer, config, device, bar)
    return plan


def _write_shard(
    builder: CacheBuilder,
    plan: SplitPlan,
    shard: PlannedShard,
    encoded: Encoded,
    model,
    tokenizer,
    config,
    device,
    bar,
) -> None:
    """The teacher's outputs for one shard's rows, batch by batch, handed to the builder."""
    pad_id = pad_id_of(tokenizer)
    layers = builder.layout.layers
    with builder.shard(plan, shard) as writer:
        for start in range(0, len(shard.rows), config.batch_size):
            batch_rows = shard.rows[start : start + config.batch_size]
            ids = [encoded.input_ids[i] for i in batch_rows]
            types = (
                [encoded.token_type_ids[i] for i in batch_rows]
                if encoded.token_type_ids is not None
                else None
            )
            batch = {k: v.to(device, non_blocking=True) for k, v in collate(ids, types, pad_id).items()}
            with torch.inference_mode(), autocast(device, config.precision):
                out = model(**batch, output_hidden_states=True)
            logits = out.logits.float().cpu().numpy()
            hidden = {i: out.hidden_states[i][:, 0].float().cpu().numpy() for i in layers}
            writer.write(ids, types, _labels(encoded, batch_rows, builder.layout.regression), logits, hidden)
            del out, hidden  # the [CLS] slices are views of all its states: free them before the next forward
            bar.advance(len(batch_rows))


def _labels(encoded: Encoded, rows, regression: bool) -> np.ndarray:
    if encoded.labels is None:
        return np.full(len(rows), np.nan if regression else -1)
    return encoded.labels[rows]


@contextmanager
def _build_lock(builder: CacheBuilder):
    """Hold the key's lock while building; yield whether the cache is complete by then. Under
    torchrun rank 0 holds it for all the ranks, which wait for it, so `cache gc` leaves the build
    alone while the ranks split the work."""
    with builder.lock(hold=distributed.is_main()):
        distributed.barrier()
        yield distributed.broadcast_object(builder.complete())


def describe(result: CacheResult) -> dict:
    """Figures for the summary table: examples, shards, bytes, per-example bytes, time, dev metric."""
    manifest = result.manifest
    shards = manifest.shards()
    examples = sum(info.examples for info in manifest.splits.values())
    size = sum(s.bytes or 0 for s in shards)
    return {
        "path": str(result.path),
        "key": result.key,
        "examples": examples,
        "shards": len(shards),
        "bytes": size,
        "bytes_per_example": size / max(examples, 1),
        "seconds": manifest.timings.get("total_s"),
        "teacher_metrics": manifest.teacher_metrics,
    }


# -- recompute: does the cache hold what its teacher computes? ---------------------------------------
# Tolerances of `recompute_check`. Logits are stored as float32, so a teacher rerun in fp32 agrees to
# rounding (TF32 matmuls on a GPU, or another device, stay well inside 1e-2); [CLS] vectors stored as
# float16 keep ~3 significant digits, which moves a vector's cosine by far less than 1e-3. A cache made
# under bf16/fp16 autocast is compared with the looser pair. Another teacher (even one fine-tuned from
# the same pre-trained model) misses these by orders of magnitude.
RECOMPUTE_TOLERANCE = {"fp32": (1e-2, 0.999), "autocast": (1e-1, 0.99)}  # (max |logit diff|, min cosine)


@dataclass
class RecomputeReport:
    examples: int  # how many examples were recomputed
    max_logit_diff: float  # largest |teacher logit - cached logit|
    max_hidden_diff: float  # largest |teacher [CLS] - cached [CLS]| over stored layers
    min_cosine: float  # lowest cosine between a recomputed and a cached [CLS] vector
    worst_layer: int | None  # the stored layer with that lowest cosine
    logit_tolerance: float
    cosine_tolerance: float
    notes: list[str] = field(default_factory=list)  # e.g. the teacher's weights differ from the manifest's
    data_checked: int = 0  # examples whose label and token ids were compared with the task's data
    data_mismatches: list[str] = field(default_factory=list)  # "train example 12: label 2, the data says 0"

    @property
    def ok(self) -> bool:
        close = self.max_logit_diff <= self.logit_tolerance and self.min_cosine >= self.cosine_tolerance
        return close and not self.data_mismatches


def recompute_check(
    folder: str | Path,
    teacher: str,
    n: int,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    data_dir: str | Path | None = None,
    task: str | None = None,
) -> RecomputeReport:
    """Rerun `teacher` on `n` examples drawn at random (seeded) from all of the cache's splits, with
    the token ids stored in the cache, and compare its logits and stored layers' [CLS] vectors with
    the cached ones. `ok` is False past `RECOMPUTE_TOLERANCE`; this catches a cache made by another
    teacher than the one it claims. With `data_dir` (the task's data), the same examples' gold labels
    and token ids are also compared with the data, encoded by the teacher's tokenizer: a cache whose
    labels were changed (checksums recomputed) passes every other check. `task` names the task (a
    task file's path) when it is not one of pkdpipe's own."""
    if n < 1:
        raise CacheError(f"--recompute needs a positive number of examples; got {n}")
    cache = TeacherCache(folder)
    m = cache.manifest
    model = load_classifier(teacher)
    if model.config.num_labels != cache.num_labels or hidden_size(model.config) != cache.hidden_size:
        raise CacheError(
            f"teacher {teacher} ({model.config.num_labels} labels, hidden {hidden_size(model.config)}) "
            f"cannot have made this cache ({cache.num_labels} labels, hidden {cache.hidden_size})"
        )
    notes = []
    if hash_weights(model) != m.teacher.weights_sha256:
        notes.append(f"the weights of {teacher} are not the ones the manifest records")
    tokenizer = load_tokenizer(teacher)
    if hash_tokenizer(tokenizer) != m.tokenizer_sha256:
        notes.append(
            f"the tokenizer of {teacher} is not the one the manifest records (the cached ids are not its ids)"
        )
    pad_id = pad_id_of(tokenizer)
    logit_tol, cos_tol = RECOMPUTE_TOLERANCE["fp32" if m.precision == "fp32" else "autocast"]

    sizes = {split: info.examples for split, info in m.splits.items()}
    starts = np.cumsum([0, *sizes.values()])
    picks = np.sort(np.random.default_rng(seed).choice(starts[-1], size=min(n, starts[-1]), replace=False))
    device_ = pick_device(device)
    model.to(device_).eval()
    max_logit, max_hidden, min_cos, worst_layer = 0.0, 0.0, 1.0, None
    truth = _data_truth(cache, tokenizer, data_dir, task) if data_dir is not None else {}
    checked, mismatches = 0, []
    with cache:
        for split, first, stop in zip(sizes, starts[:-1], starts[1:]):
            positions = picks[(picks >= first) & (picks < stop)] - first
            for start in range(0, len(positions), batch_size):
                data = cache.rows(split, positions[start : start + batch_size], cache.present_layers)
                if split in truth:
                    checked += len(data["example_id"])
                    mismatches += _against_data(split, data, truth[split])
                batch = collate(data["input_ids"], data["token_type_ids"], pad_id)
                with torch.inference_mode():
                    out = model(**{k: v.to(device_) for k, v in batch.items()}, output_hidden_states=True)
                logits = out.logits.float().cpu().numpy()
                max_logit = max(max_logit, float(np.abs(logits - data["logits"]).max()))
                for j, layer in enumerate(cache.present_layers):
                    fresh = out.hidden_states[layer][:, 0].float().cpu().numpy()
                    cached = data["hidden"][:, j].astype(np.float32)
                    norms = np.linalg.norm(fresh, axis=1) * np.linalg.norm(cached, axis=1)
                    cosine = float(((fresh * cached).sum(1) / np.maximum(norms, 1e-12)).min())
                    max_hidden = max(max_hidden, float(np.abs(fresh - cached).max()))
                    if cosine < min_cos:
                        min_cos, worst_layer = cosine, layer
    return RecomputeReport(
        len(picks),
        max_logit,
        max_hidden,
        min_cos,
        worst_layer,
        logit_tol,
        cos_tol,
        notes,
        checked,
        mismatches,
    )


def _data_truth(
    cache: TeacherCache, tokenizer, data_dir, task_name: str | None
) -> dict[str, dict[int, tuple]]:
    """{split: {example id: (token ids, label)}} of the task's data, encoded as the cache was."""
    m = cache.manifest
    try:
        task = get_task(task_name or m.task)
    except PkdError:
        raise ConfigError(
            f"the cache's task {m.task!r} is not one of pkdpipe's: pass --task TASK_FILE with --data-dir"
        ) from None
    if task.fingerprint_dict() != m.task_spec:
        raise ConfigError(f"task {task.name} is not the task this cache was made for ({m.task})")
    truth = {}
    for split in cache.splits:
        encoded = encode(load_split(task, split, data_dir), tokenizer, m.max_seq_len)
        labels = encoded.labels if encoded.labels is not None else [None] * len(encoded.ids)
        truth[split] = {int(i): (ids, label) for i, ids, label in zip(encoded.ids, encoded.input_ids, labels)}
    return truth


def _against_data(split: str, data: dict, truth: dict[int, tuple]) -> list[str]:
    found = []
    for k, example_id in enumerate(data["example_id"].tolist()):
        if example_id not in truth:
            found.append(f"{split} example {example_id} is not in the data")
            continue
        ids, label = truth[example_id]
        cached = data["labels"][k]
        if label is not None and not (cached == label or (np.isnan(cached) and np.isnan(label))):
            found.append(f"{split} example {example_id}: label {cached}, the data says {label}")
        if not np.array_equal(np.asarray(data["input_ids"][k]), np.asarray(ids)):
            found.append(f"{split} example {example_id}: its token ids are not the data's")
    return found


__all__ = ["CacheResult", "RecomputeReport", "cache_teacher", "describe", "recompute_check"]

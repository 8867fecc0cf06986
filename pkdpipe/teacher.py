"""Stage one, `cache_teacher`: run the teacher once over each split and cache its outputs.

Per example the cache holds the token ids, the gold label, the logits and the [CLS] vector of
every stored layer. The teacher runs under `torch.inference_mode` on length-sorted batches padded
to their own longest example; the rows are written in that sorted order, shard by shard, and a
shard is the unit of resume (and of parallel work under torchrun: rank r writes shards r, r+N, ...).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pkdpipe import __version__, distributed, faults, files, progress
from pkdpipe.cache import extents, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import FORMAT_VERSION, hash_tokenizer, hash_weights, sha256_json
from pkdpipe.cache.local import key_lock
from pkdpipe.cache.manifest import KeyInputs
from pkdpipe.cache.reader import TeacherCache, read_shard
from pkdpipe.cache.writer import ShardWriter
from pkdpipe.config import CacheConfig, to_dict
from pkdpipe.data import Examples, load_split
from pkdpipe.errors import CacheError, ConfigError, DataError, DiskFullError, ModelError, PkdError
from pkdpipe.metrics import compute_metrics, predictions_from_logits
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
from pkdpipe.text import (
    TRUNCATION,
    Encoded,
    collate,
    encode,
    length_sorted_order,
    pad_id_of,
    uses_token_type_ids,
)


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
    inputs = KeyInputs(
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
    key = inputs.key()
    folder = config.cache_dir / task.name / key
    fingerprint_seconds = time.time() - started

    # rank 0 decides (and pulls): every rank must take the same road, or some would wait for the others
    found = (
        None if config.force else distributed.agree(lambda: _find(folder, task, key, config), main_only=True)
    )
    if distributed.broadcast_object(found is not None):
        return CacheResult(
            folder, key, hit=True, manifest=mf.read(folder), pulled=bool(found and found.pulled)
        )
    device = pick_device(config.device)
    model.to(device).eval()
    layout = _layout(config, task, model, tokenizer, layers)
    with _build_lock(folder, config.quiet) as already_built:
        if already_built and not config.force:
            return CacheResult(folder, key, hit=True, manifest=mf.read(folder))
        if config.force and distributed.is_main():
            _clear(folder)
        distributed.barrier()
        timings = {"fingerprint_s": round(fingerprint_seconds, 2)}
        splits_info = {}
        for split, ex in examples.items():
            encoded = encode(ex, tokenizer, config.max_seq_len)
            t0 = time.time()
            # a rank whose disk fills stops every rank, not only itself
            splits_info[split] = distributed.agree(
                lambda: _cache_split(split, encoded, model, tokenizer, layout, folder, config, device)  # noqa: B023
            )
            timings[f"{split}_s"] = round(time.time() - t0, 2)
        faults.point("before-manifest")

        def write_manifest() -> None:
            _drop_unplanned_shards(folder, splits_info)
            manifest = _manifest(config, task, teacher_name, model, key, inputs, layout, splits_info, folder)
            manifest["vocab_size"] = len(tokenizer)  # every cached token id is below it (verify checks)
            manifest["timings"] = {**timings, "total_s": round(time.time() - started, 2)}
            mf.write(folder, manifest)

        distributed.agree(write_manifest, main_only=True)
    result = CacheResult(folder, key, hit=False, manifest=mf.read(folder))
    if config.push and distributed.is_main():
        from pkdpipe.cache.store import push

        push(folder, config.store, quiet=config.quiet)
    return result


def _examples(config: CacheConfig, task: Task) -> dict[str, Examples]:
    """Each split to cache; a --train-rows sample hashes differently from the full split (its ids
    and texts), so it names its own key."""
    examples = {split: load_split(task, split, config.data_dir, config.train_rows) for split in config.splits}
    for split, ex in examples.items():
        if not len(ex):
            raise DataError(f"split {split!r} of task {task.name} has no examples: nothing to cache")
    return examples


def _layout(config: CacheConfig, task: Task, model, tokenizer, layers) -> schema.Layout:
    """What the shards of this teacher, task and settings hold."""
    return schema.Layout(
        num_labels=task.num_labels,
        hidden_size=hidden_size(model.config),
        layers=tuple(layers),
        hidden_dtype=config.hidden_dtype,
        regression=task.is_regression,
        with_token_types=uses_token_type_ids(tokenizer),
        with_stats=True,
        codec=config.codec,
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


def _find(folder: Path, task: Task, key: str, config: CacheConfig) -> CacheResult | None:
    """The complete cache with this key, here or (with --store) pulled from the store."""
    if (folder / mf.MANIFEST).is_file():
        return CacheResult(folder, key, hit=True, manifest=mf.read(folder))
    if config.store:
        from pkdpipe.cache.store import pull_if_present  # fsspec only when a store is used

        pulled = pull_if_present(config.store, task.name, key, config.cache_dir, quiet=config.quiet)
        if pulled is not None:
            return CacheResult(pulled, key, hit=True, manifest=mf.read(pulled), pulled=True)
    return None


def _cache_split(split, encoded: Encoded, model, tokenizer, layout, folder, config, device) -> dict:
    """Write this rank's shards of one split (skipping finished ones); return the shard plan."""
    lengths = encoded.lengths()
    order = length_sorted_order(lengths, encoded.ids)
    n_shards = max(1, -(-len(order) // config.shard_size))
    plan = []
    todo = []
    for index in range(n_shards):
        rows = order[index * config.shard_size : (index + 1) * config.shard_size]
        path = folder / mf.shard_name(split, index, n_shards)
        plan.append({"file": path.name, "rows": int(len(rows))})
        mine = index % distributed.world_size() == distributed.rank()
        if mine and not _finished(path, encoded.ids[rows], layout):
            todo.append((path, rows))
    total = sum(len(rows) for _, rows in todo)
    with progress.bar(f"teacher {split}", total, quiet=config.quiet) as bar:
        for i, (path, rows) in enumerate(todo):
            try:
                _write_shard(
                    path, rows, lengths[rows], encoded, model, tokenizer, layout, config, device, bar
                )
            except DiskFullError:
                need = math.ceil(
                    sum(layout.nbytes(len(r), int(lengths[r].sum())) for _, r in todo[i:]) / 2**20
                )
                raise DiskFullError(
                    f"no space left on device while writing {path}: free {need:,} MB (or use --cache-dir "
                    "elsewhere) and rerun; finished shards are kept"
                ) from None
            faults.point("shard-written")
    return {"examples": len(order), "shards": plan}


def _finished(path: Path, ids: np.ndarray, layout: schema.Layout) -> bool:
    """True when `path` is a finished shard holding exactly these example ids, in this order, and
    every dataset the layout names.

    A shard from an interrupted run with another --shard-size can have the same name but other
    rows (the shard size is not part of the key: it does not change the values), and one left by
    an older pkdpipe has no per-layer statistics; either is rewritten."""
    if not path.is_file():
        return False
    extra = [schema.cls_stats(layer) for layer in layout.layers] if layout.with_stats else []
    try:
        return np.array_equal(read_shard(path, schema.EXAMPLE_ID, *extra)[schema.EXAMPLE_ID], ids)
    except CacheError:
        return False


def _write_shard(
    path, rows, lengths, encoded: Encoded, model, tokenizer, layout, config, device, bar
) -> None:
    writer = ShardWriter(path, encoded.ids[rows], lengths, layout)
    pad_id = pad_id_of(tokenizer)
    try:
        for start in range(0, len(rows), config.batch_size):
            batch_rows = rows[start : start + config.batch_size]
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
            hidden = {i: out.hidden_states[i][:, 0].float().cpu().numpy() for i in layout.layers}
            writer.write(ids, types, _labels(encoded, batch_rows, layout.regression), logits, hidden)
            bar.advance(len(batch_rows))
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _labels(encoded: Encoded, rows, regression: bool) -> np.ndarray:
    if encoded.labels is None:
        return np.full(len(rows), np.nan if regression else -1)
    return encoded.labels[rows]


def _manifest(config, task, teacher_name, model, key, inputs: KeyInputs, layout, splits_info, folder) -> dict:
    """manifest.json's content: each key input in its documented field (see KeyInputs.of)."""
    for info in splits_info.values():
        for shard in info["shards"]:
            path = folder / shard["file"]
            shard["sha256"], datasets = extents.record(path)  # one read: the file's and each dataset's
            shard["bytes"] = path.stat().st_size
            if datasets is not None:
                shard["datasets"] = datasets
    return {
        "format": mf.FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key": key,
        "task": task.name,
        "task_spec": inputs.task,
        "label_names": list(task.labels) if task.labels is not None else None,
        "num_labels": task.num_labels,
        "teacher": {
            "name_or_path": str(teacher_name),
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "num_layers": num_layers(model.config),
            "hidden_size": layout.hidden_size,
            "pretrained_from": pretrained_origin(teacher_name) if Path(teacher_name).is_dir() else None,
            "weights_sha256": inputs.teacher_weights,
        },
        "tokenizer_sha256": inputs.tokenizer,
        "dataset": {
            "source": str(config.data_dir or (task.task_dir if task.hub_name is None else "huggingface-hub")),
            "sha256": inputs.datasets,
            "train_rows": config.train_rows or None,  # a seeded sample of the train split (None: all)
        },
        "max_seq_len": inputs.max_seq_len,
        "truncation": inputs.truncation,
        "uses_token_type_ids": layout.with_token_types,
        "layers": inputs.layers,
        "hidden_dtype": inputs.hidden_dtype,
        "codec": inputs.codec,
        "logits_dtype": inputs.logits_dtype,
        "precision": inputs.precision,
        "splits": splits_info,
        "cls_stats": layout.with_stats,
        "teacher_metrics": _teacher_metrics(folder, task, splits_info),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "command": config.command or " ".join(sys.argv),
        "config": to_dict(config),
    }


def _drop_unplanned_shards(folder: Path, splits_info: dict) -> None:
    """Shards an interrupted run with another --shard-size left under other names: not this cache's."""
    planned = {shard["file"] for info in splits_info.values() for shard in info["shards"]}
    for path in folder.glob("*.h5"):
        if path.name not in planned:
            path.unlink()


def _teacher_metrics(folder: Path, task: Task, splits_info: dict) -> dict:
    """The teacher's metrics on each labelled split other than train, read back from the shards."""
    metrics = {}
    for split, info in splits_info.items():
        if split == "train":
            continue
        parts = [read_shard(folder / s["file"], schema.LOGITS, schema.LABELS) for s in info["shards"]]
        labels = np.concatenate([p[schema.LABELS] for p in parts])
        if np.isnan(labels).all() if task.is_regression else (labels < 0).all():
            continue
        preds = predictions_from_logits(task, np.concatenate([p[schema.LOGITS] for p in parts]))
        metrics[split] = compute_metrics(task, preds, labels)
    return metrics


@contextmanager
def _build_lock(folder: Path, quiet: bool = False):
    """Hold the key's lock while building (yield whether the cache is complete by then), so that
    two processes building the same cache do the work once: the second waits, then finds the
    manifest. Under torchrun rank 0 holds it for all the ranks, which wait for it, so `cache gc`
    leaves the build alone while the ranks split the work."""
    files.probe_writable(folder, CacheError, what="cache folder")
    with key_lock(folder, quiet) if distributed.is_main() else nullcontext():
        distributed.barrier()
        yield distributed.broadcast_object((folder / mf.MANIFEST).is_file())


def _clear(folder: Path) -> None:
    """Remove a cache's files before a forced rebuild (manifest first, so it is never half-valid)."""
    (folder / mf.MANIFEST).unlink(missing_ok=True)
    for path in folder.glob("*.h5*"):
        path.unlink()


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

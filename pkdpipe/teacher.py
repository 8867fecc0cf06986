"""Stage one, `cache_teacher`: run the teacher once over each split and cache its outputs.

Per example the cache holds the token ids, the gold label, the logits and the [CLS] vector of
every stored layer. The teacher runs under `torch.inference_mode` on length-sorted batches padded
to their own longest example; the rows are written in that sorted order, shard by shard, and a
shard is the unit of resume (and of parallel work under torchrun: rank r writes shards r, r+N, ...).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pkdpipe import __version__, distributed, files, progress
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import (
    FORMAT_VERSION,
    cache_key,
    hash_tokenizer,
    hash_weights,
    sha256_file,
    sha256_json,
)
from pkdpipe.cache.local import key_lock
from pkdpipe.cache.writer import ShardWriter
from pkdpipe.config import CacheConfig, to_dict
from pkdpipe.data import load_split
from pkdpipe.errors import CacheError, ConfigError, ModelError
from pkdpipe.metrics import compute_metrics, predictions_from_logits
from pkdpipe.models import (
    autocast,
    hidden_size,
    load_classifier,
    load_tokenizer,
    num_layers,
    pick_device,
    pretrained_origin,
)
from pkdpipe.tasks import Task, get_task
from pkdpipe.text import TRUNCATION, Encoded, collate, encode, length_sorted_order, pad_id_of


@dataclass
class CacheResult:
    path: Path  # the cache folder
    key: str
    hit: bool  # True when a complete cache was found (locally or in the store) and nothing ran
    manifest: dict
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


def cache_teacher(config: CacheConfig) -> CacheResult:
    """Build (or find) the cache for `config`; return where it is and whether it was a hit."""
    distributed.init(config.device)
    autocast(pick_device(config.device), config.precision)  # fp16 on CPU fails here, before any work
    started = time.time()
    task = get_task(config.task)
    for split in config.splits:
        if split not in task.splits:
            raise ConfigError(f"task {task.name} has no split {split!r}; it has {', '.join(task.splits)}")
    teacher_name = resolve_teacher(config, task)
    # the model first, so that a wrong --teacher reads "model not found", not "tokenizer not found"
    model = load_classifier(teacher_name, config.trust_remote_code)
    tokenizer = load_tokenizer(teacher_name, config.trust_remote_code)
    if model.config.num_labels != task.num_labels:
        raise ModelError(
            f"teacher {teacher_name} has {model.config.num_labels} labels but task {task.name} has "
            f"{task.num_labels}: fine-tune a teacher for this task first"
        )
    depth = num_layers(model.config)
    layers = config.layers if config.layers is not None else tuple(range(depth + 1))
    if not layers or min(layers) < 0 or max(layers) > depth:
        raise ConfigError(
            f"--layers must be within 0..{depth} for this {depth}-layer teacher; got {list(layers)}"
        )

    examples = {split: load_split(task, split, config.data_dir) for split in config.splits}
    fingerprints = {
        "task": task.fingerprint_dict(),
        "teacher_weights": hash_weights(model),
        "tokenizer": hash_tokenizer(tokenizer),
        "datasets": {split: sha256_json(ex.fingerprint_dict()) for split, ex in examples.items()},
        "max_seq_len": config.max_seq_len,
        "truncation": TRUNCATION,
        "layers": list(layers),
        "hidden_dtype": config.dtype,
        "logits_dtype": "float32",
        "precision": config.precision,  # bf16/fp16 autocast changes the stored values
    }
    key = cache_key(fingerprints)
    folder = config.cache_dir / task.name / key
    fingerprint_seconds = time.time() - started

    if not config.force and (folder / mf.MANIFEST).is_file():
        return CacheResult(folder, key, hit=True, manifest=mf.read(folder))
    if config.store and not config.force:
        from pkdpipe.cache.store import pull_if_present  # fsspec only when a store is used

        pulled = pull_if_present(config.store, task.name, key, config.cache_dir, quiet=config.quiet)
        if pulled is not None:
            return CacheResult(pulled, key, hit=True, manifest=mf.read(pulled), pulled=True)

    device = pick_device(config.device)
    model.to(device).eval()
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
            splits_info[split] = _cache_split(
                split, encoded, model, tokenizer, layers, folder, config, task, device
            )
            timings[f"{split}_s"] = round(time.time() - t0, 2)
        distributed.barrier()
        if distributed.is_main():
            manifest = _manifest(
                config, task, teacher_name, model, key, fingerprints, layers, splits_info, folder
            )
            manifest["timings"] = {**timings, "total_s": round(time.time() - started, 2)}
            mf.write(folder, manifest)
        distributed.barrier()
    result = CacheResult(folder, key, hit=False, manifest=mf.read(folder))
    if config.push and distributed.is_main():
        from pkdpipe.cache.store import push

        push(folder, config.store, quiet=config.quiet)
    return result


def _cache_split(split, encoded: Encoded, model, tokenizer, layers, folder, config, task, device) -> dict:
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
        if mine and not _finished(path, encoded.ids[rows]):
            todo.append((path, rows))
    total = sum(len(rows) for _, rows in todo)
    with progress.bar(f"teacher {split}", total, quiet=config.quiet) as bar:
        for path, rows in todo:
            _write_shard(
                path, rows, lengths[rows], encoded, model, tokenizer, layers, config, task, device, bar
            )
    return {"examples": len(order), "shards": plan}


def _finished(path: Path, ids: np.ndarray) -> bool:
    """True when `path` is a finished shard holding exactly these example ids, in this order.

    A shard from an interrupted run with another --shard-size can have the same name but other
    rows (the shard size is not part of the key: it does not change the values); it is rewritten."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return np.array_equal(f["example_id"][:], ids)
    except (OSError, KeyError):
        return False


def _write_shard(
    path, rows, lengths, encoded: Encoded, model, tokenizer, layers, config, task, device, bar
) -> None:
    writer = ShardWriter(
        path,
        encoded.ids[rows],
        lengths,
        num_labels=task.num_labels,
        hidden_size=hidden_size(model.config),
        layers=layers,
        hidden_dtype=config.dtype,
        regression=task.is_regression,
        with_token_types=encoded.token_type_ids is not None,
    )
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
            hidden = {i: out.hidden_states[i][:, 0].float().cpu().numpy() for i in layers}
            writer.write(ids, types, _labels(encoded, batch_rows, task), logits, hidden)
            bar.advance(len(batch_rows))
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _labels(encoded: Encoded, rows, task: Task) -> np.ndarray:
    if encoded.labels is None:
        return np.full(len(rows), np.nan if task.is_regression else -1)
    return encoded.labels[rows]


def _manifest(config, task, teacher_name, model, key, fingerprints, layers, splits_info, folder) -> dict:
    for info in splits_info.values():
        for shard in info["shards"]:
            path = folder / shard["file"]
            shard["sha256"] = sha256_file(path)
            shard["bytes"] = path.stat().st_size
    return {
        "format": mf.FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key": key,
        "task": task.name,
        "task_spec": fingerprints["task"],
        "label_names": list(task.labels) if task.labels is not None else None,
        "num_labels": task.num_labels,
        "teacher": {
            "name_or_path": str(teacher_name),
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "num_layers": num_layers(model.config),
            "hidden_size": hidden_size(model.config),
            "pretrained_from": pretrained_origin(teacher_name) if Path(teacher_name).is_dir() else None,
            "weights_sha256": fingerprints["teacher_weights"],
        },
        "tokenizer_sha256": fingerprints["tokenizer"],
        "dataset": {
            "source": str(config.data_dir or (task.task_dir if task.hub_name is None else "huggingface-hub")),
            "sha256": fingerprints["datasets"],
        },
        "max_seq_len": config.max_seq_len,
        "truncation": TRUNCATION,
        "uses_token_type_ids": "token_type_ids" in _first_shard_keys(folder, splits_info),
        "layers": list(layers),
        "hidden_dtype": config.dtype,
        "logits_dtype": "float32",
        "precision": config.precision,
        "splits": splits_info,
        "teacher_metrics": _teacher_metrics(folder, task, splits_info),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "command": config.command or " ".join(sys.argv),
        "config": to_dict(config),
    }


def _first_shard_keys(folder: Path, splits_info: dict) -> set[str]:
    import h5py

    first = next(iter(splits_info.values()))["shards"][0]["file"]
    with h5py.File(folder / first, "r") as f:
        return set(f.keys())


def _teacher_metrics(folder: Path, task: Task, splits_info: dict) -> dict:
    """The teacher's metrics on each labelled split other than train, read back from the shards."""
    import h5py

    metrics = {}
    for split, info in splits_info.items():
        if split == "train":
            continue
        logits, labels = [], []
        for shard in info["shards"]:
            with h5py.File(folder / shard["file"], "r") as f:
                logits.append(f["logits"][:])
                labels.append(f["labels"][:])
        labels_all = np.concatenate(labels)
        if (
            task.is_regression
            and np.isnan(labels_all).all()
            or not task.is_regression
            and (labels_all < 0).all()
        ):
            continue
        preds = predictions_from_logits(task, np.concatenate(logits))
        metrics[split] = compute_metrics(task, preds, labels_all)
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
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    examples = sum(info["examples"] for info in manifest["splits"].values())
    size = sum(s["bytes"] for s in shards)
    return {
        "path": str(result.path),
        "key": result.key,
        "examples": examples,
        "shards": len(shards),
        "bytes": size,
        "bytes_per_example": size / max(examples, 1),
        "seconds": manifest.get("timings", {}).get("total_s"),
        "teacher_metrics": manifest.get("teacher_metrics", {}),
    }


__all__ = ["CacheResult", "cache_teacher", "describe"]

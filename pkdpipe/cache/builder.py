"""`CacheBuilder`: the one writer of a cache folder. The teacher pass computes, the builder stores.

The teacher pass (`pkdpipe.teacher`) hands the builder what made the cache (the key's inputs, the
teacher's record) and then rows, batch by batch; the builder owns everything on disk:

- where the cache goes, `<root>/<task>/<key>/` (`local.cache_folder`), its lock, whether it is
  already complete here or in a store, and its push to a store once built;
- each split's plan (`plan`): rows in storage order (by length, then example id), cut into shards
  of `shard_size` rows named by `manifest.shard_name`. Under torchrun rank r writes shards r, r+N,
  ...; a shard already finished with exactly its planned rows is kept, not rewritten (the resume);
- each shard's staging (`shard`): the rows go into a `ShardWriter` and reach the disk, under the
  shard's final name, only once all of them are there;
- the typed manifest (`finish`), written last: its shard entries (`shard_entry`, the one place a
  per-shard field is added), the teacher's metrics read back from the shards, and the statistics
  and codec the `schema.Layout` fixes for every shard.

No torch here: the teacher pass's model side (loading, batching, the forward pass, picking the
[CLS] vectors, hashing weights) stays in `pkdpipe.teacher`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pkdpipe import __version__, faults, files
from pkdpipe.cache import extents, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import FORMAT_VERSION
from pkdpipe.cache.local import cache_folder, key_lock
from pkdpipe.cache.reader import read_shard
from pkdpipe.cache.writer import ShardWriter
from pkdpipe.errors import CacheError, DiskFullError
from pkdpipe.metrics import Task, compute_metrics, predictions_from_logits  # Task: what scoring needs of one


@dataclass(frozen=True)
class PlannedShard:
    index: int  # its place in the split
    path: Path  # its final name in the cache folder
    rows: np.ndarray  # positions in the split (as handed to `plan`), in storage order
    todo: bool  # this rank writes it, and it is not finished yet


@dataclass(frozen=True)
class SplitPlan:
    split: str
    ids: np.ndarray  # example ids, per position in the split
    lengths: np.ndarray  # token counts, per position
    shards: tuple[PlannedShard, ...]

    @property
    def todo(self) -> list[PlannedShard]:
        """The shards this rank still writes."""
        return [shard for shard in self.shards if shard.todo]


@dataclass(frozen=True)
class Origin:
    """What the manifest records of how the cache was made, beyond its key's inputs."""

    data_source: str  # the data folder, or "huggingface-hub"
    train_rows: int | None  # a seeded sample of the train split (--train-rows); None: all of it
    vocab_size: int  # every cached token id is below it (verify checks)
    command: str
    config: dict  # the resolved settings, informative
    started: float  # time.time() when the run began: the manifest's total_s counts from it


class CacheBuilder:
    """Builds the cache of `inputs` for `task` under the cache root `root`, in `folder`; `teacher` is
    the manifest's record of the model that computes its rows."""

    def __init__(
        self,
        root: str | Path | None,
        task: Task,
        inputs: mf.KeyInputs,
        teacher: mf.Teacher,
        with_token_types: bool,
        shard_size: int,
        quiet: bool = False,
    ):
        self.task = task
        self.inputs = inputs
        self.teacher = teacher
        self.key = inputs.key()
        self.root = root
        self.folder = cache_folder(root, task.name, self.key)
        self.shard_size = shard_size
        self.quiet = quiet
        self.layout = schema.Layout(
            num_labels=task.num_labels,
            hidden_size=teacher.hidden_size,
            layers=tuple(inputs.layers),
            hidden_dtype=inputs.hidden_dtype,
            regression=task.is_regression,
            with_token_types=with_token_types,
            with_stats=True,
            codec=inputs.codec,
        )

    # -- finding and locking --------------------------------------------------------------------
    def complete(self) -> bool:
        """Whether the cache is there whole (its manifest is written last)."""
        return (self.folder / mf.MANIFEST).is_file()

    def manifest(self) -> mf.Manifest:
        return mf.read(self.folder)

    def find(self, store: str | None = None) -> str | None:
        """ "here" when the cache is complete in the cache root, "pulled" when `store` had it complete
        and it has just been pulled into the cache root, None when neither."""
        if self.complete():
            return "here"
        if store:
            from pkdpipe.cache.store import pull_if_present  # fsspec only when a store is used

            if pull_if_present(store, self.task.name, self.key, self.root, quiet=self.quiet) is not None:
                return "pulled"
        return None

    def push(self, store: str) -> str:
        """Publish the complete cache to `store` (`pkdpipe.cache.store.push`); return its URL there."""
        from pkdpipe.cache.store import push  # fsspec only when a store is used

        return push(self.folder, store, quiet=self.quiet)

    @contextmanager
    def lock(self, hold: bool = True) -> Iterator[None]:
        """Hold the key's lock while building, so that two processes building the same cache do the
        work once (the second waits, then finds the manifest). `hold=False`: a torchrun rank whose
        build rank 0's lock covers (so `cache gc` leaves it alone while the ranks split the work)."""
        files.probe_writable(self.folder, CacheError, what="cache folder")
        with key_lock(self.folder, self.quiet) if hold else nullcontext():
            yield

    def clear(self) -> None:
        """Remove the cache's files before a forced rebuild (manifest first, so it is never half-valid)."""
        (self.folder / mf.MANIFEST).unlink(missing_ok=True)
        for path in self.folder.glob("*.h5*"):
            path.unlink()

    # -- shards -----------------------------------------------------------------------------------
    def plan(
        self, split: str, ids: np.ndarray, lengths: np.ndarray, rank: int = 0, world: int = 1
    ) -> SplitPlan:
        """The shards of `split` (example `ids` and token `lengths` per position) and which of them
        rank `rank` of `world` still writes. Rows are stored sorted by (length, example id):
        deterministic, so every rank and every run agrees, and the teacher's batches pad little."""
        order = np.lexsort((ids, lengths))
        count = max(1, -(-len(order) // self.shard_size))
        shards = []
        for index in range(count):
            rows = order[index * self.shard_size : (index + 1) * self.shard_size]
            path = self.folder / mf.shard_name(split, index, count)
            todo = index % world == rank and not self._finished(path, ids[rows])
            shards.append(PlannedShard(index, path, rows, todo))
        return SplitPlan(split, ids, lengths, tuple(shards))

    def _finished(self, path: Path, ids: np.ndarray) -> bool:
        """True when `path` is a finished shard holding exactly these example ids, in this order, and
        every dataset the layout names.

        A shard from an interrupted run with another --shard-size can have the same name but other
        rows (the shard size is not part of the key: it does not change the values), and one left by
        an older pkdpipe has no per-layer statistics; either is rewritten."""
        if not path.is_file():
            return False
        layout = self.layout
        extra = [schema.cls_stats(layer) for layer in layout.layers] if layout.with_stats else []
        try:
            return np.array_equal(read_shard(path, schema.EXAMPLE_ID, *extra)[schema.EXAMPLE_ID], ids)
        except CacheError:
            return False

    @contextmanager
    def shard(self, plan: SplitPlan, shard: PlannedShard) -> Iterator[ShardWriter]:
        """A writer for the rows of `shard`, in its order (`ShardWriter.write`, batch by batch): the
        shard is written under its final name when the block ends, dropped when it raises."""
        writer = ShardWriter(shard.path, plan.ids[shard.rows], plan.lengths[shard.rows], self.layout)
        try:
            try:
                yield writer
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        except DiskFullError:
            left = [s for s in plan.todo if s.index >= shard.index]
            need = sum(self.layout.nbytes(len(s.rows), int(plan.lengths[s.rows].sum())) for s in left)
            raise DiskFullError(
                f"no space left on device while writing {shard.path}: free {math.ceil(need / 2**20):,} MB "
                "(or use --cache-dir elsewhere) and rerun; finished shards are kept"
            ) from None
        faults.point("shard-written")

    # -- the manifest -----------------------------------------------------------------------------
    def finish(self, plans: dict[str, SplitPlan], origin: Origin, timings: dict) -> mf.Manifest:
        """Write the manifest once every shard of `plans` is on disk (under torchrun: on rank 0, after
        the others), dropping shards an interrupted run with another --shard-size left under other
        names; return it as a reader reads it."""
        planned = {shard.path.name for plan in plans.values() for shard in plan.shards}
        for path in self.folder.glob("*.h5"):
            if path.name not in planned:
                path.unlink()
        splits = {
            split: mf.Split(len(plan.ids), tuple(shard_entry(s.path, len(s.rows)) for s in plan.shards))
            for split, plan in plans.items()
        }
        manifest = self._manifest(splits, origin)  # checksums and metrics first: total_s counts them
        total = {**timings, "total_s": round(time.time() - origin.started, 2)}
        mf.write(self.folder, dataclasses.replace(manifest, timings=total))
        return self.manifest()

    def _manifest(self, splits: dict[str, mf.Split], origin: Origin) -> mf.Manifest:
        """The manifest: each key input in its documented field (see `KeyInputs.of`)."""
        task, inputs, layout = self.task, self.inputs, self.layout
        return mf.Manifest(
            format=mf.FORMAT_NAME,
            format_version=FORMAT_VERSION,
            key=self.key,
            task=task.name,
            task_spec=inputs.task,
            label_names=list(task.labels) if task.labels is not None else None,
            num_labels=task.num_labels,
            teacher=self.teacher,
            tokenizer_sha256=inputs.tokenizer,
            dataset=mf.Dataset(origin.data_source, inputs.datasets, origin.train_rows),
            max_seq_len=inputs.max_seq_len,
            truncation=inputs.truncation,
            uses_token_type_ids=layout.with_token_types,
            layers=inputs.layers,
            hidden_dtype=inputs.hidden_dtype,
            codec=inputs.codec,
            logits_dtype=inputs.logits_dtype,
            precision=inputs.precision,
            splits=splits,
            cls_stats=layout.with_stats,
            teacher_metrics=self._teacher_metrics(splits),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tool_version=__version__,
            command=origin.command,
            config=origin.config,
            vocab_size=origin.vocab_size,
        )

    def _teacher_metrics(self, splits: dict[str, mf.Split]) -> dict:
        """The teacher's metrics on each labelled split other than train, read back from the shards."""
        task, metrics = self.task, {}
        for split, info in splits.items():
            if split == "train":
                continue
            parts = [read_shard(self.folder / s.file, schema.LOGITS, schema.LABELS) for s in info.shards]
            labels = np.concatenate([p[schema.LABELS] for p in parts])
            if np.isnan(labels).all() if task.is_regression else (labels < 0).all():
                continue
            preds = predictions_from_logits(task, np.concatenate([p[schema.LOGITS] for p in parts]))
            metrics[split] = compute_metrics(task, preds, labels)
        return metrics


def shard_entry(path: Path, rows: int) -> mf.Shard:
    """A finished shard's entry in the manifest, from its file: one this process wrote, another
    rank wrote, or an earlier run left finished. Every shard entry is made here: the file's sha256
    and each dataset's byte range and sha256 come from one read (`pkdpipe.cache.extents`)."""
    sha256, datasets = extents.record(path)
    if datasets is not None:
        datasets = {name: mf.Extent(**extent) for name, extent in datasets.items()}
    return mf.Shard(file=path.name, rows=rows, sha256=sha256, bytes=path.stat().st_size, datasets=datasets)


__all__ = ["CacheBuilder", "Origin", "PlannedShard", "SplitPlan", "shard_entry"]

"""Reading a teacher cache: open by folder or key, list splits, read rows, stream batches.

`distill` streams with bounded memory. An epoch is a fresh uniform shuffle of all rows of the split,
drawn from (seed, epoch) (`pkdpipe.batching`), so every rank, and a resumed run, computes the same
order without storing it. The reader gathers a window of batches' rows at a time, sorted, in one
read per shard and dataset, and only the hidden layers the layer map needs; the window's token ids
are read with it, the rows it needs and no others. Caches written since pkdpipe 0.2 store every
dataset contiguously, where such a read costs about 2 ms for 1,600 rows of a 768-wide layer;
older caches (256-row chunks) read the same way, several times slower.

Memory does not grow with the cache: nothing is kept per row (the epoch's order is the only array
as long as the split), and at most `OPEN_SHARDS` shard files are open at once, each opened when a
read needs it and the least recently used closed. (Keeping every shard open and every token id in
memory cost about 0.5 MB a shard plus 100 B a row: 1.3 GB at MNLI's size.)

Every shard's sha256 is checked against the manifest the first time this process opens it (in a
copy pulled with --layers, each dataset's: `pkdpipe.cache.extents`); under
torchrun the ranks share that work (`verify_across_ranks`). A shard opened again after it was
closed must be the same file, unchanged since that first opening, or it is refused.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from pkdpipe.batching import plan_epoch, rank_rows
from pkdpipe.cache import codec as codecs
from pkdpipe.cache import extents, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import sha256_file
from pkdpipe.cache.local import resolve_cache
from pkdpipe.cache.stats import LayerStats, merge_all
from pkdpipe.errors import CacheError

READ_BATCHES = 50  # batches whose rows are gathered in one read: 12 MB for 5 layers x 768 x fp16
STATS_BLOCK = 8192  # rows per read when an older cache's statistics are computed: 12 MB at H = 768
OPEN_SHARDS = 8  # shard files open at once: each holds about 0.5 MB of HDF5 state, and a window reads
# its shards in order, so a larger pool saves little: reopening one costs well under a millisecond
READ_GAP = 1 << 16  # wanted spans of a dataset closer than this many elements come from one slice:
# a separate h5py read cost 0.05-0.15 ms here, about what copying 256 KB (int32) does
TOKEN_BLOCK = 1 << 20  # token ids per read when a split's range is scanned: 4 MB of int32


class TeacherCache:
    """A complete cache folder, checked on open; shards are opened (and verified) lazily, a few at a time."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.manifest = mf.read(self.path)
        self._files: OrderedDict[str, h5py.File] = OrderedDict()  # open shards, least recently used first
        self._verified: set[str] = set()  # shards whose checksum matched, here or on another rank
        self._identity: dict[str, tuple] = {}  # shard -> (device, inode, size, mtime) at its first opening
        self._pid = os.getpid()  # the process that opened `_files`

    # -- what the manifest says ------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.label_names

    @property
    def num_labels(self) -> int:
        return self.manifest.num_labels

    @property
    def hidden_size(self) -> int:
        return self.manifest.teacher.hidden_size

    @property
    def teacher_layers(self) -> int:
        return self.manifest.teacher.num_layers

    def num_examples(self, split: str) -> int:
        return self._split(split).examples

    def _split(self, split: str) -> mf.Split:
        if split not in self.manifest.splits:
            raise CacheError(f"cache {self.key} has no {split!r} split; it has {', '.join(self.splits)}")
        return self.manifest.splits[split]

    @property
    def present_layers(self) -> list[int]:
        """The layers this copy holds: all of `layers`, or those a pull with --layers fetched."""
        return list(self.manifest.present)

    def check_layers(self, layers: Sequence[int]) -> None:
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise CacheError(
                f"cache {self.key} does not store teacher layer(s) {missing}; it has {self.layers} "
                "(rebuild it with --layers all)"
            )
        absent = sorted(set(layers) - set(self.present_layers))
        if absent:
            raise CacheError(
                f"this copy of cache {self.key} was pulled with layers {self.present_layers} and lacks "
                f"{absent}: run `pkdpipe cache pull {self.key} --layers {','.join(map(str, absent))} "
                "--store URL` to add them"
            )

    # -- shard access ----------------------------------------------------------------------
    def shard(self, name: str) -> h5py.File:
        """An open shard, verified against its manifest checksum the first time. At most
        `OPEN_SHARDS` stay open (the least recently used is closed), so the handle is good until the
        next call: read what is needed from one shard before asking for another."""
        if self._pid != os.getpid():  # a forked child (a DataLoader worker): HDF5 handles do not
            self._files, self._pid = OrderedDict(), os.getpid()  # survive a fork; open its own
        if name in self._files:
            self._files.move_to_end(name)
            return self._files[name]
        while len(self._files) >= OPEN_SHARDS:  # make room first: never more open than that
            self._files.popitem(last=False)[1].close()
        self._files[name] = self._open(name)
        return self._files[name]

    def _open(self, name: str) -> h5py.File:
        """Shard `name` opened, its checksum checked first if no rank has checked it yet."""
        path = self._checksum(name) if name not in self._verified else mf.safe_file(self.path, name)
        try:
            opened = h5py.File(path, "r")
        except OSError as err:
            raise CacheError(f"cannot open {path}: {err}") from None
        problem = self._refusal(name, path, opened)
        if problem:
            opened.close()
            raise CacheError(problem)
        return opened

    def _refusal(self, name: str, path: Path, opened: h5py.File) -> str | None:
        """Why the just opened shard must not be read, or None. The first opening looks inside it
        (`schema.indirection`) and notes which file it is; a later one (the shard was closed to keep
        few open) must find that file unchanged: one replaced after its checksum matched would
        otherwise be read unverified. In a partial copy a pull of more layers replaces the shards
        while runs read them: there the datasets this run reads are checked again, in the file
        opened, and read if they match."""
        stat = os.fstat(opened.id.get_vfd_handle())
        identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if name not in self._identity:
            elsewhere = schema.indirection(opened)
            if elsewhere:
                return f"{path}: {elsewhere}, whose bytes live outside the shard: refusing to read it"
            self._identity[name] = identity
        elif self._identity[name] != identity:
            changed = f"{path} changed on disk since its checksum was checked"
            entry = next(s for s in self.manifest.shards() if s.file == name)
            if not self.manifest.partial or self._dataset_problem(opened, entry):
                return f"{changed}: refusing to read it (cache verify)"
            self._identity[name] = identity
        return None

    def _checksum(self, name: str) -> Path:
        (entry,) = [s for s in self.manifest.shards() if s.file == name]
        path = mf.safe_file(self.path, name)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise CacheError(f"{path} is not a regular file in the cache folder: refusing to read it")
        if not path.is_file():
            raise CacheError(f"cache {self.key} is missing shard {name}")
        if self.manifest.partial:  # a copy of some layers: each dataset it holds, as fetched
            self._check_datasets(path, entry)
        elif sha256_file(path) != entry.sha256:
            raise CacheError(
                f"checksum mismatch in {path}: the shard is corrupted (cache verify / pull again)"
            )
        self._verified.add(name)
        return path

    def _check_datasets(self, path: Path, entry: mf.Shard) -> None:
        """A shard of a partial copy: each dataset it should hold matches its sha256."""
        try:
            with h5py.File(path, "r") as f:
                wrong = self._dataset_problem(f, entry)
        except OSError as err:
            raise CacheError(f"cannot open {path}: {str(err).splitlines()[0]}") from None
        if wrong:
            raise CacheError(f"checksum mismatch in {path}: {wrong} (cache verify / pull again)")

    def _dataset_problem(self, f: h5py.File, entry: mf.Shard) -> str | None:
        """What is wrong with the datasets of this copy's layers in the open shard of `entry`, or None."""
        needed = extents.needed(self.manifest, entry, self.manifest.present)
        return schema.indirection(f) or extents.problem(f, entry, needed)

    def verify_across_ranks(self, splits: Sequence[str]) -> None:
        """Under torchrun: the ranks of each machine share the checksums of `splits` (rank r of N
        checks shards r, r+N, ...), so each machine reads its copy of the cache once for checking
        instead of once per rank, and a node with its own copy checks all of it. Then all ranks
        agree: if any shard fails anywhere, every rank stops with an error. One process: nothing
        to share; shards are checked lazily when first opened."""
        from pkdpipe import distributed  # torch: not for the reader's numpy-only users (cache stats)

        if distributed.world_size() == 1:
            return
        rank, ranks_here = distributed.node_rank_and_size()
        names = [s.file for split in splits for s in self._split(split).shards]
        failure = None
        for name in names[rank::ranks_here]:
            try:
                self._checksum(name)
            except (CacheError, OSError) as err:  # every rank must reach the agreement below
                failure = str(err) if isinstance(err, CacheError) else f"cannot read shard {name}: {err}"
                break
        if not distributed.all_ok(failure is None):
            raise CacheError(failure or f"cache {self.key}: another rank found a missing or corrupted shard")
        self._verified.update(names)

    def check_rows(self, split: str) -> None:
        """The split's shards hold as many rows as the manifest says, each example id once (a cache
        with a shard listed twice or copied under another name would train on rows twice), and gold
        labels in the task's range (-1, no label, only outside train): one past it would end
        training in an IndexError."""
        ids, lows, highs = [], [], []
        for s in self._split(split).shards:  # one at a time: a shard handle lasts until the next
            f = self.shard(s.file)
            ids.append(f[schema.EXAMPLE_ID][:])
            labels = f[schema.LABELS][:]
            if len(labels):
                lows.append(labels.min())
                highs.append(labels.max())
        ids = np.concatenate(ids)
        if len(ids) != self.num_examples(split):
            raise CacheError(
                f"cache {self.key}: split {split!r} holds {len(ids)} rows, the manifest says "
                f"{self.num_examples(split)} (cache verify names the shard)"
            )
        if len(np.unique(ids)) != len(ids):
            raise CacheError(f"cache {self.key}: split {split!r} holds an example id twice (cache verify)")
        if self.label_names is not None and lows:
            lowest, low, high = 0 if split == "train" else -1, min(lows), max(highs)
            if low < lowest or high >= self.num_labels:
                raise CacheError(
                    f"cache {self.key}: split {split!r} holds gold labels {low}..{high}, "
                    f"outside {lowest}..{self.num_labels - 1} (cache verify names the shard)"
                )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_rows(self, name: str, rows: np.ndarray, layers: Sequence[int]) -> dict:
        """Rows `rows` (sorted, unique positions in shard `name`) as numpy arrays."""
        f = self.shard(name)
        input_ids, token_type_ids = _token_rows(f, rows)
        out = {
            "example_id": _pick(f[schema.EXAMPLE_ID], rows),
            "labels": _pick(f[schema.LABELS], rows),
            "logits": _pick(f[schema.LOGITS], rows),
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
        }
        if layers:
            out["hidden"] = np.stack([self._vectors(f, layer, rows) for layer in layers], axis=1)
        return out

    def _vectors(self, f: h5py.File, layer: int, rows: np.ndarray) -> np.ndarray:
        """Layer `layer`'s [CLS] vectors at `rows`, as floats: int8 codes are decoded here (float32),
        with the shard's per-block offsets and scales (a few KB), so training sees vectors either way."""
        stored = _pick(f[schema.hidden(layer)], rows)
        if self.manifest.codec != codecs.INT8:
            return stored
        offset, scale = f[schema.hidden_offset(layer)][:], f[schema.hidden_scale(layer)][:]
        return codecs.decode(stored, offset, scale, rows)

    def rows(self, split: str, rows: np.ndarray, layers: Sequence[int] = ()) -> dict:
        """Rows at sorted, unique positions of a split's storage order, from whichever shards hold
        them: one read per shard and dataset (and only the hidden layers asked for)."""
        shards = self._split(split).shards
        starts = np.cumsum([0] + [s.rows for s in shards])
        parts = []
        for shard, first, stop in zip(shards, starts[:-1], starts[1:]):
            lo, hi = np.searchsorted(rows, [first, stop])
            if hi > lo:
                parts.append(self._read_rows(shard.file, rows[lo:hi] - first, layers))
        return _concat(parts)

    def read(self, split: str, layers: Sequence[int] = ()) -> dict:
        """A whole split in storage order (length-sorted): for evaluation, verification, tools."""
        self.check_layers(layers)
        parts = [
            self._read_rows(s.file, np.arange(s.rows), layers) for s in self._split(split).shards if s.rows
        ]
        if not parts:
            raise CacheError(f"cache {self.key}: split {split!r} holds no rows")
        return _concat(parts)

    # -- what each layer carries ------------------------------------------------------------
    def layer_stats(self, split: str = "train", layers: Sequence[int] | None = None) -> dict[int, LayerStats]:
        """Per-dimension statistics of each layer's [CLS] vectors over a split (`pkdpipe.cache.stats`):
        read from the shards where they store them, else computed in one pass of `STATS_BLOCK` rows
        at a time (bounded memory whatever the cache's size)."""
        layers = self.present_layers if layers is None else list(layers)
        self.check_layers(layers)
        shards = [s for s in self._split(split).shards if s.rows]
        out = {}
        for layer in layers:
            if self.manifest.cls_stats:
                parts = (
                    LayerStats.from_array(s.rows, self.shard(s.file)[schema.cls_stats(layer)][:])
                    for s in shards
                )
            else:
                parts = (
                    LayerStats.of(self.shard(s.file)[schema.hidden(layer)][start : start + STATS_BLOCK])
                    for s in shards
                    for start in range(0, s.rows, STATS_BLOCK)
                )
            out[layer] = merge_all(parts)
        if any(stats is None for stats in out.values()):
            raise CacheError(f"cache {self.key}: split {split!r} holds no rows")
        return out

    def token_range(self, split: str) -> tuple[int, int]:
        """The smallest and largest token id of a split (a student's embeddings must cover them),
        scanned `TOKEN_BLOCK` ids at a time: none is kept."""
        lows, highs = [], []
        for s in self._split(split).shards:
            ids = self.shard(s.file)[schema.INPUT_IDS]
            for start in range(0, ids.shape[0], TOKEN_BLOCK):
                block = ids[start : start + TOKEN_BLOCK]
                lows.append(int(block.min()))
                highs.append(int(block.max()))
        return min(lows), max(highs)

    # -- streaming for training ------------------------------------------------------------
    def lengths(self, split: str) -> np.ndarray:
        """Token count of every row of a split, in storage order (read from the shards each call:
        only length-grouped epochs need it, once an epoch, as long as the epoch's order)."""
        return np.concatenate(
            [np.diff(self.shard(s.file)[schema.OFFSETS][:]) for s in self._split(split).shards]
        )

    def epoch_plan(
        self,
        split: str,
        batch_size: int,
        epoch: int,
        seed: int,
        world: int = 1,
        group_by_length: bool = False,
    ) -> list[np.ndarray]:
        """The global batches of one epoch as row positions in the split: see pkdpipe.batching."""
        lengths = self.lengths(split) if group_by_length else None
        return plan_epoch(self.num_examples(split), batch_size, seed, epoch, world, lengths)

    def stream(
        self,
        split: str,
        batch_size: int,
        layers: Sequence[int],
        *,
        epoch: int,
        seed: int,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
        group_by_length: bool = False,
    ) -> Iterator[dict]:
        """Yield this rank's part of each global batch of `epoch`, from batch `skip` on.

        Rows are gathered `READ_BATCHES` batches at a time: the rows this rank needs from them,
        sorted, in one read per shard and dataset (their token ids included), so memory stays
        bounded by that window (only the layers asked for are read) whatever the size of the cache.
        """
        self.check_layers(layers)
        plan = self.epoch_plan(split, batch_size, epoch, seed, world, group_by_length)[skip:]
        for start in range(0, len(plan), READ_BATCHES):
            mine = [rank_rows(rows, rank, world) for rows in plan[start : start + READ_BATCHES]]
            wanted = np.unique(np.concatenate(mine))
            data = self.rows(split, wanted, layers)
            for rows in mine:
                yield _take(data, np.searchsorted(wanted, rows))


def read_shard(path: Path, *datasets: str) -> dict[str, np.ndarray]:
    """Whole datasets of one shard file, outside any cache (a shard being built, or checked)."""
    try:
        with h5py.File(path, "r") as f:
            return {name: f[name][:] for name in datasets}
    except (OSError, KeyError) as err:
        raise CacheError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _pick(dataset, rows: np.ndarray) -> np.ndarray:
    """`dataset[rows]` for sorted, unique rows; a plain slice when they are consecutive."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return dataset[int(rows[0]) : int(rows[-1]) + 1]
    return dataset[rows]


def _token_rows(f: h5py.File, rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The token ids (and segment ids, where the shard has them) of rows `rows` (sorted, unique) of
    the open shard `f`, read for these rows only: a window's tokens, not the shard's."""
    bounds = _gather(f[schema.OFFSETS], rows, rows + 2).reshape(-1, 2)  # each row's start and stop
    starts, stops = bounds[:, 0], bounds[:, 1]
    cuts = np.cumsum(stops - starts)[:-1]
    ids = np.split(_gather(f[schema.INPUT_IDS], starts, stops), cuts)
    if schema.TOKEN_TYPE_IDS not in f:
        return ids, None
    return ids, np.split(_gather(f[schema.TOKEN_TYPE_IDS], starts, stops), cuts)


def _gather(dataset, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The spans [starts[i], stops[i]) of a 1-D dataset, in order (starts sorted), concatenated.
    Spans less than `READ_GAP` apart come from one slice, the rest from a slice each: dense
    windows cost one read, sparse ones (a large cache) do not read the whole shard for a few rows.
    (h5py's point selection of the same tokens measured 6-25x slower for 200-1,600 rows of a
    shard, and a union of 1,600 hyperslabs slower still.)"""
    breaks = np.flatnonzero(starts[1:] - stops[:-1] > READ_GAP) + 1
    parts = []
    for group in np.split(np.arange(len(starts)), breaks):
        first = int(starts[group[0]])
        block = dataset[first : int(stops[group].max())]
        parts += [block[a - first : b - first] for a, b in zip(starts[group], stops[group])]
    return np.concatenate(parts) if parts else np.empty(0, dataset.dtype)


def _take(data: dict, idx: np.ndarray) -> dict:
    out = {}
    for k, v in data.items():
        if v is None:
            out[k] = None
        elif isinstance(v, list):
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v[idx]
    return out


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]  # one shard: nothing to join, nothing to copy
    out = {}
    for k in parts[0]:
        if parts[0][k] is None:
            out[k] = None
        elif isinstance(parts[0][k], list):
            out[k] = [x for p in parts for x in p[k]]
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    return out


def open_cache(
    path_or_key: str | Path | None = None, cache_dir: str | Path | None = None, task: str | None = None
) -> TeacherCache:
    """Open a complete cache by folder, key or (None) the newest of `task` under the cache root."""
    return TeacherCache(resolve_cache(str(path_or_key) if path_or_key else None, cache_dir, task))

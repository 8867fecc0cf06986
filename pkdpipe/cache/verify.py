"""`verify_cache`: check a cache end to end before trusting it.

Checks, per shard: the file exists (a regular file, not a link), its sha256 matches the manifest
(in a copy pulled with --layers: the sha256 of each dataset it holds, `pkdpipe.cache.extents`),
it opens as HDF5, nothing in it is a link or keeps its bytes elsewhere (external storage, a virtual
dataset), every dataset of `pkdpipe.cache.schema` is there with the shape and dtype the
manifest implies, no logit or hidden vector is NaN or inf, gold labels lie in the task's range and
token ids in the tokenizer's (`vocab_size`, where the manifest records it), int8 steps are not
negative, and each layer's stored statistics (`cls_stats/<layer>`) are those of its vectors
(decoded, with the int8 codec). Per split: example ids are unique and as many as the manifest
says, train is labelled throughout, another split wholly or not at all. The manifest itself is
checked against its schema, and its key against its inputs, when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pkdpipe.cache import codec as codecs
from pkdpipe.cache import extents, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import sha256_file
from pkdpipe.cache.stats import Accumulator, LayerStats
from pkdpipe.errors import CacheError


@dataclass
class VerifyReport:
    path: Path
    shards_checked: int = 0
    rows_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(folder: str | Path, checksums: bool = True) -> VerifyReport:
    """Every check above; problems are collected, not raised, so one run lists them all.
    A folder without a readable, valid manifest raises CacheError. `checksums=False` skips the
    sha256s (a pull has just matched them while downloading)."""
    folder = Path(folder)
    manifest = mf.read(folder)
    layout = schema.Layout.of(manifest)
    report = VerifyReport(folder)
    for split, info in manifest.splits.items():
        rows = []
        for shard in info.shards:
            rows.append(_check_shard(folder, shard, manifest, layout, report, checksums))
            report.shards_checked += 1
        found = [r for r in rows if r is not None]
        ids = np.concatenate([r.ids for r in found]) if found else np.array([])
        if len(np.unique(ids)) != len(ids):
            report.problems.append(f"{split}: example ids are not unique")
        if len(ids) != info.examples:
            report.problems.append(f"{split}: found {len(ids)} rows, the manifest says {info.examples}")
        unlabelled = sum(r.unlabelled for r in found)
        if split == "train" and unlabelled:
            report.problems.append(
                f"train: {unlabelled} row(s) have no gold label: a student cannot learn from them"
            )
        elif 0 < unlabelled < len(ids):
            report.problems.append(
                f"{split}: {unlabelled} of {len(ids)} rows have no gold label (a split is labelled or not)"
            )
    return report


@dataclass
class _Rows:
    """What a split's checks need of one shard."""

    ids: np.ndarray
    unlabelled: int  # rows whose label is -1 (NaN for regression): an unlabelled split, like GLUE's test


def _check_shard(
    folder: Path,
    shard: mf.Shard,
    manifest: mf.Manifest,
    layout: schema.Layout,
    report: VerifyReport,
    checksums: bool,
) -> _Rows | None:
    try:
        path = mf.safe_file(folder, shard.file)
    except CacheError as err:
        report.problems.append(str(err))
        return None
    if path.is_symlink() or (path.exists() and not path.is_file()):
        report.problems.append(f"{path.name}: not a regular file in the cache folder")
        return None
    if not path.is_file():
        report.problems.append(f"{path.name}: missing")
        return None
    if checksums and not manifest.partial and sha256_file(path) != shard.sha256:
        report.problems.append(f"{path.name}: checksum mismatch (corrupted or truncated)")
    try:
        with h5py.File(path, "r") as f:
            if checksums and manifest.partial and not schema.indirection(f):  # what was fetched, each
                wrong = extents.problem(f, shard, extents.needed(manifest, shard, manifest.present))
                if wrong:
                    report.problems.append(f"{wrong}: checksum mismatch")
            return _check_arrays(f, path.name, shard.rows, layout, manifest.vocab_size, report)
    except (OSError, KeyError, ValueError, CacheError) as err:
        report.problems.append(f"{path.name}: unreadable ({str(err).splitlines()[0]})")
        return None


def _check_arrays(
    f: h5py.File, name: str, rows: int, layout: schema.Layout, vocab: int | None, report: VerifyReport
):
    elsewhere = schema.indirection(f)
    if elsewhere:  # nothing of it is read: its bytes could be any file of this machine
        report.problems.append(f"{name}: {elsewhere}, whose bytes live outside the shard")
        return None
    before = len(report.problems)
    tokens = f[schema.INPUT_IDS].shape[0] if schema.INPUT_IDS in f else 0
    for dataset, (shape, dtype) in layout.datasets(rows, tokens).items():
        if dataset not in f:
            report.problems.append(f"{name}: no dataset {dataset}")
        elif f[dataset].shape != shape:
            report.problems.append(f"{name}: {dataset} has shape {f[dataset].shape}, expected {shape}")
        elif f[dataset].dtype != dtype:
            report.problems.append(f"{name}: {dataset} holds {f[dataset].dtype}, expected {dtype}")
    if len(report.problems) > before:  # this shard's layout is wrong: its rows cannot be trusted
        return None
    offsets = f[schema.OFFSETS][:]
    if offsets[-1] != tokens or np.any(np.diff(offsets) <= 0):
        report.problems.append(f"{name}: token offsets do not match input_ids")
    non_finite, negative, wrong_stats = [], [], []
    if not all(_finite(block) for _, block in _blocks(f[schema.LOGITS])):
        non_finite.append(schema.LOGITS)
    for layer in layout.layers:  # each layer's vectors read once: NaN/inf and statistics together
        bad, negative_step, stats_differ = _check_layer(f, layer, layout)
        non_finite += bad
        negative += [schema.hidden_scale(layer)] if negative_step else []
        wrong_stats += [schema.cls_stats(layer)] if stats_differ else []
    report.problems += [f"{name}: {dataset} holds NaN or inf" for dataset in non_finite]
    report.problems += [f"{name}: {dataset} holds a negative step" for dataset in negative]
    report.problems += [f"{name}: {stats} is not the statistics of its vectors" for stats in wrong_stats]
    unlabelled = _check_labels(f[schema.LABELS][:], name, layout, report)
    tokens = f[schema.INPUT_IDS][:]
    if len(tokens) and (tokens.min() < 0 or (vocab is not None and tokens.max() >= vocab)):
        report.problems.append(
            f"{name}: input_ids hold token ids outside 0..{vocab - 1 if vocab else 'the vocabulary'}"
            f" ({tokens.min()} to {tokens.max()})"
        )
    report.rows_checked += rows
    return _Rows(f[schema.EXAMPLE_ID][:], unlabelled)


READ_ROWS = 4096  # rows per read of a shard's vectors: bounded memory on big shards


def _blocks(dataset: h5py.Dataset):
    """(first row, values) of `dataset`, `READ_ROWS` rows at a time."""
    for start in range(0, dataset.shape[0], READ_ROWS):
        yield start, dataset[start : start + READ_ROWS]


def _check_layer(f: h5py.File, layer: int, layout: schema.Layout) -> tuple[list[str], bool, bool]:
    """One layer's vectors, read once: (its datasets that hold NaN or inf, whether an int8 step is
    negative, whether its stored statistics differ from those of its vectors). The statistics are
    compared only when every value is finite (NaN is reported once, as NaN)."""
    bad, negative = [], False
    if layout.codec == codecs.INT8:  # the codes are integers; their offsets and steps are floats
        offset = f[schema.hidden_offset(layer)][:]
        scale = f[schema.hidden_scale(layer)][:]
        bad = [
            d
            for d, a in ((schema.hidden_offset(layer), offset), (schema.hidden_scale(layer), scale))
            if not _finite(a)
        ]
        negative = bool((scale < 0).any())  # NaN compares False: reported as NaN
    stats = None
    if layout.with_stats and not bad:
        stored = f[schema.cls_stats(layer)][:]
        stats = Accumulator(layout.hidden_size, LayerStats.from_array(0, stored))
    if stats is None and layout.codec == codecs.INT8:  # integer codes: nothing else to check
        return bad, negative, False
    for start, block in _blocks(f[schema.hidden(layer)]):
        if layout.codec == codecs.INT8:
            block = codecs.decode(block, offset, scale, np.arange(start, start + len(block)))
        elif not _finite(block):
            return [schema.hidden(layer)], negative, False
        if stats is not None:
            stats.add(block)
    differ = stats is not None and not np.allclose(stored, stats.result().to_array(), 1e-6, 1e-9)
    return bad, negative, differ


def _finite(values: np.ndarray) -> bool:
    """No NaN or inf among `values`. float16 by its bits (exponent all ones: inf or NaN), 5x faster
    than np.isfinite, which converts each value."""
    if values.dtype == np.float16 and values.size:
        return int(np.bitwise_and(values.view(np.uint16), 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(values).all())


def _check_labels(labels: np.ndarray, name: str, layout: schema.Layout, report: VerifyReport) -> int:
    """Gold labels in range (a label past the task's would end training in an IndexError, and one
    inside it but wrong can only be caught by `--recompute` against the data); the unlabelled count."""
    if layout.regression:
        if np.isinf(labels).any():
            report.problems.append(f"{name}: labels hold inf")
        return int(np.isnan(labels).sum())
    bad = (labels < -1) | (labels >= layout.num_labels)
    if bad.any():
        example = int(labels[bad][0])
        report.problems.append(
            f"{name}: {int(bad.sum())} label(s) outside 0..{layout.num_labels - 1} (e.g. {example})"
        )
    return int((labels == -1).sum())

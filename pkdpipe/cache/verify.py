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
from pkdpipe.cache.stats import LayerStats
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
    non_finite = set()
    vectors = {layer: _vector_datasets(layout, layer) for layer in layout.layers}
    for dataset in [schema.LOGITS, *(name for names in vectors.values() for name in names)]:
        for start in range(0, rows, 4096):  # bounded memory on big shards
            if not np.isfinite(f[dataset][start : start + 4096]).all():
                report.problems.append(f"{name}: {dataset} holds NaN or inf")
                non_finite.add(dataset)
                break
    for layer in layout.layers if layout.codec == codecs.INT8 else ():
        if (f[schema.hidden_scale(layer)][:] < 0).any():  # NaN compares False: reported above
            report.problems.append(f"{name}: {schema.hidden_scale(layer)} holds a negative step")
    if layout.with_stats:  # a layer with NaN is reported once, above
        for layer in (layer for layer in layout.layers if non_finite.isdisjoint(vectors[layer])):
            stored = f[schema.cls_stats(layer)][:]
            vectors_now = schema.read_hidden(f, layer, layout.codec)
            if not np.allclose(stored, LayerStats.of(vectors_now).to_array(), 1e-6, 1e-9):
                wrong = schema.cls_stats(layer)
                report.problems.append(f"{name}: {wrong} is not the statistics of its vectors")
    unlabelled = _check_labels(f[schema.LABELS][:], name, layout, report)
    tokens = f[schema.INPUT_IDS][:]
    if len(tokens) and (tokens.min() < 0 or (vocab is not None and tokens.max() >= vocab)):
        report.problems.append(
            f"{name}: input_ids hold token ids outside 0..{vocab - 1 if vocab else 'the vocabulary'}"
            f" ({tokens.min()} to {tokens.max()})"
        )
    report.rows_checked += rows
    return _Rows(f[schema.EXAMPLE_ID][:], unlabelled)


def _vector_datasets(layout: schema.Layout, layer: int) -> list[str]:
    """The datasets that hold layer `layer`'s vectors: with int8, the codes and their offsets and steps."""
    if layout.codec == codecs.INT8:
        return [schema.hidden(layer), schema.hidden_offset(layer), schema.hidden_scale(layer)]
    return [schema.hidden(layer)]


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

"""`verify_cache`: check a cache end to end before trusting it.

Checks, per shard: the file exists (a regular file, not a link), its sha256 matches the manifest,
it opens as HDF5, every dataset of `pkdpipe.cache.schema` is there with the shape and dtype the
manifest implies, no logit or hidden vector is NaN or inf, and each layer's stored statistics
(`cls_stats/<layer>`) are those of its vectors. Per split: example ids are unique and as
many as the manifest says. The manifest itself is checked against its schema, and its key against
its inputs, when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pkdpipe.cache import manifest as mf
from pkdpipe.cache import schema
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
        ids = []
        for shard in info.shards:
            ids.append(_check_shard(folder, shard, layout, report, checksums))
            report.shards_checked += 1
        found = [i for i in ids if i is not None]
        ids = np.concatenate(found) if found else np.array([])
        if len(np.unique(ids)) != len(ids):
            report.problems.append(f"{split}: example ids are not unique")
        if len(ids) != info.examples:
            report.problems.append(f"{split}: found {len(ids)} rows, the manifest says {info.examples}")
    return report


def _check_shard(folder: Path, shard: mf.Shard, layout: schema.Layout, report: VerifyReport, checksums: bool):
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
    if checksums and sha256_file(path) != shard.sha256:
        report.problems.append(f"{path.name}: checksum mismatch (corrupted or truncated)")
    try:
        with h5py.File(path, "r") as f:
            return _check_arrays(f, path.name, shard.rows, layout, report)
    except (OSError, KeyError, ValueError) as err:
        report.problems.append(f"{path.name}: unreadable ({str(err).splitlines()[0]})")
        return None


def _check_arrays(f: h5py.File, name: str, rows: int, layout: schema.Layout, report: VerifyReport):
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
    for dataset in [schema.LOGITS, *(schema.hidden(layer) for layer in layout.layers)]:
        for start in range(0, rows, 4096):  # bounded memory on big shards
            if not np.isfinite(f[dataset][start : start + 4096]).all():
                report.problems.append(f"{name}: {dataset} holds NaN or inf")
                non_finite.add(dataset)
                break
    if layout.with_stats:  # a layer with NaN is reported once, above
        for layer in (layer for layer in layout.layers if schema.hidden(layer) not in non_finite):
            stored = f[schema.cls_stats(layer)][:]
            if not np.allclose(stored, LayerStats.of(f[schema.hidden(layer)][:]).to_array(), 1e-6, 1e-9):
                wrong = schema.cls_stats(layer)
                report.problems.append(f"{name}: {wrong} is not the statistics of its vectors")
    report.rows_checked += rows
    return f[schema.EXAMPLE_ID][:]

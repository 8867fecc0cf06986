"""`verify_cache`: check a cache end to end before trusting it.

Checks, per shard: the file exists, its sha256 matches the manifest, it opens as HDF5, every
dataset has the row count and width the manifest implies, and no logit or hidden vector is NaN or
inf. Per split: example ids are unique and as many as the manifest says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import sha256_file
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


def verify_cache(folder: str | Path) -> VerifyReport:
    """Every check above; problems are collected, not raised, so one run lists them all.
    A folder without a readable, valid manifest raises CacheError."""
    folder = Path(folder)
    manifest = mf.read(folder)
    report = VerifyReport(folder)
    hidden = manifest["teacher"]["hidden_size"]
    for split, info in manifest["splits"].items():
        ids = []
        for shard in info["shards"]:
            ids.append(_check_shard(folder, shard, manifest, hidden, report))
            report.shards_checked += 1
        ids = np.concatenate([i for i in ids if i is not None]) if any(i is not None for i in ids) else np.array([])
        if len(np.unique(ids)) != len(ids):
            report.problems.append(f"{split}: example ids are not unique")
        if len(ids) != info["examples"]:
            report.problems.append(f"{split}: found {len(ids)} rows, the manifest says {info['examples']}")
    return report


def _check_shard(folder: Path, shard: dict, manifest: dict, hidden: int, report: VerifyReport):
    try:
        path = mf.safe_file(folder, shard["file"])
    except CacheError as err:
        report.problems.append(str(err))
        return None
    if not path.is_file():
        report.problems.append(f"{path.name}: missing")
        return None
    if sha256_file(path) != shard["sha256"]:
        report.problems.append(f"{path.name}: checksum mismatch (corrupted or truncated)")
    try:
        with h5py.File(path, "r") as f:
            return _check_arrays(f, path.name, shard["rows"], manifest, hidden, report)
    except (OSError, KeyError, ValueError) as err:
        report.problems.append(f"{path.name}: unreadable ({str(err).splitlines()[0]})")
        return None


def _check_arrays(f: h5py.File, name: str, rows: int, manifest: dict, hidden: int, report: VerifyReport):
    expected = {"example_id": (rows,), "labels": (rows,), "logits": (rows, manifest["num_labels"])}
    expected |= {f"hidden/{layer}": (rows, hidden) for layer in manifest["layers"]}
    expected["offsets"] = (rows + 1,)
    for dataset, shape in expected.items():
        if dataset not in f:
            report.problems.append(f"{name}: no dataset {dataset}")
        elif f[dataset].shape != shape:
            report.problems.append(f"{name}: {dataset} has shape {f[dataset].shape}, expected {shape}")
    if any(p.startswith(f"{name}: no dataset") or "has shape" in p for p in report.problems):
        return None
    offsets = f["offsets"][:]
    if offsets[-1] != f["input_ids"].shape[0] or np.any(np.diff(offsets) <= 0):
        report.problems.append(f"{name}: token offsets do not match input_ids")
    for dataset in ["logits", *(f"hidden/{layer}" for layer in manifest["layers"])]:
        for start in range(0, rows, 4096):  # bounded memory on big shards
            if not np.isfinite(f[dataset][start : start + 4096]).all():
                report.problems.append(f"{name}: {dataset} holds NaN or inf")
                break
    report.rows_checked += rows
    return f["example_id"][:]

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
        ids = (
            np.concatenate([i for i in ids if i is not None])
            if any(i is not None for i in ids)
            else np.array([])
        )
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
    before = len(report.problems)
    expected = {"example_id": (rows,), "labels": (rows,), "logits": (rows, manifest["num_labels"])}
    expected |= {f"hidden/{layer}": (rows, hidden) for layer in manifest["layers"]}
    expected["offsets"] = (rows + 1,)
    for dataset, shape in expected.items():
        if dataset not in f:
            report.problems.append(f"{name}: no dataset {dataset}")
        elif f[dataset].shape != shape:
            report.problems.append(f"{name}: {dataset} has shape {f[dataset].shape}, expected {shape}")
    if len(report.problems) > before:  # this shard's layout is wrong: its rows cannot be trusted
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

    @property
    def ok(self) -> bool:
        return self.max_logit_diff <= self.logit_tolerance and self.min_cosine >= self.cosine_tolerance


def recompute_check(
    folder: str | Path, teacher: str, n: int, seed: int = 0, device: str = "auto", batch_size: int = 32
) -> RecomputeReport:
    """Rerun `teacher` on `n` examples drawn at random (seeded) from all of the cache's splits, with
    the token ids stored in the cache, and compare its logits and stored layers' [CLS] vectors with
    the cached ones. `ok` is False past `RECOMPUTE_TOLERANCE`; this catches a cache made by another
    teacher than the one it claims."""
    import torch

    from pkdpipe.cache.fingerprint import hash_tokenizer, hash_weights
    from pkdpipe.cache.reader import TeacherCache
    from pkdpipe.models import hidden_size, load_classifier, load_tokenizer, pick_device
    from pkdpipe.text import collate, pad_id_of

    if n < 1:
        raise CacheError(f"--recompute needs a positive number of examples; got {n}")
    cache = TeacherCache(folder)
    model = load_classifier(teacher)
    m = cache.manifest
    if model.config.num_labels != cache.num_labels or hidden_size(model.config) != cache.hidden_size:
        raise CacheError(
            f"teacher {teacher} ({model.config.num_labels} labels, hidden {hidden_size(model.config)}) "
            f"cannot have made this cache ({cache.num_labels} labels, hidden {cache.hidden_size})"
        )
    notes = []
    if hash_weights(model) != m["teacher"]["weights_sha256"]:
        notes.append(f"the weights of {teacher} are not the ones the manifest records")
    tokenizer = load_tokenizer(teacher)
    if hash_tokenizer(tokenizer) != m["tokenizer_sha256"]:
        notes.append(
            f"the tokenizer of {teacher} is not the one the manifest records (the cached ids are not its ids)"
        )
    pad_id = pad_id_of(tokenizer)
    precision = m.get("precision") or (m.get("config") or {}).get("precision", "fp32")
    logit_tol, cos_tol = RECOMPUTE_TOLERANCE["fp32" if precision == "fp32" else "autocast"]

    shards = [s for info in m["splits"].values() for s in info["shards"] if s["rows"]]
    offsets = np.cumsum([0] + [s["rows"] for s in shards])
    total = int(offsets[-1])
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    device_ = pick_device(device)
    model.to(device_).eval()
    max_logit, max_hidden, min_cos, worst_layer = 0.0, 0.0, 1.0, None
    with cache:
        for i, shard in enumerate(shards):
            rows = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
            for start in range(0, len(rows), batch_size):
                data = cache._read_rows(shard["file"], rows[start : start + batch_size], cache.layers)
                batch = collate(data["input_ids"], data["token_type_ids"], pad_id)
                with torch.inference_mode():
                    out = model(**{k: v.to(device_) for k, v in batch.items()}, output_hidden_states=True)
                logits = out.logits.float().cpu().numpy()
                max_logit = max(max_logit, float(np.abs(logits - data["logits"]).max()))
                for j, layer in enumerate(cache.layers):
                    fresh = out.hidden_states[layer][:, 0].float().cpu().numpy()
                    cached = data["hidden"][:, j].astype(np.float32)
                    norms = np.linalg.norm(fresh, axis=1) * np.linalg.norm(cached, axis=1)
                    cosine = float(((fresh * cached).sum(1) / np.maximum(norms, 1e-12)).min())
                    max_hidden = max(max_hidden, float(np.abs(fresh - cached).max()))
                    if cosine < min_cos:
                        min_cos, worst_layer = cosine, layer
    return RecomputeReport(len(picks), max_logit, max_hidden, min_cos, worst_layer, logit_tol, cos_tol, notes)

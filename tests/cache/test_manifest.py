"""pkdpipe.cache.manifest: one schema for the manifest, checked at every entry point."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pkdpipe.cache import manifest as mf
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.errors import CacheError


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    target = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, target)
    return target


def rewrite(folder: Path, change) -> None:
    data = json.loads((folder / mf.MANIFEST).read_text())
    change(data)
    (folder / mf.MANIFEST).write_text(json.dumps(data))


def test_the_typed_manifest_reads_like_its_json(tiny_cache):
    m = mf.read(tiny_cache)
    raw = json.loads((tiny_cache / mf.MANIFEST).read_text())
    assert m.key == raw["key"] == m["key"] == tiny_cache.name
    assert m.teacher.hidden_size == raw["teacher"]["hidden_size"] == 32
    assert [s.file for s in m.shards("train")] == [s["file"] for s in raw["splits"]["train"]["shards"]]
    assert dict(m) == raw
    assert mf.KeyInputs.of(m).key() == m.key


def test_the_typed_manifest_is_its_json(tiny_cache):
    """What the builder writes is the typed record itself: `to_json` gives back every field, in the
    order manifest.json lists them, so a field added to the schema is written with no other change."""
    text = (tiny_cache / mf.MANIFEST).read_text()
    data = mf.read(tiny_cache).to_json()
    assert data == json.loads(text)
    assert json.dumps(data, indent=2) + "\n" == text


def _drop_teacher(m):
    del m["teacher"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["splits"]["train"].update(shards="nope"), r"manifest.splits.train.shards is not a list"),
        (_drop_teacher, r"manifest has no 'teacher'"),
        (lambda m: m.update(num_labels="3"), r"manifest.num_labels is not an int"),
        (lambda m: m.update(layers=[0, "1"]), r"manifest.layers\[1\] is not an int"),
        (lambda m: m["teacher"].update(hidden_size=True), r"manifest.teacher.hidden_size is not an int"),
        (lambda m: m.update(label_names=5), r"manifest.label_names is not a list"),
        (
            lambda m: m["splits"]["dev"]["shards"][0].update(rows=None),
            r"manifest.splits.dev.shards\[0\].rows is not an int",
        ),
    ],
)
def test_a_malformed_manifest_is_one_line_at_every_entry_point(cache_copy, change, message):
    """Valid JSON of the wrong shape: no AttributeError or KeyError from open, verify or distill."""
    from pkdpipe.config import DistillConfig
    from pkdpipe.train import distill

    rewrite(cache_copy, change)
    for entry in (
        lambda: open_cache(cache_copy),
        lambda: verify_cache(cache_copy),
        lambda: distill(
            DistillConfig(cache=str(cache_copy), strategy="skip", layers=2, device="cpu", quiet=True)
        ),
    ):
        with pytest.raises(CacheError, match=rf"is malformed: {message}"):
            entry()


def test_a_cache_relabelled_with_another_key_is_refused(cache_copy):
    rewrite(cache_copy, lambda m: m.update(key="0123456789abcdef"))
    with pytest.raises(CacheError, match="its key 0123456789abcdef is not the hash of the inputs it records"):
        open_cache(cache_copy)
    rewrite(cache_copy, lambda m: m.update(key=cache_copy.name, max_seq_len=64))  # inputs edited instead
    with pytest.raises(CacheError, match="not the hash of the inputs"):
        verify_cache(cache_copy)


def test_a_manifest_that_lists_a_shard_twice_is_refused(cache_copy):
    def twice(m):
        shards = m["splits"]["train"]["shards"]
        shards.append(dict(shards[0]))
        m["splits"]["train"]["examples"] += shards[0]["rows"]

    rewrite(cache_copy, twice)
    with pytest.raises(CacheError, match="lists a shard twice"):
        open_cache(cache_copy)


def test_a_shard_that_is_a_symlink_is_refused_on_read_and_verify(cache_copy, tmp_path):
    """A link to a copy outside the cache folder, with the right sha256, is still not let in."""
    shard = cache_copy / "dev-00000-of-00001.h5"
    outside = tmp_path / "elsewhere.h5"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with open_cache(cache_copy) as cache, pytest.raises(CacheError, match="not a regular file"):
        cache.read("dev")
    assert (
        "dev-00000-of-00001.h5: not a regular file in the cache folder" in verify_cache(cache_copy).problems
    )


def test_a_manifest_that_is_a_symlink_is_refused(cache_copy, tmp_path):
    outside = tmp_path / "manifest-elsewhere.json"
    shutil.move(cache_copy / mf.MANIFEST, outside)
    os.symlink(outside, cache_copy / mf.MANIFEST)
    with pytest.raises(CacheError, match="is not a regular file"):
        open_cache(cache_copy)


def test_verify_finds_a_nan_planted_in_a_shard(cache_copy):
    """Written through HDF5 (so the file still opens), with the manifest's checksum updated to match:
    only the values are wrong."""
    from pkdpipe.cache.fingerprint import sha256_file

    shard = cache_copy / "train-00001-of-00003.h5"
    with h5py.File(shard, "r+") as f:
        f["hidden/2"][3, 5] = np.nan
    new_sha = sha256_file(shard)

    def update(m):
        (entry,) = [s for s in m["splits"]["train"]["shards"] if s["file"] == shard.name]
        entry.update(sha256=new_sha, bytes=shard.stat().st_size)

    rewrite(cache_copy, update)
    assert verify_cache(cache_copy).problems == [f"{shard.name}: hidden/2 holds NaN or inf"]

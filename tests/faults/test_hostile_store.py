"""A store that lies: symlinks out of the store, a shard listed under two names, a damaged copy.
Nothing of it becomes a visible cache, distill refuses what verify would, and push can repair."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import assert_ok, one_error_line, pkdpipe

from pkdpipe.cache.local import list_caches


@pytest.fixture
def store(tiny_cache, tmp_path) -> Path:
    folder = tmp_path / "store"
    assert_ok(pkdpipe("cache", "push", tiny_cache, folder, "--cache-dir", tiny_cache.parents[1]))
    return folder


def remote_of(store: Path, cache: Path) -> Path:
    return store / cache.parent.name / cache.name


def pull(key: str, store: Path, root: Path):
    return pkdpipe("cache", "pull", key, "--store", store, "--cache-dir", root)


def add_a_copy_of_shard_0(folder: Path) -> None:
    """What a hostile or broken store could hold: shard 0 again under a new name, with its right
    sha256, listed in the manifest (the key still matches: the inputs are the same)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    shutil.copyfile(folder / first["file"], folder / "train-00003-of-00003.h5")
    manifest["splits"]["train"]["shards"].append({**first, "file": "train-00003-of-00003.h5"})
    manifest["splits"]["train"]["examples"] += first["rows"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_shard_linked_to_a_file_outside_the_store_is_not_pulled(tiny_cache, store, tmp_path):
    remote = remote_of(store, tiny_cache)
    shard = remote / "dev-00000-of-00001.h5"
    outside = tmp_path / "somebody-elses-file.h5"  # same bytes, so the sha256 in the manifest matches
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    line = one_error_line(pull(tiny_cache.name, store, tmp_path / "root"))
    assert "dev-00000-of-00001.h5 is not a regular file in the store" in line
    assert list_caches(tmp_path / "root") == []


def test_a_shard_listed_twice_under_two_names_is_not_installed(tiny_cache, store, tmp_path):
    add_a_copy_of_shard_0(remote_of(store, tiny_cache))
    line = one_error_line(pull(tiny_cache.name, store, tmp_path / "root"))
    assert "refusing to install the cache" in line and "train: example ids are not unique" in line
    assert list_caches(tmp_path / "root") == []


def test_distill_refuses_a_cache_that_holds_rows_twice(tiny_cache, tmp_path):
    folder = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    add_a_copy_of_shard_0(folder)
    line = one_error_line(
        pkdpipe("distill", "--cache", folder, "--layers", 2, "--strategy", "skip", "--output", tmp_path / "s")
    )
    assert "split 'train' holds an example id twice" in line
    assert not (tmp_path / "s" / "model.safetensors").exists()


def test_push_force_repairs_a_damaged_store_copy(tiny_cache, store, tmp_path):
    shard = remote_of(store, tiny_cache) / "train-00001-of-00003.h5"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    line = one_error_line(pull(tiny_cache.name, store, tmp_path / "root"))
    assert "checksum mismatch in train-00001-of-00003.h5" in line and "cache push KEY --force" in line
    again = pkdpipe("cache", "push", tiny_cache, store, "--cache-dir", tiny_cache.parents[1])
    assert_ok(again)  # without --force the store's copy is taken as it is
    assert_ok(pkdpipe("cache", "push", tiny_cache, store, "--cache-dir", tiny_cache.parents[1], "--force"))
    assert_ok(pull(tiny_cache.name, store, tmp_path / "root"))
    assert [p.name for p in list_caches(tmp_path / "root")] == [tiny_cache.name]

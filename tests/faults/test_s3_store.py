"""The team store over a real S3 API: moto's standalone server on this machine, s3fs as the client.

Marked `s3` (opt in: pytest -m s3; .ci/run runs it): the s3_store fixture starts the server, or skips
when `pip install s3fs "moto[server]"` is missing. Push, pull by key, a push killed midway (invisible,
then resumed) and a cache-teacher that finds its key in the store."""

from __future__ import annotations

import pytest
from helpers import assert_killed, assert_ok, pkdpipe

from pkdpipe.cache.local import list_caches
from pkdpipe.cache.verify import verify_cache

pytestmark = pytest.mark.s3


def test_push_pull_and_a_hit_through_s3(tiny, tiny_cache, tmp_path, s3_store):
    push = ["cache", "push", tiny_cache, s3_store, "--cache-dir", tiny_cache.parents[1]]
    assert_killed(pkdpipe(*push, kill_at="push-shard-uploaded#2"))
    pull = ["cache", "pull", tiny_cache.name[:8], "--store", s3_store, "--cache-dir", tmp_path / "a"]
    assert pkdpipe(*pull).returncode == 1  # no manifest yet: nothing to pull
    assert list_caches(tmp_path / "a") == []
    assert_ok(pkdpipe(*push))  # resumes: the finished shards stay
    assert_ok(pkdpipe(*pull))
    (pulled,) = list_caches(tmp_path / "a")
    assert pulled.name == tiny_cache.name and verify_cache(pulled).ok

    built = pkdpipe("cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"],
                    "--store", s3_store, "--cache-dir", tmp_path / "b", "--shard-size", 40,
                    "--batch-size", 16)  # fmt: skip
    assert_ok(built)
    assert "pulled from the store" in built.stdout
    (hit,) = list_caches(tmp_path / "b")
    assert verify_cache(hit).ok


def test_a_pull_of_some_layers_through_s3_is_killed_then_resumes_and_then_adds_a_layer(
    tiny_cache, tmp_path, s3_store
):
    from pkdpipe.cache import manifest as mf
    from pkdpipe.cache import store

    url = s3_store.rsplit("/", 1)[0] + "/layers"  # not the other test's store: its push must find none
    store.push(tiny_cache, url, quiet=True)
    pull = ["cache", "pull", tiny_cache.name[:8], "--store", url, "--cache-dir", tmp_path, "--layers", "2,4"]
    assert_killed(pkdpipe(*pull, kill_at="pull-shard-downloaded#2"))
    assert list_caches(tmp_path) == []  # nothing visible
    assert_ok(pkdpipe(*pull))  # resumes from the shards it finished
    (copy,) = list_caches(tmp_path)
    assert mf.read(copy).layers_present == [2, 4] and verify_cache(copy).ok
    added = pkdpipe(*pull[:-1], "3", quiet=False)
    assert_ok(added)
    assert "layers 2,3,4" in added.stderr
    assert mf.read(copy).layers_present == [2, 3, 4] and verify_cache(copy).ok

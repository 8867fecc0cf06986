"""The team store over a real S3 API: moto's standalone server on this machine, s3fs as the client.

Marked `s3` (opt in: pytest -m s3); needs `pip install s3fs "moto[server]"`. Push, pull by key, a
push killed midway (invisible, then resumed) and a cache-teacher that finds its key in the store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from helpers import assert_killed, assert_ok, pkdpipe

from pkdpipe.cache.local import list_caches
from pkdpipe.cache.verify import verify_cache

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port; the environment points boto (and so s3fs) at it."""
    pytest.importorskip("s3fs")
    server = shutil.which("moto_server") or pytest.skip(
        "moto_server is not installed (pip install 'moto[server]')"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([server, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 30
        while True:
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("pkd-team")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield "s3://pkd-team/caches"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_push_pull_and_a_hit_through_s3(tiny, tiny_cache, tmp_path, s3):
    push = ["cache", "push", tiny_cache, s3, "--cache-dir", tiny_cache.parents[1]]
    assert_killed(pkdpipe(*push, kill_at="push-shard-uploaded#2"))
    pull = ["cache", "pull", tiny_cache.name[:8], "--store", s3, "--cache-dir", tmp_path / "a"]
    assert pkdpipe(*pull).returncode == 1  # no manifest yet: nothing to pull
    assert list_caches(tmp_path / "a") == []
    assert_ok(pkdpipe(*push))  # resumes: the finished shards stay
    assert_ok(pkdpipe(*pull))
    (pulled,) = list_caches(tmp_path / "a")
    assert pulled.name == tiny_cache.name and verify_cache(pulled).ok

    built = pkdpipe("cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"], "--store", s3,
                    "--cache-dir", tmp_path / "b", "--shard-size", 40, "--batch-size", 16)  # fmt: skip
    assert_ok(built)
    assert "pulled from the store" in built.stdout
    (hit,) = list_caches(tmp_path / "b")
    assert verify_cache(hit).ok

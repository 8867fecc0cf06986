"""pkdpipe.cache.store: push, pull, resume, refusals, locking, and the local-root housekeeping.

Every store test runs against a local folder and fsspec's in-process `memory://` store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from pkdpipe.cache import local as cache_root
from pkdpipe.cache import manifest as mf
from pkdpipe.cache import store
from pkdpipe.cache.local import list_caches
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.errors import CacheError, StoreError


@pytest.fixture(params=["folder", "memory"])
def store_url(request, tmp_path) -> str:
    if request.param == "folder":
        yield str(tmp_path / "store")
        return
    url = f"memory://pkd-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy_cache(cache: Path, root: Path) -> Path:
    """A private copy of a cache at `root/<task>/<key>` (the session cache stays read-only)."""
    dest = root / cache.parent.name / cache.name
    shutil.copytree(cache, dest)
    return dest


def shard_names(folder: Path) -> list[str]:
    return [s["file"] for info in mf.read(folder)["splits"].values() for s in info["shards"]]


def remote(url: str, *parts: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, "/".join([path.rstrip("/"), *parts])


def rewrite_remote_manifest(url: str, cache: Path, change) -> None:
    fs, path = remote(url, cache.parent.name, cache.name, mf.MANIFEST)
    manifest = json.loads(fs.cat_file(path))
    change(manifest)
    fs.pipe_file(path, json.dumps(manifest).encode())


class Interrupted(BaseException):
    """A stand-in for Ctrl-C or a killed process (a real KeyboardInterrupt would stop pytest)."""


_DOWNLOAD, _UPLOAD = store._download, store._upload


def count_downloads(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Record each shard download; with `fail_after`, interrupt the one after that many."""
    calls: list[str] = []

    def counting(fs, remote_path, local, sha256, url, bar):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(local.name)
        return _DOWNLOAD(fs, remote_path, local, sha256, url, bar)

    monkeypatch.setattr(store, "_download", counting)
    return calls


# -- push then pull --------------------------------------------------------------------------------
def test_push_then_pull_gives_identical_bytes_and_a_cache_that_verifies(tiny_cache, tmp_path, store_url):
    local = copy_cache(tiny_cache, tmp_path / "a")
    dest = store.push(local, store_url, quiet=True)
    assert dest == f"{store_url}/{local.parent.name}/{local.name}"
    fs, path = remote(store_url, local.parent.name, local.name)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == sorted(
        [mf.MANIFEST, *shard_names(local)]
    )

    folder = store.pull(dest, tmp_path / "b", quiet=True)
    assert folder == tmp_path / "b" / local.parent.name / local.name
    for name in [mf.MANIFEST, *shard_names(local)]:
        assert (folder / name).read_bytes() == (tiny_cache / name).read_bytes(), name
    assert sorted(p.name for p in folder.iterdir()) == sorted([mf.MANIFEST, *shard_names(local)])
    assert verify_cache(folder).ok
    with open_cache(folder) as cache:
        assert cache.key == tiny_cache.name
        assert cache.num_examples("train") == 96
    assert list_caches(tmp_path / "b") == [folder]
    assert not list((folder.parent).glob(f".*{cache_root.PARTIAL}"))


def test_pull_by_key_or_key_prefix_looks_under_the_store(tiny_cache, tmp_path, store_url):
    store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    key = tiny_cache.name
    assert store.find_in_store(key[:6], store_url) == f"{store_url}/{tiny_cache.parent.name}/{key}"
    folder = store.pull(key[:6], tmp_path / "b", store=store_url, quiet=True)
    assert folder.name == key and verify_cache(folder).ok
    assert store.pull(key, tmp_path / "b", store=store_url, quiet=True) == folder  # already here: no work
    with pytest.raises(StoreError, match="no complete cache with key 0123"):
        store.pull("0123", tmp_path / "c", store=store_url, quiet=True)
    with pytest.raises(StoreError, match="--store"):
        store.pull(key, tmp_path / "c", quiet=True)


def test_local_or_pull_pulls_only_what_no_local_cache_has(tiny_cache, tmp_path, store_url):
    """A key found here is used as it is; one found nowhere here is pulled; a prefix that matches
    two local caches is refused as ambiguous, never settled by what the store happens to hold."""
    store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    key = tiny_cache.name
    pulled = store.local_or_pull(key[:6], tmp_path / "b", store_url, quiet=True)
    assert pulled == tmp_path / "b" / tiny_cache.parent.name / key and verify_cache(pulled).ok
    assert store.local_or_pull(key[:6], tmp_path / "b", store_url, quiet=True) == pulled
    shutil.copytree(pulled, tmp_path / "b" / "other-task" / key)  # the same key under another task
    with pytest.raises(CacheError, match="matches several caches"):
        store.local_or_pull(key[:6], tmp_path / "b", store_url, quiet=True)


def test_push_twice_uploads_nothing_the_second_time(tiny_cache, tmp_path, store_url, monkeypatch):
    local = copy_cache(tiny_cache, tmp_path / "a")
    store.push(local, store_url, quiet=True)
    uploads = []
    monkeypatch.setattr(store, "_upload", lambda *a: uploads.append(a))
    store.push(local, store_url, quiet=True)
    assert uploads == []


def test_push_refuses_a_corrupted_local_cache(tiny_cache, tmp_path, store_url):
    local = copy_cache(tiny_cache, tmp_path / "a")
    shard = local / shard_names(local)[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"checksum mismatch in .*{shard.name}"):
        store.push(local, store_url, quiet=True)
    fs, path = remote(store_url)
    assert not fs.exists(path) or not fs.glob(f"{path}/**/{mf.MANIFEST}")


# -- cache-teacher --store -------------------------------------------------------------------------
def test_second_cache_teacher_with_store_is_a_hit_and_runs_no_teacher_forward(
    tiny, tiny_cache, tmp_path, store_url, monkeypatch
):
    from transformers import BertForSequenceClassification

    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    calls = []
    monkeypatch.setattr(BertForSequenceClassification, "forward", lambda *a, **k: calls.append(1) / 0)
    result = cache_teacher(
        CacheConfig(
            task=tiny["task"],
            teacher=str(tiny["teacher"]),
            cache_dir=tmp_path / "fresh",
            store=store_url,
            shard_size=40,
            batch_size=16,
            quiet=True,
        )
    )
    assert result.hit and result.pulled
    assert result.key == tiny_cache.name
    assert result.path == tmp_path / "fresh" / tiny_cache.parent.name / tiny_cache.name
    assert calls == []
    assert verify_cache(result.path).ok


def test_cache_teacher_miss_computes_and_pushes(tiny, tmp_path, store_url):
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    config = CacheConfig(
        task=tiny["task"],
        teacher=str(tiny["teacher"]),
        cache_dir=tmp_path / "root",
        splits=("dev",),
        store=store_url,
        push=True,
        shard_size=16,
        quiet=True,
    )
    result = cache_teacher(config)
    assert not result.hit and not result.pulled
    fs, path = remote(store_url, result.path.parent.name, result.key, mf.MANIFEST)
    assert fs.cat_file(path) == (result.path / mf.MANIFEST).read_bytes()


# -- refusals --------------------------------------------------------------------------------------
def test_a_corrupted_shard_in_the_store_is_refused_and_nothing_becomes_visible(
    tiny_cache, tmp_path, store_url
):
    local = copy_cache(tiny_cache, tmp_path / "a")
    dest = store.push(local, store_url, quiet=True)
    name = shard_names(local)[1]
    fs, path = remote(dest, name)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    fs.pipe_file(path, bytes(data))

    root = tmp_path / "b"
    with pytest.raises(StoreError) as err:
        store.pull(dest, root, quiet=True)
    assert f"checksum mismatch in {name}" in str(err.value) and "\n" not in str(err.value)
    assert list_caches(root) == []
    assert not (root / local.parent.name / local.name).exists()
    with pytest.raises(CacheError):
        open_cache(local.name, root)


@pytest.mark.parametrize("bad", ["../evil.h5", "/etc/passwd.h5", "sub/dir.h5"])
def test_an_unsafe_file_name_in_the_store_manifest_is_refused_before_any_download(
    tiny_cache, tmp_path, store_url, monkeypatch, bad
):
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)

    def unsafe(m):
        m["splits"]["train"]["shards"][0]["file"] = bad

    rewrite_remote_manifest(store_url, tiny_cache, unsafe)
    downloads = count_downloads(monkeypatch)
    with pytest.raises(StoreError, match="unsafe file"):
        store.pull(dest, tmp_path / "b", quiet=True)
    assert downloads == []
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "evil.h5").exists()


@pytest.mark.parametrize(
    ("change", "message", "by_url"),
    [
        (lambda m: m.update(format_version=99), "format version 99", True),
        (lambda m: m.update(format="something-else"), "not a pkdpipe cache manifest", True),
        (lambda m: m.update(task="../../outside"), "unsafe task", True),
        (lambda m: m.update(key="../k"), "malformed key", True),
        (lambda m: m.update(splits={"train": {"shards": "nope"}}), "malformed", True),
        # only a key lookup knows which key to expect; a URL may be any folder holding a cache
        (lambda m: m.update(key="f" * 16), "store holds it under", False),
    ],
)
def test_a_bad_store_manifest_is_refused_before_any_download(
    tiny_cache, tmp_path, store_url, monkeypatch, change, message, by_url
):
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    rewrite_remote_manifest(store_url, tiny_cache, change)
    downloads = count_downloads(monkeypatch)
    with pytest.raises(StoreError, match=message):
        store.pull(tiny_cache.name, tmp_path / "b", store=store_url, quiet=True)
    with pytest.raises(StoreError, match=message):
        store.pull_if_present(store_url, tiny_cache.parent.name, tiny_cache.name, tmp_path / "b", quiet=True)
    if by_url:
        with pytest.raises(StoreError, match=message):
            store.pull(dest, tmp_path / "b", quiet=True)
    assert downloads == []
    assert not (tmp_path / "b").exists()


def test_a_store_that_cannot_be_reached_or_written_is_one_line(tiny_cache, tmp_path):
    local = copy_cache(tiny_cache, tmp_path / "a")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot write to store") as err:
        store.push(local, str(blocker / "store"), quiet=True)
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="no cache at") as err:
        store.pull(str(tmp_path / "nowhere" / "tiny" / tiny_cache.name), tmp_path / "b", quiet=True)
    with pytest.raises(StoreError, match="does not exist"):
        store.pull(tiny_cache.name, tmp_path / "b", store=str(tmp_path / "nowhere"), quiet=True)
    with pytest.raises(StoreError, match="Protocol not known"):
        store.push(local, "nosuchproto://bucket/x", quiet=True)


@pytest.mark.parametrize(("url", "package"), [("s3://bucket/pkd", "s3fs"), ("gs://bucket/pkd", "gcsfs")])
def test_a_missing_fsspec_backend_names_the_package(tiny_cache, tmp_path, url, package):
    pytest.importorskip("fsspec")
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    with pytest.raises(StoreError, match=f"needs the '{package}' package: pip install {package}") as err:
        store.pull(f"{url}/tiny/{tiny_cache.name}", tmp_path / "b", quiet=True)
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match=package):
        store.push(copy_cache(tiny_cache, tmp_path / "a"), url, quiet=True)


# -- interrupted push and pull ---------------------------------------------------------------------
def test_an_interrupted_push_is_invisible_then_resumes(tiny_cache, tmp_path, store_url, monkeypatch):
    local = copy_cache(tiny_cache, tmp_path / "a")
    uploaded: list[str] = []

    def interrupted(fs, src, target, size):
        if len(uploaded) == 2:
            raise Interrupted
        uploaded.append(Path(src).name)
        return _UPLOAD(fs, src, target, size)

    monkeypatch.setattr(store, "_upload", interrupted)
    with pytest.raises(Interrupted):
        store.push(local, store_url, quiet=True)
    assert uploaded == shard_names(local)[:2]
    fs, path = remote(store_url, local.parent.name, local.name)
    assert not fs.exists(f"{path}/{mf.MANIFEST}")
    assert not [p for p in fs.ls(path, detail=False) if p.endswith(".tmp")]  # the temp upload was removed

    key = local.name
    assert store.pull_if_present(store_url, local.parent.name, key, tmp_path / "b", quiet=True) is None
    with pytest.raises(StoreError, match="no complete cache"):
        store.pull(f"{store_url}/{local.parent.name}/{key}", tmp_path / "b", quiet=True)
    with pytest.raises(StoreError, match="no complete cache"):
        store.pull(key, tmp_path / "b", store=store_url, quiet=True)
    assert list_caches(tmp_path / "b") == []

    uploaded.clear()
    monkeypatch.setattr(
        store,
        "_upload",
        lambda fs, src, target, size: (uploaded.append(Path(src).name), _UPLOAD(fs, src, target, size)),
    )
    store.push(local, store_url, quiet=True)
    assert uploaded == [*shard_names(local)[2:], mf.MANIFEST]  # the two finished shards were kept
    assert verify_cache(store.pull(key, tmp_path / "b", store=store_url, quiet=True)).ok


def test_push_replaces_a_damaged_shard_left_in_the_store(tiny_cache, tmp_path, store_url):
    local = copy_cache(tiny_cache, tmp_path / "a")
    name = shard_names(local)[0]
    fs, path = remote(store_url, local.parent.name, local.name, name)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, b"\0" * (local / name).stat().st_size)  # right size, wrong bytes
    dest = store.push(local, store_url, quiet=True)
    assert verify_cache(store.pull(dest, tmp_path / "b", quiet=True)).ok


def test_an_interrupted_pull_resumes_from_its_verified_shards(tiny_cache, tmp_path, store_url, monkeypatch):
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    root = tmp_path / "b"
    first = count_downloads(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        store.pull(dest, root, quiet=True)
    names = shard_names(tiny_cache)
    assert first == names[:2]
    staging = root / tiny_cache.parent.name / f".{tiny_cache.name}{cache_root.PARTIAL}"
    assert sorted(p.name for p in staging.iterdir()) == sorted(names[:2])
    assert list_caches(root) == []

    second = count_downloads(monkeypatch)
    folder = store.pull(dest, root, quiet=True)
    assert second == names[2:]
    assert verify_cache(folder).ok and not staging.exists()


def test_a_pull_completes_a_folder_an_interrupted_build_left(tiny_cache, tmp_path, store_url):
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    leftover = tmp_path / "b" / tiny_cache.parent.name / tiny_cache.name
    leftover.mkdir(parents=True)
    (leftover / shard_names(tiny_cache)[0]).write_bytes(b"half a shard")
    (leftover / "dev-00000-of-00001.h5.tmp").write_bytes(b"junk")
    folder = store.pull(dest, tmp_path / "b", quiet=True)
    assert folder == leftover
    assert verify_cache(folder).ok
    assert (folder / shard_names(tiny_cache)[0]).read_bytes() == (
        tiny_cache / shard_names(tiny_cache)[0]
    ).read_bytes()


def test_local_or_pull_completes_a_folder_an_interrupted_build_left(tiny_cache, tmp_path, store_url):
    """`distill --store` on a machine where cache-teacher of the same key was killed: the store's
    copy is pulled over the leftover folder rather than the run stopping on its missing manifest."""
    store.push(copy_cache(tiny_cache, tmp_path / "a"), store_url, quiet=True)
    leftover = tmp_path / "b" / tiny_cache.parent.name / tiny_cache.name
    leftover.mkdir(parents=True)
    (leftover / shard_names(tiny_cache)[0]).write_bytes(b"half a shard")
    folder = store.local_or_pull(tiny_cache.name[:8], tmp_path / "b", store_url, quiet=True)
    assert folder == leftover
    assert verify_cache(folder).ok


# -- two real processes ----------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pkdpipe.cache import store

    url, root, go, ready = sys.argv[1:5]
    downloads = []
    real = store._download

    def slow(*args):
        downloads.append(args[2].name)
        time.sleep(0.2)  # long enough that the other process surely arrives while we hold the lock
        return real(*args)

    store._download = slow
    Path(ready).write_text("")
    while not Path(go).exists():
        time.sleep(0.01)
    folder = store.pull(url, root, quiet=True)
    print(json.dumps({"folder": str(folder), "downloads": downloads}))
    """
)


def test_two_processes_pulling_one_key_download_it_once(tiny_cache, tmp_path):
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), str(tmp_path / "store"), quiet=True)
    root, go = tmp_path / "root", tmp_path / "go"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PKDPIPE_QUIET": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), dest, str(root), str(go), str(tmp_path / f"ready{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "children did not start"
        time.sleep(0.02)
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    folder = root / tiny_cache.parent.name / tiny_cache.name
    assert [r["folder"] for r in results] == [str(folder)] * 2
    downloads = sorted(len(r["downloads"]) for r in results)
    assert downloads == [0, len(shard_names(tiny_cache))]  # one did the work, the other waited and used it
    assert verify_cache(folder).ok
    assert not (folder.parent / f".{folder.name}{cache_root.PARTIAL}").exists()


def test_a_pull_waits_for_a_build_holding_the_key_lock(tiny_cache, tmp_path, monkeypatch):
    """The key's lock is the one cache-teacher's build takes: a pull that finds it held waits, then
    re-checks, and uses what the holder finished instead of downloading."""
    dest = store.push(copy_cache(tiny_cache, tmp_path / "a"), str(tmp_path / "store"), quiet=True)
    root = tmp_path / "root"
    folder = root / tiny_cache.parent.name / tiny_cache.name
    folder.parent.mkdir(parents=True)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    (tmp_path / "go").write_text("")
    with cache_root.key_lock(folder):  # a "build" in this process
        child = subprocess.Popen(
            [sys.executable, str(script), dest, str(root), str(tmp_path / "go"), str(tmp_path / "ready")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists():
            assert time.time() < deadline and child.poll() is None, "child did not start"
            time.sleep(0.02)
        time.sleep(0.5)
        assert child.poll() is None  # waiting on the lock
        shutil.copytree(tiny_cache, folder)  # the build finishes
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"folder": str(folder), "downloads": []}


# -- distill on a machine with neither the teacher nor the data ------------------------------------
def test_distill_works_on_a_pulled_cache_without_teacher_weights_or_raw_data(tiny, tmp_path, store_url):
    from pkdpipe.config import CacheConfig, DistillConfig
    from pkdpipe.teacher import cache_teacher
    from pkdpipe.train import distill

    teacher = shutil.copytree(tiny["teacher"], tmp_path / "teacher")
    data = shutil.copytree(tiny["data"], tmp_path / "data")
    built = cache_teacher(
        CacheConfig(
            task=str(data / "tiny.toml"),
            teacher=str(teacher),
            cache_dir=tmp_path / "built",
            store=store_url,
            push=True,
            shard_size=40,
            quiet=True,
        )
    )
    shutil.rmtree(teacher)
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "built")

    folder = store.pull(built.key, tmp_path / "laptop", store=store_url, quiet=True)
    out = tmp_path / "student"
    distill(
        DistillConfig(
            cache=str(folder),
            cache_dir=tmp_path / "laptop",
            student_init=str(tiny["pretrained"]),
            layers=2,
            max_steps=3,
            batch_size=16,
            quiet=True,
            output=out,
            device="cpu",
        )
    )
    assert (out / "model.safetensors").is_file()
    assert not teacher.exists() and not data.exists()

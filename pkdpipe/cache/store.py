"""Moving caches to and from a shared store.

A store is any fsspec URL: a plain or network-mounted folder, `file://`, `memory://`, and
`s3://`, `gs://`, `hf://` once the matching fsspec package is installed. Its layout mirrors the
local one, `<store>/<task>/<key>/manifest.json + shards`, and the same rule holds there: the
manifest is written last, so its presence means the cache is complete.

- `push` checks the local shards against the manifest, uploads each shard to a temporary name and
  moves it into place (shards already in the store with the right size and sha256 are skipped, so
  an interrupted push resumes), then uploads the manifest.
- `pull` reads and validates the remote manifest before it downloads anything (unsafe file names,
  unknown format versions and odd task or key names are refused), downloads into a hidden staging
  folder `<root>/<task>/.<key>.partial/`, checks every sha256, and only then moves the cache into
  place. Verified shards stay in the staging folder, so an interrupted pull resumes.
- Pulls and builds of one key take the same exclusive lock (`pkdpipe.cache.local.key_lock`): one
  process does the work, the others wait and use it.

Every store problem is a `StoreError` with one line; local-cache problems are `CacheError`s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pkdpipe import faults, files, progress
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import KEY_LENGTH, sha256_file
from pkdpipe.cache.local import cache_folder, key_lock, resolve_cache, root_of, staging_folder
from pkdpipe.errors import CacheError, CacheNotFound, PkdError, StoreError

CHUNK = 4 << 20  # bytes per read/write when streaming a shard (bounded memory, few round trips)
MIB = float(1 << 20)  # progress bars count MiB: byte counts are unreadable at shard sizes

# fsspec protocols whose implementation lives in a separate package: the package to install.
_BACKENDS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "hf": "huggingface_hub",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "sftp": "paramiko",
    "ssh": "paramiko",
    "http": "aiohttp",
    "https": "aiohttp",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a task name that is one plain folder name
_KEY = re.compile(rf"^[0-9a-f]{{1,{KEY_LENGTH}}}$")  # a key, or the start of one


# -- store URLs ------------------------------------------------------------------------------------
def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for a store URL; a missing backend is a StoreError
    that names the package to install."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = _BACKENDS.get(protocol)
        hint = f"pip install {package}" if package else "install the fsspec backend for it"
        raise StoreError(f"store {url} needs the {package or protocol!r} package: {hint}") from None
    except (ValueError, TypeError) as err:
        raise StoreError(f"store {url}: {str(err).splitlines()[0]}") from None


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@contextmanager
def _store_errors(action: str, url: str) -> Iterator[None]:
    """Turn whatever a storage backend raises (OSError, botocore, aiohttp, HTTP errors) into one
    StoreError line. Our own errors pass through."""
    try:
        yield
    except PkdError:
        raise
    except Exception as err:
        raise StoreError(f"cannot {action} {url}: {_one_line(err)}") from None


def _sha256_remote(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_identity(
    manifest: mf.Manifest, where: str, key: str | None = None, task: str | None = None
) -> None:
    """The manifest's task and key become local folder names: they must be plain names (and match
    where the store says they are)."""
    m_task, m_key = manifest.task, manifest.key
    if not isinstance(m_task, str) or not _SAFE_NAME.match(m_task) or ".." in m_task:
        raise StoreError(f"{where} names an unsafe task {m_task!r}: refusing to pull it")
    if not isinstance(m_key, str) or not re.fullmatch(rf"[0-9a-f]{{{KEY_LENGTH}}}", m_key):
        raise StoreError(f"{where} has a malformed key {m_key!r}: refusing to pull it")
    if key is not None and not m_key.startswith(key):
        raise StoreError(f"{where} says key {m_key}, but the store holds it under {key}: refusing to pull it")
    if task is not None and m_task != task:
        raise StoreError(
            f"{where} says task {m_task}, but the store holds it under {task}: refusing to pull it"
        )


# -- push ------------------------------------------------------------------------------------------
def push(folder: str | Path, url: str, quiet: bool = False, force: bool = False) -> str:
    """Publish the complete cache `folder` to the store `url`; return the cache's URL there,
    `<url>/<task>/<key>`.

    The local shards are checked against the manifest first, and the cache must pass the checks
    every pull makes (a corrupted cache, or one a pull would refuse, is never published). Each shard
    goes to a temporary name and is then moved into place; shards already in the store with the
    right size and sha256 are kept, so an interrupted push resumes. The manifest goes last. A store
    that already holds a complete cache with this key is left as it is (the key names the inputs,
    so either copy serves), unless `force`: then every shard in the store is checked and those that
    do not match are uploaded again, which repairs a damaged copy.
    """
    folder = Path(folder)
    manifest = mf.read(folder)
    shards = manifest.shards()
    for shard in shards:
        path = mf.safe_file(folder, shard.file)
        if not path.is_file():
            raise CacheError(f"cache {folder} is missing shard {shard.file}: not pushing it")
        if sha256_file(path) != shard.sha256:
            raise CacheError(f"checksum mismatch in {path}: the local cache is corrupted, not pushing it")
    _check_before_push(folder)
    fs, base = _filesystem(url)
    task, key = manifest.task, manifest.key
    remote, dest = _join(base, task, key), _join(url, task, key)
    with _store_errors("reach store", url):
        if not force and fs.exists(_join(remote, mf.MANIFEST)):
            progress.info(
                f"{dest} is already in the store: nothing to push (--force checks and repairs it)", quiet
            )
            return dest
    with _store_errors("write to store", url):
        fs.makedirs(remote, exist_ok=True)
        todo = []
        for shard in shards:
            target = _join(remote, shard.file)
            size = (folder / shard.file).stat().st_size
            if fs.exists(target) and fs.size(target) == size and _sha256_remote(fs, target) == shard.sha256:
                continue  # finished by an earlier, interrupted push
            todo.append((shard.file, size))
        with progress.bar(
            f"push {key} (MiB)", sum(size for _, size in todo) / MIB, unit="MiB", quiet=quiet
        ) as bar:
            for name, size in todo:
                _upload(fs, folder / name, _join(remote, name), size)
                bar.advance(size / MIB)
                faults.point("push-shard-uploaded")
        _upload(fs, folder / mf.MANIFEST, _join(remote, mf.MANIFEST), (folder / mf.MANIFEST).stat().st_size)
    progress.info(f"pushed {key}: {len(todo)} of {len(shards)} shard(s) uploaded to {dest}", quiet)
    return dest


def _check_before_push(folder: Path) -> None:
    """What every pull checks (datasets, NaN and inf, unique ids, labels, token ids, statistics),
    before anything is published: a cache the teammates' pulls would refuse is not pushed."""
    from pkdpipe.cache.verify import verify_cache

    problems = verify_cache(folder, checksums=False).problems  # the checksums were matched above
    if problems:
        more = f" (and {len(problems) - 1} more; cache verify lists them)" if len(problems) > 1 else ""
        raise CacheError(
            f"cache {folder} would be refused by every pull: {problems[0]}{more}; not pushing it"
        )


def _upload(fs, local: Path, target: str, size: int) -> None:
    """Copy `local` to `target` through a unique temporary name (two pushers never share one)."""
    name = target.rsplit("/", 1)[-1]
    tmp = f"{target.rsplit('/', 1)[0]}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fs.put_file(str(local), tmp)
        fs.mv(tmp, target)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            pass
        raise
    if fs.size(target) != size:
        raise StoreError(f"{target}: the store holds {fs.size(target)} bytes after upload, expected {size}")


# -- pull ------------------------------------------------------------------------------------------
def _looks_like_url(text: str) -> bool:
    return "://" in text or "/" in text or os.sep in text or not _KEY.match(text)


def find_in_store(key: str, store: str) -> str:
    """The URL of the complete cache whose key starts with `key` in `store` (`<store>/*/<key>`)."""
    if not _KEY.match(key):
        raise StoreError(f"{key!r} is not a cache key (hex digits)")
    fs, base = _filesystem(store)
    with _store_errors("read store", store):
        if _is_local(fs) and not fs.isdir(base):
            raise StoreError(f"store {store} does not exist (is the shared folder mounted?)")
        hits = sorted(fs.glob(_join(base, "*", f"{key}*", mf.MANIFEST)))
    if not hits:
        raise StoreError(f"no complete cache with key {key} in store {store}")
    if len(hits) > 1:
        found = ", ".join(h.rsplit("/", 3)[-3] + "/" + h.rsplit("/", 3)[-2] for h in hits)
        raise StoreError(f"key {key} matches several caches in {store}: {found}; give more of the key")
    task, full_key = hits[0].rsplit("/", 3)[-3:-1]
    return _join(store, task, full_key)


def pull(
    url_or_key: str, cache_dir: str | Path | None = None, store: str | None = None, quiet: bool = False
) -> Path:
    """Bring a cache from a store into the local cache root; return its folder `<root>/<task>/<key>`.

    `url_or_key` is a cache's full URL (`<store>/<task>/<key>`, or any folder holding a cache) or a
    key (or its first hex digits) looked up under `store`. Nothing becomes visible in the cache root
    unless every shard matched its checksum. A cache already complete locally is used as it is.
    """
    if _looks_like_url(url_or_key):
        url, expect_task, expect_key = url_or_key.rstrip("/"), None, None
    else:
        if not store:
            raise StoreError(
                f"{url_or_key!r} looks like a key: pass --store URL (or set PKDPIPE_STORE) to look it up"
            )
        url = find_in_store(url_or_key, store)
        expect_task, expect_key = url.rsplit("/", 2)[-2:]
    return _pull(url, root_of(cache_dir), quiet, expect_task, expect_key)


def local_or_pull(key: str, cache_dir: str | Path | None, store: str, quiet: bool = False) -> Path:
    """The local folder of the cache `key` (a folder, a key or its first digits), pulled from `store`
    first when no local cache has it. Workers that start together pull it once: the pull holds the
    key's lock, and the others then find it."""
    try:
        return resolve_cache(key, cache_dir)
    except CacheNotFound:
        return pull(key, cache_dir, store, quiet)


def pull_if_present(
    store: str, task: str, key: str, cache_dir: str | Path | None, quiet: bool = False
) -> Path | None:
    """For `cache-teacher --store`: pull `<store>/<task>/<key>` if the store has it complete, else None."""
    url = _join(store, task, key)
    fs, base = _filesystem(store)
    with _store_errors("read store", store):
        if not fs.exists(_join(base, task, key, mf.MANIFEST)):
            progress.info(f"{task}/{key} is not in the store {store}", quiet)
            return None
    return _pull(url, root_of(cache_dir), quiet, task, key)


def _read_remote_manifest(url: str) -> tuple[object, str, mf.Manifest, bytes]:
    fs, remote = _filesystem(url)
    where = _join(url, mf.MANIFEST)
    with _store_errors("read", url):
        if _is_local(fs) and not fs.isdir(remote):
            raise StoreError(f"no cache at {url} (no such folder)")
        if not fs.exists(_join(remote, mf.MANIFEST)):
            raise StoreError(
                f"no complete cache at {url}: no {mf.MANIFEST} (missing, or its push has not finished)"
            )
        raw = fs.cat_file(_join(remote, mf.MANIFEST))
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{where} is not valid JSON: {err}") from None
    try:
        manifest = mf.parse(manifest, Path(remote) / mf.MANIFEST)
        _check_identity(manifest, where)
    except CacheError as err:  # parse checked every field's type: this is the one line for all
        raise StoreError(f"refusing to pull {url}: {err}") from None
    return fs, remote, manifest, raw


def _pull(url: str, root: Path, quiet: bool, expect_task: str | None, expect_key: str | None) -> Path:
    fs, remote, manifest, raw = _read_remote_manifest(url)  # everything is checked before any download
    _check_identity(manifest, _join(url, mf.MANIFEST), expect_key, expect_task)
    try:
        mf.check_key(manifest, _join(url, mf.MANIFEST))
    except CacheError as err:
        raise StoreError(f"refusing to pull {url}: {err}") from None
    names = {s.file for s in manifest.shards()}
    _refuse_links(fs, remote, [mf.MANIFEST, *sorted(names)], url)
    task, key = manifest.task, manifest.key
    folder = cache_folder(root, task, key)
    if (folder / mf.MANIFEST).is_file():
        progress.info(f"{key} is already in {root}: nothing to pull", quiet)
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cache root {root} cannot be written: {err.strerror or err}") from None
    with key_lock(folder, quiet):
        if (folder / mf.MANIFEST).is_file():  # another process pulled or built it while we waited
            return folder
        staging = staging_folder(folder)
        staging.mkdir(exist_ok=True)
        for path in staging.iterdir():  # what a killed pull left half-written, or another version's shards
            if path.name not in names:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        todo = []
        for shard in manifest.shards():
            local = staging / shard.file
            if local.is_file() and sha256_file(local) == shard.sha256:
                continue  # verified by an earlier, interrupted pull
            todo.append(shard)
        total = sum(s.bytes or 0 for s in todo) / MIB or None
        with progress.bar(f"pull {key} (MiB)", total, unit="MiB", quiet=quiet) as bar:
            for shard in todo:
                _download(fs, _join(remote, shard.file), staging / shard.file, shard.sha256, url, bar)
                faults.point("pull-shard-downloaded")
        files.write_text(staging / mf.MANIFEST, raw.decode(), CacheError)
        _check_structure(staging, url)
        faults.point("pull-before-publish")
        _publish(staging, folder)
    progress.info(f"pulled {key}: {len(todo)} shard(s) downloaded into {folder}", quiet)
    return folder


def _check_structure(staging: Path, url: str) -> None:
    """What `cache verify` checks beyond the checksums the download already matched (datasets,
    shapes, row counts, unique example ids, no NaN), before the cache becomes visible."""
    from pkdpipe.cache.verify import verify_cache

    problems = verify_cache(staging, checksums=False).problems
    if problems:
        raise StoreError(f"refusing to install the cache from {url}: {problems[0]}")


def _refuse_links(fs, remote: str, names: list[str], url: str) -> None:
    """A store's files are regular files inside its key folder: a symlink (in a folder store)
    could install bytes from anywhere on the store's machine into the user's cache."""
    for name in names:
        with _store_errors("read", url):
            info = fs.info(_join(remote, name))
        if info.get("islink") or info.get("type") != "file":
            raise StoreError(f"refusing to pull {url}: {name} is not a regular file in the store")


def _download(fs, remote_path: str, local: Path, sha256: str, url: str, bar) -> None:
    """Stream one shard to its scratch name, hashing as it comes; keep it (as `local`) only if it
    matches the manifest's sha256."""
    digest = hashlib.sha256()
    with files.replace_file(local, CacheError) as tmp, open(tmp, "wb") as dst:
        with _store_errors("read", url):
            src = fs.open(remote_path, "rb")
        with src:
            while True:
                with _store_errors("read", url):
                    block = src.read(CHUNK)
                if not block:
                    break
                digest.update(block)
                dst.write(block)
                bar.advance(len(block) / MIB)
        if digest.hexdigest() != sha256:
            raise StoreError(
                f"checksum mismatch in {local.name} from {url}: the store's copy is corrupted; "
                "nothing was installed (repair it with `pkdpipe cache push KEY --force`)"
            )


def _publish(staging: Path, folder: Path) -> None:
    """Make the staged cache visible: one rename when the folder is new; otherwise (an interrupted
    build left an incomplete folder) shard by shard, the manifest last."""
    try:
        os.rename(staging, folder)  # also replaces an empty folder
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise CacheError(f"cannot move {staging} to {folder}: {err.strerror or err}") from None
    manifest_tmp = staging / mf.MANIFEST
    for path in sorted(staging.iterdir()):
        if path != manifest_tmp:
            os.replace(path, folder / path.name)
    os.replace(manifest_tmp, folder / mf.MANIFEST)
    staging.rmdir()


__all__ = ["find_in_store", "pull", "pull_if_present", "push"]

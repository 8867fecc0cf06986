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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from pkdpipe import faults, files, progress
from pkdpipe.cache import extents, schema
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
    if manifest.partial:
        raise CacheError(
            f"cache {folder} is a partial copy (layers {list(manifest.present)} of {manifest.layers}): "
            "push the full cache"
        )
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
    url_or_key: str,
    cache_dir: str | Path | None = None,
    store: str | None = None,
    quiet: bool = False,
    layers: Sequence[int] | None = None,
) -> Path:
    """Bring a cache from a store into the local cache root; return its folder `<root>/<task>/<key>`.

    `url_or_key` is a cache's full URL (`<store>/<task>/<key>`, or any folder holding a cache) or a
    key (or its first hex digits) looked up under `store`. Nothing becomes visible in the cache root
    unless every shard matched its checksum. A cache already complete locally is used as it is.

    `layers`: a partial copy holding only these [CLS] layers (and every row's ids, labels, logits
    and tokens), fetched dataset by dataset and each checked against its sha256; a local partial
    copy gains the missing ones. The key stays the full cache's. A cache made before per-dataset
    checksums is pulled whole.
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
    return _pull(url, root_of(cache_dir), quiet, expect_task, expect_key, layers)


def local_or_pull(
    key: str,
    cache_dir: str | Path | None,
    store: str,
    quiet: bool = False,
    layers: Sequence[int] | None = None,
) -> Path:
    """The local folder of the cache `key` (a folder, a key or its first digits), pulled from `store`
    first when no local cache has it (or, with `layers`, when the local copy lacks some of them:
    then only those are fetched). Workers that start together pull it once: the pull holds the
    key's lock, and the others then find it."""
    try:
        folder = resolve_cache(key, cache_dir)
    except CacheNotFound:
        return pull(key, cache_dir, store, quiet, layers)
    if not (folder / mf.MANIFEST).is_file():  # what an interrupted build left: the pull completes it
        return pull(folder.name, folder.parent.parent, store, quiet, layers)
    local = _local_manifest(folder)
    wanted = local.layers if local is not None and layers is None else layers
    if local is None or not local.partial or set(wanted) <= set(local.present):
        return folder  # a complete copy, or a manifest that cannot be read (the reader names its problem)
    return pull(local.key, folder.parent.parent, store, quiet, layers)


def local_or_pull_for(
    key: str,
    cache_dir: str | Path | None,
    store: str,
    needs: Callable[[mf.Manifest], Sequence[int]],
    quiet=False,
) -> Path:
    """`local_or_pull` of the layers `needs(manifest)` names (a student's layer map, known once the
    cache's manifest is: from the local copy where there is one, else from the store)."""
    try:
        manifest = _local_manifest(resolve_cache(key, cache_dir))
    except CacheNotFound:
        manifest = None
    if manifest is None:
        url = key if _looks_like_url(key) else find_in_store(key, store)
        manifest = _read_remote_manifest(url)[2]
    return local_or_pull(key, cache_dir, store, quiet, list(needs(manifest)))


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


def _pull(
    url: str,
    root: Path,
    quiet: bool,
    expect_task: str | None,
    expect_key: str | None,
    layers: Sequence[int] | None = None,
) -> Path:
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
    wanted = _wanted_layers(manifest, layers, quiet)
    if _holds(folder, wanted):
        progress.info(f"{key} is already in {root}: nothing to pull", quiet)
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cache root {root} cannot be written: {err.strerror or err}") from None
    with key_lock(folder, quiet):
        if _holds(folder, wanted):  # another process pulled or built it while we waited
            return folder
        staging = staging_folder(folder)
        staging.mkdir(exist_ok=True)
        for path in staging.iterdir():  # what a killed pull left half-written, or another version's shards
            if path.name not in names:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if wanted is None:
            done = _download_all(fs, remote, manifest, staging, url, quiet)
        else:
            wanted = sorted(set(wanted) | set(_local_present(folder)))  # add to what is here
            data = json.loads(raw)
            data["layers_present"] = wanted
            raw = json.dumps(data, indent=2).encode() + b"\n"
            done = _fetch_layers(fs, remote, manifest, wanted, folder, staging, url, quiet)
        files.write_text(staging / mf.MANIFEST, raw.decode(), CacheError)
        _check_structure(staging, url)
        faults.point("pull-before-publish")
        _publish(staging, folder)
    progress.info(f"pulled {key}: {done} into {folder}", quiet)
    return folder


def _wanted_layers(manifest: mf.Manifest, layers: Sequence[int] | None, quiet: bool) -> list[int] | None:
    """The layers a pull of `layers` fetches, or None for the whole cache: all of them asked for,
    or a cache made before per-dataset checksums (pulled whole, with a note)."""
    if layers is None:
        return None
    unknown = sorted(set(layers) - set(manifest.layers))
    if unknown:
        raise StoreError(
            f"cache {manifest.key} stores layers {manifest.layers}, not {unknown}: nothing was pulled"
        )
    if set(layers) >= set(manifest.layers):
        return None
    if any(shard.datasets is None for shard in manifest.shards()):
        progress.info(
            f"note: cache {manifest.key} was made before per-dataset checksums: pulling all of it", quiet
        )
        return None
    return sorted(set(layers))


def _local_manifest(folder: Path) -> mf.Manifest | None:
    """The local copy's manifest, or None when there is no complete, readable one."""
    if not (folder / mf.MANIFEST).is_file():
        return None
    try:
        return mf.read(folder)
    except CacheError:
        return None


def _local_present(folder: Path) -> tuple[int, ...]:
    local = _local_manifest(folder)
    return local.present if local is not None else ()


def _holds(folder: Path, wanted: list[int] | None) -> bool:
    """Whether the local copy already holds what a pull of `wanted` (None: everything) brings: a
    partial copy that later pulls completed to every layer holds all a run can read."""
    local = _local_manifest(folder)
    if local is None:
        return False
    return set(local.layers if wanted is None else wanted) <= set(local.present)


def _download_all(fs, remote: str, manifest: mf.Manifest, staging: Path, url: str, quiet: bool) -> str:
    """Every shard, whole, into `staging` (those an interrupted pull verified there are kept)."""
    todo = []
    for shard in manifest.shards():
        local = staging / shard.file
        if local.is_file() and sha256_file(local) == shard.sha256:
            continue  # verified by an earlier, interrupted pull
        todo.append(shard)
    total = sum(s.bytes or 0 for s in todo) / MIB or None
    with progress.bar(f"pull {manifest.key} (MiB)", total, unit="MiB", quiet=quiet) as bar:
        for shard in todo:
            _download(fs, _join(remote, shard.file), staging / shard.file, shard.sha256, url, bar)
            faults.point("pull-shard-downloaded")
    return f"{len(todo)} shard(s) downloaded"


def _fetch_layers(
    fs, remote: str, manifest: mf.Manifest, wanted: list[int], folder: Path, staging: Path, url: str, quiet
) -> str:
    """Shards holding the datasets a copy of layers `wanted` needs (`pkdpipe.cache.extents`) into
    `staging`: each taken from the local copy's shard, or from what an interrupted pull staged,
    where that holds it unchanged, else fetched from the store as its one byte range; every one
    checked against its sha256 before the shard is written. A staged shard that already holds them
    all is kept. One shard's datasets are in memory at a time."""
    plan, fetched = [], 0
    for shard in manifest.shards():
        try:
            need = extents.needed(manifest, shard, wanted)
        except CacheError as err:
            raise StoreError(f"refusing to pull {url}: {err}") from None
        unrecorded = sorted(set(need) - set(shard.datasets or {}))
        if unrecorded:
            raise StoreError(f"refusing to pull {url}: {shard.file} records no extent of {unrecorded[0]}")
        if _staged(staging / shard.file, shard, need):
            continue
        held = {
            name: path
            for path in (staging / shard.file, folder / shard.file)
            for name in _usable(path, shard, need, read=False)
        }
        plan.append((shard, need, held))
    total = sum(shard.datasets[n].bytes for shard, need, held in plan for n in need if n not in held)
    with progress.bar(f"pull {manifest.key} (MiB)", total / MIB or None, unit="MiB", quiet=quiet) as bar:
        for shard, need, held in plan:
            arrays = {}
            for path in set(held.values()):  # read again now: a dataset changed since is fetched
                arrays.update(_usable(path, shard, {n: need[n] for n, p in held.items() if p == path}))
            for name, (shape, dtype) in need.items():
                if name in arrays:
                    continue
                extent = shard.datasets[name]
                if extent.bytes != int(np.prod(shape)) * np.dtype(dtype).itemsize:  # before reading it
                    raise StoreError(f"refusing to pull {url}: {shard.file}:{name} is not {shape} {dtype}")
                data = _fetch_range(fs, _join(remote, shard.file), extent, url)
                if hashlib.sha256(data).hexdigest() != extent.sha256:
                    raise StoreError(
                        f"checksum mismatch in {shard.file}:{name} from {url}: the store's copy is "
                        "corrupted; nothing was installed (repair it with `pkdpipe cache push KEY --force`)"
                    )
                arrays[name] = extents.from_bytes(data, shape, dtype)
                fetched += len(data)
                bar.advance(len(data) / MIB)
            extents.write(staging / shard.file, arrays)
            faults.point("pull-shard-downloaded")
    shown = ",".join(map(str, wanted)) or "none"
    return f"layers {shown}, {fetched / MIB:.1f} MiB fetched for {len(plan)} shard(s)"


def _fetch_range(fs, path: str, extent: mf.Extent, url: str) -> bytes:
    """One dataset's bytes: a ranged read of the store's shard (one GET over S3)."""
    if not extent.bytes:
        return b""
    with _store_errors("read", url):
        data = fs.cat_file(path, start=extent.offset, end=extent.offset + extent.bytes)
    if len(data) != extent.bytes:
        raise StoreError(f"{path} from {url} is shorter than its manifest says (truncated in the store)")
    return data


def _staged(path: Path, shard: mf.Shard, need: dict) -> bool:
    """Whether an interrupted pull left `path` holding every dataset of `need`, each matching."""
    return path.is_file() and not _open_problem(path, shard, need)


def _usable(path: Path, shard: mf.Shard, need: dict, read: bool = True) -> dict[str, np.ndarray | None]:
    """The datasets of `need` the shard file `path` (the local copy's or a staged one) holds, each
    matching its sha256: their values, or None for each with `read=False` (nothing kept)."""
    found = {}
    if not path.is_file() or path.is_symlink():
        return found
    try:
        with h5py.File(path, "r") as f:
            if schema.indirection(f):
                return found
            for name in need:
                if name in f and not extents.problem(f, shard, [name]):
                    found[name] = f[name][:] if read else None
    except OSError:
        return {}
    return found


def _open_problem(path: Path, shard: mf.Shard, need: dict) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            return schema.indirection(f) or extents.problem(f, shard, need)
    except OSError as err:
        return str(err)


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


__all__ = ["find_in_store", "local_or_pull", "local_or_pull_for", "pull", "pull_if_present", "push"]

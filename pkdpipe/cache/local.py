"""The local cache root: where caches live, finding one, the lock of a key, and housekeeping.

    <root>/<task>/<key>/              one cache (complete when it holds manifest.json)
    <root>/<task>/.<key>.lock         the key's lock: held while a process builds or pulls it
    <root>/<task>/.<key>.partial/     the staging folder of a pull in progress

The root is `--cache-dir`, else `$PKDPIPE_CACHE_DIR`, else `~/.cache/pkdpipe`. Builds and pulls of
one key hold its lock (under torchrun rank 0 holds it for all the ranks), so one process does the
work while the others wait, and `gc` and `rm` leave a key alone while its lock is held.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pkdpipe import files, progress
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import KEY_LENGTH
from pkdpipe.errors import CacheError, CacheNotFound
from pkdpipe.paths import default_cache_root

PARTIAL = files.PARTIAL  # the staging folder of a pull: <root>/<task>/.<key>.partial/


def root_of(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_root()


def cache_folder(cache_dir: str | Path | None, task: str, key: str) -> Path:
    """Where the cache of `task` with `key` lives: `<root>/<task>/<key>/` (the one place it is spelled)."""
    return root_of(cache_dir) / task / key


# -- finding caches --------------------------------------------------------------------------------
def list_caches(cache_dir: str | Path | None = None) -> list[Path]:
    """Every cache folder under the root, complete or not (`<root>/<task>/<key>/`)."""
    root = root_of(cache_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith("."))


def latest_cache(cache_dir: str | Path | None = None, task: str | None = None) -> Path:
    """The most recently completed cache of `task` under the root. Without a task, the root must
    hold caches of one task only: the newest cache of another task is never taken silently."""
    complete = [p for p in list_caches(cache_dir) if (p / mf.MANIFEST).is_file() and _in_place(p)]
    if task:
        complete = [p for p in complete if p.parent.name == task]
    where = f"{root_of(cache_dir)}" + (f" for task {task}" if task else "")
    if not complete:
        raise CacheError(f"no complete cache under {where}: run cache-teacher first, or pass --cache PATH")
    tasks = sorted({p.parent.name for p in complete})
    if len(tasks) > 1:
        raise CacheError(
            f"the cache root {root_of(cache_dir)} holds caches of several tasks ({', '.join(tasks)}): "
            "pass --task NAME or --cache PATH_OR_KEY"
        )
    return max(complete, key=lambda p: (p / mf.MANIFEST).stat().st_mtime)


def _in_place(folder: Path) -> bool:
    """Whether the cache in `folder` is the one its place names, `<task>/<key>`: another task's cache
    moved under this task's folder is not this task's newest cache (one that cannot be read is left
    for the reader to name)."""
    try:
        m = mf.read(folder)
    except CacheError:
        return True
    return m.task == folder.parent.name


def resolve_cache(
    path_or_key: str | None, cache_dir: str | Path | None = None, task: str | None = None
) -> Path:
    """A cache folder from a path, a key (looked up under the root), or None (the newest of `task`)."""
    if not path_or_key:
        return latest_cache(cache_dir, task)
    path = Path(path_or_key).expanduser()
    if path.is_dir():
        return path
    matches = [p for p in list_caches(cache_dir) if p.name.startswith(path_or_key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise CacheError(f"key {path_or_key!r} matches several caches: {', '.join(str(m) for m in matches)}")
    raise CacheNotFound(f"no cache {path_or_key!r}: not a folder, and no such key under {root_of(cache_dir)}")


# -- the lock of a key -----------------------------------------------------------------------------
def lock_file(folder: Path) -> Path:
    """The lock of one key, `<root>/<task>/.<key>.lock`: builds and pulls of the key share it."""
    return folder.parent / f".{folder.name}.lock"


def staging_folder(folder: Path) -> Path:
    """Where a pull gathers a cache before it becomes visible: `<root>/<task>/.<key>.partial/`."""
    return folder.parent / f".{folder.name}{PARTIAL}"


@contextmanager
def key_lock(folder: Path, quiet: bool = False) -> Iterator[None]:
    """Hold the key's exclusive lock, waiting (and saying so) while another process holds it."""

    def say_so():
        progress.info(f"waiting for another process working on {folder.name} ...", quiet)

    with files.exclusive_lock(lock_file(folder), on_wait=say_so, error=CacheError):
        yield


@contextmanager
def _try_lock(folder: Path) -> Iterator[bool]:
    """Take the key's lock without waiting; yield whether we got it (False: a process is using it)."""
    if not folder.parent.is_dir():
        yield True
        return
    with files.exclusive_lock(lock_file(folder), wait=False, error=CacheError) as got:
        yield got


# -- what is there ---------------------------------------------------------------------------------
@dataclass
class LocalCache:
    """One row of `cache ls`."""

    path: Path
    task: str
    key: str
    complete: bool
    bytes: int  # size on disk of everything in the folder
    teacher: str | None = None
    examples: dict[str, int] | None = None  # per split
    layers: list[int] | None = None  # the layers this copy holds (fewer than stored when partial)
    partial: bool = False  # pulled with --layers: the cache's key, some of its layers
    dtype: str | None = None
    created: str | None = None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_local(cache_dir: str | Path | None = None) -> list[LocalCache]:
    """Every cache folder under the root, complete or not, with what its manifest says."""
    rows = []
    for folder in list_caches(cache_dir):
        row = LocalCache(folder, folder.parent.name, folder.name, complete=False, bytes=_size(folder))
        try:
            m = mf.read(folder)
        except CacheError:
            rows.append(row)
            continue
        row.complete = True
        row.teacher = m.teacher.name_or_path
        row.examples = {split: info.examples for split, info in m.splits.items()}
        row.layers = list(m.present)
        row.partial = m.partial
        row.dtype = m.hidden_dtype
        row.created = m.created
        rows.append(row)
    return rows


# What pkdpipe itself makes under the root: key folders holding the manifest, shards named as
# manifest.shard_name names them, and the scratch names of pkdpipe.files. Anything else is not ours.
_KEY_FOLDER = re.compile(rf"^[0-9a-f]{{{KEY_LENGTH}}}$")
_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*-\d{5}-of-\d{5}\.h5$")
_CACHE_FILE = re.compile(rf"^({re.escape(mf.MANIFEST)}|{_SHARD.pattern[1:-1]})$")


def _ours(name: str) -> bool:
    return bool(_CACHE_FILE.match(name)) or files.is_scratch(name)


def _looks_like_cache(folder: Path) -> bool:
    """A key-named folder holding nothing but what a build or a pull writes."""
    return (
        folder.is_dir()
        and bool(_KEY_FOLDER.match(folder.name))
        and all(p.is_file() and _ours(p.name) for p in folder.iterdir())
    )


def _owner(entry: Path) -> Path | None:
    """The key folder whose lock guards `entry`, when `entry` is pkdpipe's: a key folder, or the
    hidden staging folder of a pull of one. None for anything else."""
    if not entry.is_dir():
        return None
    if entry.name.startswith(".") and entry.name.endswith(PARTIAL):
        folder = entry.parent / entry.name[1 : -len(PARTIAL)]
        return folder if _KEY_FOLDER.match(folder.name) else None
    return entry if _looks_like_cache(entry) else None


def _leftovers(entry: Path) -> list[Path]:
    """What gc removes of `entry`: a staging folder or an incomplete key folder whole; in a complete
    cache, scratch files and shards its manifest does not list."""
    if not entry.exists():
        return []  # moved into place (or removed) while we waited for the lock
    if entry.name.startswith("."):
        return [entry]
    if not (entry / mf.MANIFEST).is_file():
        return [entry] if _looks_like_cache(entry) else []
    listed = _listed(entry)
    return [p for p in entry.iterdir() if files.is_scratch(p.name) or _unlisted(p, listed)]


def _listed(folder: Path) -> set[str]:
    try:
        return {s.file for s in mf.read(folder).shards()}
    except CacheError:
        return set()


def _unlisted(path: Path, listed: set[str]) -> bool:
    return bool(_SHARD.match(path.name)) and bool(listed) and path.name not in listed


# -- housekeeping ----------------------------------------------------------------------------------
def remove(path_or_key: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, int]:
    """Delete one local cache (a folder, or a key under the root); return (folder, bytes freed).
    Refuses a folder holding anything a cache does not, and one another process is using."""
    folder = resolve_cache(str(path_or_key), cache_dir).resolve()
    if not _looks_like_cache(folder):
        raise CacheError(
            f"{folder} does not look like a pkdpipe cache folder (it holds other files): not removing it"
        )
    with _try_lock(folder) as got:
        if not got:
            raise CacheError(
                f"{folder} is in use by another process (building or pulling it): not removing it"
            )
        freed = _size(folder)
        staging = staging_folder(folder)
        try:
            (folder / mf.MANIFEST).unlink(missing_ok=True)  # first: the cache stops being complete at once
            shutil.rmtree(folder)
            if staging.is_dir():
                freed += _size(staging)
                shutil.rmtree(staging)
        except OSError as err:
            raise CacheError(f"cannot remove {folder}: {err.strerror or err}") from None
    return folder, freed


def gc(cache_dir: str | Path | None = None) -> list[tuple[Path, int]]:
    """Remove incomplete leftovers under the cache root; return (path, bytes) of what was freed.

    Only what pkdpipe can prove is its own leftover: staging folders of interrupted pulls
    (`.<key>.partial`), key folders without a manifest that hold nothing but shards and scratch
    files (interrupted builds: their finished shards, which a rerun would have resumed from), and,
    in complete caches, scratch files and shards the manifest does not list (from a build with
    another --shard-size). Any other folder or file under the root is left alone. A key whose lock
    some process holds (a build or pull in progress) is skipped. Lock files themselves stay:
    removing one while another process waits on it would let two processes in at once.
    """
    root = root_of(cache_dir)
    freed: list[tuple[Path, int]] = []
    if not root.is_dir():
        return freed
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(task_dir.iterdir()):
            folder = _owner(entry)
            if folder is None:
                continue
            with _try_lock(folder) as got:
                if not got:
                    continue
                for target in _leftovers(entry):  # decided under the lock: a pull may just have finished
                    size = _size(target)
                    try:
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    except OSError as err:
                        raise CacheError(f"cannot remove {target}: {err.strerror or err}") from None
                    freed.append((target, size))
    return freed


__all__ = [
    "LocalCache",
    "cache_folder",
    "gc",
    "key_lock",
    "latest_cache",
    "list_caches",
    "list_local",
    "lock_file",
    "remove",
    "resolve_cache",
]

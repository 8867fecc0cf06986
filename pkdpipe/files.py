"""Writing so that readers see all or nothing, and the locks that keep two processes off one key.

Every file and folder pkdpipe writes goes through here, and so does every name it writes on the
way, so the housekeeping that removes leftovers (`cache gc`, a resumed run) recognises exactly its
own: `is_scratch` accepts the names `scratch`, `partial` and `superseded` give, and nothing else.

- A file is written as `<name>.tmp`, flushed to disk and renamed over `<name>` (`replace_file`).
- A folder is written as `<name>.partial/` and swapped in with two renames, the previous version
  waiting as `<name>.old/` in between (`replace_dir`); `restore_dir` undoes a kill that fell
  between the renames, so at any moment there is a whole old or a whole new folder.
- A folder is removed by renaming it to `<name>.deleting/` and deleting that (`remove_dir`).
- `probe_writable` checks a folder by writing `.write-probe-<pid>.tmp` there (one per process, as
  torchrun ranks probe at once).
- `exclusive_lock` is an flock on a lock file: one process works, the others wait (or skip).
- Whatever is renamed into place gets the permissions the umask gives a new file (`follow_umask`):
  libraries that write through `tempfile` (transformers' `save_pretrained`) leave 0600, which a
  teammate reading a shared folder cannot open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pkdpipe import faults
from pkdpipe.errors import DiskFullError, PkdError

TMP = ".tmp"  # a file being written: <name>.tmp
PARTIAL = ".partial"  # a folder being written: <name>.partial/
OLD = ".old"  # a folder's previous version while a new one is swapped in: <name>.old/
DELETING = ".deleting"  # a folder being removed: renamed first, so no half of it keeps its name
PROBE = ".write-probe-"  # .write-probe-<pid>.tmp: a write test, removed at once


def scratch(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(path.name + TMP)


def partial(folder: Path) -> Path:
    """Where a new version of `folder` is written before it is swapped in."""
    return folder.with_name(folder.name + PARTIAL)


def superseded(folder: Path) -> Path:
    """Where the previous version of `folder` waits while the new one moves in."""
    return folder.with_name(folder.name + OLD)


def is_scratch(name: str) -> bool:
    """True for a name that `scratch`, `partial`, `superseded`, `remove_dir` or `probe_writable` gives."""
    return name.endswith((TMP, PARTIAL, OLD, DELETING))


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("No space left", "File too large", "Disk quota", "StorageFull", "FileTooLarge")


def is_disk_full(err: BaseException) -> bool:
    """A full disk, a quota or a file-size limit, whichever library reports it: an OSError, or the
    RuntimeError of HDF5 ("errno = 28") or the SafetensorError of safetensors ("code: 28")."""
    if isinstance(err, OSError) and err.errno in _FULL:
        return True
    text = str(err)
    return any(t in text for t in _FULL_TEXT) or any(
        f"errno = {code}" in text or f"code: {code}" in text for code in _FULL
    )


def write_error(
    path: Path,
    err: BaseException,
    error: type[PkdError] = PkdError,
    advice: str = "free some space and rerun",
) -> PkdError:
    """One line for a failed write; a full disk (or a file-size limit) says what to do."""
    if is_disk_full(err):
        return DiskFullError(f"no space left on device while writing {path}: {advice}")
    if isinstance(err, PermissionError):
        return error(f"cannot write {path}: permission denied")
    return error(f"cannot write {path}: {getattr(err, 'strerror', None) or err}")


def file_mode() -> int:
    """The mode the umask gives a new file (0644 under the usual 022). The umask can only be read
    by setting it, so it is set back at once."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, every file under it) the mode of a freshly created file,
    whatever mode the library that wrote it chose (`tempfile` makes 0600)."""
    mode = file_mode()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def fsync_and_rename(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk and rename it over `path` (atomic on one filesystem), with the umask's mode."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    follow_umask(tmp)
    os.replace(tmp, path)


@contextmanager
def replace_file(path: Path, error: type[PkdError] = PkdError) -> Iterator[Path]:
    """`with replace_file(p) as tmp: write tmp` - `p` appears whole or not at all.

    On any exception the scratch file is removed; an OSError becomes one `error` line."""
    tmp = scratch(path)
    try:
        yield tmp
        fsync_and_rename(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err, error) from None
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise write_error(path, err, error) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, error: type[PkdError] = PkdError) -> None:
    """Write a whole text file so that readers see either the old file or the new one."""
    with replace_file(path, error) as tmp:
        tmp.write_text(text)


RESUMES = "free some space and rerun: training resumes from its last checkpoint"


@contextmanager
def replace_dir(folder: Path, error: type[PkdError] = PkdError, advice: str = RESUMES) -> Iterator[Path]:
    """`with replace_dir(f) as new: fill new` - then `f` is swapped for `new`.

    The new version is written into `<f>.partial/`; a kill while writing leaves `f` as it was.
    The swap is two renames (`f` -> `<f>.old`, `<f>.partial` -> `f`); call `restore_dir(f)` before
    reading `f` again to undo a kill between them."""
    new, old = partial(folder), superseded(folder)
    shutil.rmtree(new, ignore_errors=True)
    try:
        new.mkdir(parents=True)
        yield new
        follow_umask(new)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        faults.point(f"between-renames:{folder.name}")
        new.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(new, ignore_errors=True)
        raise write_error(folder, err, error, advice) from None
    except Exception as err:  # a library's own error for a full disk (safetensors, HDF5)
        shutil.rmtree(new, ignore_errors=True)
        if is_disk_full(err):
            raise write_error(folder, err, error, advice) from None
        raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def restore_dir(folder: Path) -> bool:
    """Put back the previous version of `folder` if a kill fell between `replace_dir`'s renames;
    return whether `folder` exists now."""
    old = superseded(folder)
    if not folder.exists() and old.exists():
        old.rename(folder)
    return folder.exists()


def remove_dir(folder: Path) -> None:
    """Delete `folder` and whatever `replace_dir` left of it on the way.

    The folder is renamed to `<name>.deleting` first (one atomic step), then deleted: a kill during
    the deletion leaves a scratch folder, never `folder` with some of its files gone (a checkpoint
    missing only its "finished" marker would be resumed and train past the run's best model)."""
    doomed = folder.with_name(folder.name + DELETING)
    if folder.exists():
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            folder.rename(doomed)
        except OSError:  # cannot be renamed (a read-only parent): delete what can be, in place
            doomed = folder
        faults.point(f"removing:{folder.name}")
    for path in (doomed, folder, partial(folder), superseded(folder)):
        shutil.rmtree(path, ignore_errors=True)


def probe_writable(folder: Path, error: type[PkdError] = PkdError, what: str = "folder") -> None:
    """Create `folder` if needed and check that files can be written in it, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{PROBE}{os.getpid()}{TMP}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise error(f"{what} {folder} cannot be written: {err.strerror or err}") from None


@contextmanager
def exclusive_lock(
    path: Path,
    *,
    wait: bool = True,
    on_wait: Callable[[], None] | None = None,
    error: type[PkdError] = PkdError,
) -> Iterator[bool]:
    """Hold an exclusive flock on the file `path` (created if missing); yield True once held.

    With `wait=False` yield False at once when another process holds it. `on_wait` is called once
    before blocking (to say that we wait). A lock file that cannot be opened (another user's, in a
    shared folder) is one `error` line."""
    try:
        handle = open(path, "a")  # noqa: SIM115 (held open for the lock's lifetime)
    except OSError as err:
        raise error(f"cannot take the lock {path}: {err.strerror or err}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

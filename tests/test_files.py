"""pkdpipe.files: all-or-nothing writes, the scratch names they use, and the key lock."""

from __future__ import annotations

import errno
import os

import pytest

from pkdpipe import files
from pkdpipe.errors import CacheError, DiskFullError, PkdError


def test_replace_file_writes_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "manifest.json"
    files.write_text(path, "old")
    with pytest.raises(RuntimeError), files.replace_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    files.write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "shard.h5"
    with pytest.raises(DiskFullError) as err, files.replace_file(path, CacheError):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"no space left on device while writing {path}: free some space and rerun"
    assert not list(tmp_path.iterdir())


def test_replace_dir_swaps_in_a_whole_folder(tmp_path):
    folder = tmp_path / "best"
    with files.replace_dir(folder) as new:
        (new / "weights").write_text("1")
    with pytest.raises(KeyboardInterrupt), files.replace_dir(folder) as new:
        (new / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (folder / "weights").read_text() == "1"
    with files.replace_dir(folder) as new:
        (new / "weights").write_text("2")
    assert (folder / "weights").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_restore_dir_undoes_a_kill_between_the_renames(tmp_path):
    folder = tmp_path / "checkpoint"
    files.superseded(folder).mkdir()  # what a kill after the first rename leaves
    (files.superseded(folder) / "state.json").write_text("{}")
    assert files.restore_dir(folder) and (folder / "state.json").is_file()
    assert not files.superseded(folder).exists()
    assert not files.restore_dir(tmp_path / "never-written")


def test_every_name_the_helpers_write_is_recognised_as_scratch(tmp_path):
    path = tmp_path / "x.h5"
    names = [files.scratch(path).name, files.partial(path).name, files.superseded(path).name]
    names.append(f"{files.PROBE}{os.getpid()}{files.TMP}")
    assert all(files.is_scratch(name) for name in names)
    assert not any(files.is_scratch(name) for name in ("x.h5", "manifest.json", "my-notes.txt"))


def test_probe_writable_leaves_nothing_and_refuses_an_unwritable_folder(tmp_path):
    files.probe_writable(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PkdError, match=f"folder {blocker}/sub cannot be written"):
        files.probe_writable(blocker / "sub")


def test_a_held_lock_is_not_taken_twice(tmp_path):
    lock = tmp_path / ".key.lock"
    with files.exclusive_lock(lock) as got:
        assert got
        with files.exclusive_lock(lock, wait=False) as second:
            assert second is False
    with files.exclusive_lock(lock, wait=False) as again:
        assert again

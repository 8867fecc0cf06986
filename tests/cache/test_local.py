"""pkdpipe.cache.local: the local cache root, listed, removed from and tidied."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pkdpipe.cache import local as cache_root
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.verify import verify_cache
from pkdpipe.errors import CacheError


def copy_cache(cache: Path, root: Path) -> Path:
    dest = root / cache.parent.name / cache.name
    shutil.copytree(cache, dest)
    return dest


# -- the local root: ls, rm, gc --------------------------------------------------------------------
def test_list_local_shows_complete_and_incomplete_caches(tiny_cache, tmp_path):
    folder = copy_cache(tiny_cache, tmp_path)
    (tmp_path / "tiny" / "0123456789abcdef").mkdir()
    rows = {r.key: r for r in cache_root.list_local(tmp_path)}
    assert rows[folder.name].complete and rows[folder.name].examples == {"train": 96, "dev": 30}
    assert rows[folder.name].bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert rows[folder.name].teacher == str(Path(mf.read(folder)["teacher"]["name_or_path"]))
    assert rows[folder.name].dtype == "float16" and rows[folder.name].layers == [0, 1, 2, 3, 4]
    assert not rows["0123456789abcdef"].complete


def test_remove_deletes_a_cache_by_key_but_not_a_foreign_folder(tiny_cache, tmp_path):
    folder = copy_cache(tiny_cache, tmp_path)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert cache_root.remove(folder.name[:8], tmp_path) == (folder, size)
    assert not folder.exists()
    precious = tmp_path / "tiny" / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(CacheError, match="does not look like a pkdpipe cache"):
        cache_root.remove(str(precious))
    assert (precious / "thesis.tex").exists()


def test_gc_removes_leftovers_but_not_complete_caches_or_keys_in_use(tiny_cache, tmp_path):
    folder = copy_cache(tiny_cache, tmp_path)
    task = folder.parent
    (folder / ".manifest.json.tmp").write_text("{}")
    incomplete = task / "0123456789abcdef"
    incomplete.mkdir()
    (incomplete / "train-00000-of-00003.h5").write_bytes(b"x" * 100)
    partial = task / f".fedcba9876543210{cache_root.PARTIAL}"
    partial.mkdir()
    (partial / "train-00000-of-00003.h5.tmp").write_bytes(b"y" * 50)
    busy = task / "aaaaaaaaaaaaaaaa"
    busy.mkdir()
    foreign = task / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")

    with cache_root.key_lock(busy):  # a build in progress keeps its folder
        freed = dict(cache_root.gc(tmp_path))
    assert freed == {folder / ".manifest.json.tmp": 2, incomplete: 100, partial: 50}
    assert verify_cache(folder).ok
    assert busy.exists() and foreign.exists() and not incomplete.exists() and not partial.exists()
    assert dict(cache_root.gc(tmp_path)) == {busy: 0}
    assert cache_root.gc(tmp_path / "nothing-here") == []


def test_a_probe_left_by_a_killed_build_does_not_hide_a_cache_from_gc_or_rm(tiny_cache, tmp_path):
    """cache-teacher probes the key's folder before building; a kill between writing and removing
    the probe leaves it there. gc and rm recognise it as pkdpipe's own scratch file."""
    from pkdpipe import files

    probe = f"{files.PROBE}12345{files.TMP}"
    folder = copy_cache(tiny_cache, tmp_path)
    (folder / probe).write_bytes(b"")
    incomplete = folder.parent / "0123456789abcdef"
    incomplete.mkdir()
    (incomplete / probe).write_bytes(b"")
    assert dict(cache_root.gc(tmp_path)) == {folder / probe: 0, incomplete: 0}
    (folder / probe).write_bytes(b"")
    assert cache_root.remove(folder.name, tmp_path)[0] == folder and not folder.exists()

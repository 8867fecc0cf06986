"""A full disk, played by a file-size limit on a real process: one line that says what to do, no
temporary file left, the finished work kept, and the same command completes once there is room."""

from __future__ import annotations

import re

from helpers import assert_ok, one_error_line, pkdpipe, same_weights

from pkdpipe.cache.local import list_caches
from pkdpipe.cache.verify import verify_cache


def test_cache_teacher_on_a_full_disk_keeps_its_finished_shards(tiny, tiny_cache, tmp_path):
    args = ["cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"], "--cache-dir", tmp_path,
            "--shard-size", 40, "--batch-size", 16]  # fmt: skip
    first, second = (tiny_cache / f"train-0000{i}-of-00003.h5" for i in (0, 1))
    assert second.stat().st_size > first.stat().st_size
    line = one_error_line(pkdpipe(*args, file_limit=first.stat().st_size + 1))  # room for shard 0 only
    assert re.fullmatch(
        r"error: no space left on device while writing .*/train-00001-of-00003\.h5: free \d+ MB "
        r"\(or use --cache-dir elsewhere\) and rerun; finished shards are kept",
        line,
    ), line
    (folder,) = list_caches(tmp_path)
    assert not list(folder.glob("*.tmp")) and not (folder / "manifest.json").exists()
    assert [p.name for p in folder.glob("*.h5")] == [first.name]  # what fitted is kept for the rerun
    assert_ok(pkdpipe(*args))
    assert verify_cache(folder).ok


def test_distill_on_a_full_disk_resumes_once_there_is_room(tiny_cache, tmp_path):
    def args(output):
        return ["distill", "--cache", tiny_cache, "--strategy", "skip", "--layers", 2, "--output", output,
                "--epochs", 2, "--batch-size", 8, "--lr", "1e-3", "--checkpoint-every", 5]  # fmt: skip

    output = tmp_path / "student"
    line = one_error_line(pkdpipe(*args(output), file_limit=20_000))  # below one copy of the weights
    assert line == (
        f"error: no space left on device while writing {output / 'checkpoint'}: free some space and "
        "rerun: training resumes from its last checkpoint"
    )
    assert not [p for p in output.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert_ok(pkdpipe(*args(output)))
    assert_ok(pkdpipe(*args(tmp_path / "straight")))
    same_weights(output, tmp_path / "straight")

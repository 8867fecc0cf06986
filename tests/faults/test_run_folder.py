"""The output folder of a training run: the best model outlives any kill during the final clean-up,
a folder that holds somebody else's model or cache is never written, two runs never share a folder,
and a finished run is not trained again by a rerun of its own command."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_killed, assert_ok, leftovers, one_error_line, pkdpipe, same_weights


def distill_args(cache: Path, output: Path, *extra) -> list:
    return ["distill", "--cache", cache, "--strategy", "skip", "--layers", 2, "--output", output,
            "--epochs", 3, "--batch-size", 8, "--lr", "1e-3", "--checkpoint-every", 2, *extra]  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory) -> Path:
    """A finished distill: what every rerun below must leave exactly as it is."""
    output = tmp_path_factory.mktemp("finished") / "student"
    assert_ok(pkdpipe(*distill_args(tiny_cache, output)))
    return output


def test_a_checkpoint_that_lost_its_finished_marker_does_not_replace_the_best_model(
    tiny_cache, finished, tmp_path
):
    """What rmtree leaves when a kill lands inside it on a file system that lists the newest file
    first (tmpfs): the checkpoint without finished.json. Resumed, it would train on from its last
    step and finish with those weights instead of the best step's."""
    output = tmp_path / "student"
    assert_killed(pkdpipe(*distill_args(tiny_cache, output), kill_at="finished-before-checkpoint-removal"))
    (output / "checkpoint" / "finished.json").unlink()
    before = digest(output)
    assert_ok(pkdpipe(*distill_args(tiny_cache, output)))
    assert digest(output) == before  # nothing trained again, nothing rewritten
    same_weights(output, finished)
    assert json.loads((output / "metrics.json").read_text())["best_step"] == 12  # the best epoch, not 36
    assert leftovers(output) == []


def test_a_kill_while_the_checkpoint_is_removed_leaves_a_finished_run(tiny_cache, finished, tmp_path):
    output = tmp_path / "student"
    assert_killed(pkdpipe(*distill_args(tiny_cache, output), kill_at="removing:checkpoint"))
    assert not (output / "checkpoint").exists()  # renamed away whole before any file of it went
    assert_ok(pkdpipe(*distill_args(tiny_cache, output)))
    same_weights(output, finished)
    assert leftovers(output) == [] and not (tmp_path / "student" / "checkpoint.deleting").exists()


def test_a_rerun_of_a_finished_run_trains_nothing_and_other_settings_are_refused(
    tiny_cache, finished, tmp_path
):
    output = tmp_path / "student"
    shutil.copytree(finished, output)
    before = digest(output)
    again = pkdpipe(*distill_args(tiny_cache, output), quiet=False)
    assert_ok(again)
    assert (
        "already finished: " in again.stderr
        and "holds this run with the same settings (best dev accuracy" in again.stderr
        and "(--no-resume to train again)" in again.stderr
        and "train:" not in again.stderr
    )
    assert digest(output) == before
    line = one_error_line(pkdpipe(*distill_args(tiny_cache, output, "--beta", "0.1")))
    assert (
        "holds a finished distill run with other settings (beta 0.5 -> 0.1)" in line and "--no-resume" in line
    )
    assert digest(output) == before
    assert_ok(pkdpipe(*distill_args(tiny_cache, output, "--beta", "0.1", "--no-resume")))
    saved = json.loads((output / "pkdpipe_config.json").read_text())
    assert saved["config"]["beta"] == 0.1


def test_distill_into_the_teachers_folder_is_refused_and_the_teacher_kept(tiny, tiny_cache, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    before = digest(teacher)
    line = one_error_line(
        pkdpipe(
            "distill",
            "--cache",
            tiny_cache,
            "--strategy",
            "kd",
            "--layers",
            2,
            "--epochs",
            1,
            "--output",
            teacher,
        )
    )
    assert f"{teacher} holds a model that no pkdpipe distill run made" in line
    assert digest(teacher) == before
    for flags in ([], ["--no-resume"]):  # not even when told to start over: it is not this stage's folder
        line = one_error_line(pkdpipe(*distill_args(tiny_cache, teacher, *flags)))
        assert "holds a model that no pkdpipe distill run made" in line
    assert digest(teacher) == before


def test_training_into_a_cache_folder_is_refused(tiny, tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    line = one_error_line(pkdpipe(*distill_args(tiny_cache, cache)))
    assert f"{cache} holds a teacher cache" in line
    finetune = [
        "finetune",
        "--task",
        tiny["task"],
        "--model",
        tiny["pretrained"],
        "--output",
        cache,
        "--epochs",
        1,
    ]
    assert f"{cache} holds a teacher cache" in one_error_line(pkdpipe(*finetune))
    assert not (cache / "model.safetensors").exists()


def test_finetune_into_a_distilled_students_folder_is_refused(tiny, finished, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(finished, student)
    before = digest(student)
    finetune = ["finetune", "--task", tiny["task"], "--model", tiny["pretrained"], "--output", student]
    line = one_error_line(pkdpipe(*finetune, "--epochs", 1))
    assert "holds a model that no pkdpipe finetune run made" in line
    assert digest(student) == before


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tiny_cache, tmp_path):
    output = tmp_path / "student"
    args = [sys.executable, "-m", "pkdpipe", *map(str, distill_args(tiny_cache, output, "--epochs", 30))]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (output / "train_log.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)  # the first run holds the folder once it trains
        line = one_error_line(pkdpipe(*distill_args(tiny_cache, output, "--epochs", 30)))
        assert f"{output} is being written by another pkdpipe run (pid {first.pid} on " in line
    finally:
        first.kill()
        first.wait()
    # free again once the first is gone (the kernel drops a killed process's lock)
    assert_ok(pkdpipe(*distill_args(tiny_cache, output, "--epochs", 30, "--max-steps", 4, "--no-resume")))

"""Kill -9 at every named point of distill, cache-teacher, pull and push, then run the same command
again: the result is what an uninterrupted run gives, and nothing half-made is ever visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import arrays_by_id, assert_killed, assert_ok, leftovers, pkdpipe, same_weights

from pkdpipe.cache.local import list_caches
from pkdpipe.cache.verify import verify_cache


def distill_args(cache: Path, output: Path) -> list:
    return ["distill", "--cache", cache, "--strategy", "skip", "--layers", 2, "--output", output,
            "--epochs", 3, "--batch-size", 8, "--lr", "1e-3", "--checkpoint-every", 2]  # fmt: skip


@pytest.fixture(scope="module")
def straight(tiny_cache, tmp_path_factory) -> Path:
    """The same distill, never interrupted: what every killed-then-rerun run must end as."""
    output = tmp_path_factory.mktemp("straight") / "student"
    assert_ok(pkdpipe(*distill_args(tiny_cache, output)))
    return output


@pytest.mark.parametrize(
    "point",
    [
        "between-renames:checkpoint#2",  # the previous checkpoint moved aside, the new one not yet in
        "between-renames:best#1",  # the same for the best model
        "finishing",  # training over, best/ whole, nothing moved yet
        "finished-before-checkpoint-removal",  # the model moved into the output, the checkpoint still there
    ],
)
def test_a_distill_killed_anywhere_finishes_as_an_uninterrupted_run(tiny_cache, straight, tmp_path, point):
    output = tmp_path / "student"
    assert_killed(pkdpipe(*distill_args(tiny_cache, output), kill_at=point))
    # the run's files come last, just before the checkpoint goes (a rerun then only tidies up)
    assert (output / "metrics.json").exists() == (point == "finished-before-checkpoint-removal")
    assert_ok(pkdpipe(*distill_args(tiny_cache, output)))
    same_weights(output, straight)
    got, want = (json.loads((o / "metrics.json").read_text()) for o in (output, straight))
    assert (got["steps"], got["best_step"], got["dev"]) == (want["steps"], want["best_step"], want["dev"])
    assert leftovers(output) == []


@pytest.mark.parametrize("point", ["shard-written#2", "before-manifest"])
def test_a_cache_teacher_killed_anywhere_resumes_to_the_same_cache(tiny, tiny_cache, tmp_path, point):
    args = ["cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"], "--cache-dir", tmp_path,
            "--shard-size", 40, "--batch-size", 16]  # fmt: skip
    assert_killed(pkdpipe(*args, kill_at=point))
    (folder,) = list_caches(tmp_path)
    assert folder.name == tiny_cache.name and not (folder / "manifest.json").exists()  # incomplete, invisible
    assert_ok(pkdpipe(*args))
    assert verify_cache(folder).ok
    reference = arrays_by_id(tiny_cache)
    assert arrays_by_id(folder).keys() == reference.keys()
    for example_id, (logits, hidden, ids) in arrays_by_id(folder).items():
        ref_logits, ref_hidden, ref_ids = reference[example_id]
        assert (ids == ref_ids).all()
        assert abs(logits - ref_logits).max() < 1e-5 and abs(hidden.astype(float) - ref_hidden).max() < 1e-2


@pytest.fixture
def folder_store(tiny_cache, tmp_path) -> str:
    store = tmp_path / "store"
    assert_ok(pkdpipe("cache", "push", tiny_cache, store, "--cache-dir", tiny_cache.parents[1]))
    return str(store)


@pytest.mark.parametrize("point", ["pull-shard-downloaded#2", "pull-before-publish"])
def test_a_pull_killed_anywhere_installs_nothing_then_resumes(tiny_cache, folder_store, tmp_path, point):
    root = tmp_path / "root"
    pull = ["cache", "pull", tiny_cache.name[:8], "--store", folder_store, "--cache-dir", root]
    assert_killed(pkdpipe(*pull, kill_at=point))
    assert list_caches(root) == []  # only the hidden staging folder exists
    assert_ok(pkdpipe(*pull))
    (folder,) = list_caches(root)
    assert verify_cache(folder).ok and not list(folder.parent.glob(".*.partial"))


def test_a_push_killed_midway_is_invisible_then_resumes(tiny_cache, tmp_path):
    store = tmp_path / "store"
    push = ["cache", "push", tiny_cache, store, "--cache-dir", tiny_cache.parents[1]]
    assert_killed(pkdpipe(*push, kill_at="push-shard-uploaded#2"))
    remote = store / tiny_cache.parent.name / tiny_cache.name
    assert remote.is_dir() and not (remote / "manifest.json").exists()  # nobody can pull it yet
    assert_ok(pkdpipe(*push))
    assert (remote / "manifest.json").is_file()
    assert_ok(pkdpipe("cache", "pull", tiny_cache.name, "--store", store, "--cache-dir", tmp_path / "root"))
    (folder,) = list_caches(tmp_path / "root")
    assert verify_cache(folder).ok

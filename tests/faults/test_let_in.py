"""Nothing let in from a store or a careless copy: a teammate's cache is exactly what its key says,
or it is refused with one line and nothing becomes visible (issue 27, items 4-8).

Each test crafts a cache the way a hostile store or a careless teammate could, with every checksum
recomputed, so only the checks of the contents themselves can catch it. The promise each keeps:
- a shard's bytes are its own (no external storage, virtual datasets or links): on pull, read, verify;
- what the key does not cover agrees with what it does, or lies in range;
- gold labels and token ids lie in the task's and the tokenizer's range, on verify and in distill;
- a cache is found only under its own key;
- push publishes nothing that a pull would refuse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import assert_ok, one_error_line, pkdpipe, rewrite_manifest, rewrite_shard

from pkdpipe.cache.local import list_caches

SHARD = "train-00001-of-00003.h5"


@pytest.fixture
def store(tiny_cache, tmp_path) -> Path:
    folder = tmp_path / "store"
    assert_ok(pkdpipe("cache", "push", tiny_cache, folder, "--cache-dir", tiny_cache.parents[1]))
    return folder


@pytest.fixture
def local(tiny_cache, tmp_path) -> Path:
    """A private copy of the tiny cache in a cache root of its own."""
    folder = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    return folder


def remote(store: Path, cache: Path) -> Path:
    return store / cache.parent.name / cache.name


def pull(cache: Path, store: Path, root: Path):
    return pkdpipe("cache", "pull", cache.name, "--store", store, "--cache-dir", root)


def refused_pull(cache: Path, store: Path, root: Path) -> str:
    line = one_error_line(pull(cache, store, root))
    assert list_caches(root) == [] or not any((p / "manifest.json").exists() for p in list_caches(root))
    return line


# -- 4: a shard's bytes are its own ------------------------------------------------------------------
def _external_logits(target: Path):
    def edit(f):
        shape, dtype = f["logits"].shape, f["logits"].dtype
        del f["logits"]
        f.create_dataset(
            "logits", shape=shape, dtype=dtype, external=[(str(target), 0, int(np.prod(shape)) * 4)]
        )

    return edit


def _soft_link(f):
    del f["labels"]
    f["labels"] = h5py.SoftLink("/example_id")


def _virtual_logits(f):
    source = f["logits"]
    layout = h5py.VirtualLayout(shape=source.shape, dtype=source.dtype)
    layout[:] = h5py.VirtualSource(".", "logits_copy", shape=source.shape)
    f.create_dataset("logits_copy", data=source[:])
    del f["logits"]
    f.create_virtual_dataset("logits", layout)


@pytest.mark.parametrize(
    ("edit", "says"),
    [("external", "/logits has external storage"), ("soft", "/labels is a SoftLink"),
     ("virtual", "/logits is a virtual dataset")],
)  # fmt: skip
def test_a_shard_whose_bytes_live_elsewhere_is_refused_on_pull_read_and_verify(
    tiny_cache, store, local, tmp_path, edit, says
):
    secret = tmp_path / "secret.bin"  # a file of the machine that reads the shard (/etc/passwd, say)
    secret.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    change = {"external": _external_logits(secret), "soft": _soft_link, "virtual": _virtual_logits}[edit]
    rewrite_shard(remote(store, tiny_cache), SHARD, change)
    line = refused_pull(tiny_cache, store, tmp_path / "pulled")
    assert "refusing to install the cache" in line and says in line

    rewrite_shard(local, SHARD, change)
    verify = pkdpipe("cache", "verify", local)
    assert verify.returncode == 1 and says in verify.stdout
    line = one_error_line(pkdpipe("distill", "--cache", local, "--layers", 2, "--output", tmp_path / "s"))
    assert says in line and "refusing to read it" in line


# -- 5: what the key does not cover ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: m.update(label_names=m["label_names"][::-1]), "label_names are not the task's labels"),
        (lambda m: m["teacher"].update(num_layers=10**9), "teacher.num_layers 1000000000"),
        (lambda m: m["teacher"].update(num_layers=-1), "teacher.num_layers -1"),
        (
            lambda m: m["teacher"].update(num_layers=2),
            "are not distinct ascending layers of a 2-layer teacher",
        ),
        (lambda m: m["splits"]["dev"]["shards"][0].update(bytes=-1), "claims -1 bytes"),
        (
            lambda m: m["splits"]["dev"]["shards"][0].update(bytes=10**30),
            "claims 10000000000000000000000000000",
        ),
        (
            lambda m: m["teacher"].update(pretrained_from="bert\n--trust"),
            "pretrained_from is not a model name",
        ),
        (lambda m: m.update(num_labels=7), "num_labels 7 does not fit 3 label names"),
        (lambda m: m.update(vocab_size=0), "vocab_size 0 is out of range"),
    ],
)
def test_manifest_fields_outside_the_key_are_checked(tiny_cache, store, local, tmp_path, change, says):
    rewrite_manifest(remote(store, tiny_cache), change)
    line = refused_pull(tiny_cache, store, tmp_path / "pulled")
    assert says in line
    rewrite_manifest(local, change)
    line = one_error_line(pkdpipe("distill", "--cache", local, "--layers", 2, "--output", tmp_path / "s"))
    assert says in line
    assert not (tmp_path / "s").exists()


# -- 6: gold labels and token ids ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "says"),
    [(7, "1 label(s) outside 0..2 (e.g. 7)"), (-1, "train: 1 row(s) have no gold label")],
)
def test_a_label_out_of_range_is_found_by_verify_and_refused_by_distill(local, tmp_path, value, says):
    def edit(f):
        labels = f["labels"][:]
        labels[3] = value
        f["labels"][:] = labels

    rewrite_shard(local, SHARD, edit)
    verify = pkdpipe("cache", "verify", local)
    assert verify.returncode == 1 and says in verify.stdout
    line = one_error_line(pkdpipe("distill", "--cache", local, "--layers", 2, "--output", tmp_path / "s"))
    assert "split 'train' holds gold labels" in line and "outside 0..2" in line


def test_a_token_id_past_the_vocabulary_is_found_by_verify_and_refused_by_distill(local, tmp_path):
    vocab = json.loads((local / "manifest.json").read_text())["vocab_size"]

    def edit(f):
        ids = f["input_ids"][:]
        ids[5] = vocab + 3
        f["input_ids"][:] = ids

    rewrite_shard(local, SHARD, edit)
    verify = pkdpipe("cache", "verify", local)
    assert verify.returncode == 1 and f"token ids outside 0..{vocab - 1}" in verify.stdout
    rewrite_manifest(local, lambda m: m.pop("vocab_size"))  # as an older cache: distill still refuses it
    line = one_error_line(pkdpipe("distill", "--cache", local, "--layers", 2, "--output", tmp_path / "s"))
    assert f"outside the student's vocabulary of {vocab}" in line


# -- 7: a cache is found only under its own key --------------------------------------------------------
def test_a_cache_copied_under_another_keys_name_is_not_taken_for_it(tiny, tiny_cache, tmp_path):
    other = tmp_path / "root" / "tiny"
    other.mkdir(parents=True)
    # cache-teacher with --max-seq-len 24 computes another key; put the 128-token cache under its name
    args = ["cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"], "--cache-dir",
            tmp_path / "root", "--shard-size", 40, "--batch-size", 16, "--max-seq-len", 24]  # fmt: skip
    assert_ok(pkdpipe(*args))
    (built,) = list_caches(tmp_path / "root")
    shutil.rmtree(built)
    shutil.copytree(tiny_cache, built)  # the impostor, named with the 24-token key
    line = one_error_line(pkdpipe(*args))
    assert f"holds cache tiny/{tiny_cache.name}, not the one its folder names" in line
    line = one_error_line(
        pkdpipe("distill", "--cache", built.name, "--cache-dir", tmp_path / "root", "--layers", 2)
    )
    assert "a cache is found only under its own key" in line


# -- 8: push publishes nothing a pull would refuse -------------------------------------------------
def _nan_logit(f):
    logits = f["logits"][:]
    logits[0, 0] = np.nan
    f["logits"][:] = logits


def _inf_cls(f):
    vectors = f["hidden/2"][:]
    vectors[1, 3] = np.inf
    f["hidden/2"][:] = vectors


def _duplicate_id(f):
    ids = f["example_id"][:]
    ids[1] = ids[0]
    f["example_id"][:] = ids


@pytest.mark.parametrize(
    ("edit", "says"),
    [(_nan_logit, "logits holds NaN or inf"), (_inf_cls, "hidden/2 holds NaN or inf"),
     (_duplicate_id, "example ids are not unique")],
)  # fmt: skip
def test_push_refuses_what_a_pull_would_refuse(local, tmp_path, edit, says):
    rewrite_shard(local, SHARD, edit)
    line = one_error_line(pkdpipe("cache", "push", local, tmp_path / "store"))
    assert "would be refused by every pull" in line and says in line
    assert not list((tmp_path / "store").rglob("*.h5")) and not list(
        (tmp_path / "store").rglob("manifest.json")
    )


def test_flipped_labels_pass_verify_but_not_the_recompute_against_the_data(tiny, local):
    """Labels swapped within range, checksums recomputed: only the data can tell."""

    def flip(f):
        labels = f["labels"][:]
        f["labels"][:] = (labels + 1) % 3

    for shard in ("train-00000-of-00003.h5", SHARD, "train-00002-of-00003.h5", "dev-00000-of-00001.h5"):
        rewrite_shard(local, shard, flip)
    assert_ok(pkdpipe("cache", "verify", local))
    without_data = pkdpipe("cache", "verify", local, "--recompute", 8, "--teacher", tiny["teacher"])
    assert_ok(without_data)  # the teacher's outputs are the cache's: nothing else is looked at
    recompute = [
        "cache",
        "verify",
        local,
        "--recompute",
        8,
        "--teacher",
        tiny["teacher"],
        "--data-dir",
        tiny["data"],
    ]
    assert "pass --task TASK_FILE with --data-dir" in one_error_line(
        pkdpipe(*recompute)
    )  # a task file's task
    with_data = pkdpipe(*recompute, "--task", tiny["task"])
    assert with_data.returncode == 1
    assert "8 compared with the data" in with_data.stdout and "8 differ" in with_data.stdout
    assert "the data says" in with_data.stdout

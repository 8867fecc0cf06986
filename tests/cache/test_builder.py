"""pkdpipe.cache.builder: a cache built from rows handed in by hand, with no model and no torch: its
folder, shard plan, resume, staging and manifest. (tests/test_teacher.py checks the same builder
fed by a real teacher against that teacher's own forward pass.)"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_tiny_task

from pkdpipe.cache import manifest as mf
from pkdpipe.cache.builder import CacheBuilder, Origin, SplitPlan
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.tasks import get_task

HIDDEN, LAYERS = 8, (0, 1, 2)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return get_task(str(write_tiny_task(tmp_path_factory.mktemp("task"))))


def make_builder(task, root, shard_size=4) -> CacheBuilder:
    inputs = mf.KeyInputs(
        task=task.fingerprint_dict(),
        teacher_weights="a" * 64,
        tokenizer="b" * 64,
        datasets={"dev": "c" * 64},
        max_seq_len=16,
        truncation="longest_first",
        layers=list(LAYERS),
        hidden_dtype="float16",
        logits_dtype="float32",
        precision="fp32",
    )
    teacher = mf.Teacher(
        name_or_path="by-hand",
        model_type="bert",
        architecture="BertForSequenceClassification",
        num_layers=2,
        hidden_size=HIDDEN,
        weights_sha256=inputs.teacher_weights,
    )
    return CacheBuilder(root, task, inputs, teacher, False, shard_size, quiet=True)


def split_rows(n=10):
    """Example ids, token ids and labels of a split, out of storage order."""
    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int64)[::-1].copy()
    tokens = [rng.integers(5, 40, size=int(rng.integers(2, 9))).astype(np.int32) for _ in range(n)]
    return ids, tokens, np.arange(n, dtype=np.int64) % 3


def write_shards(builder: CacheBuilder, plan: SplitPlan, tokens, labels) -> None:
    """What the teacher pass does, with made-up logits and vectors that follow from the example id."""
    for shard in plan.todo:
        with builder.shard(plan, shard) as writer:
            for start in range(0, len(shard.rows), 3):
                rows = shard.rows[start : start + 3]
                ids = plan.ids[rows].astype(np.float32)[:, None]
                hidden = {layer: np.tile(ids + layer, (1, HIDDEN)) for layer in LAYERS}
                writer.write([tokens[i] for i in rows], None, labels[rows], np.tile(ids, (1, 3)), hidden)


def origin() -> Origin:
    return Origin("by-hand", None, vocab_size=64, command="test", config={}, started=time.time())


def build(builder: CacheBuilder, n=10) -> mf.Manifest:
    """The whole build, under the key's lock (which makes the folder), as cache_teacher runs it."""
    ids, tokens, labels = split_rows(n)
    with builder.lock():
        plan = builder.plan("dev", ids, np.array([len(t) for t in tokens]))
        write_shards(builder, plan, tokens, labels)
        return builder.finish({"dev": plan}, origin(), {})


def test_a_cache_built_by_hand_reads_back_and_verifies(task, tmp_path):
    builder = make_builder(task, tmp_path)
    manifest = build(builder)
    assert builder.folder == tmp_path / task.name / builder.key
    assert manifest.key == builder.key and manifest.teacher.hidden_size == HIDDEN
    assert [s.rows for s in manifest.shards("dev")] == [4, 4, 2]
    assert set(manifest.teacher_metrics["dev"]) >= {"accuracy"}
    report = verify_cache(builder.folder)
    assert report.ok and report.rows_checked == 10, report.problems
    ids, tokens, _ = split_rows()
    with open_cache(builder.folder) as cache:
        stored = cache.read("dev", list(LAYERS))
    lengths = [len(tokens[list(ids).index(i)]) for i in stored["example_id"]]
    assert sorted(zip(lengths, stored["example_id"])) == list(zip(lengths, stored["example_id"]))
    np.testing.assert_array_equal(stored["logits"][:, 0], stored["example_id"])


def test_finished_shards_are_kept_and_others_rewritten(task, tmp_path):
    builder = make_builder(task, tmp_path)
    build(builder)
    first = builder.folder / "dev-00000-of-00003.h5"
    before = first.stat().st_mtime_ns
    (builder.folder / mf.MANIFEST).unlink()
    (builder.folder / "dev-00001-of-00003.h5").unlink()
    ids, tokens, _ = split_rows()
    plan = builder.plan("dev", ids, np.array([len(t) for t in tokens]))
    assert [s.index for s in plan.todo] == [1]  # the resume: only the lost shard
    other = make_builder(task, tmp_path, shard_size=5).plan("dev", ids, np.array([len(t) for t in tokens]))
    assert [s.index for s in other.todo] == [0, 1]  # same folder, other rows per shard: all rewritten
    manifest = build(builder)
    assert first.stat().st_mtime_ns == before
    assert verify_cache(builder.folder).ok and len(manifest.shards()) == 3


def test_a_shard_that_fails_leaves_nothing_and_ranks_split_the_shards(task, tmp_path):
    builder = make_builder(task, tmp_path)
    ids, tokens, _ = split_rows()
    plan = builder.plan("dev", ids, np.array([len(t) for t in tokens]))
    with pytest.raises(RuntimeError), builder.shard(plan, plan.todo[0]):
        raise RuntimeError("the teacher failed")
    assert not list(tmp_path.rglob("*.h5*"))
    ranks = [builder.plan("dev", ids, np.array([len(t) for t in tokens]), rank, 2) for rank in (0, 1)]
    assert [[s.index for s in plan.todo] for plan in ranks] == [[0, 2], [1]]


def test_finish_drops_shards_of_another_plan(task, tmp_path):
    builder = make_builder(task, tmp_path)
    builder.folder.mkdir(parents=True)
    stray = builder.folder / "dev-00000-of-00009.h5"
    stray.write_bytes(b"from a run with another --shard-size")
    build(builder)
    assert not stray.exists()


def test_the_builder_imports_no_torch():
    code = "import sys, pkdpipe.cache.builder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

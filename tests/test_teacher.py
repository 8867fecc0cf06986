"""Stage one, `pkdpipe.teacher.cache_teacher`: what is cached equals what the teacher computes, a run
that is killed resumes to the same arrays, a second run is a cache hit, and the key follows the inputs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import LABELS, write_tiny_task
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pkdpipe.config import CacheConfig
from pkdpipe.teacher import cache_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the suite shares a few cores with other jobs
    (two spinning threads on a busy machine make each forward 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cache(tiny, root: Path, **overrides):
    """cache_teacher on the tiny task and teacher, quiet, with small shards and batches."""
    settings = dict(
        task=tiny["task"], teacher=str(tiny["teacher"]), cache_dir=root, shard_size=40, batch_size=16
    )
    settings.update(overrides)
    return cache_teacher(CacheConfig(quiet=True, **settings))


def cache_rows(folder: Path, split: str) -> tuple[dict[int, dict], list[int]]:
    """Every row of `split` read with plain h5py, keyed by example id, and the ids in storage order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows, order = {}, []
    for shard in manifest["splits"][split]["shards"]:
        with h5py.File(folder / shard["file"], "r") as f:
            offsets, tokens = f["offsets"][:], f["input_ids"][:]
            types = f["token_type_ids"][:] if "token_type_ids" in f else None
            hidden = {int(layer): f["hidden"][layer][:] for layer in f["hidden"]}
            labels, logits = f["labels"][:], f["logits"][:]
            for r, example_id in enumerate(f["example_id"][:].tolist()):
                a, b = offsets[r], offsets[r + 1]
                rows[example_id] = {
                    "input_ids": tokens[a:b],
                    "token_type_ids": None if types is None else types[a:b],
                    "label": labels[r],
                    "logits": logits[r],
                    "hidden": {layer: h[r] for layer, h in hidden.items()},
                }
                order.append(example_id)
    return rows, order


def assert_same_rows(a: dict[int, dict], b: dict[int, dict]) -> None:
    """Bit-identical rows, example by example."""
    assert a.keys() == b.keys()
    for example_id, row in a.items():
        other = b[example_id]
        np.testing.assert_array_equal(row["input_ids"], other["input_ids"])
        np.testing.assert_array_equal(row["logits"], other["logits"])
        assert row["label"] == other["label"]
        assert row["hidden"].keys() == other["hidden"].keys()
        for layer in row["hidden"]:
            np.testing.assert_array_equal(row["hidden"][layer], other["hidden"][layer])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_csv(path: Path, fields: tuple[str, ...]) -> list[tuple[int, tuple[str, ...], int]]:
    """(id, texts, label index) per data row: the id is the row's position in the file."""
    with open(path, newline="") as f:
        return [
            (i, tuple(row[name] for name in fields), LABELS.index(row["label"]))
            for i, row in enumerate(csv.DictReader(f))
        ]


def assert_matches_single_forward(
    folder: Path, teacher: Path, data: Path, fields: tuple[str, ...], max_len: int
):
    """The cached rows of train and dev against the teacher run on one example at a time, unpadded."""
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    with_types = "token_type_ids" in tokenizer.model_input_names
    for split in ("train", "dev"):
        rows, order = cache_rows(folder, split)
        expected = read_csv(data / f"{split}.csv", fields)
        assert sorted(rows) == [example_id for example_id, _, _ in expected]
        lengths = [len(rows[example_id]["input_ids"]) for example_id in order]
        assert lengths == sorted(lengths), "rows are stored length-sorted"
        if len(set(lengths)) > 1:
            assert order != sorted(order), "so the check by id below is not a check by position"
        for example_id, texts, label in expected:
            row = rows[example_id]
            encoded = tokenizer(*texts, truncation="longest_first", max_length=max_len)
            np.testing.assert_array_equal(row["input_ids"], encoded["input_ids"])
            if with_types:
                np.testing.assert_array_equal(row["token_type_ids"], encoded["token_type_ids"])
            else:
                assert row["token_type_ids"] is None
            assert row["label"] == label
            inputs = {
                k: torch.tensor([v]) for k, v in encoded.items() if k in ("input_ids", "token_type_ids")
            }
            with torch.no_grad():
                out = model(**inputs, output_hidden_states=True)
            np.testing.assert_allclose(row["logits"], out.logits[0].numpy(), rtol=1e-5, atol=1e-5)
            assert sorted(row["hidden"]) == list(range(len(out.hidden_states)))
            for layer, vector in row["hidden"].items():
                assert vector.dtype == np.float16
                reference = out.hidden_states[layer][0, 0].numpy()
                np.testing.assert_allclose(vector.astype(np.float32), reference, rtol=1e-3, atol=1e-4)


# --- cached values equal the teacher's own forward pass --------------------------------------------


def test_cached_rows_equal_single_example_forward(tiny, tmp_path):
    result = run_cache(tiny, tmp_path)
    assert_matches_single_forward(result.path, tiny["teacher"], tiny["data"], ("text",), 128)


def test_sentence_pairs_truncated_longest_first_equal_single_forward(tiny, tmp_path):
    """Two text fields and a max length shorter than most pairs: token types and truncation."""
    data = tmp_path / "pairs"
    data.mkdir()
    single = read_csv(tiny["data"] / "train.csv", ("text",))
    for split, n in (("train", 24), ("dev", 12)):
        with open(data / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["premise", "hypothesis", "label"])
            for i in range(n):
                writer.writerow([single[i][1][0], single[-1 - i][1][0], LABELS[i % 3]])
    task = data / "pairs.toml"
    task.write_text(
        'name = "pairs"\ntext_fields = ["premise", "hypothesis"]\nlabel_field = "label"\n'
        f'labels = {json.dumps(LABELS)}\nmetric = "accuracy"\n[files]\ntrain = "train.csv"\ndev = "dev.csv"\n'
    )
    result = run_cache(tiny, tmp_path / "cache", task=str(task), max_seq_len=12, shard_size=10, batch_size=4)
    rows, _ = cache_rows(result.path, "train")
    assert max(len(r["input_ids"]) for r in rows.values()) == 12  # truncation did happen
    assert any(r["token_type_ids"].any() for r in rows.values())  # second segments are typed 1
    assert_matches_single_forward(result.path, tiny["teacher"], data, ("premise", "hypothesis"), 12)


@pytest.fixture(scope="module")
def tiny_distilbert(tiny, tmp_path_factory) -> Path:
    """A random 3-layer DistilBERT classifier over the tiny WordPiece vocabulary (no token type ids)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    folder = tmp_path_factory.mktemp("distilbert")
    (folder / "vocab.txt").write_bytes((tiny["pretrained"] / "vocab.txt").read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "DistilBertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=128
    )
    config.num_labels = 3
    torch.manual_seed(3)
    DistilBertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


def test_distilbert_teacher_rows_equal_single_example_forward(tiny, tiny_distilbert, tmp_path):
    result = run_cache(tiny, tmp_path, teacher=str(tiny_distilbert))
    manifest = result.manifest
    assert manifest["teacher"]["model_type"] == "distilbert"
    assert manifest["layers"] == [0, 1, 2, 3]
    assert manifest["uses_token_type_ids"] is False
    with h5py.File(result.path / manifest["splits"]["train"]["shards"][0]["file"], "r") as f:
        assert "token_type_ids" not in f
    assert_matches_single_forward(result.path, tiny_distilbert, tiny["data"], ("text",), 128)


# --- kill and resume ----------------------------------------------------------------------------------

# Runs the real CLI in a child process, its teacher slowed by a forward hook so that the parent can
# kill it between the first finished shard and the manifest. The hook changes timing, not values.
SLOW_CLI = """
import sys, time
import pkdpipe.teacher as teacher
delay = float(sys.argv[1])
load = teacher.load_classifier
def slow_load(*args, **kwargs):
    model = load(*args, **kwargs)
    model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    return model
teacher.load_classifier = slow_load
from pkdpipe_cli.main import app
app(sys.argv[2:], prog_name="pkdpipe")
"""


def kill_after_first_shard(args: list[str], root: Path, script: Path, delay: float) -> list[Path] | None:
    """Start the CLI, SIGKILL it as soon as a shard has its final name; return the finished shards,
    or None when the run completed before it could be killed."""
    env = {**os.environ, "PKDPIPE_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(delay), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while child.poll() is None and time.time() < deadline:
            if list(root.glob("*/*/*.h5")):
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    if child.returncode == -signal.SIGKILL and not list(root.glob("*/*/manifest.json")):
        return sorted(root.glob("*/*/*.h5"))
    assert child.returncode == 0, err.decode()[-2000:]
    return None


def test_killed_run_resumes_to_identical_arrays(tiny, tmp_path):
    data = tmp_path / "data"
    task = write_tiny_task(data, n_train=200, n_dev=30, n_test=4)
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    killed_root = tmp_path / "killed"
    settings = dict(task=str(task), shard_size=25, batch_size=10)
    args = [
        "cache-teacher",
        "--task",
        str(task),
        "--teacher",
        str(tiny["teacher"]),
        "--cache-dir",
        str(killed_root),
    ]
    args += ["--shard-size", "25", "--batch-size", "10", "--quiet"]

    finished = None
    for delay in (0.01, 0.05, 0.2):  # slower each time the child finished before it could be killed
        shutil.rmtree(killed_root, ignore_errors=True)
        finished = kill_after_first_shard(args, killed_root, script, delay)
        if finished is not None:
            break
    assert finished, "the child always finished before the kill: the test proved nothing"
    folder = finished[0].parent
    assert not (folder / "manifest.json").exists()
    assert len(finished) < 8 + 1  # 200 train rows in 8 shards, 1 dev shard: not all of them
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    resumed = run_cache(tiny, killed_root, **settings)
    assert not resumed.hit and resumed.path == folder
    for path in finished:  # finished shards were kept, not rewritten
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == before[path.name]
    assert not list(folder.glob("*.tmp"))

    clean = run_cache(tiny, tmp_path / "clean", **settings)
    assert clean.key == resumed.key
    for split in ("train", "dev"):
        assert_same_rows(cache_rows(resumed.path, split)[0], cache_rows(clean.path, split)[0])
    shards = [s["file"] for info in clean.manifest["splits"].values() for s in info["shards"]]
    assert {name: sha256(folder / name) for name in shards} == {
        name: sha256(clean.path / name) for name in shards
    }


def copy_cache(cache: Path, root: Path) -> Path:
    """A copy of a cache folder under another root, as `<root>/<task>/<key>/`."""
    target = root / cache.parent.name / cache.name
    shutil.copytree(cache, target)
    return target


def test_lost_shard_is_recomputed_alone(tiny, tiny_cache, tmp_path):
    folder = copy_cache(tiny_cache, tmp_path)
    expected, _ = cache_rows(folder, "train")
    shards = sorted(folder.glob("*.h5"))
    lost = folder / "train-00001-of-00003.h5"
    digest = sha256(lost)
    lost.unlink()
    (folder / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards if p != lost}

    result = run_cache(tiny, tmp_path)
    assert not result.hit and result.path == folder
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != lost} == before
    assert sha256(lost) == digest
    assert_same_rows(cache_rows(folder, "train")[0], expected)


def test_resume_with_another_shard_size_rewrites_mismatched_shards(tiny, tiny_cache, tmp_path):
    """--shard-size is not in the key; a resumed run with another size must not keep shards whose rows
    differ from its plan (same names, other rows) and then list them under wrong row counts."""
    from pkdpipe.cache.verify import verify_cache

    folder = copy_cache(tiny_cache, tmp_path)
    expected, _ = cache_rows(folder, "train")
    (folder / "manifest.json").unlink()
    (folder / "train-00002-of-00003.h5").unlink()

    result = run_cache(tiny, tmp_path, shard_size=35)  # 96 rows: again 3 shards, of 35, 35 and 26
    assert [s["rows"] for s in result.manifest["splits"]["train"]["shards"]] == [35, 35, 26]
    report = verify_cache(folder)
    assert report.ok, report.problems
    rows, _ = cache_rows(folder, "train")
    assert rows.keys() == expected.keys()
    for example_id, row in rows.items():  # other batches, so equal up to rounding, not bit for bit
        np.testing.assert_array_equal(row["input_ids"], expected[example_id]["input_ids"])
        np.testing.assert_allclose(row["logits"], expected[example_id]["logits"], rtol=1e-5, atol=1e-6)


# --- cache hits and keys --------------------------------------------------------------------------------


@pytest.fixture
def forward_calls(monkeypatch):
    """Counts forward passes of any BERT classifier; set `forbid` to make them raise."""
    from transformers.models.bert import modeling_bert

    calls = {"n": 0, "forbid": False}
    original = modeling_bert.BertForSequenceClassification.forward

    def counted(self, *args, **kwargs):
        if calls["forbid"]:
            raise AssertionError("the teacher ran on a cache hit")
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertForSequenceClassification, "forward", counted)
    return calls


def test_second_run_is_a_hit_and_force_recomputes(tiny, tmp_path, forward_calls):
    first = run_cache(tiny, tmp_path)
    assert not first.hit and forward_calls["n"] > 0

    forward_calls["forbid"] = True
    started = time.time()
    second = run_cache(tiny, tmp_path)
    assert second.hit and second.key == first.key and second.path == first.path
    assert second.manifest == first.manifest
    assert time.time() - started < 5

    forward_calls["forbid"] = False
    forward_calls["n"] = 0
    shard = first.path / "dev-00000-of-00001.h5"
    mtime = shard.stat().st_mtime_ns
    forced = run_cache(tiny, tmp_path, force=True)
    assert not forced.hit and forced.key == first.key
    assert forward_calls["n"] == 9  # train: shards of 40, 40, 16 rows in 3 + 3 + 1 batches; dev: 30 rows in 2
    assert shard.stat().st_mtime_ns != mtime
    assert sha256(shard) == forced.manifest["splits"]["dev"]["shards"][0]["sha256"]


def test_same_inputs_elsewhere_give_the_same_key(tiny, tiny_cache, tmp_path, forward_calls):
    """Paths of the cache root, the teacher and the data are not part of the key; a copy is a hit."""
    teacher = tmp_path / "teacher-copy"
    shutil.copytree(tiny["teacher"], teacher)
    data = tmp_path / "data-copy"
    shutil.copytree(tiny["data"], data)
    copy_cache(tiny_cache, tmp_path / "root")
    forward_calls["forbid"] = True
    result = run_cache(tiny, tmp_path / "root", teacher=str(teacher), task=str(data / "tiny.toml"))
    assert result.hit and result.key == tiny_cache.name


def _changed_teacher(tiny, tmp_path: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "teacher-changed"
    shutil.copytree(tiny["teacher"], folder)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        model.classifier.bias[0] += 1e-3
    model.save_pretrained(str(folder))
    return {"teacher": str(folder)}


def _changed_tokenizer(tiny, tmp_path: Path) -> dict:
    folder = tmp_path / "teacher-tokenizer"
    shutil.copytree(tiny["teacher"], folder)
    for name, part in (("tokenizer.json", "normalizer"), ("tokenizer_config.json", None)):
        definition = json.loads((folder / name).read_text())
        (definition[part] if part else definition)["strip_accents"] = True  # was None: do what lowercase does
        (folder / name).write_text(json.dumps(definition))
    return {"teacher": str(folder)}


def _changed_text(tiny, tmp_path: Path) -> dict:
    data = tmp_path / "data-changed"
    shutil.copytree(tiny["data"], data)
    lines = (data / "dev.csv").read_text().splitlines()
    text, label = lines[5].rsplit(",", 1)
    lines[5] = f"{text} very,{label}"  # one more word in one example
    (data / "dev.csv").write_text("\n".join(lines) + "\n")
    return {"task": str(data / "tiny.toml")}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda tiny, tmp: {"max_seq_len": 8}, id="max_seq_len"),
        pytest.param(lambda tiny, tmp: {"dtype": "float32"}, id="dtype"),
        pytest.param(lambda tiny, tmp: {"layers": (0, 4)}, id="layers"),
        pytest.param(lambda tiny, tmp: {"precision": "bf16"}, id="precision"),
        pytest.param(_changed_teacher, id="teacher-weight"),
        pytest.param(_changed_tokenizer, id="tokenizer"),
        pytest.param(_changed_text, id="data-text"),
    ],
)
def test_a_changed_input_changes_the_key(tiny, tmp_path, change):
    base = run_cache(tiny, tmp_path / "root", splits=("dev",))
    changed = run_cache(tiny, tmp_path / "root", splits=("dev",), **change(tiny, tmp_path))
    assert not changed.hit
    assert changed.key != base.key
    assert changed.path.parent == base.path.parent  # side by side under <root>/<task>/


def test_batch_and_shard_sizes_do_not_change_the_key(tiny, tmp_path, forward_calls):
    base = run_cache(tiny, tmp_path, splits=("dev",))
    forward_calls["forbid"] = True
    other = run_cache(tiny, tmp_path, splits=("dev",), batch_size=5, shard_size=7)
    assert other.hit and other.key == base.key

"""The cache on disk, as other tools see it: the manifest's fields, the shards' datasets, how the key is
made, what `verify_cache` catches, and the reader of docs/cache-format.md run against a real cache."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pkdpipe
from pkdpipe.cache.fingerprint import FORMAT_VERSION
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.config import CacheConfig
from pkdpipe.errors import CacheError
from pkdpipe.teacher import cache_teacher

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "cache-format.md"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A private copy of the session cache, as `<root>/<task>/<key>/`, safe to damage."""
    target = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, target)
    return target


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def csv_ids(path: Path) -> list[int]:
    return list(range(len(path.read_text().splitlines()) - 1))  # one header line, one row per example


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_fields(tiny, tiny_cache):
    m = manifest_of(tiny_cache)
    assert m["format"] == "pkdpipe-teacher-cache"
    assert m["format_version"] == FORMAT_VERSION == 1
    assert m["key"] == tiny_cache.name and re.fullmatch(r"[0-9a-f]{16}", m["key"])
    assert m["task"] == "tiny" == tiny_cache.parent.name
    assert m["task_spec"]["labels"] == m["label_names"] == ["neg", "neu", "pos"]
    assert m["num_labels"] == 3
    teacher = m["teacher"]
    assert teacher["name_or_path"] == str(tiny["teacher"])
    assert teacher["model_type"] == "bert" and teacher["architecture"] == "BertForSequenceClassification"
    assert (teacher["num_layers"], teacher["hidden_size"]) == (4, 32)
    assert teacher["pretrained_from"] == str(tiny["pretrained"])
    for digest in (teacher["weights_sha256"], m["tokenizer_sha256"], *m["dataset"]["sha256"].values()):
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert set(m["dataset"]["sha256"]) == {"train", "dev"}
    assert m["dataset"]["source"] == str(tiny["data"].resolve())  # a task file reads next to itself
    assert (m["max_seq_len"], m["truncation"]) == (128, "longest_first")
    assert m["layers"] == [0, 1, 2, 3, 4]
    assert (m["hidden_dtype"], m["logits_dtype"], m["precision"]) == ("float16", "float32", "fp32")
    assert m["uses_token_type_ids"] is True
    assert m["tool_version"] == pkdpipe.__version__
    assert isinstance(m["command"], str) and m["command"]
    assert datetime.fromisoformat(m["created"]).tzinfo is not None
    assert set(m["timings"]) == {"fingerprint_s", "train_s", "dev_s", "total_s"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in m["timings"].values())
    assert m["config"]["shard_size"] == 40 and m["config"]["batch_size"] == 16


def test_manifest_lists_every_shard_with_rows_bytes_and_sha256(tiny_cache):
    m = manifest_of(tiny_cache)
    assert {s: info["examples"] for s, info in m["splits"].items()} == {"train": 96, "dev": 30}
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == [
        f"train-0000{i}-of-00003.h5" for i in range(3)
    ]
    listed = set()
    for info in m["splits"].values():
        assert sum(s["rows"] for s in info["shards"]) == info["examples"]
        for shard in info["shards"]:
            path = tiny_cache / shard["file"]
            listed.add(shard["file"])
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            with h5py.File(path, "r") as f:
                assert len(f["example_id"]) == shard["rows"]
    assert {p.name for p in tiny_cache.iterdir()} == listed | {"manifest.json"}


def test_key_is_recomputable_from_the_manifest(tiny_cache):
    """The recipe of docs/cache-format.md: sha256 of the canonical JSON of the key's inputs, 16 hex digits."""
    m = manifest_of(tiny_cache)
    inputs = {
        "format_version": m["format_version"],
        "task": m["task_spec"],
        "teacher_weights": m["teacher"]["weights_sha256"],
        "tokenizer": m["tokenizer_sha256"],
        "datasets": m["dataset"]["sha256"],
        "max_seq_len": m["max_seq_len"],
        "truncation": m["truncation"],
        "layers": m["layers"],
        "hidden_dtype": m["hidden_dtype"],
        "logits_dtype": m["logits_dtype"],
        "precision": m["precision"],
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert hashlib.sha256(canonical).hexdigest()[:16] == m["key"]


def test_documented_key_recipe_runs(tiny_cache, monkeypatch):
    """The doc's own snippet (it asserts the key itself), run in the cache folder."""
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "canonical" in b
    )
    monkeypatch.chdir(tiny_cache)
    exec(compile(block, str(DOC), "exec"), {})


def test_teacher_dev_metrics_match_the_cached_logits(tiny_cache):
    m = manifest_of(tiny_cache)
    assert set(m["teacher_metrics"]) == {"dev"}  # train is not scored
    with h5py.File(tiny_cache / "dev-00000-of-00001.h5", "r") as f:
        accuracy = float(np.mean(f["logits"][:].argmax(1) == f["labels"][:]))
    assert m["teacher_metrics"]["dev"]["accuracy"] == pytest.approx(accuracy)


# --- shards -------------------------------------------------------------------------------------------


def test_shard_datasets_shapes_and_dtypes(tiny_cache):
    m = manifest_of(tiny_cache)
    for info in m["splits"].values():
        for shard in info["shards"]:
            n = shard["rows"]
            with h5py.File(tiny_cache / shard["file"], "r") as f:
                assert set(f) == {
                    "example_id",
                    "labels",
                    "logits",
                    "hidden",
                    "offsets",
                    "input_ids",
                    "token_type_ids",
                    "cls_stats",
                }
                assert sorted(f["cls_stats"], key=int) == ["0", "1", "2", "3", "4"]
                for layer in f["cls_stats"].values():
                    assert (layer.shape, layer.dtype) == ((4, 32), np.float64)
                assert (f["example_id"].shape, f["example_id"].dtype) == ((n,), np.int64)
                assert (f["labels"].shape, f["labels"].dtype) == ((n,), np.int64)
                assert (f["logits"].shape, f["logits"].dtype) == ((n, 3), np.float32)
                assert sorted(f["hidden"], key=int) == ["0", "1", "2", "3", "4"]
                for layer in f["hidden"].values():
                    assert (layer.shape, layer.dtype) == ((n, 32), np.float16)
                offsets = f["offsets"][:]
                assert (offsets.shape, offsets.dtype) == ((n + 1,), np.int64)
                assert offsets[0] == 0 and np.all(np.diff(offsets) > 0)
                assert (f["input_ids"].shape, f["input_ids"].dtype) == ((offsets[-1],), np.int32)
                assert (f["token_type_ids"].shape, f["token_type_ids"].dtype) == ((offsets[-1],), np.uint8)
                tokens = f["input_ids"][:]
                assert np.all(tokens[offsets[:-1]] == 2) and np.all(
                    tokens[offsets[1:] - 1] == 3
                )  # [CLS] ... [SEP]
                assert set(f["labels"][:].tolist()) <= {0, 1, 2}


def test_rows_are_keyed_by_id_and_length_sorted_across_shards(tiny, tiny_cache):
    """A split's shards hold each of its example ids exactly once; rows go by (length, id)."""
    m = manifest_of(tiny_cache)
    for split in ("train", "dev"):
        ids, lengths = [], []
        for shard in m["splits"][split]["shards"]:
            with h5py.File(tiny_cache / shard["file"], "r") as f:
                ids += f["example_id"][:].tolist()
                lengths += np.diff(f["offsets"][:]).tolist()
        assert sorted(ids) == csv_ids(tiny["data"] / f"{split}.csv")
        assert list(zip(lengths, ids, strict=True)) == sorted(zip(lengths, ids, strict=True))


def test_layers_option_stores_only_those_layers(tiny, tiny_cache, tmp_path):
    result = cache_teacher(
        CacheConfig(
            task=tiny["task"],
            teacher=str(tiny["teacher"]),
            cache_dir=tmp_path,
            layers=(2, 0),
            splits=("dev",),
            quiet=True,
        )
    )
    assert result.manifest["layers"] == [0, 2]
    full = {}
    with h5py.File(tiny_cache / "dev-00000-of-00001.h5", "r") as f:
        for i, example_id in enumerate(f["example_id"][:].tolist()):
            full[example_id] = {layer: f["hidden"][layer][i] for layer in ("0", "2")}
    with h5py.File(result.path / "dev-00000-of-00001.h5", "r") as f:
        assert sorted(f["hidden"]) == ["0", "2"]
        for i, example_id in enumerate(f["example_id"][:].tolist()):
            for layer in ("0", "2"):  # same values as in the all-layer cache (the batches differ: rounding)
                np.testing.assert_allclose(
                    f["hidden"][layer][i], full[example_id][layer], rtol=2e-3, atol=1e-3
                )
    with open_cache(result.path) as cache, pytest.raises(CacheError, match="does not store teacher layer"):
        cache.read("dev", layers=[1])
    assert verify_cache(result.path).ok


def datasets_of(f: h5py.File) -> list[h5py.Dataset]:
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_cache_holds_only_json_and_hdf5(tiny_cache):
    """No pickle anywhere: the manifest is JSON, every other file is HDF5 with plain numeric datasets."""
    for path in tiny_cache.iterdir():
        if path.name == "manifest.json":
            json.loads(path.read_text())
            continue
        assert path.read_bytes()[:8] == HDF5_SIGNATURE, path.name
        with h5py.File(path, "r") as f:
            datasets = datasets_of(f)
            assert datasets and all(d.dtype.kind in "iuf" for d in datasets)
            assert not f.attrs.keys()


# --- verify -------------------------------------------------------------------------------------------


def test_verify_passes_a_good_cache(tiny_cache):
    report = verify_cache(tiny_cache)
    assert report.ok, report.problems
    assert (report.shards_checked, report.rows_checked) == (4, 126)


def test_verify_catches_a_flipped_byte(cache_copy):
    shard = cache_copy / "train-00001-of-00003.h5"
    with h5py.File(shard, "r") as f:  # a byte inside the data of one hidden vector: the file still opens
        offset = f["hidden"]["4"].id.get_offset()  # contiguous: the first byte of its data
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))

    report = verify_cache(cache_copy)
    assert not report.ok
    assert report.problems == [
        "train-00001-of-00003.h5: checksum mismatch (corrupted or truncated)",
        # the layer's stored statistics no longer fit its vectors: a second witness, without the sha256
        "train-00001-of-00003.h5: cls_stats/4 is not the statistics of its vectors",
    ]
    with open_cache(cache_copy) as cache, pytest.raises(CacheError, match="checksum mismatch"):
        cache.read("train")  # the reader refuses it too, so distill never trains on it


def test_verify_catches_a_truncated_shard(cache_copy):
    shard = cache_copy / "dev-00000-of-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = verify_cache(cache_copy)
    assert not report.ok
    assert any(p.startswith("dev-00000-of-00001.h5: checksum mismatch") for p in report.problems)
    assert any(p.startswith("dev-00000-of-00001.h5: unreadable") for p in report.problems)
    assert all("train" not in p for p in report.problems)


def test_verify_catches_a_missing_shard(cache_copy):
    (cache_copy / "train-00002-of-00003.h5").unlink()
    problems = verify_cache(cache_copy).problems
    assert "train-00002-of-00003.h5: missing" in problems
    assert "train: found 80 rows, the manifest says 96" in problems


def test_verify_reports_each_shard_on_its_own(cache_copy):
    """A shard with wrong shapes does not hide the rows of the good shards after it."""
    m = manifest_of(cache_copy)
    m["splits"]["train"]["shards"][0]["rows"] = 39
    m["splits"]["train"]["examples"] = 95  # the manifest agrees with itself; shard 0 does not agree with it
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    problems = verify_cache(cache_copy).problems
    assert problems and all(
        p.startswith("train-00000-of-00003.h5:") or p.startswith("train:") for p in problems
    )
    assert "train: found 56 rows, the manifest says 95" in problems  # the other two shards still count


@pytest.mark.parametrize("name", ["../x.h5", "/tmp/x.h5", "sub/x.h5", "x.pkl"])
def test_unsafe_shard_names_are_refused(cache_copy, name):
    m = manifest_of(cache_copy)
    m["splits"]["dev"]["shards"][0]["file"] = name
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="unsafe file"):
        open_cache(cache_copy)
    with pytest.raises(CacheError, match="unsafe file"):
        verify_cache(cache_copy)


def test_another_format_version_is_refused(cache_copy):
    m = manifest_of(cache_copy)
    m["format_version"] = FORMAT_VERSION + 1
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format version 2"):
        open_cache(cache_copy)


def test_a_folder_without_manifest_is_incomplete(cache_copy):
    (cache_copy / "manifest.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(cache_copy)


# --- the documented reader ----------------------------------------------------------------------------


def documented_reader() -> dict:
    """Run the Python example of docs/cache-format.md; return its namespace."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    block = next(b for b in blocks if "def read_row" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_documented_reader_reads_a_row_by_id(tiny_cache):
    read_row = documented_reader()["read_row"]
    with open_cache(tiny_cache) as cache:
        data = cache.read("train", layers=[0, 4])
    for position in (0, 50, 95):
        example_id = int(data["example_id"][position])
        row = read_row(tiny_cache, "train", example_id)
        np.testing.assert_array_equal(row["input_ids"], data["input_ids"][position])
        np.testing.assert_array_equal(row["token_type_ids"], data["token_type_ids"][position])
        np.testing.assert_array_equal(row["logits"], data["logits"][position])
        assert row["label"] == data["labels"][position]
        np.testing.assert_array_equal(row["hidden"][0], data["hidden"][position, 0])
        np.testing.assert_array_equal(row["hidden"][4], data["hidden"][position, 1])
    with pytest.raises(KeyError):
        read_row(tiny_cache, "train", 10_000)


def test_doc_names_every_dataset_and_manifest_field(tiny_cache):
    text = DOC.read_text()
    m = manifest_of(tiny_cache)
    for field in [*m, *m["teacher"], *m["splits"]["train"]["shards"][0], *m["dataset"]]:
        assert f"`{field}`" in text, f"docs/cache-format.md does not describe manifest field {field!r}"
    for dataset in ("example_id", "labels", "logits", "hidden/<i>", "offsets", "input_ids", "token_type_ids"):
        assert f"`{dataset}`" in text, f"docs/cache-format.md does not describe dataset {dataset!r}"
    assert f"The current `format_version` is {FORMAT_VERSION}." in text

"""pkdpipe.cache.reader: streaming a cache split for training, by example id, with only the needed layers."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pkdpipe.cache.reader import open_cache
from pkdpipe.errors import CacheError

LAYERS = [1, 3]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tiny_cache):
    with open_cache(tiny_cache) as opened:
        yield opened


def _stream(cache, **kwargs):
    settings = {"epoch": 0, "seed": 42, **kwargs}
    return list(cache.stream("train", 8, LAYERS, **settings))


def _by_id(cache, layers=LAYERS) -> dict[int, dict]:
    data = cache.read("train", layers)
    rows = {}
    for i, example_id in enumerate(data["example_id"].tolist()):
        rows[example_id] = {
            "labels": data["labels"][i],
            "logits": data["logits"][i],
            "hidden": data["hidden"][i],
            "input_ids": data["input_ids"][i],
            "token_type_ids": data["token_type_ids"][i],
        }
    return rows


def test_an_epoch_streams_every_example_once_with_its_own_targets(cache):
    expected = _by_id(cache)
    batches = _stream(cache)
    ids = [int(i) for b in batches for i in b["example_id"]]
    assert sorted(ids) == sorted(expected) and len(expected) == cache.num_examples("train") == 96
    for batch in batches:
        assert batch["hidden"].shape == (len(batch["example_id"]), len(LAYERS), cache.hidden_size)
        assert batch["hidden"].dtype == np.float16 and batch["logits"].dtype == np.float32
        for i, example_id in enumerate(batch["example_id"].tolist()):
            row = expected[example_id]
            np.testing.assert_array_equal(batch["logits"][i], row["logits"])
            np.testing.assert_array_equal(batch["hidden"][i], row["hidden"])
            np.testing.assert_array_equal(batch["input_ids"][i], row["input_ids"])
            np.testing.assert_array_equal(batch["token_type_ids"][i], row["token_type_ids"])
            assert batch["labels"][i] == row["labels"]


def test_hidden_layers_are_the_requested_ones_in_order(cache):
    one = cache.read("train", [3])["hidden"][:, 0]
    both = cache.read("train", [1, 3])["hidden"]
    np.testing.assert_array_equal(both[:, 1], one)
    assert not np.array_equal(both[:, 0], both[:, 1])


def test_epochs_differ_and_repeat(cache):
    def order(epoch):
        return [int(i) for b in _stream(cache, epoch=epoch) for i in b["example_id"]]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_skip_resumes_at_the_right_batch(cache):
    full = [b["example_id"].tolist() for b in _stream(cache, epoch=1)]
    for skip in (1, 3, len(full) - 1):
        assert [b["example_id"].tolist() for b in _stream(cache, epoch=1, skip=skip)] == full[skip:]


def test_two_ranks_read_disjoint_equal_halves_of_each_global_batch(cache):
    stored_ids = cache.read("train")["example_id"]  # the split's rows in storage order
    plan = cache.epoch_plan("train", 8, epoch=0, seed=42, world=2)
    first, second = _stream(cache, rank=0, world=2), _stream(cache, rank=1, world=2)
    assert len(first) == len(second) == len(plan)
    for rows, a, b in zip(plan, first, second, strict=True):
        a_ids, b_ids = set(a["example_id"].tolist()), set(b["example_id"].tolist())
        assert len(a_ids) == len(b_ids) == len(rows) // 2
        assert not a_ids & b_ids
        assert a_ids | b_ids == set(stored_ids[rows].tolist())


def test_batches_draw_from_every_shard_of_the_split(cache):
    """A uniform shuffle of the whole split: the first batches already mix the shards (which hold
    the shortest and the longest rows), where a blocked order kept each batch in one shard."""
    shard_of = {}
    for index, s in enumerate(cache.manifest["splits"]["train"]["shards"]):
        for example_id in cache.shard(s["file"])["example_id"][:]:
            shard_of[int(example_id)] = index
    first_two = [shard_of[int(i)] for b in _stream(cache)[:2] for i in b["example_id"]]
    assert len(set(first_two)) == 3


def test_length_grouped_batches_stream_every_row_with_its_targets(cache):
    expected = _by_id(cache)
    batches = _stream(cache, group_by_length=True)
    assert sorted(int(i) for b in batches for i in b["example_id"]) == sorted(expected)
    for batch in batches:
        for i, example_id in enumerate(batch["example_id"].tolist()):
            np.testing.assert_array_equal(batch["hidden"][i], expected[example_id]["hidden"])
    assert [b["example_id"].tolist() for b in batches] != [b["example_id"].tolist() for b in _stream(cache)]


class _Spy:
    """An h5py file or group that records which members are read."""

    def __init__(self, obj, path: str, seen: set[str]):
        self._obj, self._path, self._seen = obj, path, seen

    def __getitem__(self, key):
        value = self._obj[key]
        if not isinstance(key, str):
            return value
        path = f"{self._path}{key}"
        self._seen.add(path)
        return _Spy(value, path + "/", self._seen) if isinstance(value, h5py.Group) else value

    def __contains__(self, key):
        return key in self._obj

    def __getattr__(self, name):
        return getattr(self._obj, name)


def test_only_the_requested_layers_are_read(cache):
    seen: set[str] = set()
    for shard in cache.manifest["splits"]["train"]["shards"]:
        cache._files[shard["file"]] = _Spy(cache.shard(shard["file"]), "", seen)
    _stream(cache)
    assert {p for p in seen if p.startswith("hidden/")} == {f"hidden/{layer}" for layer in LAYERS}
    assert {"example_id", "logits", "labels", "input_ids", "offsets"} <= seen
    seen.clear()
    list(cache.stream("train", 8, [], epoch=0, seed=42))
    assert not any(p.startswith("hidden") for p in seen)
    assert {
        "example_id",
        "logits",
        "labels",
        "input_ids",
        "offsets",
    } <= seen  # tokens: read per window, not kept


# -- flat memory: few shards open, nothing kept per row ----------------------------------------
@pytest.fixture(scope="module")
def many_shards(tiny, tmp_path_factory):
    """The tiny task cached in shards of 8 rows: train 96 -> 12 shards, more than `OPEN_SHARDS`."""
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    root = tmp_path_factory.mktemp("many-shards")
    config = CacheConfig(
        task=tiny["task"], teacher=str(tiny["teacher"]), cache_dir=root, shard_size=8, quiet=True
    )
    return cache_teacher(config).path


def _count_open_files(monkeypatch) -> dict:
    """Counts the HDF5 files open at once from here on (`peak`), through h5py.File."""
    counts = {"open": 0, "peak": 0}

    class Counted(h5py.File):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            counts["open"] += 1
            counts["peak"] = max(counts["peak"], counts["open"])

        def close(self):
            if self.id.valid:
                counts["open"] -= 1
            super().close()

    monkeypatch.setattr(h5py, "File", Counted)
    return counts


def _stored_tokens(folder) -> dict[int, tuple]:
    """{example id: (input_ids, token_type_ids)} read straight from every train shard's datasets."""
    from pkdpipe.cache import manifest as mf
    from pkdpipe.cache import schema
    from pkdpipe.cache.reader import read_shard

    rows = {}
    for s in mf.read(folder).splits["train"].shards:
        names = (schema.EXAMPLE_ID, schema.OFFSETS, schema.INPUT_IDS, schema.TOKEN_TYPE_IDS)
        d = read_shard(folder / s.file, *names)
        for r, example_id in enumerate(d[schema.EXAMPLE_ID].tolist()):
            span = slice(d[schema.OFFSETS][r], d[schema.OFFSETS][r + 1])
            rows[example_id] = (d[schema.INPUT_IDS][span], d[schema.TOKEN_TYPE_IDS][span])
    return rows


def test_a_cache_of_many_shards_streams_with_few_open_and_the_stored_tokens(many_shards, monkeypatch):
    from pkdpipe.cache import reader

    expected = _stored_tokens(many_shards)
    assert len(expected) == 96
    monkeypatch.setattr(reader, "OPEN_SHARDS", 4, raising=False)
    counts = _count_open_files(monkeypatch)
    with open_cache(many_shards) as cache:
        assert len(cache.manifest.splits["train"].shards) == 12
        cache.check_rows("train")
        assert cache.token_range("train") == (
            min(int(ids.min()) for ids, _ in expected.values()),
            max(int(ids.max()) for ids, _ in expected.values()),
        )
        for epoch, grouped in ((0, False), (1, True)):
            batches = list(cache.stream("train", 8, LAYERS, epoch=epoch, seed=3, group_by_length=grouped))
            assert sorted(int(i) for b in batches for i in b["example_id"]) == sorted(expected)
            for batch in batches:
                for i, example_id in enumerate(batch["example_id"].tolist()):
                    np.testing.assert_array_equal(batch["input_ids"][i], expected[example_id][0])
                    np.testing.assert_array_equal(batch["token_type_ids"][i], expected[example_id][1])
        assert 0 < counts["peak"] <= 4
    assert counts["open"] == 0  # close() closes what is still open


def test_a_shard_replaced_after_its_check_is_refused_when_opened_again(many_shards, tmp_path, monkeypatch):
    import shutil

    from pkdpipe.cache import reader

    copy = tmp_path / many_shards.name
    shutil.copytree(many_shards, copy)
    monkeypatch.setattr(reader, "OPEN_SHARDS", 1)
    with open_cache(copy) as cache:
        first, second = [s.file for s in cache.manifest.splits["train"].shards[:2]]
        cache.shard(first)
        cache.shard(second)  # closes the first
        replacement = copy / "replacement"
        shutil.copyfile(copy / first, replacement)  # the same bytes, but another file than the one checked
        replacement.replace(copy / first)
        with pytest.raises(CacheError, match=f"{first} changed on disk since its checksum was checked"):
            cache.shard(first)


def test_a_forked_process_opens_its_own_shards(cache, monkeypatch):
    import os

    name = cache.manifest.splits["train"].shards[0].file
    inherited = cache.shard(name)
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as in a DataLoader worker forked after it
    assert cache.shard(name) is not inherited
    assert len(_stream(cache)) == 12


def test_layers_not_in_the_cache_are_refused(tiny, tmp_path):
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    built = cache_teacher(
        CacheConfig(
            task=tiny["task"], teacher=str(tiny["teacher"]), cache_dir=tmp_path, layers=(0, 1), quiet=True
        )
    )
    with open_cache(built.path) as partial:
        assert partial.layers == [0, 1]
        with pytest.raises(CacheError, match=r"does not store teacher layer\(s\) \[3\]"):
            next(partial.stream("train", 8, [1, 3], epoch=0, seed=0))


def test_no_cache_under_the_root(tmp_path):
    with pytest.raises(CacheError, match="no complete cache under"):
        open_cache(None, tmp_path / "empty")


# -- checksums shared by torchrun ranks ----------------------------------------------------------
def _as_rank(monkeypatch, rank, world, others_ok=True):
    from pkdpipe import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "node_rank_and_size", lambda: (rank, world))
    monkeypatch.setattr(distributed, "all_ok", lambda ok: ok and others_ok)


def _count_checksums(monkeypatch) -> list[str]:
    from pkdpipe.cache import reader

    seen = []
    real = reader.sha256_file

    def counted(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(reader, "sha256_file", counted)
    return seen


def test_each_rank_checksums_its_share_of_the_shards_once(tiny_cache, monkeypatch):
    _as_rank(monkeypatch, rank=1, world=2)
    seen = _count_checksums(monkeypatch)
    with open_cache(tiny_cache) as cache:
        names = [s["file"] for split in ("train", "dev") for s in cache.manifest["splits"][split]["shards"]]
        cache.verify_across_ranks(["train", "dev"])
        assert seen == names[1::2]
        _stream(cache)  # reading every train shard checksums nothing more
        assert seen == names[1::2]


def test_a_corrupted_shard_stops_every_rank(tiny_cache, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / tiny_cache.name
    shutil.copytree(tiny_cache, copy)
    with open_cache(copy) as cache:
        second = cache.manifest["splits"]["train"]["shards"][1]["file"]
    with open(copy / second, "r+b") as f:  # flip the last byte in place
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))

    _as_rank(monkeypatch, rank=1, world=2)  # the rank that checks it names it
    with open_cache(copy) as cache, pytest.raises(CacheError, match=f"checksum mismatch in .*{second}"):
        cache.verify_across_ranks(["train"])
    _as_rank(monkeypatch, rank=0, world=2, others_ok=False)  # the other stops too
    with open_cache(copy) as cache, pytest.raises(CacheError, match="another rank found"):
        cache.verify_across_ranks(["train"])


def test_a_shard_that_cannot_be_read_stops_the_ranks_with_one_line(tiny_cache, monkeypatch):
    from pkdpipe.cache import reader

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader, "sha256_file", unreadable)
    _as_rank(monkeypatch, rank=0, world=2)
    with open_cache(tiny_cache) as cache, pytest.raises(CacheError, match="cannot read shard .*Permission"):
        cache.verify_across_ranks(["train"])

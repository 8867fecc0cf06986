"""pkdpipe.cache.stats and the statistics a cache stores: what each [CLS] layer carries."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import PLANTED_DIM, PLANTED_LAYER, PLANTED_VALUE

from pkdpipe.cache import schema
from pkdpipe.cache.fingerprint import sha256_file
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.stats import Accumulator, LayerStats, merge_all, top_dims
from pkdpipe.cache.verify import verify_cache


def test_stats_of_vectors_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    x[:, 3] += 40.0  # one dimension far from zero for every row, as MiniLM's dimension 99
    stats = LayerStats.of(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(stats.mean, x.mean(0))
    np.testing.assert_allclose(stats.std, x.std(0))
    assert stats.varying_share == pytest.approx(((unit - unit.mean(0)) ** 2).sum(1).mean())
    np.testing.assert_allclose(stats.length_shares(), (unit**2).mean(0))
    assert stats.length_shares().sum() == pytest.approx(1.0)
    assert top_dims(stats.length_shares(), 1)[0][0] == 3 and stats.length_shares()[3] > 0.99
    assert stats.varying_shares().sum() == pytest.approx(1.0)


def test_one_vector_for_every_row_varies_by_nothing():
    stats = LayerStats.of(np.tile([3.0, -4.0, 0.0], (10, 1)))
    assert stats.varying_share == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(stats.length_shares(), [0.36, 0.64, 0.0])
    np.testing.assert_array_equal(stats.varying_shares(), np.zeros(3))  # nothing varies: no shares


def test_merged_parts_equal_the_whole_in_any_split():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 16)) * rng.uniform(0.01, 5, size=16) + rng.normal(size=16) * 30
    whole = LayerStats.of(x)
    for cuts in ([500], [1, 2, 999], [100, 537, 538]):
        parts = merge_all(LayerStats.of(part) for part in np.split(x, cuts))
        assert parts.count == whole.count
        np.testing.assert_allclose(parts.to_array(), whole.to_array(), rtol=1e-10, atol=1e-12)
    assert LayerStats.of(x[:0]).merge(whole) is whole


def test_the_stored_array_round_trips():
    stats = LayerStats.of(np.random.default_rng(2).normal(size=(20, 4)))
    again = LayerStats.from_array(20, stats.to_array())
    np.testing.assert_array_equal(again.to_array(), stats.to_array())
    assert again.count == 20


@pytest.mark.parametrize("centred", [True, False], ids=["stored-centre", "no-centre"])
def test_accumulated_stats_equal_those_of_the_whole_layer(centred):
    """What verify recomputes block by block is what the writer stored (`LayerStats.of`), within
    verify's tolerance by far: an outlier dimension, a dimension that never changes (layer 0's
    [CLS]), float16 values, and rows that do not fill the last block."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3 * Accumulator.BLOCK + 17, 24)) * rng.uniform(0.01, 3, size=24)
    x[:, 5] += 300.0
    x[:, 9] = 37.5
    x = x.astype(np.float16)
    whole = LayerStats.of(x)
    acc = Accumulator(24, whole if centred else None)
    for part in np.split(x, [1, 300, 301]):  # given in any pieces
        acc.add(part)
    found = acc.result()
    assert found.count == len(x)
    np.testing.assert_allclose(found.to_array(), whole.to_array(), rtol=1e-11, atol=1e-13)
    assert Accumulator(24).result().count == 0


def test_a_wrong_centre_still_gives_the_true_mean():
    """A tampered statistic is the centre verify starts from: the mean it finds is still exact."""
    x = np.random.default_rng(4).normal(size=(600, 8)).astype(np.float16)
    whole = LayerStats.of(x)
    wrong = LayerStats.from_array(600, whole.to_array() + 0.5)
    acc = Accumulator(8, wrong)
    acc.add(x)
    np.testing.assert_allclose(acc.result().mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(acc.result().unit_mean, whole.unit_mean, rtol=1e-12)


# -- a cache with a planted constant dimension (conftest.planted_cache) ------------------------------
def test_a_planted_constant_dimension_comes_out_as_planted(planted_cache):
    with open_cache(planted_cache) as cache:
        stats = cache.layer_stats("train")
        assert sorted(stats) == [0, 1, 2, 3, 4] and stats[2].count == 96
        vectors = cache.read("train", [PLANTED_LAYER])["hidden"][:, 0]
    planted = stats[PLANTED_LAYER]
    dim, share = top_dims(planted.length_shares(), 1)[0]
    assert dim == PLANTED_DIM and share > 0.999  # one dimension holds the vector
    assert planted.varying_share < 1e-4  # ... so the normalised target is one vector for every row
    assert stats[1].varying_share > 100 * planted.varying_share  # an untouched layer varies
    # the stored statistics are those of the stored (float16) vectors, merged over 3 shards
    np.testing.assert_allclose(planted.to_array(), LayerStats.of(vectors).to_array(), rtol=1e-9, atol=1e-12)
    assert planted.mean[PLANTED_DIM] == pytest.approx(PLANTED_VALUE, rel=0.01)


def test_an_older_cache_without_stored_stats_gets_the_same_stats_computed(planted_cache, tmp_path):
    old = tmp_path / planted_cache.parent.name / planted_cache.name
    shutil.copytree(planted_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("cls_stats")  # as pkdpipe 0.2 wrote it (the field is not a key input)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with open_cache(old) as cache, open_cache(planted_cache) as stored:
        assert not cache.manifest.cls_stats and stored.manifest.cls_stats
        computed, read = cache.layer_stats("train", [1, 2]), stored.layer_stats("train", [1, 2])
    for layer in (1, 2):
        np.testing.assert_allclose(computed[layer].to_array(), read[layer].to_array(), rtol=1e-9, atol=1e-12)
    assert verify_cache(old).ok


def _tamper_stats(folder, shard_name: str) -> None:
    """Change one stored statistic and fix the shard's sha256 in the manifest, as a hostile or
    careless teammate could: only the statistics' own check can catch it."""
    shard = folder / shard_name
    with h5py.File(shard, "r+") as f:
        f[schema.cls_stats(3)][0, 7] += 0.5
    manifest = json.loads((folder / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if entry["file"] == shard_name:
                entry["sha256"], entry["bytes"] = sha256_file(shard), shard.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_finds_statistics_that_are_not_those_of_the_vectors(tiny_cache, tmp_path):
    folder = tmp_path / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    assert verify_cache(folder).ok
    _tamper_stats(folder, "train-00001-of-00003.h5")
    problems = verify_cache(folder).problems
    assert problems == ["train-00001-of-00003.h5: cls_stats/3 is not the statistics of its vectors"]


def test_verify_finds_one_value_one_float16_step_off(tiny_cache, tmp_path):
    """The smallest change a float16 vector can take, in one value of one row, with the shard's
    sha256 made to match: the statistics alone still tell."""
    folder = tmp_path / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    shard = folder / "train-00001-of-00003.h5"
    with h5py.File(shard, "r+") as f:
        values = f[schema.hidden(2)][5]
        values[11] = np.nextafter(values[11], np.float16(np.inf))
        f[schema.hidden(2)][5] = values
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"], entry["bytes"] = sha256_file(shard), shard.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_cache(folder).problems
    assert problems == ["train-00001-of-00003.h5: cls_stats/2 is not the statistics of its vectors"]


def test_stats_survive_a_pull_and_a_tampered_copy_is_refused(tiny_cache, tmp_path):
    from pkdpipe.cache.local import list_caches
    from pkdpipe.cache.store import pull, push
    from pkdpipe.errors import StoreError

    store = tmp_path / "store"
    push(tiny_cache, str(store), quiet=True)
    pulled = pull(str(store / tiny_cache.parent.name / tiny_cache.name), tmp_path / "root", quiet=True)
    with open_cache(pulled) as mine, open_cache(tiny_cache) as theirs:
        assert mine.manifest.cls_stats
        for layer, stats in mine.layer_stats("train").items():
            np.testing.assert_array_equal(stats.to_array(), theirs.layer_stats("train")[layer].to_array())
    _tamper_stats(store / tiny_cache.parent.name / tiny_cache.name, "train-00000-of-00003.h5")
    with pytest.raises(StoreError, match="refusing to install .*cls_stats/3 is not the statistics of its"):
        pull(str(store / tiny_cache.parent.name / tiny_cache.name), tmp_path / "root2", quiet=True)
    assert list_caches(tmp_path / "root2") == []

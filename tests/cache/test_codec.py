"""pkdpipe.cache.codec and int8 caches: the round trip stays within the codec's bound, an outlier
dimension does not erase what differs between examples, the key tells codecs apart (and float16
keys did not move), verify refuses a bad scale, and a student trains from an int8 cache."""

from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import _plant, _tiny_cache_config

from pkdpipe.cache import codec, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import cache_key, sha256_file
from pkdpipe.cache.reader import open_cache
from pkdpipe.cache.verify import verify_cache
from pkdpipe.config import CacheConfig
from pkdpipe.errors import CacheError, ConfigError
from pkdpipe.teacher import cache_teacher


def _build(tiny, root, hook=None, **settings):
    config = dataclasses.replace(_tiny_cache_config(tiny, root), **settings)
    return cache_teacher(config, teacher_hook=hook).path


@pytest.fixture(scope="module")
def int8_cache(tiny, tmp_path_factory):
    return _build(tiny, tmp_path_factory.mktemp("int8"), codec="int8")


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """The planted teacher (layer 2 dominated by one dimension) cached in float32 and in int8."""
    root = tmp_path_factory.mktemp("planted-codecs")
    return {
        name: _build(tiny, root / name, _plant, **settings)
        for name, settings in {"float32": {"dtype": "float32"}, "int8": {"codec": "int8"}}.items()
    }


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the codec on its own ----------------------------------------------------------------------------
def test_a_block_round_trips_within_the_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 16)).astype(np.float32) * rng.uniform(1e-3, 3, size=16).astype(np.float32)
    x[:, 3] += 400.0  # an outlier dimension far from zero
    x[:, 5] = 0.25  # a constant dimension (as layer 0's [CLS])
    x[17, 9] = 80.0  # one outlier row in one dimension
    codes, offset, scale = codec.encode_block(x)
    assert codes.dtype == np.int8 and offset.dtype == scale.dtype == np.float32
    decoded = codec.decode_all(codes, offset[None], scale[None])
    error = np.abs(decoded - x)
    assert (error <= codec.bound(offset, scale)).all()
    assert error[:, 5].max() == 0.0  # constant: exact
    assert np.abs(codes).max() == 127  # the whole range of codes is used
    others = np.delete(np.arange(16), [5, 9])
    assert (error[:, others].max(0) <= np.ptp(x[:, others], axis=0) / 254 * 0.5 + 1e-4).all()


def test_rows_decode_with_their_own_block():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2 * codec.BLOCK_ROWS + 5, 4)).astype(np.float32)
    x[codec.BLOCK_ROWS :] *= 100  # the second and third blocks are coarser: the first keeps its steps
    parts = [codec.encode_block(x[b : b + codec.BLOCK_ROWS]) for b in range(0, len(x), codec.BLOCK_ROWS)]
    codes = np.concatenate([p[0] for p in parts])
    offset, scale = np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])
    rows = np.array([0, 5, codec.BLOCK_ROWS - 1, codec.BLOCK_ROWS, len(x) - 1])
    decoded = codec.decode(codes[rows], offset, scale, rows)
    assert (np.abs(decoded - x[rows]) <= codec.bound(offset, scale)[rows // codec.BLOCK_ROWS]).all()
    assert np.abs(decoded[:3] - x[rows[:3]]).max() < 0.05


# -- int8 caches -------------------------------------------------------------------------------------
def test_an_int8_cache_reads_within_the_bound_of_the_float16_one(int8_cache, tiny_cache):
    """Written and read through the cache: each value within the codec's bound of the teacher's
    float32 output, which the float16 cache holds to float16's rounding."""
    with open_cache(int8_cache) as c8, open_cache(tiny_cache) as c16:
        assert c8.manifest.codec == "int8" and c8.manifest.hidden_dtype == "int8"
        for split in ("train", "dev"):
            a, b = c8.read(split, c8.layers), c16.read(split, c16.layers)
            np.testing.assert_array_equal(a["example_id"], b["example_id"])
            assert a["hidden"].dtype == np.float32 and a["hidden"].shape == b["hidden"].shape
            steps = []
            for shard in c8.manifest.shards(split):
                f = c8.shard(shard.file)
                steps.append(
                    np.stack(
                        [
                            codec.bound(f[schema.hidden_offset(i)][:], f[schema.hidden_scale(i)][:])
                            for i in c8.layers
                        ],
                        axis=1,
                    )[np.arange(shard.rows) // codec.BLOCK_ROWS]
                )
            reference = b["hidden"].astype(np.float32)
            allowed = np.concatenate(steps) + np.abs(reference) * 2.0**-10  # + float16's rounding
            assert (np.abs(a["hidden"] - reference) <= allowed).all()
            streamed = next(c8.stream(split, 8, [2], epoch=0, seed=0))
            rows = {int(i): k for k, i in enumerate(a["example_id"])}
            expected = a["hidden"][[rows[int(i)] for i in streamed["example_id"]], c8.layers.index(2)]
            np.testing.assert_array_equal(streamed["hidden"][:, 0], expected)


def test_int8_halves_the_vectors_bytes(int8_cache, tiny_cache):
    with open_cache(int8_cache) as c8, open_cache(tiny_cache) as c16:
        l8, l16 = schema.Layout.of(c8.manifest), schema.Layout.of(c16.manifest)
    rows = codec.BLOCK_ROWS * 8
    vectors = {
        name: sum(
            np.prod(s) * d.itemsize
            for n, (s, d) in layout.datasets(rows, 0).items()
            if n.startswith("hidden")
        )
        for name, layout in (("int8", l8), ("float16", l16))
    }
    assert vectors["int8"] / vectors["float16"] == pytest.approx(0.5 * (1 + 8 / codec.BLOCK_ROWS))


def test_a_planted_outlier_dimension_does_not_erase_what_differs_between_examples(planted):
    """Layer 2's [CLS] is dominated by one dimension (+1000): normalised, the rows differ by little.
    The int8 codes move each normalised row by a small part of that difference; one scale per row
    (what a per-dimension scale replaces) moves it by more than the difference itself."""
    with open_cache(planted["float32"]) as exact, open_cache(planted["int8"]) as coded:
        truth = exact.read("train", [2])["hidden"][:, 0]
        decoded = coded.read("train", [2])["hidden"][:, 0]
    n = _normalised(truth)
    variation = np.abs(n - n.mean(0)).sum(1).mean()  # mean L1 distance of a row from the layer mean
    codec_error = np.abs(_normalised(decoded) - n).sum(1).mean()
    per_row_scale = np.abs(truth).max(1, keepdims=True) / 127
    per_row = np.abs(_normalised(np.rint(truth / per_row_scale) * per_row_scale) - n).sum(1).mean()
    assert variation < 0.1  # the planted dimension holds the vector: little differs
    assert codec_error < 0.05 * variation
    assert per_row > 0.5 * variation  # what the codec must not do, and the test would catch


# -- the key -----------------------------------------------------------------------------------------
def test_the_key_differs_between_codecs_and_float16_keys_did_not_move(int8_cache, tiny_cache):
    m16 = mf.read(tiny_cache)
    inputs = mf.KeyInputs.of(m16)
    assert inputs.codec == "float16"
    before_codecs = {k: v for k, v in dataclasses.asdict(inputs).items() if k != "codec"}
    assert inputs.key() == cache_key(before_codecs) == m16.key  # the key a float16 cache always had
    m8 = mf.read(int8_cache)
    assert m8.key != m16.key and m8["codec"] == "int8"
    assert dataclasses.replace(mf.KeyInputs.of(m8), codec="float16").key() != m8.key
    # a pkdpipe from before codecs hashes the inputs without the codec: it refuses an int8 cache
    assert (
        cache_key({k: v for k, v in dataclasses.asdict(mf.KeyInputs.of(m8)).items() if k != "codec"})
        != m8.key
    )


def test_a_manifest_from_before_codecs_reads_as_float16(tiny_cache, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny_cache, folder)
    data = json.loads((folder / mf.MANIFEST).read_text())
    del data["codec"]
    (folder / mf.MANIFEST).write_text(json.dumps(data))
    assert mf.read(folder).codec == "float16"
    assert verify_cache(folder).ok


@pytest.mark.parametrize(
    ("codec_name", "dtype"),
    [("int8", "float16"), ("float16", "int8"), ("int4", "int8")],
    ids=["dtype", "codes", "unknown"],
)
def test_a_manifest_whose_codec_does_not_fit_its_dtype_is_refused(int8_cache, tmp_path, codec_name, dtype):
    folder = tmp_path / "odd"
    shutil.copytree(int8_cache, folder)
    data = json.loads((folder / mf.MANIFEST).read_text())
    data["codec"], data["hidden_dtype"] = codec_name, dtype
    (folder / mf.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CacheError, match="is not a way pkdpipe stores vectors"):
        mf.read(folder)


def test_int8_with_float32_is_refused_before_any_work(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--codec int8 stores int8 codes"):
        CacheConfig(task=tiny["task"], cache_dir=tmp_path, codec="int8", dtype="float32")
    with pytest.raises(ConfigError, match="--codec must be one of float16, int8"):
        CacheConfig(task=tiny["task"], cache_dir=tmp_path, codec="int4")


# -- verify ------------------------------------------------------------------------------------------
def _tamper(cache, tmp_path, change, rehash=True):
    """A copy of `cache` with `change(h5 file)` applied to its first train shard; with `rehash` the
    manifest's checksum is made to match, so only the checks of the contents can find it."""
    folder = tmp_path / "tampered"
    shutil.copytree(cache, folder)
    data = json.loads((folder / mf.MANIFEST).read_text())
    entry = data["splits"]["train"]["shards"][0]
    with h5py.File(folder / entry["file"], "r+") as f:
        change(f)
    if rehash:
        entry["sha256"] = sha256_file(folder / entry["file"])
        entry["bytes"] = (folder / entry["file"]).stat().st_size
        (folder / mf.MANIFEST).write_text(json.dumps(data))
    return folder


def _reshape_scale(f):
    del f[schema.hidden_scale(2)]
    f.create_dataset(schema.hidden_scale(2), data=np.ones((2, 32), np.float32))


def _widen_scale(f):
    f[schema.hidden_scale(2)][0, 3] *= 4


def _negate_scale(f):
    f[schema.hidden_scale(2)][0, :] *= -1


def _nan_offset(f):
    f[schema.hidden_offset(1)][0, 0] = np.nan


def _scale_as_float16(f):
    values = f[schema.hidden_scale(2)][:]
    del f[schema.hidden_scale(2)]
    f.create_dataset(schema.hidden_scale(2), data=values.astype(np.float16))


def _drop_scale(f):
    del f[schema.hidden_scale(3)]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_reshape_scale, "hidden_scale/2 has shape (2, 32), expected (1, 32)"),
        (_scale_as_float16, "hidden_scale/2 holds float16, expected float32"),
        (_drop_scale, "no dataset hidden_scale/3"),
        (_widen_scale, "cls_stats/2 is not the statistics of its vectors"),
        (_negate_scale, "hidden_scale/2 holds a negative step"),
        (_nan_offset, "hidden_offset/1 holds NaN or inf"),
    ],
    ids=["shape", "dtype", "missing", "values", "negative", "nan"],
)
def test_verify_refuses_a_bad_scale_dataset(int8_cache, tmp_path, change, problem):
    report = verify_cache(_tamper(int8_cache, tmp_path, change))
    assert not report.ok and any(problem in p for p in report.problems), report.problems


def test_a_changed_scale_fails_the_checksum(int8_cache, tmp_path):
    folder = _tamper(int8_cache, tmp_path, _widen_scale, rehash=False)
    assert any("checksum mismatch" in p for p in verify_cache(folder).problems)
    with open_cache(folder) as cache, pytest.raises(CacheError, match="checksum mismatch"):
        cache.read("train", [2])


def test_a_fresh_int8_cache_verifies(int8_cache):
    report = verify_cache(int8_cache)
    assert report.ok, report.problems
    assert report.rows_checked == 96 + 30


# -- training ----------------------------------------------------------------------------------------
def test_a_student_trains_from_an_int8_cache_as_from_float16(
    int8_cache, tiny_cache, tmp_path, distill_config, one_thread
):
    """Same student, seed and data order: the losses logged from the int8 cache are those of the
    float16 one up to the codec's error."""
    from pkdpipe.train import distill

    logs = {}
    for name, cache in (("int8", int8_cache), ("float16", tiny_cache)):
        output = tmp_path / name
        result = distill(distill_config(cache, output, max_steps=10, checkpoint_every=0))
        assert result.steps == 10 and (output / "model.safetensors").is_file()
        logs[name] = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    train = {name: [r for r in log if "loss" in r] for name, log in logs.items()}
    assert train["int8"] and [r["step"] for r in train["int8"]] == [r["step"] for r in train["float16"]]
    for a, b in zip(train["int8"], train["float16"]):
        assert np.isfinite(a["loss"]) and a["pt"] > 0
        assert a["pt"] == pytest.approx(b["pt"], rel=0.02) and a["loss"] == pytest.approx(b["loss"], rel=0.02)

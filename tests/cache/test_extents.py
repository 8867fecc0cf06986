"""pkdpipe.cache.extents: each dataset of a shard as one byte range with its own sha256."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np

from pkdpipe.cache import extents, schema
from pkdpipe.cache import manifest as mf
from pkdpipe.cache.fingerprint import sha256_file
from pkdpipe.cache.writer import ShardWriter


def _shard(path, codec: str) -> None:
    layout = schema.Layout(
        num_labels=3,
        hidden_size=8,
        layers=(0, 1, 2),
        hidden_dtype="int8" if codec == "int8" else "float16",
        regression=False,
        with_token_types=True,
        with_stats=True,
        codec=codec,
    )
    lengths = np.array([3, 4, 2, 5, 1])
    writer = ShardWriter(path, np.arange(5), lengths, layout)
    rng = np.random.default_rng(0)
    writer.write(
        [np.arange(n, dtype=np.int32) for n in lengths],
        [np.zeros(n, np.uint8) for n in lengths],
        np.array([0, 1, 2, 0, 1]),
        rng.normal(size=(5, 3)).astype(np.float32),
        {layer: rng.normal(size=(5, 8)) for layer in layout.layers},
    )
    writer.commit()


def _datasets(f: h5py.File) -> set[str]:
    found: set[str] = set()
    f.visititems(lambda name, item: found.add(name) if isinstance(item, h5py.Dataset) else None)
    return found


def test_each_datasets_extent_is_its_bytes_in_the_file_and_its_values_hash(tmp_path):
    for codec in ("float16", "int8"):
        path = tmp_path / f"train-00000-of-00001-{codec}.h5"
        _shard(path, codec)
        whole, found = extents.record(path)
        assert whole == sha256_file(path)
        data = path.read_bytes()
        with h5py.File(path, "r") as f:
            assert set(found) == _datasets(f)  # every dataset, the int8 offsets and scales included
            for name, extent in found.items():
                raw = data[extent["offset"] : extent["offset"] + extent["bytes"]]
                assert hashlib.sha256(raw).hexdigest() == extent["sha256"] == extents.sha256_dataset(f[name])
                assert len(raw) == f[name].nbytes
        if codec == "int8":
            assert {"hidden_offset/1", "hidden_scale/1"} <= set(found)


def test_a_shard_with_a_chunked_dataset_records_no_extents(tmp_path):
    """Caches made before pkdpipe 0.2 chunked their datasets: no one range holds them, so they are
    pulled whole."""
    path = tmp_path / "train-00000-of-00001.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(schema.LOGITS, data=np.ones((300, 3), np.float32), chunks=(256, 3))
    whole, found = extents.record(path)
    assert whole == sha256_file(path) and found is None


def test_a_written_shard_holds_exactly_the_arrays_and_checks_against_their_extents(tmp_path):
    arrays = {
        "logits": np.arange(12, dtype=np.float32).reshape(4, 3),
        "hidden/2": np.ones((4, 8), np.float16),
    }
    path = tmp_path / "train-00000-of-00001.h5"
    extents.write(path, arrays)
    sums = {n: mf.Extent(0, a.nbytes, hashlib.sha256(a.tobytes()).hexdigest()) for n, a in arrays.items()}
    shard = mf.Shard(path.name, 4, "0" * 64, datasets=sums)
    with h5py.File(path, "r") as f:
        assert extents.problem(f, shard, list(arrays)) is None
        assert "records no checksum of hidden/3" in extents.problem(f, shard, ["hidden/3"])
        np.testing.assert_array_equal(f["hidden/2"][:], arrays["hidden/2"])
    bad = mf.Shard(path.name, 4, "0" * 64, datasets={**sums, "logits": mf.Extent(0, 48, "1" * 64)})
    with h5py.File(path, "r") as f:
        assert "logits does not match its checksum" in extents.problem(f, bad, ["logits"])

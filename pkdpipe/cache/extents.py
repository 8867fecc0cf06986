"""Each dataset of a shard as one byte range with its own sha256: what a pull of some layers fetches
and checks (`pkdpipe cache pull KEY --layers 2,4,6,8,10`; docs/sharing.md).

Every dataset of a shard is contiguous (`pkdpipe.cache.schema`), so its bytes are one range of the
file. `record` finds the ranges (h5py's `get_offset`) and hashes each in the same single pass over
the file that hashes the whole file: cache-teacher still reads each shard once. The manifest keeps
them per shard (`Shard.datasets`: offset, bytes, sha256).

A pull of some layers then asks the store for those ranges and nothing else: one ranged read per
dataset (one GET over S3), its sha256 checked before it is used. It does not open the store's HDF5
file: measured over S3 (`benchmarks/bench_pull.py --s3`), h5py through s3fs received the whole
file with s3fs's default cache, 22% more than needed in 57 requests with a 64 KiB readahead, and
what is needed in 104 requests without a cache, against 33 for the ranges; and it would parse an
untrusted file's metadata before anything could be checked. Here the only bytes read are those the
manifest names, and every one of them is checked.

The local shard a partial pull writes holds just the datasets fetched (`write`); a copy's shards
are checked dataset by dataset (`problem`), against the same records.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import numpy as np

from pkdpipe import files
from pkdpipe.cache import manifest as mf
from pkdpipe.cache import schema
from pkdpipe.errors import CacheError

CHUNK = 4 << 20  # bytes per read when a shard is hashed
HASH_ROWS = 4096  # rows per read when a local dataset is hashed: bounded memory on big shards


def record(path: Path) -> tuple[str, dict[str, dict] | None]:
    """The sha256 of shard file `path` and {dataset: {offset, bytes, sha256}} of each dataset in it,
    from one read of the file. None for the datasets when one is not one plain range of the file
    (chunked, as in caches made before pkdpipe 0.2, or stored elsewhere): such a cache is pulled whole."""
    ranges = _ranges(path)
    digest = hashlib.sha256()
    parts = {name: hashlib.sha256() for name in ranges or {}}
    spans = sorted((offset, offset + size, name) for name, (offset, size) in (ranges or {}).items())
    with open(path, "rb") as f:
        position = 0
        while block := f.read(CHUNK):
            digest.update(block)
            end = position + len(block)
            for start, stop, name in spans:
                if start < end and stop > position:
                    parts[name].update(block[max(start, position) - position : min(stop, end) - position])
            position = end
    if ranges is None:
        return digest.hexdigest(), None
    extents = {
        name: {"offset": offset, "bytes": size, "sha256": parts[name].hexdigest()}
        for name, (offset, size) in sorted(ranges.items())
    }
    return digest.hexdigest(), extents


def _ranges(path: Path) -> dict[str, tuple[int, int]] | None:
    """{dataset: (offset, bytes)} of every dataset in the shard, or None when one has no such range."""
    found: dict[str, tuple[int, int]] = {}
    plain = True

    def visit(name: str, item) -> None:
        nonlocal plain
        if not isinstance(item, h5py.Dataset):
            return
        plist = item.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_external_count() or plist.get_nfilters():
            plain = False
            return
        offset = item.id.get_offset()
        size = item.id.get_storage_size()
        if offset is None and item.size:  # data never written: no range holds it
            plain = False
            return
        found[name] = (int(offset or 0), int(size if offset is not None else 0))

    with h5py.File(path, "r") as f:
        if schema.indirection(f):
            return None
        f.visititems(visit)
    return found if plain else None


def needed(manifest: mf.Manifest, shard: mf.Shard, layers) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{dataset: (shape, dtype)} a copy holding `layers` needs of `shard`: the rows' ids, labels,
    logits and tokens, and each of those layers' vectors (with their int8 offsets and steps and
    their statistics, where the cache has them). The token count comes from input_ids' extent."""
    layout = dataclasses.replace(schema.Layout.of(manifest), layers=tuple(layers))
    extent = (shard.datasets or {}).get(schema.INPUT_IDS)
    if extent is None:
        raise CacheError(f"shard {shard.file} records no extent of {schema.INPUT_IDS}")
    itemsize = np.dtype(layout.datasets(0, 0)[schema.INPUT_IDS][1]).itemsize
    return layout.datasets(shard.rows, extent.bytes // itemsize)


def sha256_dataset(dataset: h5py.Dataset) -> str:
    """The sha256 of a dataset's values as a shard stores them (C order, little-endian), read
    `HASH_ROWS` rows at a time: equal to its extent's sha256 in the shard it was written to."""
    digest = hashlib.sha256()
    stored = dataset.dtype.newbyteorder("<")
    for start in range(0, dataset.shape[0], HASH_ROWS):
        digest.update(np.ascontiguousarray(dataset[start : start + HASH_ROWS], dtype=stored).tobytes())
    return digest.hexdigest()


def problem(f: h5py.File, shard: mf.Shard, names) -> str | None:
    """Why the open local shard `f` does not hold datasets `names` as the manifest records them
    (missing, or a sha256 that differs), or None."""
    for name in names:
        extent = (shard.datasets or {}).get(name)
        if extent is None:
            return f"{shard.file}: the manifest records no checksum of {name}"
        if name not in f or not isinstance(f[name], h5py.Dataset):
            return f"{shard.file}: no dataset {name}"
        if sha256_dataset(f[name]) != extent.sha256:
            return f"{shard.file}: {name} does not match its checksum (corrupted)"
    return None


def from_bytes(data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array a dataset's fetched bytes hold (little-endian, C order, as HDF5 stored them)."""
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A shard holding `arrays` ({dataset: values}), contiguous, built in memory and written whole
    under its final name (as `pkdpipe.cache.writer` does, and for the same reason: a full disk is
    one clean OSError)."""
    f = h5py.File(path.name, "w", driver="core", backing_store=False)
    try:
        for name, values in arrays.items():
            f.create_dataset(name, data=values)
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    with files.replace_file(path, CacheError) as tmp:
        tmp.write_bytes(image)

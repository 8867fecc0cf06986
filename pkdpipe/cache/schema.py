"""The datasets of a shard, named once: what the writer creates, the reader reads and verify checks.

One HDF5 file per shard, n rows, T tokens in all (docs/cache-format.md has the same table):

    example_id       (n,)      int64      the example's id (its row in the source file)
    labels           (n,)      int64      gold label index, -1 = unlabelled (float32, NaN: regression)
    logits           (n, C)    float32    the teacher's logits
    hidden/<i>       (n, H)    hidden     [CLS] vector of hidden state i (0 = embeddings output);
                                          int8 codes when the codec is int8 (`pkdpipe.cache.codec`)
    hidden_offset/<i> (b, H)   float32    int8 codec only: per 1,024-row block b and dimension, the
    hidden_scale/<i>  (b, H)   float32    offset and step that decode hidden/<i> (b = ceil(n / 1024))
    offsets          (n + 1,)  int64      row r's tokens are input_ids[offsets[r]:offsets[r + 1]]
    input_ids        (T,)      int32      token ids, unpadded, concatenated (vocabularies outgrow uint16)
    token_type_ids   (T,)      uint8      segment ids, only for models that use them
    cls_stats/<i>    (4, H)    float64    layer i's per-dimension statistics over the shard's rows
                                          (`pkdpipe.cache.stats`); in caches made since pkdpipe 0.3

Every dataset is contiguous (no chunks, no filters): training reads rows in a random order, and
h5py reads scattered rows of a contiguous dataset 10-15x faster than of one chunked by rows.

A shard holds its data itself: `indirection` finds what would make a reader fetch bytes from
elsewhere (a dataset with external storage, a virtual dataset, a soft or external link), which a
shard from a store could use to pass off any file on the reader's machine as its contents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pkdpipe.cache import codec as codecs

EXAMPLE_ID = "example_id"
LABELS = "labels"
LOGITS = "logits"
OFFSETS = "offsets"
INPUT_IDS = "input_ids"
TOKEN_TYPE_IDS = "token_type_ids"
HIDDEN = "hidden"  # the group of the [CLS] vectors, one dataset per stored layer
CLS_STATS = "cls_stats"  # the group of their per-dimension statistics, one dataset per stored layer
HIDDEN_OFFSET = "hidden_offset"  # int8 codec: the groups of each layer's per-block offsets and steps
HIDDEN_SCALE = "hidden_scale"


def indirection(f) -> str | None:
    """The first object of the open HDF5 file `f` whose bytes would come from outside its own
    datasets: a link that is not a hard link, a dataset with external storage, a virtual dataset.
    None when there is none (as in every shard pkdpipe writes)."""
    import h5py

    groups = [("", f)]
    while groups:
        prefix, group = groups.pop()
        for name in group:
            path = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                return f"{path} is a {type(link).__name__}"
            item = group[name]
            if isinstance(item, h5py.Group):
                groups.append((path, item))
                continue
            plist = item.id.get_create_plist()
            if plist.get_external_count():
                return f"{path} has external storage"
            if plist.get_layout() == h5py.h5d.VIRTUAL:
                return f"{path} is a virtual dataset"
    return None


def hidden(layer: int) -> str:
    """The dataset of layer `layer`'s [CLS] vectors."""
    return f"{HIDDEN}/{layer}"


def hidden_offset(layer: int) -> str:
    """The dataset of layer `layer`'s int8 offsets, one row per block of rows."""
    return f"{HIDDEN_OFFSET}/{layer}"


def hidden_scale(layer: int) -> str:
    """The dataset of layer `layer`'s int8 steps, one row per block of rows."""
    return f"{HIDDEN_SCALE}/{layer}"


def read_hidden(f, layer: int, codec: str, rows: slice = slice(None)) -> np.ndarray:
    """Layer `layer`'s vectors in the rows `rows` of the open shard `f`, as floats: decoded when
    the codec is int8 (float32), as stored otherwise. What statistics and checks are taken of."""
    stored = f[hidden(layer)][rows]
    if codec != codecs.INT8:
        return stored
    positions = np.arange(f[hidden(layer)].shape[0])[rows]
    return codecs.decode(stored, f[hidden_offset(layer)][:], f[hidden_scale(layer)][:], positions)


def cls_stats(layer: int) -> str:
    """The dataset of layer `layer`'s per-dimension statistics: rows `pkdpipe.cache.stats.STAT_ROWS`."""
    return f"{CLS_STATS}/{layer}"


@dataclass(frozen=True)
class Layout:
    """What a cache's shards hold, from its manifest: enough to name every dataset's shape and dtype."""

    num_labels: int  # C
    hidden_size: int  # H
    layers: tuple[int, ...]  # the layers the shards hold: fewer than the cache's in a partial copy
    hidden_dtype: str
    regression: bool
    with_token_types: bool
    with_stats: bool = False  # each shard stores cls_stats/<layer> (caches made since pkdpipe 0.3)
    codec: str = codecs.FLOAT16  # int8: hidden/<layer> holds codes, decoded with its offsets and scales

    @classmethod
    def of(cls, manifest) -> Layout:
        """The layout a manifest (`pkdpipe.cache.manifest.Manifest`) describes: of the layers present,
        in a partial copy."""
        return cls(
            num_labels=manifest.num_labels,
            hidden_size=manifest.teacher.hidden_size,
            layers=tuple(manifest.present),
            hidden_dtype=manifest.hidden_dtype,
            regression=manifest.label_names is None,
            with_token_types=manifest.uses_token_type_ids,
            with_stats=manifest.cls_stats,
            codec=manifest.codec,
        )

    def datasets(self, rows: int, tokens: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{dataset: (shape, dtype)} of a shard of `rows` rows and `tokens` tokens."""
        shapes = {
            EXAMPLE_ID: ((rows,), np.int64),
            LABELS: ((rows,), np.float32 if self.regression else np.int64),
            LOGITS: ((rows, self.num_labels), np.float32),
            OFFSETS: ((rows + 1,), np.int64),
            INPUT_IDS: ((tokens,), np.int32),
        }
        if self.with_token_types:
            shapes[TOKEN_TYPE_IDS] = ((tokens,), np.uint8)
        for layer in self.layers:
            shapes[hidden(layer)] = ((rows, self.hidden_size), np.dtype(self.hidden_dtype))
            if self.codec == codecs.INT8:
                shapes[hidden_offset(layer)] = ((codecs.blocks(rows), self.hidden_size), np.float32)
                shapes[hidden_scale(layer)] = ((codecs.blocks(rows), self.hidden_size), np.float32)
            if self.with_stats:
                shapes[cls_stats(layer)] = ((4, self.hidden_size), np.float64)
        return {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}

    def nbytes(self, rows: int, tokens: int) -> int:
        """The payload of a shard of `rows` rows and `tokens` tokens (HDF5 adds a few KB)."""
        return sum(
            int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.datasets(rows, tokens).values()
        )

    def create(self, f, ids: np.ndarray, offsets: np.ndarray) -> None:
        """Every dataset of a new shard, contiguous and sized; `example_id` and `offsets` filled."""
        f.create_group(HIDDEN)
        if self.codec == codecs.INT8:
            f.create_group(HIDDEN_OFFSET)
            f.create_group(HIDDEN_SCALE)
        if self.with_stats:
            f.create_group(CLS_STATS)
        for name, (shape, dtype) in self.datasets(len(ids), int(offsets[-1])).items():
            if name == EXAMPLE_ID:
                f.create_dataset(name, data=ids.astype(dtype))
            elif name == OFFSETS:
                f.create_dataset(name, data=offsets.astype(dtype))
            else:
                f.create_dataset(name, shape=shape, dtype=dtype)

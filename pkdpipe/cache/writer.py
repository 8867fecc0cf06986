"""Writing one shard: HDF5 datasets pre-sized for its rows, filled batch by batch, then written out.

A shard is built in memory (HDF5's core driver, no backing file) and written to disk in one go,
under a temporary name that is renamed once the bytes are flushed: a file with a final name is
always whole, an interrupted run leaves at most a `.tmp` file (the next run overwrites it), and
only Python's own file I/O ever touches the disk. That last point is about full disks: HDF5 writing
to a full disk (or past a file-size limit) leaves its library in a state that crashed the process
at exit; Python's write fails with one clean OSError instead. The price is one shard in memory
while it is built, twice over for a moment at commit (the image is copied out): `--shard-size`
rows, 160 MB for 8,192 rows of 13 BERT-base layers in float16.

Rows reach the HDF5 datasets a block of 1,024 rows at a time (`codec.BLOCK_ROWS`): the rows of the
current block wait in numpy arrays (the vectors in float32: 41 MB for 13 BERT-base layers) until the
block is full or the shard ends, and then each dataset takes one write. Writing every batch of 64
rows took a dozen h5py calls, 8 ms a batch under cProfile: on the shortest rows a tenth of the
teacher's forward (`benchmarks/bench_mnli.py` reports the share of cache-teacher's time outside it).
With the int8 codec (`pkdpipe.cache.codec`) a block is written as codes with the block's offsets and
scales: quantised from the teacher's float32 output, not from a float16 copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from pkdpipe import files
from pkdpipe.cache import codec as codecs
from pkdpipe.cache import schema
from pkdpipe.cache.stats import Accumulator
from pkdpipe.errors import CacheError


class ShardWriter:
    """Fills a shard row block by row block (rows arrive in order), then writes it as `final_path`."""

    def __init__(self, final_path: Path, ids: np.ndarray, lengths: np.ndarray, layout: schema.Layout):
        self.final_path = final_path
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self._offsets = offsets
        self._row = 0
        self._layers = layout.layers
        self._layer_of = {schema.hidden(layer): layer for layer in layout.layers}
        self._with_stats = layout.with_stats
        self._codec = layout.codec
        self._pending: dict[str, list[np.ndarray]] = {}  # dataset name: the current block's parts
        self._written = 0  # rows written to the datasets so far (the rest are pending)
        self._file = h5py.File(final_path.name, "w", driver="core", backing_store=False)
        layout.create(self._file, ids, offsets)

    def write(
        self, input_ids, token_type_ids, labels, logits: np.ndarray, hidden: dict[int, np.ndarray]
    ) -> None:
        """Append a batch of rows: token id arrays, labels, (b, C) logits, {layer: (b, H)} vectors."""
        parts = {schema.INPUT_IDS: np.concatenate(input_ids), schema.LABELS: labels, schema.LOGITS: logits}
        if token_type_ids is not None:
            parts[schema.TOKEN_TYPE_IDS] = np.concatenate(token_type_ids)
        for layer in self._layers:
            parts[schema.hidden(layer)] = np.asarray(hidden[layer], dtype=np.float32)
        for name, part in parts.items():  # a copy: a [CLS] slice is a view holding the batch's states
            self._pending.setdefault(name, []).append(np.array(part))
        self._row += len(input_ids)
        while self._row - self._written >= codecs.BLOCK_ROWS:
            self._write_block()

    def _write_block(self) -> None:
        """Write the next block of pending rows (a whole block, or the shard's last rows): one write
        per dataset, the vectors as codes with the block's offsets and scales under the int8 codec."""
        r0 = self._written
        r1 = min(r0 + codecs.BLOCK_ROWS, self._row)
        t0, t1 = int(self._offsets[r0]), int(self._offsets[r1])
        for name, parts in self._pending.items():
            per_token = name in (schema.INPUT_IDS, schema.TOKEN_TYPE_IDS)
            start, stop = (t0, t1) if per_token else (r0, r1)
            pending = np.concatenate(parts)
            block, self._pending[name] = pending[: stop - start], [pending[stop - start :]]
            self._file[name][start:stop] = self._stored(name, block, r0 // codecs.BLOCK_ROWS)
        self._written = r1

    def _stored(self, name: str, block: np.ndarray, index: int) -> np.ndarray:
        """What dataset `name` stores of one block's rows: int8 codes for a layer's vectors under the
        int8 codec (its offsets and scales written beside them, at block `index`), else the rows."""
        layer = self._layer_of.get(name)
        if self._codec != codecs.INT8 or layer is None:
            return block
        codes, offset, scale = codecs.encode_block(block)
        self._file[schema.hidden_offset(layer)][index] = offset
        self._file[schema.hidden_scale(layer)][index] = scale
        return codes

    def commit(self) -> None:
        """Write the finished shard to disk (flushed) under its final name."""
        if self._row != len(self._offsets) - 1:
            self.abort()
            raise CacheError(f"{self.final_path.name}: wrote {self._row} of {len(self._offsets) - 1} rows")
        if self._row > self._written:
            self._write_block()
        if self._with_stats:
            for layer in self._layers:  # from the stored (rounded, decoded) values, as verify recomputes them
                stats = Accumulator(self._file[schema.hidden(layer)].shape[1])
                stats.add(schema.read_hidden(self._file, layer, self._codec))
                self._file[schema.cls_stats(layer)][:] = stats.result().to_array()
        self._file.flush()
        image = self._file.id.get_file_image()
        self._file.close()
        with files.replace_file(self.final_path, CacheError) as tmp:
            tmp.write_bytes(image)

    def abort(self) -> None:
        """Drop the shard being built (nothing of it is on disk until commit)."""
        with contextlib.suppress(Exception):  # already closed
            self._file.close()

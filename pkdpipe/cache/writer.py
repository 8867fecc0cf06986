"""Writing one shard: HDF5 datasets pre-sized for its rows, filled batch by batch, then written out.

A shard is built in memory (HDF5's core driver, no backing file) and written to disk in one go,
under a temporary name that is renamed once the bytes are flushed: a file with a final name is
always whole, an interrupted run leaves at most a `.tmp` file (the next run overwrites it), and
only Python's own file I/O ever touches the disk. That last point is about full disks: HDF5 writing
to a full disk (or past a file-size limit) leaves its library in a state that crashed the process
at exit; Python's write fails with one clean OSError instead. The price is one shard in memory
while it is built, twice over for a moment at commit (the image is copied out): `--shard-size`
rows, 160 MB for 8,192 rows of 13 BERT-base layers in float16.

With the int8 codec (`pkdpipe.cache.codec`) the vectors of the current block of 1,024 rows wait in
float32 until the block is full (or the shard ends), and are then written as codes with the
block's offsets and scales: quantised from the teacher's float32 output, not from a float16 copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from pkdpipe import files
from pkdpipe.cache import codec as codecs
from pkdpipe.cache import schema
from pkdpipe.cache.stats import LayerStats
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
        self._with_stats = layout.with_stats
        self._codec = layout.codec
        self._pending: dict[int, list[np.ndarray]] = {layer: [] for layer in layout.layers}
        self._encoded = 0  # rows written as int8 codes so far (the rest are pending)
        self._file = h5py.File(final_path.name, "w", driver="core", backing_store=False)
        layout.create(self._file, ids, offsets)

    def write(
        self, input_ids, token_type_ids, labels, logits: np.ndarray, hidden: dict[int, np.ndarray]
    ) -> None:
        """Append a batch of rows: token id arrays, labels, (b, C) logits, {layer: (b, H)} vectors."""
        f, r0 = self._file, self._row
        r1 = r0 + len(input_ids)
        t0, t1 = int(self._offsets[r0]), int(self._offsets[r1])
        f[schema.INPUT_IDS][t0:t1] = np.concatenate(input_ids)
        if token_type_ids is not None:
            f[schema.TOKEN_TYPE_IDS][t0:t1] = np.concatenate(token_type_ids)
        f[schema.LABELS][r0:r1] = labels
        f[schema.LOGITS][r0:r1] = logits
        self._row = r1
        if self._codec == codecs.INT8:
            for layer in self._layers:
                self._pending[layer].append(np.asarray(hidden[layer], dtype=np.float32))
            while self._row - self._encoded >= codecs.BLOCK_ROWS:
                self._encode_block()
        else:
            for layer in self._layers:
                f[schema.hidden(layer)][r0:r1] = hidden[layer]

    def _encode_block(self) -> None:
        """Write the next block of pending rows (a whole block, or the shard's last rows) as codes."""
        r0 = self._encoded
        r1 = min(r0 + codecs.BLOCK_ROWS, self._row)
        block = r0 // codecs.BLOCK_ROWS
        for layer in self._layers:
            pending = np.concatenate(self._pending[layer])
            codes, offset, scale = codecs.encode_block(pending[: r1 - r0])
            self._file[schema.hidden(layer)][r0:r1] = codes
            self._file[schema.hidden_offset(layer)][block] = offset
            self._file[schema.hidden_scale(layer)][block] = scale
            self._pending[layer] = [pending[r1 - r0 :]]
        self._encoded = r1

    def commit(self) -> None:
        """Write the finished shard to disk (flushed) under its final name."""
        if self._row != len(self._offsets) - 1:
            self.abort()
            raise CacheError(f"{self.final_path.name}: wrote {self._row} of {len(self._offsets) - 1} rows")
        if self._codec == codecs.INT8 and self._row > self._encoded:
            self._encode_block()
        if self._with_stats:
            for layer in self._layers:  # from the stored (rounded, decoded) values, as verify recomputes them
                stats = LayerStats.of(schema.read_hidden(self._file, layer, self._codec))
                self._file[schema.cls_stats(layer)][:] = stats.to_array()
        self._file.flush()
        image = self._file.id.get_file_image()
        self._file.close()
        with files.replace_file(self.final_path, CacheError) as tmp:
            tmp.write_bytes(image)

    def abort(self) -> None:
        """Drop the shard being built (nothing of it is on disk until commit)."""
        with contextlib.suppress(Exception):  # already closed
            self._file.close()

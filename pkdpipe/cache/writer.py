"""Writing one shard: HDF5 datasets pre-sized for its rows, filled batch by batch, then written out.

A shard is built in memory (HDF5's core driver, no backing file) and written to disk in one go,
under a temporary name that is renamed once the bytes are flushed: a file with a final name is
always whole, an interrupted run leaves at most a `.tmp` file (the next run overwrites it), and
only Python's own file I/O ever touches the disk. That last point is about full disks: HDF5 writing
to a full disk (or past a file-size limit) leaves its library in a state that crashed the process
at exit; Python's write fails with one clean OSError instead. The price is one shard in memory
while it is built, twice over for a moment at commit (the image is copied out): `--shard-size`
rows, 160 MB for 8,192 rows of 13 BERT-base layers in float16. The image is allocated at its full
size at once (the driver's growth step is the shard's size), not grown 64 KB at a time as the
datasets are first written.

Rows reach the HDF5 datasets a block of 1,024 rows at a time (`codec.BLOCK_ROWS`): the rows of the
current block are copied into one buffer per dataset, allocated once per shard (the vectors in
float32: 41 MB for 13 BERT-base layers), and when the block is full or the shard ends each dataset
takes one write. Writing every batch of 64 rows took a dozen h5py calls, 8 ms a batch under cProfile:
on the shortest rows a tenth of the teacher's forward (`benchmarks/bench_mnli.py` reports the share
of cache-teacher's time outside it). Fixed buffers rather than lists of batches joined per block:
no short-lived copies. cache-teacher's peak memory at MNLI's size is set by malloc's heap under
the teacher's growing activations, not by these buffers (benchmarks/README.md, "Peak RSS").
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

_PER_TOKEN = (schema.INPUT_IDS, schema.TOKEN_TYPE_IDS)  # datasets of one value a token, not a row
_METADATA_BYTES = 1 << 20  # what HDF5 adds to the datasets' bytes: a few KB, with room to spare


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
        self._written = 0  # rows written to the datasets so far (the rest wait in the buffers)
        image_bytes = layout.nbytes(len(ids), int(offsets[-1])) + _METADATA_BYTES
        self._file = h5py.File(
            final_path.name, "w", driver="core", backing_store=False, block_size=image_bytes
        )
        layout.create(self._file, ids, offsets)
        self._buffers = self._block_buffers(len(ids))  # dataset name: the current block's rows or tokens

    def _block_buffers(self, rows: int) -> dict[str, np.ndarray]:
        """One buffer per written dataset, as large as the shard's largest block (in rows, or in
        tokens for the token datasets); the vectors in float32, as the teacher gives them."""
        block_rows = min(rows, codecs.BLOCK_ROWS)
        starts = np.arange(0, rows, codecs.BLOCK_ROWS)
        ends = np.minimum(starts + codecs.BLOCK_ROWS, rows)
        block_tokens = int((self._offsets[ends] - self._offsets[starts]).max(initial=0))
        buffers = {}
        for name in (schema.INPUT_IDS, schema.TOKEN_TYPE_IDS, schema.LABELS, schema.LOGITS):
            if name in self._file:
                dataset = self._file[name]
                size = block_tokens if name in _PER_TOKEN else block_rows
                buffers[name] = np.empty((size, *dataset.shape[1:]), dataset.dtype)
        for name in self._layer_of:
            buffers[name] = np.empty((block_rows, self._file[name].shape[1]), np.float32)
        return buffers

    def write(
        self, input_ids, token_type_ids, labels, logits: np.ndarray, hidden: dict[int, np.ndarray]
    ) -> None:
        """Append a batch of rows: token id arrays, labels, (b, C) logits, {layer: (b, H)} vectors."""
        if self._row + len(input_ids) > len(self._offsets) - 1:
            raise CacheError(f"{self.final_path.name}: more rows than the {len(self._offsets) - 1} planned")
        per_row = {schema.LABELS: labels, schema.LOGITS: logits}
        per_row.update({schema.hidden(layer): hidden[layer] for layer in self._layers})
        per_token = {schema.INPUT_IDS: input_ids}
        if token_type_ids is not None:
            per_token[schema.TOKEN_TYPE_IDS] = token_type_ids
        done = 0
        while done < len(input_ids):  # a batch that crosses a block's end fills it, then starts the next
            row = self._row - self._written  # where this batch's rows go in the block
            take = min(len(input_ids) - done, codecs.BLOCK_ROWS - row)
            for name, part in per_row.items():
                self._buffers[name][row : row + take] = part[done : done + take]
            first = self._offsets[self._written]  # the block's first token
            token, end = (int(self._offsets[r] - first) for r in (self._row, self._row + take))
            for name, part in per_token.items():
                np.concatenate(part[done : done + take], out=self._buffers[name][token:end])
            self._row += take
            done += take
            if self._row - self._written == codecs.BLOCK_ROWS:
                self._write_block()

    def _write_block(self) -> None:
        """Write the block in the buffers (a whole block, or the shard's last rows): one write per
        dataset, the vectors as codes with the block's offsets and scales under the int8 codec."""
        r0, r1 = self._written, self._row
        t0, t1 = int(self._offsets[r0]), int(self._offsets[r1])
        for name, buffer in self._buffers.items():
            start, stop = (t0, t1) if name in _PER_TOKEN else (r0, r1)
            self._file[name][start:stop] = self._stored(name, buffer[: stop - start], r0 // codecs.BLOCK_ROWS)
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

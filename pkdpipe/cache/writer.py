"""Writing one shard: HDF5 datasets pre-sized for its rows, filled batch by batch, then renamed.

A shard is written under a temporary name and renamed only once it is complete and flushed, so a
file with a final name is always whole; an interrupted run leaves at most a `.tmp` file, which
the next run overwrites.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from pkdpipe import files
from pkdpipe.cache import schema
from pkdpipe.errors import CacheError


class ShardWriter:
    """Fills `final_path` row block by row block; rows arrive in order."""

    def __init__(self, final_path: Path, ids: np.ndarray, lengths: np.ndarray, layout: schema.Layout):
        self.final_path = final_path
        self.tmp_path = files.scratch(final_path)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self._offsets = offsets
        self._row = 0
        self._layers = layout.layers
        try:
            self._file = h5py.File(self.tmp_path, "w")
        except OSError as err:
            self.tmp_path.unlink(missing_ok=True)
            raise _write_error(self.final_path, err) from None
        try:
            layout.create(self._file, ids, offsets)
        except OSError as err:  # creating datasets writes too (example_id, offsets): a full disk shows here
            self.abort()
            raise _write_error(self.final_path, err) from None

    def write(
        self, input_ids, token_type_ids, labels, logits: np.ndarray, hidden: dict[int, np.ndarray]
    ) -> None:
        """Append a batch of rows: token id arrays, labels, (b, C) logits, {layer: (b, H)} vectors."""
        f, r0 = self._file, self._row
        r1 = r0 + len(input_ids)
        t0, t1 = int(self._offsets[r0]), int(self._offsets[r1])
        try:
            f[schema.INPUT_IDS][t0:t1] = np.concatenate(input_ids)
            if token_type_ids is not None:
                f[schema.TOKEN_TYPE_IDS][t0:t1] = np.concatenate(token_type_ids)
            f[schema.LABELS][r0:r1] = labels
            f[schema.LOGITS][r0:r1] = logits
            for layer in self._layers:
                f[schema.hidden(layer)][r0:r1] = hidden[layer]
        except OSError as err:
            self.abort()
            raise _write_error(self.final_path, err) from None
        self._row = r1

    def commit(self) -> None:
        """Close, flush to disk and give the shard its final name."""
        if self._row != len(self._offsets) - 1:
            self.abort()
            raise CacheError(f"{self.final_path.name}: wrote {self._row} of {len(self._offsets) - 1} rows")
        try:
            self._file.flush()
            self._file.close()
            files.fsync_and_rename(self.tmp_path, self.final_path)
        except OSError as err:
            self.abort()
            raise _write_error(self.final_path, err) from None

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already closed, or never fully opened
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def _write_error(path: Path, err: OSError) -> CacheError:
    return files.write_error(path, err, CacheError, "free some space or use --cache-dir elsewhere")

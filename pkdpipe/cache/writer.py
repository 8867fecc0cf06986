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
from pkdpipe.errors import CacheError


class ShardWriter:
    """Fills `final_path` row block by row block; rows arrive in order."""

    def __init__(
        self,
        final_path: Path,
        ids: np.ndarray,
        lengths: np.ndarray,
        *,
        num_labels: int,
        hidden_size: int,
        layers: tuple[int, ...],
        hidden_dtype: str,
        regression: bool,
        with_token_types: bool,
    ):
        self.final_path = final_path
        self.tmp_path = files.scratch(final_path)
        n = len(ids)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        self._offsets = offsets
        self._row = 0
        try:
            self._file = h5py.File(self.tmp_path, "w")
        except OSError as err:
            self.tmp_path.unlink(missing_ok=True)
            raise _write_error(self.final_path, err) from None
        try:
            self._create_datasets(
                ids, num_labels, hidden_size, layers, hidden_dtype, regression, with_token_types
            )
        except OSError as err:  # creating datasets writes too (example_id, offsets): a full disk shows here
            self.abort()
            raise _write_error(self.final_path, err) from None
        self._layers = layers

    def _create_datasets(
        self, ids, num_labels, hidden_size, layers, hidden_dtype, regression, with_token_types
    ):
        # Every dataset is contiguous (no chunks, no compression): training reads rows in a random
        # order, and h5py reads scattered rows of a contiguous dataset 10-15x faster than of one
        # chunked by rows (benchmarks/README.md).
        f, offsets, n = self._file, self._offsets, len(ids)
        f.create_dataset("example_id", data=ids.astype(np.int64))
        # Unlabelled rows (a GLUE test split) hold -1, or NaN for regression.
        f.create_dataset("labels", shape=(n,), dtype=np.float32 if regression else np.int64)
        f.create_dataset("logits", shape=(n, num_labels), dtype=np.float32)
        f.create_dataset("offsets", data=offsets)
        # int32 token ids: vocabularies outgrow uint16 (XLM-R has 250k entries).
        f.create_dataset("input_ids", shape=(int(offsets[-1]),), dtype=np.int32)
        if with_token_types:
            f.create_dataset("token_type_ids", shape=(int(offsets[-1]),), dtype=np.uint8)
        hidden = f.create_group("hidden")
        for layer in layers:
            hidden.create_dataset(str(layer), shape=(n, hidden_size), dtype=hidden_dtype)

    def write(
        self, input_ids, token_type_ids, labels, logits: np.ndarray, hidden: dict[int, np.ndarray]
    ) -> None:
        """Append a batch of rows: token id arrays, labels, (b, C) logits, {layer: (b, H)} vectors."""
        f, r0 = self._file, self._row
        r1 = r0 + len(input_ids)
        t0, t1 = int(self._offsets[r0]), int(self._offsets[r1])
        try:
            f["input_ids"][t0:t1] = np.concatenate(input_ids)
            if token_type_ids is not None:
                f["token_type_ids"][t0:t1] = np.concatenate(token_type_ids)
            f["labels"][r0:r1] = labels
            f["logits"][r0:r1] = logits
            for layer in self._layers:
                f["hidden"][str(layer)][r0:r1] = hidden[layer]
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

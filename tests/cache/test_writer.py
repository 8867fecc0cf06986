"""pkdpipe.cache.writer: a shard filled batch by batch holds exactly the rows it was given, whatever
the batches' sizes against the 1,024-row blocks the rows are written in."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pkdpipe.cache import codec, schema
from pkdpipe.cache.writer import ShardWriter
from pkdpipe.errors import CacheError

ROWS = 2 * codec.BLOCK_ROWS + 37  # two whole blocks and a short last one


@pytest.mark.parametrize("name", [codec.FLOAT16, codec.INT8])
def test_batches_that_straddle_blocks_land_in_their_own_rows(tmp_path, name):
    layout = schema.Layout(
        num_labels=3,
        hidden_size=6,
        layers=(0, 2),
        hidden_dtype="int8" if name == codec.INT8 else "float16",
        regression=False,
        with_token_types=True,
        with_stats=True,
        codec=name,
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=ROWS)
    ids = [rng.integers(0, 30_000, size=n).astype(np.int32) for n in lengths]
    types = [rng.integers(0, 2, size=n).astype(np.uint8) for n in lengths]
    labels = rng.integers(0, 3, size=ROWS)
    logits = rng.normal(size=(ROWS, 3)).astype(np.float32)
    hidden = {layer: rng.normal(size=(ROWS, 6)).astype(np.float32) * (layer + 1) for layer in layout.layers}
    writer = ShardWriter(tmp_path / "s.h5", np.arange(ROWS), lengths, layout)
    start = 0
    for size in [1, 64, 1000, 7, 64, 2, 910, 37]:  # across a block's edge mid-batch, then onto one
        stop = start + size
        part = slice(start, stop)
        writer.write(
            ids[part], types[part], labels[part], logits[part], {k: v[part] for k, v in hidden.items()}
        )
        start = stop
    assert start == ROWS
    writer.commit()

    with h5py.File(tmp_path / "s.h5", "r") as f:
        np.testing.assert_array_equal(f[schema.INPUT_IDS][:], np.concatenate(ids))
        np.testing.assert_array_equal(f[schema.TOKEN_TYPE_IDS][:], np.concatenate(types))
        np.testing.assert_array_equal(f[schema.LABELS][:], labels)
        np.testing.assert_array_equal(f[schema.LOGITS][:], logits)
        for layer, x in hidden.items():
            stored = schema.read_hidden(f, layer, name)
            if name == codec.FLOAT16:
                np.testing.assert_array_equal(stored, x.astype(np.float16))
            else:  # each block quantised from its own rows alone
                for b in range(codec.blocks(ROWS)):
                    rows = slice(b * codec.BLOCK_ROWS, (b + 1) * codec.BLOCK_ROWS)
                    codes, offset, scale = codec.encode_block(x[rows])
                    np.testing.assert_array_equal(f[schema.hidden(layer)][rows], codes)
                    np.testing.assert_array_equal(f[schema.hidden_scale(layer)][b], scale)
                    assert (np.abs(stored[rows] - x[rows]) <= codec.bound(offset, scale)).all()


def test_a_shard_given_fewer_rows_than_planned_is_not_written(tmp_path):
    writer = _three_row_writer(tmp_path)
    writer.write(
        [np.ones(2, np.int32)] * 2, None, np.zeros(2), np.zeros((2, 2), np.float32), {1: np.zeros((2, 4))}
    )
    with pytest.raises(CacheError, match="wrote 2 of 3 rows"):
        writer.commit()
    assert not (tmp_path / "s.h5").exists()


def test_a_batch_past_the_planned_rows_is_refused(tmp_path):
    writer = _three_row_writer(tmp_path)
    batch = (
        [np.ones(2, np.int32)] * 2,
        None,
        np.zeros(2),
        np.zeros((2, 2), np.float32),
        {1: np.zeros((2, 4))},
    )
    writer.write(*batch)
    with pytest.raises(CacheError, match="more rows than the 3 planned"):
        writer.write(*batch)


def _three_row_writer(tmp_path) -> ShardWriter:
    """A writer for a shard planned with 3 rows of 2 tokens, one 4-wide layer, no token types."""
    layout = schema.Layout(
        num_labels=2,
        hidden_size=4,
        layers=(1,),
        hidden_dtype="float16",
        regression=False,
        with_token_types=False,
    )
    return ShardWriter(tmp_path / "s.h5", np.arange(3), np.array([2, 2, 2]), layout)

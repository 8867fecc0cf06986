"""pkdpipe.batching: the epoch order every rank and every resumed run recomputes."""

from __future__ import annotations

import numpy as np
import pytest

from pkdpipe.batching import plan_epoch, rank_rows
from pkdpipe.errors import ConfigError

SEGMENTS = [40, 40, 16]  # the tiny cache's train shards


def _rows(plan) -> list[tuple[int, int]]:
    return [(segment, int(row)) for segment, rows in plan for row in rows]


def test_an_epoch_covers_every_row_exactly_once():
    plan = plan_epoch(SEGMENTS, batch_size=8, block_size=16, seed=42, epoch=0)
    rows = _rows(plan)
    assert sorted(rows) == [(s, r) for s, n in enumerate(SEGMENTS) for r in range(n)]
    assert all(len(batch) <= 8 for _, batch in plan)
    # a batch never spans two blocks, so its rows are close together in the length-sorted shard
    assert all(len({int(r) // 16 for r in batch}) == 1 for _, batch in plan)


def test_the_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        return _rows(plan_epoch(SEGMENTS, 8, 16, seed, epoch))

    assert order(42, 0) == order(42, 0)
    assert order(42, 1) == order(42, 1)
    assert order(42, 0) != order(42, 1)
    assert order(42, 0) != order(7, 0)


@pytest.mark.parametrize("batch_size", [8, 7])
def test_two_ranks_split_each_global_batch(batch_size):
    block = 4 * batch_size
    global_plan = plan_epoch(SEGMENTS, batch_size, block, seed=3, epoch=2, world=2)
    assert global_plan, "no batches"
    for _, batch in global_plan:
        assert len(batch) % 2 == 0
        first, second = rank_rows(batch, 0, 2), rank_rows(batch, 1, 2)
        assert len(first) == len(second) > 0
        assert not set(first.tolist()) & set(second.tolist())
        assert sorted(np.concatenate([first, second]).tolist()) == sorted(batch.tolist())
    # trimming to a multiple of the world size drops at most one row per batch
    covered = len(_rows(global_plan))
    assert sum(SEGMENTS) - len(global_plan) <= covered <= sum(SEGMENTS)


def test_one_rank_gets_the_whole_batch():
    batch = np.array([5, 3, 9])
    assert rank_rows(batch, 0, 1).tolist() == [5, 3, 9]


def test_block_size_must_be_a_multiple_of_the_batch_size():
    with pytest.raises(ConfigError, match="multiple of the batch size"):
        plan_epoch(SEGMENTS, batch_size=8, block_size=12, seed=0, epoch=0)

"""pkdpipe.batching: the epoch order every rank and every resumed run recomputes."""

from __future__ import annotations

import numpy as np
import pytest

from pkdpipe.batching import GROUP_BATCHES, plan_epoch, rank_rows

# A split as the cache stores it: rows sorted by length, and a label that goes with the length
# (short questions are one intent, long ones another), which is what makes a blocked order harmful.
N = 2000
LENGTHS = np.sort(np.random.default_rng(0).integers(4, 60, N))
LABELS = np.arange(N) * 4 // N  # 4 labels, 500 rows each, in length order


def _rows(plan) -> list[int]:
    return [int(row) for batch in plan for row in batch]


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["uniform", "grouped"])
def test_an_epoch_covers_every_row_exactly_once(lengths):
    plan = plan_epoch(N, batch_size=32, seed=42, epoch=0, lengths=lengths)
    assert sorted(_rows(plan)) == list(range(N))
    assert [len(batch) for batch in plan].count(32) == N // 32  # one short batch at most
    assert len(plan) == -(-N // 32)


@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["uniform", "grouped"])
def test_the_order_is_a_function_of_seed_and_epoch(lengths):
    def order(seed, epoch):
        return _rows(plan_epoch(N, 32, seed, epoch, lengths=lengths))

    assert order(42, 0) == order(42, 0)
    assert order(42, 1) == order(42, 1)
    assert order(42, 0) != order(42, 1)
    assert order(42, 0) != order(7, 0)


def test_the_first_batches_of_an_epoch_have_the_label_mix_of_the_split():
    """A uniform shuffle: the first 10 batches hold every label in about its share (1/4 each),
    although the stored order groups the labels. A blocked order gave each batch one label."""
    for epoch in range(3):
        first = np.concatenate(plan_epoch(N, 32, seed=1, epoch=epoch)[:10])
        shares = np.bincount(LABELS[first], minlength=4) / len(first)
        assert np.all(np.abs(shares - 0.25) < 0.1), shares


def test_uniform_batches_mix_lengths_like_the_split():
    """Each batch spreads over the lengths as the split does (sd 16 here), every batch of the epoch,
    not one length band per batch (the old blocked order: sd 2)."""
    plan = plan_epoch(N, 32, seed=3, epoch=0)
    spreads = np.array([LENGTHS[batch].std() for batch in plan[:-1]])
    assert 0.8 * LENGTHS.std() < spreads.mean() < 1.2 * LENGTHS.std()
    assert spreads.min() > 0.5 * LENGTHS.std()


def test_length_grouping_pads_less_and_still_mixes_the_epoch():
    uniform = plan_epoch(N, 32, seed=3, epoch=0)
    grouped = plan_epoch(N, 32, seed=3, epoch=0, lengths=LENGTHS)

    def padding(plan):
        return sum(int(LENGTHS[b].max()) * len(b) - int(LENGTHS[b].sum()) for b in plan)

    assert padding(grouped) < padding(uniform) / 5
    # the grouped batches come from random megabatches, in a shuffled order: the first ten still
    # span several length bands, not the shortest rows first
    first_means = [LENGTHS[b].mean() for b in grouped[:10]]
    assert max(first_means) - min(first_means) > 20
    # a megabatch (GROUP_BATCHES batches) is a random sample of the split, not a run of storage
    # neighbours: although storage is sorted by length, hardly any batch is a consecutive range
    assert GROUP_BATCHES * 32 < N  # so the split holds several megabatches
    runs = [int(b.max() - b.min()) == len(b) - 1 for b in grouped]
    assert sum(runs) < 0.1 * len(grouped) and len(grouped) == len(uniform)


@pytest.mark.parametrize("batch_size", [8, 7])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["uniform", "grouped"])
def test_two_ranks_split_each_global_batch(batch_size, lengths):
    some = lengths[:100] if lengths is not None else None
    global_plan = plan_epoch(100, batch_size, seed=3, epoch=2, world=2, lengths=some)
    assert global_plan, "no batches"
    for batch in global_plan:
        assert len(batch) % 2 == 0
        first, second = rank_rows(batch, 0, 2), rank_rows(batch, 1, 2)
        assert len(first) == len(second) > 0
        assert not set(first.tolist()) & set(second.tolist())
        assert sorted(np.concatenate([first, second]).tolist()) == sorted(batch.tolist())
    # trimming to a multiple of the world size drops at most one row per batch
    covered = len(_rows(global_plan))
    assert 100 - len(global_plan) <= covered <= 100


def test_one_rank_gets_the_whole_batch():
    batch = np.array([5, 3, 9])
    assert rank_rows(batch, 0, 1).tolist() == [5, 3, 9]

"""Epoch order for training: a fresh uniform shuffle of all rows each epoch, the same on every rank.

Each epoch is a permutation of every row of the split, drawn from `(seed, epoch)`, cut into global
batches: the statistics of a plain `DataLoader(shuffle=True)`. The order is a pure function of
(seed, epoch), so a resumed run or another rank recomputes it instead of storing it.

Optional length grouping (`group_by_length`, as in `transformers`' `group_by_length`): the
permutation is cut into megabatches of `GROUP_BATCHES` batches, each megabatch is sorted by length
and cut into batches, and all batches of the epoch are shuffled. Batches then pad less, but each
holds rows of one length band. It is off by default, as in transformers. The order this replaced,
runs of batches cut from length-sorted rows, fed a student one length (and, where labels follow
length, one label) at a time: on tests/test_train.py's length task it stayed at chance where this
order and a plain loop learn; benchmarks/bench_parity.py compares this order with a plain loop.
"""

from __future__ import annotations

import numpy as np

GROUP_BATCHES = 50  # batches per length-sorted megabatch (transformers' mega_batch_mult)


def plan_epoch(
    num_rows: int,
    batch_size: int,
    seed: int,
    epoch: int,
    world: int = 1,
    lengths: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Global batches of one epoch, as arrays of row positions in `0..num_rows-1`.

    Every row appears once; the last batch may be short. Each batch is trimmed to a multiple of
    `world` so every rank gets equally many rows (at most `world - 1` rows a batch are left out).
    With `lengths` (one per row), batches are length-grouped inside random megabatches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_rows)
    if lengths is None:
        batches = _cut(order, batch_size)
    else:
        mega = GROUP_BATCHES * batch_size
        batches = []
        for start in range(0, num_rows, mega):
            part = order[start : start + mega]
            batches += _cut(part[np.argsort(lengths[part], kind="stable")], batch_size)
        batches = [batches[i] for i in rng.permutation(len(batches))]
    trimmed = (batch[: len(batch) - len(batch) % world] for batch in batches)
    return [batch for batch in trimmed if len(batch)]


def _cut(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def rank_rows(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch (batches are trimmed to a multiple of `world`)."""
    share = len(batch) // world
    return batch[rank * share : (rank + 1) * share]

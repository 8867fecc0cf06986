"""Epoch order for training: shuffled blocks of length-sorted rows, the same on every rank.

Rows are kept in length order (the cache stores them so; finetune sorts once). Each epoch, blocks
of `block_size` consecutive rows are shuffled, then the rows inside each block, and each block is
cut into global batches. Batches therefore hold rows of similar length (cheap dynamic padding),
reads stay sequential within a block, and the order is a pure function of (seed, epoch): a resumed
run or another rank recomputes it instead of storing it.
"""

from __future__ import annotations

import numpy as np

from pkdpipe.errors import ConfigError


def plan_epoch(
    segment_rows: list[int], batch_size: int, block_size: int, seed: int, epoch: int, world: int = 1
) -> list[tuple[int, np.ndarray]]:
    """Global batches of one epoch as (segment index, row positions in that segment).

    `segment_rows` are the row counts of the segments (the shards of a cache split). A batch never
    spans two blocks; it is trimmed to a multiple of `world` so each rank gets equally many rows.
    """
    if block_size % batch_size:
        raise ConfigError(f"block size {block_size} must be a multiple of the batch size {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    blocks = [
        (s, start, min(start + block_size, rows))
        for s, rows in enumerate(segment_rows)
        for start in range(0, rows, block_size)
    ]
    plan = []
    for b in rng.permutation(len(blocks)):
        segment, start, stop = blocks[b]
        rows = start + rng.permutation(stop - start)
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            batch = batch[: len(batch) - len(batch) % world]
            if len(batch):
                plan.append((segment, batch))
    return plan


def rank_rows(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch (batches are trimmed to a multiple of `world`)."""
    share = len(batch) // world
    return batch[rank * share : (rank + 1) * share]

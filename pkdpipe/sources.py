"""Where training batches come from: a tokenised split in memory (finetune) or a cache (distill).

A batch source knows its number of steps per epoch and yields this rank's part of each global
batch of an epoch, from a given batch on (for resuming mid-epoch), as padded tensors. The order is
`pkdpipe.batching`'s: a fresh uniform shuffle of all rows each epoch, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from pkdpipe import distributed
from pkdpipe.batching import plan_epoch, rank_rows
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.text import Encoded, collate


class BatchSource(Protocol):
    def steps_per_epoch(self) -> int: ...
    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]: ...


class EncodedSource:
    """Batches from an in-memory tokenised split (finetune): inputs and "labels"."""

    def __init__(
        self, encoded: Encoded, batch_size: int, seed: int, pad_id: int, group_by_length: bool = False
    ):
        self.encoded, self.batch_size, self.seed, self.pad_id = encoded, batch_size, seed, pad_id
        self.lengths = encoded.lengths() if group_by_length else None
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def _plan(self, epoch: int) -> list[np.ndarray]:
        return plan_epoch(len(self.encoded), self.batch_size, self.seed, epoch, self.world, self.lengths)

    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        enc = self.encoded
        for rows in self._plan(epoch)[skip:]:
            idx = rank_rows(rows, self.rank, self.world)
            types = [enc.token_type_ids[i] for i in idx] if enc.token_type_ids is not None else None
            batch = collate([enc.input_ids[i] for i in idx], types, self.pad_id)
            batch["labels"] = torch.from_numpy(enc.labels[idx])
            yield batch


class CacheSource:
    """Batches streamed from a cache split (distill): inputs, "labels", and the teacher's targets a
    strategy asks for, "teacher_logits" (batch, labels) and "teacher_cls" (batch, M, hidden) of
    the teacher layers `layers`, in that order."""

    def __init__(
        self,
        cache: TeacherCache,
        split: str,
        layers: list[int],
        batch_size: int,
        seed: int,
        pad_id: int,
        group_by_length: bool = False,
        with_logits: bool = True,
    ):
        self.cache, self.split, self.layers = cache, split, layers
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.group_by_length, self.with_logits = group_by_length, with_logits
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def steps_per_epoch(self) -> int:
        return len(self.cache.epoch_plan(self.split, self.batch_size, 0, self.seed, self.world))

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        for part in self.cache.stream(
            self.split,
            self.batch_size,
            self.layers,
            epoch=epoch,
            seed=self.seed,
            skip=skip,
            rank=self.rank,
            world=self.world,
            group_by_length=self.group_by_length,
        ):
            batch = collate(part["input_ids"], part["token_type_ids"], self.pad_id)
            batch["labels"] = torch.from_numpy(part["labels"])
            if self.with_logits:
                batch["teacher_logits"] = torch.from_numpy(part["logits"])
            if self.layers:
                batch["teacher_cls"] = torch.from_numpy(part["hidden"])  # float16
            yield batch

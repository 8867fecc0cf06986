"""Tokenisation and batching: from `Examples` to padded tensors.

Token ids are kept unpadded (one int32 array per example); padding happens per batch, to the
longest example in that batch. With batches drawn from length-sorted rows this is what makes the
teacher pass cheap: on SST-2 most sentences are far shorter than max_seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pkdpipe.data import Examples
from pkdpipe.errors import DataError

TRUNCATION = "longest_first"  # recorded in the cache key: it changes the token ids of long pairs


@dataclass
class Encoded:
    """One tokenised split: unpadded token ids per example, aligned with `ids`."""

    ids: np.ndarray  # (n,) int64 example ids
    input_ids: list[np.ndarray]  # n arrays of int32 token ids
    token_type_ids: list[np.ndarray] | None  # n arrays of uint8 segment ids, for models that use them
    labels: np.ndarray | None  # (n,) int64 label indices, float32 for regression; None if unlabelled

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def uses_token_type_ids(tokenizer) -> bool:
    return "token_type_ids" in tokenizer.model_input_names


def encode(examples: Examples, tokenizer, max_seq_len: int, chunk: int = 2048) -> Encoded:
    """Tokenise a split in chunks (fast tokenizers parallelise within a chunk)."""
    for field_name, texts in (("text_a", examples.text_a), ("text_b", examples.text_b or [])):
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise DataError(f"{examples.split}: example {examples.ids[i]} has an empty {field_name}")
    with_types = uses_token_type_ids(tokenizer)
    input_ids, token_types = [], []
    for start in range(0, len(examples), chunk):
        a = examples.text_a[start : start + chunk]
        b = examples.text_b[start : start + chunk] if examples.text_b is not None else None
        out = tokenizer(
            a,
            b,
            truncation=TRUNCATION,
            max_length=max_seq_len,
            return_token_type_ids=with_types,
            return_attention_mask=False,
        )
        input_ids.extend(np.asarray(x, dtype=np.int32) for x in out["input_ids"])
        if with_types:
            token_types.extend(np.asarray(x, dtype=np.uint8) for x in out["token_type_ids"])
    labels = None
    if examples.labels is not None:
        is_float = any(isinstance(v, float) for v in examples.labels[:1])
        labels = np.asarray(examples.labels, dtype=np.float32 if is_float else np.int64)
    return Encoded(
        ids=np.asarray(examples.ids, dtype=np.int64),
        input_ids=input_ids,
        token_type_ids=token_types if with_types else None,
        labels=labels,
    )


def length_sorted_order(lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions sorted by (length, id): deterministic, so every rank and every run agrees."""
    return np.lexsort((ids, lengths))


def collate(
    input_ids: list[np.ndarray], token_type_ids: list[np.ndarray] | None, pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example: input_ids, attention_mask (and token_type_ids)."""
    width = max(len(x) for x in input_ids)
    ids = np.full((len(input_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), width), dtype=np.int64)
    for row, x in enumerate(input_ids):
        ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if token_type_ids is not None:
        types = np.zeros((len(input_ids), width), dtype=np.int64)
        for row, x in enumerate(token_type_ids):
            types[row, : len(x)] = x
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

"""How a cache stores its [CLS] vectors: `float16` (the vectors as they are, in the manifest's
`hidden_dtype`) or `int8` (one byte a value, about half of float16's bytes).

What a codec must keep is small. At most intermediate layers of the encoders at hand one outlier
dimension is 100-500x the median one, and the L2-normalised [CLS] vectors differ between examples by
only 0.001-0.04. Int8 with one scale per row spends its 255 steps on the outlier: it moved a
normalised vector by 0.03-0.046 and erased those differences. So `int8` quantises each dimension on
its own: per dimension, over a block of `BLOCK_ROWS` rows, it takes the range of the values, centres
the codes on the middle of that range and divides the range into 254 steps:

    offset = (max + min) / 2,  scale = (max - min) / 254,  code = round((x - offset) / scale)
    decoded = offset + scale * code,  |decoded - x| <= scale / 2 (+ float32 rounding)

Centred on the range's middle rather than on the mean: the step is then never larger than with the
mean (whose codes must reach max |x - mean| on both sides), and the codes use all of -127..127.
A dimension constant over the block (layer 0's [CLS] is one vector for every example) has scale 0
and decodes exactly. Blocks of 1,024 rows, counted from each shard's first row: small enough that an
outlier row coarsens only its own block and that the scales follow the length-sorted rows' drift,
large enough that the scales (two float32 per dimension per block) add 0.8% to the codes' bytes.
The block size is part of the codec's name: another block size would be another codec, and key.

numpy only: the reader, verify and `pkdpipe cache stats` decode without torch.
"""

from __future__ import annotations

import numpy as np

FLOAT16 = "float16"  # the vectors as they are, in hidden_dtype (float16, or float32 with --dtype)
INT8 = "int8"
CODECS = (FLOAT16, INT8)
BLOCK_ROWS = 1024  # rows that share one offset and scale per dimension
INT8_STEPS = 254  # codes -127..127: symmetric about the offset


def blocks(rows: int) -> int:
    """How many blocks of scales a shard of `rows` rows stores (a last, shorter block included)."""
    return -(-rows // BLOCK_ROWS)


def encode_block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of (rows, H) vectors as (rows, H) int8 codes, (H,) float32 offsets and scales."""
    x = np.asarray(x, dtype=np.float32)
    high, low = x.max(axis=0), x.min(axis=0)
    offset = (low / 2 + high / 2).astype(np.float32)  # halves first: no overflow near float32's max
    scale = ((high.astype(np.float64) - low) / INT8_STEPS).astype(np.float32)
    steps = np.where(scale > 0, scale, 1).astype(np.float32)  # a constant dimension: code 0
    codes = np.clip(np.rint((x - offset) / steps), -127, 127).astype(np.int8)
    return codes, offset, scale


def decode(codes: np.ndarray, offset: np.ndarray, scale: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, H) float32 vectors from the int8 codes of shard rows `rows` and the shard's (blocks, H)
    offsets and scales."""
    block = np.asarray(rows) // BLOCK_ROWS
    return offset[block] + scale[block] * codes.astype(np.float32)


def decode_all(codes: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A whole shard's vectors of one layer, decoded."""
    return decode(codes, offset, scale, np.arange(len(codes)))


def bound(offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The largest error `encode_block` allows per value, (blocks, H): half a step, plus float32
    rounding (a few ulps) of the offset, the division and the decoded sum."""
    ulps = 4 * np.finfo(np.float32).eps
    return scale / 2 + ulps * (np.abs(offset) + 127 * scale)

"""What each cached [CLS] layer carries: per-dimension statistics, and the share that differs between
examples.

The patient loss compares L2-normalised [CLS] vectors. In the encoders at hand one outlier dimension
dominates the [CLS] vector of most intermediate layers (MiniLM's dimension 99, MPNet's 555), so the
normalised vector is nearly the same for every example: a target that teaches one direction shared
by all inputs and almost nothing about the input. `LayerStats.varying_share` measures that:

    varying share = mean over examples of |n - mean(n)|^2,  n = x / |x|

the share of a normalised target's squared length (1) that varies between examples; 1 minus it is
the constant direction. A layer with a varying share of 0.0001 gives the paper's patient loss a
target whose per-example part is a hundredth of a per cent of it.

`LayerStats` holds, per dimension, the mean and the sum of squared deviations (m2) of the raw
vectors (what a standardised patient loss needs) and of the normalised ones (what the diagnostic
needs). Shards written since pkdpipe 0.3 store them per layer (`cls_stats/<layer>`, see
`pkdpipe.cache.schema`), so a cache's statistics are one small read per shard, covered by the
shard's checksum; for older caches `TeacherCache.layer_stats` computes the same figures in one
streaming pass. Both merge per-shard parts with Chan et al.'s pairwise update, in float64, so the
result does not depend on how the rows were split into shards (up to float rounding).

numpy only: `pkdpipe cache stats` runs without torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

NORM_EPS = 1e-6  # as pkdpipe.losses.NORM_EPS: a vector shorter than this is divided by it
STAT_ROWS = ("mean", "m2", "unit_mean", "unit_m2")  # the rows of a stored (4, H) stats array


@dataclass(frozen=True)
class LayerStats:
    """Per-dimension statistics of one layer's [CLS] vectors over `count` rows (arrays of (H,), float64)."""

    count: int
    mean: np.ndarray  # mean of the vectors
    m2: np.ndarray  # sum over rows of (x - mean)^2
    unit_mean: np.ndarray  # the same two of the L2-normalised vectors
    unit_m2: np.ndarray

    @classmethod
    def of(cls, vectors: np.ndarray) -> LayerStats:
        """The statistics of (rows, H) vectors, as stored (float16 values are taken exactly)."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"layer statistics need (rows, hidden) vectors, got shape {x.shape}")
        norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)
        return cls(len(x), *_mean_m2(x), *_mean_m2(x / norms))

    @classmethod
    def from_array(cls, count: int, array: np.ndarray) -> LayerStats:
        """From the (4, H) array a shard stores (rows in `STAT_ROWS` order)."""
        a = np.asarray(array, dtype=np.float64)
        return cls(int(count), a[0], a[1], a[2], a[3])

    def to_array(self) -> np.ndarray:
        return np.stack([self.mean, self.m2, self.unit_mean, self.unit_m2])

    def merge(self, other: LayerStats) -> LayerStats:
        """The statistics of both sets of rows together (Chan, Golub and LeVeque's pairwise update)."""
        if not self.count:
            return other
        if not other.count:
            return self
        n = self.count + other.count
        w = other.count / n
        d, du = other.mean - self.mean, other.unit_mean - self.unit_mean
        cross = self.count * w
        return LayerStats(
            n,
            self.mean + d * w,
            self.m2 + other.m2 + d * d * cross,
            self.unit_mean + du * w,
            self.unit_m2 + other.unit_m2 + du * du * cross,
        )

    # -- what the patient loss can learn from ---------------------------------------------------
    @property
    def std(self) -> np.ndarray:
        """Per-dimension standard deviation of the vectors (population: m2 / count)."""
        return np.sqrt(self.m2 / max(self.count, 1))

    @property
    def varying_share(self) -> float:
        """Mean over rows of |n - mean(n)|^2 for the normalised vectors n: the share of the patient
        loss's target that differs between examples (0: one vector for all; at most 1)."""
        return float(self.unit_m2.sum() / max(self.count, 1))

    def length_shares(self) -> np.ndarray:
        """Per dimension, its share of the normalised vectors' squared length: mean of n_d^2."""
        return self.unit_mean**2 + self.unit_m2 / max(self.count, 1)

    def varying_shares(self) -> np.ndarray:
        """Per dimension, its share of the part that varies between examples (sums to 1; all 0 when
        nothing varies beyond float rounding)."""
        var = self.unit_m2 / max(self.count, 1)
        total = var.sum()
        return var / total if total > 1e-12 else np.zeros_like(var)


class Accumulator:
    """The `LayerStats` of vectors given block by block (`add`), none of them kept: what verify
    checks a shard's stored statistics with, reading each layer once.

    It sums, in float64, each value's deviation from a fixed centre and its square, and the same for
    the normalised vectors; then mean = centre + sum / n and m2 = sum of squares - sum^2 / n. With
    the centre at (or near) the true means, as the stored statistics put it when they are right,
    the sums hold deviations, not raw values: no precision is lost to the outlier dimension's size
    or to a dimension that never changes (layer 0), and the figures agree with `LayerStats.of` to
    about 1e-12 (relative). A centre far off makes m2 less precise, but then the mean, which stays
    exact, already differs from the stored one. Rows go through in float64 blocks of `BLOCK` that
    stay in the CPU's cache, column sums as matrix-vector products: on 8,192 x 768 float16 vectors
    about 3x faster than `LayerStats.of`, which makes float64 copies of the whole layer."""

    BLOCK = 256

    def __init__(self, hidden: int, centre: LayerStats | None = None):
        self.count = 0
        self._centre = None if centre is None else (centre.mean, centre.unit_mean)
        self._sums = np.zeros((4, hidden))  # sum of d, of d^2, of u, of u^2 (d, u: deviations)
        self._x = np.empty((self.BLOCK, hidden))
        self._d = np.empty((self.BLOCK, hidden))
        self._ones = np.ones(self.BLOCK)

    def add(self, vectors: np.ndarray) -> None:
        """Rows of (rows, H) vectors (float16 or float32 values are taken exactly)."""
        for start in range(0, len(vectors), self.BLOCK):
            self._add_block(vectors[start : start + self.BLOCK])

    def _add_block(self, block: np.ndarray) -> None:
        n = len(block)
        x, d = self._x[:n], self._d[:n]
        x[...] = block
        if self._centre is None:  # no better guess: this block's means
            self._centre = (x.mean(axis=0), (x / _norms(x)).mean(axis=0))
        centre, unit_centre = self._centre
        inverse = 1 / _norms(x)[:, 0]
        np.subtract(x, centre, out=d)
        self._sums[0] += self._ones[:n] @ d
        self._sums[1] += np.einsum("ij,ij->j", d, d)
        np.multiply(x, inverse[:, None], out=d)  # the normalised vectors' deviations, in place
        d -= unit_centre
        self._sums[2] += self._ones[:n] @ d
        self._sums[3] += np.einsum("ij,ij->j", d, d)
        self.count += n

    def result(self) -> LayerStats:
        if not self.count or self._centre is None:
            zeros = np.zeros(self._sums.shape[1])
            return LayerStats(0, zeros, zeros, zeros, zeros)
        n, s = self.count, self._sums
        centre, unit_centre = self._centre
        return LayerStats(
            n, centre + s[0] / n, s[1] - s[0] ** 2 / n, unit_centre + s[2] / n, s[3] - s[2] ** 2 / n
        )


def merge_all(parts: Iterable[LayerStats]) -> LayerStats | None:
    total = None
    for part in parts:
        total = part if total is None else total.merge(part)
    return total


def top_dims(shares: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    """The `k` dimensions with the largest shares, largest first: [(dimension, share), ...]."""
    order = np.argsort(-shares, kind="stable")[:k]
    return [(int(d), float(shares[d])) for d in order]


def _norms(x: np.ndarray) -> np.ndarray:
    """(rows, 1) L2 norms of float64 rows, at least `NORM_EPS` (as `LayerStats.of` divides by them)."""
    return np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), NORM_EPS)[:, None]


def _mean_m2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(x):
        return np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0)
    return mean, ((x - mean) ** 2).sum(axis=0)

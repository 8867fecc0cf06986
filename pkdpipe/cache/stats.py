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


def merge_all(parts: Iterable[LayerStats]) -> LayerStats | None:
    total = None
    for part in parts:
        total = part if total is None else total.merge(part)
    return total


def top_dims(shares: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    """The `k` dimensions with the largest shares, largest first: [(dimension, share), ...]."""
    order = np.argsort(-shares, kind="stable")[:k]
    return [(int(d), float(shares[d])) for d in order]


def _mean_m2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(x):
        return np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0)
    return mean, ((x - mean) ** 2).sum(axis=0)

"""Which teacher layers each student layer learns from (Sun et al. 2019, section 3.2).

Layers are numbered from 1 (the first encoder layer); 0 would be the embeddings output and is never
mapped. A K-layer student matches its layers 1..K-1 to K-1 teacher layers; its last layer K learns
through the logits (KD), so the teacher's top layer N is never in a map either.

    strategy  12→6            12→3   6→3   6→2
    skip      2,4,6,8,10      4,8    2,4   3      every (N/K)-th layer
    last      7,8,9,10,11     10,11  4,5   5      the K-1 layers just below the top
    kd, ft    (none)                              no patient loss
    auto      the K-1 layers whose normalised [CLS] varies most between examples (by_signal)

Each strategy in `pkdpipe.strategies` names its picker; `strategies.layer_map` applies it.

The authors' scripts pass 0-based indices into the list of encoder outputs (`--fc_layer_idx 1,3,5,7,9`
for 12→6 skip, `9,10` for 12→3 last); add 1 to each to get the layer numbers used here.
"""

from __future__ import annotations

from itertools import pairwise

from pkdpipe.errors import ConfigError


def skip_layers(n: int, k: int) -> list[int]:
    """PKD-Skip: layer round(j * N / K) for j = 1..K-1, rounding halves up.

    When K divides N this is exactly every (N // K)-th layer (12→6: 2,4,6,8,10); otherwise the layers
    stay evenly spread over the teacher instead of bunching at the bottom (12→5: 2,5,7,10 where a
    step of 12 // 5 = 2 would give 2,4,6,8). Since N / K > 1, the picks are always distinct and
    within 1..N-1."""
    return [(2 * j * n + k) // (2 * k) for j in range(1, k)]  # exact integer arithmetic


def last_layers(n: int, k: int) -> list[int]:
    """PKD-Last: the K-1 layers just below the teacher's top (12→6: 7,8,9,10,11)."""
    return list(range(n - k + 1, n))


def check_depths(n: int, k: int) -> None:
    """A student has at least one layer and fewer than its teacher's N."""
    if k < 1:
        raise ConfigError(f"a student needs at least 1 layer, got K={k}")
    if k >= n:
        raise ConfigError(
            f"a student must be shallower than its teacher: K={k} is not below the teacher's {n} layers"
        )


def check_explicit(layers: list[int], n: int, k: int) -> list[int]:
    """A map given by hand (`--teacher-layers 2,4,6,8,10`): K-1 strictly increasing layers in 1..N-1."""
    if len(layers) != k - 1:
        raise ConfigError(f"--teacher-layers needs K-1 = {k - 1} layers, got {len(layers)}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"--teacher-layers takes whole layer numbers, got {layer!r}")
        if layer == n:
            raise ConfigError(
                f"--teacher-layers: layer {n} is the teacher's top layer, which the student "
                f"learns through the logits; pick layers in 1..{n - 1}"
            )
        if not 1 <= layer < n:
            raise ConfigError(f"--teacher-layers: layer {layer} is out of range 1..{n - 1}")
    if any(b <= a for a, b in pairwise(layers)):
        shown = ",".join(map(str, layers))
        raise ConfigError(f"--teacher-layers must be strictly increasing with no repeats, got {shown}")
    return layers


def by_signal(shares: dict[int, float], n: int, k: int) -> list[int]:
    """`--teacher-layers auto`: the K-1 layers of 1..N-1 (among those in `shares`) whose varying
    share (`pkdpipe.cache.stats.LayerStats.varying_share`) is largest, in depth order; on a tie
    the deeper layer. In the encoders at hand most intermediate layers' normalised [CLS] is one
    direction for every example, and the paper's maps point at such layers."""
    candidates = sorted(layer for layer in shares if 1 <= layer < n)
    if len(candidates) < k - 1:
        raise ConfigError(
            f"--teacher-layers auto needs {k - 1} cached teacher layers in 1..{n - 1}; the cache has "
            f"{len(candidates)} ({', '.join(map(str, candidates)) or 'none'})"
        )
    ranked = sorted(candidates, key=lambda layer: (shares[layer], layer), reverse=True)
    return sorted(ranked[: k - 1])

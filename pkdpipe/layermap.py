"""Which teacher layers each student layer learns from (Sun et al. 2019, section 3.2).

Layers are numbered from 1 (the first encoder layer); 0 would be the embeddings output and is never
mapped. A K-layer student matches its layers 1..K-1 to K-1 teacher layers; its last layer K learns
through the logits (KD), so the teacher's top layer N is never in a map either.

    strategy  12→6            12→3   6→3   6→2
    skip      2,4,6,8,10      4,8    2,4   3      every (N/K)-th layer
    last      7,8,9,10,11     10,11  4,5   5      the K-1 layers just below the top
    kd, ft    (none)                              no patient loss

The authors' scripts pass 0-based indices into the list of encoder outputs (`--fc_layer_idx 1,3,5,7,9`
for 12→6 skip, `9,10` for 12→3 last); add 1 to each to get the layer numbers used here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import pairwise

from pkdpipe.errors import ConfigError

STRATEGIES = ("last", "skip", "kd", "ft")
"""PKD-Last, PKD-Skip, vanilla KD (logits only), fine-tuning (gold labels only)."""

_PATIENT = ("last", "skip")


def layer_map(
    strategy: str, teacher_layers: int, student_layers: int, explicit: Sequence[int] | None = None
) -> list[int]:
    """The 1-based teacher layers matched to student layers 1..K-1, in order.

    Args:
        strategy: one of `STRATEGIES`.
        teacher_layers: N, the teacher's number of encoder layers.
        student_layers: K, the student's number of encoder layers; 1 <= K < N.
        explicit: a map given by hand (`--teacher-layers 2,4,6,8,10`); replaces the one `skip` or
            `last` would pick. It must hold K-1 strictly increasing layers in 1..N-1.

    Skip picks layer round(j * N / K) for j = 1..K-1, rounding halves up. When K divides N this is
    exactly every (N // K)-th layer (12→6: 2,4,6,8,10); otherwise the layers stay evenly spread over
    the teacher instead of bunching at the bottom (12→5: 2,5,7,10 where a step of 12 // 5 = 2 would
    give 2,4,6,8). Since N / K > 1, the picks are always distinct and within 1..N-1.

    Raises:
        ConfigError: an unknown strategy, a student that is not shallower than its teacher, or an
            explicit map that does not fit (wrong length, out of range, not increasing, or given with
            `kd` / `ft`, which have no patient loss).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    n, k = teacher_layers, student_layers
    if k < 1:
        raise ConfigError(f"a student needs at least 1 layer, got K={k}")
    if k >= n:
        raise ConfigError(
            f"a student must be shallower than its teacher: K={k} is not below the teacher's {n} layers"
        )
    if strategy not in _PATIENT:
        if explicit is not None:
            raise ConfigError(
                f"--teacher-layers only applies to the skip and last strategies; "
                f"{strategy!r} has no patient loss"
            )
        return []
    if explicit is not None:
        return _check_explicit(list(explicit), n, k)
    if strategy == "skip":
        # round(j * n / k) with halves rounded up, in exact integer arithmetic
        return [(2 * j * n + k) // (2 * k) for j in range(1, k)]
    return list(range(n - k + 1, n))


def _check_explicit(layers: list[int], n: int, k: int) -> list[int]:
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


def parse_layers(text: str) -> list[int]:
    """Parse a comma-separated list of layer numbers ("2,4,6" or "2, 4, 6") into ints.

    Only checks the syntax; `layer_map(..., explicit=...)` checks the values against the models.

    Raises:
        ConfigError: anything other than non-negative whole numbers separated by commas.
    """
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", part) for part in parts):
        raise ConfigError(f"--teacher-layers expects comma-separated layer numbers like 2,4,6; got {text!r}")
    return [int(part) for part in parts]

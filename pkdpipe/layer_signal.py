"""`pkdpipe cache stats`: what each cached [CLS] layer can teach a student, and which layers each
strategy would map.

Per stored layer, over one split: the varying share of the normalised [CLS] vector (the part of the
paper's patient-loss target that differs between examples, `pkdpipe.cache.stats`), the dimensions
that hold most of the vector and those that hold most of what varies, and, for float16 caches, an
estimate of how much of a standardised target is the storage's rounding. Per student depth K: the
teacher layers that PKD-Skip, PKD-Last and `--teacher-layers auto` would map, with their shares.

Reads the cache's statistics (one small read per shard; one streaming pass for caches without
them); numpy only, like the rest of `pkdpipe cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pkdpipe import files, layermap, strategies
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.cache.stats import LayerStats, top_dims
from pkdpipe.errors import ConfigError


@dataclass
class LayerReport:
    layer: int
    varying_share: float
    dominant: list[tuple[int, float]]  # (dimension, share of the normalised vector's squared length)
    varying_dims: list[tuple[int, float]]  # (dimension, share of the part that varies)
    rounding_share: float | None  # share of the standardised target that is float16 rounding (estimate)


@dataclass
class SignalReport:
    key: str
    task: str
    split: str
    rows: int
    teacher: str
    teacher_layers: int
    hidden_dtype: str
    layers: list[LayerReport]
    maps: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # K -> {map name: teacher layers}

    def share(self, layer: int) -> float:
        return next(r.varying_share for r in self.layers if r.layer == layer)

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "task": self.task,
            "split": self.split,
            "rows": self.rows,
            "teacher": self.teacher,
            "teacher_layers": self.teacher_layers,
            "hidden_dtype": self.hidden_dtype,
            "layers": [
                {
                    "layer": r.layer,
                    "varying_share": r.varying_share,
                    "dominant_dims": [{"dim": d, "share": s} for d, s in r.dominant],
                    "varying_dims": [{"dim": d, "share": s} for d, s in r.varying_dims],
                    "fp16_rounding_share": r.rounding_share,
                }
                for r in self.layers
            ],
            "maps": {
                str(k): {
                    name: {"layers": chosen, "varying_share": [self.share(x) for x in chosen]}
                    for name, chosen in maps.items()
                }
                for k, maps in self.maps.items()
            },
        }


def rounding_share(stats: LayerStats) -> float:
    """Estimated share of the standardised target ((x - mean) / std per dimension) that is float16
    rounding: per dimension, the variance of rounding at the dimension's mean magnitude (a step of
    float16's spacing there, uniform: step^2 / 12) over the dimension's variance, averaged over
    dimensions (each weighs 1 once standardised). Near 0: the stored values resolve what varies;
    near 1: a standardised loss would mostly teach the storage's rounding."""
    step = np.spacing(np.abs(stats.mean).astype(np.float16)).astype(np.float64)
    var = stats.std**2
    noise = np.where(var > 0, step**2 / 12 / np.maximum(var, 1e-300), 1.0)
    return float(np.minimum(noise, 1.0).mean())


def layer_report(layer: int, stats: LayerStats, top: int, float16: bool) -> LayerReport:
    return LayerReport(
        layer,
        stats.varying_share,
        top_dims(stats.length_shares(), top),
        top_dims(stats.varying_shares(), top) if stats.varying_shares().any() else [],
        rounding_share(stats) if float16 else None,
    )


def signal_report(
    cache: TeacherCache, split: str = "train", depths: list[int] | None = None, top: int = 3
) -> SignalReport:
    """The report of `cache`'s `split` for students of `depths` layers (default: every K in 2..N-1)."""
    n = cache.teacher_layers
    depths = list(range(2, n)) if depths is None else sorted(set(depths))
    for k in depths:
        layermap.check_depths(n, k)
    stats = cache.layer_stats(split)
    float16 = cache.manifest.hidden_dtype == "float16"
    report = SignalReport(
        key=cache.key,
        task=cache.task,
        split=split,
        rows=cache.num_examples(split),
        teacher=cache.manifest.teacher.name_or_path,
        teacher_layers=n,
        hidden_dtype=cache.manifest.hidden_dtype,
        layers=[layer_report(layer, s, top, float16) for layer, s in sorted(stats.items())],
    )
    shares = {layer: s.varying_share for layer, s in stats.items()}
    stored = set(cache.present_layers)
    for k in depths:
        maps = {}
        for name in strategies.names():
            strategy = strategies.get(name)
            if strategy.maps_layers:
                chosen = strategy.layer_map(n, k)
                if set(chosen) <= stored:
                    maps[name] = chosen
        if k > 1 and sum(1 <= layer < n for layer in stored) >= k - 1:
            maps["auto"] = layermap.by_signal(shares, n, k)
        report.maps[k] = maps
    return report


def plot(report: SignalReport, output: Path, depth: int) -> Path:
    """A PNG: the varying share of every layer (log scale), the layers each map names at `depth`
    marked under the bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or pkdpipe[plots])") from None
    if depth not in report.maps:
        raise ConfigError(f"--plot: no maps for a {depth}-layer student in this report")
    layers = [r.layer for r in report.layers]
    shares = [max(r.varying_share, 1e-7) for r in report.layers]  # a constant layer sits on the axis
    maps = report.maps[depth]
    size = (max(6.0, 1.8 + 0.5 * len(layers)), 4.2)
    fig, (ax, strip) = plt.subplots(
        2, 1, sharex=True, figsize=size, height_ratios=[4, 0.4 + 0.35 * len(maps)]
    )
    ax.bar(layers, shares, color="#4c72b0", width=0.6)
    ax.set_yscale("log")
    ax.set_ylim(1e-7, 2)
    ax.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax.text(layers[0] - 0.45, 0.012, "1%", color="grey", fontsize=8, va="bottom")
    ax.set_ylabel("varying share of\nthe normalised [CLS]")
    ax.set_title(
        f"{report.task}, cache {report.key}: what each teacher layer's [CLS] carries\n"
        f"over {report.rows:,} {report.split} rows; the layers each map names for a {depth}-layer student",
        fontsize=8,
    )
    for row, chosen in enumerate(maps.values()):
        strip.scatter(chosen, [row] * len(chosen), marker="s", color="#c44e52", s=36)
    strip.set_yticks(range(len(maps)), [f"{name}-{depth}" for name in maps], fontsize=8)
    strip.set_ylim(-0.6, len(maps) - 0.4)
    strip.invert_yaxis()
    strip.set_xticks(layers)
    strip.set_xlabel("teacher layer (0 = embeddings output)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    with files.replace_file(output) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return output

"""`report`: one PNG of training curves and final metrics for several runs, plus a table.

Reads only what runs wrote (train_log.jsonl, metrics.json), so it works on finished runs, on
runs still going, and on runs copied from another machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from pkdpipe import files, runfolder
from pkdpipe.errors import ConfigError, PkdError

NOT_TERMS = ("step", "epoch", "lr", "steps_per_s")  # the other fields of a training-log line


def loss_terms(records: list[dict]) -> list[str]:
    """The loss terms a run logged, in the order its strategy returns them ("loss" first)."""
    terms: dict[str, None] = {}
    for record in records:
        if "loss" in record:
            terms.update((k, None) for k in record if k not in NOT_TERMS and not k.startswith("dev_"))
    return list(terms)


def read_run(folder: Path) -> dict:
    folder = Path(folder)
    records = runfolder.read_log(folder)
    if records is None:
        log = runfolder.TRAIN_LOG
        raise PkdError(f"{folder} has no {log}: not a pkdpipe run folder, nor a folder of runs")
    run = runfolder.read(folder)
    majority = (run.metrics or {}).get("dev_majority_baseline") or {}  # always answering the majority label
    return {"name": folder.name, "path": folder, "records": records, "dev": run.dev,
            "strategy": run.strategy, "majority": majority}  # fmt: skip


TERM_NAMES = {"pt": "patient", "kd": "soft-label (kd)", "ce": "cross-entropy (ce)"}


def unused_note(key: str, unused: list[dict], drawn: int) -> str | None:
    """Why a loss panel lacks some runs (or is empty): their strategy has no such term, e.g. 'no
    patient term: strategy kd'. An empty panel with no word reads as a failed run."""
    if not unused:
        return None
    name = TERM_NAMES.get(key, key)
    if len(unused) == 1 and not drawn:
        return f"no {name} term: strategy {unused[0]['strategy']}"
    return f"no {name} term: " + ", ".join(f"{r['name']} (strategy {r['strategy']})" for r in unused)


def _save(fig, output: Path) -> None:
    """The figure appears at `output` whole or not at all (a scratch file renamed into place)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with files.replace_file(output) as tmp:
        fig.savefig(tmp, dpi=110, format=output.suffix.lstrip(".") or "png")


def run_folders(folders: list[Path]) -> list[Path]:
    """The run folders to draw: each folder given that is a run, and for one that is not but holds
    runs (e.g. runs/banking77, or a grid sweep's folder), the runs directly inside it, by name."""
    found = []
    for folder in map(Path, folders):
        inside = sorted(p.parent for p in folder.glob(f"*/{runfolder.TRAIN_LOG}"))
        found += inside if inside and not (folder / runfolder.TRAIN_LOG).is_file() else [folder]
    return found


def default_output(folders: list[Path]) -> Path:
    """report.png next to the runs it draws: in the folder that holds them all."""
    parents = [Path(f).resolve().parent for f in folders]
    common = Path(os.path.commonpath(parents)) if parents else Path.cwd()
    return common / "report.png"


def make_report(folders: list[Path], output: Path | None = None) -> tuple[list[dict], Path]:
    """Write the PNG (default: `default_output`); return the runs read (name, dev metrics) and where
    the PNG went. Every dev metric is drawn in percent, and the bars of the best dev metric start at 0."""
    folders = run_folders(folders)
    runs = [read_run(f) for f in folders]  # a wrong folder is the first thing to hear about
    output = Path(output) if output else default_output(folders)
    plt = _pyplot()
    dev_keys = sorted({k for r in runs for rec in r["records"] for k in rec if k.startswith("dev_")})
    terms = list(dict.fromkeys(t for r in runs for t in loss_terms(r["records"])))
    panels = terms + dev_keys
    ncols = 3
    nrows = -(-(len(panels) + 1) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows + 0.6), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(panels) + 1 :]:
        ax.set_visible(False)
    for ax, key in zip(axes[0], panels):
        _draw_panel(ax, key, runs)
    bar_ax = axes[0][len(panels)]
    metric = dev_keys[0].removeprefix("dev_") if dev_keys else None
    if metric:
        values = [100 * r["dev"].get(metric, float("nan")) for r in runs]
        bars = bar_ax.bar(range(len(runs)), values, color=[f"C{i}" for i in range(len(runs))])
        bar_ax.bar_label(bars, fmt="%.1f", fontsize=8)
        bar_ax.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=30, ha="right", fontsize=7)
        bar_ax.set_title(f"best dev {metric} (%)")
        bar_ax.set_ylim(0, 100 if metric not in ("pearson", "spearman", "matthews") else None)
        _majority_line(bar_ax, metric, runs)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(runs), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, output)
    plt.close(fig)
    return runs, output


def _draw_panel(ax, key: str, runs: list[dict]) -> None:
    """One panel: a loss term's curve (runs without that term named in a note) or a dev metric's
    points in percent, with the majority-class line."""
    unused = []
    for run in runs:
        points = [(rec["step"], rec[key]) for rec in run["records"] if key in rec]
        if key != "loss" and not key.startswith("dev_") and all(y == 0 for _, y in points):
            unused.append(run)  # a run that does not use that term (fine-tuning has no kd or pt)
            continue
        if points:
            xs, ys = zip(*points)
            if key.startswith("dev_"):
                ys = [100 * y for y in ys]  # fractions in the logs, percent on every axis here
            ax.plot(xs, ys, marker="o" if key.startswith("dev_") else None, markersize=3, label=run["name"])
    note = unused_note(key, unused, len(runs) - len(unused))
    if note:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True)
    if key.startswith("dev_"):
        _majority_line(ax, key.removeprefix("dev_"), runs)
    title = f"dev {key.removeprefix('dev_')} (%)" if key.startswith("dev_") else key
    ax.set_title(title.replace("pt", "patient (pt)") if key == "pt" else title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _majority_line(ax, metric: str, runs: list[dict]) -> None:
    """A dashed line at always answering the majority class: a run at it learned nothing."""
    for value in sorted({r["majority"][metric] for r in runs if metric in r["majority"]}):
        ax.axhline(100 * value, color="grey", linestyle="--", linewidth=1, label="majority class")
        where = ("axes fraction", "data")
        ax.annotate(f"majority class {100 * value:.1f}", (0.01, 100 * value), xycoords=where,
                    fontsize=7, color="grey", va="bottom")  # fmt: skip


def make_study_report(storage: str, study_name: str | None, output: Path) -> dict:
    """One PNG of a search: every trial's dev metric (%) against its evaluations, pruned trials cut
    short and marked with an x, the best trial's settings in the title. Returns the best trial."""
    from pkdpipe.search import open_study, trials_of

    plt = _pyplot()
    study = open_study(study_name or _only_study(storage), storage)
    records = trials_of(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in records:
        steps = sorted(trials[r.number].intermediate_values.items())
        if not steps:
            continue
        xs, ys = zip(*steps)
        ys = [100 * y for y in ys]
        pruned = r.state == "PRUNED"
        ax.plot(
            xs, ys, color="C3" if pruned else "C0", alpha=0.45 if pruned else 0.9, marker="o", markersize=3
        )
        if pruned:
            ax.plot(xs[-1], ys[-1], marker="x", color="C3", markersize=8)
    best = next((r for r in records if r.state == "COMPLETE"), None)
    trained = [r for r in records if r.repeat_of is None]
    n_pruned = sum(r.state == "PRUNED" for r in trained)
    title = f"study {study.study_name}: {len(trained)} trials, {n_pruned} pruned"
    if len(trained) < len(records):  # settings drawn again, answered from the trial that trained them
        title += f", {len(records) - len(trained)} repeats"
    if best is not None:
        settings = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.settings.items()
        )
        title += f"\nbest: trial {best.number}, dev {100 * best.value:.2f} ({settings})"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("evaluations (epochs, or --eval-every steps)")
    ax.set_ylabel("dev metric (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, output)
    plt.close(fig)
    return {"best": best, "trials": records}


def _only_study(storage: str) -> str:
    from pkdpipe.search import _optuna

    try:
        names = [s.study_name for s in _optuna().get_all_study_summaries(storage)]
    except Exception as err:  # a wrong URL, a server that is not there
        raise ConfigError(f"cannot read the studies in {storage}: {str(err).splitlines()[0]}") from None
    if len(names) != 1:
        raise ConfigError(f"{storage} holds {len(names)} studies ({', '.join(names)}): pass --study NAME")
    return names[0]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("report needs matplotlib: pip install matplotlib (or pkdpipe[plots])") from None
    return plt

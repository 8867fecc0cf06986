"""A full grid against `--search asha` over the same space, from one cache: the best dev metric each
finds and the student-epochs each spends.

    python benchmarks/bench_search.py --cache bench-out/reproduce-trec/cache/trec/KEY   # a cache folder

Both are pkdpipe's own: the grid is `pkdpipe.sweep` (every combination trained to the end), the
search is `pkdpipe.search` (Optuna's TPE sampler over the same choices, its successive-halving
pruner stopping trials after 1 or 3 evaluations, one evaluation per epoch). Default space, as in
issue 15: lr {1e-4, 2e-4, 5e-4} x beta {0.1, 0.5, 2} x T {5, 10, 20} x strategy {last, skip},
3-layer students, 3 epochs; the search runs `--trials` trials for each seed in `--search-seeds`.
Student-epochs: the grid's are runs x epochs; a search's are the evaluations its trials reported
(a pruned trial stops at the evaluation that pruned it). Wall times are the machine's, load included
(printed): they are context; the student-epochs are the measure.

Runs are kept under --workdir: a rerun reuses the finished grid runs and the finished study.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, load_avg, log, machine_lines, set_threads, table  # noqa: E402

from pkdpipe.config import DistillConfig  # noqa: E402
from pkdpipe.search import Param, search  # noqa: E402
from pkdpipe.sweep import sweep  # noqa: E402

SPACE = {
    "lr": [1e-4, 2e-4, 5e-4],
    "beta": [0.1, 0.5, 2.0],
    "temperature": [5.0, 10.0, 20.0],
    "strategy": ["last", "skip"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="cache folder or key (its task's dev split is the metric)")
    p.add_argument("--workdir", type=Path, default=Path("bench-out/search"))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trials", type=int, default=20, help="trials of each search (finished or pruned)")
    p.add_argument("--search-seeds", default="0,1", help="one search per sampler seed")
    p.add_argument("--seed", type=int, default=1, help="the students' seed (init, dropout, order)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-grid", action="store_true", help="only the searches")
    args = p.parse_args()
    set_threads(args.threads)
    lines = [f"bench_search: {command_line()}", *machine_lines()]
    base = DistillConfig(
        cache=args.cache, layers=args.layers, epochs=args.epochs, seed=args.seed, alpha=0.5, quiet=True
    )
    grid_runs = len(SPACE["lr"]) * len(SPACE["beta"]) * len(SPACE["temperature"]) * len(SPACE["strategy"])
    rows = []
    if not args.skip_grid:
        log(f"grid: {grid_runs} runs x {args.epochs} epochs")
        start = time.time()
        runs = sweep(base, SPACE, args.workdir / "grid")
        seconds = time.time() - start
        best = runs[0]
        metric = next(iter(best.metrics))
        grid_best = 100 * best.metrics[metric]
        rows.append(
            (
                "grid",
                f"{len(runs)} runs",
                f"{grid_best:.2f}",
                _settings(best.settings),
                f"{len(runs) * args.epochs}",
                "1.00",
                f"{seconds / 60:.1f} min",
            )
        )
        (args.workdir / "grid_scores.json").write_text(
            json.dumps({r.name: 100 * r.metrics[metric] for r in runs}, indent=2) + "\n"
        )
    space = {name: Param(name, choices=tuple(values)) for name, values in SPACE.items()}
    for seed in (int(s) for s in args.search_seeds.split(",")):
        log(f"asha, sampler seed {seed}: {args.trials} trials")
        start = time.time()
        folder = args.workdir / f"asha-s{seed}"
        trials = search(base, space, args.trials, folder, f"bench-s{seed}", seed=seed)
        seconds = time.time() - start
        finished = [t for t in trials if t.state in ("COMPLETE", "PRUNED")]
        top = finished[0]
        epochs = sum(t.epochs for t in finished)
        pruned = sum(t.state == "PRUNED" for t in finished)
        rows.append(
            (
                f"asha, seed {seed}",
                f"{len(finished)} trials ({pruned} pruned)",
                f"{100 * top.value:.2f}",
                _settings(top.settings),
                f"{epochs}",
                f"{epochs / (grid_runs * args.epochs):.2f}",
                f"{seconds / 60:.1f} min",
            )
        )
    header = ("", "trained", "best dev", "its settings", "student-epochs", "of the grid's", "wall")
    lines += ["", table(rows, header), "", f"load average at the end: {load_avg()}"]
    text = "\n".join(lines)
    (args.workdir / "report.md").write_text(text + "\n")
    print(text)


def _settings(settings: dict) -> str:
    names = {"lr": "lr", "beta": "beta", "temperature": "T", "strategy": ""}
    return " ".join(f"{names[k]} {settings[k]:g}" if k != "strategy" else settings[k] for k in names)


if __name__ == "__main__":
    main()

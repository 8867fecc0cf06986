"""A full grid against `--search asha` over the same space, from one cache: the best dev metric each
finds and the student-epochs each spends.

    python benchmarks/bench_search.py --cache bench-out/reproduce-trec/cache/trec/KEY   # a cache folder
    python benchmarks/bench_search.py --cache ... --parts grid-last --threads 1 &       # two lanes
    python benchmarks/bench_search.py --cache ... --parts grid-skip --threads 1 &       # side by side
    python benchmarks/bench_search.py --report                                          # the table

Both are pkdpipe's own: the grid is `pkdpipe.sweep` (every combination trained to the end), the
search is `pkdpipe.search` (Optuna's TPE sampler over the same choices, its successive-halving
pruner stopping trials after 1 or 3 evaluations, one evaluation per epoch). Default space, as in
issue 15: lr {1e-4, 2e-4, 5e-4} x beta {0.1, 0.5, 2} x T {5, 10, 20} x strategy {last, skip},
3-layer students, 3 epochs; the search runs `--trials` trials for each seed in `--search-seeds`.
Student-epochs: the grid's are runs x epochs; a search's are the evaluations its trials reported
(a pruned trial stops at the evaluation that pruned it). Wall times are the machine's, load included
(printed): they are context; the student-epochs are the measure.

The work comes in parts (`--parts`): the grid's share of each strategy (grid-last, grid-skip) and
one search per sampler seed (asha-0, asha-1), so separate processes can run them side by side. Each
finished part is a JSON record under --workdir/parts/ (what it trained, the dev metric of each run
or trial, its wall time); a rerun skips finished parts and reuses finished grid runs and studies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, load_avg, log, machine_lines, set_threads, table  # noqa: E402

from pkdpipe import files  # noqa: E402
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
    p.add_argument("--cache", help="cache folder or key (its task's dev split is the metric)")
    p.add_argument("--workdir", type=Path, default=Path("bench-out/search"))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trials", type=int, default=20, help="trials of each search (finished or pruned)")
    p.add_argument("--search-seeds", default="0,1", help="one search per sampler seed")
    p.add_argument("--seed", type=int, default=1, help="the students' seed (init, dropout, order)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--parts",
        default="grid,asha",
        help="what to run: grid (every strategy), grid-STRATEGY (one strategy's share), asha (every "
        "search seed) or asha-SEED; parts in separate processes can run side by side",
    )
    p.add_argument("--report", action="store_true", help="only print the table of the parts so far")
    args = p.parse_args()
    parts = _parts(args.parts, args.search_seeds)
    if not args.report:
        if not args.cache:
            p.error("--cache is required to run parts")
        set_threads(args.threads)
        base = DistillConfig(
            cache=args.cache, layers=args.layers, epochs=args.epochs, seed=args.seed, alpha=0.5, quiet=True
        )
        for part in parts:
            path = args.workdir / "parts" / f"{part}.json"
            if not path.is_file():  # written whole or not at all: a killed part runs again
                record = _run_part(part, base, args)
                path.parent.mkdir(parents=True, exist_ok=True)
                files.write_text(path, json.dumps(record, indent=2) + "\n")
    text = report(args.workdir, args.epochs)
    if not args.report:
        (args.workdir / "report.md").write_text(text + "\n")
    print(text)


def _parts(spec: str, search_seeds: str) -> list[str]:
    parts = []
    for part in spec.split(","):
        if part == "grid":
            parts += [f"grid-{s}" for s in SPACE["strategy"]]
        elif part == "asha":
            parts += [f"asha-{s}" for s in search_seeds.split(",")]
        elif _is_part(part):
            parts.append(part)
        else:
            sys.exit(f"--parts: unknown part {part!r} (grid, grid-STRATEGY, asha, asha-SEED)")
    return parts


def _is_part(part: str) -> bool:
    """grid-STRATEGY or asha-SEED, read as `_run_part` reads them."""
    kind, _, which = part.partition("-")
    return (kind == "grid" and which in SPACE["strategy"]) or (kind == "asha" and which.isdigit())


def _run_part(part: str, base: DistillConfig, args) -> dict:
    """Run one part; its record: what it trained, the dev metric each run reached, its wall time."""
    kind, _, which = part.partition("-")
    machine, start = machine_lines(), time.time()
    if kind == "grid":
        space = {**SPACE, "strategy": [which]}
        log(f"{part}: {math.prod(len(v) for v in space.values())} runs x {args.epochs} epochs")
        runs = sweep(base, space, args.workdir / "grid")
        metric = next(iter(runs[0].metrics))
        trained = [
            {"name": r.name, "settings": r.settings, "dev": 100 * r.metrics[metric], "epochs": args.epochs}
            for r in runs
        ]
    else:
        log(f"{part}: {args.trials} trials")
        space = {name: Param(name, choices=tuple(values)) for name, values in SPACE.items()}
        folder = args.workdir / f"asha-s{which}"
        trials = search(base, space, args.trials, folder, f"bench-s{which}", seed=int(which))
        trained = [
            {"name": f"trial {t.number}", "settings": t.settings, "dev": 100 * t.value, "epochs": t.epochs,
             "pruned": t.state == "PRUNED", "repeat": t.repeat_of is not None}
            for t in trials if t.state in ("COMPLETE", "PRUNED") and t.value is not None
        ]  # fmt: skip
    return {
        "part": part,
        "trained": trained,
        "seconds": time.time() - start,
        "load_average": load_avg(),
        "command": command_line(),
        "machine": machine,
    }


def report(workdir: Path, epochs: int) -> str:
    """The grid (its parts joined) against each search: best dev, its settings, student-epochs."""
    records = [json.loads(p.read_text()) for p in sorted((workdir / "parts").glob("*.json"))]
    grid = [r for r in records if r["part"].startswith("grid-")]
    searches = [r for r in records if r["part"].startswith("asha-")]
    full_grid = math.prod(len(v) for v in SPACE.values())
    rows, runs = [], [run for r in grid for run in r["trained"]]
    if grid:
        best = max(runs, key=lambda run: run["dev"])
        share = "" if len(runs) == full_grid else f" (of {full_grid})"
        trained = f"{len(runs)} runs{share}"
        spent = sum(run["epochs"] for run in runs)
        rows.append((*_row("grid", trained, best, spent, full_grid * epochs, grid), "1"))
    for r in searches:
        trials = r["trained"]
        best = max(trials, key=lambda t: t["dev"])
        spent = sum(t["epochs"] for t in trials)
        pruned = sum(t.get("pruned", False) and not t.get("repeat") for t in trials)
        repeats = sum(t.get("repeat", False) for t in trials)  # answered from an earlier trial, untrained
        trained = f"{len(trials) - repeats} trials ({pruned} pruned)"
        trained += f" + {repeats} repeats" if repeats else ""
        name = f"asha, seed {r['part'].removeprefix('asha-')}"
        row = _row(name, trained, best, spent, full_grid * epochs, [r])
        rows.append((*row, _grid_rank(best["settings"], runs)))
    header = ("", "trained", "best dev", "its settings", "student-epochs", "of the grid's", "wall")
    header += ("grid rank",)  # where the grid ranks the best settings: 1 = the grid's best
    lines = [
        f"bench_search {r['part']}: {r['command']} (load average at its end {r['load_average']})"
        for r in records
    ]
    lines += records[0]["machine"] if records else []
    return "\n".join([*lines, "", table(rows, header) if rows else "no parts finished yet"])


def _row(name: str, trained: str, best: dict, spent: int, grid_epochs: int, records: list[dict]) -> tuple:
    """One line of the table; the wall time is the parts' processes' summed (they may run side by side)."""
    minutes = sum(r["seconds"] for r in records) / 60
    share = f"{spent / grid_epochs:.2f}"
    return (
        name,
        trained,
        f"{best['dev']:.2f}",
        _settings(best["settings"]),
        f"{spent}",
        share,
        f"{minutes:.1f} min",
    )


def _grid_rank(settings: dict, runs: list[dict]) -> str:
    """Where the grid ranks these settings (1 = the grid's best; ties share a rank); "-" if not run."""
    same = [run["dev"] for run in runs if all(run["settings"][k] == settings[k] for k in SPACE)]
    if not same:
        return "-"
    return str(1 + sum(run["dev"] > same[0] for run in runs))


def _settings(settings: dict) -> str:
    names = {"lr": "lr", "beta": "beta", "temperature": "T", "strategy": ""}
    return " ".join(f"{names[k]} {settings[k]:g}" if k != "strategy" else settings[k] for k in names)


if __name__ == "__main__":
    main()

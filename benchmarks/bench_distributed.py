"""Benchmark of the torchrun path (issue 5): cache-teacher and distill with 1 rank and with 2 ranks.

The real MiniLM teacher (all-MiniLM-L6-v2: 6 layers, hidden 384, with a random seeded 77-label head)
over a seeded random sample of BANKING77 train.csv (pkdpipe's train split of it, the rest being
its carved-out dev); a 3-layer student (its first 3 layers, PKD-Skip 6->3). Each run is the real
command in a fresh process, exactly as printed:

- 1 rank x 2 threads: `OMP_NUM_THREADS=2 python -m pkdpipe ...`
- 2 ranks x 1 thread:  `OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m pkdpipe ...` (gloo)
- 1 rank x 1 thread:   `OMP_NUM_THREADS=1 python -m pkdpipe ...`

The first two each use the machine's 2 cores, one with intra-op threads, one with ranks. The third
is there because on a shared, loaded machine two intra-op threads can be far slower than one (each
waits for the other at every operator while other processes hold the cores), and then "2 ranks
against 1 x 2 threads" mostly measures that; "2 ranks against 1 x 1 thread" shows what the second
rank itself adds. Figures:

- cache-teacher: examples / seconds of the teacher pass, read from the manifest (`total_s -
  fingerprint_s`: tokenising, the teacher over every shard on every rank, the barrier, and the
  shards' checksums; not loading the model nor hashing its weights). `--shard-size` is an eighth
  of the train split, so each of 2 ranks gets 4 shards (a shard is the unit of parallel work: with
  one shard, one rank would do it all).
- distill: examples trained / `train_seconds` from metrics.json (the whole `fit`: DDP set-up, every
  step, the final save). Global batch 32 both ways (2 x 16 under torchrun); one epoch; no dev split.
- wall: the whole command, start-up included (torchrun adds its own agent and a rendezvous).

The three layouts run one after the other (in reverse order on every second repeat); the ratios
are taken within each repeat and the median is reported. The machine is shared: load averages are
printed before each run (stderr) and in the report.

Run from the repository root:  python benchmarks/bench_distributed.py [--rows 512] [--repeats 1]
(about 3 minutes per repeat on 2 loaded cores, most of it the 1 x 2 threads distill; --repeats 2
gives medians and alternates the order, in about twice the time)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATASETS,
    command_line,
    load_avg,
    log,
    make_teacher,
    median,
    table,
)

STUDENT_LAYERS = 3
STRATEGY = "skip"  # PKD-Skip 6->3: student layers 1, 2 learn from teacher layers 2, 4
LAYOUTS = ((1, 2), (2, 1), (1, 1))  # (ranks, threads per rank)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATASETS / "banking77", help="BANKING77 folder")
    p.add_argument("--rows", type=int, default=512, help="seeded random sample of BANKING77 train")
    p.add_argument("--batch-size", type=int, default=32, help="global batch of distill")
    p.add_argument("--teacher-batch-size", type=int, default=64, help="cache-teacher's batch (per rank)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each layout per stage (order alternates)")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temporary folder)")
    return p.parse_args(argv)


def write_sample(source: Path, dest: Path, rows: int, seed: int = 0) -> int:
    """A seeded random sample of BANKING77 train (train.csv is grouped by intent: no head slice)."""
    with open(source / "train.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header, *lines = list(reader)
    if rows and rows < len(lines):
        lines = random.Random(seed).sample(lines, rows)
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *lines])
    for name in ("test.csv", "categories.json"):
        shutil.copy(source / name, dest / name)
    return len(lines)


def pkdpipe_cmd(ranks: int, threads: int, args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The environment and the command line of one run."""
    env = {"OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        return env, [sys.executable, "-m", "pkdpipe", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return env, [*launcher, "-m", "pkdpipe", *args]


def shown(env: dict[str, str], cmd: list[str]) -> str:
    """The command as a person would type it (torchrun for `python -m torch.distributed.run`)."""
    words = ["python" if w == sys.executable else w for w in cmd]
    if words[:3] == ["python", "-m", "torch.distributed.run"]:
        words = ["torchrun", *words[3:]]
    return " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(words)


def run(env: dict[str, str], cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run one command; return its wall seconds and the 1-minute load average before it."""
    quiet = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PKDPIPE_QUIET": "1"}
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full_env.update(quiet, **env)
    log(f"load {load_avg()}: {shown(env, cmd)}")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(
            f"failed ({done.returncode}): {shown(env, cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return seconds, load


def train_rows(data_dir: Path) -> int:
    """Rows of pkdpipe's banking77 train split (BANKING77 has no dev file: pkdpipe carves one out)."""
    from pkdpipe.data import load_split
    from pkdpipe.tasks import get_task

    return len(load_split(get_task("banking77"), "train", data_dir).ids)


def cache_args(args, work: Path, teacher: Path, cache_dir: Path, shard_size: int) -> list[str]:
    return [
        "cache-teacher", "--task", "banking77", "--data-dir", str(work / "data"), "--teacher", str(teacher),
        "--splits", "train", "--cache-dir", str(cache_dir), "--batch-size", str(args.teacher_batch_size),
        "--shard-size", str(shard_size), "--device", "cpu", "--quiet",
    ]  # fmt: skip


def distill_args(args, cache: Path, output: Path, seed: int) -> list[str]:
    return [
        "distill", "--cache", str(cache), "--strategy", STRATEGY, "--layers", str(STUDENT_LAYERS),
        "--epochs", "1", "--batch-size", str(args.batch_size), "--seed", str(seed),
        "--checkpoint-every", "0", "--output", str(output), "--device", "cpu", "--quiet",
    ]  # fmt: skip


def examples_trained(cache_path: Path, batch_size: int, world: int, seed: int) -> int:
    """Rows one epoch trains on (batches are trimmed to a multiple of the number of ranks)."""
    from pkdpipe.cache.reader import TeacherCache

    with TeacherCache(cache_path) as cache:
        plan = cache.epoch_plan("train", batch_size, 0, seed, world)
    return sum(len(rows) for rows in plan)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.data / "train.csv").is_file():
        sys.exit(f"no BANKING77 train.csv in {args.data}: pass --data")
    load_start = load_avg()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log("setting up: MiniLM teacher with a 77-label head, BANKING77 sample")
        teacher = make_teacher(work / "teacher", num_labels=77)
        sampled = write_sample(args.data, work / "data", args.rows)
        n = train_rows(work / "data")
        shard_size = -(-n // 8)
        seed = 0
        results = {(stage, layout): [] for stage in ("cache-teacher", "distill") for layout in LAYOUTS}
        commands = {}
        cache_path = None
        for stage in ("cache-teacher", "distill"):
            for repeat in range(args.repeats):
                for ranks, threads in LAYOUTS if repeat % 2 == 0 else LAYOUTS[::-1]:
                    tag = f"{ranks}x{threads}-{repeat}"
                    if stage == "cache-teacher":
                        stage_args = cache_args(args, work, teacher, work / f"cache-{tag}", shard_size)
                    else:
                        stage_args = distill_args(args, cache_path, work / f"student-{tag}", seed)
                    env, cmd = pkdpipe_cmd(ranks, threads, stage_args)
                    commands.setdefault((stage, ranks, threads), shown(env, cmd))
                    wall, load = run(env, cmd, work)
                    if stage == "cache-teacher":
                        folder = next((work / f"cache-{tag}" / "banking77").glob("*/manifest.json")).parent
                        timings = json.loads((folder / "manifest.json").read_text())["timings"]
                        seconds, examples = timings["total_s"] - timings["fingerprint_s"], n
                        cache_path = cache_path or folder
                    else:
                        metrics = json.loads((work / f"student-{tag}" / "metrics.json").read_text())
                        seconds = metrics["train_seconds"]
                        examples = examples_trained(cache_path, args.batch_size, ranks, seed)
                    results[(stage, (ranks, threads))].append(
                        (examples, seconds, wall, examples / seconds, load)
                    )
        load_end = load_avg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    import torch
    import transformers

    print("# torchrun on CPU: 1 rank x 2 threads, 2 ranks x 1 thread (gloo), 1 rank x 1 thread")
    print()
    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )
    print(f"load average (1 / 5 / 15 min): {load_start} at the start, {load_end} at the end (shared machine)")
    print(
        f"data: {sampled:,} rows sampled (seed 0) from BANKING77 train.csv ({args.data}), of which {n:,} "
        f"form pkdpipe's train split (the rest is its carved-out dev); cache-teacher --splits train "
        f"--shard-size {shard_size} ({-(-n // shard_size)} shards), "
        f"teacher batch {args.teacher_batch_size} per rank"
    )
    print(
        "teacher: all-MiniLM-L6-v2 (6 layers, hidden 384) + random 77-label head; student: its first "
        f"{STUDENT_LAYERS} layers + a fresh head, PKD-Skip 6->3; distill global batch {args.batch_size}, "
        "1 epoch"
    )
    print()

    def rate(stage: str, layout: tuple[int, int], repeat: int) -> float:
        return results[(stage, layout)][repeat][3]

    rows = []
    for (stage, layout), runs in results.items():
        examples, seconds, wall, speed, load = (median([r[i] for r in runs]) for i in range(5))
        vs = {}
        if layout == (2, 1):
            for other in ((1, 2), (1, 1)):
                ratios = [rate(stage, layout, i) / rate(stage, other, i) for i in range(args.repeats)]
                vs[other] = f"{median(ratios):.2f}x"
        rows.append((stage, f"{layout[0]} x {layout[1]}", f"{load:.1f}", f"{examples:,.0f}", f"{seconds:.1f}",
                     f"{wall:.1f}", f"{speed:,.1f}", vs.get((1, 2), ""), vs.get((1, 1), "")))  # fmt: skip
    header = ("stage", "ranks x threads", "load before", "examples", "stage s", "wall s", "examples/s")
    print(table(rows, (*header, "2x1 / 1x2", "2x1 / 1x1")))
    print()
    print("stage s: cache-teacher's teacher pass (manifest timings); distill's fit (metrics.json).")
    print("wall s: the whole command, process start, model loading and weight hashing included.")
    print("load before: the 1-minute load average as the run started (2 cores: above 2 means waiting).")
    print("2x1 / 1x2, 2x1 / 1x1: examples/s of 2 ranks over that of the 1-rank layout, within each repeat.")
    print(f"repeats: {args.repeats} (figures and ratios are medians over the repeats)")
    print()
    print("commands:")
    for (stage, ranks, threads), cmd in commands.items():
        print(f"  {stage}, {ranks} x {threads}: {cmd}")


if __name__ == "__main__":
    main()

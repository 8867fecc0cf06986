"""`pkdpipe cache verify` against `sha256sum` of the same shards (issue 29, item 4: verify <= 2x).

A cache of `--rows` rows of random vectors is written with pkdpipe's own `ShardWriter` (the shards
cache-teacher writes, `cls_stats` and per-dataset extents included) and a manifest whose key is the
hash of the inputs it records, once per `--shape` (default: 7 layers of 384, MiniLM-L6's, and 13 of
768, BERT-base's; float16, or int8 with `--codec int8`). Random vectors cost verify what a teacher's
do: every check reads and computes over every value whatever they are.

Side by side in one run, per shape, `--rounds` rounds, each alternating which goes first:

- cold: every shard's pages dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`) before each command;
- warm: the shards read once beforehand, so both run from the page cache.

The commands: `sha256sum` of the shards, `verify_cache` in this process (no interpreter start),
and `pkdpipe cache verify` as a user runs it (a subprocess: Python's start and pkdpipe's imports
included; `cache verify --help` is timed too, for that fixed cost). Ratios are verify / sha256sum,
medians over the rounds.

Run from the repository root:  python benchmarks/bench_verify.py [--rows 30000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Stopwatch, command_line, drop_pages, load_avg, log, median, table  # noqa: E402

VOCAB = 30522  # BERT's
PKDPIPE = [
    sys.executable,
    "-c",
    "from pkdpipe_cli.main import run; run()",
]  # `pkdpipe`, as bench_mnli runs it
TASK_SPEC = {"name": "bench", "labels": ["a", "b", "c"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=30000, help="rows per cache")
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        help="LAYERSxHIDDEN, repeatable (default: 7x384 and 13x768)",
    )
    p.add_argument("--shard-size", type=int, default=8192, help="rows per shard (cache-teacher's default)")
    p.add_argument("--codec", default="float16", choices=("float16", "int8"))
    p.add_argument("--rounds", type=int, default=3, help="rounds per temperature, alternating the order")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another checkout of pkdpipe (e.g. `git worktree add ../pkdpipe-main main`) whose verify is "
        "timed in the same rounds: before and after, side by side",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the caches go; kept, and reused when their manifest is there (default: a "
        "temporary folder, removed at the end)",
    )
    return p.parse_args(argv)


# -- the cache -------------------------------------------------------------------------------------------
def build_cache(root: Path, rows: int, layers: int, hidden: int, shard_size: int, codec: str) -> Path:
    """A complete cache of random rows under root/bench/<key>/ (reused when it is already there)."""
    from pkdpipe.cache import extents, schema
    from pkdpipe.cache import manifest as mf
    from pkdpipe.cache.fingerprint import FORMAT_VERSION, sha256_json
    from pkdpipe.cache.writer import ShardWriter

    layout = schema.Layout(
        num_labels=len(TASK_SPEC["labels"]),
        hidden_size=hidden,
        layers=tuple(range(layers)),
        hidden_dtype="int8" if codec == "int8" else "float16",
        regression=False,
        with_token_types=True,
        with_stats=True,
        codec=codec,
    )
    inputs = mf.KeyInputs(
        task=TASK_SPEC,
        teacher_weights=sha256_json({"bench_verify": [layers, hidden]}),
        tokenizer=sha256_json("bench_verify"),
        datasets={"train": sha256_json({"rows": rows, "shard_size": shard_size})},
        max_seq_len=128,
        truncation="longest_first",
        layers=list(layout.layers),
        hidden_dtype=layout.hidden_dtype,
        logits_dtype="float32",
        precision="fp32",
        codec=codec,
    )
    key = inputs.key()
    folder = root / TASK_SPEC["name"] / key
    if (folder / mf.MANIFEST).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    count = -(-rows // shard_size)
    shards = []
    for index in range(count):
        ids = np.arange(index * shard_size, min(rows, (index + 1) * shard_size))
        lengths = np.sort(rng.integers(8, 64, len(ids)))
        path = folder / mf.shard_name("train", index, count)
        writer = ShardWriter(path, ids, lengths, layout)
        for start in range(0, len(ids), 512):
            part = lengths[start : start + 512]
            # a teacher's [CLS]: one outlier dimension, the rest of order 1
            scale = np.ones(hidden, np.float32)
            scale[hidden // 4] = 50
            writer.write(
                [rng.integers(0, VOCAB, n, dtype=np.int32) for n in part],
                [np.zeros(n, np.uint8) for n in part],
                rng.integers(0, len(TASK_SPEC["labels"]), len(part)),
                rng.normal(size=(len(part), len(TASK_SPEC["labels"]))).astype(np.float32),
                {
                    layer: (rng.standard_normal((len(part), hidden), np.float32) * scale).astype(np.float16)
                    for layer in layout.layers
                },
            )
        writer.commit()
        sha, datasets = extents.record(path)
        shards.append(
            {
                "file": path.name,
                "rows": len(ids),
                "sha256": sha,
                "bytes": path.stat().st_size,
                "datasets": datasets,
            }
        )
        log(f"  wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    manifest = {
        "format": mf.FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key": key,
        "task": TASK_SPEC["name"],
        "task_spec": TASK_SPEC,
        "label_names": TASK_SPEC["labels"],
        "num_labels": len(TASK_SPEC["labels"]),
        "teacher": {
            "name_or_path": f"random-{layers - 1}-layer-{hidden}",
            "model_type": "bert",
            "architecture": "BertForSequenceClassification",
            "num_layers": layers - 1,
            "hidden_size": hidden,
            "pretrained_from": None,
            "weights_sha256": inputs.teacher_weights,
        },
        "tokenizer_sha256": inputs.tokenizer,
        "dataset": {"source": "bench_verify (random)", "sha256": inputs.datasets, "train_rows": None},
        "max_seq_len": inputs.max_seq_len,
        "truncation": inputs.truncation,
        "uses_token_type_ids": True,
        "layers": inputs.layers,
        "hidden_dtype": inputs.hidden_dtype,
        "codec": codec,
        "logits_dtype": inputs.logits_dtype,
        "precision": inputs.precision,
        "splits": {"train": {"examples": rows, "shards": shards}},
        "cls_stats": True,
        "vocab_size": VOCAB,
        "teacher_metrics": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "tool_version": "bench_verify",
        "command": command_line(),
        "config": {},
    }
    mf.write(folder, manifest)
    return folder


def git_describe(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "-uno"], capture_output=True, text=True
    )
    return (done.stdout.strip()[:70] or "not a git checkout") + (
        " + uncommitted changes" if dirty.stdout.strip() else ""
    )


# -- timing ----------------------------------------------------------------------------------------------
def warm_pages(paths) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def child_env(tree: Path) -> dict:
    """The environment of a command that runs the pkdpipe of checkout `tree`."""
    paths = [str(tree), str(tree / "cli"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def timed_command(cmd: list[str], tree: Path = REPO) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds: the child's user + system time, its stdout). It runs in `tree`:
    `python -c` puts its working folder first on sys.path, ahead of PYTHONPATH."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # children run one at a time: the delta is its
    with Stopwatch() as t:
        done = subprocess.run(cmd, cwd=tree, env=child_env(tree), capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{shlex.join(cmd)[:200]} failed: {done.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return t.seconds, cpu, done.stdout


# verify_cache timed inside its own process, after the imports: the library call without Python's start
VERIFY_CALL = """
import json, resource, sys, time
from pkdpipe.cache.verify import verify_cache
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
report = verify_cache(sys.argv[1])
wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
print(json.dumps({"wall": wall, "cpu": cpu, "problems": report.problems}))
"""


def verify_call(folder: Path, tree: Path) -> tuple[float, float]:
    out = json.loads(timed_command([sys.executable, "-c", VERIFY_CALL, str(folder)], tree)[2])
    if out["problems"]:
        sys.exit(f"verify_cache of {tree} found problems in the benchmark's cache: {out['problems']}")
    return out["wall"], out["cpu"]


def verify_command(folder: Path, tree: Path) -> tuple[float, float]:
    wall, cpu, _ = timed_command([*PKDPIPE, "cache", "verify", str(folder)], tree)
    return wall, cpu


def measure(folder: Path, shards: list[Path], rounds: int, trees: dict[str, Path]) -> dict:
    """{temperature: {command: [(wall seconds, CPU seconds) per round]}}."""
    runs = {"sha256sum": lambda: timed_command(["sha256sum", *map(str, shards)])[:2]}
    for label, tree in trees.items():
        runs[f"verify_cache{label}"] = lambda tree=tree: verify_call(folder, tree)
        runs[f"pkdpipe cache verify{label}"] = lambda tree=tree: verify_command(folder, tree)
    times: dict = {"cold": {n: [] for n in runs}, "warm": {n: [] for n in runs}}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for temperature in ("cold", "warm"):
            for name in order:
                if temperature == "cold":
                    drop_pages(shards)
                else:
                    warm_pages(shards)
                times[temperature][name].append(runs[name]())
        log(
            f"  round {r + 1}/{rounds} (load {load_avg()}): "
            + "; ".join(
                f"{t} " + ", ".join(f"{n} {v[-1][0]:.2f} s" for n, v in times[t].items()) for t in times
            )
        )
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shape or ["7x384", "13x768"])]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pkdpipe-bench-verify-"))
    results = []
    load_start = load_avg()
    try:
        trees = {"": REPO} if args.compare is None else {" (this tree)": REPO, " (--compare)": args.compare}
        startup = median([timed_command([*PKDPIPE, "cache", "verify", "--help"])[0] for _ in range(3)])
        for layers, hidden in shapes:
            log(f"cache of {args.rows:,} rows, {layers} layers of {hidden} {args.codec}")
            folder = build_cache(work, args.rows, layers, hidden, args.shard_size, args.codec)
            manifest = json.loads((folder / "manifest.json").read_text())
            shards = [folder / s["file"] for s in manifest["splits"]["train"]["shards"]]
            size = sum(p.stat().st_size for p in shards)
            log(f"timing {len(shards)} shards, {size / 1e6:,.0f} MB (load {load_avg()})")
            results.append(((layers, hidden), len(shards), size, measure(folder, shards, args.rounds, trees)))
        load_end = load_avg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("pkdpipe benchmark: cache verify against sha256sum (issue 29, item 4)")
    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}, numpy {np.__version__}; "
        f"load average (1 / 5 / 15 min) {load_start} at the start, {load_end} at the end"
    )
    if args.compare is not None:
        print(f"--compare: {args.compare} ({git_describe(args.compare)}); this tree: {git_describe(REPO)}")
    print(f"starting Python and pkdpipe (`cache verify --help`): {startup:.2f} s (median of 3)")
    print()
    rows = []
    for (layers, hidden), count, size, times in results:
        what = f"{layers}x{hidden} {args.codec}, {count} shards, {size / 1e6:,.0f} MB"
        for temperature, runs in times.items():
            sha = runs["sha256sum"]
            for name, measured in runs.items():
                if name == "sha256sum":
                    continue
                wall = [m[0] / s[0] for m, s in zip(measured, sha)]  # ratios within a round
                cpu = [m[1] / s[1] for m, s in zip(measured, sha)]
                rows.append(
                    (
                        what,
                        temperature,
                        name,
                        f"{median([m[0] for m in measured]):.2f} / {median([s[0] for s in sha]):.2f}",
                        f"**{median(wall):.2f}x**",
                        ", ".join(f"{v:.2f}" for v in wall),
                        f"{median([m[1] for m in measured]):.2f} / {median([s[1] for s in sha]):.2f}",
                        f"{median(cpu):.2f}x",
                    )
                )
    print(
        table(
            rows,
            (
                "cache",
                "pages",
                "verify",
                "wall s: verify / sha256sum",
                "ratio (goal <= 2x)",
                "per round",
                "CPU s: verify / sha256sum",
                "CPU ratio",
            ),
        )
    )
    print()
    print(
        f"{args.rows:,} rows per cache, {args.shard_size:,} per shard; ratios are medians of the "
        "rounds' own ratios (each round runs both side by side); CPU = user + system seconds"
    )


if __name__ == "__main__":
    main()

"""Benchmark of a cache the size of MNLI (issue 29, item 4), end to end, with the real MiniLM teacher.

A task of `--rows` rows (default 392,702, MNLI's train size): SST-2's train phrases repeated, each
copy its own row (a task file's ids are row positions, so every row has a unique id), written as a
CSV behind a task file under `--out`. Then, each stage as a user runs it (`pkdpipe ...` commands in
subprocesses), except cache-teacher and the distill steps, which are timed in this process:

1. `pkdpipe.teacher.cache_teacher` (what `pkdpipe cache-teacher` runs) with the MiniLM teacher and
   an untrained head (the encoder, which is what costs, is the real one), max length 64,
   `--threads`, progress lines on: rows/s and padded tokens/s over the first and the last 10% of the
   rows, and its peak RSS (this process's, which had loaded nothing else yet). It runs in this process
   so that its public `teacher_hook` can time each of the teacher's forwards inside the run: the
   windows come from those batches (the wall time from the end of the batch before a window to the
   end of its last), and so does what judges the goal. cache-teacher sorts rows by length, so the
   first 10% are the shortest rows and the last 10% the longest: raw rows/s fall from start to end
   whatever the scale. What a scale problem would show is the rate falling against what the
   teacher's forward costs on the same batches: the share of each window's wall time spent in the
   teacher's forwards, measured in that window itself. A bare forward timed apart from the build
   cannot tell: on this machine the same forwards over the same batches ran at 901 to 1,284 rows/s
   in three runs a minute apart, while their share stayed within 0.945-0.949. Goal: that share,
   last window against first, within +-10%.
2. `pkdpipe cache verify` against `sha256sum` of the shards, both from cold pages (each shard's
   pages dropped with `posix_fadvise(POSIX_FADV_DONTNEED)` before each run), `--verify-rounds`
   rounds alternating which goes first; medians. Goal: verify <= 2x sha256sum.
3. Through a real S3 API: a moto server started here (as tests/servers.py does; needs s3fs with
   aiobotocore and `moto[server]`). `pkdpipe cache push` and a full `pkdpipe cache pull`, MB/s of the
   whole commands (push includes its local checksums and checks, pull its sha256s and the structure
   check); then a pull SIGKILLed once its staging folder holds half the bytes, resumed by a second
   pull, with the bytes that pull downloaded (its own progress count, and the loopback interface's
   byte counter as an outside check, which counts every process's loopback traffic and the HTTP
   headers too). A layer-selective pull (`cache pull --layers`, PKD-Skip 6->3's layers 2,4) where
   this build has one.
4. Distill steps from the cache when its pages are not in memory: a 3-layer student cut from MiniLM,
   PKD-Skip 6->3, batch `--student-batch`, `--steps` steps streamed by `CacheSource` as distill
   streams them. The reader gathers a window of 50 batches' rows in one `TeacherCache.rows` call; the
   benchmark wraps that method on its own cache object (the library is unchanged) to drop every
   train shard's pages before each window, then time the read itself. The shards' sha256s (checked
   by the reader at first opening, once per run) are checked before the timed steps. Reported: the
   mean step (batch fetch + train step, the page drop left out), the cold window reads, the share of
   the step spent fetching batches, and the same windows read again warm. Goal: cold-read share < 10%.

Progress notes go to stderr, the report (with PASS/FAIL lines) to stdout. Everything is written
under `--out` (removed at the end unless `--keep`).

Run from the repository root:  python benchmarks/bench_mnli.py [--rows 392702] --out bench-out/mnli
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATASETS,
    REPO,
    Stopwatch,
    command_line,
    drop_pages,
    load_avg,
    log,
    machine_lines,
    set_threads,
    table,
)

MNLI_TRAIN_ROWS = 392_702
PKD_SKIP_6_3 = (2, 4)  # the teacher layers a 3-layer PKD-Skip student of the 6-layer MiniLM learns from
MB = 1e6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=MNLI_TRAIN_ROWS, help="rows of the task (MNLI train: 392,702)")
    p.add_argument("--out", type=Path, required=True, help="folder for the task, caches, store and logs")
    p.add_argument("--keep", action="store_true", help="keep --out's contents at the end")
    p.add_argument("--data", type=Path, default=DEFAULT_DATASETS / "sst2", help="SST-2 folder (train.tsv)")
    p.add_argument("--teacher", default=None, help="encoder folder (default: the real MiniLM-L6)")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--teacher-batch", type=int, default=64, help="cache-teacher's --batch-size")
    p.add_argument("--shard-size", type=int, default=8192, help="cache-teacher's --shard-size")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads here and in cache-teacher (0: torch's)"
    )
    p.add_argument("--verify-rounds", type=int, default=2, help="cold verify / sha256sum pairs")
    p.add_argument("--steps", type=int, default=300, help="timed distill steps")
    p.add_argument("--student-batch", type=int, default=32)
    return p.parse_args(argv)


# -- the task -----------------------------------------------------------------------------------------
def write_task(sst2: Path, folder: Path, rows: int) -> Path:
    """SST-2's train phrases repeated to `rows` rows in folder/train.csv (ids: row positions, so
    unique), 64 phrases as dev (so none is carved out of train), and the task file; its path."""
    with open(sst2 / "train.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        text_col, label_col = header.index("sentence"), header.index("label")
        phrases = [(r[text_col], int(r[label_col])) for r in reader]
    names = ("negative", "positive")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for i in range(rows):
            text, label = phrases[i % len(phrases)]
            out.writerow([text, names[label]])
    with open(folder / "dev.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows([text, names[label]] for text, label in phrases[:64])
    spec = {
        "name": f"sst2-rows{rows}",
        "text_fields": ["text"],
        "label_field": "label",
        "labels": list(names),
        "files": {"train": "train.csv", "dev": "dev.csv"},
    }
    path = folder / "task.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


# -- subprocesses ---------------------------------------------------------------------------------------
def pkdpipe_cmd(*args: str) -> list[str]:
    """`pkdpipe ARGS` with this Python and this tree's package (PYTHONPATH set in child_env)."""
    return [sys.executable, "-c", "from pkdpipe_cli.main import run; run()", *args]


def child_env(extra: dict | None = None) -> dict:
    paths = [str(REPO), str(REPO / "cli"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    env.update(extra or {})
    env.pop("PKDPIPE_QUIET", None)
    return env


def run_timed(cmd: list[str], env: dict, log_path: Path) -> dict:
    """Run `cmd` with its output in `log_path`; return seconds, exit status and the child's peak RSS
    (wait4: its own, not this process's)."""
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=logf)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    if proc.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        sys.exit(f"{' '.join(cmd[3:5])} failed (exit {proc.returncode}):\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (every process's; on lo, sent = received)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    return 0


def resident_bytes(paths) -> int | None:
    """Bytes of the files now in the page cache (util-linux fincore), or None without it."""
    if not shutil.which("fincore"):
        return None
    done = subprocess.run(
        ["fincore", "-b", "-n", "-r", "-o", "RES", *map(str, paths)], capture_output=True, text=True
    )
    return sum(int(x) for x in done.stdout.split()) if done.returncode == 0 else None


# -- 1. cache-teacher ------------------------------------------------------------------------------------
def forward_timer() -> tuple:
    """A `teacher_hook` for cache_teacher that times each of the teacher's forwards; returns (hook,
    records), one record per batch: (start, end, rows, padded width)."""
    records: list[tuple[float, float, int, int]] = []

    def hook(model) -> None:
        started = []

        def before(module, args, kwargs):
            started.append(time.perf_counter())

        def after(module, args, kwargs, output):
            rows, width = kwargs["input_ids"].shape
            records.append((started.pop(), time.perf_counter(), int(rows), int(width)))

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)

    return hook, records


def batch_windows(records: list[tuple[float, float, int, int]], share: float = 0.1) -> dict:
    """The first and the last `share` of the rows, as whole batches, from `forward_timer` records: each
    window's rows, wall seconds (from the end of the batch before it, or the first forward's start,
    to the end of its last batch), seconds in the teacher's forwards, rows/s, padded tokens/s and the
    forwards' share of the wall time."""
    rows = np.cumsum([r[2] for r in records])
    total = rows[-1]
    first_end = int(np.searchsorted(rows, share * total)) + 1  # batches up to the one reaching share
    last_start = int(np.searchsorted(rows, (1 - share) * total, side="right"))
    out = {}
    last_start = min(last_start, len(records) - 1)
    for name, lo, hi in (("first", 0, max(first_end, 1)), ("last", last_start, len(records))):
        part = records[lo:hi]
        since = records[lo - 1][1] if lo else part[0][0]
        wall = part[-1][1] - since
        forward = sum(end - start for start, end, _, _ in part)
        n = sum(r[2] for r in part)
        out[name] = {
            "rows": (int(rows[lo - 1]) if lo else 0, int(rows[hi - 1])),
            "batches": len(part),
            "seconds": wall,
            "rows_per_s": n / wall,
            "tokens_per_s": sum(r[2] * r[3] for r in part) / wall,
            "mean_width": sum(r[2] * r[3] for r in part) / n,
            "forward_share": forward / wall,
        }
    return out


def stage_cache_teacher(args, task_file: Path, teacher: str) -> dict:
    import resource

    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    config = CacheConfig(
        task=str(task_file), teacher=teacher, untrained_head=True, splits=("train",),
        cache_dir=args.out / "cache", max_seq_len=args.max_seq_len, batch_size=args.teacher_batch,
        shard_size=args.shard_size, threads=args.threads, device="cpu", force=True,
    )  # fmt: skip
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"cache-teacher over {args.rows:,} rows (load {load_avg()}; this process {before_mb:,.0f} MB so far)")
    hook, records = forward_timer()
    with Stopwatch() as t:
        result = cache_teacher(config, teacher_hook=hook)
    folder = result.path
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [folder / s["file"] for s in manifest["splits"]["train"]["shards"]]
    return {
        "seconds": t.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": before_mb,
        "folder": folder,
        "shards": shards,
        "bytes": sum(p.stat().st_size for p in shards),
        "teacher_pass_s": manifest["timings"]["train_s"],
        "windows": batch_windows(records),
    }


def stage_verify(args, folder: Path, shards: list[Path]) -> dict:
    env = child_env()
    times: dict[str, list[float]] = {"verify": [], "sha256sum": []}
    cmds = {
        "verify": pkdpipe_cmd("cache", "verify", str(folder)),
        "sha256sum": ["sha256sum", *map(str, shards)],
    }
    startup = run_timed(pkdpipe_cmd("cache", "verify", "--help"), env, args.out / "verify-help.log")
    for r in range(args.verify_rounds):
        for name in ("sha256sum", "verify") if r % 2 == 0 else ("verify", "sha256sum"):
            drop_pages(shards)
            times[name].append(run_timed(cmds[name], env, args.out / f"{name}-{r}.log")["seconds"])
    return {name: statistics.median(t) for name, t in times.items()} | {
        "all": times,
        "startup": startup["seconds"],
    }


# -- 3. the S3 store ---------------------------------------------------------------------------------------
def start_moto(out: Path) -> tuple[subprocess.Popen, dict]:
    """moto's S3 server on a free port (its spooled objects under out/moto-tmp), bucket `bench`
    made; (the server, the AWS_* variables that point boto at it)."""
    sys.path.insert(0, str(REPO / "tests"))
    from servers import free_port

    try:
        import moto.server  # noqa: F401
        import s3fs
    except ImportError as err:
        sys.exit(
            f"the S3 stage needs s3fs (with aiobotocore) and moto's server: {err} "
            "(pip install s3fs aiobotocore 'moto[server]')"
        )
    port = free_port()
    tmp = out / "moto-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    aws = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(aws)
    with open(out / "moto.log", "wb") as logf:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(port)],
            stdout=logf,
            stderr=logf,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
            return server, aws
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                sys.exit(f"the moto server did not start: see {out / 'moto.log'}")
            time.sleep(0.3)


PULLED = re.compile(r"pull \w+ \(MiB\): ([\d,.]+)")


def pulled_mib(log_path: Path) -> float:
    """MiB the pull counted as downloaded (its last progress line; 0 when it downloaded nothing)."""
    hits = PULLED.findall(log_path.read_text(errors="replace"))
    return float(hits[-1].replace(",", "")) if hits else 0.0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def stage_store(args, folder: Path, total_bytes: int, manifest: dict) -> dict:
    server, aws = start_moto(args.out)
    env = child_env(aws)
    task, key = manifest["task"], manifest["key"]
    url = f"s3://bench/{task}/{key}"
    out: dict = {}
    try:
        log(f"push to {url} (load {load_avg()})")
        lo0 = loopback_bytes()
        out["push"] = run_timed(
            pkdpipe_cmd("cache", "push", str(folder), "s3://bench"), env, args.out / "push.log"
        )
        out["push"]["loopback"] = loopback_bytes() - lo0

        log("full pull")
        lo0 = loopback_bytes()
        root = args.out / "pull-full"
        out["pull"] = run_timed(
            pkdpipe_cmd("cache", "pull", url, "--cache-dir", str(root)), env, args.out / "pull.log"
        )
        out["pull"]["loopback"] = loopback_bytes() - lo0
        out["pull"]["counted"] = pulled_mib(args.out / "pull.log") * (1 << 20)

        log("pull killed halfway, then resumed")
        root = args.out / "pull-resume"
        staging = root / task / f".{key}.partial"
        with open(args.out / "pull-killed.log", "w") as logf:
            proc = subprocess.Popen(
                pkdpipe_cmd("cache", "pull", url, "--cache-dir", str(root)), env=env, stdout=logf, stderr=logf
            )
            while proc.poll() is None and folder_bytes(staging) < total_bytes / 2:
                time.sleep(0.02)
            killed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        names = {s["file"]: s["bytes"] for s in manifest["splits"]["train"]["shards"]}
        kept = [p for p in staging.glob("*") if p.name in names and p.stat().st_size == names[p.name]]
        out["killed"] = {
            "killed_mid_pull": killed,
            "staged_bytes": folder_bytes(staging),
            "whole_shards": len(kept),
            "whole_shard_bytes": sum(p.stat().st_size for p in kept),
        }
        lo0 = loopback_bytes()
        out["resumed"] = run_timed(
            pkdpipe_cmd("cache", "pull", url, "--cache-dir", str(root)), env, args.out / "pull-resumed.log"
        )
        out["resumed"]["loopback"] = loopback_bytes() - lo0
        out["resumed"]["counted"] = pulled_mib(args.out / "pull-resumed.log") * (1 << 20)
        out["resumed"]["complete"] = (root / task / key / "manifest.json").is_file()

        help_text = subprocess.run(
            pkdpipe_cmd("cache", "pull", "--help"), env=env, capture_output=True, text=True
        ).stdout
        if "--layers" in help_text:
            log("layer-selective pull")
            lo0 = loopback_bytes()
            layers = ",".join(map(str, PKD_SKIP_6_3))
            log_path = args.out / "pull-layers.log"
            cmd = pkdpipe_cmd(
                "cache", "pull", url, "--layers", layers, "--cache-dir", str(args.out / "pull-layers")
            )
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            log_path.write_text(done.stdout + done.stderr)
            out["layers"] = {
                "layers": layers,
                "ok": done.returncode == 0,
                "counted": pulled_mib(log_path) * (1 << 20),
                "loopback": loopback_bytes() - lo0,
                "error": (done.stderr.strip().splitlines() or [""])[-1],
            }
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


# -- 4. distill steps from cold pages -----------------------------------------------------------------------
def stage_distill(args, folder: Path, shards: list[Path], teacher: str) -> dict:
    import torch

    from pkdpipe import strategies
    from pkdpipe.cache.reader import TeacherCache
    from pkdpipe.config import DistillConfig
    from pkdpipe.loop import OptimizerStep, make_optimizer, make_scheduler
    from pkdpipe.models import label_config, load_classifier, load_tokenizer
    from pkdpipe.sources import CacheSource
    from pkdpipe.strategies import StepSpec
    from pkdpipe.text import pad_id_of
    from pkdpipe.train import resolve_lr, task_of

    cache = TeacherCache(folder)
    with Stopwatch() as first_open:  # each shard's sha256, as the reader checks it at first opening
        for s in cache.manifest.splits["train"].shards:
            cache.shard(s.file)
    config = DistillConfig(
        cache=str(folder), strategy="skip", layers=3, batch_size=args.student_batch, device="cpu", quiet=True
    )
    config, _ = resolve_lr(config, 3, cache.hidden_size)  # --lr auto, as distill resolves it
    teacher_map, student_layers = list(PKD_SKIP_6_3), [1, 2]
    source = CacheSource(
        cache, "train", teacher_map, args.student_batch, config.seed, pad_id_of(load_tokenizer(teacher))
    )
    torch.manual_seed(config.seed)
    labels = task_of(cache).labels
    model = load_classifier(teacher, fresh_head=True, num_hidden_layers=3, **label_config(labels)).train()
    optimizer = make_optimizer(model, config)
    apply = OptimizerStep(
        model,
        optimizer,
        make_scheduler(optimizer, args.steps + 3, config.warmup),
        max_grad_norm=config.max_grad_norm,
    )
    step_fn = strategies.get("skip").make_step(StepSpec(config, False, teacher_map, student_layers))

    def train_step(batch) -> None:
        apply(step_fn(model, batch)["loss"])

    warm = next(source.epoch(99, 0))  # untimed: the first steps allocate
    for _ in range(3):
        train_step(warm)

    reads: list[float] = []
    drops: list[float] = []
    wanted_rows: list[np.ndarray] = []
    residents: list[int | None] = []
    original = cache.rows

    def cold_rows(split, rows, layers=()):  # the reader's one read per window, after a page drop
        with Stopwatch() as t_drop:
            drop_pages(shards)
            if not residents:  # once: did the drop work?
                residents.append(resident_bytes(shards))
        drops.append(t_drop.seconds)
        wanted_rows.append(rows)
        with Stopwatch() as t:
            data = original(split, rows, layers)
        reads.append(t.seconds)
        return data

    cache.rows = cold_rows  # this object only; the library's reader is unchanged
    fetch, step = [], []

    def batches():
        epoch = 0
        while True:
            yield from source.epoch(epoch, 0)
            epoch += 1

    stream = batches()
    for _ in range(args.steps):
        dropped = len(drops)
        with Stopwatch() as t_fetch:
            batch = next(stream)
        with Stopwatch() as t_step:
            train_step(batch)
        fetch.append(t_fetch.seconds - sum(drops[dropped:]))  # the page drop is the benchmark's, not a read
        step.append(t_step.seconds)
    cache.rows = original
    warm_reads = []
    for rows in wanted_rows:  # the same windows again, their pages now in memory
        with Stopwatch() as t:
            original("train", rows, teacher_map)
        warm_reads.append(t.seconds)
    cache.close()
    total = sum(fetch) + sum(step)
    return {
        "first_open_s": first_open.seconds,
        "steps": args.steps,
        "windows": len(reads),
        "resident_after_drop": residents[0] if residents else None,
        "shard_bytes": sum(p.stat().st_size for p in shards),
        "step_ms": 1000 * total / args.steps,
        "median_step_ms": 1000 * statistics.median(f + s for f, s in zip(fetch, step)),
        "fetch_ms": 1000 * sum(fetch) / args.steps,
        "cold_window_ms": 1000 * statistics.mean(reads),
        "warm_window_ms": 1000 * statistics.mean(warm_reads),
        "fetch_share": sum(fetch) / total,
        "read_share": sum(reads) / total,
    }


# -- the report ----------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, teacher: str, ct: dict, ver: dict, store: dict, dist: dict, machine: list[str]) -> str:
    gb = ct["bytes"] / 1e9
    lines = [
        f"# bench_mnli: a cache of {args.rows:,} rows (issue 29, item 4)",
        "",
        f"command: {command_line()}",
        *machine,
        f"load average at end: {load_avg()}",
        f"teacher: {teacher} + an untrained 2-label head; max length {args.max_seq_len}; "
        f"teacher batch {args.teacher_batch}; shard size {args.shard_size}",
        f"task: SST-2 train phrases repeated to {args.rows:,} rows (unique ids), under {args.out}",
        "",
        "## 1. cache-teacher",
        "",
    ]
    w = ct["windows"]
    rows = []
    for name in ("first", "last"):
        lo, hi = w[name]["rows"]
        window = w[name]
        rows.append((
            f"{name} 10% (rows {lo:,}-{hi:,}, {window['batches']} batches)", f"{window['rows_per_s']:,.1f}",
            f"{window['tokens_per_s']:,.0f}", f"{window['mean_width']:.1f}", f"{window['forward_share']:.3f}",
        ))  # fmt: skip
    lines.append(table(rows, ("window", "rows/s", "padded tokens/s", "mean width", "share in the forwards")))
    flat = w["last"]["forward_share"] / w["first"]["forward_share"]
    raw = w["last"]["rows_per_s"] / w["first"]["rows_per_s"]
    lines += [
        "",
        f"cache_teacher, whole call: {ct['seconds']:.1f} s ({args.rows / ct['seconds']:,.1f} rows/s); "
        f"teacher pass {ct['teacher_pass_s']:.1f} s ({args.rows / ct['teacher_pass_s']:,.1f} rows/s); "
        f"peak RSS {ct['peak_rss_mb']:,.0f} MB (this process, {ct['rss_before_mb']:,.0f} MB before the call)",
        f"cache: {ct['bytes']:,} bytes ({gb:.2f} GB) in {len(ct['shards'])} shards, "
        f"{ct['bytes'] / args.rows:,.0f} B per row",
        f"raw rows/s, last 10% / first 10%: {raw:.3f} (rows are length-sorted: the last are the longest)",
        "",
        "## 2. verify",
        "",
        f"cold pages, median of {args.verify_rounds}: cache verify {ver['verify']:.2f} s, sha256sum "
        f"{ver['sha256sum']:.2f} s, ratio {ver['verify'] / ver['sha256sum']:.2f}x "
        f"(all: verify {', '.join(f'{t:.2f}' for t in ver['all']['verify'])}; "
        f"sha256sum {', '.join(f'{t:.2f}' for t in ver['all']['sha256sum'])}); "
        f"starting Python and pkdpipe (`cache verify --help`) takes {ver['startup']:.2f} s of that",
        "",
        "## 3. S3 store (moto server)",
        "",
    ]
    push, pull, killed, resumed = store["push"], store["pull"], store["killed"], store["resumed"]
    lines += [
        f"push: {push['seconds']:.2f} s, {ct['bytes'] / MB / push['seconds']:.1f} MB/s (whole command, local "
        f"checksums and checks included; loopback {push['loopback'] / MB:,.1f} MB)",
        f"full pull: {pull['seconds']:.2f} s, {ct['bytes'] / MB / pull['seconds']:.1f} MB/s (whole command); "
        f"downloaded {pull['counted'] / MB:,.1f} MB by its count, loopback {pull['loopback'] / MB:,.1f} MB",
        f"pull SIGKILLed at {killed['staged_bytes'] / MB:,.1f} MB staged"
        f"{'' if killed['killed_mid_pull'] else ' (it had finished: too small a cache to kill halfway)'}"
        f": {killed['whole_shards']} whole shard(s), {killed['whole_shard_bytes'] / MB:,.1f} MB",
        f"resumed pull: {resumed['seconds']:.2f} s, downloaded {resumed['counted'] / MB:,.1f} MB "
        "by its count "
        f"(loopback {resumed['loopback'] / MB:,.1f} MB), of {ct['bytes'] / MB:,.1f} MB; expected "
        f"{(ct['bytes'] - killed['whole_shard_bytes']) / MB:,.1f} MB (the shards not whole at the kill); "
        f"complete: {resumed['complete']}",
    ]
    if "layers" in store:
        lay = store["layers"]
        lines.append(
            f"layer-selective pull (--layers {lay['layers']}): "
            + (
                f"downloaded {lay['counted'] / MB:,.1f} MB by its count "
                f"(loopback {lay['loopback'] / MB:,.1f} MB), "
                f"{lay['counted'] / max(pull['counted'], 1):.3f} of the full pull"
                if lay["ok"]
                else f"failed: {lay['error']}"
            )
        )
    else:
        lines.append("layer-selective pull: not measured: no --layers pull in this build")
    resident = dist["resident_after_drop"]
    lines += [
        "",
        "## 4. distill steps, shards' pages dropped before every window",
        "",
        f"PKD-Skip 6->3 (teacher layers 2, 4), batch {args.student_batch}, {dist['steps']} steps, "
        f"{dist['windows']} windows of 50 batches; shards' sha256 at first opening "
        f"{dist['first_open_s']:.1f} s "
        f"(once per run, before the timed steps); resident after the first drop: "
        + (
            f"{resident:,} of {dist['shard_bytes']:,} bytes"
            if resident is not None
            else "unknown (no fincore)"
        ),
        f"step (fetch + train): mean {dist['step_ms']:.1f} ms, median {dist['median_step_ms']:.1f} ms; "
        f"batch fetch mean {dist['fetch_ms']:.2f} ms",
        f"window read: cold {dist['cold_window_ms']:.1f} ms, "
        f"the same windows warm {dist['warm_window_ms']:.1f} ms",
        f"share of the step: cold window reads {100 * dist['read_share']:.2f}%, all batch fetching "
        f"{100 * dist['fetch_share']:.2f}%",
        "",
        "## goals",
        "",
        f"{verdict(abs(flat - 1) <= 0.10)}: cache-teacher rate flat from first to last 10% (+-10%), "
        f"against its own forwards (their share of the window): {w['last']['forward_share']:.3f} / "
        f"{w['first']['forward_share']:.3f} = {flat:.3f}",
        f"{verdict(ver['verify'] <= 2 * ver['sha256sum'])}: cache verify <= 2x sha256sum: "
        f"{ver['verify'] / ver['sha256sum']:.2f}x",
        f"{verdict(dist['fetch_share'] < 0.10)}: cold-read share of a distill step < 10%: "
        f"{100 * dist['fetch_share']:.2f}% (all batch fetching)",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    set_threads(args.threads)
    machine = machine_lines()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty: give a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher is None:
        from pkdpipe.demo import default_model

        args.teacher = str(default_model())
    try:
        log(f"writing the task: {args.rows:,} rows")
        task_file = write_task(args.data, args.out / "data", args.rows)
        ct = stage_cache_teacher(args, task_file, args.teacher)
        log(f"verify against sha256sum (load {load_avg()})")
        ver = stage_verify(args, ct["folder"], ct["shards"])
        manifest = json.loads((ct["folder"] / "manifest.json").read_text())
        store = stage_store(args, ct["folder"], ct["bytes"], manifest)
        log(f"distill steps from cold pages (load {load_avg()})")
        dist = stage_distill(args, ct["folder"], ct["shards"], args.teacher)
        print(report(args, args.teacher, ct, ver, store, dist, machine), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark of stage two, `distill` (issue 3): the real MiniLM teacher (6 layers) and a 3-layer student.

Side by side in one run, on the same batches (batch 32 from a real cache of BANKING77 train, or SST-2):

1. Step time (forward + backward + clip + optimizer and scheduler step, as in `pkdpipe.train.fit`) of
   - cached PKD: the batch streamed by `CacheSource` from the cache (the read is timed and counted in
     the step), PKD-Skip 6->3 loss (student layers 1,2 <- teacher layers 2,4), as `distill` computes it;
   - plain fine-tuning of the same student (CE on the gold labels only, as `distill --strategy ft`),
     on the same batch, already in memory (no read time: a strict baseline);
   - online PKD: the teacher's forward on the same batch every step (inference_mode,
     output_hidden_states=True), then the same student step as cached PKD.
   Three students start from the same weights (the first 3 layers of MiniLM, a fresh seeded head),
   each with its own optimizer. Each round reads one batch, then runs the three variants in an order
   that rotates every round; the ratios are taken per round and the median is reported, with the
   ratio of the summed times (which also carries the cache reads: the reader gathers the rows of 50
   batches at once, so the median round does not read) and the mean read time's share of the mean
   cached step. Goals: cached PKD / fine-tuning <= 1.10x; online PKD / cached PKD >= 1.4x; the read
   share under 10%. The optimizer step alone is timed as well, with pkdpipe's optimizer (fused AdamW
   where the device has the kernel) against torch's default AdamW on the same gradients.
2. Peak RSS (`ru_maxrss`) at the end of a real `pkdpipe.train.distill` run (PKD-Skip, --rss-steps
   optimizer steps), each in a fresh subprocess, on the cache and on caches 8x and 64x as large
   (`--scale 8,64`). Goal (issue 29): the growth from 1x to 64x stays within +50 MB (distill streams
   windows of rows; it must not load the cache, nor keep a shard open or a token per row).
   The larger caches (`--scale-via copy`, the default) are written directly with pkdpipe's
   ShardWriter: the 1x rows repeated N times under new example ids, sorted by (length, id) and cut
   into shards the way cache-teacher does, with a manifest carrying real checksums (64x BANKING77:
   576k rows, 71 shards, 3.2 GB; one already in --workdir is reused, its key names its source
   and factor). `--scale-via teacher` instead writes the training rows N times into a CSV behind a
   task file and runs cache_teacher on it (honest to the last byte, but it runs the teacher over N
   times the data: several minutes on 2 cores at 8x, hours at 64x).
   The peak also follows the widest batch a run trains on, whatever the cache: on this 3-layer
   student, measured here, a batch of 32 padded to 56 tokens peaks about 250 MB above one padded to
   9. So the two runs must meet the same widest batch. The RSS caches are built at max_seq_len 64
   (`--rss-max-seq-len`, the demo's; 0 = the step-time cache at 128): 31 of BANKING77's 8,998 train
   rows reach 64 tokens, so a uniform shuffle puts one of them into the first 50 batches of both
   runs with probability 0.996, and both peak at a 64-wide batch. The widest and mean batch width
   of each run are printed (recorded by wrapping CacheSource.epoch in the child; nothing else
   changes): compare the peaks only where the widest batches match.

Run from the repository root:  python benchmarks/bench_distill.py [--task banking77|sst2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATASETS,
    Stopwatch,
    command_line,
    load_avg,
    log,
    machine_lines,
    make_teacher,
    median,
    minilm_path,
    set_threads,
    table,
    write_sst2_slice,
)

STRATEGY = "skip"  # PKD-Skip 6->3: student layers 1, 2 learn from teacher layers 2, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("banking77", "sst2"), default="banking77")
    p.add_argument(
        "--data", type=Path, default=None, help="dataset folder (default: $PKDPIPE_DATASETS/<task>)"
    )
    p.add_argument("--rows", type=int, default=8192, help="sst2 only: the first N train rows (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="timed rounds (one step of each variant per round)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed rounds first")
    p.add_argument(
        "--scale",
        type=_factors,
        default="8,64",
        help="how much larger the other caches of the RSS test are, comma-separated (e.g. 8 or 8,64)",
    )
    p.add_argument(
        "--scale-via",
        choices=("copy", "teacher"),
        default="copy",
        help="build the large cache by copying rows into new shards, or by running cache_teacher",
    )
    p.add_argument("--rss-steps", type=int, default=50, help="max_steps of each distill run in the RSS test")
    p.add_argument(
        "--rss-max-seq-len",
        type=int,
        default=64,
        help="max_seq_len of the RSS caches (64: the demo's, real lengths); 0 = the step-time cache (128)",
    )
    p.add_argument("--rss-repeats", type=int, default=1, help="1x/8x distill pairs (alternating order)")
    p.add_argument("--skip-steps", action="store_true", help="skip the step-time comparison")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS comparison")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument(
        "--teacher",
        default=None,
        help="a pre-trained encoder folder to take as the teacher (a random head is added) and to cut "
        "the student from; default: the 6-layer MiniLM. e.g. the 12-layer all-mpnet-base-v2 "
        "(docs/results.md: how to assemble it from PyPI parts)",
    )
    p.add_argument("--layers", type=int, default=3, help="student depth K")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the teacher, data and caches go (default: a temporary folder, removed at the end)",
    )
    p.add_argument(
        "--rss-child", type=Path, default=None, help=argparse.SUPPRESS
    )  # internal: one distill run
    p.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _factors(text: str) -> list[int]:
    """`--scale`: "8,64" -> [8, 64]; each factor above 1."""
    try:
        factors = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not factors or factors[0] < 2:
        raise argparse.ArgumentTypeError(f"each scale must be 2 or more: {text!r}")
    return factors


# -- one distill run in a fresh process (the RSS test) -----------------------------------------------
def rss_child(args) -> None:
    set_threads(args.threads)
    from pkdpipe import train
    from pkdpipe.config import DistillConfig

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_before = vm_hwm_kib()
    config = DistillConfig(
        cache=str(args.rss_child),
        strategy=STRATEGY,
        layers=args.layers,
        student_init=args.teacher or minilm_path(),
        batch_size=args.batch_size,
        max_steps=args.rss_steps,
        output=args.output,
        device="cpu",
        resume=False,
        checkpoint_every=0,
        quiet=True,
    )
    widths = []

    class Recording:  # observes the batches distill trains on, changes nothing
        def __init__(self, source):
            self.source = source

        def steps_per_epoch(self):
            return self.source.steps_per_epoch()

        def epoch(self, epoch, skip):
            for batch in self.source.epoch(epoch, skip):
                widths.append(batch["input_ids"].shape[1])
                yield batch

    with Stopwatch() as t:
        result = train.distill(config, source_hook=Recording)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "peak_rss_mb": peak / 1024,
                "peak_before_distill_mb": before / 1024,
                "vm_hwm_mb": vm_hwm_kib() / 1024,
                "vm_hwm_before_mb": hwm_before / 1024,
                "steps": result.steps,
                "seconds": t.seconds,
                "widest_batch": max(widths),
                "mean_width": sum(widths) / len(widths),
            }
        )
    )


def vm_hwm_kib() -> float:
    """This process image's peak RSS from /proc (NaN where there is no /proc)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((float(line.split()[1]) for line in lines if line.startswith("VmHWM:")), float("nan"))


def run_rss_child(cache: Path, output: Path, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        str(cache),
        "--output",
        str(output),
        "--rss-steps",
        str(args.rss_steps),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--layers",
        str(args.layers),
        *(["--teacher", args.teacher] if args.teacher else []),
    ]
    # Linux carries a process's peak RSS over fork and exec: a child forked straight from this
    # (large) process would report our peak as its ru_maxrss. A small shell in between forks the
    # child from itself (not its last command, so it cannot exec it in place), so the figure is the
    # child's own.
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"distill subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- data and caches ----------------------------------------------------------------------------------
def prepare_data(args, work: Path) -> tuple[str, Path]:
    """(task name, data dir) for cache_teacher."""
    data = args.data or DEFAULT_DATASETS / args.task
    if args.task == "sst2":
        if not (data / "train.tsv").is_file():
            sys.exit(f"no SST-2 train.tsv in {data}: pass --data")
        sliced = work / "sst2"
        write_sst2_slice(data, sliced, args.rows)
        return "sst2", sliced
    if not (data / "train.csv").is_file():
        sys.exit(f"no BANKING77 train.csv in {data}: pass --data")
    return "banking77", data


def build_cache(task: str, data_dir: Path | None, teacher: Path, cache_dir: Path, max_seq_len: int = 128):
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    config = CacheConfig(
        task=task,
        data_dir=data_dir,
        teacher=str(teacher),
        splits=("train",),
        cache_dir=cache_dir,
        max_seq_len=max_seq_len,
        device="cpu",
        quiet=True,
        command="bench_distill",
    )
    return cache_teacher(config).path


def scale_by_copy(source: Path, cache_root: Path, factor: int) -> Path:
    """A cache `factor` times as large as `source`: its train rows repeated under new ids, in new shards."""
    from pkdpipe.cache import manifest as mf
    from pkdpipe.cache import schema
    from pkdpipe.cache.builder import shard_entry
    from pkdpipe.cache.fingerprint import sha256_json
    from pkdpipe.cache.local import cache_folder
    from pkdpipe.cache.reader import TeacherCache
    from pkdpipe.cache.writer import ShardWriter
    from pkdpipe.text import length_sorted_order

    with TeacherCache(source) as cache:
        layout = schema.Layout.of(cache.manifest)
        manifest = json.loads(json.dumps(cache.manifest.raw))
        layers = cache.layers
        data = cache.read("train", layers)
    n = len(data["example_id"])
    stride = int(data["example_id"].max()) + 1
    base = np.tile(np.arange(n), factor)  # the source row of each new row
    ids = np.concatenate([data["example_id"] + k * stride for k in range(factor)])
    lengths = np.array([len(x) for x in data["input_ids"]])[base]
    order = length_sorted_order(lengths, ids)
    # another train split: its own dataset fingerprint, so the key (the hash of the inputs) is its own
    manifest["dataset"]["sha256"]["train"] = sha256_json({"scaled_from": manifest["key"], "factor": factor})
    scaled = mf.parse(manifest, "scaled")
    key = mf.KeyInputs.of(scaled).key()
    folder = cache_folder(cache_root, scaled.task, key)
    if (folder / "manifest.json").is_file():  # complete, and its key names its source and factor
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shard_size = manifest["config"]["shard_size"]
    count = -(-len(order) // shard_size)
    types = data["token_type_ids"]
    shards = []
    for index in range(count):
        rows = order[index * shard_size : (index + 1) * shard_size]
        path = folder / mf.shard_name("train", index, count)
        writer = ShardWriter(path, ids[rows], lengths[rows], layout)
        for start in range(0, len(rows), 256):
            src = base[rows[start : start + 256]]
            writer.write(
                [data["input_ids"][i] for i in src],
                [types[i] for i in src] if types is not None else None,
                data["labels"][src],
                data["logits"][src],
                {layer: data["hidden"][src, j] for j, layer in enumerate(layers)},
            )
        writer.commit()
        shards.append(shard_entry(path, int(len(rows))))
    scaled = dataclasses.replace(
        scaled,
        key=key,
        splits={"train": mf.Split(int(len(order)), tuple(shards))},
        command=f"bench_distill.py: the train rows of cache {manifest['key']} repeated {factor}x",
    )
    mf.write(folder, scaled)
    return folder


def scale_by_teacher(
    task_name: str, data_dir: Path, teacher: Path, work: Path, cache_root: Path, factor: int, max_seq_len: int
) -> Path:
    """The training rows written `factor` times into a CSV behind a task file, cached by cache_teacher."""
    import csv

    from pkdpipe.data import load_split
    from pkdpipe.tasks import get_task

    task = get_task(task_name)
    train = load_split(task, "train", data_dir)
    folder = work / f"{task.name}-x{factor}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for _ in range(factor):
            out.writerows((text, task.labels[label]) for text, label in zip(train.text_a, train.labels))
    # a dev file, so that none is carved out of train (only train is cached)
    with open(folder / "dev.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows((text, task.labels[label]) for text, label in zip(train.text_a[:64], train.labels[:64]))
    spec = {
        "name": f"{task.name}-x{factor}",
        "text_fields": ["text"],
        "label_field": "label",
        "labels": list(task.labels),
        "files": {"train": "train.csv", "dev": "dev.csv"},
    }
    (folder / "task.json").write_text(json.dumps(spec))
    return build_cache(str(folder / "task.json"), None, teacher, cache_root, max_seq_len)


def rss_caches(args, task_name: str, data_dir, teacher: Path, work: Path, cache_1x) -> dict[str, Path]:
    """{"1x": the RSS test's cache, "8x": one 8 times as large, ...} for each `--scale` factor."""
    rss_len = args.rss_max_seq_len
    folders = {"1x": cache_1x}
    if rss_len:
        log(f"building the RSS cache with max_seq_len {rss_len} (load {load_avg()})")
        folders["1x"] = build_cache(task_name, data_dir, teacher, work / "cache-rss", rss_len)
    for factor in args.scale:
        log(f"building the {factor}x cache ({args.scale_via}) (load {load_avg()})")
        with Stopwatch() as t:
            if args.scale_via == "copy":
                folder = scale_by_copy(folders["1x"], work / "cache-rss", factor)
            else:
                folder = scale_by_teacher(
                    task_name, data_dir, teacher, work, work / "cache-rss", factor, rss_len or 128
                )
        log(f"  built in {t.seconds:.1f} s: {folder}")
        folders[f"{factor}x"] = folder
    return folders


# -- step times ---------------------------------------------------------------------------------------
def step_benchmark(args, cache_path: Path, teacher_dir: Path) -> dict:
    import torch

    from pkdpipe import strategies
    from pkdpipe.cache.reader import open_cache
    from pkdpipe.config import DistillConfig
    from pkdpipe.loop import OptimizerStep, make_optimizer, make_scheduler
    from pkdpipe.models import cls_vectors, label_config, load_classifier, load_tokenizer
    from pkdpipe.sources import CacheSource
    from pkdpipe.strategies import StepSpec, layer_map, model_inputs
    from pkdpipe.text import pad_id_of
    from pkdpipe.train import resolve_lr, task_of

    cache = open_cache(cache_path)
    task = task_of(cache)
    config = DistillConfig(
        cache=str(cache_path),
        strategy=STRATEGY,
        layers=args.layers,
        batch_size=args.batch_size,
        device="cpu",
        quiet=True,
    )
    teacher_map = layer_map(STRATEGY, cache.teacher_layers, args.layers)
    student_layers = list(range(1, args.layers))
    pad_id = pad_id_of(load_tokenizer(str(teacher_dir)))
    source = CacheSource(cache, "train", teacher_map, args.batch_size, config.seed, pad_id)
    teacher = load_classifier(str(teacher_dir)).eval()
    config, _ = resolve_lr(config, args.layers, teacher.config.hidden_size)  # `--lr auto`, as distill does
    rounds = args.warmup_steps + args.steps

    def students():
        torch.manual_seed(config.seed)
        model = load_classifier(
            args.teacher or minilm_path(),
            fresh_head=True,
            num_hidden_layers=args.layers,
            **label_config(task.labels),
        )
        model.train()
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, rounds, config.warmup)
        return model, OptimizerStep(model, optimizer, scheduler, max_grad_norm=config.max_grad_norm)

    # distill's own steps, built as distill builds them
    pkd_step = strategies.get(STRATEGY).make_step(
        StepSpec(config, task.is_regression, teacher_map, student_layers)
    )
    ft_step = strategies.get("ft").make_step(StepSpec(config, task.is_regression, [], []))

    def train_step(state, step_fn, batch) -> None:  # the body of fit's loop
        model, apply = state
        batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
        terms = step_fn(model, batch)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        apply(loss)
        {k: float(v.detach()) for k, v in terms.items()}

    cached_state, ft_state, online_state = students(), students(), students()

    def batches():
        epoch = 0
        while True:
            yield from source.epoch(epoch, 0)
            epoch += 1

    def cached(batch, plain, read_s) -> dict:
        with Stopwatch() as t:
            train_step(cached_state, pkd_step, batch)
        return {"cached": read_s + t.seconds}

    def ft(batch, plain, read_s) -> dict:
        with Stopwatch() as t:
            train_step(ft_state, ft_step, plain)
        return {"ft": t.seconds}

    def online(batch, plain, read_s) -> dict:
        with Stopwatch() as t:
            with Stopwatch() as tf, torch.inference_mode():
                out = teacher(**model_inputs(plain), output_hidden_states=True)
            targets = {
                "teacher_logits": out.logits,
                "teacher_cls": cls_vectors(out.hidden_states, teacher_map),
            }
            train_step(online_state, pkd_step, {**plain, **targets})
        return {"online": t.seconds, "teacher": tf.seconds}

    stream = batches()
    times = {"read": [], "cached": [], "ft": [], "online": [], "teacher": []}
    widths = []
    variants = [cached, ft, online]
    for r in range(rounds):
        with Stopwatch() as read:
            batch = next(stream)
        plain = {
            k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in batch
        }
        took = {"read": read.seconds}
        for fn in variants[r % 3 :] + variants[: r % 3]:  # the order rotates every round
            took.update(fn(batch, plain, read.seconds))
        if r >= args.warmup_steps:
            for k, v in took.items():
                times[k].append(v)
            widths.append(batch["input_ids"].shape[1])
        if r == args.warmup_steps - 1:
            log(f"  warm-up done (load {load_avg()})")
    optimizer = optimizer_times(cached_state[0], config, make_optimizer, rounds=args.steps)
    cache.close()
    return {
        "teacher_name": Path(args.teacher).name if args.teacher else "all-MiniLM-L6-v2",
        "teacher_depth": cache.teacher_layers,
        "teacher_map": teacher_map,
        "student_layers": student_layers,
        **{k: np.array(v) for k, v in times.items()},
        **{f"adamw_{k}": np.array(v) for k, v in optimizer.items()},
        "mean_width": float(np.mean(widths)),
        "examples": cache.num_examples("train"),
    }


def optimizer_times(model, config, make_optimizer, rounds: int) -> dict[str, list[float]]:
    """Seconds of one optimizer step: pkdpipe's (fused AdamW where the device has it) and torch's
    default AdamW with the same groups, on two copies of the student with the same gradients,
    alternating which goes first."""
    import copy

    import torch

    pkdpipe_model, default_model = copy.deepcopy(model), copy.deepcopy(model)
    for a, b in zip(pkdpipe_model.parameters(), default_model.parameters()):
        a.grad = torch.randn_like(a) * 1e-3
        b.grad = a.grad.clone()
    ours = make_optimizer(pkdpipe_model, config)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in make_optimizer(default_model, config).param_groups
    ]
    variants = [("pkdpipe", ours), ("default", torch.optim.AdamW(groups, lr=config.lr))]
    times = {"pkdpipe": [], "default": [], "fused": bool(ours.defaults.get("fused"))}
    for r in range(rounds):
        for name, optimizer in variants if r % 2 == 0 else variants[::-1]:
            with Stopwatch() as t:
                optimizer.step()
            times[name].append(t.seconds)
    return times


# -- main ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.rss_child:
        rss_child(args)
        return
    set_threads(args.threads)
    from pkdpipe.tasks import get_task

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pkdpipe-bench-distill-"))
    try:
        task_name, data_dir = prepare_data(args, work)
        task = get_task(task_name)
        name = Path(args.teacher).name if args.teacher else "MiniLM"
        log(f"preparing the teacher ({name} + a random {task.num_labels}-label head), cache of {task_name}")
        teacher = make_teacher(work / "teacher", num_labels=task.num_labels, base=args.teacher)
        cache_1x = None
        if not args.skip_steps or not args.rss_max_seq_len:
            with Stopwatch() as t:
                cache_1x = build_cache(task_name, data_dir, teacher, work / "cache")
            log(f"  cache built in {t.seconds:.1f} s: {cache_1x}")
        load_start = load_avg()

        steps = None
        if not args.skip_steps:
            log(f"step times: {args.warmup_steps} + {args.steps} rounds (load {load_avg()})")
            steps = step_benchmark(args, cache_1x, teacher)

        rss = sizes = None
        if not args.skip_rss:
            folders = rss_caches(args, task_name, data_dir, teacher, work, cache_1x)
            rss = {name: [] for name in folders}
            for r in range(args.rss_repeats):
                order = list(folders.items())
                for name, folder in order if r % 2 == 0 else order[::-1]:
                    log(f"  distill {args.rss_steps} steps, {name} cache, fresh process (load {load_avg()})")
                    rss[name].append(run_rss_child(folder, work / f"student-{name}-{r}", args))
            sizes = {name: cache_size(folder) for name, folder in folders.items()}
            sizes["max_seq_len"] = args.rss_max_seq_len or 128
        load_end = load_avg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("pkdpipe benchmark: distill (issue 3)")
    print(f"command: {command_line()}")
    for line in machine_lines():
        print(line)
    source = args.data or DEFAULT_DATASETS / args.task
    if task_name == "banking77":
        what = f"BANKING77 train ({source}/train.csv less the carved-out dev)"
    else:
        what = f"SST-2 train ({source}), " + (f"the first {args.rows:,} rows" if args.rows else "all rows")
    print(f"data: {what}")
    if steps is not None:
        print(
            f"teacher: {steps['teacher_name']} ({steps['teacher_depth']} layers) + random "
            f"{task.num_labels}-label head; student: its first {args.layers} layers + a fresh head; "
            f"PKD-Skip {steps['teacher_depth']}->{args.layers} (student layers {steps['student_layers']} <- "
            f"teacher layers {steps['teacher_map']}); batch {args.batch_size}"
        )
    print(f"load average: {load_start} before the measurements, {load_end} at the end")
    print()
    rows = []
    if steps is not None:
        rows += step_rows(steps)
    if rss is not None:
        rows += rss_rows(rss, sizes, args)
    print(table(rows, ("measure", "value", "goal", "detail")))
    if steps is not None:
        print()
        print(
            f"{args.steps} timed rounds after {args.warmup_steps} warm-up rounds, over a cache of "
            f"{steps['examples']:,} examples; mean padded width {steps['mean_width']:.1f} tokens; "
            "ratios are per round (same batch), then the median"
        )
    print(f"load average at the end: {load_avg()}")


def cache_size(folder: Path) -> tuple[int, int]:
    """(examples, bytes on disk) of a cache's train split, from its manifest."""
    train = json.loads((folder / "manifest.json").read_text())["splits"]["train"]
    return train["examples"], sum(s["bytes"] for s in train["shards"])


def step_rows(s: dict) -> list[tuple[str, ...]]:
    c_over_f = s["cached"] / s["ft"]
    o_over_c = s["online"] / s["cached"]
    ceiling = (s["cached"] + s["teacher"]) / s["cached"]  # what skipping the teacher can save at most

    def ms(key, digits=0):
        return f"{median(s[key]) * 1e3:.{digits}f}"

    def spread(x, num, den):
        return (
            f"per-round p25-p75 {np.percentile(x, 25):.3f}-{np.percentile(x, 75):.3f}; "
            f"ratio of the summed times {s[num].sum() / s[den].sum():.3f}x"
        )

    return [
        ("plain fine-tuning step, CE only (ms)", ms("ft"), "", "batch already in memory"),
        (
            "cached PKD step (ms)",
            ms("cached"),
            "",
            f"incl. reading the batch via CacheSource: median {ms('read', 2)} ms, "
            f"mean {s['read'].mean() * 1e3:.2f} ms (the rows of 50 batches are read at once)",
        ),
        ("online PKD step (ms)", ms("online"), "", f"incl. the teacher forward: {ms('teacher')} ms"),
        (
            "ceiling: (cached step + teacher forward) / cached step",
            f"{median(ceiling):.3f}x",
            "",
            f"per round; online / cached is {median(o_over_c) / median(ceiling):.1%} of it",
        ),
        (
            "cache read share of the cached PKD step",
            f"{s['read'].mean() / s['cached'].mean():.1%}",
            "< 10%",
            "mean read time per batch / mean cached step",
        ),
        (
            "AdamW step: torch's default (ms)",
            ms("adamw_default", 1),
            "",
            "per-tensor loop over the student's parameters",
        ),
        (
            "AdamW step: pkdpipe's (ms)",
            ms("adamw_pkdpipe", 1),
            "",
            f"fused={bool(s['adamw_fused'])}; same groups, same gradients; "
            f"default / pkdpipe {median(s['adamw_default'] / s['adamw_pkdpipe']):.1f}x",
        ),
        (
            "cached PKD / fine-tuning",
            f"{median(c_over_f):.3f}x",
            "<= 1.10x",
            spread(c_over_f, "cached", "ft"),
        ),
        (
            "online PKD / cached PKD",
            f"{median(o_over_c):.3f}x",
            ">= 1.4x",
            spread(o_over_c, "online", "cached"),
        ),
    ]


def rss_rows(rss: dict, sizes: dict, args) -> list[tuple[str, ...]]:
    """One row per cache (its peak RSS), then one per larger cache (its growth over 1x)."""

    def figures(name, key):
        return [r[key] for r in rss[name]]

    def listed(name, key, fmt="{:.0f}"):
        return ", ".join(fmt.format(v) for v in figures(name, key))

    rows = []
    for name in rss:
        examples, size = sizes[name]
        via = f" ({args.scale_via})" if name != "1x" else ""
        rows.append(
            (
                f"peak RSS of distill, {name} cache (MB)",
                f"{median(figures(name, 'peak_rss_mb')):.0f}",
                "",
                f"{examples:,} rows, {size / 2**20:.0f} MiB on disk{via}; "
                f"runs: {listed(name, 'peak_rss_mb')}; batch width max {listed(name, 'widest_batch', '{}')}, "
                f"mean {listed(name, 'mean_width', '{:.1f}')} tokens; "
                f"before distill() {listed(name, 'peak_before_distill_mb')} MB",
            )
        )
    for name in [n for n in rss if n != "1x"]:
        growth = median(figures(name, "peak_rss_mb")) - median(figures("1x", "peak_rss_mb"))
        hwm_growth = median(figures(name, "vm_hwm_mb")) - median(figures("1x", "vm_hwm_mb"))
        rows += [
            (
                f"peak RSS growth, 1x -> {name} (MB)",
                f"{growth:+.0f}",
                "<= +50",
                f"ru_maxrss; {args.rss_steps} steps each, max_seq_len {sizes['max_seq_len']}",
            ),
            (
                "  the same from /proc VmHWM (MB)",
                f"{hwm_growth:+.0f}",
                "<= +50",
                f"VmHWM 1x: {listed('1x', 'vm_hwm_mb')}; {name}: {listed(name, 'vm_hwm_mb')} MB",
            ),
        ]
    return rows


if __name__ == "__main__":
    main()

"""What the cache saves a hyperparameter sweep: wall time of one grid trained from a cache against
the same grid with the teacher run at every step.

    python benchmarks/bench_sweep.py

Both sweeps are the real `pkdpipe.sweep`, run for run the same settings, batches and evaluation,
interleaved run by run so that machine noise falls on both.
The only difference is where the teacher's targets come from:
  - cached: `cache-teacher` once (its time counted), then every run streams the targets from it;
  - online: `distill`'s batch source is wrapped (its public `source_hook`) by one that loads the
    teacher for each run and runs its forward (inference_mode) on every batch, as a pipeline
    without a cache would.
    It still reads each batch from the cache, cached targets included, exactly as the cached sweep
    does (a pipeline without a cache would tokenise instead): the teacher's forward is the only
    work it adds.
The benchmark checks that the two give the same targets on the first batch, and prints how far
apart they are (the cache stores [CLS] vectors in float16).

Default: BANKING77 from `data/banking77`, the demo's fine-tuned teacher when `runs/demo/teacher`
exists (else the real MiniLM encoder with a random head, which costs the same), 3-layer PKD-Skip
students, a 2x2 grid over alpha and T, one epoch a run. The full-size figures printed at the end
are extrapolated from the measured times and say so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from pkdpipe.cache.reader import TeacherCache
from pkdpipe.config import CacheConfig, DistillConfig
from pkdpipe.models import cls_vectors, load_classifier, quiet_transformers
from pkdpipe.sources import CacheSource
from pkdpipe.strategies import model_inputs
from pkdpipe.sweep import grid, sweep
from pkdpipe.teacher import cache_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, log, machine_lines, make_teacher, table  # noqa: E402


class OnlineTeacher:
    """Wraps distill's cache source: its batches (token ids, labels) with the targets computed by
    the teacher each step."""

    first_batch_gap: dict[str, float] = {}

    def __init__(self, source: CacheSource):
        self.source, self.layers = source, source.layers
        with quiet_transformers():
            self.teacher = load_classifier(source.cache.manifest["teacher"]["name_or_path"], False).eval()

    def steps_per_epoch(self) -> int:
        return self.source.steps_per_epoch()

    def epoch(self, epoch: int, skip: int):
        for batch in self.source.epoch(epoch, skip):
            with torch.inference_mode():
                out = self.teacher(**model_inputs(batch), output_hidden_states=bool(self.layers))
            online = {"teacher_logits": out.logits.clone()}
            if self.layers:
                online["teacher_cls"] = cls_vectors(out.hidden_states, self.layers).clone()
            if not OnlineTeacher.first_batch_gap:
                OnlineTeacher.first_batch_gap = {
                    k: float((v - batch[k].float()).abs().max()) for k, v in online.items()
                }
            yield {**batch, **online}


def timed_run(base: DistillConfig, combo: dict, folder: Path, online: bool) -> tuple[float, list]:
    """One grid point through `pkdpipe.sweep` into `folder`; its wall time and run."""
    start = time.perf_counter()
    runs = sweep(base, {k: [v] for k, v in combo.items()}, folder, OnlineTeacher if online else None)
    return time.perf_counter() - start, runs


def seconds_per_step(runs) -> float:
    """Median seconds per optimizer step over the runs' training-log windows."""
    windows = [
        1 / line["steps_per_s"]
        for run in runs
        for line in map(json.loads, (run.output / "train_log.jsonl").read_text().splitlines())
        if "steps_per_s" in line
    ]
    return statistics.median(windows)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="banking77")
    p.add_argument("--data-dir", default=str(REPO / "data" / "banking77"))
    p.add_argument(
        "--teacher", default=None, help="fine-tuned teacher (default: runs/demo/teacher if present)"
    )
    p.add_argument("--out", default="bench-out/sweep")
    p.add_argument("--strategy", default="skip")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--alpha", default="0.2,0.7")
    p.add_argument("--temperature", default="5,10")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run")
    p.add_argument("--max-steps", type=int, default=0, help="cut each run at this many steps (0 = no cut)")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--full-grid-runs", type=int, default=81, help="grid size for the extrapolation")
    p.add_argument("--full-epochs", type=int, default=4, help="epochs per run for the extrapolation")
    args = p.parse_args()

    out = Path(args.out)
    demo_teacher = REPO / "runs" / "demo" / "teacher"
    if args.teacher:
        teacher, teacher_note = Path(args.teacher), args.teacher
    elif (demo_teacher / "model.safetensors").is_file():
        teacher, teacher_note = demo_teacher, "the demo's fine-tuned MiniLM-L6 (runs/demo/teacher)"
    else:
        teacher = make_teacher(out / "teacher", num_labels=77)
        teacher_note = "MiniLM-L6 with a random head (speed only; the dev metrics mean nothing)"
    header = machine_lines()

    log("building the cache")
    shutil.rmtree(out / "cache", ignore_errors=True)
    start = time.perf_counter()
    cache = cache_teacher(
        CacheConfig(
            task=args.task,
            data_dir=args.data_dir,
            teacher=str(teacher),
            cache_dir=out / "cache",
            max_seq_len=args.max_seq_len,
            quiet=True,
        )
    )
    cache_seconds = time.perf_counter() - start

    base = DistillConfig(
        cache=str(cache.path),
        strategy=args.strategy,
        layers=args.layers,
        epochs=args.epochs,
        max_steps=args.max_steps,
        checkpoint_every=0,
        quiet=True,
    )
    values = {"alpha": floats(args.alpha), "temperature": floats(args.temperature)}
    combos = grid(values)
    runs = len(combos)
    # the two sweeps interleaved, run for run, and which goes first alternates: machine noise and
    # a first run's warm-up fall on both alike
    for variant in ("cached", "online"):
        shutil.rmtree(out / variant, ignore_errors=True)
    seconds = {"cached": 0.0, "online": 0.0}
    results = {"cached": [], "online": []}
    for i, combo in enumerate(combos):
        for variant in ("cached", "online") if i % 2 == 0 else ("online", "cached"):
            log(f"run {i + 1}/{runs} {variant}: {combo}")
            took, run = timed_run(base, combo, out / variant, online=variant == "online")
            seconds[variant] += took
            results[variant] += run
    cached_seconds, online_seconds = seconds["cached"], seconds["online"]
    cached_runs, online_runs = results["cached"], results["online"]

    with TeacherCache(cache.path) as opened:
        steps_per_epoch = CacheSource(opened, "train", [], base.batch_size, 0, 0).steps_per_epoch()
    run_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        run_steps = min(run_steps, args.max_steps)
    cache_total = cache_seconds + cached_seconds
    per_cached, per_online = cached_seconds / runs, online_seconds / runs
    step_cached, step_online = seconds_per_step(cached_runs), seconds_per_step(online_runs)
    # a full run = a measured run plus its missing steps at the measured step time
    extra_steps = steps_per_epoch * args.full_epochs - run_steps
    full_cached = cache_seconds + args.full_grid_runs * (per_cached + extra_steps * step_cached)
    full_online = args.full_grid_runs * (per_online + extra_steps * step_online)
    rows = [
        ("cache-teacher (once)", f"{cache_seconds:.0f} s", "-"),
        (f"{runs} runs x {run_steps} steps", f"{cached_seconds:.0f} s", f"{online_seconds:.0f} s"),
        ("mean per run (load, train, evaluate, save)", f"{per_cached:.1f} s", f"{per_online:.1f} s"),
        ("median training step", f"{step_cached * 1000:.0f} ms", f"{step_online * 1000:.0f} ms"),
        ("sweep in all", f"{cache_total:.0f} s", f"{online_seconds:.0f} s"),
    ]
    gap = OnlineTeacher.first_batch_gap
    if not gap:
        sys.exit("the online sweep never ran the teacher: distill no longer calls its source_hook")
    same = all(
        abs(a.metrics[m] - b.metrics[m]) < 0.02
        for a, b in zip(sorted(cached_runs, key=lambda r: r.name), sorted(online_runs, key=lambda r: r.name))
        for m in a.metrics
    )
    lines = [
        *header,
        f"teacher: {teacher_note}; task {args.task}, train {steps_per_epoch} batches of {base.batch_size} "
        f"an epoch; students {args.strategy}-{args.layers}; grid alpha {args.alpha} x T {args.temperature}",
        "",
        table(rows, ("", "from the cache", "teacher every step")),
        "",
        f"measured: online sweep / cached sweep (cache build included) = "
        f"{online_seconds / cache_total:.2f}x; per run {per_online / per_cached:.2f}x",
        "targets, online vs cached, first batch, max abs difference: "
        + ", ".join(f"{k} {v:.1e}" for k, v in gap.items()),
        f"dev metrics of the two sweeps agree run for run within 0.02: {same}",
        f"extrapolated, not measured: {args.full_grid_runs} runs x {args.full_epochs} epochs "
        f"({steps_per_epoch * args.full_epochs} steps each), each run a measured run plus its missing "
        f"steps at the median step time (their extra dev evaluations not counted): "
        f"cached {full_cached / 3600:.1f} h, online {full_online / 3600:.1f} h, "
        f"online / cached {full_online / full_cached:.2f}x",
        f"command: `{command_line()}`",
    ]
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

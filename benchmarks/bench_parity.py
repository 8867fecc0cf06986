"""Parity: do pkdpipe's students learn as fast as a plain PyTorch loop with the same settings?

Each row trains the same model on the same data with the same optimiser, schedule and seeds twice:
once through pkdpipe (`finetune` or `distill`, as a user calls them) and once through `plain_loop`
below, a few dozen lines of ordinary PyTorch (a fresh uniform shuffle every epoch, batches padded to
their longest row). Both sides report dev accuracy after every epoch; the table gives the mean and
sd over the seeds.

    teacher   pkdpipe finetune of the 6-layer MiniLM      vs the plain loop, cross-entropy
    ft        distill --strategy ft, 3-layer student      vs the plain loop, cross-entropy
    kd        distill --strategy kd                       vs the plain loop fed the cached logits
    skip      distill --strategy skip (layers 2, 4)       vs the plain loop fed the cached logits
                                                             and [CLS] vectors, from memory

Data: BANKING77 train less the 10% dev that pkdpipe carves out of it (8,998 / 1,005 rows); the
student rows read one cache, made by `cache_teacher` from the teacher row's pkdpipe seed-1 teacher
(or `--teacher`). Results go to `--workdir` (default bench-out/parity), one JSON per (row, side,
seed); a rerun skips the finished ones, so seeds can run in parallel processes and a final
`--report` prints the table of whatever is there.

    python benchmarks/bench_parity.py                                   # everything, 3 seeds
    python benchmarks/bench_parity.py --rows ft --seeds 2 --threads 1   # one piece
    python benchmarks/bench_parity.py --report                          # the table so far
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import DEFAULT_DATASETS, REPO, command_line, log, machine_lines, minilm_path, set_threads, table

ROWS = ("teacher", "ft", "kd", "skip")
SIDES = ("pkdpipe", "plain", "pkdpipe-grouped")  # grouped: pkdpipe with --group-by-length
SKIP_MAP = (2, 4)  # PKD-Skip 6 -> 3: student layers 1, 2 learn from teacher layers 2, 4


# -- the plain reference ----------------------------------------------------------------------------
def plain_loop(model, train: dict, dev: dict, args, seed: int, loss_fn) -> list[float]:
    """An ordinary PyTorch loop: AdamW (no decay on biases and LayerNorm), linear warm-up over 10% of
    the steps then linear decay, gradients clipped at 1.0, a fresh uniform shuffle of all rows each
    epoch. `train` holds "input_ids" (a list of 1-d tensors), "labels" and any targets `loss_fn`
    reads by row index. Returns dev accuracy after each epoch."""
    from transformers import get_linear_schedule_with_warmup

    order = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    n = len(train["input_ids"])
    total = args.epochs * math.ceil(n / args.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total), total)
    accuracies = []
    for _ in range(args.epochs):
        model.train()
        for rows in torch.randperm(n, generator=order).split(args.batch_size):
            ids, mask = pad([train["input_ids"][i] for i in rows])
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            loss = loss_fn(out, train, rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        accuracies.append(accuracy(model, dev))
    return accuracies


def pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    return ids, mask


@torch.inference_mode()
def accuracy(model, dev: dict) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dev["input_ids"]), 64):
        ids, mask = pad(dev["input_ids"][start : start + 64])
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        correct += int((predicted == dev["labels"][start : start + 64]).sum())
    return 100.0 * correct / len(dev["input_ids"])


def plain_loss(row: str, args):
    """The objective of each row, written out: (1-a) CE + a T^2 KL + beta * PT, as pkdpipe defines it."""

    def loss(out, train, rows):
        ce = F.cross_entropy(out.logits, train["labels"][rows])
        if row in ("teacher", "ft"):
            return ce
        t = args.temperature
        kd = F.kl_div(
            F.log_softmax(out.logits / t, -1), F.softmax(train["logits"][rows] / t, -1), reduction="batchmean"
        )
        total = (1 - args.alpha) * ce + args.alpha * t * t * kd
        if row == "skip":
            student = torch.stack([out.hidden_states[i][:, 0] for i in (1, 2)], dim=1)
            teacher = train["hidden"][rows].float()
            gap = F.normalize(student, dim=-1) - F.normalize(teacher, dim=-1)
            total = total + args.beta * gap.pow(2).sum(-1).mean()
        return total

    return loss


# -- the two sides --------------------------------------------------------------------------------
def run_plain(row: str, seed: int, args, work: Path) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    from pkdpipe.data import load_split
    from pkdpipe.models import quiet_transformers
    from pkdpipe.tasks import get_task

    task = get_task("banking77")
    tokenizer = _tokenizer()
    dev_examples = load_split(task, "dev", args.data)
    dev = {
        "input_ids": [
            torch.tensor(x)
            for x in tokenizer(dev_examples.text_a, truncation=True, max_length=args.max_seq_len)["input_ids"]
        ],
        "labels": torch.tensor(dev_examples.labels),
    }
    if row == "teacher":
        examples = load_split(task, "train", args.data)
        encoded = tokenizer(examples.text_a, truncation=True, max_length=args.max_seq_len)["input_ids"]
        train = {"input_ids": [torch.tensor(x) for x in encoded], "labels": torch.tensor(examples.labels)}
        layers = None
    else:
        from pkdpipe.cache.reader import open_cache

        with open_cache(_cache(args, work)) as cache:
            data = cache.read("train", SKIP_MAP)
        train = {
            "input_ids": [torch.from_numpy(x.astype("int64")) for x in data["input_ids"]],
            "labels": torch.from_numpy(data["labels"]),
            "logits": torch.from_numpy(data["logits"]),
            "hidden": torch.from_numpy(data["hidden"]),
        }
        layers = 3
    torch.manual_seed(seed)
    overrides = {"num_labels": task.num_labels} | ({"num_hidden_layers": layers} if layers else {})
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), **overrides)
    torch.manual_seed(seed)
    return plain_loop(model, train, dev, args, seed, plain_loss(row, args))


def run_pkdpipe(row: str, seed: int, args, work: Path, grouped: bool) -> list[float]:
    from pkdpipe.config import DistillConfig, FinetuneConfig
    from pkdpipe.train import distill, finetune

    output = work / "runs" / f"{row}-{'pkdpipe-grouped' if grouped else 'pkdpipe'}-s{seed}"
    common = dict(
        output=output,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        group_by_length=grouped,
        quiet=True,
        resume=False,
    )
    if row == "teacher":
        finetune(
            FinetuneConfig(
                task="banking77",
                model=minilm_path(),
                data_dir=args.data,
                max_seq_len=args.max_seq_len,
                **common,
            )
        )
    else:
        distill(
            DistillConfig(
                cache=str(_cache(args, work)),
                strategy=row,
                layers=3,
                alpha=args.alpha,
                beta=args.beta,
                temperature=args.temperature,
                student_init=minilm_path(),
                **common,
            )
        )
    log_lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [line["dev_accuracy"] * 100 for line in log_lines if "dev_accuracy" in line]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _cache(args, work: Path) -> Path:
    """The cache of the student rows: one, made once, from the teacher row's pkdpipe seed-1 teacher."""
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    teacher = args.teacher or work / "runs" / "teacher-pkdpipe-s1"
    if not (Path(teacher) / "config.json").is_file():
        raise SystemExit(f"no teacher at {teacher}: run --rows teacher --seeds 1 first, or pass --teacher")
    return cache_teacher(
        CacheConfig(
            task="banking77",
            data_dir=args.data,
            teacher=str(teacher),
            cache_dir=work / "cache",
            max_seq_len=args.max_seq_len,
            quiet=True,
        )
    ).path


# -- the report -----------------------------------------------------------------------------------
def report(work: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    if not results:
        return f"no results under {work}"
    epochs = max(len(r["dev"]) for r in results)
    rows = []
    for row in ROWS:
        for side in SIDES:
            runs = [r for r in results if r["row"] == row and r["side"] == side]
            if not runs:
                continue
            cells = []
            for e in range(epochs):
                values = [r["dev"][e] for r in runs if len(r["dev"]) > e]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.2f} ± {sd:.2f}" if values else "")
            seeds = ",".join(str(r["seed"]) for r in runs)
            last = " / ".join(f"{r['dev'][-1]:.1f}" for r in runs)
            minutes = statistics.mean(r["seconds"] for r in runs) / 60
            rows.append((row, side, seeds, *cells, last, f"{minutes:.1f}"))
    header = (
        "row",
        "side",
        "seeds",
        *(f"dev, epoch {e + 1}" for e in range(epochs)),
        "last, per seed",
        "min/run",
    )
    return table(rows, header)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--sides", default="pkdpipe,plain", help=f"any of {', '.join(SIDES)}")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--data", type=Path, default=DEFAULT_DATASETS / "banking77")
    p.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "parity")
    p.add_argument("--teacher", default=None, help="the teacher of the student rows' cache")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", action="store_true", help="only print the table of the results so far")
    args = p.parse_args()
    set_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for row in args.rows.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for side in args.sides.split(","):
                    path = work / f"{row}-{side}-s{seed}.json"
                    if path.is_file():
                        continue
                    log(f"{row} {side} seed {seed}")
                    started = time.perf_counter()
                    if side == "plain":
                        dev = run_plain(row, seed, args, work)
                    else:
                        dev = run_pkdpipe(row, seed, args, work, grouped=side == "pkdpipe-grouped")
                    seconds = time.perf_counter() - started
                    record = {
                        "row": row,
                        "side": side,
                        "seed": seed,
                        "dev": dev,
                        "seconds": seconds,
                        "settings": {k: str(v) for k, v in vars(args).items()},
                    }
                    path.write_text(json.dumps(record, indent=2) + "\n")
                    log(f"  dev per epoch {', '.join(f'{d:.2f}' for d in dev)} ({seconds:.0f} s)")
    print("\n".join([f"bench_parity: {command_line()}", *machine_lines(), "", report(work)]))


if __name__ == "__main__":
    main()

"""`pkdpipe finetune` and `pkdpipe distill`: options from FinetuneConfig and DistillConfig."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pkdpipe.config import DistillConfig, FinetuneConfig, TrainConfig
from pkdpipe_cli.common import command_line, config_from, console, fmt_metrics, layer_list, option


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.command("distill")(distill)


def _summary(title: str, result, extra: dict) -> None:
    table = Table(title=title, show_header=False)
    for k, v in extra.items():
        table.add_row(k, str(v))
    table.add_row("best dev", f"{fmt_metrics(result.metrics)} (step {result.best_step})")
    table.add_row("steps", f"{result.steps:,} in {result.seconds:.1f} s")
    table.add_row("output", str(result.output))
    console.print(table)
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="bold red", markup=False, highlight=False, soft_wrap=True)


def finetune(
    task: str = option(FinetuneConfig, "task", "--task", required=True),
    model: str = option(FinetuneConfig, "model", "--model", required=True),
    data_dir: Path = option(FinetuneConfig, "data_dir"),
    layers: int = option(FinetuneConfig, "layers"),
    output: Path = option(FinetuneConfig, "output"),
    max_seq_len: int = option(FinetuneConfig, "max_seq_len"),
    lr: float = option(TrainConfig, "lr"),
    epochs: int = option(TrainConfig, "epochs"),
    batch_size: int = option(TrainConfig, "batch_size"),
    warmup: float = option(TrainConfig, "warmup"),
    weight_decay: float = option(TrainConfig, "weight_decay"),
    seed: int = option(TrainConfig, "seed"),
    eval_every: int = option(TrainConfig, "eval_every"),
    checkpoint_every: int = option(TrainConfig, "checkpoint_every"),
    precision: str = option(TrainConfig, "precision"),
    device: str = option(TrainConfig, "device"),
    max_steps: int = option(TrainConfig, "max_steps"),
    resume: bool = option(TrainConfig, "resume"),
    group_by_length: bool = option(TrainConfig, "group_by_length"),
    report_to: str = option(TrainConfig, "report_to"),
    trust_remote_code: bool = option(TrainConfig, "trust_remote_code"),
    quiet: bool = option(TrainConfig, "quiet"),
):
    """Fine-tune a teacher (or a K-layer student baseline) on a task; keeps the best dev checkpoint."""
    from pkdpipe import distributed
    from pkdpipe.train import finetune as run

    result = run(config_from(FinetuneConfig, locals(), command=command_line()))
    if distributed.is_main():
        _summary(f"finetune {task}", result, {"model": model, "layers": layers or "all"})


def distill(
    strategy: str = option(DistillConfig, "strategy"),
    layers: int = option(DistillConfig, "layers"),
    cache: str = option(DistillConfig, "cache"),
    cache_dir: Path = option(DistillConfig, "cache_dir"),
    task: str = option(DistillConfig, "task", "--task"),
    teacher_layers: str = option(DistillConfig, "teacher_layers"),
    student_init: str = option(DistillConfig, "student_init"),
    output: Path = option(DistillConfig, "output"),
    alpha: float = option(DistillConfig, "alpha"),
    beta: float = option(DistillConfig, "beta"),
    temperature: float = option(DistillConfig, "temperature"),
    normalize: bool = option(DistillConfig, "normalize"),
    pt_space: str = option(DistillConfig, "pt_space"),
    lr: float = option(TrainConfig, "lr"),
    epochs: int = option(TrainConfig, "epochs"),
    batch_size: int = option(TrainConfig, "batch_size"),
    warmup: float = option(TrainConfig, "warmup"),
    weight_decay: float = option(TrainConfig, "weight_decay"),
    seed: int = option(TrainConfig, "seed"),
    eval_every: int = option(TrainConfig, "eval_every"),
    checkpoint_every: int = option(TrainConfig, "checkpoint_every"),
    precision: str = option(TrainConfig, "precision"),
    device: str = option(TrainConfig, "device"),
    max_steps: int = option(TrainConfig, "max_steps"),
    resume: bool = option(TrainConfig, "resume"),
    group_by_length: bool = option(TrainConfig, "group_by_length"),
    report_to: str = option(TrainConfig, "report_to"),
    trust_remote_code: bool = option(TrainConfig, "trust_remote_code"),
    quiet: bool = option(TrainConfig, "quiet"),
):
    """Train a K-layer student from a teacher cache alone (no teacher forward pass)."""
    from pkdpipe import distributed
    from pkdpipe.train import distill as run

    parsed = {"teacher_layers": layer_list(teacher_layers)}
    result = run(config_from(DistillConfig, {**locals(), **parsed}, command=command_line()))
    if distributed.is_main():
        _summary(f"distill {strategy}-{layers}", result, {})

"""`pkdpipe evaluate` and `pkdpipe predict`."""

from __future__ import annotations

from pathlib import Path

import typer
from pkdpipe_cli.common import DataDirOpt, console
from rich.table import Table

from pkdpipe.config import EvaluateConfig


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)


def evaluate(
    models: list[str] = typer.Argument(..., help="Model folders; the first is the baseline for speed-up."),
    task: str = typer.Option(..., "--task", help="Task name or task file."),
    data_dir: Path = DataDirOpt,
    split: str = typer.Option("dev", help="Split to evaluate on."),
    batch_size: int = typer.Option(64),
    max_seq_len: int = typer.Option(128),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("fp32"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Metrics, parameters, examples/s and speed-up of each model on one split."""
    from pkdpipe.evaluate import evaluate as run

    config = EvaluateConfig(
        models=models,
        task=task,
        data_dir=data_dir,
        split=split,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        device=device,
        precision=precision,
        quiet=quiet,
    )
    print_reports(run(config), f"{task} {split}")


def print_reports(reports, title: str) -> None:
    table = Table(title=title)
    metric_names = list(reports[0].metrics)
    for column in ["model", *metric_names, "parameters", "examples/s", "speed-up"]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in reports:
        table.add_row(
            r.model,
            *(f"{100 * r.metrics[m]:.2f}" for m in metric_names),
            f"{r.parameters / 1e6:.1f}M",
            f"{r.examples_per_s:,.0f}",
            f"{r.speedup:.2f}x",
        )
    console.print(table)


def predict(
    model: str = typer.Argument(..., help="Model folder."),
    task: str = typer.Option(..., "--task"),
    data_dir: Path = DataDirOpt,
    split: str = typer.Option("test"),
    output: Path = typer.Option(..., "--output", help="TSV file to write (index, prediction)."),
    batch_size: int = typer.Option(64),
    max_seq_len: int = typer.Option(128),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Write GLUE-style predictions: one row per example, its index and predicted label."""
    from pkdpipe.evaluate import predict as run

    path = run(
        model,
        task,
        split,
        output,
        data_dir=data_dir,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        device=device,
        quiet=quiet,
    )
    console.print(f"predictions: {path}")

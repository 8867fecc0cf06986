"""`pkdpipe evaluate` and `pkdpipe predict`."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from pkdpipe.config import EvaluateConfig
from pkdpipe.metrics import percent
from pkdpipe_cli.common import config_from, config_options, console, option


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)


@config_options(EvaluateConfig, required=("task",))
def evaluate(
    models: list[str] = typer.Argument(..., help="Model folders; the first is the baseline for speed-up."),
    **values,
):
    """Metrics, parameters, examples/s and speed-up of each model on one split.

    Speed is timed in rounds, the models interleaved; the speed-up is the median of the per-round
    ratios to the first model, with the lowest and highest in brackets."""
    from pkdpipe.evaluate import evaluate as run

    config = config_from(EvaluateConfig, {**values, "models": models})
    print_reports(run(config), f"{config.task} {config.split}")


def print_reports(reports, title: str, caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, caption_justify="left")
    metric_names = list(reports[0].metrics)
    for column in ["model", *metric_names, "parameters", "examples/s", "speed-up"]:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for r in reports:
        table.add_row(
            r.model,
            *(percent(r.metrics[m]) for m in metric_names),
            f"{r.parameters / 1e6:.1f}M",
            "-" if math.isnan(r.examples_per_s) else f"{r.examples_per_s:,.0f}",
            _speedup(r),
        )
    console.print(table)
    for r in reports:
        for warning in r.warnings:
            console.print(f"[yellow]warning:[/yellow] {r.model}: {warning}")


def _speedup(report) -> str:
    if math.isnan(report.speedup):
        return "-"
    low, high = (f"{x:.2f}" for x in report.speedup_range)
    return f"{report.speedup:.2f}x" + (f" ({low}-{high})" if high != low else "")


def predict(
    model: str = typer.Argument(..., help="Model folder."),
    task: str = option(EvaluateConfig, "task", "--task", required=True),
    data_dir: Path = option(EvaluateConfig, "data_dir"),
    split: str = typer.Option("test", help="Split to predict."),
    output: Path = typer.Option(..., "--output", help="TSV file to write (index, prediction)."),
    batch_size: int = option(EvaluateConfig, "batch_size"),
    max_seq_len: int = option(EvaluateConfig, "max_seq_len"),
    device: str = option(EvaluateConfig, "device"),
    quiet: bool = option(EvaluateConfig, "quiet"),
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

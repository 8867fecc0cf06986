"""`pkdpipe finetune` and `pkdpipe distill`: options from FinetuneConfig and DistillConfig."""

from __future__ import annotations

import typer
from rich.table import Table

from pkdpipe.config import DistillConfig, FinetuneConfig
from pkdpipe_cli.common import command_line, config_from, config_options, console, fmt_metrics, option


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.command("distill")(distill)


def _summary(title: str, result, extra: dict) -> None:
    table = Table(title=title, show_header=False)
    for k, v in extra.items():
        table.add_row(k, str(v))
    table.add_row("best dev", f"{fmt_metrics(result.metrics)} (step {result.best_step})")
    table.add_row("steps", f"{result.steps:,} in {result.seconds:.1f} s")
    if result.reused:
        table.add_row("trained", "nothing: already finished with these settings (--no-resume to train again)")
    table.add_row("output", str(result.output))
    console.print(table)
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="bold red", markup=False, highlight=False, soft_wrap=True)


@config_options(FinetuneConfig, required=("task", "model"))
def finetune(**values):
    """Fine-tune a teacher (or a K-layer student baseline) on a task; keeps the best dev checkpoint."""
    from pkdpipe import distributed
    from pkdpipe.train import finetune as run

    result = run(config_from(FinetuneConfig, values, command=command_line()))
    if distributed.is_main():
        _summary(
            f"finetune {values['task']}",
            result,
            {"model": values["model"], "layers": values["layers"] or "all"},
        )


@config_options(DistillConfig)
def distill(store: str = option(DistillConfig, "store", envvar="PKDPIPE_STORE"), **values):
    """Train a K-layer student from a teacher cache alone (no teacher forward pass)."""
    from pkdpipe import distributed
    from pkdpipe.train import distill as run

    result = run(config_from(DistillConfig, {**values, "store": store}, command=command_line()))
    if distributed.is_main():
        _summary(f"distill {values['strategy']}-{values['layers']}", result, {})

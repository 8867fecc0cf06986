"""`pkdpipe sweep` and `pkdpipe report`."""

from __future__ import annotations

from pathlib import Path

import typer
from pkdpipe_cli.common import console
from rich.table import Table

from pkdpipe.config import DistillConfig
from pkdpipe.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("report")(report)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers like 0.2,0.5; got {text!r}") from None


def sweep(
    cache: str = typer.Option(None, help="Cache folder or key. Default: the newest complete cache."),
    cache_dir: Path = typer.Option(None),
    strategy: str = typer.Option("skip", help="Comma-separated strategies: last, skip, kd, ft."),
    layers: str = typer.Option("3", help="Comma-separated student depths."),
    alpha: str = typer.Option("0.5", help="Comma-separated alphas, e.g. 0.2,0.5,0.7."),
    beta: str = typer.Option(
        "0.5", help="Comma-separated betas (pkdpipe scale: authors' beta / hidden size)."
    ),
    temperature: str = typer.Option("10", help="Comma-separated temperatures, e.g. 5,10,20."),
    lr: str = typer.Option("5e-5", help="Comma-separated learning rates."),
    seed: str = typer.Option("42", help="Comma-separated seeds."),
    epochs: int = typer.Option(4),
    batch_size: int = typer.Option(32),
    max_steps: int = typer.Option(0, help="Stop each run after N steps (0 = all epochs)."),
    output: Path = typer.Option(None, help="Sweep folder. Default: runs/TASK/sweep."),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Train a grid of students from one cache; finished runs are kept and skipped on restart."""
    from pkdpipe.sweep import sweep as run

    values = {
        "strategy": [s.strip() for s in strategy.split(",") if s.strip()],
        "layers": [int(x) for x in _floats(layers, "--layers")],
        "alpha": _floats(alpha, "--alpha"),
        "beta": _floats(beta, "--beta"),
        "temperature": _floats(temperature, "--temperature"),
        "lr": _floats(lr, "--lr"),
        "seed": [int(x) for x in _floats(seed, "--seed")],
    }
    base = DistillConfig(
        cache=cache,
        cache_dir=cache_dir,
        epochs=epochs,
        batch_size=batch_size,
        max_steps=max_steps,
        device=device,
        quiet=quiet,
    )
    runs = run(base, values, output)
    table = Table(title="sweep (best first)")
    metric_names = list(runs[0].metrics) if runs else []
    for column in ["run", *metric_names, "time", ""]:
        table.add_column(column)
    for r in runs:
        table.add_row(
            r.name,
            *(f"{100 * r.metrics.get(m, float('nan')):.2f}" for m in metric_names),
            f"{r.seconds:.0f} s" if r.seconds else "-",
            "kept" if r.reused else "",
        )
    console.print(table)
    if runs:
        console.print(f"best: {runs[0].output}")


def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with train_log.jsonl)."),
    output: Path = typer.Option(Path("report.png"), help="PNG file to write."),
):
    """Plot training curves (each loss term, dev metric) and final metrics of several runs."""
    from pkdpipe.report import make_report

    read = make_report(runs, output)
    table = Table(title="runs")
    metric_names = sorted({k for r in read for k in r["dev"]})
    for column in ["run", *metric_names, "steps"]:
        table.add_column(column)
    for r in read:
        steps = max((rec["step"] for rec in r["records"]), default=0)
        table.add_row(
            r["name"],
            *(f"{100 * r['dev'][m]:.2f}" if m in r["dev"] else "-" for m in metric_names),
            str(steps),
        )
    console.print(table)
    console.print(f"report: {output}")

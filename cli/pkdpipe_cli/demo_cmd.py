"""`pkdpipe demo`: the whole pipeline on the bundled BANKING77 with a real MiniLM, one table."""

from __future__ import annotations

from pathlib import Path

import typer

from pkdpipe_cli.common import console


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), help="Folder for every artefact of the run."),
    data_dir: Path = typer.Option(None, help="BANKING77 folder. Default: the bundled data/banking77."),
    model: str = typer.Option(None, help="Pre-trained model. Default: all-MiniLM-L6-v2 (pkdpipe[demo])."),
    quick: bool = typer.Option(False, "--quick", help="One epoch per stage: a few minutes, lower accuracy."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Fine-tune a 6-layer teacher, cache it, distill a 3-layer PKD student, compare on test."""
    from pkdpipe.demo import DemoConfig, run_demo
    from pkdpipe_cli.eval_cmd import print_reports

    config = DemoConfig(run_dir=run_dir, data_dir=data_dir, model=model, device=device, quiet=quiet)
    if quick:
        config.teacher_epochs, config.student_epochs = 1, 1
    result = run_demo(config)
    print_reports(result.reports, "BANKING77 test: teacher vs PKD student")
    if result.reused:
        console.print(f"reused: {', '.join(result.reused)}")
    console.print(f"teacher: {result.teacher}\ncache:   {result.cache}\nstudent: {result.student}")

"""`pkdpipe finetune` and `pkdpipe distill`."""

from __future__ import annotations

from pathlib import Path

import typer
from pkdpipe_cli.common import DataDirOpt, command_line, console, fmt_metrics, int_list
from rich.table import Table

from pkdpipe.config import DistillConfig, FinetuneConfig


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.command("distill")(distill)


def _train_options():
    """The options every training command shares, with the paper's defaults."""
    return {
        "lr": typer.Option(5e-5, help="Peak learning rate (AdamW); the paper's grid is 1e-5, 2e-5, 5e-5."),
        "epochs": typer.Option(4, help="Epochs over the training set."),
        "batch_size": typer.Option(32, help="Global batch size (split across ranks under torchrun)."),
        "warmup": typer.Option(0.1, help="Fraction of steps with linear warm-up."),
        "weight_decay": typer.Option(0.01, help="AdamW weight decay."),
        "seed": typer.Option(42, help="Seed for initialisation, dropout and data order."),
        "eval_every": typer.Option(0, help="Evaluate on dev every N steps (0 = each epoch)."),
        "checkpoint_every": typer.Option(
            200, help="Save a resumable checkpoint every N steps (and each epoch); rerun to resume."
        ),
        "precision": typer.Option("fp32", help="fp32, bf16 or fp16 (fp16 needs a GPU)."),
        "device": typer.Option("auto", help="cpu, cuda or auto."),
        "max_steps": typer.Option(0, help="Stop after N steps (0 = all epochs)."),
        "group_by_length": typer.Option(
            False,
            "--group-by-length",
            help="Batch rows of similar length inside random megabatches of 50 batches: less padding, "
            "faster steps. Default: a plain uniform shuffle.",
        ),
        "report_to": typer.Option(None, help="tensorboard, to also log there."),
        "quiet": typer.Option(False, "--quiet", help="No progress bars."),
    }


_T = _train_options()


def _summary(title: str, result, extra: dict) -> None:
    table = Table(title=title, show_header=False)
    for k, v in extra.items():
        table.add_row(k, str(v))
    table.add_row("best dev", f"{fmt_metrics(result.metrics)} (step {result.best_step})")
    table.add_row("steps", f"{result.steps:,} in {result.seconds:.1f} s")
    table.add_row("output", str(result.output))
    console.print(table)


def finetune(
    task: str = typer.Option(..., "--task", help="Task name or task file."),
    model: str = typer.Option(..., "--model", help="Pre-trained model folder or hub name to start from."),
    data_dir: Path = DataDirOpt,
    layers: int = typer.Option(
        None, help="Keep only the first K layers (a fine-tuned-only student baseline)."
    ),
    output: Path = typer.Option(None, help="Output folder. Default: runs/TASK/teacher (or runs/TASK/ft-K)."),
    max_seq_len: int = typer.Option(128),
    lr: float = _T["lr"],
    epochs: int = _T["epochs"],
    batch_size: int = _T["batch_size"],
    warmup: float = _T["warmup"],
    weight_decay: float = _T["weight_decay"],
    seed: int = _T["seed"],
    eval_every: int = _T["eval_every"],
    checkpoint_every: int = _T["checkpoint_every"],
    precision: str = _T["precision"],
    device: str = _T["device"],
    max_steps: int = _T["max_steps"],
    group_by_length: bool = _T["group_by_length"],
    report_to: str = _T["report_to"],
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = _T["quiet"],
):
    """Fine-tune a teacher (or a K-layer student baseline) on a task; keeps the best dev checkpoint."""
    from pkdpipe import distributed
    from pkdpipe.train import finetune as run

    config = FinetuneConfig(
        task=task,
        model=model,
        data_dir=data_dir,
        layers=layers,
        output=output,
        max_seq_len=max_seq_len,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        warmup=warmup,
        weight_decay=weight_decay,
        seed=seed,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        precision=precision,
        device=device,
        max_steps=max_steps,
        group_by_length=group_by_length,
        report_to=report_to,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
        command=command_line(),
    )
    result = run(config)
    if distributed.is_main():
        _summary(f"finetune {task}", result, {"model": model, "layers": layers or "all"})


def distill(
    strategy: str = typer.Option("last", help="last or skip (PKD), kd (vanilla KD), ft (gold labels only)."),
    layers: int = typer.Option(6, help="Student depth K."),
    cache: str = typer.Option(None, help="Cache folder or key. Default: the newest complete cache."),
    cache_dir: Path = typer.Option(None, help="Cache root. Default: $PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe."),
    teacher_layers: str = typer.Option(None, help="Explicit map for student layers 1..K-1, e.g. 2,4,6,8,10."),
    student_init: str = typer.Option(
        None,
        help="Pre-trained model to take the first K layers from. "
        "Default: the model the teacher was fine-tuned from.",
    ),
    output: Path = typer.Option(None, help="Output folder. Default: runs/TASK/STRATEGY-K."),
    alpha: float = typer.Option(0.5, help="Weight of the soft-label (KD) term against CE."),
    beta: float = typer.Option(
        0.5, help="Weight of the patient term (pkdpipe scale: authors' beta / hidden size)."
    ),
    temperature: float = typer.Option(10.0, help="KD temperature."),
    normalize: bool = typer.Option(
        True, "--normalize/--no-normalize", help="L2-normalise [CLS] vectors in PT."
    ),
    lr: float = _T["lr"],
    epochs: int = _T["epochs"],
    batch_size: int = _T["batch_size"],
    warmup: float = _T["warmup"],
    weight_decay: float = _T["weight_decay"],
    seed: int = _T["seed"],
    eval_every: int = _T["eval_every"],
    checkpoint_every: int = _T["checkpoint_every"],
    precision: str = _T["precision"],
    device: str = _T["device"],
    max_steps: int = _T["max_steps"],
    group_by_length: bool = _T["group_by_length"],
    report_to: str = _T["report_to"],
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = _T["quiet"],
):
    """Train a K-layer student from a teacher cache alone (no teacher forward pass)."""
    from pkdpipe import distributed
    from pkdpipe.train import distill as run

    config = DistillConfig(
        cache=cache,
        cache_dir=cache_dir,
        strategy=strategy,
        layers=layers,
        teacher_layers=int_list(teacher_layers, "--teacher-layers"),
        student_init=student_init,
        output=output,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        normalize=normalize,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        warmup=warmup,
        weight_decay=weight_decay,
        seed=seed,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        precision=precision,
        device=device,
        max_steps=max_steps,
        group_by_length=group_by_length,
        report_to=report_to,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
        command=command_line(),
    )
    result = run(config)
    if distributed.is_main():
        _summary(f"distill {strategy}-{layers}", result, {})

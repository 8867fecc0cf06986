"""Shared bits of the CLI: list parsing, the console, how errors are shown."""

from __future__ import annotations

import shlex
import sys

import typer
from rich.console import Console

from pkdpipe.errors import ConfigError

console = Console()


def command_line() -> str:
    return shlex.join(["pkdpipe", *sys.argv[1:]])


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """'2,4,6' -> (2, 4, 6); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers like 2,4,6; got {text!r}") from None


def str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) if metrics else "-"


TaskOpt = typer.Option(..., "--task", help="Task name (sst2, mnli, banking77, trec, ...) or a task file.")
DataDirOpt = typer.Option(
    None, "--data-dir", help="Local copy of the data (GLUE TSV or hub layout). Default: the hub."
)

"""Shared bits of the CLI: options built from the config dataclasses, list parsing, the console."""

from __future__ import annotations

import dataclasses
import shlex
import sys

import typer
from rich.console import Console

from pkdpipe.errors import ConfigError

# Tables whole in a log file too: rich would cut them to 80 columns when stdout is not a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def command_line() -> str:
    return shlex.join(["pkdpipe", *sys.argv[1:]])


def option(config_class, name: str, *flags: str, required: bool = False, **kwargs):
    """The typer option of a config field: its default and help text are the field's (one source).

    A boolean gets a flag (`--quiet`, or `--normalize/--no-normalize` when it defaults to on); a
    tuple default is shown comma-separated, as it is typed."""
    field = next(f for f in dataclasses.fields(config_class) if f.name == name)
    default = ... if required or field.default is dataclasses.MISSING else field.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool) and not flags:
        flags = (f"{flag}/--no-{flag[2:]}",) if default else (flag,)
    return typer.Option(default, *flags, help=field.metadata.get("help", ""), **kwargs)


def config_from(config_class, values: dict, **overrides):
    """`config_class` from a command's parameters (those that are its fields), plus `overrides`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in values.items() if k in names}, **overrides)


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """'2,4,6' -> (2, 4, 6); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers like 2,4,6; got {text!r}") from None


def layer_list(text: str | None) -> tuple[int, ...] | str | None:
    """--teacher-layers: '2,4,6' -> (2, 4, 6), 'auto' stays 'auto', None stays None."""
    if text is not None and text.strip() == "auto":
        return "auto"
    return int_list(text, "--teacher-layers")


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

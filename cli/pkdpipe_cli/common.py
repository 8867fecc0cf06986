"""Shared bits of the CLI: options built from the config dataclasses, list parsing, the console."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from pkdpipe.errors import ConfigError
from pkdpipe.settings import flag as settings_flag
from pkdpipe.settings import kind_of, type_name

# Tables whole in a log file too: rich would cut them to 80 columns when stdout is not a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def command_line() -> str:
    return shlex.join(["pkdpipe", *sys.argv[1:]])


def option(config_class, name: str, *flags: str, required: bool = False, **kwargs):
    """The typer option of a config field: its default and help text are the field's (one source).

    A boolean gets a flag (`--quiet`, or `--normalize/--no-normalize` when it defaults to on); a
    tuple default is shown comma-separated, as it is typed."""
    field = next(f for f in option_fields(config_class) if f.name == name)
    default = ... if required or field.default is dataclasses.MISSING else field.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    flag = settings_flag(name)
    if isinstance(default, bool) and not flags:
        flags = (f"{flag}/--no-{flag[2:]}",) if default else (flag,)
    return typer.Option(default, *flags, help=field.metadata.get("help", ""), **kwargs)


def config_from(config_class, values: dict, **overrides):
    """`config_class` from a command's parameters (those that are its fields, list-valued ones parsed
    as `parse_cli` says), plus `overrides`."""
    fields = {f.name: f for f in option_fields(config_class)}
    typed = {k: parse_cli(fields[k], v) for k, v in values.items() if k in fields}
    return config_class(**typed, **overrides)


def parse_cli(field: dataclasses.Field, value):
    """A field's value as typed on the command line: '2,4,6' for a tuple of ints, 'train,dev' for a
    tuple of names, 'auto' or 'all' where the field's `cli` metadata allows it."""
    kind = field.metadata.get("cli")
    if not isinstance(value, str) or kind not in (*LIST_KINDS, "number"):
        return value
    flag = settings_flag(field.name)
    if kind == "number":
        return number_or_word(value, flag, field.metadata.get("words", ()))
    if kind == "names":
        return str_list(value)
    if value.strip() in field.metadata.get("words", ()):
        return value.strip()
    if value.strip() == "all" and kind == "ints-or-all":
        return None
    return int_list(value, flag)


_CLI_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}
LIST_KINDS = ("ints", "names", "ints-or-all")  # a field's `cli` metadata for a list typed with commas


def _cli_type(field: dataclasses.Field):
    """The type typer parses a field's option as: its own, or str for a list typed with commas."""
    if field.metadata.get("cli") in (*LIST_KINDS, "number"):
        return str
    return _CLI_TYPES.get(type_name(field), str)


def option_fields(config_class) -> list[dataclasses.Field]:
    """The fields a config's command takes as options: `config_class.option_fields()` where it says
    (distill: its own, then every registered strategy's settings, then the training loop's), else
    those it declares itself before those it inherits (distill's --strategy before the training
    loop's --lr), so that --help reads from the particular to the general."""
    if hasattr(config_class, "option_fields"):
        return config_class.option_fields()
    own = set(config_class.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(config_class)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def grid_option(field: dataclasses.Field):
    """A swept setting (`sweep=True`): comma-separated values (with --search asha also a range
    LOW:HIGH[:log] for a number), by default the setting's one value."""
    ranges = " With --search asha also a range LOW:HIGH or LOW:HIGH:log." if _ranged(field) else ""
    return typer.Option(
        str(field.default), help=f"Comma-separated values.{ranges} {field.metadata.get('help', '')}"
    )


def _ranged(field: dataclasses.Field) -> bool:
    return kind_of(field) in ("int", "float")


def config_options(
    config_class, *, skip: tuple[str, ...] = (), required: tuple[str, ...] = (), grid: bool = False
):
    """Give a command one option per field of `config_class` (its default and help text from the
    field, `option`), after the command's own parameters: the command is declared with those alone
    and `**values`, and gets every option's value in `values`. Fields marked `cli=False` (the
    recorded command line) and those in `skip` (the command's own, or not for this command) are
    left out. With `grid`, a setting a sweep may vary takes several values (`grid_option`, its
    text as typed). One declaration per setting, for every command that takes it."""

    def decorate(command):
        own = inspect.signature(command)
        mine = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
        taken = {p.name for p in mine} | set(skip)

        def signature() -> inspect.Signature:
            fields = [
                f
                for f in option_fields(config_class)
                if f.name not in taken and f.metadata.get("cli") is not False
            ]
            keyword = inspect.Parameter.KEYWORD_ONLY
            options = [
                inspect.Parameter(f.name, keyword, annotation=str, default=grid_option(f))
                if grid and f.metadata.get("sweep")
                else inspect.Parameter(f.name, keyword, annotation=_cli_type(f),
                                       default=option(config_class, f.name, required=f.name in required))
                for f in fields
            ]  # fmt: skip
            return own.replace(parameters=[*mine, *options])

        return _WithOptions(command, signature)

    return decorate


class _WithOptions:
    """A command whose signature (what typer makes options of) is drawn each time the CLI is built:
    a strategy registered after this module was imported still gets its options."""

    def __init__(self, command, signature):
        functools.update_wrapper(self, command)
        self._signature = signature

    @property
    def __signature__(self) -> inspect.Signature:
        return self._signature()

    def __call__(self, **values):
        return self.__wrapped__(**values)


def _shared_options():
    """Options and arguments that several commands take alike, declared once."""
    from pkdpipe.config import CacheConfig

    return (
        typer.Argument(..., help="Cache folder or key (its first hex digits are enough)."),
        option(CacheConfig, "cache_dir"),
        option(CacheConfig, "quiet"),
    )


CACHE_ARG, CACHE_DIR, QUIET = _shared_options()


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """'2,4,6' -> (2, 4, 6); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers like 2,4,6; got {text!r}") from None


def number_or_word(text: str, flag: str, words: tuple[str, ...]) -> float | str:
    """'3e-4' -> 0.0003; a word the option takes ('auto') stays as it is."""
    if text.strip() in words:
        return text.strip()
    try:
        return float(text)
    except ValueError:
        also = "".join(f" or {w}" for w in words)
        raise ConfigError(f"{flag} takes a number like 3e-4{also}; got {text!r}") from None


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
    """Metrics as a person reads them: percent (`pkdpipe.metrics.format_metrics`, the unit rule)."""
    from pkdpipe.metrics import format_metrics

    return format_metrics(metrics)

"""Progress bars and the final tables, in one place so every stage looks the same.

Bars go to stderr and only on rank 0; `quiet=True` (or PKDPIPE_QUIET=1) turns them off for scripts.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from pkdpipe import distributed

console = Console(stderr=True)


def _enabled(quiet: bool) -> bool:
    return not quiet and os.environ.get("PKDPIPE_QUIET") != "1" and distributed.is_main()


class _RateColumn(ProgressColumn):
    """Items per second, blank until rich has measured a speed."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


class _NullBar:
    def advance(self, n: float = 1, **fields) -> None:
        pass


class _Bar:
    def __init__(self, progress: Progress, task_id):
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1, **fields) -> None:
        self._progress.update(self._task, advance=n, **fields)


@contextmanager
def bar(description: str, total: int | None, unit: str = "ex", quiet: bool = False, extra: str = ""):
    """A progress bar with a rate column: `with bar("teacher", n) as b: b.advance(32)`.

    `extra` is a rich format string over task fields, e.g. "loss {task.fields[loss]:.3f}", which
    callers fill with `b.advance(n, loss=...)`.
    """
    if not _enabled(quiet):
        yield _NullBar()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=12 if extra else 40),
        MofNCompleteColumn(),
        _RateColumn(unit),
        *([] if extra else [TimeElapsedColumn()]),  # room for the loss terms on one line
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra, table_column=Column(no_wrap=True)))
    with Progress(*columns, console=console, transient=False) as progress:
        fields = {name: float("nan") for name in re.findall(r"task\.fields\[(\w+)\]", extra)}
        yield _Bar(progress, progress.add_task(description, total=total, **fields))


def info(message: str, quiet: bool = False) -> None:
    if _enabled(quiet):
        console.print(message)

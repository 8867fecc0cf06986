"""Progress on long work, in one place so every stage looks the same.

In a terminal: rich bars on stderr. Anywhere else (a log file, nohup, CI, a job scheduler): one
plain line every PROGRESS_EVERY seconds (30 unless $PKDPIPE_PROGRESS_EVERY says otherwise) and one
at the end, with the count, the rate, the time left and the stage's own fields (the loss terms),
never cut to a width. Only rank 0 reports; `quiet=True` (or PKDPIPE_QUIET=1) turns it all off.
"""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

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

console = Console(stderr=True)


def _every() -> float:
    return float(os.environ.get("PKDPIPE_PROGRESS_EVERY", "30"))


def _enabled(quiet: bool) -> bool:
    return not quiet and os.environ.get("PKDPIPE_QUIET") != "1" and _main_rank()


def _main_rank() -> bool:
    """Rank 0 of a torchrun job, or a single process. Without torch.distributed imported there is no
    process group, so the light commands (cache ls, info, verify) never import torch for this."""
    if "torch.distributed" not in sys.modules:
        return True
    from pkdpipe import distributed

    return distributed.is_main()


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


class _LineBar:
    """Progress as plain lines, for output that is not a terminal."""

    def __init__(self, description: str, total: int | None, unit: str, extra: str):
        self.description, self.total, self.unit, self.extra = description, total, unit, extra
        self.fields = {name: float("nan") for name in re.findall(r"task\.fields\[(\w+)\]", extra)}
        self.done = self.shown = 0.0
        self.started = self.last = time.monotonic()
        self.every = _every()

    def advance(self, n: float = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if time.monotonic() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        self.last, self.shown = time.monotonic(), self.done
        elapsed = self.last - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.done:,.0f}"]
        if self.total:
            parts[0] += f"/{self.total:,.0f} ({100 * self.done / self.total:.0f}%)"
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            parts.append(f"eta {_clock(left)}")
        parts.insert(1, f"{rate:,.2f} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.extra:
            parts.append(self.extra.format(task=SimpleNamespace(fields=self.fields)))
        sys.stderr.write("  ".join(parts) + "\n")
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: no rate yet
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def bar(description: str, total: int | None, unit: str = "ex", quiet: bool = False, extra: str = ""):
    """Progress of one stage: `with bar("teacher", n) as b: b.advance(32)`.

    `extra` is a format string over task fields, e.g. "loss {task.fields[loss]:.3f}", which callers
    fill with `b.advance(n, loss=...)`.
    """
    if not _enabled(quiet):
        yield _NullBar()
        return
    if not console.is_terminal:
        lines = _LineBar(description, total, unit, extra)
        yield lines
        if lines.shown != lines.done or not lines.done:
            lines.line()  # the final count
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
    """One message line on stderr, whole: a log file gets it unwrapped, a terminal wraps it itself."""
    if _enabled(quiet):
        console.print(message, soft_wrap=True)

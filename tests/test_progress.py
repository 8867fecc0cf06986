"""pkdpipe.progress: plain, whole lines when the output is a log file, not a terminal."""

from __future__ import annotations

import re

from pkdpipe import progress


def test_a_log_file_gets_periodic_whole_lines_with_rate_eta_and_fields(monkeypatch, capsys):
    monkeypatch.delenv("PKDPIPE_QUIET", raising=False)
    monkeypatch.setenv("PKDPIPE_PROGRESS_EVERY", "0")  # a line at every step
    extra = "loss {task.fields[loss]:.3f} ce {task.fields[ce]:.3f} lr {task.fields[lr]:.1e}"
    with progress.bar("train", 846, unit="step", extra=extra) as bar:
        for step in range(3):
            bar.advance(1, loss=3.5 - step, ce=3.0, lr=1e-4)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(
        r"train: 3/846 \(0%\)  [\d,.]+ step/s  eta \d+:\d\d:\d\d  elapsed \d+:\d\d:\d\d  "
        r"loss 1\.500 ce 3\.000 lr 1\.0e-04",
        lines[-1],
    ), lines[-1]
    assert max(len(line) for line in lines) > 80  # never cut to a terminal width


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("PKDPIPE_PROGRESS_EVERY", "0")
    with progress.bar("train", 10, quiet=True) as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""


def test_a_message_reaches_a_log_file_as_one_line(monkeypatch, capsys):
    monkeypatch.delenv("PKDPIPE_QUIET", raising=False)
    message = "cache: " + " ".join(f"word{i}" for i in range(40))  # 280 characters
    progress.info(message)
    assert capsys.readouterr().err == message + "\n"

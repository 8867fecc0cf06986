"""`pkdpipe distill` and `pkdpipe finetune` through the CLI: kill-and-resume, errors, help, defaults."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
from pkdpipe_cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from pkdpipe import checkpoint
from pkdpipe.checkpoint import load
from pkdpipe.config import DistillConfig, FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def _distill_args(cache, output, *extra: str) -> list[str]:
    return [
        "distill", "--cache", str(cache), "--strategy", "skip", "--layers", "2", "--output", str(output),
        "--epochs", "4", "--batch-size", "8", "--lr", "1e-3", "--checkpoint-every", "2", "--device", "cpu",
        "--quiet", *extra,
    ]  # fmt: skip


def _invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def _train_steps(output) -> list[int]:
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r]


# -- kill and resume -----------------------------------------------------------------------------
def test_a_killed_distill_resumes_to_the_weights_of_an_uninterrupted_run(tiny_cache, tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PKDPIPE_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pkdpipe", *_distill_args(tiny_cache, killed)],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            state = killed / "checkpoint" / "state.json"
            deadline = time.monotonic() + 120
            while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    # the kill really happened, mid-run: no final files, a checkpoint to resume from
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    assert not (killed / "metrics.json").exists() and not (killed / "model.safetensors").exists()
    assert (killed / "checkpoint").is_dir() or (killed / "checkpoint.old").is_dir()

    resumed_from = []

    def spy_load(*args, **kwargs):
        state = load(*args, **kwargs)
        resumed_from.append(state["step"])
        return state

    monkeypatch.setattr(checkpoint, "load", spy_load)
    resumed = _invoke(_distill_args(tiny_cache, killed))
    assert resumed.exit_code == 0, resumed.output
    assert len(resumed_from) == 1 and 0 < resumed_from[0] < 48  # it went on from the checkpoint
    monkeypatch.undo()
    straight = tmp_path / "straight"
    assert _invoke(_distill_args(tiny_cache, straight)).exit_code == 0

    a, b = load_file(str(killed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    steps = _train_steps(killed)
    assert steps == sorted(set(steps)) == _train_steps(straight) == [10, 20, 30, 40, 48]
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 48
    assert not any(p.name.startswith(("checkpoint", "best")) for p in killed.iterdir())


# -- errors are one line, no traceback -----------------------------------------------------------
def _error(result) -> str:
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: ")
    return line


def test_no_cache_under_the_root_is_one_error_line(tmp_path):
    result = runner.invoke(
        app, ["distill", "--cache-dir", str(tmp_path / "empty"), "--layers", "2", "--quiet"]
    )
    assert "no complete cache under" in _error(result)


def test_a_wrong_length_teacher_map_is_one_error_line(tiny_cache, tmp_path):
    args = _distill_args(tiny_cache, tmp_path / "out", "--teacher-layers", "1,2")
    assert "--teacher-layers needs K-1 = 1 layers, got 2" in _error(runner.invoke(app, args))
    assert not (tmp_path / "out").exists()


def test_a_teacher_map_that_is_not_numbers_is_one_error_line(tiny_cache, tmp_path):
    args = _distill_args(tiny_cache, tmp_path / "out", "--teacher-layers", "two")
    assert "--teacher-layers" in _error(runner.invoke(app, args))


def test_a_student_as_deep_as_the_teacher_is_one_error_line(tiny_cache, tmp_path):
    args = _distill_args(tiny_cache, tmp_path / "out")
    args[args.index("--layers") + 1] = "4"
    assert "is not below the teacher's 4 layers" in _error(runner.invoke(app, args))


# -- help and defaults ---------------------------------------------------------------------------
def test_distill_help_lists_the_strategies_and_options():
    result = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in (
        "--strategy",
        "last",
        "skip",
        "kd",
        "ft",
        "--teacher-layers",
        "--layers",
        "--checkpoint-every",
    ):
        assert text in result.output, text


@pytest.mark.parametrize(
    ("command", "config_class"), [("distill", DistillConfig), ("finetune", FinetuneConfig)]
)
def test_cli_defaults_match_the_config_defaults(command, config_class):
    from pkdpipe_cli.common import option_fields

    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    fields = {f.name: f for f in option_fields(config_class)}  # distill's: its strategies' settings too
    assert params["beta" if command == "distill" else "lr"].default is not None
    compared = 0
    for name, param in params.items():
        field = fields.get(name)
        if field is None or field.default is dataclasses.MISSING or param.required:
            continue
        if name == "teacher_layers":  # parsed from "2,4,6" by the CLI
            assert param.default is None and field.default is None
            continue
        assert param.default == field.default, name
        compared += 1
    assert compared >= 12
    if command == "distill":
        assert params["beta"].default == DistillConfig().beta == fields["beta"].default


# -- finetune ------------------------------------------------------------------------------------
def test_finetune_layers_cuts_the_model(tiny, tmp_path):
    output = tmp_path / "ft-2"
    args = [
        "finetune", "--task", tiny["task"], "--model", str(tiny["pretrained"]), "--layers", "2",
        "--output", str(output), "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 2
    record = json.loads((output / "pkdpipe_finetune.json").read_text())
    assert record["layers"] == 2 and record["base_model"] == str(tiny["pretrained"])
    assert record["command"].startswith("pkdpipe")  # under CliRunner the rest is pytest's own argv


def test_every_option_of_every_command_says_what_it_does():
    """Help that helps: no option without a help text, booleans are flags, and --version answers."""
    import click

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, (*prefix, name))
            else:
                yield " ".join((*prefix, name)), command

    root = typer.main.get_command(app)
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in commands(root)
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []
    flags = [p for p in root.commands["demo"].params if p.name == "quick"]
    assert flags and flags[0].is_flag
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("pkdpipe ")
    # help is plain text: rich markup would swallow "[CLS]"
    assert (
        "the [CLS] vectors" in runner.invoke(app, ["cache-teacher", "--help"], env={"COLUMNS": "200"}).output
    )


def test_every_setting_is_one_option_declared_once():
    """The commands' options come from the config dataclasses: every field but the recorded command
    line is an option of its command, with the field's help text, and no option line is written
    twice anywhere in cli/."""
    import re
    from pathlib import Path

    import click
    from pkdpipe_cli.common import option_fields
    from pkdpipe_cli.main import app

    from pkdpipe.config import CacheConfig, DistillConfig, EvaluateConfig, FinetuneConfig

    group = typer.main.get_command(app)
    commands = {"distill": DistillConfig, "finetune": FinetuneConfig, "cache-teacher": CacheConfig,
                "evaluate": EvaluateConfig}  # fmt: skip
    for name, config in commands.items():
        params = {p.name: p for p in group.get_command(click.Context(group), name).params}
        for field in option_fields(config):  # distill's: its strategies' settings too
            if field.name in ("command", "models", "strategy_settings"):
                continue
            assert field.name in params, (name, field.name)
            assert params[field.name].help == field.metadata["help"], (name, field.name)
    lines = [
        line.strip()
        for path in (Path(__file__).resolve().parents[2] / "cli").rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"\boption\(", line) and "def option" not in line
    ]
    assert len(lines) == len(set(lines)), sorted({line for line in lines if lines.count(line) > 1})

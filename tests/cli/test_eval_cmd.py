"""`pkdpipe evaluate` and `pkdpipe predict` through the CLI."""

from __future__ import annotations

import pytest
from pkdpipe_cli.main import app
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def test_evaluate_prints_the_comparison_table(tiny):
    teacher = str(tiny["teacher"])
    result = runner.invoke(
        app, ["evaluate", teacher, teacher, "--task", tiny["task"], "--device", "cpu", "--quiet"],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for text in ("accuracy", "parameters", "examples/s", "speed-up", "1.00x"):
        assert text in result.output, text


def test_predict_writes_a_submission(tiny, tmp_path):
    output = tmp_path / "tiny.tsv"
    args = ["predict", str(tiny["teacher"]), "--task", tiny["task"], "--output", str(output), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = output.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 13
    assert all(line.split("\t")[1] in ("neg", "neu", "pos") for line in lines[1:])

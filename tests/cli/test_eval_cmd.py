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


def test_a_model_that_always_answers_the_majority_class_is_flagged(tiny, tmp_path):
    """Accuracy alone hides it: on a skewed split a model that learned nothing can look fine."""
    import numpy as np
    import torch

    from pkdpipe.data import load_split
    from pkdpipe.models import load_classifier, load_tokenizer
    from pkdpipe.tasks import get_task

    labels = np.asarray(load_split(get_task(tiny["task"]), "dev").labels)
    majority = int(np.bincount(labels).argmax())
    model = load_classifier(str(tiny["teacher"]))
    with torch.no_grad():  # a head that ignores its input and always answers the majority label
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(majority), 3).float())
    constant = tmp_path / "constant"
    model.save_pretrained(str(constant))
    load_tokenizer(str(tiny["teacher"])).save_pretrained(str(constant))

    result = runner.invoke(
        app, ["evaluate", str(constant), "--task", tiny["task"], "--timing-rounds", "0", "--quiet"],
        env={"COLUMNS": "300"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    share = (labels == majority).mean()
    assert (
        f"warning: {constant}: the dev accuracy ({100 * share:.2f}) is no better than always answering "
        f"the majority class ({100 * share:.2f}): the model learned nothing"
    ) in " ".join(result.output.split())


def test_predict_writes_a_submission(tiny, tmp_path):
    output = tmp_path / "tiny.tsv"
    args = ["predict", str(tiny["teacher"]), "--task", tiny["task"], "--output", str(output), "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = output.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 13
    assert all(line.split("\t")[1] in ("neg", "neu", "pos") for line in lines[1:])


def test_a_missing_model_folder_is_named_before_any_data_or_hub_lookup(tmp_path, monkeypatch):
    """`evaluate /nonexistent --task sst2` used to retry the hub for a minute and then complain about
    the dataset; a path that can only be local is checked first and never sent to the hub."""
    import datasets
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError("looked up on the hub or loaded data")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    result = runner.invoke(app, ["evaluate", "/nonexistent", "--task", "sst2"])
    assert (
        result.exit_code == 1
        and result.output.strip() == "error: evaluate: model folder not found: /nonexistent"
    )
    result = runner.invoke(
        app, ["cache-teacher", "--task", "sst2", "--data-dir", str(tmp_path / "nope"), "--teacher", "./gone"]
    )
    assert result.output.strip() == f"error: --data-dir: data dir not found: {tmp_path / 'nope'}"

"""Teachers with missing weights, models scored against another label order, unreadable inputs and
a full disk under the training log: each is refused or reported in one line (issue 27, items 9-12),
never cached, scored or ended in a traceback."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_ok, one_error_line, pkdpipe
from safetensors.torch import load_file, save_file

from pkdpipe.cache.local import list_caches


def cache_teacher(tiny, teacher, root, *extra):
    return pkdpipe("cache-teacher", "--task", tiny["task"], "--teacher", teacher, "--cache-dir", root,
                   "--shard-size", 40, "--batch-size", 16, *extra)  # fmt: skip


# -- 9: a teacher must be whole ---------------------------------------------------------------------
def test_a_teacher_whose_weights_hold_fewer_layers_than_its_config_is_refused(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["num_hidden_layers"] = 6  # the weights hold 4
    (teacher / "config.json").write_text(json.dumps(config))
    line = one_error_line(cache_teacher(tiny, teacher, tmp_path / "root"))
    assert (
        "has no weights for" in line
        and "encoder.layer.4" in line
        and "fewer layers than num_hidden_layers" in line
    )
    assert list_caches(tmp_path / "root") == []


def test_a_pre_trained_encoder_without_a_trained_head_is_refused_unless_asked_for(tiny, tmp_path):
    line = one_error_line(cache_teacher(tiny, tiny["pretrained"], tmp_path / "root"))
    assert "has no trained classification head" in line and "pkdpipe finetune" in line
    assert list_caches(tmp_path / "root") == []
    assert_ok(cache_teacher(tiny, tiny["pretrained"], tmp_path / "root", "--untrained-head"))
    assert len(list_caches(tmp_path / "root")) == 1


# -- 10: scored by label name ------------------------------------------------------------------------
def _relabelled(teacher: Path, folder: Path, order: list[int], names: list[str] | None = None) -> Path:
    """The teacher with its classifier's rows and label names permuted alike (the same predictions,
    by name), or given other names."""
    shutil.copytree(teacher, folder)
    weights = load_file(str(folder / "model.safetensors"))
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = weights[key][order].contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    labels = [config["id2label"][str(i)] for i in order] if names is None else names
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _accuracy(model: Path, tiny) -> str:
    from pkdpipe.config import EvaluateConfig
    from pkdpipe.evaluate import evaluate

    (report,) = evaluate(EvaluateConfig(models=[str(model)], task=tiny["task"], timing_rounds=0, quiet=True))
    return report.metrics["accuracy"]


def test_evaluate_scores_a_model_by_its_label_names(tiny, tmp_path):
    from pkdpipe.errors import ModelError

    same = _accuracy(tiny["teacher"], tiny)
    reordered = _relabelled(tiny["teacher"], tmp_path / "reordered", [2, 0, 1])
    assert _accuracy(reordered, tiny) == same  # by position it would score other labels
    other = _relabelled(tiny["teacher"], tmp_path / "other", [0, 1, 2], ["cat", "dog", "fish"])
    with pytest.raises(ModelError, match="predicts other labels than task tiny has"):
        _accuracy(other, tiny)


# -- 11: unreadable inputs -------------------------------------------------------------------------
def unprivileged(*args, cwd: Path | None = None):
    """pkdpipe as a user whom file permissions bind: root without the capabilities that override
    them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), or the user itself when not root."""
    command = [sys.executable, "-m", "pkdpipe", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PKDPIPE_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    if os.geteuid() == 0:
        if not shutil.which("capsh"):
            pytest.skip("running as root without capsh: file permissions cannot bind this process")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what", ["data file", "task file", "weights"])
def test_an_unreadable_input_of_cache_teacher_is_one_line(tiny, tmp_path, what):
    data, teacher = tmp_path / "data", tmp_path / "teacher"
    shutil.copytree(tiny["data"], data)
    shutil.copytree(tiny["teacher"], teacher)
    locked = {
        "data file": data / "train.csv",
        "task file": data / "tiny.toml",
        "weights": teacher / "model.safetensors",
    }
    locked[what].chmod(0)
    result = unprivileged("cache-teacher", "--task", data / "tiny.toml", "--teacher", teacher,
                          "--cache-dir", tmp_path / "root", "--shard-size", 40)  # fmt: skip
    line = one_error_line(result)
    assert "permission denied" in line and locked[what].name in line and "No such file" not in line


def test_an_unreadable_shard_is_one_line_for_distill_and_verify(tiny_cache, tmp_path):
    cache = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, cache)
    shard = cache / "train-00001-of-00003.h5"
    shard.chmod(0)
    for args in (
        ["distill", "--cache", cache, "--layers", 2, "--output", tmp_path / "s"],
        ["cache", "verify", cache],
    ):
        line = one_error_line(unprivileged(*args))
        assert "permission denied" in line and shard.name in line


# -- 12: a full disk under the training log -----------------------------------------------------------
def test_a_full_disk_while_the_log_is_appended_is_one_line(tiny_cache, tmp_path):
    output = tmp_path / "student"
    result = pkdpipe("distill", "--cache", tiny_cache, "--layers", 2, "--output", output, "--epochs", 1,
                     "--batch-size", 8, "--checkpoint-every", 0, file_limit=150)  # fmt: skip
    line = one_error_line(result)
    assert "no space left on device while writing" in line and "train_log.jsonl" in line
    assert not (output / "model.safetensors").exists()

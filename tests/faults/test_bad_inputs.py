"""Inputs that used to be taken silently or end in a traceback: each is now one line, or a warning
where the run is valid but its result is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pkdpipe_cli.main import app
from typer.testing import CliRunner

from pkdpipe.cache import local
from pkdpipe.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def distill(cache, output, *extra):
    return invoke("distill", "--cache", cache, "--strategy", "skip", "--layers", 2, "--output", output,
                  "--epochs", 2, "--batch-size", 8, "--lr", "1e-3", "--quiet", *extra)  # fmt: skip


# -- a rerun with other settings -------------------------------------------------------------------
def test_a_checkpoint_of_other_settings_is_refused_with_what_differs(tiny_cache, tmp_path, monkeypatch):
    from pkdpipe import checkpoint

    output = tmp_path / "student"
    real_remove = checkpoint.remove
    monkeypatch.setattr(
        checkpoint, "remove", lambda folder: None
    )  # keep the last checkpoint, as a kill would
    assert distill(tiny_cache, output, "--checkpoint-every", 2).exit_code == 0
    monkeypatch.setattr(checkpoint, "remove", real_remove)
    line = error_line(distill(tiny_cache, output, "--lr", "5e-4"))
    assert "is the checkpoint of a run with other settings (lr 0.001 -> 0.0005)" in line
    assert "--no-resume" in line
    result = distill(tiny_cache, output, "--lr", "5e-4", "--no-resume")
    assert result.exit_code == 0, result.output
    assert json.loads((output / "pkdpipe_config.json").read_text())["config"]["lr"] == 5e-4


# -- labels a task file numbers --------------------------------------------------------------------
def _news_task(folder: Path, base: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["text,label", "stocks fell,3", "the match ended,2", "a new chip,4", "elections held,1"]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    (folder / "task.toml").write_text(
        'name = "news"\ntext_fields = ["text"]\nlabels = ["World", "Sports", "Business", "Sci/Tech"]\n'
        f'{base}[files]\ntrain = "train.csv"\n'
    )
    return folder / "task.toml"


def test_numbered_labels_need_label_base_and_then_map_without_a_shift(tmp_path):
    from pkdpipe.data import load_split
    from pkdpipe.tasks import load_task_file

    with pytest.raises(DataError, match=r"label '3' is not a label of task 'news'.*add label_base = 0 or 1"):
        load_split(load_task_file(_news_task(tmp_path / "plain")), "train")
    task = load_task_file(_news_task(tmp_path / "based", "label_base = 1\n"))
    examples = load_split(task, "train")
    assert [task.labels[i] for i in examples.labels] == ["Business", "Sports", "Sci/Tech", "World"]


# -- a model that learned nothing ------------------------------------------------------------------
def test_a_student_no_better_than_the_majority_class_is_flagged(tiny_cache, tmp_path):
    output = tmp_path / "student"
    result = invoke("distill", "--cache", tiny_cache, "--strategy", "ft", "--layers", 2, "--output", output,
                    "--epochs", 1, "--batch-size", 8, "--lr", "1e-9", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: the best dev accuracy" in result.output and "majority class" in result.output
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["dev_majority_baseline"]["accuracy"] == pytest.approx(1 / 3)
    assert metrics["warnings"] and "learned nothing" in metrics["warnings"][0]
    assert f"warning: {metrics['warnings'][0]}\n" in result.output  # one whole line, even in a log file
    assert "**Warning**: the best dev accuracy" in (output / "README.md").read_text()


# -- lengths past the model's positions ------------------------------------------------------------
def test_a_max_seq_len_past_the_models_positions_is_refused_up_front(tiny, tmp_path):
    line = error_line(invoke("cache-teacher", "--task", tiny["task"], "--teacher", tiny["teacher"],
                             "--cache-dir", tmp_path, "--max-seq-len", 600, "--quiet"))  # fmt: skip
    assert (
        f"--max-seq-len 600 is more than {tiny['teacher']} can take (128 positions): use 128 or less" in line
    )
    assert not list(tmp_path.rglob("*.h5"))
    line = error_line(invoke("finetune", "--task", tiny["task"], "--model", tiny["pretrained"],
                             "--output", tmp_path / "ft", "--max-seq-len", 100000, "--quiet"))  # fmt: skip
    assert "(128 positions)" in line


# -- which cache distill takes ---------------------------------------------------------------------
def test_distill_without_cache_takes_the_tasks_cache_and_never_another_tasks(tiny, tiny_cache, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_cache, root / tiny_cache.parent.name / tiny_cache.name)
    other = root / "sst2" / "0123456789abcdef"
    shutil.copytree(tiny_cache, other)  # a cache of another task, newer
    args = ["distill", "--cache-dir", root, "--strategy", "skip", "--layers", 2, "--max-steps", 1,
            "--output", tmp_path / "s", "--device", "cpu"]  # fmt: skip
    line = error_line(invoke(*args))
    assert "holds caches of several tasks (sst2, tiny): pass --task NAME or --cache PATH_OR_KEY" in line
    result = invoke(*args, "--task", tiny["task"])
    assert result.exit_code == 0, result.output
    chosen = json.loads((tmp_path / "s" / "pkdpipe_config.json").read_text())["cache"]
    assert chosen["key"] == tiny_cache.name and chosen["path"] == str(root / "tiny" / tiny_cache.name)


# -- gc and rm touch only what is pkdpipe's ---------------------------------------------------------
def test_gc_leaves_folders_that_are_not_caches(tiny_cache, tmp_path):
    folder = tmp_path / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)
    embeddings = tmp_path / "sst2" / "my_embeddings"
    embeddings.mkdir(parents=True)
    (embeddings / "vectors.h5").write_bytes(b"mine")
    results = tmp_path / "myproject" / "results"
    results.mkdir(parents=True)
    stale = folder / "train-00000-of-00002.h5"  # from a build with another --shard-size
    stale.write_bytes(b"old shard")
    assert dict(local.gc(tmp_path)) == {stale: 9}
    assert (embeddings / "vectors.h5").exists() and results.is_dir()


def test_rm_on_a_read_only_root_is_one_line(tiny_cache, tmp_path, monkeypatch):
    folder = tmp_path / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, folder)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", denied)
    line = error_line(invoke("cache", "rm", tiny_cache.name, "--cache-dir", tmp_path))
    assert line == f"error: cannot remove {folder}: Permission denied"

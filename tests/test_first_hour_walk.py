"""Issue 30, the rest of the walk: reruns, the log, the card, the report, --threads, and a tiny task
on which the default lr learns and the paper's 5e-5 does not. Each test failed on the code before."""

from __future__ import annotations

import csv
import json
import os
import random
import stat

import pytest
import torch
from conftest import _FILLER, REPO, write_tiny_bert
from pkdpipe_cli.main import app
from typer.testing import CliRunner

from pkdpipe import loop
from pkdpipe.config import EvaluateConfig, FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def _distill_args(cache, output, *more):
    return ("distill", "--cache", cache, "--strategy", "kd", "--layers", 2, "--output", output,
            "--epochs", 1, "--batch-size", 16, "--quiet", *more)  # fmt: skip


@pytest.fixture
def loud(monkeypatch):
    """Progress lines on (the suite runs with PKDPIPE_QUIET=1), as plain lines, every one shown."""
    monkeypatch.setenv("PKDPIPE_QUIET", "0")
    monkeypatch.setenv("PKDPIPE_PROGRESS_EVERY", "1000")  # under capsys stderr is no terminal: lines


# -- reruns ---------------------------------------------------------------------------------------
def test_a_rerun_of_a_finished_run_says_it_was_already_finished_and_trains_nothing(tiny_cache, tmp_path):
    output = tmp_path / "student"
    assert _invoke(*_distill_args(tiny_cache, output)).exit_code == 0
    weights = (output / "model.safetensors").stat().st_mtime_ns
    again = _invoke(*_distill_args(tiny_cache, output))
    assert again.exit_code == 0, again.output
    assert "nothing: already finished with these settings (--no-resume to train again)" in again.output
    assert (output / "model.safetensors").stat().st_mtime_ns == weights


_TRAIN_STEP = loop._Run.train_step


def _interrupt_at(monkeypatch, at_step: int) -> None:
    """Ctrl-C once the run reaches `at_step`, as a user would press it."""
    real = _TRAIN_STEP

    def step(self, batch):
        if self.state["step"] >= at_step:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(loop._Run, "train_step", step)


def test_an_interrupt_says_what_was_kept_and_never_promises_a_missing_checkpoint(
    tiny_cache, tmp_path, monkeypatch
):
    _interrupt_at(monkeypatch, 1)  # before any checkpoint
    early = _invoke(*_distill_args(tiny_cache, tmp_path / "early"))
    assert early.exit_code == 130
    assert "no checkpoint had been written yet" in early.output and "nothing was kept" in early.output
    assert "resume" not in early.output

    _interrupt_at(monkeypatch, 3)  # after the checkpoint of step 2
    later = _invoke(*_distill_args(tiny_cache, tmp_path / "later", "--checkpoint-every", 2))
    assert later.exit_code == 130
    assert "the checkpoint at step 2 is kept" in later.output and "resume from it" in later.output


# -- the log --------------------------------------------------------------------------------------
def test_each_evaluation_prints_a_dev_line(tiny_cache, tmp_path, distill_config, loud, capsys):
    from pkdpipe.train import distill

    distill(distill_config(tiny_cache, tmp_path / "s", strategy="kd", epochs=2, batch_size=16, quiet=False))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dev: ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("dev: step 6/12 accuracy ") and "(best accuracy " in lines[0]
    assert lines[1].startswith("dev: step 12/12 accuracy ") and lines[1].endswith(")")


def test_evaluate_says_each_timing_round(tiny, loud, capsys):
    from pkdpipe.evaluate import evaluate

    evaluate(EvaluateConfig(models=[str(tiny["teacher"])], task=tiny["task"], timing_rows=8, timing_rounds=2))
    err = capsys.readouterr().err
    assert "timing: round 1/2 done" in err and "timing: round 2/2 done" in err


def test_the_demo_prints_the_cache_stage_header_before_its_progress(
    tiny, tmp_path, monkeypatch, loud, capsys
):
    from pkdpipe.demo import DemoConfig, run_demo

    monkeypatch.setenv("PKDPIPE_CACHE_DIR", str(tmp_path / "cache-root"))
    run_demo(DemoConfig(run_dir=tmp_path / "demo", task=tiny["task"], data_dir=tiny["data"],
                        model=str(tiny["pretrained"]), student_layers=2, teacher_epochs=1, student_epochs=1,
                        batch_size=16, max_train=2))  # fmt: skip
    err = capsys.readouterr().err
    assert "[2/4] caching the teacher" in err
    assert err.index("[2/4] caching the teacher") < err.index("teacher train:") < err.index("[3/4]")


# -- the card -------------------------------------------------------------------------------------
def test_the_card_explains_dev_the_sample_and_max_steps_and_weights_are_world_readable(tiny, tmp_path):
    """BANKING77 has no dev split on the hub: pkdpipe carves it out of train, and the card says so."""
    from pkdpipe.train import finetune

    output = tmp_path / "ft"
    before = os.umask(0o022)
    try:
        finetune(FinetuneConfig(task="banking77", data_dir=REPO / "data" / "banking77", output=output,
                                model=str(tiny["pretrained"]), layers=1, train_rows=40, max_steps=3,
                                batch_size=8, max_seq_len=16, device="cpu", quiet=True))  # fmt: skip
    finally:
        os.umask(before)
    card = (output / "README.md").read_text()
    assert "Dev: 1,005 rows carved out of train (10% of each label, seed 0)" in card
    assert "the hub's `PolyAI/banking77` has no dev split" in card
    assert "a seeded sample of 40 rows (`--train-rows 40`), not the full train split" in card
    assert "local copy of the data (folder `banking77`)" in card
    assert "| max steps | 3 (--max-steps" in card and "| epochs |" not in card
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in output.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


def test_the_card_names_the_teacher_by_its_folder_and_origin(tiny, tiny_cache, tmp_path, distill_config):
    from pkdpipe.train import distill

    distill(distill_config(tiny_cache, tmp_path / "s", strategy="kd"))
    card = (tmp_path / "s" / "README.md").read_text()
    teacher = f"`{tiny['teacher'].parent.name}/teacher`, a local folder, fine-tuned from `pretrained`"
    assert f"- teacher: {teacher}" in card
    assert "Dev: 30 rows, the dataset's own dev split." in card and "Train: 96 rows." in card


# -- the report -----------------------------------------------------------------------------------
def test_the_report_says_why_a_panel_is_empty_and_draws_the_majority_class(
    tiny_cache, tmp_path, distill_config, monkeypatch
):
    from pkdpipe import report
    from pkdpipe.train import distill

    distill(distill_config(tiny_cache, tmp_path / "kd", strategy="kd"))
    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, output: drawn.setdefault("fig", fig))
    report.make_report([tmp_path / "kd"], tmp_path / "r.png")
    axes = {ax.get_title(): ax for ax in drawn["fig"].axes}
    assert [t.get_text() for t in axes["patient (pt)"].texts] == ["no patient term: strategy kd"]
    majority = json.loads((tmp_path / "kd" / "metrics.json").read_text())["dev_majority_baseline"]["accuracy"]
    for title in ("dev accuracy (%)", "best dev accuracy (%)"):
        lines = [ln for ln in axes[title].lines if ln.get_label() == "majority class"]
        assert lines and lines[0].get_ydata()[0] == pytest.approx(100 * majority)


# -- threads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["finetune", "cache-teacher", "distill", "evaluate", "sweep", "demo"])
def test_every_long_command_takes_threads(command):
    assert "--threads" in _invoke(command, "--help").output


def test_threads_set_torch_and_are_not_part_of_a_runs_identity(tiny_cache, tmp_path):
    output = tmp_path / "student"
    try:
        first = _invoke(*_distill_args(tiny_cache, output, "--threads", 2))
        assert first.exit_code == 0, first.output
        assert torch.get_num_threads() == 2
        again = _invoke(*_distill_args(tiny_cache, output, "--threads", 1))  # same run, other threads
        assert again.exit_code == 0 and "already finished" in again.output, again.output
    finally:
        torch.set_num_threads(1)
    record = json.loads((output / "pkdpipe_config.json").read_text())
    assert "threads" not in record["settings"] and record["config"]["threads"] == 2
    assert "error" in _invoke(*_distill_args(tiny_cache, tmp_path / "x", "--threads", -1)).output


# -- the default lr learns where the paper's does not ---------------------------------------------
def _good_or_bad(folder):
    """A task a tiny model can learn: the label is the one word 'good' or 'bad' placed among filler
    words. 60% of each split is 'good', so always answering 'good' scores 60."""
    rng = random.Random(7)
    folder.mkdir(parents=True)
    for split, n in (("train", 320), ("dev", 40)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                label = "good" if i % 5 < 3 else "bad"
                words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 8))]
                words.insert(rng.randrange(len(words) + 1), label)
                writer.writerow([" ".join(words), label])
    task = folder / "goodbad.toml"
    task.write_text('name = "goodbad"\ntext_fields = ["text"]\nlabel_field = "label"\n'
                    'labels = ["bad", "good"]\nmetric = "accuracy"\n'
                    '[files]\ntrain = "train.csv"\ndev = "dev.csv"\n')  # fmt: skip
    return task


def test_the_default_lr_learns_a_tiny_task_that_the_papers_5e_5_does_not(tmp_path):
    """finetune at --lr auto (5e-4 for a 2-layer, width-32 model) reaches 100 on dev within 10
    epochs (200 steps); at 5e-5 it stays at the majority class (60) and is told so."""
    from pkdpipe.train import finetune

    task = _good_or_bad(tmp_path / "data")
    model = write_tiny_bert(tmp_path / "pretrained", layers=2, hidden=32)

    def run(lr):
        config = FinetuneConfig(task=str(task), model=str(model), output=tmp_path / f"ft-{lr}", lr=lr,
                                epochs=10, batch_size=16, max_seq_len=16, device="cpu",
                                quiet=True)  # fmt: skip
        return finetune(config)

    default, paper = run("auto"), run(5e-5)
    assert default.metrics["accuracy"] >= 0.9 and not default.warnings
    assert paper.metrics["accuracy"] == pytest.approx(0.6)  # always 'good'
    assert "no better than always answering the majority class" in paper.warnings[0]

"""Issue 30, the first hour after the demo: --train-rows, local paths before the hub, one unit,
evaluate at the trained length, a learned-nothing warning that says what to try, --lr auto, and a
demo table that names its settings. Each test failed on the code before these changes."""

from __future__ import annotations

import json
import time

import pytest
from pkdpipe_cli.main import app
from typer.testing import CliRunner

from pkdpipe import learning_rate
from pkdpipe.config import CacheConfig, FinetuneConfig
from pkdpipe.data import load_split, sample_rows
from pkdpipe.errors import ConfigError
from pkdpipe.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


# -- 1. --train-rows ------------------------------------------------------------------------------
def test_a_train_sample_is_seeded_in_order_keeps_ids_and_leaves_dev_whole(tiny):
    task = get_task(tiny["task"])
    full = load_split(task, "train", tiny["data"])
    sample = load_split(task, "train", tiny["data"], train_rows=10)
    assert len(sample) == 10 and sample.ids == sorted(sample.ids) and set(sample.ids) <= set(full.ids)
    assert [full.text_a[full.ids.index(i)] for i in sample.ids] == sample.text_a
    assert sample_rows(full, 10).ids == sample.ids  # the same rows every time
    assert len(load_split(task, "dev", tiny["data"], train_rows=10)) == 30  # only train is sampled
    with pytest.raises(ConfigError, match="--train-rows 97: the train split has 96 rows"):
        load_split(task, "train", tiny["data"], train_rows=97)


def test_cache_teacher_train_rows_names_its_own_cache(tiny, tmp_path):
    from pkdpipe.teacher import cache_teacher

    def cache(**kw):
        return cache_teacher(CacheConfig(task=tiny["task"], teacher=str(tiny["teacher"]), cache_dir=tmp_path,
                                         shard_size=40, batch_size=16, quiet=True, **kw))  # fmt: skip

    sampled, full = cache(train_rows=20), cache()
    assert sampled.key != full.key
    assert sampled.manifest.splits["train"].examples == 20 and full.manifest.splits["train"].examples == 96
    assert sampled.manifest.dataset.train_rows == 20 and full.manifest.dataset.train_rows is None
    info = _invoke("cache", "info", sampled.path)
    assert "a seeded sample of 20 train rows" in info.output


def test_finetune_train_rows_trains_on_the_sample(tiny, tmp_path):
    from pkdpipe.train import finetune

    output = tmp_path / "ft"
    finetune(FinetuneConfig(task=tiny["task"], model=str(tiny["pretrained"]), output=output, layers=1,
                            train_rows=16, batch_size=8, epochs=1, max_seq_len=32, device="cpu",
                            quiet=True))  # fmt: skip
    assert json.loads((output / "metrics.json").read_text())["steps"] == 2  # 16 rows / batch 8
    help_text = _invoke("cache-teacher", "--help").output + _invoke("finetune", "--help").output
    assert help_text.count("--train-rows") == 2


# -- 2. local paths before the hub ----------------------------------------------------------------
def test_a_bad_data_folder_is_named_before_a_hub_model_is_asked_for(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    started = time.time()
    result = _invoke("finetune", "--task", tiny["task"], "--model", "some-org/some-model",
                     "--data-dir", tmp_path / "empty", "--quiet")  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "train file of task 'tiny' not found" in result.output, result.output
    assert time.time() - started < 20


def test_a_hub_failure_says_the_hub_is_unreachable_and_names_hf_hub_offline():
    from pkdpipe.models import _load_failed

    message = str(
        _load_failed("model", "bert-base-uncased", OSError("We couldn't connect to 'https://hf.co'"))
    )
    assert "hub is unreachable" in message and "HF_HUB_OFFLINE=1" in message and "local folder" in message
    assert "\n" not in message


# -- 3. one unit ----------------------------------------------------------------------------------
def test_summaries_and_warnings_show_percent_and_metrics_json_says_fraction(tiny_cache, tmp_path):
    output = tmp_path / "student"
    result = _invoke("distill", "--cache", tiny_cache, "--strategy", "ft", "--layers", 2, "--output", output,
                     "--epochs", 1, "--batch-size", 8, "--lr", "1e-9", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "metrics.json").read_text())
    shown = f"{100 * metrics['dev']['accuracy']:.2f}"
    assert f"accuracy {shown}" in result.output  # the summary
    assert f"best dev accuracy ({shown})" in metrics["warnings"][0]  # the warning
    assert metrics["metric_scale"] == "fraction"


# -- 4. evaluate at the trained length ------------------------------------------------------------
def test_evaluate_scores_a_model_at_the_length_it_was_trained_with(tiny, tmp_path):
    from pkdpipe.config import EvaluateConfig
    from pkdpipe.evaluate import evaluate, trained_length
    from pkdpipe.train import finetune

    output = tmp_path / "ft"
    finetune(FinetuneConfig(task=tiny["task"], model=str(tiny["pretrained"]), output=output, layers=1,
                            batch_size=16, epochs=1, max_seq_len=8, device="cpu", quiet=True))  # fmt: skip
    assert trained_length(output) == 8 and trained_length(tiny["teacher"]) == 128

    def score(**kw):
        config = EvaluateConfig(models=[str(output)], task=tiny["task"], timing_rounds=0, quiet=True, **kw)
        return evaluate(config)[0].metrics

    dev = json.loads((output / "metrics.json").read_text())["dev"]
    assert score() == score(max_seq_len=8) == pytest.approx(dev)


# -- 5. a run that learned nothing says what to try -----------------------------------------------
def test_a_run_that_learned_nothing_names_the_cause_and_the_command(tiny_cache, tmp_path):
    output = tmp_path / "student"
    result = _invoke("distill", "--cache", tiny_cache, "--strategy", "ft", "--layers", 2, "--output", output,
                     "--epochs", 1, "--batch-size", 8, "--lr", "1e-9", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    warning = json.loads((output / "metrics.json").read_text())["warnings"][0]
    assert "the loss stayed flat from the start: lr 1e-09 is likely too low" in warning
    assert "try: pkdpipe " in warning and warning.endswith(" --lr 0.0005 --no-resume")  # the run's own
    assert "--lr 1e-9" not in warning  # command (pytest's argv here), its --lr replaced


def test_an_under_trained_run_is_told_to_raise_the_lr():
    from pkdpipe.config import DistillConfig
    from pkdpipe.train import TrainResult, what_to_try

    config = DistillConfig(lr=5e-5, command="pkdpipe distill --task banking77 --lr 5e-5")
    falling = [4.3, 4.0, 3.6, 3.1]
    advice = what_to_try(TrainResult(None, {}, 40, 40, 1.0), config, falling, auto=5e-4)
    assert "under-trained" in advice and advice.endswith(
        "pkdpipe distill --task banking77 --lr 0.0005 --no-resume"
    )


# -- 6. --lr auto ---------------------------------------------------------------------------------
def test_lr_auto_rule_rests_on_the_measurements():
    assert learning_rate.auto_lr(3, 384)[0] == 5e-4  # the demo's MiniLM student
    assert learning_rate.auto_lr(3, 768)[0] == 3e-4  # MPNet 12 -> 3 on TREC
    assert learning_rate.auto_lr(6, 384)[0] == 3e-4  # the demo's teacher
    assert learning_rate.auto_lr(12, 768)[0] == 5e-5  # BERT-base: the paper's grid
    assert learning_rate.resolve(1e-4, 3, 384) == (1e-4, None)  # a number given wins


def test_the_default_lr_is_resolved_by_the_rule_and_recorded(tiny_cache, tmp_path, distill_config):
    """distill at the default lr trains at the rule's number (5e-4 for 2 layers of width 32), and
    its settings, config and card say that number and the rule that chose it."""
    from pkdpipe.config import DistillConfig
    from pkdpipe.train import distill

    assert DistillConfig().lr == FinetuneConfig(task="sst2", model="m").lr == "auto"
    distill(distill_config(tiny_cache, tmp_path / "auto", strategy="kd", lr="auto"))
    record = json.loads((tmp_path / "auto" / "pkdpipe_config.json").read_text())
    assert record["config"]["lr"] == 5e-4 and record["settings"]["lr"] == 5e-4
    assert record["lr_rule"].startswith("--lr auto: 0.0005 for 2 layers, hidden 32")
    assert "--lr auto: 0.0005" in (tmp_path / "auto" / "README.md").read_text()
    log = [json.loads(line) for line in (tmp_path / "auto" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log if "lr" in r) <= 5e-4 + 1e-12


# -- 7. the demo says its settings ----------------------------------------------------------------
def test_the_demo_table_names_its_settings_and_the_next_command_matches_them():
    from pkdpipe.demo import DemoConfig, next_command, settings_lines

    config = DemoConfig()
    lines = "\n".join(settings_lines(config))
    assert "student: PKD-skip, 3 layers, lr 0.0005, T 5, alpha 0.5, beta 0.5, 4 epochs" in lines
    assert "teacher: lr 0.0003, 2 epochs" in lines
    assert next_command(config) == (
        "pkdpipe distill --task banking77 --strategy kd --layers 3 --lr 0.0005 --temperature 5 --alpha 0.5 "
        "--beta 0.5 --epochs 4 --batch-size 32"
    )
    # the demo names its own cache: the task's newest may be another one by the time it is run
    assert next_command(config, cache_key="0bf109d8c07554d8").startswith(
        "pkdpipe distill --task banking77 --cache 0bf109d8c07554d8 --strategy kd"
    )
    assert " --cache k --cache-dir /c " in next_command(DemoConfig(cache_dir="/c"), cache_key="k")

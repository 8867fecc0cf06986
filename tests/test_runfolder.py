"""The run folder's schema: a run read back as one record, and "already done?" as one rule, the run
key, for runs written now and for runs written before keys were recorded. Fast: no training, the
folders are written by hand as a run (or an older pkdpipe) leaves them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pkdpipe import runfolder
from pkdpipe.errors import ConfigError

SETTINGS = {"task": "banking77", "lr": 0.0005, "epochs": 4, "alpha": 0.5, "cache_key": "abc"}


def _finished(folder: Path, stage: str = "distill", settings: dict | None = SETTINGS, key: bool = True):
    """A finished run as pkdpipe writes it (`key`) or as one written before run keys (no key)."""
    record = {"stage": stage, "config": {"strategy": "skip", "max_seq_len": 64}}
    if settings is not None:
        record["settings"] = settings
    folder.mkdir(parents=True)
    metrics = {"dev": {"accuracy": 0.5}, "best_step": 4, "steps": 8, "train_seconds": 1.5, "warnings": ["w"]}
    if key:
        return runfolder.write(folder, stage, record, metrics)
    (folder / runfolder.RECORDS[stage]).write_text(json.dumps(record))
    (folder / runfolder.METRICS).write_text(json.dumps(metrics))
    return runfolder.read(folder)


def test_the_run_key_is_the_settings_not_their_order_nor_a_whole_floats_spelling():
    key = runfolder.run_key(SETTINGS)
    assert len(key) == 16 and key == runfolder.run_key(dict(reversed(SETTINGS.items())))
    assert runfolder.run_key({**SETTINGS, "epochs": 4.0}) == key
    assert runfolder.run_key({**SETTINGS, "lr": 0.001}) != key
    assert runfolder.run_key({**SETTINGS, "seed": 1}) != key


def test_a_run_is_read_back_as_one_record(tmp_path):
    written = _finished(tmp_path / "run")
    run = runfolder.read(tmp_path / "run")
    assert run == written and run.stage == "distill" and run.finished
    assert json.loads((tmp_path / "run" / runfolder.DISTILL_RECORD).read_text())["run_key"] == run.key
    assert (run.dev, run.warnings, run.train_seconds) == ({"accuracy": 0.5}, ["w"], 1.5)
    assert (run.strategy, run.max_seq_len, run.key) == ("skip", 64, runfolder.run_key(SETTINGS))
    assert run.finished_as(runfolder.run_key(SETTINGS)) and not run.finished_as("0" * 16)
    with_test = runfolder.add_results(run, "test", {"accuracy": 0.4})
    assert (
        runfolder.read(tmp_path / "run").eval_results == {"test": {"accuracy": 0.4}} == with_test.eval_results
    )

    nothing = runfolder.read(tmp_path / "not-there")
    assert (nothing.stage, nothing.finished, nothing.key, nothing.dev, nothing.strategy) == (
        None, False, None, {}, "finetune"
    )  # fmt: skip


def test_a_run_written_before_run_keys_is_keyed_by_the_settings_it_recorded(tmp_path):
    old = _finished(tmp_path / "old", key=False)
    assert "run_key" not in old.record and old.key == runfolder.run_key(SETTINGS)
    with runfolder.claim(tmp_path / "old", "distill", SETTINGS, resume=True) as claim:
        assert claim.done == old  # the same settings: already finished, nothing to train
    with (
        pytest.raises(ConfigError, match=r"finished distill run with other settings \(lr 0.0005 -> 0.001\)"),
        runfolder.claim(tmp_path / "old", "distill", {**SETTINGS, "lr": 0.001}, resume=True),
    ):
        pass
    with runfolder.claim(tmp_path / "old", "distill", {**SETTINGS, "lr": 0.001}, resume=False) as claim:
        assert claim.done is None  # --no-resume: trained again, replacing it

    _finished(tmp_path / "unkeyed", settings=None, key=False)  # from before settings were recorded
    assert runfolder.read(tmp_path / "unkeyed").key is None
    with (
        pytest.raises(ConfigError, match=r"other settings \(settings not recorded\)"),
        runfolder.claim(tmp_path / "unkeyed", "distill", SETTINGS, resume=True),
    ):
        pass


def test_a_finetune_record_is_not_a_distill_run(tmp_path):
    _finished(tmp_path / "teacher", stage="finetune")
    assert runfolder.read(tmp_path / "teacher").stage == "finetune"
    assert runfolder.read(tmp_path / "teacher", "distill").stage is None
    with (
        pytest.raises(ConfigError, match="holds a model that no pkdpipe distill run made"),
        runfolder.claim(tmp_path / "teacher", "distill", SETTINGS, resume=True),
    ):
        pass


def test_a_checkpoint_is_resumable_by_the_run_of_its_key(tmp_path):
    ckpt = tmp_path / "run" / runfolder.CHECKPOINT
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"trainer": {"step": 2, "settings": SETTINGS}}))
    assert runfolder.resumable_as(tmp_path / "run", runfolder.run_key(SETTINGS))
    assert not runfolder.resumable_as(tmp_path / "run", runfolder.run_key({**SETTINGS, "lr": 1.0}))
    assert not runfolder.resumable_as(tmp_path / "elsewhere", runfolder.run_key(SETTINGS))


def test_the_demo_reuses_a_stage_by_its_run_key_and_data(tmp_path):
    from pkdpipe.demo import _done

    run = _finished(tmp_path / "teacher", stage="finetune")
    record = {**run.record, "data": {"data_dir": "quick-data"}}
    runfolder.write(run.folder, "finetune", record, run.metrics)
    key = runfolder.run_key(SETTINGS)
    assert _done(run.folder, key, tmp_path / "quick-data") and _done(run.folder, key)
    assert not _done(run.folder, key, tmp_path / "banking77")  # the --quick sample is other data
    assert not _done(run.folder, runfolder.run_key({**SETTINGS, "epochs": 2}), tmp_path / "quick-data")


def _trial(number, params, key=None, state="COMPLETE", repeat_of=None):
    attrs = {"run_key": key} if key else {}
    if repeat_of is not None:
        attrs["repeat_of"] = repeat_of
    return SimpleNamespace(number=number, params=params, user_attrs=attrs, state=SimpleNamespace(name=state))


def test_a_search_answers_a_trial_from_the_one_that_trained_its_run(tmp_path):
    """By run key: another strategy's setting drawn with a strategy that does not have it is the same
    run; a trial from before keys is matched by its settings."""
    from pkdpipe.search import _Budget, _tried

    trials = [_trial(0, {"strategy": "mine", "beta": 0.1}, key="k-mine"), _trial(1, {"beta": 0.5})]
    study = SimpleNamespace(get_trials=lambda deepcopy=False: trials)
    assert _tried(study, "k-mine", {"strategy": "mine", "beta": 0.5}).number == 0
    assert _tried(study, "k-other", {"beta": 0.5}).number == 1  # no key recorded: its settings
    assert _tried(study, "k-other", {"beta": 0.1}) is None
    # a space of 3 settings is spent once each was drawn, though only 2 runs trained
    trials.append(_trial(2, {"strategy": "mine", "beta": 0.5}, key="k-mine", repeat_of=0))
    assert not _Budget(10, 4).spent(study) and _Budget(10, 3).spent(study) and _Budget(2, 9).spent(study)

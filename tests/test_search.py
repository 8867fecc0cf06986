"""pkdpipe.search: `sweep --search asha` on Optuna; workers sharing a study; a killed worker's trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pkdpipe.errors import ConfigError

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_search_space_from_options():
    from pkdpipe.search import parse_param

    lr = parse_param("lr", "2e-5:2e-4:log")
    assert (lr.low, lr.high, lr.log, lr.choices) == (2e-5, 2e-4, True, None)
    assert parse_param("temperature", "5,10,20").choices == (5.0, 10.0, 20.0)
    assert parse_param("strategy", "skip,last").choices == ("skip", "last")
    assert parse_param("layers", "2,3").choices == (2, 3)
    assert parse_param("pt_space", "raw,standardized").choices == ("raw", "standardized")
    for name, text, message in (
        ("layers", "3.7", "takes whole numbers"),
        ("lr", "1e-3:1e-5", "is empty"),
        ("lr", "0:1e-3:log", "is empty"),
        ("dropout", "0.1", "cannot search over 'dropout'"),
        ("strategy", "a:b", "LOW:HIGH"),
        ("pt_space", "raw:centered", "^--pt-space: a range is LOW:HIGH"),  # spelled as typed
    ):
        with pytest.raises(ConfigError, match=message):
            parse_param(name, text)


def test_asha_runs_the_trials_and_stops_some_early(tiny_cache, tmp_path, distill_config):
    from pkdpipe.search import Param, search

    base = distill_config(tiny_cache, None, epochs=3)
    space = {"lr": Param("lr", low=1e-5, high=3e-3, log=True), "alpha": Param("alpha", choices=(0.2, 0.8))}
    records = search(base, space, trials=6, sweep_dir=tmp_path / "sweep", study_name="tiny", seed=0)
    done = [r for r in records if r.state in ("COMPLETE", "PRUNED")]
    assert len(done) == 6 and {r.state for r in records} <= {"COMPLETE", "PRUNED"}
    assert records[0].state == "COMPLETE" and (tmp_path / "sweep" / "study.db").is_file()
    best = records[0]
    assert (tmp_path / "sweep").joinpath(best.output).is_dir() and os.path.isfile(
        f"{best.output}/model.safetensors"
    )
    for r in records:
        assert r.epochs == 3 if r.state == "COMPLETE" else 1 <= r.epochs < 3  # pruned: cut short
        assert not os.path.exists(f"{r.output}/checkpoint")  # pruned trials are not kept resumable
    saved = json.loads((tmp_path / "sweep" / "search_results.json").read_text())
    assert [t["number"] for t in saved["trials"]] == [r.number for r in records]

    again = search(base, space, trials=6, sweep_dir=tmp_path / "sweep", study_name="tiny")
    assert [(r.number, r.state) for r in again] == [(r.number, r.state) for r in records]  # nothing rerun

    from pkdpipe_cli.main import app
    from typer.testing import CliRunner

    drawn = CliRunner().invoke(app, ["report", str(tmp_path / "sweep")])
    assert drawn.exit_code == 0, drawn.output
    assert (tmp_path / "sweep" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert f"best trial {records[0].number}: dev {100 * records[0].value:.2f}" in drawn.output


def test_settings_drawn_again_are_answered_from_the_trial_that_trained_them(
    tiny_cache, tmp_path, distill_config
):
    """TPE draws the same choices again and again over a small space; a student is fixed by its
    settings and seed, so a repeat trains nothing, and the search ends once every setting is tried."""
    from pkdpipe.search import Param, default_storage, search

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(study_name="tiny", storage=default_storage(sweep), direction="maximize")
    for alpha in (0.2, 0.2, 0.8):
        study.enqueue_trial({"alpha": alpha})
    base = distill_config(tiny_cache, None, epochs=2)
    records = search(base, {"alpha": Param("alpha", choices=(0.2, 0.8))}, 5, sweep, "tiny", seed=0)

    by_number = {r.number: r for r in records}
    assert sorted(by_number) == [0, 1, 2]  # 2 settings trained, then the space was spent, not 5 trials
    first, repeat = by_number[0], by_number[1]
    assert first.repeat_of is None and first.state == "COMPLETE" and first.epochs == 2
    assert (repeat.repeat_of, repeat.state, repeat.epochs) == (0, "COMPLETE", 0)  # nothing trained
    assert (repeat.value, repeat.output) == (first.value, first.output)
    assert sorted(p.name[:4] for p in sweep.iterdir() if p.is_dir()) == ["0000", "0002"]  # no folder for it


def _worker(tiny_cache, sweep, storage, trials, env, study="shared"):
    args = [sys.executable, "-m", "pkdpipe", "sweep", "--search", "asha", "--cache", str(tiny_cache),
            "--strategy", "skip", "--layers", "2", "--lr", "1e-4:3e-3:log", "--epochs", "2",
            "--batch-size", "8", "--trials", str(trials), "--study", study, "--storage", storage,
            "--output", str(sweep), "--device", "cpu", "--quiet"]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PKDPIPE_QUIET": "1", **extra}


def test_two_workers_share_one_study_and_run_no_trial_twice(tiny_cache, tmp_path):
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    workers = [_worker(tiny_cache, sweep, storage, 6, _env()) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 6 <= len(done) <= 7  # one extra at most: the two workers may both start a last trial
    settings = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(settings)) == len(settings)  # the workers did not draw the same settings


def test_a_killed_workers_trial_is_queued_again_and_finished_by_the_next(tiny_cache, tmp_path):
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'study.db'}"
    env = _env(PKDPIPE_SEARCH_HEARTBEAT="1")
    killed = _worker(
        tiny_cache, sweep, storage, 2, {**env, "PKDPIPE_KILL_AT": "between-renames:checkpoint#1"}
    )
    killed.communicate(timeout=600)
    assert killed.returncode == -9
    time.sleep(5)  # past the grace period of 4 heartbeats: the trial is taken for dead
    restarted = _worker(tiny_cache, sweep, storage, 2, env)
    _, err = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    states = [t.state.name for t in study.trials]
    trials = [(t.number, t.state.name, t.system_attrs) for t in study.trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") + states.count("PRUNED") == 2, trials
    retried = [
        t
        for t in study.trials
        if t.system_attrs.get("failed_trial") == 0 or t.params == study.trials[0].params
    ]
    assert len(retried) >= 2  # the dead trial's settings ran again, to the end


@pytest.mark.postgres
def test_two_workers_share_a_study_on_a_real_postgresql_server(tiny_cache, tmp_path, postgres_url):
    """The many-machine recipe, on one machine: two workers, one PostgreSQL study. Opt in with
    pytest -m postgres (.ci/run does): the fixture starts a server, or uses
    PKDPIPE_TEST_POSTGRES=postgresql://USER:PASSWORD@HOST/DB when it is set."""
    url = postgres_url
    name = f"shared-{os.getpid()}-{time.time_ns()}"
    workers = [_worker(tiny_cache, tmp_path / "sweep", url, 5, _env(), study=name) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 5 <= len(done) <= 6
    settings = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(settings)) == len(settings)


def test_a_search_whose_every_trial_fails_stops_with_the_reason(tiny_cache, tmp_path, distill_config):
    from pkdpipe.search import Param, search

    base = distill_config(tiny_cache, None, layers=4)  # as deep as the 4-layer teacher: no trial can run
    with pytest.raises(
        ConfigError, match=r"the last 3 trials of study deep failed; the last said: .*shallower"
    ):
        search(
            base,
            {"lr": Param("lr", low=1e-4, high=1e-3)},
            trials=5,
            sweep_dir=tmp_path / "s",
            study_name="deep",
        )
    saved = json.loads((tmp_path / "s" / "search_results.json").read_text())
    assert [t["state"] for t in saved["trials"]] == ["FAIL"] * 3  # the record of what was tried stays
    assert all("shallower" in t["error"] for t in saved["trials"])

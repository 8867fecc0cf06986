"""A strategy with a setting of its own, registered from a user's module (tests/plugins/my_strategy.py)
and loaded through $PKDPIPE_PLUGINS: `distill` trains it from the CLI, `sweep` grids over its
setting and `sweep --search asha` searches it, with no pkdpipe file changed. Real subprocesses, as
a user runs them; the settings' other consumers (run names, the resume check, the card) in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkdpipe import strategies
from pkdpipe.errors import ConfigError
from pkdpipe.settings import setting

PLUGIN = Path(__file__).parent / "plugins" / "my_strategy.py"


def _pkdpipe(*args: str, env_plugins: str = str(PLUGIN)) -> subprocess.CompletedProcess:
    env = {**os.environ, "PKDPIPE_PLUGINS": env_plugins, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pkdpipe", *args], env=env, capture_output=True, text=True)


@pytest.fixture
def mine():
    """The plugin registered in this process too, and dropped afterwards."""
    strategies.load_plugins(str(PLUGIN))
    yield strategies.get("mine")
    strategies._REGISTRY.pop("mine")


def _log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def test_a_plugin_strategy_trains_from_the_cli_with_its_own_setting(tiny, tiny_cache, tmp_path):
    output = tmp_path / "mine"
    args = ["distill", "--cache", str(tiny_cache), "--strategy", "mine", "--my-setting", "0.3",
            "--layers", "2", "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3", "--output", str(output),
            "--device", "cpu", "--quiet", "--checkpoint-every", "0"]  # fmt: skip
    done = _pkdpipe(*args)
    assert done.returncode == 0, done.stderr
    logged = [r for r in _log(output) if "loss" in r]
    assert logged and all(
        r["weight"] == pytest.approx(0.3) and "soft" in r for r in logged
    )  # the step saw 0.3
    meta = json.loads((output / "pkdpipe_config.json").read_text())
    assert (meta["config"]["my_setting"], meta["config"]["my_sharpness"]) == (0.3, 2.0)
    assert (meta["settings"]["my_setting"], meta["settings"]["my_sharpness"]) == (
        0.3,
        2.0,
    )  # the resume check's
    assert "alpha" not in meta["settings"]  # another strategy's settings are not this run's
    card = (output / "README.md").read_text()
    assert "| my_setting | 0.3 |" in card and "| my_sharpness | 2.0 |" in card and "| alpha |" not in card
    from pkdpipe.cards import render
    from pkdpipe.tasks import get_task

    assert "mine (not registered here" in render(output, get_task(tiny["task"]))  # a card made without it

    again = _pkdpipe(*args)  # the same settings: the finished run, nothing trained
    assert again.returncode == 0 and "already finished" in again.stderr + again.stdout
    changed = _pkdpipe(*[a if a != "0.3" else "0.4" for a in args])  # its own setting changes the run
    assert changed.returncode == 1 and "my_setting 0.3 -> 0.4" in changed.stderr

    missing = _pkdpipe("distill", "--help", env_plugins="no_such_plugin_module")
    assert (
        missing.returncode == 1 and "PKDPIPE_PLUGINS: cannot import no_such_plugin_module" in missing.stderr
    )


def test_a_plugin_setting_is_swept_over_a_grid_from_the_cli(tiny_cache, tmp_path):
    out = tmp_path / "sweep"
    done = _pkdpipe("sweep", "--cache", str(tiny_cache), "--strategy", "mine", "--my-setting", "0.1,0.5",
                    "--layers", "2", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3", "--output",
                    str(out), "--device", "cpu", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = json.loads((out / "sweep_results.json").read_text())["runs"]
    assert sorted(r["name"] for r in runs) == [
        "mine-2_my-setting0.1_sh2_lr0.001_s42",
        "mine-2_my-setting0.5_sh2_lr0.001_s42",
    ]
    for r in runs:
        assert "alpha" not in r and _log(Path(r["output"]))[0]["weight"] == pytest.approx(r["my_setting"])


def test_a_plugin_setting_is_searched_with_asha_from_the_cli(tiny_cache, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "search"
    done = _pkdpipe("sweep", "--search", "asha", "--cache", str(tiny_cache), "--strategy", "mine",
                    "--my-setting", "0.05:0.9", "--my-sharpness", "1,4", "--trials", "3", "--layers", "2",
                    "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--output", str(out), "--device",
                    "cpu", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    trials = json.loads((out / "search_results.json").read_text())["trials"]
    assert len(trials) >= 3 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}
    for t in trials:
        assert 0.05 <= t["settings"]["my_setting"] <= 0.9 and t["settings"]["my_sharpness"] in (1.0, 4.0)
        if t["repeat_of"] is None:
            assert Path(t["output"]).name.startswith(f"{t['number']:04d}_mine-2_my-setting")


def test_a_plugin_settings_are_one_option_each_and_checked(mine):
    from pkdpipe.config import DistillConfig, sweep_fields
    from pkdpipe.sweep import grid, grid_settings, run_name

    assert {"my_setting", "my_sharpness"} <= set(sweep_fields())
    config = DistillConfig(strategy="mine", my_setting=0.3)
    assert config.my_setting == 0.3 and config.strategy_settings == mine.settings(my_setting=0.3)
    with pytest.raises(ConfigError, match="--my-setting is not a setting of strategy 'skip'"):
        DistillConfig(strategy="skip", my_setting=0.3)
    # a grid over two strategies gives each its own settings only
    combos = grid({"strategy": ["kd", "mine"], "beta": [0.1, 1.0], "my_setting": [0.3]})
    assert combos == [{"strategy": "kd", "beta": 0.1}, {"strategy": "kd", "beta": 1.0},
                      {"strategy": "mine", "my_setting": 0.3}]  # fmt: skip
    # a search over two strategies: a fixed value that one of them lacks is theirs alone
    from pkdpipe.search import parse_param, split_space, trial_config

    texts = {"strategy": "skip,mine", "my_setting": "0.3", "beta": "0.1", "alpha": "0.5", "lr": "1e-4:1e-3"}
    searched, fixed = split_space({name: parse_param(name, text) for name, text in texts.items()})
    assert set(searched) == {"strategy", "my_setting", "beta", "lr"} and fixed == {
        "alpha": 0.5,
        "strategy": "skip",
    }
    base = DistillConfig(**fixed)
    trial = trial_config(base, {"strategy": "mine", "my_setting": 0.3, "beta": 0.1, "lr": 1e-4})
    assert trial.strategy_settings == mine.settings(my_setting=0.3) and trial.lr == 1e-4
    assert trial_config(base, {"strategy": "skip", "my_setting": 0.3, "beta": 0.1}).beta == 0.1
    # the built-in strategies' run names do not change with a plugin loaded
    assert (
        run_name(grid_settings(DistillConfig(strategy="skip", layers=3))) == "skip-3_a0.5_b0.5_t10_lrauto_s42"
    )
    with pytest.raises(ConfigError, match="differs from the one of that name"):
        strategies.register(strategies.Strategy("clash", "", ("loss",), _Clash, mine.make_step))


def test_a_yes_no_setting_is_swept_as_true_and_false(mine):
    from pkdpipe_cli.sweep_cmd import _values

    from pkdpipe.config import sweep_fields
    from pkdpipe.search import parse_param

    strategies.register(strategies.Strategy("flagged", "", ("loss",), _Flagged, mine.make_step))
    try:
        assert parse_param("my_flag", "true,false").choices == (True, False)
        assert _values(sweep_fields()["my_flag"], "True,0") == [True, False]
        with pytest.raises(ConfigError, match="--my-flag takes true or false"):
            _values(sweep_fields()["my_flag"], "maybe")
    finally:
        strategies._REGISTRY.pop("flagged")


@dataclass(frozen=True)
class _Clash:
    my_setting: int = 7  # mine's is a float with another default


@dataclass(frozen=True)
class _Flagged:
    my_flag: bool = setting(False, "A yes/no setting.", sweep=True)


def test_a_plugin_file_with_postponed_annotations_loads(tmp_path):
    """A user's .py file, loaded by path, whose settings are annotated as strings (`from __future__
    import annotations`): typed as written all the same."""
    from pkdpipe.config import sweep_fields

    plugin = tmp_path / "later_strategy.py"
    plugin.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from pkdpipe import strategies\n"
        "from pkdpipe.settings import setting\n"
        "@dataclass(frozen=True)\n"
        "class LaterSettings:\n"
        "    later_steps: int = setting(3, 'Steps of something.', sweep=True)\n"
        "strategies.register(strategies.Strategy('later', '', ('loss',), LaterSettings, lambda spec: None))\n"
    )
    try:
        assert strategies.load_plugins(f" {plugin} ,") == [str(plugin)]
        assert strategies.get("later").make_settings({"later_steps": 5}).later_steps == 5
        from pkdpipe.search import parse_param

        assert parse_param("later_steps", "2:4").low == 2 and "later_steps" in sweep_fields()
    finally:
        strategies._REGISTRY.pop("later", None)


def test_a_strategy_registered_after_the_cli_was_imported_gets_its_options(mine, tiny_cache, tmp_path):
    """The commands draw their options from the registry each time the CLI is built: a strategy a
    notebook registers after importing the CLI is trained through it in the same process."""
    from pkdpipe_cli.main import app
    from typer.testing import CliRunner

    output = tmp_path / "mine"
    args = ["distill", "--cache", str(tiny_cache), "--strategy", "mine", "--my-setting", "0.7",
            "--layers", "2", "--max-steps", "2", "--batch-size", "8", "--output", str(output),
            "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((output / "pkdpipe_config.json").read_text())["config"]["my_setting"] == 0.7
    strategies._REGISTRY.pop("mine")
    try:
        assert "--my-setting" not in CliRunner().invoke(app, ["distill", "--help"]).output
    finally:
        strategies.register(mine)

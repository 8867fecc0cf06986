"""`sweep` trains a grid from one cache and keeps finished runs; `report` draws them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from pkdpipe_cli.main import app
from typer.testing import CliRunner

from pkdpipe.errors import ConfigError
from pkdpipe.sweep import grid, run_name, sweep


def test_grid_is_the_cartesian_product_in_order():
    combos = grid({"alpha": [0.2, 0.7], "beta": [0.1, 1.0, 2.0]})
    assert len(combos) == 6
    assert combos[0] == {"alpha": 0.2, "beta": 0.1} and combos[-1] == {"alpha": 0.7, "beta": 2.0}


def test_grid_refuses_unknown_fields_and_empty_lists():
    with pytest.raises(ConfigError, match="cannot sweep over 'dropout'"):
        grid({"dropout": [0.1]})
    with pytest.raises(ConfigError, match="has no values"):
        grid({"alpha": []})


def test_run_names_differ_for_different_settings():
    a = {
        "strategy": "skip",
        "layers": 3,
        "alpha": 0.5,
        "beta": 0.1,
        "temperature": 5.0,
        "lr": 5e-5,
        "seed": 1,
    }
    assert run_name(a) == "skip-3_a0.5_b0.1_t5_lr5e-05_s1"
    assert run_name({**a, "beta": 1.0}) != run_name(a)
    # the paper's patient space keeps the names runs had before there were others
    assert run_name({**a, "pt_space": "raw"}) == run_name(a)
    assert run_name({**a, "pt_space": "standardized"}) == "skip-3_a0.5_b0.1_t5_lr5e-05_s1_standardized"


def test_a_sweep_over_patient_spaces_through_the_cli(planted_cache, tmp_path, one_thread):
    from pkdpipe_cli.main import app
    from typer.testing import CliRunner

    args = ["sweep", "--cache", str(planted_cache), "--strategy", "last", "--layers", "3", "--max-steps", "2",
            "--pt-space", "raw,standardized", "--teacher-layers", "auto", "--output", str(tmp_path / "sw"),
            "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "sw" / "sweep_results.json").read_text())["runs"]
    assert sorted(r["pt_space"] for r in runs) == ["raw", "standardized"]
    for r in runs:
        meta = json.loads((Path(r["output"]) / "pkdpipe_config.json").read_text())
        assert meta["config"]["pt_space"] == r["pt_space"] and meta["layer_map"]["teacher"] == [1, 3]


def test_sweep_trains_each_run_once_and_sorts_by_dev_metric(tiny_cache, tmp_path, distill_config, one_thread):
    base = distill_config(tiny_cache, None, max_steps=4)
    values = {"alpha": [0.2, 0.7], "lr": [1e-3, 1e-4]}
    runs = sweep(base, values, tmp_path / "sweep")
    assert len(runs) == 4 and not any(r.reused for r in runs)
    scores = [r.metrics["accuracy"] for r in runs]
    assert scores == sorted(scores, reverse=True)
    for r in runs:
        assert (r.output / "model.safetensors").is_file()
        saved = json.loads((r.output / "pkdpipe_config.json").read_text())["config"]
        assert (saved["alpha"], saved["lr"]) == (r.settings["alpha"], r.settings["lr"])
    table = json.loads((tmp_path / "sweep" / "sweep_results.json").read_text())
    assert [row["name"] for row in table["runs"]] == [r.name for r in runs]

    # a restarted sweep keeps the finished runs and trains only what is new
    again = sweep(base, {"alpha": [0.2, 0.7, 0.5], "lr": [1e-3]}, tmp_path / "sweep")
    assert sorted(r.reused for r in again) == [False, True, True]


def test_sweep_and_report_through_the_cli(tiny_cache, tmp_path, one_thread):
    runner = CliRunner()
    out = tmp_path / "sweep"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--cache",
            str(tiny_cache),
            "--strategy",
            "skip,kd",
            "--layers",
            "2",
            "--beta",
            "0.5",
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--output",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best:" in result.output
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in folders] == ["kd-2", "skip-2"]

    png = tmp_path / "report.png"
    result = runner.invoke(app, ["report", *map(str, folders), "--output", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kd-2" in result.output and "skip-2" in result.output


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "r.png")])
    assert result.exit_code == 1
    assert "has no train_log.jsonl" in result.output
    assert not (tmp_path / "r.png").exists()


def test_sweep_takes_the_full_training_options_and_whole_numbers_only(tiny_cache, tmp_path, one_thread):
    runner = CliRunner()
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", str(tiny_cache), "--strategy", "skip", "--layers", "2", "--max-steps", "2",
            "--batch-size", "8", "--output", str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    refused = runner.invoke(app, [*args[:6], "3.7", *args[7:]])
    assert refused.exit_code == 1 and "--layers takes comma-separated integers" in refused.output
    assert not out.exists()

    result = runner.invoke(app, [*args, "--warmup", "0.3", "--weight-decay", "0", "--no-normalize",
                                 "--student-init", str(tiny_cache), "--precision", "bf16"])  # fmt: skip
    assert result.exit_code == 1  # --student-init reached distill, which cannot load a cache as a model
    assert f"cannot load model from {tiny_cache}" in result.output
    result = runner.invoke(app, [*args, "--warmup", "0.3", "--weight-decay", "0", "--no-normalize",
                                 "--precision", "bf16", "--group-by-length"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    saved = json.loads((run / "pkdpipe_config.json").read_text())["config"]
    assert (saved["warmup"], saved["weight_decay"], saved["normalize"]) == (0.3, 0.0, False)
    assert (saved["precision"], saved["group_by_length"]) == ("bf16", True)


def test_report_goes_next_to_the_runs_and_draws_dev_metrics_in_percent(tmp_path, monkeypatch):
    from pkdpipe.report import make_report

    runs = tmp_path / "runs" / "banking77"
    for name, acc in (("skip-3", 0.81), ("kd-3", 0.77)):
        (runs / name).mkdir(parents=True)
        log = [{"step": 10, "loss": 2.0, "ce": 1.5}, {"step": 20, "dev_accuracy": acc}]
        (runs / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (runs / name / "metrics.json").write_text(json.dumps({"dev": {"accuracy": acc}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", str(runs / "skip-3"), str(runs / "kd-3")])
    assert result.exit_code == 0, result.output
    assert (runs / "report.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "report.png").exists()
    assert "best dev metrics (%)" in result.output and "81.00" in result.output
    read, output = make_report([runs / "kd-3"], tmp_path / "elsewhere.png")
    assert output == tmp_path / "elsewhere.png" and read[0]["dev"] == {"accuracy": 0.77}

    # a folder of runs stands for the runs inside it, by name; the PNG goes into that folder
    (runs / "report.png").unlink()
    (runs / "not-a-run").mkdir()
    result = CliRunner().invoke(app, ["report", str(runs)])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in make_report([runs], tmp_path / "x.png")[0]] == ["kd-3", "skip-3"]
    assert (runs / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in runs.iterdir() if p.is_file()] == ["report.png"]  # written whole, no scratch left


def test_a_sweep_worker_on_another_machine_pulls_the_cache_from_the_store(tiny_cache, tmp_path, one_thread):
    """`sweep --cache KEY --store URL` on a machine whose cache root is empty: the cache is pulled
    (checksums verified) into that root, then the runs train from it."""
    from pkdpipe.cache.store import push

    store = tmp_path / "team-store"
    push(tiny_cache, str(store), quiet=True)
    root = tmp_path / "elsewhere"
    key = tiny_cache.name
    args = ["sweep", "--cache", key[:8], "--cache-dir", str(root), "--store", str(store), "--layers", "2"]
    args += ["--max-steps", "2", "--batch-size", "8", "--output", str(tmp_path / "sweep"), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--strategy", "kd", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (root / tiny_cache.parent.name / key / "manifest.json").is_file()
    (run,) = (p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    saved = json.loads((run / "pkdpipe_config.json").read_text())["config"]
    assert saved["cache"] == str(root / tiny_cache.parent.name / key)

    # the cache is local now: a worker here without --store finds it by key
    local = CliRunner().invoke(app, [*args[:5], *args[7:], "--strategy", "kd", "--device", "cpu"])
    assert local.exit_code == 0, local.output


def test_a_restarted_sweep_does_not_keep_a_run_of_other_settings_under_the_same_name(
    tiny_cache, tmp_path, distill_config, one_thread
):
    """A finished run is kept by its run key, not because its folder holds metrics.json: the same
    name with another --epochs (not in the name) is another run, and distill says so."""
    base = distill_config(tiny_cache, None, max_steps=2)
    (first,) = sweep(base, {"alpha": [0.2]}, tmp_path / "sweep")
    (again,) = sweep(base, {"alpha": [0.2]}, tmp_path / "sweep")
    assert again.reused and again.metrics == first.metrics
    with pytest.raises(ConfigError, match="holds a finished distill run with other settings"):
        sweep(replace(base, epochs=base.epochs + 1), {"alpha": [0.2]}, tmp_path / "sweep")

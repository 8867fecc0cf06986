"""benchmarks/reproduce.py: the paper's four rows from one cache, run as a user runs it, on the tiny world."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reproduce.py"


def _benchmark_module(name: str = "reproduce"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_trains_the_four_rows_from_one_cache_and_tabulates_them(tiny, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        "--task",
        tiny["task"],
        "--data-dir",
        str(tiny["data"]),
        "--model",
        str(tiny["pretrained"]),
        "--layers",
        "2",
        "--seeds",
        "1,2",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--max-seq-len",
        "32",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]

    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["ft", "kd", "last", "skip"]
    for row in results["rows"].values():
        assert len(row["scores"]) == 2 and all(0 <= s <= 100 for s in row["scores"])
        assert row["mean"] == pytest.approx(statistics.mean(row["scores"]))
        assert row["sd"] == pytest.approx(statistics.stdev(row["scores"]))
    assert 0 <= results["teacher"]["accuracy"] <= 1
    assert set(results["times"]) == {"teacher finetune", "cache-teacher"}
    table = (out / "results.md").read_text()
    assert "| skip |" in table and str(SCRIPT.name) in results["command"]
    # the table says what learning nothing would score, and counts the runs that scored no more
    from pkdpipe.data import load_split
    from pkdpipe.tasks import get_task

    labels = load_split(get_task(tiny["task"]), "dev", tiny["data"]).labels
    majority = 100 * max(labels.count(label) for label in set(labels)) / len(labels)
    assert f"always answering the majority class: {majority:.2f}" in table.splitlines()[0]
    for row in results["rows"].values():
        assert row["no_better_than_majority"] == sum(s <= majority + 1e-7 for s in row["scores"])
    # each student was distilled from the one cache, with its row's strategy and seed
    caches = set()
    for row in ("ft", "kd", "last", "skip"):
        for seed in (1, 2):
            config = json.loads((out / "students" / f"{row}-2-s{seed}" / "pkdpipe_config.json").read_text())
            assert config["config"]["strategy"] == row and config["config"]["seed"] == seed
            caches.add(config["cache"]["key"])
    assert len(caches) == 1

    # a rerun reuses the teacher and every student: only the cache lookup and evaluation run again
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads((out / "results.json").read_text())
    assert set(again["times"]) == {"cache-teacher (reused, nothing built)"}  # not a build time
    assert {r: v["scores"] for r, v in again["rows"].items()} == {
        r: v["scores"] for r, v in results["rows"].items()
    }


def test_reproduce_tunes_each_row_over_the_fields_it_uses(tiny, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--task", tiny["task"], "--data-dir", str(tiny["data"]),
               "--model", str(tiny["pretrained"]), "--layers", "2", "--seeds", "1", "--rows", "ft,kd",
               "--teacher-epochs", "1", "--epochs", "1", "--lr", "1e-3", "--max-seq-len", "32",
               "--tune", "lr=1e-3,3e-3 alpha=0.5,0.9", "--threads", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["ft (tuned)"]["runs"] == 2 and rows["kd (tuned)"]["runs"] == 4  # ft has no alpha to tune
    for row in ("ft", "kd"):
        sweep = json.loads((out / "tune" / row / "sweep_results.json").read_text())["runs"]
        best = max(sweep, key=lambda r: r["accuracy"])
        assert rows[f"{row} (tuned)"]["folder"] == best["output"]
        assert 0 <= rows[f"{row} (tuned)"]["score"] <= 100
    assert "| kd, tuned: alpha " in (out / "results.md").read_text()
    # the grid point at the fixed rows' settings (lr 1e-3, alpha 0.5, seed 1) is the fixed student,
    # linked into the sweep rather than trained again
    for row in ("ft", "kd"):
        fixed = out / "students" / f"{row}-2-s1" / "model.safetensors"
        linked = out / "tune" / row / f"{row}-2_a0.5_b0.5_t5_lr0.001_s1" / "model.safetensors"
        assert linked.stat().st_ino == fixed.stat().st_ino


def test_bench_search_joins_its_parts_into_one_grid_against_each_search(tmp_path):
    """The grid run in two processes (one part per strategy) is one grid in the report: its best
    over both parts, its student-epochs the whole grid's; a search's share is against that, and its
    best settings are ranked where the grid put them."""
    bench = _benchmark_module("bench_search")
    best = {"lr": 2e-4, "beta": 0.5, "temperature": 10.0, "strategy": "skip"}
    last_top = {"lr": 5e-4, "beta": 2.0, "temperature": 20.0, "strategy": "last"}
    parts = {}
    fields = ("lr", "beta", "temperature")
    for strategy in ("last", "skip"):
        grid = [
            {**dict(zip(fields, v)), "strategy": strategy}
            for v in itertools.product(*(bench.SPACE[k] for k in fields))
        ]
        if strategy == "last":  # 80.0 up to 82.6
            devs = [80.0 + i / 10 for i in range(27)]
        else:  # 90 at the best settings, 85 elsewhere
            devs = [90.0 if s == best else 85.0 for s in grid]
        parts[f"grid-{strategy}"] = [{"settings": s, "dev": d, "epochs": 3} for s, d in zip(grid, devs)]
    parts["asha-0"] = [
        {"settings": best, "dev": 90.0, "epochs": 3},
        {"settings": last_top, "dev": 70.0, "epochs": 1, "pruned": True},
    ]
    parts["asha-1"] = [
        {"settings": last_top, "dev": 82.6, "epochs": 3},
        {"settings": last_top, "dev": 82.6, "epochs": 0, "repeat": True},  # answered, not trained
    ]
    (tmp_path / "parts").mkdir()
    for name, trained in parts.items():
        record = {"part": name, "trained": trained, "seconds": 600.0, "load_average": "2.0", "command": name}
        record["machine"] = ["machine: test"]
        (tmp_path / "parts" / f"{name}.json").write_text(json.dumps(record))

    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in bench.report(tmp_path, epochs=3).splitlines() if line.startswith("| ")}  # fmt: skip
    grid_row = ["54 runs", "90.00", "lr 0.0002 beta 0.5 T 10 skip", "162", "1.00", "20.0 min", "1"]
    assert rows["grid"] == grid_row
    assert rows["asha, seed 0"] == [
        "2 trials (1 pruned)",
        "90.00",
        "lr 0.0002 beta 0.5 T 10 skip",
        "4",
        "0.02",
        "10.0 min",
        "1",
    ]
    # the last strategy's best setting: under all 27 skip runs (85 and 90) in the grid
    assert rows["asha, seed 1"][:4] == [
        "1 trials (0 pruned) + 1 repeats",
        "82.60",
        "lr 0.0005 beta 2 T 20 last",
        "3",
    ]
    assert rows["asha, seed 1"][-1] == "28"


def test_bench_mnli_builds_its_task_and_times_the_first_and_last_tenth(tmp_path):
    """The MNLI-sized task repeats SST-2's phrases under unique ids through a task file, and the
    cache-teacher windows are whole batches, timed from the end of the batch before each."""
    bench = _benchmark_module("bench_mnli")
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    (sst2 / "train.tsv").write_text('sentence\tlabel\na fine film \t1\ndull , "flat" and long \t0\nok \t1\n')
    task_file = bench.write_task(sst2, tmp_path / "task", rows=7)

    from pkdpipe.data import load_split
    from pkdpipe.tasks import get_task

    task = get_task(str(task_file))
    train = load_split(task, "train", None)
    assert len(train) == 7 and len(set(train.ids)) == 7
    assert train.text_a[3] == "a fine film " and train.text_a[4] == 'dull , "flat" and long '
    assert list(train.labels) == [1, 0, 1, 1, 0, 1, 1]
    assert len(load_split(task, "dev", None)) == 3  # a dev file: nothing carved out of train

    # 100 batches of 10 rows; from row 900 on each forward takes 1 s (0.1 s before), and 0.1 s passes
    # between forwards throughout (what cache-teacher does besides the forward)
    records, now = [], 0.0
    for i in range(100):
        forward = 1.0 if i >= 90 else 0.1
        records.append((now, now + forward, 10, 5 if i < 10 else 40))
        now += forward + 0.1
    windows = bench.batch_windows(records)
    first, last = windows["first"], windows["last"]
    assert first["rows"] == (0, 100) and first["batches"] == 10 and first["mean_width"] == 5
    assert first["seconds"] == pytest.approx(10 * 0.2 - 0.1)  # from the first forward's start
    assert first["forward_share"] == pytest.approx(1.0 / 1.9)
    assert last["rows"] == (900, 1000) and last["batches"] == 10 and last["mean_width"] == 40
    assert last["seconds"] == pytest.approx(10 * 1.1) and last["rows_per_s"] == pytest.approx(100 / 11)
    assert last["forward_share"] == pytest.approx(1 / 1.1)

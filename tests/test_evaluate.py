"""pkdpipe.evaluate: metrics, size and speed of models side by side; GLUE-style predictions."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import LABELS

from pkdpipe.config import EvaluateConfig
from pkdpipe.data import load_split
from pkdpipe.evaluate import evaluate, predict, predict_logits, time_in_rounds
from pkdpipe.models import count_parameters, label_config, load_classifier, load_tokenizer
from pkdpipe.tasks import get_task
from pkdpipe.text import encode, pad_id_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny, tmp_path_factory):
    """A 2-layer classifier cut from the tiny pre-trained encoder, saved like a distilled student."""
    folder = tmp_path_factory.mktemp("student")
    torch.manual_seed(3)
    model = load_classifier(
        str(tiny["pretrained"]), fresh_head=True, num_hidden_layers=2, **label_config(tuple(LABELS))
    )
    model.save_pretrained(str(folder))
    load_tokenizer(str(tiny["pretrained"])).save_pretrained(str(folder))
    return folder


def _plain_logits(model_dir, texts: list[str]) -> np.ndarray:
    """One example at a time, no padding: the reference for batched, length-sorted inference."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return np.stack([model(**tokenizer(t, return_tensors="pt")).logits[0].numpy() for t in texts])


def test_predict_logits_come_back_in_the_split_order(tiny, student):
    task = get_task(tiny["task"])
    examples = load_split(task, "dev")
    tokenizer = load_tokenizer(str(student))
    encoded = encode(examples, tokenizer, 128)
    assert len(set(encoded.lengths().tolist())) > 1  # lengths vary, so sorting really reorders
    logits = predict_logits(load_classifier(str(student)), encoded, pad_id=pad_id_of(tokenizer), batch_size=4)
    np.testing.assert_allclose(logits, _plain_logits(student, examples.text_a), atol=1e-4)


def test_evaluate_reports_metrics_size_and_speed(tiny, student):
    task = get_task(tiny["task"])
    dev = load_split(task, "dev")
    reports = evaluate(
        EvaluateConfig(models=[str(tiny["teacher"]), str(student)], task=tiny["task"], quiet=True)
    )
    assert [r.model for r in reports] == [str(tiny["teacher"]), str(student)]
    share = max(dev.labels.count(label) for label in set(dev.labels)) / len(dev.labels)
    for report, folder in zip(reports, (tiny["teacher"], student), strict=True):
        expected = (_plain_logits(folder, dev.text_a).argmax(1) == np.asarray(dev.labels)).mean()
        assert report.metrics == {"accuracy": pytest.approx(expected)}
        assert report.parameters == count_parameters(load_classifier(str(folder)))
        assert report.examples_per_s > 0
        assert report.majority == {"accuracy": pytest.approx(share)}  # the floor its warnings use
    assert reports[0].speedup == 1.0 and reports[0].speedup_range == (1.0, 1.0)
    low, high = reports[1].speedup_range
    assert 0 < low <= reports[1].speedup <= high
    assert reports[1].parameters < reports[0].parameters
    assert torch.is_grad_enabled()


def test_predict_writes_one_named_label_per_test_example(tiny, student, tmp_path):
    task = get_task(tiny["task"])
    test = load_split(task, "test")
    path = predict(str(student), tiny["task"], "test", tmp_path / "sub" / "tiny.tsv", quiet=True)
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction"]
    assert [int(r[0]) for r in rows[1:]] == list(test.ids) and len(rows) == 1 + len(test) == 13
    expected = [LABELS[i] for i in _plain_logits(student, test.text_a).argmax(1)]
    assert [r[1] for r in rows[1:]] == expected
    assert not list(path.parent.glob("*.tmp"))


def test_models_are_timed_in_rounds_each_starting_with_another():
    """Round r starts with model r: on a shared machine a burst of load falls on every model alike,
    not on whichever was timed while it lasted."""
    calls = []
    runs = [lambda i=i: calls.append(i) for i in range(3)]
    seconds = time_in_rounds(runs, rounds=4)
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert [len(s) for s in seconds] == [4, 4, 4] and all(t >= 0 for s in seconds for t in s)


def test_the_speedup_is_the_median_of_per_round_ratios(tiny, student, monkeypatch):
    """A student timed at 1/2, 1/3 and 1/2 of the teacher's time in three rounds is 2x as fast, from
    2x to 3x, whatever the absolute times were."""
    import pkdpipe.evaluate as ev

    monkeypatch.setattr(
        ev, "time_in_rounds", lambda runs, rounds, on_round=None: [[6.0, 9.0, 4.0], [3.0, 3.0, 2.0]]
    )
    reports = evaluate(
        EvaluateConfig(models=[str(tiny["teacher"]), str(student)], task=tiny["task"], quiet=True)
    )
    assert reports[1].speedup == 2.0 and reports[1].speedup_range == (2.0, 3.0)
    rows = min(512, len(load_split(get_task(tiny["task"]), "dev")))
    assert reports[0].examples_per_s == pytest.approx(rows / 6.0)


def test_each_model_is_timed_on_the_same_sample_with_its_own_weights(tiny, student, monkeypatch):
    """With timing_rows 7 and 2 rounds: every model runs once on the whole split (its metrics), then
    twice on the same 7 examples; examples/s counts those 7 rows."""
    import pkdpipe.evaluate as ev

    calls = []
    real = ev.predict_logits

    def spy(model, encoded, **kwargs):
        calls.append((id(model), tuple(encoded.ids)))
        return real(model, encoded, **kwargs)

    monkeypatch.setattr(ev, "predict_logits", spy)
    models = [str(tiny["teacher"]), str(student)]
    reports = evaluate(
        EvaluateConfig(models=models, task=tiny["task"], quiet=True, timing_rows=7, timing_rounds=2)
    )
    dev = len(load_split(get_task(tiny["task"]), "dev"))
    whole = [c for c in calls if len(c[1]) == dev]
    timed = [c for c in calls if len(c[1]) == 7]
    assert len(whole) == 2 and len(timed) == 4
    teacher_id, student_id = (c[0] for c in whole)
    assert teacher_id != student_id
    assert sorted(c[0] for c in timed) == sorted([teacher_id, student_id] * 2)  # each with its own model
    assert len({c[1] for c in timed}) == 1  # the same examples for both
    assert [c[0] for c in timed] == [teacher_id, student_id, student_id, teacher_id]  # rotating
    for report in reports:
        assert report.examples_per_s > 0


def test_timing_rounds_0_scores_without_timing(tiny, student):
    models = [str(tiny["teacher"]), str(student)]
    reports = evaluate(EvaluateConfig(models=models, task=tiny["task"], quiet=True, timing_rounds=0))
    assert all(0 <= r.metrics["accuracy"] <= 1 for r in reports)
    assert all(math.isnan(r.examples_per_s) and math.isnan(r.speedup) for r in reports)

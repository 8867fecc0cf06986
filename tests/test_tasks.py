"""Tests for pkdpipe.tasks: the built-in registry and task files."""

import json
from pathlib import Path

import pytest

from pkdpipe.errors import ConfigError, DataError
from pkdpipe.tasks import Task, get_task, known_tasks

FIXTURES = Path(__file__).parent / "fixtures"
TASK_FILES = FIXTURES / "taskfiles"


def test_known_tasks():
    assert known_tasks() == [
        "cola",
        "sst2",
        "mrpc",
        "stsb",
        "qqp",
        "mnli",
        "qnli",
        "rte",
        "wnli",
        "banking77",
        "trec",
        "trec-fine",
    ]


def test_get_task_is_case_insensitive_and_knows_glue_spellings():
    assert get_task("SST2") is get_task("sst2")
    assert get_task("SST-2").name == "sst2"
    assert get_task("STS-B").name == "stsb"


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown task 'sst3'.*cola, sst2.*trec-fine.*task file"):
        get_task("sst3")


@pytest.mark.parametrize(
    "name, text_fields, labels, metrics",
    [
        ("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews",)),
        ("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        ("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        ("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        ("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",)),
        ("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        ("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
        ("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
    ],
)
def test_glue_classification_tasks(name, text_fields, labels, metrics):
    task = get_task(name)
    assert (task.text_fields, task.labels, task.metrics) == (text_fields, labels, metrics)
    assert task.main_metric == metrics[0]
    assert task.num_labels == len(labels) and not task.is_regression


def test_stsb_is_regression():
    task = get_task("stsb")
    assert task.labels is None and task.is_regression and task.num_labels == 1
    assert (task.metrics, task.main_metric) == (("pearson", "spearman"), "pearson")


def test_mnli_splits_and_hub_names():
    task = get_task("mnli")
    assert task.splits == ("train", "dev", "dev_mismatched", "test", "test_mismatched")
    assert task.hub_split("dev") == "validation_matched"
    assert task.hub_split("test_mismatched") == "test_mismatched"


def test_folder_only_tasks():
    banking, trec, fine = get_task("banking77"), get_task("trec"), get_task("trec-fine")
    assert banking.num_labels == 77 and banking.labels[:2] == ("card_arrival", "card_linking")
    assert trec.labels == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert fine.num_labels == 50 and list(fine.labels) == sorted(fine.labels)
    for task in (banking, trec, fine):
        assert task.hub_name is None and task.splits == ("train", "dev", "test")
        assert (task.dev_fraction, task.dev_seed) == (0.1, 0)


def test_fingerprint_dict_is_json_and_names_what_matters():
    fingerprint = get_task("banking77").fingerprint_dict()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["dev_carve_out"] == {"method": "stratified-sha256-v1", "fraction": 0.1, "seed": 0}
    assert get_task("sst2").fingerprint_dict()["dev_carve_out"] is None
    assert get_task("rte").fingerprint_dict() != get_task("qnli").fingerprint_dict()


def test_task_is_frozen():
    with pytest.raises(AttributeError):
        get_task("sst2").name = "other"  # type: ignore[misc]


# --- task files ----------------------------------------------------------------------------------------


def test_toml_task_file():
    task = get_task(str(TASK_FILES / "reviews.toml"))
    assert isinstance(task, Task)
    assert (task.name, task.text_fields, task.label_field) == ("reviews", ("text",), "sentiment")
    assert (task.labels, task.metrics, task.main_metric) == (("neg", "pos"), ("f1", "accuracy"), "f1")
    assert task.splits == ("train", "dev", "test") and task.dev_fraction is None
    assert task.task_dir == str(TASK_FILES.resolve())


def test_json_task_file_infers_labels_and_carves_dev():
    task = get_task(str(TASK_FILES / "stars.json"))
    assert task.name == "stars"  # the file's stem
    assert task.labels == ("1", "5", "10")  # numeric order, not string order
    assert task.splits == ("train", "dev", "test")
    assert (task.dev_fraction, task.dev_seed) == (0.5, 3)
    assert task.metrics == ("accuracy",)


def test_regression_task_file():
    task = get_task(str(TASK_FILES / "similarity.toml"))
    assert task.is_regression and task.metrics == ("pearson", "spearman")


def test_task_file_fingerprint_has_no_paths():
    text = json.dumps(get_task(str(TASK_FILES / "reviews.toml")).fingerprint_dict())
    assert str(TASK_FILES) not in text and "train.csv" not in text


def write_task(tmp_path: Path, body: str, name: str = "t.toml") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


FILES = '\n[files]\ntrain = "train.csv"\n'


@pytest.mark.parametrize(
    "body, message",
    [
        (
            'text_fields = ["text"]\nlabels = ["a", "b"]\n[files]\ntrain = "/etc/train.csv"\n',
            "must be relative",
        ),
        ('text_fields = ["text"]\nlabels = ["a", "b"]\n[files]\ntrain = "../train.csv"\n', r"may not leave"),
        (
            'text_fields = ["text"]\nlabels = ["a", "b"]\n[files]\ntrain = "train.xlsx"\n',
            "must end in one of",
        ),
        ('text_fields = ["text"]\nlabels = ["a", "b"]\n', r"missing \[files\]"),
        ('labels = ["a", "b"]' + FILES, "missing 'text_fields'"),
        ('text_fields = ["a", "b", "c"]\nlabels = ["a", "b"]' + FILES, "one or two fields"),
        (
            'text_fields = ["text"]\nlabels = ["a", "b"]\nlable_field = "y"' + FILES,
            "unknown key 'lable_field'",
        ),
        (
            'text_fields = ["text"]\nlabels = ["a", "b"]\nmetric = "bleu"' + FILES,
            "metric 'bleu' does not fit",
        ),
        ('text_fields = ["text"]\nlabels = ["a", "b", "c"]\nmetric = "f1"' + FILES, "exactly two labels"),
        (
            'text_fields = ["text"]\nregression = true\nmetric = "accuracy"' + FILES,
            "does not fit a regression",
        ),
        ('text_fields = ["text"]\nregression = true\nlabels = ["a", "b"]' + FILES, "has no labels"),
        ('text_fields = ["text"]\nlabels = ["a"]' + FILES, "at least two labels"),
        ('text_fields = ["text"]\nlabels = ["a", "a"]' + FILES, "duplicates"),
        ('name = "my task"\ntext_fields = ["text"]\nlabels = ["a", "b"]' + FILES, "name 'my task'"),
        ('text_fields = ["text"]\nlabels = ["a", "b"]\ndev_fraction = 1.5' + FILES, "dev_fraction must be"),
        ('text_fields = ["text"]\n[files]\ntest = "test.csv"\n', "no train file to infer"),
        ('text_fields = ["text"\n', "cannot be parsed"),
    ],
)
def test_bad_task_files(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message) as error:
        get_task(write_task(tmp_path, body))
    assert "t.toml" in str(error.value)


def test_bad_json_task_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be parsed"):
        get_task(write_task(tmp_path, '{"text_fields": ', name="t.json"))


def test_missing_task_file(tmp_path):
    with pytest.raises(ConfigError, match="task file not found: .*nothere.toml"):
        get_task(str(tmp_path / "nothere.toml"))


def test_label_inference_needs_the_train_file(tmp_path):
    with pytest.raises(DataError, match=r"train file .*train.csv not found"):
        get_task(write_task(tmp_path, 'text_fields = ["text"]' + FILES))


def test_task_checks_its_main_metric():
    with pytest.raises(ConfigError, match="main_metric 'f1' is not in"):
        Task("x", ("text",), "label", ("a", "b"), ("accuracy",), "f1", ("train",))

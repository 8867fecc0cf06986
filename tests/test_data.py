"""Tests for pkdpipe.data: every layout on tiny fixtures, every bad input's message, and the real data."""

import shutil
import sys
from pathlib import Path

import pytest

from pkdpipe.data import Examples, load_split
from pkdpipe.errors import ConfigError, DataError
from pkdpipe.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures"
CLASSIC = FIXTURES / "glue_classic"
HUB = FIXTURES / "glue_hub"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def load(task: str, split: str, data_dir: Path | str | None) -> Examples:
    return load_split(get_task(task), split, data_dir)


# --- classic GLUE TSV ---------------------------------------------------------------------------------


def test_classic_sst2_from_the_task_subfolder():
    train = load("sst2", "train", CLASSIC)  # finds CLASSIC/SST-2/train.tsv
    assert (train.task, train.split, len(train)) == ("sst2", "train", 4)
    assert train.ids == [0, 1, 2, 3] and train.labels == [0, 1, 0, 1] and train.text_b is None
    assert train.text_a[1] == '" a gem " , says the critic '  # quoting disabled: quotes stay text
    test = load("sst2", "test", CLASSIC / "SST-2")
    assert test.labels is None and test.text_a[0] == "uneasy mishmash of styles and genres ."


def test_classic_cola_has_no_header_in_train_and_dev():
    train = load("cola", "train", CLASSIC)
    assert train.labels == [1, 0, 1]
    assert train.text_a[0].startswith("Our friends won't buy")
    assert load("cola", "dev", CLASSIC).labels == [1, 0]
    assert load("cola", "test", CLASSIC).text_a == ["Bill whistled past the house."]


def test_classic_mnli_splits_and_label_names():
    train = load("mnli", "train", CLASSIC)
    assert train.labels == [1, 0, 0, 2]  # neutral, entailment, entailment, contradiction
    assert train.text_b[0] == "Product and geography are what make cream skimming work."
    assert load("mnli", "dev", CLASSIC).labels == [1]
    assert load("mnli", "dev_mismatched", CLASSIC).labels == [2]
    assert load("mnli", "test", CLASSIC).labels is None
    assert load("mnli", "test_mismatched", CLASSIC).text_a == ["She smiled back."]


def test_classic_mrpc_header_with_byte_order_mark():
    train = load("mrpc", "train", CLASSIC)
    assert train.labels == [1, 0]
    assert train.text_b[0].startswith('Referring to him as only " the witness "')


def test_classic_stsb_scores_are_floats():
    train = load("stsb", "train", CLASSIC)
    assert train.labels == [5.0, 3.8] and all(isinstance(label, float) for label in train.labels)


# --- hub layout ---------------------------------------------------------------------------------------


def test_hub_layout_tsv_with_csv_quoting():
    train = load("rte", "train", HUB)
    assert train.labels == [1, 0, 0]
    assert train.text_a[1] == 'He said "yes"\tto it.'  # quoted tab and doubled quotes
    assert train.text_a[2] == "A place of sorrow\nbecame a place of celebration."


def test_hub_layout_csv_and_jsonl_test_without_labels():
    dev = load("rte", "dev", HUB)  # validation.csv
    assert dev.split == "dev" and dev.labels == [1, 0]
    test = load("rte", "test", HUB)  # test.jsonl, label -1
    assert test.labels is None and len(test) == 2


def test_hub_layout_prefers_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    shutil.copy(HUB / "train.tsv", tmp_path / "train.tsv")
    table = pa.table({"sentence1": ["from parquet"], "sentence2": ["yes"], "label": [0], "idx": [0]})
    pq.write_table(table, tmp_path / "train.parquet")
    train = load("rte", "train", tmp_path)
    assert train.text_a == ["from parquet"] and train.labels == [0]


def test_hub_layout_json_array_for_mnli(tmp_path):
    (tmp_path / "validation_mismatched.json").write_text(
        '[{"premise": "A man.", "hypothesis": "A person.", "label": 0, "idx": 0}]'
    )
    dev = load("mnli", "dev_mismatched", tmp_path)
    assert (dev.text_a, dev.text_b, dev.labels) == (["A man."], ["A person."], [0])


def test_hub_layout_stsb_minus_one_means_unlabelled(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": -1.0, "idx": 0}\n')
    assert load("stsb", "test", tmp_path).labels is None


# --- hub (no data dir) --------------------------------------------------------------------------------


def go_offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also where datasets / huggingface_hub already read it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in ("datasets.config", "huggingface_hub.constants"):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "HF_HUB_OFFLINE", True)


def test_hub_unreachable_points_at_data_dir(monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(DataError, match=r"could not load nyu-mll/glue \(sst2, train\).*--data-dir DIR"):
        load("sst2", "train", None)


def test_hub_dataset_becomes_examples(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        rows = {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dev = load("mnli", "dev", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert (dev.ids, dev.text_a, dev.text_b, dev.labels) == ([0, 1], ["p0", "p1"], ["h0", "h1"], [2, 0])


def test_folder_only_task_needs_a_data_dir():
    with pytest.raises(DataError, match="needs --data-dir DIR"):
        load("trec", "train", None)


def test_banking77_without_a_data_dir_reads_the_bundled_copy(tmp_path, monkeypatch):
    """The README's next steps after the demo (`evaluate ... --task banking77`) need no --data-dir:
    the bundled data/banking77 is found from any working folder; without it, the usual error."""
    import pkdpipe.data as data

    monkeypatch.chdir(tmp_path)  # not the clone: found through pkdpipe's own location
    bundled = data.BUNDLED_DATA / "banking77"
    assert load("banking77", "test", None) == load("banking77", "test", bundled)
    monkeypatch.setattr(data, "BUNDLED_DATA", tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs --data-dir DIR"):
        load("banking77", "test", None)


# --- banking77, trec, task files ----------------------------------------------------------------------


def test_banking_dev_is_carved_out_of_train():
    train = load("banking77", "train", FIXTURES / "banking")
    dev = load("banking77", "dev", FIXTURES / "banking")
    assert sorted(train.ids + dev.ids) == list(range(9)) and not set(train.ids) & set(dev.ids)
    assert sorted(dev.labels) == [0, 1, 2]  # one of each label: 10% of 4, 3 and 2 rows rounds up to 1
    assert dev.split == "dev" and dev.text_a[dev.ids.index(3)] == "My card has not arrived,\nwhat now?"
    assert load("banking77", "dev", FIXTURES / "banking") == dev  # deterministic
    assert load("banking77", "test", FIXTURES / "banking").labels == [0, 2]


def test_banking_categories_file_must_match(tmp_path):
    shutil.copy(FIXTURES / "banking" / "train.csv", tmp_path / "train.csv")
    (tmp_path / "categories.json").write_text('["card_arrival", "card_linking"]')
    with pytest.raises(DataError, match=r"categories.json: label names differ .* task 'banking77'"):
        load("banking77", "train", tmp_path)


def test_trec_latin1_and_label_granularity():
    coarse = load("trec", "test", FIXTURES / "trec")
    assert coarse.labels == [5, 3]  # NUM, HUM
    assert load("trec-fine", "test", FIXTURES / "trec").labels == [40, 28]  # NUM:dist, HUM:desc
    train = load("trec", "train", FIXTURES / "trec")
    dev = load("trec", "dev", FIXTURES / "trec")
    assert len(train) + len(dev) == 8
    everything = {
        row_id: text for split in (train, dev) for row_id, text in zip(split.ids, split.text_a, strict=True)
    }
    assert "sister\u00f0city" in everything[2]


def test_task_file_reads_csv_tsv_and_jsonl():
    task = get_task(str(FIXTURES / "taskfiles" / "reviews.toml"))
    assert load_split(task, "train").labels == [1, 0, 1]
    dev = load_split(task, "dev")  # TSV with CSV quoting
    assert dev.text_a == ["Not bad\tat all", "Boring"]
    assert load_split(task, "test").labels is None  # no label column in a test file


def test_task_file_with_carved_dev_and_two_texts():
    task = get_task(str(FIXTURES / "taskfiles" / "stars.json"))
    train, dev = load_split(task, "train"), load_split(task, "dev")
    assert sorted(train.ids + dev.ids) == [0, 1, 2, 3, 4]
    assert sorted(dev.labels) == [0, 1]  # one each of "1" and "5"; the lone "10" stays in train
    assert train.text_b is not None


def test_regression_task_file_keeps_minus_one():
    task = get_task(str(FIXTURES / "taskfiles" / "similarity.toml"))
    rows = load_split(task, "train").labels + load_split(task, "dev").labels
    assert sorted(rows) == [-1.0, 0.5, 1.0, 4.5]


def test_task_file_files_are_relative_to_data_dir_when_given(tmp_path):
    task = get_task(str(FIXTURES / "taskfiles" / "reviews.toml"))
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "train.csv").write_text("text,sentiment\nelsewhere,neg\n")
    assert load_split(task, "train", tmp_path).text_a == ["elsewhere"]


# --- fingerprints -----------------------------------------------------------------------------------


def test_fingerprint_follows_content():
    first = load("sst2", "train", CLASSIC).fingerprint_dict()
    assert first == load("sst2", "train", CLASSIC).fingerprint_dict()
    assert first["num_examples"] == 4 and len(first["sha256"]) == 64
    changed = load("sst2", "train", CLASSIC)
    changed.labels[0] = 1
    assert changed.fingerprint_dict()["sha256"] != first["sha256"]


# --- bad inputs ---------------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return tmp_path


def test_unknown_label_names_value_file_and_line(tmp_path):
    write(tmp_path, "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(DataError, match=r"dev.tsv line 3: label '7' is not a label of task 'sst2'"):
        load("sst2", "dev", tmp_path)


def test_unknown_label_name_in_classic_mnli(tmp_path):
    header = "\t".join(["index", "sentence1", "sentence2", "gold_label"])
    write(tmp_path, "dev_matched.tsv", f"{header}\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=r"line 2: label 'maybe' .*entailment, neutral, contradiction"):
        load("mnli", "dev", tmp_path)


def test_empty_text_names_split_id_and_field(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\n   \t0\n")
    with pytest.raises(
        DataError, match=r"train.tsv line 3: empty text in field 'sentence' \(split 'train', id 1\)"
    ):
        load("sst2", "train", tmp_path)


def test_missing_column_lists_columns_present(tmp_path):
    write(tmp_path, "validation.csv", "sentence1,label,idx\na,0,0\n")
    with pytest.raises(
        DataError, match=r"validation.csv: no column 'sentence2' \(columns present: 'sentence1', 'label'"
    ):
        load("rte", "dev", tmp_path)


def test_missing_label_column_outside_test(tmp_path):
    write(tmp_path, "dev.tsv", "sentence\nonly text\n")
    with pytest.raises(DataError, match=r"dev.tsv: no column 'label' \(columns present: 'sentence'\)"):
        load("sst2", "dev", tmp_path)


def test_some_rows_unlabelled(tmp_path):
    write(tmp_path, "train.csv", "sentence,label,idx\na,0,0\nb,-1,1\n")
    with pytest.raises(DataError, match=r"train.csv line 3: no label in 'label' \(split 'train', id 1\)"):
        load("sst2", "train", tmp_path)


def test_wrong_number_of_fields(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\ngood\t1\ntab\tinside\t0\n")
    with pytest.raises(DataError, match=r"train.tsv line 3: 3 fields where the header has 2"):
        load("sst2", "train", tmp_path)


def test_missing_split_file(tmp_path):
    with pytest.raises(DataError, match=r"no dev file of task 'sst2' in .*validation.parquet.*dev.tsv"):
        load("sst2", "dev", tmp_path)


def test_missing_task_file_data(tmp_path):
    (tmp_path / "t.toml").write_text(
        'text_fields = ["text"]\nlabels = ["a", "b"]\n[files]\ntrain = "gone.csv"\n'
    )
    with pytest.raises(DataError, match=r"train file of task 't' not found: .*gone.csv"):
        load_split(get_task(str(tmp_path / "t.toml")), "train")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="data dir not found: .*nowhere"):
        load("sst2", "train", tmp_path / "nowhere")


def test_unknown_split():
    with pytest.raises(
        ConfigError, match=r"task 'sst2' has no split 'validation' \(splits: train, dev, test\)"
    ):
        load("sst2", "validation", CLASSIC)


def test_not_utf8(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match="train.tsv is not UTF-8 text"):
        load("sst2", "train", tmp_path)


def test_bad_jsonl_line(tmp_path):
    write(tmp_path, "test.jsonl", '{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}\n{oops\n')
    with pytest.raises(DataError, match="test.jsonl line 2: not valid JSON"):
        load("rte", "test", tmp_path)


def test_bad_trec_line(tmp_path):
    write(tmp_path, "TREC_10.label", "NUM:dist How far ?\nno label here\n")
    with pytest.raises(DataError, match=r"TREC_10.label line 2: expected 'COARSE:fine question'"):
        load("trec", "test", tmp_path)


def test_regression_label_not_a_number(tmp_path):
    write(tmp_path, "validation.csv", "sentence1,sentence2,label,idx\na,b,high,0\n")
    with pytest.raises(DataError, match=r"validation.csv line 2: label 'high' is not a number"):
        load("stsb", "dev", tmp_path)


# --- real data ($PKDPIPE_DATASETS) ------------------------------------------------------------------


def real(name: str) -> Path:
    folder = REAL / name
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder}")
    return folder


def test_real_sst2_classic():
    folder = real("sst2")
    train = load("sst2", "train", folder)
    assert len(train) == 67_349 and sum(train.labels) == 37_569
    assert len(load("sst2", "dev", folder)) == 872
    test = load("sst2", "test", folder)
    assert len(test) == 1_821 and test.labels is None


def test_real_rte_hub_layout_parquet_and_tsv_agree(tmp_path):
    folder = real("rte")
    splits = {split: load("rte", split, folder) for split in ("train", "dev", "test")}
    assert [len(examples) for examples in splits.values()] == [2_490, 277, 3_000]
    assert splits["test"].labels is None and splits["dev"].labels is not None
    for name in ("train.tsv", "dev.tsv"):  # the TSVs alone, read with CSV quoting
        shutil.copy(folder / name, tmp_path / name)
    for split in ("train", "dev"):
        assert load("rte", split, tmp_path).fingerprint_dict() == splits[split].fingerprint_dict()


def test_real_banking77_carve_out():
    folder = real("banking77")
    train, dev = load("banking77", "train", folder), load("banking77", "dev", folder)
    assert len(train) + len(dev) == 10_003 and len(load("banking77", "test", folder)) == 3_080
    assert not set(train.ids) & set(dev.ids)
    assert set(dev.labels) == set(range(77))  # stratified: every label in dev
    assert load("banking77", "dev", folder).ids == dev.ids  # deterministic


def test_real_trec():
    folder = real("trec")
    train, dev, test = (load("trec", split, folder) for split in ("train", "dev", "test"))
    assert len(train) + len(dev) == 5_452 and len(test) == 500
    assert set(train.labels) == set(dev.labels) == set(range(6))
    fine = [load("trec-fine", split, folder) for split in ("train", "dev")]
    assert set(fine[0].labels) | set(fine[1].labels) == set(range(50))

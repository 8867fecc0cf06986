"""Read one split of a task into an `Examples` object: ids, texts and label indices, columnar.

Where the data comes from (`load_split(task, split, data_dir)`):
- `data_dir=None`: GLUE tasks load from the Hugging Face hub (`datasets.load_dataset`); a task file
  reads its files relative to its own folder; banking77 and trec need a data dir.
- A GLUE data dir, in one of two layouts, found per split in `data_dir`, `data_dir/<GLUE folder>`
  (e.g. `SST-2/`) or `data_dir/<task name>/`:
  1. hub layout: `train`, `validation`, `test` (mnli: `validation_matched`, ...) with suffix
     .parquet, .jsonl, .json, .csv or .tsv, tried in that order; hub column names, integer labels,
     label -1 = unlabelled;
  2. classic GLUE TSV (GLUE's download script): `train.tsv`, `dev.tsv`, `test.tsv` (mnli:
     `dev_matched.tsv`, ...), read with quoting disabled; CoLA's train/dev have no header.
  A .tsv whose header has the hub's `idx` column and text fields is the hub layout, read with CSV
  quoting (e.g. a hub split saved with pandas); any other .tsv is classic.
- banking77 and task files: `[files]` of the task, .csv/.tsv (CSV quoting), .jsonl, .json (an array of
  objects, or JSON lines), .parquet; trec: `COARSE:fine question` lines in latin-1.

An example's id is its row index in the source file of its split (0-based, header and blank lines
excluded), so it stays the same whoever reads the file. Tasks without a dev file carve dev out of
train: see `_carve_out_dev_ids`; those dev examples keep their train ids and train leaves them out.

Labels become indices into `task.labels`: a value equal to a label name gives that name's index; an
integer gives itself when no label name looks like an integer (GLUE's 0/1 columns); -1 or an empty
value means "no label". A split with no label at all (GLUE test) has `labels=None`; a split with some
labelled rows and some not is an error. Every text must be non-empty after stripping whitespace.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkdpipe.errors import ConfigError, DataError
from pkdpipe.paths import hub_unreachable
from pkdpipe.tables import Table, read_delimited, read_table, value_text

if TYPE_CHECKING:
    from pkdpipe.tasks import Task

HUB_LAYOUT_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"  # a clone's data/ (BANKING77 ships there)


def bundled_data_dir(task: Task) -> Path | None:
    """The copy of `task`'s files bundled with pkdpipe (`data/<task>/` of the working folder or of the
    clone pkdpipe runs from), when every file of the task is there; None otherwise."""
    for folder in (Path("data") / task.name, BUNDLED_DATA / task.name):
        if task.files and all((folder / file).is_file() for _, file in task.files):
            return folder
    return None


"""Suffixes of hub-layout files, in order of preference (parquet is exact and fastest)."""


@dataclass
class Examples:
    """One split of one task, columnar: row i is (ids[i], text_a[i], text_b[i], labels[i])."""

    task: str  # the task's name
    split: str  # the split's name, e.g. "dev"
    ids: list[int]  # stable id: the row index in the split's source file (0-based, header excluded)
    text_a: list[str]  # the first text field
    text_b: list[str] | None  # the second text field; None for single-sentence tasks
    labels: list[int] | list[float] | None  # label indices, floats for regression; None when unlabelled

    def __post_init__(self) -> None:
        for name in ("text_a", "text_b", "labels"):
            column = getattr(self, name)
            if column is not None and len(column) != len(self.ids):
                raise ValueError(f"Examples.{name} has {len(column)} rows, ids has {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint_dict(self) -> dict:
        """A JSON-able summary whose `sha256` covers ids, texts and labels, in a canonical JSON form."""
        digest = hashlib.sha256()
        for name in ("ids", "text_a", "text_b", "labels"):
            digest.update(name.encode("ascii") + b"=")
            digest.update(json.dumps(getattr(self, name), separators=(",", ":")).encode("ascii"))
            digest.update(b"\n")
        return {
            "task": self.task,
            "split": self.split,
            "num_examples": len(self),
            "sha256": digest.hexdigest(),
        }


def load_split(task: Task, split: str, data_dir: str | Path | None = None, train_rows: int = 0) -> Examples:
    """Read `split` of `task` from `data_dir`, or from the hub / the task file's folder when None.
    `train_rows` N > 0 keeps a seeded sample of N rows of the train split (`sample_rows`)."""
    if split not in task.splits:
        raise ConfigError(f"task '{task.name}' has no split '{split}' (splits: {', '.join(task.splits)})")
    if task.dev_fraction is None or split not in ("train", "dev"):
        examples = _read_split(task, split, data_dir)
    else:
        full_train = _read_split(task, "train", data_dir)
        dev_ids = _carve_out_dev_ids(task, full_train)
        examples = _subset(full_train, split, dev_ids, inside=split == "dev")
    return sample_rows(examples, train_rows) if split == "train" and train_rows else examples


SAMPLE_SEED = 0
"""The seed of every `--train-rows` sample: finetune and cache-teacher draw the same rows, so a
teacher fine-tuned on a sample is cached on that sample."""


def sample_positions(total: int, rows: int, seed: int = SAMPLE_SEED) -> list[int]:
    """`rows` positions of `total` drawn at random with `seed`, in increasing order: the one rule
    behind `--train-rows` (finetune, cache-teacher, benchmarks/reproduce.py)."""
    if not 0 < rows <= total:
        raise ConfigError(f"--train-rows {rows}: the train split has {total} rows; take 1 to {total}")
    return sorted(random.Random(seed).sample(range(total), rows))


def sample_rows(examples: Examples, rows: int, seed: int = SAMPLE_SEED) -> Examples:
    """A seeded sample of `rows` examples, in their original order, keeping their ids (so a cache of
    it hashes differently from the full split's). Taken after the dev carve-out: dev stays whole,
    and a sample run's dev scores compare with the full run's."""
    keep = sample_positions(len(examples), rows, seed)
    return _subset(examples, examples.split, {examples.ids[i] for i in keep}, inside=True)


# --- which reader ------------------------------------------------------------------------------------


def _read_split(task: Task, split: str, data_dir: str | Path | None) -> Examples:
    """Examples of one split exactly as its source holds them (no carve-out)."""
    if data_dir is None:
        if task.hub_name is not None:
            return _from_hub(task, split)
        bundled = bundled_data_dir(task) if task.task_dir is None else None
        if bundled is not None:
            return _read_split(task, split, bundled)
        if task.task_dir is None:
            raise DataError(
                f"task '{task.name}' is read from a local folder: it needs --data-dir DIR "
                f"(with {', '.join(file for _, file in task.files)})"
            )
        base = Path(task.task_dir)
    else:
        base = Path(data_dir)
        if not base.is_dir():
            raise DataError(f"data dir not found: {base}")
    if task.source == "glue":
        return _from_glue_folder(task, split, base)
    path = base / _relative_file(task, split)
    if not path.is_file():
        raise DataError(f"{split} file of task '{task.name}' not found: {path}")
    if task.source == "trec":
        return _from_trec_file(task, split, path)
    _check_labels_file(task, base)
    table = read_table(path)
    return _build_examples(task, split, table, task.text_fields, task.label_field, hub_style=False)


def _relative_file(task: Task, split: str) -> str:
    """The file of `split` relative to the data folder."""
    file = task.file_for(split)
    if file is None:
        raise ConfigError(f"task '{task.name}' has no file for split '{split}'")
    return file


def _from_hub(task: Task, split: str) -> Examples:
    """Load a split with `datasets.load_dataset`; any failure is a DataError pointing at --data-dir."""
    hub_split = task.hub_split(split)
    source = f"{task.hub_name} ({task.hub_config}, {hub_split})"
    try:
        import datasets  # slow import, only on this path

        dataset = datasets.load_dataset(task.hub_name, task.hub_config, split=hub_split)
    except Exception as e:  # connection, offline mode, missing dataset: all mean "no hub data here"
        raise DataError(
            f"could not load {source}: {_hub_words(e)}; set HF_HUB_OFFLINE=1 (no minute of retries) "
            "and pass --data-dir DIR with a local copy of the data"
        ) from e
    wanted = [c for c in (*task.text_fields, task.label_field) if c in dataset.column_names]
    table = Table(source, dataset.select_columns(wanted).to_dict(), lines=None)
    return _build_examples(task, split, table, task.text_fields, task.label_field, hub_style=True)


def _hub_words(err: Exception) -> str:
    """'the Hugging Face hub is unreachable' when the exception says so, else its first line."""
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    if hub_unreachable(err):
        return f"the Hugging Face hub is unreachable ({type(err).__name__})"
    return f"the Hugging Face hub gave {type(err).__name__}: {reason}"


def _from_glue_folder(task: Task, split: str, base: Path) -> Examples:
    """A GLUE split from a local folder in the hub layout or the classic TSV layout."""
    path = _find_glue_file(task, split, base)
    if path.suffix.lower() != ".tsv" or _has_hub_header(path, task):
        table = read_table(path)
        return _build_examples(task, split, table, task.text_fields, task.label_field, hub_style=True)
    layout = task.classic
    headerless = layout.headerless_columns if not split.startswith("test") else ()
    table = read_delimited(path, "\t", csv.QUOTE_NONE, column_names=headerless or None)
    return _build_examples(task, split, table, layout.text_columns, layout.label_column, hub_style=False)


def _find_glue_file(task: Task, split: str, base: Path) -> Path:
    """The first hub-layout or classic file of `split` in `base` or a task subfolder of it."""
    hub_stem = task.hub_split(split)
    classic_name = dict(task.classic.files)[split]
    folders = [base, base / task.classic.folder, base / task.name]
    for folder in folders:
        candidates = [folder / f"{hub_stem}{suffix}" for suffix in HUB_LAYOUT_SUFFIXES]
        candidates.append(folder / classic_name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    raise DataError(
        f"no {split} file of task '{task.name}' in {base} (or its {task.classic.folder}/, {task.name}/): "
        f"looked for {hub_stem}.parquet/.jsonl/.json/.csv/.tsv and {classic_name}"
    )


def _has_hub_header(path: Path, task: Task) -> bool:
    """True when a TSV's header names the hub's `idx` column and the task's text fields."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = set(f.readline().rstrip("\r\n").split("\t"))
    return "idx" in header and all(field in header for field in task.text_fields)


def _from_trec_file(task: Task, split: str, path: Path) -> Examples:
    """TREC's `COARSE:fine question words` lines (latin-1); label_field picks coarse or fine."""
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    with open(path, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            label, _, text = line.rstrip("\r\n").partition(" ")
            if ":" not in label:
                raise DataError(f"{path} line {number}: expected 'COARSE:fine question', got {line[:40]!r}")
            labels.append(label.split(":")[0] if task.label_field == "coarse_label" else label)
            texts.append(text)
            lines.append(number)
    table = Table(str(path), {"text": texts, task.label_field: labels}, lines)
    return _build_examples(task, split, table, ("text",), task.label_field, hub_style=False)


def _check_labels_file(task: Task, base: Path) -> None:
    """When the data folder has the task's label-name file (banking77's categories.json), it must agree."""
    if task.labels_file is None or not (base / task.labels_file).is_file():
        return
    path = base / task.labels_file
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if names != list(task.labels):
        raise DataError(
            f"{path}: label names differ from the built-in {len(task.labels)} labels of task '{task.name}'"
        )


# --- checks and conversion --------------------------------------------------------------------------


def _build_examples(
    task: Task,
    split: str,
    table: Table,
    text_columns: tuple[str, ...],
    label_column: str,
    hub_style: bool,
) -> Examples:
    """Check texts and labels of a table and turn it into Examples (ids = row positions).

    The label column may be absent only from test splits. `hub_style` makes -1 mean "no label"
    for regression too (the hub's stsb test); for classification -1 always means "no label".
    """
    texts = [_checked_texts(table, split, column) for column in text_columns]
    if label_column in table.columns or not split.startswith("test"):
        labels = _converted_labels(task, split, table, label_column, hub_style)
    else:
        labels = None
    return Examples(
        task=task.name,
        split=split,
        ids=list(range(len(table))),
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=labels,
    )


def _checked_texts(table: Table, split: str, column: str) -> list[str]:
    """The column's values as strings; DataError at the first one that is empty after strip."""
    texts = []
    for row, value in enumerate(table.column(column)):
        text = "" if value is None else value if isinstance(value, str) else str(value)
        if not text.strip():
            raise DataError(f"{table.where(row)}: empty text in field '{column}' (split '{split}', id {row})")
        texts.append(text)
    return texts


def _converted_labels(
    task: Task, split: str, table: Table, column: str, hub_style: bool
) -> list[int] | list[float] | None:
    """Label indices (or floats); None when no row has a label; DataError when only some have one."""
    values = table.column(column)
    if task.is_regression:
        labels = [_regression_label(table, row, value, hub_style) for row, value in enumerate(values)]
    else:
        to_index = _label_index_map(task)
        labels = [_class_label(task, table, row, value, to_index) for row, value in enumerate(values)]
    missing = [row for row, label in enumerate(labels) if label is None]
    if len(missing) == len(labels):
        return None
    if missing:
        raise DataError(
            f"{table.where(missing[0])}: no label in '{column}' (split '{split}', id {missing[0]}), "
            "but other rows have one"
        )
    return labels


def _label_index_map(task: Task) -> dict[str, int]:
    """Raw label text -> index: every label name, plus the numbers base..base+n-1 when the task's data
    numbers its labels (GLUE's 0/1 columns; a task file's label_base) and no name is a number."""
    to_index = {name: index for index, name in enumerate(task.labels)}
    if task.label_base is not None and not any(_is_integer(name) for name in task.labels):
        to_index.update({str(index + task.label_base): index for index in range(len(task.labels))})
    to_index.setdefault("-1", -1)  # the hub's "no label"
    return to_index


def _class_label(task: Task, table: Table, row: int, value: Any, to_index: dict[str, int]) -> int | None:
    """One label's index, or None when the row has no label."""
    text = value_text(value)
    if text == "":
        return None
    index = to_index.get(text)
    if index is None:
        shown = ", ".join(task.labels[:8]) + (
            f", ... ({len(task.labels)} labels)" if len(task.labels) > 8 else ""
        )
        hint = ""
        if _is_integer(text) and task.label_base is None:
            hint = (
                "; numbers in a file are read as label names: if the file numbers the labels, "
                "add label_base = 0 or 1 to the task file"
            )
        raise DataError(
            f"{table.where(row)}: label {text!r} is not a label of task '{task.name}' ({shown}){hint}"
        )
    return None if index == -1 else index


def _regression_label(table: Table, row: int, value: Any, hub_style: bool) -> float | None:
    """One regression target, or None when the row has none."""
    text = value_text(value)
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        raise DataError(f"{table.where(row)}: label {text!r} is not a number") from None
    if math.isnan(number) or (hub_style and number == -1.0):
        return None
    return number


def _is_integer(text: str) -> bool:
    """True for '0', '12', '-1'."""
    return text.lstrip("-").isdigit()


# --- dev carve-out ---------------------------------------------------------------------------------


def _carve_out_dev_ids(task: Task, train: Examples) -> set[int]:
    """The train ids that form dev: a fixed, stratified, seeded share of every label.

    Each label's train rows are ordered by sha256 of "<seed>:<id>" and the first
    round(fraction * n) of them (at least one, and never all, when the label has two or more rows) go
    to dev. Hashing instead of a random generator keeps the split identical on every machine and
    numpy version. Regression tasks treat all rows as one group.
    """
    if train.labels is None:
        raise DataError(
            f"the train split of task '{task.name}' has no labels: cannot carve a dev split out of it"
        )
    groups: dict[Any, list[int]] = {}
    for row_id, label in zip(train.ids, train.labels, strict=True):
        groups.setdefault(0 if task.is_regression else label, []).append(row_id)
    dev_ids: set[int] = set()
    for members in groups.values():
        count = _dev_count(len(members), task.dev_fraction)
        ordered = sorted(members, key=lambda row_id: _carve_out_key(task.dev_seed, row_id))
        dev_ids.update(ordered[:count])
    return dev_ids


def _dev_count(size: int, fraction: float) -> int:
    """How many of a label's `size` train rows go to dev."""
    if size < 2:
        return 0
    return min(size - 1, max(1, math.floor(size * fraction + 0.5)))


def _carve_out_key(seed: int, row_id: int) -> bytes:
    """The sort key that shuffles rows for the carve-out."""
    return hashlib.sha256(f"{seed}:{row_id}".encode("ascii")).digest()


def _subset(examples: Examples, split: str, ids: set[int], inside: bool) -> Examples:
    """The examples whose id is (inside=True) or is not (inside=False) in `ids`, in file order."""
    rows = [row for row, row_id in enumerate(examples.ids) if (row_id in ids) == inside]

    def pick(column: list | None) -> list | None:
        return None if column is None else [column[row] for row in rows]

    return Examples(
        task=examples.task,
        split=split,
        ids=pick(examples.ids),
        text_a=pick(examples.text_a),
        text_b=pick(examples.text_b),
        labels=pick(examples.labels),
    )

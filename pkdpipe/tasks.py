"""The tasks pkdpipe knows: what to read, which labels, how to score.

A `Task` says which fields hold the text, which holds the label, the label names in index order
(None for regression), the metrics and the splits a user may ask for. `pkdpipe.data.load_split`
reads one split of a task; this module only describes tasks.

Built in (`known_tasks()`):
- The GLUE tasks cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli: from the Hugging Face hub
  (`nyu-mll/glue`) or a local folder, in either the hub layout or the classic GLUE TSV layout.
  Labels are the hub's names in the hub's index order. mrpc and qqp report F1 and accuracy and
  pick checkpoints by F1 (the first number in the paper's "F1/acc" columns); stsb picks by Pearson.
- banking77 (77 intents, names and order as in the dataset's categories.json) and trec / trec-fine
  (6 coarse and 50 fine question types, sorted): local folder only, no dev file, so dev is carved
  out of train (see `Task.dev_fraction`).

Any other dataset is described by a task file (TOML or JSON):

    name = "reviews"                 # optional, default: the file's stem; also the cache folder name
    text_fields = ["text"]           # one field, or two for sentence pairs
    label_field = "label"            # optional, default "label"
    labels = ["neg", "pos"]          # optional: default is the train split's distinct labels, sorted
    label_base = 1                   # optional: the files number the labels (1 = labels[0]), not name them
    metric = "accuracy"              # or a list, the first picks checkpoints; default accuracy or pearson
    regression = false               # optional; a regression task has no `labels`
    dev_fraction = 0.1               # optional: used only when [files] has no dev (then dev comes from train)
    dev_seed = 0                     # optional, with dev_fraction
    [files]                          # split name -> file (.csv, .tsv, .jsonl, .json or .parquet)
    train = "train.csv"
    dev = "dev.csv"
    test = "test.csv"

Labels in the files are names: "neg", or "3" when `labels` lists "3". A file that numbers its labels
(AG News: 1..4 for World, Sports, Business, Sci/Tech) says so with `label_base` (0 or 1); without it
a number that is not a label name is an error, never a silent shift.

Paths in [files] are relative to the task file's folder, or to `--data-dir` when one is given (so one
task file describes every copy of a dataset); they may not be absolute or contain `..`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from pkdpipe.errors import ConfigError, DataError
from pkdpipe.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from pkdpipe.tables import read_label_values

GLUE_HUB_NAME = "nyu-mll/glue"
GLUE_ATTRIBUTION = "Wang et al. (2019), GLUE: A Multi-Task Benchmark and Analysis Platform for NLU"
TREC_ATTRIBUTION = "Li and Roth (2002), Learning Question Classifiers"
DEFAULT_DEV_FRACTION = 0.1
DEFAULT_DEV_SEED = 0
CARVE_OUT_METHOD = "stratified-sha256-v1"  # bump when the carve-out algorithm in pkdpipe.data changes
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

_GLUE_SPLITS = (("train", "train"), ("dev", "validation"), ("test", "test"))
_CLASSIC_FILES = (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TASK_FILE_KEYS = (
    "name",
    "text_fields",
    "label_field",
    "labels",
    "metric",
    "regression",
    "files",
    "dev_fraction",
    "dev_seed",
    "label_base",
)


@dataclass(frozen=True)
class ClassicLayout:
    """Where a GLUE task's files are in the classic TSV layout (GLUE's download script, no quoting)."""

    folder: str  # the task's subfolder in a GLUE download, e.g. "SST-2"
    files: tuple[tuple[str, str], ...]  # (split, file name) pairs, e.g. ("dev", "dev.tsv")
    text_columns: tuple[str, ...]  # header names of the text columns, in text_fields order
    label_column: str  # header name of the label column (absent from test files)
    headerless_columns: tuple[str, ...] = ()  # names of the columns of train/dev files with no header (CoLA)


@dataclass(frozen=True)
class Task:
    """One classification or regression task: its fields, labels, metrics and where its data is."""

    name: str  # registry name or the task file's `name`; also the cache folder name
    text_fields: tuple[str, ...]  # one field (single sentence) or two (sentence pair)
    label_field: str  # the label's field name
    labels: tuple[str, ...] | None  # label names in index order; None for regression
    metrics: tuple[str, ...]  # metric names from pkdpipe.metrics.METRICS, reported in this order
    main_metric: str  # the metric that picks the best checkpoint; one of `metrics`
    splits: tuple[str, ...]  # the split names load_split accepts
    # --- private: how pkdpipe.data finds the data -------------------------------------------
    source: str = "glue"  # local reader: "glue" (hub or classic layout), "files", "trec"
    hub_name: str | None = None  # hub dataset read when no data dir is given; None = local only
    hub_config: str | None = None  # the hub dataset's config, e.g. "sst2"
    hub_splits: tuple[tuple[str, str], ...] = ()  # (split, hub split = hub-layout file stem) pairs
    classic: ClassicLayout | None = None  # the classic GLUE TSV layout, for GLUE tasks
    files: tuple[tuple[str, str], ...] = ()  # (split, relative path) pairs, for "files" and "trec"
    task_dir: str | None = None  # a task file's folder, the default base of `files`; None = needs a data dir
    labels_file: str | None = None  # JSON list of label names that must equal `labels` when in the data dir
    dev_fraction: float | None = None  # share of each train label carved out as dev; None = dev is a file
    dev_seed: int = DEFAULT_DEV_SEED  # seed of the dev carve-out
    label_base: int | None = 0  # an integer i in the data means labels[i - base]; None: integers are names
    # --- for model cards ---------------------------------------------------------------------
    dataset: str | None = None  # the dataset's hub id, e.g. "PolyAI/banking77"
    data_license: str | None = None  # the data's licence, e.g. "cc-by-4.0"
    attribution: str | None = None  # whom to credit, as the licence asks

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ConfigError(f"task '{self.name}': text_fields must name one or two fields")
        if self.main_metric not in self.metrics:
            raise ConfigError(
                f"task '{self.name}': main_metric '{self.main_metric}' is not in {self.metrics}"
            )

    @property
    def num_labels(self) -> int:
        """The model's output size: the number of labels, or 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """True when the label is a real number (stsb), not a class."""
        return self.labels is None

    def hub_split(self, split: str) -> str:
        """The hub's name for `split` (also the file stem in the hub layout), e.g. dev -> validation."""
        return dict(self.hub_splits).get(split, split)

    def file_for(self, split: str) -> str | None:
        """The relative path of `split`'s file for the "files" and "trec" readers; None if carved out."""
        return dict(self.files).get(split)

    def fingerprint_dict(self) -> dict:
        """A JSON-able description of everything about the task that changes the examples or targets.

        Paths and hub names are left out: the data's content is hashed separately (Examples), so the
        same data read from the hub or a local copy gives the same key.
        """
        carve_out = None
        if self.dev_fraction is not None:
            carve_out = {"method": CARVE_OUT_METHOD, "fraction": self.dev_fraction, "seed": self.dev_seed}
        return {
            "name": self.name,
            "text_fields": list(self.text_fields),
            "label_field": self.label_field,
            "labels": None if self.labels is None else list(self.labels),
            "regression": self.is_regression,
            "metrics": list(self.metrics),
            "main_metric": self.main_metric,
            "dev_carve_out": carve_out,
        }


def _glue(
    name: str,
    text_fields: tuple[str, ...],
    labels: tuple[str, ...] | None,
    metrics: tuple[str, ...],
    classic: ClassicLayout,
) -> Task:
    """A GLUE task as on the hub (`nyu-mll/glue`), with its classic TSV layout."""
    return Task(
        name=name,
        text_fields=text_fields,
        label_field="label",
        labels=labels,
        metrics=metrics,
        main_metric=metrics[0],
        splits=tuple(split for split, _ in _GLUE_SPLITS),
        hub_name=GLUE_HUB_NAME,
        hub_config=name,
        hub_splits=_GLUE_SPLITS,
        classic=classic,
        dataset=GLUE_HUB_NAME,
        attribution=GLUE_ATTRIBUTION,
    )


def _mnli() -> Task:
    """MNLI: dev and test are the matched sets; the mismatched ones are extra splits."""
    hub_splits = (
        ("train", "train"),
        ("dev", "validation_matched"),
        ("dev_mismatched", "validation_mismatched"),
        ("test", "test_matched"),
        ("test_mismatched", "test_mismatched"),
    )
    classic_files = (
        ("train", "train.tsv"),
        ("dev", "dev_matched.tsv"),
        ("dev_mismatched", "dev_mismatched.tsv"),
        ("test", "test_matched.tsv"),
        ("test_mismatched", "test_mismatched.tsv"),
    )
    return Task(
        name="mnli",
        text_fields=("premise", "hypothesis"),
        label_field="label",
        labels=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        main_metric="accuracy",
        splits=tuple(split for split, _ in hub_splits),
        hub_name=GLUE_HUB_NAME,
        hub_config="mnli",
        hub_splits=hub_splits,
        classic=ClassicLayout("MNLI", classic_files, ("sentence1", "sentence2"), "gold_label"),
        dataset=GLUE_HUB_NAME,
        attribution=GLUE_ATTRIBUTION,
    )


_BANKING77_LABELS = (
    "card_arrival", "card_linking", "exchange_rate", "card_payment_wrong_exchange_rate",
    "extra_charge_on_statement", "pending_cash_withdrawal", "fiat_currency_support",
    "card_delivery_estimate", "automatic_top_up", "card_not_working", "exchange_via_app",
    "lost_or_stolen_card", "age_limit", "pin_blocked", "contactless_not_working",
    "top_up_by_bank_transfer_charge", "pending_top_up", "cancel_transfer", "top_up_limits",
    "wrong_amount_of_cash_received", "card_payment_fee_charged", "transfer_not_received_by_recipient",
    "supported_cards_and_currencies", "getting_virtual_card", "card_acceptance", "top_up_reverted",
    "balance_not_updated_after_cheque_or_cash_deposit", "card_payment_not_recognised",
    "edit_personal_details", "why_verify_identity", "unable_to_verify_identity", "get_physical_card",
    "visa_or_mastercard", "topping_up_by_card", "disposable_card_limits", "compromised_card",
    "atm_support", "direct_debit_payment_not_recognised", "passcode_forgotten",
    "declined_cash_withdrawal", "pending_card_payment", "lost_or_stolen_phone", "request_refund",
    "declined_transfer", "Refund_not_showing_up", "declined_card_payment", "pending_transfer",
    "terminate_account", "card_swallowed", "transaction_charged_twice", "verify_source_of_funds",
    "transfer_timing", "reverted_card_payment?", "change_pin", "beneficiary_not_allowed",
    "transfer_fee_charged", "receiving_money", "failed_transfer", "transfer_into_account",
    "verify_top_up", "getting_spare_card", "top_up_by_cash_or_cheque", "order_physical_card",
    "virtual_card_not_working", "wrong_exchange_rate_for_cash_withdrawal", "get_disposable_virtual_card",
    "top_up_failed", "balance_not_updated_after_bank_transfer", "cash_withdrawal_not_recognised",
    "exchange_charge", "top_up_by_card_charge", "activate_my_card", "cash_withdrawal_charge",
    "card_about_to_expire", "apple_pay_or_google_pay", "verify_my_identity", "country_support",
)  # fmt: skip
"""BANKING77's intents in the order of its categories.json (not alphabetical)."""

_TREC_COARSE_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
"""TREC's 6 coarse question types, sorted."""

_TREC_FINE_LABELS = (
    "ABBR:abb", "ABBR:exp", "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason", "ENTY:animal",
    "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed", "ENTY:event", "ENTY:food",
    "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other", "ENTY:plant", "ENTY:product",
    "ENTY:religion", "ENTY:sport", "ENTY:substance", "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq",
    "ENTY:veh", "ENTY:word", "HUM:desc", "HUM:gr", "HUM:ind", "HUM:title", "LOC:city", "LOC:country",
    "LOC:mount", "LOC:other", "LOC:state", "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money",
    "NUM:ord", "NUM:other", "NUM:perc", "NUM:period", "NUM:speed", "NUM:temp", "NUM:volsize",
    "NUM:weight",
)  # fmt: skip
"""TREC's 50 fine question types (`COARSE:fine`), sorted: the distinct labels of train_5500.label.

Fixed here rather than read from the data, so a label's index never depends on which copy is read.
"""


def _carved_out(
    name: str,
    label_field: str,
    labels: tuple[str, ...],
    source: str,
    files: dict[str, str],
    labels_file: str | None = None,
    **card,
) -> Task:
    """A local-folder-only task with no dev file: dev is carved out of train."""
    return Task(
        name=name,
        text_fields=("text",),
        label_field=label_field,
        labels=labels,
        metrics=("accuracy",),
        main_metric="accuracy",
        splits=("train", "dev", "test"),
        source=source,
        files=tuple(files.items()),
        labels_file=labels_file,
        dev_fraction=DEFAULT_DEV_FRACTION,
        dev_seed=DEFAULT_DEV_SEED,
        **card,
    )


def _registry() -> dict[str, Task]:
    """Every built-in task by name."""
    return {task.name: task for task in (*_glue_tasks(), *_other_tasks())}


def _glue_tasks() -> list[Task]:
    """The nine GLUE tasks, from the hub or a classic GLUE folder."""
    pair = ("sentence1", "sentence2")
    entailment = ("entailment", "not_entailment")
    return [
        _glue(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews",),
            ClassicLayout(
                "CoLA",
                _CLASSIC_FILES,
                ("sentence",),
                "label",
                headerless_columns=("source", "label", "original_label", "sentence"),
            ),
        ),
        _glue(
            "sst2",
            ("sentence",),
            ("negative", "positive"),
            ("accuracy",),
            ClassicLayout("SST-2", _CLASSIC_FILES, ("sentence",), "label"),
        ),
        _glue(
            "mrpc",
            pair,
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            ClassicLayout("MRPC", _CLASSIC_FILES, ("#1 String", "#2 String"), "Quality"),
        ),
        _glue(
            "stsb",
            pair,
            None,
            ("pearson", "spearman"),
            ClassicLayout("STS-B", _CLASSIC_FILES, pair, "score"),
        ),
        _glue(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
            ClassicLayout("QQP", _CLASSIC_FILES, ("question1", "question2"), "is_duplicate"),
        ),
        _mnli(),
        _glue(
            "qnli",
            ("question", "sentence"),
            entailment,
            ("accuracy",),
            ClassicLayout("QNLI", _CLASSIC_FILES, ("question", "sentence"), "label"),
        ),
        _glue("rte", pair, entailment, ("accuracy",), ClassicLayout("RTE", _CLASSIC_FILES, pair, "label")),
        _glue(
            "wnli",
            pair,
            ("not_entailment", "entailment"),
            ("accuracy",),
            ClassicLayout("WNLI", _CLASSIC_FILES, pair, "label"),
        ),
    ]


def _other_tasks() -> list[Task]:
    """Tasks read from their own files, with a dev split carved out of train."""
    return [
        _carved_out(
            "banking77",
            "category",
            _BANKING77_LABELS,
            "files",
            {"train": "train.csv", "test": "test.csv"},
            labels_file="categories.json",
            dataset="PolyAI/banking77",
            data_license="cc-by-4.0",
            attribution="Casanueva, Temčinas, Gerz, Henderson and Vulić (2020), Efficient Intent Detection "
            "with Dual Sentence Encoders (PolyAI)",
        ),
        _carved_out(
            "trec",
            "coarse_label",
            _TREC_COARSE_LABELS,
            "trec",
            {"train": "train_5500.label", "test": "TREC_10.label"},
            dataset="CogComp/trec",
            attribution=TREC_ATTRIBUTION,
        ),
        _carved_out(
            "trec-fine",
            "fine_label",
            _TREC_FINE_LABELS,
            "trec",
            {"train": "train_5500.label", "test": "TREC_10.label"},
            dataset="CogComp/trec",
            attribution=TREC_ATTRIBUTION,
        ),
    ]


_TASKS = _registry()
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def known_tasks() -> list[str]:
    """The names of the built-in tasks."""
    return list(_TASKS)


def get_task(name_or_path: str) -> Task:
    """A built-in task by name (case-insensitive), or the task described by a .toml/.json file."""
    if Path(name_or_path).suffix.lower() in (".toml", ".json"):
        return load_task_file(name_or_path)
    key = name_or_path.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _TASKS:
        return _TASKS[key]
    raise ConfigError(
        f"unknown task '{name_or_path}': known tasks are {', '.join(known_tasks())}, "
        "or give the path of a .toml or .json task file"
    )


def load_task_file(path: str | Path) -> Task:
    """The task a TOML or JSON task file describes (format in this module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file not found: {path}")
    raw = _read_task_file(path)
    unknown = sorted(set(raw) - set(_TASK_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"task file {path}: unknown key '{unknown[0]}' (allowed: {', '.join(_TASK_FILE_KEYS)})"
        )

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ConfigError(f"task file {path}: name {name!r} must be letters, digits, '_', '-' or '.'")
    text_fields = _string_list(raw, "text_fields", path, required=True)
    if len(text_fields) not in (1, 2):
        raise ConfigError(
            f"task file {path}: text_fields must name one or two fields, got {len(text_fields)}"
        )
    label_field = raw.get("label_field", "label")
    if not isinstance(label_field, str) or not label_field:
        raise ConfigError(f"task file {path}: label_field must be a field name, got {label_field!r}")
    regression = raw.get("regression", False)
    if not isinstance(regression, bool):
        raise ConfigError(f"task file {path}: regression must be true or false, got {regression!r}")
    files = _task_files(raw, path)
    dev_fraction, dev_seed = _dev_carve_out(raw, path, files)
    metrics = _task_metrics(raw, path, regression)

    labels: tuple[str, ...] | None = None
    if regression:
        if "labels" in raw:
            raise ConfigError(f"task file {path}: a regression task has no labels; remove 'labels'")
    elif "labels" in raw:
        labels = _string_list(raw, "labels", path, required=True)
    else:
        labels = _infer_labels(path, files, label_field)
    if labels is not None:
        _check_labels(labels, metrics, path)
    label_base = _label_base(raw, path, labels)

    splits = tuple(files)
    if dev_fraction is not None:  # the carved-out dev goes right after train
        splits = ("train", "dev", *(split for split in files if split != "train"))
    return Task(
        name=name,
        text_fields=text_fields,
        label_field=label_field,
        labels=labels,
        metrics=metrics,
        main_metric=metrics[0],
        splits=splits,
        source="files",
        files=tuple(files.items()),
        task_dir=str(path.resolve().parent),
        dev_fraction=dev_fraction,
        dev_seed=dev_seed,
        label_base=label_base,
    )


def _label_base(raw: dict, path: Path, labels: tuple[str, ...] | None) -> int | None:
    """0 or 1 when the files number their labels; None (integers are label names) by default."""
    if "label_base" not in raw:
        return None
    base = raw["label_base"]
    if base not in (0, 1) or isinstance(base, bool):
        raise ConfigError(f"task file {path}: label_base must be 0 or 1, got {base!r}")
    if labels is None:
        raise ConfigError(f"task file {path}: a regression task has no label_base; remove it")
    if any(label.lstrip("-").isdigit() for label in labels):
        raise ConfigError(
            f"task file {path}: label_base numbers labels that have names; these labels are numbers "
            f"already ({', '.join(labels[:4])}, ...): remove label_base"
        )
    return base


def _read_task_file(path: Path) -> dict:
    """The task file's top-level table, from TOML or JSON."""
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        else:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"task file {path} cannot be parsed: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"task file {path}: the top level must be a table of keys")
    return raw


def _string_list(raw: dict, key: str, path: Path, required: bool) -> tuple[str, ...]:
    """`raw[key]` as a tuple of non-empty, distinct strings."""
    if key not in raw:
        if required:
            raise ConfigError(f"task file {path}: missing '{key}'")
        return ()
    values = raw[key]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"task file {path}: '{key}' must be a non-empty list of strings, got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"task file {path}: '{key}' has duplicates: {values!r}")
    return tuple(values)


def _task_files(raw: dict, path: Path) -> dict[str, str]:
    """The [files] table: split name -> a relative path that stays inside its base folder."""
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"task file {path}: missing [files] table (split name = file path)")
    for split, file in files.items():
        if not _TASK_NAME.fullmatch(split):
            raise ConfigError(
                f"task file {path}: split name {split!r} must be letters, digits, '_', '-' or '.'"
            )
        if not isinstance(file, str) or not file:
            raise ConfigError(f"task file {path}: files.{split} must be a file path, got {file!r}")
        relative = PurePath(file)
        if relative.is_absolute() or file.startswith(("/", "\\")):
            raise ConfigError(f"task file {path}: files.{split} = '{file}' must be relative to the task file")
        if ".." in relative.parts:
            raise ConfigError(f"task file {path}: files.{split} = '{file}' may not leave its folder ('..')")
        if relative.suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(
                f"task file {path}: files.{split} = '{file}' must end in one of {', '.join(FILE_SUFFIXES)}"
            )
    return dict(files)


def _dev_carve_out(raw: dict, path: Path, files: dict[str, str]) -> tuple[float | None, int]:
    """(dev_fraction, dev_seed): a fraction only when there is no dev file but a train file."""
    if "dev" in files:
        for key in ("dev_fraction", "dev_seed"):
            if key in raw:
                raise ConfigError(f"task file {path}: '{key}' applies only when [files] has no dev")
        return None, DEFAULT_DEV_SEED
    fraction = raw.get("dev_fraction", DEFAULT_DEV_FRACTION)
    seed = raw.get("dev_seed", DEFAULT_DEV_SEED)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(
            f"task file {path}: dev_fraction must be a number between 0 and 1, got {fraction!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"task file {path}: dev_seed must be an integer, got {seed!r}")
    if "train" not in files:
        return None, DEFAULT_DEV_SEED  # no dev and nothing to carve it from: the task has no dev split
    return float(fraction), seed


def _task_metrics(raw: dict, path: Path, regression: bool) -> tuple[str, ...]:
    """The metric names, checked against the kind of task; the first one picks checkpoints."""
    default = REGRESSION_METRICS if regression else ("accuracy",)
    metric = raw.get("metric", list(default))
    metrics = [metric] if isinstance(metric, str) else metric
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"task file {path}: metric must be a metric name or a list of them, got {metric!r}")
    allowed = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    kind = "regression" if regression else "classification"
    for name in metrics:
        if name not in allowed:
            raise ConfigError(
                f"task file {path}: metric '{name}' does not fit a {kind} task (use {', '.join(allowed)})"
            )
    return tuple(dict.fromkeys(metrics))


def _check_labels(labels: tuple[str, ...], metrics: tuple[str, ...], path: Path) -> None:
    """At least two labels, and exactly two for F1."""
    if len(labels) < 2:
        raise ConfigError(
            f"task file {path}: a classification task needs at least two labels, got {labels!r}"
        )
    if "f1" in metrics and len(labels) != 2:
        raise ConfigError(f"task file {path}: metric 'f1' needs exactly two labels, got {len(labels)}")


def _infer_labels(path: Path, files: dict[str, str], label_field: str) -> tuple[str, ...]:
    """The train file's distinct labels, sorted (numerically when they are all numbers)."""
    if "train" not in files:
        raise ConfigError(
            f"task file {path}: no 'labels' and no train file to infer them from; add labels = [...]"
        )
    train_path = path.resolve().parent / files["train"]
    if not train_path.is_file():
        raise DataError(f"task file {path}: no 'labels' and train file {train_path} not found to infer them")
    values = {value for value in read_label_values(train_path, label_field) if value != ""}
    return tuple(sorted(values, key=_label_sort_key))


def _label_sort_key(value: str) -> tuple[int, float, str]:
    """Numbers first, in numeric order, then other strings in string order."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)

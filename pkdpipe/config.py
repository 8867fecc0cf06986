"""Typed configs, one per stage. The CLI fills these; scripts and notebooks can too.

Each stage saves its resolved config next to what it writes, so every output says what made it.
Cross-field checks live in `__post_init__`, so a bad combination fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from pkdpipe import strategies
from pkdpipe.batching import GROUP_BATCHES
from pkdpipe.cache.codec import CODECS, INT8
from pkdpipe.errors import ConfigError
from pkdpipe.paths import check_local, check_task_path, default_cache_root

PRECISIONS = ("fp32", "bf16", "fp16")
HIDDEN_DTYPES = ("float16", "float32")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{name.replace('_', '-')} must be positive; got {value}")


def _check_rows(rows: int) -> None:
    if rows < 0:
        raise ConfigError(f"--train-rows must be 0 (all) or more; got {rows}")


THREADS_HELP = (
    "CPU threads for torch (torch.set_num_threads); 0 = torch's choice, one per core. On a shared or "
    "loaded machine fewer threads than cores can be much faster. Not part of a run's identity, but "
    "the thread count changes float rounding, so two runs can differ slightly."
)


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's choice) or more; got {threads}")


def setting(default=MISSING, help: str = "", cli: str | bool = True, words: tuple[str, ...] = ()):  # noqa: A002
    """A config field with its help text: the CLI builds each option from the field's default and
    this text (`pkdpipe_cli.common.config_options`), so neither is written twice. `cli` says how a
    list is typed on the command line ("ints": 2,4,6; "names": train,dev; "ints-or-all"; "number":
    one float or one of `words`), or False
    for a field that is not an option; `words` are values taken as they are ("auto")."""
    return field(default=default, metadata={"help": help, "cli": cli, "words": words})


def help_of(config_class, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(config_class) if f.name == name)


def to_dict(config) -> dict:
    """The config as JSON-able data (paths as strings)."""
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(config).items()
    }


@dataclass
class CacheConfig:
    """`pkdpipe cache-teacher`: run the teacher once over the splits and cache what distill needs."""

    task: str = setting(help="Task name (sst2, mnli, banking77, trec, ...) or a task file (.toml / .json).")
    data_dir: Path | None = setting(
        None, "Local copy of the data (GLUE TSV or hub layout). Default: the hub."
    )
    teacher: str | None = setting(
        None, "Fine-tuned classifier folder or hub name. Default: runs/TASK/teacher."
    )
    splits: tuple[str, ...] = setting(("train", "dev"), "Comma-separated splits to cache.", cli="names")
    train_rows: int = setting(
        0, "Use a seeded sample of N rows of the train split (0 = all); the sample names the cache."
    )
    cache_dir: Path | None = setting(None, "Cache root. Default: $PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe.")
    max_seq_len: int = setting(128, "Truncate inputs to this many tokens (longest_first for pairs).")
    batch_size: int = setting(64, "Teacher batch size (length-sorted, padded per batch).")
    dtype: str = setting(
        "float16", "Storage dtype of the [CLS] vectors: float16 or float32 (logits: float32)."
    )
    codec: str = setting(
        "float16",
        "How the [CLS] vectors are stored: float16 (as --dtype says) or int8 (codes per dimension, "
        "about half the bytes; docs/cache-format.md gives its error).",
    )
    layers: tuple[int, ...] | None = setting(
        None, "Hidden layers to store: all, or a list like 0,2,4,6 (0 = embeddings).", cli="ints-or-all"
    )
    shard_size: int = setting(8192, "Rows per shard: the unit of resume and of parallel writing.")
    device: str = setting("auto", "cpu, cuda or auto (cuda when available).")
    precision: str = setting("fp32", "Teacher autocast: fp32, bf16 or fp16 (fp16 needs a GPU).")
    force: bool = setting(False, "Recompute even when a complete cache with this key exists.")
    store: str | None = setting(None, "Shared store URL to look the key up in first (and to --push to).")
    push: bool = setting(False, "Publish the cache to --store after computing it.")
    runs_dir: Path = setting(Path("runs"), "Where finetune puts teachers (for the default teacher).")
    untrained_head: bool = setting(
        False, "Cache a teacher whose classification head was never trained (its logits mean nothing)."
    )
    trust_remote_code: bool = setting(False, "Let transformers run code shipped with the model.")
    threads: int = setting(0, THREADS_HELP)
    quiet: bool = setting(False, "No progress bars or progress lines.")
    command: str | None = setting(None, "The command line, recorded in the manifest.", cli=False)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_root()
        self.runs_dir = Path(self.runs_dir)
        check_task_path(self.task)
        check_local("--data-dir", self.data_dir)
        check_local("--teacher", self.teacher, "model folder")
        self.splits = tuple(self.splits)
        if not self.splits:
            raise ConfigError("--splits needs at least one split")
        if self.layers is not None:
            self.layers = tuple(sorted(set(self.layers)))
        _check_positive(max_seq_len=self.max_seq_len, batch_size=self.batch_size, shard_size=self.shard_size)
        _check_rows(self.train_rows)
        _check_threads(self.threads)
        _check_choice("--dtype", self.dtype, HIDDEN_DTYPES)
        _check_choice("--codec", self.codec, CODECS)
        if self.codec == INT8 and self.dtype != "float16":
            raise ConfigError(f"--codec int8 stores int8 codes: --dtype {self.dtype} does not apply")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        if self.push and not self.store:
            raise ConfigError("--push needs --store URL (or PKDPIPE_STORE)")

    @property
    def hidden_dtype(self) -> str:
        """The dtype of the stored [CLS] datasets: the codes' with int8, else --dtype."""
        return "int8" if self.codec == INT8 else self.dtype


@dataclass
class TrainConfig:
    """What every training run shares: optimisation, schedule, evaluation, precision.

    Defaults follow the PKD paper (Sun et al. 2019, after BERT): batch 32, 4 epochs, 10% linear
    warm-up, weight decay 0.01; except the lr: `auto` picks it from the trained model's depth and
    width (`pkdpipe.learning_rate`), since the paper's 5e-5 is BERT-base's and left every small
    student of this project's measurements far behind.
    """

    task: str = setting(
        "", "Task name or task file (distill: the task whose newest cache to take when --cache is not given)."
    )
    output: Path | None = setting(None, "Output folder. Default: a folder under runs/TASK/.")
    lr: float | str = setting(
        "auto",
        "Peak learning rate (AdamW), or auto: chosen from the trained model's depth and width by a rule "
        "resting on this project's measurements (3-layer students 3e-4 to 5e-4, BERT-base 5e-5); the "
        "run's settings and card record the number and the rule.",
        cli="number",
        words=("auto",),
    )
    epochs: int = setting(4, "Epochs over the training set.")
    batch_size: int = setting(32, "Global batch size (split across ranks under torchrun).")
    warmup: float = setting(0.1, "Fraction of the steps with linear warm-up, then linear decay to 0.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm (0 turns clipping off).")
    seed: int = setting(42, "Seed for initialisation, dropout and data order.")
    eval_every: int = setting(0, "Evaluate on dev every N steps (0 = at the end of each epoch).")
    checkpoint_every: int = setting(
        200, "Save a resumable checkpoint every N steps (and each epoch); rerun to resume."
    )
    precision: str = setting(
        "fp32", "Autocast: fp32, bf16 or fp16 (fp16 needs a GPU; it uses a gradient scaler)."
    )
    device: str = setting("auto", "cpu, cuda or auto (cuda when available).")
    resume: bool = setting(
        True, "Continue from OUTPUT/checkpoint when it exists (--no-resume starts over, dropping it)."
    )
    runs_dir: Path = setting(Path("runs"), "Root of the default output folders.")
    report_to: str | None = setting(None, "tensorboard, to also log there (needs tensorboard installed).")
    max_steps: int = setting(0, "Stop after N optimizer steps (0 = all epochs); for smoke runs.")
    group_by_length: bool = setting(
        False,
        f"Batch rows of similar length inside random megabatches of {GROUP_BATCHES} batches: less "
        "padding, faster steps. Default: a plain uniform shuffle.",
    )
    trust_remote_code: bool = setting(False, "Let transformers run code shipped with the model.")
    threads: int = setting(0, THREADS_HELP)
    quiet: bool = setting(False, "No progress bars or progress lines.")
    command: str | None = setting(None, "The command line, recorded next to the output.", cli=False)

    def __post_init__(self):
        self.output = Path(self.output) if self.output else None
        self.runs_dir = Path(self.runs_dir)
        if self.lr != "auto":
            _check_positive(lr=self.lr)
        _check_positive(epochs=self.epochs, batch_size=self.batch_size)
        _check_threads(self.threads)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1); got {self.warmup}")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        if self.report_to not in (None, "tensorboard"):
            raise ConfigError(f"--report-to supports tensorboard; got {self.report_to!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """`pkdpipe finetune`: fine-tune a teacher, or a K-layer student baseline (`layers=K`)."""

    model: str = setting("", "Pre-trained model folder or hub name to start from.")
    data_dir: Path | None = setting(
        None, "Local copy of the data (GLUE TSV or hub layout). Default: the hub."
    )
    layers: int | None = setting(None, "Keep only the first K layers (a fine-tuned-only student baseline).")
    max_seq_len: int = setting(128, "Truncate inputs to this many tokens.")
    train_rows: int = setting(
        0, "Use a seeded sample of N rows of the train split (0 = all); the sample names the cache."
    )

    def __post_init__(self):
        super().__post_init__()
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        _check_rows(self.train_rows)
        if not self.task:
            raise ConfigError("finetune needs --task")
        if not self.model:
            raise ConfigError("finetune needs --model (a pre-trained model folder or hub name)")
        check_task_path(self.task)
        check_local("--model", self.model, "model folder")
        check_local("--data-dir", self.data_dir)
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"--layers must be at least 1; got {self.layers}")


@dataclass
class DistillConfig(TrainConfig):
    """`pkdpipe distill`: train a K-layer student from a teacher cache alone.

    Loss: (1 - alpha) * CE + alpha * T^2 * KL + beta * PT; see `pkdpipe.losses` for the reductions
    and how the paper's hyperparameters map onto them.
    """

    cache: str | None = setting(
        None, "Cache folder or key. Default: the newest complete cache of --task (or of the only task there)."
    )
    cache_dir: Path | None = setting(None, "Cache root. Default: $PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe.")
    store: str | None = setting(
        None,
        "Team store URL: a --cache KEY is pulled from it first where the local copy lacks it, only the "
        "teacher layers the strategy maps (checksums verified). Ignored without --cache.",
    )
    strategy: str = setting("last", "last or skip (PKD), kd (vanilla KD), ft (gold labels only).")
    layers: int = setting(6, "Student depth K.")
    teacher_layers: tuple[int, ...] | str | None = setting(
        None,
        "Explicit map for student layers 1..K-1, e.g. 2,4,6,8,10; or auto: the K-1 layers whose "
        "[CLS] varies most between examples (see `pkdpipe cache stats`).",
        cli="ints",
        words=("auto",),
    )
    student_init: str | None = setting(
        None, "Pre-trained model to take the first K layers from. Default: the teacher's pre-trained model."
    )
    alpha: float = setting(0.5, "Weight of the soft-label (KD) term against CE, in [0, 1].")
    beta: float = setting(0.5, "Weight of the patient term (pkdpipe scale: the authors' beta / hidden size).")
    temperature: float = setting(10.0, "KD temperature T.")
    normalize: bool = setting(True, "L2-normalise the [CLS] vectors in the patient loss.")
    pt_space: str = setting(
        "raw",
        "Where the patient loss compares [CLS] vectors: raw (the paper), centered, standardized (by the "
        "cache's per-dimension statistics; the student by its batch's), standardized-teacher, or "
        "relational (how each pair of examples relates, in standardised coordinates).",
    )

    def __post_init__(self):
        super().__post_init__()
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_root()
        strategies.get(self.strategy)  # an unknown name: ConfigError naming the known ones
        if self.layers < 1:
            raise ConfigError(f"--layers must be at least 1; got {self.layers}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1]; got {self.alpha}")
        if self.beta < 0:
            raise ConfigError(f"--beta must be non-negative; got {self.beta}")
        _check_positive(temperature=self.temperature)
        if isinstance(self.teacher_layers, str):
            if self.teacher_layers != "auto":
                raise ConfigError(
                    f"--teacher-layers takes layer numbers like 2,4 or auto; got {self.teacher_layers!r}"
                )
        elif self.teacher_layers is not None:
            self.teacher_layers = tuple(self.teacher_layers)
        if self.pt_space != "raw":  # the paper's needs no check, and no torch (losses imports it)
            from pkdpipe.losses import PT_SPACES

            _check_choice("--pt-space", self.pt_space, PT_SPACES)


@dataclass
class EvaluateConfig:
    """`pkdpipe evaluate`: metrics, size and speed of one or more models on one split."""

    models: list[str] = field(
        default_factory=list, metadata={"help": "Model folders; the first is the baseline."}
    )
    task: str = setting("", "Task name or task file.")
    data_dir: Path | None = setting(
        None, "Local copy of the data (GLUE TSV or hub layout). Default: the hub."
    )
    split: str = setting("dev", "Split to evaluate on.")
    batch_size: int = setting(64, "Inference batch size (length-sorted, padded per batch).")
    max_seq_len: int | None = setting(
        None,
        "Truncate inputs to this many tokens. Default: the length each model was trained at (its "
        "recorded settings; 128 for a model that records none).",
    )
    device: str = setting("auto", "cpu, cuda or auto (cuda when available).")
    precision: str = setting("fp32", "Autocast: fp32, bf16 or fp16 (fp16 needs a GPU).")
    timing_rows: int = setting(512, "Examples of the split each model is timed on (the same for all).")
    timing_rounds: int = setting(
        5,
        "Rounds of timing, the models in a rotating order each round (all held in memory at once); "
        "speed is the median. 0: no timing.",
    )
    trust_remote_code: bool = setting(False, "Let transformers run code shipped with the model.")
    threads: int = setting(0, THREADS_HELP)
    quiet: bool = setting(False, "No progress bars or progress lines.")
    record: bool = setting(
        False,
        "Also record each pkdpipe model's metrics on the split in its eval_results.json and model card.",
    )

    def __post_init__(self):
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        if not self.models:
            raise ConfigError("evaluate needs at least one model folder")
        for model in self.models:
            check_local("evaluate", model, "model folder")
        check_task_path(self.task)
        check_local("--data-dir", self.data_dir)
        _check_positive(batch_size=self.batch_size, timing_rows=self.timing_rows)
        _check_threads(self.threads)
        if self.max_seq_len is not None:
            _check_positive(max_seq_len=self.max_seq_len)
        if self.timing_rounds < 0:
            raise ConfigError(f"--timing-rounds must be 0 (no timing) or more; got {self.timing_rounds}")
        _check_choice("--precision", self.precision, PRECISIONS)

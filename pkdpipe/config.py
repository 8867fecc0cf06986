"""Typed configs, one per stage. The CLI fills these; scripts and notebooks can too.

Each stage saves its resolved config next to what it writes, so every output says what made it.
Cross-field checks live in `__post_init__`, so a bad combination fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from pkdpipe import strategies
from pkdpipe.batching import GROUP_BATCHES
from pkdpipe.cache.codec import CODECS, INT8
from pkdpipe.errors import ConfigError
from pkdpipe.paths import check_local, check_task_path, default_cache_root
from pkdpipe.settings import check_choice, check_positive, help_of, setting, sweepable

__all__ = ["CacheConfig", "DistillConfig", "EvaluateConfig", "FinetuneConfig", "TrainConfig", "help_of",
           "setting", "sweep_fields", "to_dict"]  # fmt: skip

PRECISIONS = ("fp32", "bf16", "fp16")
HIDDEN_DTYPES = ("float16", "float32")


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


def to_dict(config) -> dict:
    """The config as JSON-able data (paths as strings); a distill config's strategy settings among
    its own, as they have always been recorded (`"alpha": 0.5`)."""
    data = dataclasses.asdict(config)
    data.update(data.pop("strategy_settings", None) or {})
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in data.items()
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
        check_positive(max_seq_len=self.max_seq_len, batch_size=self.batch_size, shard_size=self.shard_size)
        _check_rows(self.train_rows)
        _check_threads(self.threads)
        check_choice("--dtype", self.dtype, HIDDEN_DTYPES)
        check_choice("--codec", self.codec, CODECS)
        if self.codec == INT8 and self.dtype != "float16":
            raise ConfigError(f"--codec int8 stores int8 codes: --dtype {self.dtype} does not apply")
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--device", self.device, ("auto", "cpu", "cuda"))
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
    output: Path | None = setting(
        None, "Output folder. Default: a folder under runs/TASK/.", changes_result=False
    )
    lr: float | str = setting(
        "auto",
        "Peak learning rate (AdamW), or auto: chosen from the trained model's depth and width by a rule "
        "resting on this project's measurements (3-layer students 3e-4 to 5e-4, BERT-base 5e-5); the "
        "run's settings and card record the number and the rule.",
        cli="number",
        words=("auto",),
        sweep=True,
        tag="lr",
    )
    epochs: int = setting(4, "Epochs over the training set.")
    batch_size: int = setting(32, "Global batch size (split across ranks under torchrun).")
    warmup: float = setting(0.1, "Fraction of the steps with linear warm-up, then linear decay to 0.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm weights).")
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm (0 turns clipping off).")
    seed: int = setting(42, "Seed for initialisation, dropout and data order.", sweep=True, tag="s")
    eval_every: int = setting(0, "Evaluate on dev every N steps (0 = at the end of each epoch).")
    checkpoint_every: int = setting(
        200,
        "Save a resumable checkpoint every N steps (and each epoch); rerun to resume.",
        changes_result=False,
    )
    precision: str = setting(
        "fp32", "Autocast: fp32, bf16 or fp16 (fp16 needs a GPU; it uses a gradient scaler)."
    )
    device: str = setting("auto", "cpu, cuda or auto (cuda when available).", changes_result=False)
    resume: bool = setting(
        True,
        "Continue from OUTPUT/checkpoint when it exists (--no-resume starts over, dropping it).",
        changes_result=False,
    )
    runs_dir: Path = setting(Path("runs"), "Root of the default output folders.", changes_result=False)
    report_to: str | None = setting(
        None, "tensorboard, to also log there (needs tensorboard installed).", changes_result=False
    )
    max_steps: int = setting(0, "Stop after N optimizer steps (0 = all epochs); for smoke runs.")
    group_by_length: bool = setting(
        False,
        f"Batch rows of similar length inside random megabatches of {GROUP_BATCHES} batches: less "
        "padding, faster steps. Default: a plain uniform shuffle.",
    )
    trust_remote_code: bool = setting(
        False, "Let transformers run code shipped with the model.", changes_result=False
    )
    threads: int = setting(0, THREADS_HELP, changes_result=False)
    quiet: bool = setting(False, "No progress bars or progress lines.", changes_result=False)
    command: str | None = setting(
        None, "The command line, recorded next to the output.", cli=False, changes_result=False
    )

    def __post_init__(self):
        self.output = Path(self.output) if self.output else None
        self.runs_dir = Path(self.runs_dir)
        if self.lr != "auto":
            check_positive(lr=self.lr)
        check_positive(epochs=self.epochs, batch_size=self.batch_size)
        _check_threads(self.threads)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1); got {self.warmup}")
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        if self.report_to not in (None, "tensorboard"):
            raise ConfigError(f"--report-to supports tensorboard; got {self.report_to!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """`pkdpipe finetune`: fine-tune a teacher, or a K-layer student baseline (`layers=K`)."""

    model: str = setting("", "Pre-trained model folder or hub name to start from.")
    data_dir: Path | None = setting(
        None,
        "Local copy of the data (GLUE TSV or hub layout). Default: the hub.",
        changes_result=False,
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

    The strategy's own settings (`pkdpipe.strategies`: alpha, beta, temperature, normalize and
    pt_space for the paper's objective, whatever a registered strategy declares) are not fields
    here: they are given as keywords all the same (`DistillConfig(strategy="skip", beta=0.1)`),
    read as attributes (`config.beta`), and held, checked by the strategy, in `strategy_settings`.
    Loss of the paper's strategies: (1 - alpha) * CE + alpha * T^2 * KL + beta * PT; see
    `pkdpipe.losses` for the reductions and how the paper's hyperparameters map onto them.
    """

    cache: str | None = setting(
        None,
        "Cache folder or key. Default: the newest complete cache of --task (or of the only task there).",
        changes_result=False,
    )
    cache_dir: Path | None = setting(
        None, "Cache root. Default: $PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe.", changes_result=False
    )
    store: str | None = setting(
        None,
        "Team store URL: a --cache KEY is pulled from it first where the local copy lacks it, only the "
        "teacher layers the strategy maps (checksums verified). Ignored without --cache.",
        changes_result=False,
    )
    strategy: str = setting(
        "last", "last or skip (PKD), kd (vanilla KD), ft (gold labels only), or a registered one.", sweep=True
    )
    layers: int = setting(6, "Student depth K.", sweep=True)
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
    strategy_settings: object = setting(
        None, "The strategy's settings object (a dict or None on the way in).", cli=False
    )

    def __post_init__(self):
        super().__post_init__()
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_root()
        # an unknown name: ConfigError naming the known ones; then its settings, checked by it
        self.strategy_settings = strategies.get(self.strategy).make_settings(self.strategy_settings)
        if self.layers < 1:
            raise ConfigError(f"--layers must be at least 1; got {self.layers}")
        if isinstance(self.teacher_layers, str):
            if self.teacher_layers != "auto":
                raise ConfigError(
                    f"--teacher-layers takes layer numbers like 2,4 or auto; got {self.teacher_layers!r}"
                )
        elif self.teacher_layers is not None:
            self.teacher_layers = tuple(self.teacher_layers)

    def __getattr__(self, name: str):
        """A strategy setting, read as if it were a field (`config.alpha`)."""
        held = self.__dict__.get("strategy_settings")
        if name.startswith("__") or held is None or name not in held.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        return getattr(held, name)

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The fields the CLI makes options of: its own, then every registered strategy's settings
        (one option each, whichever strategies share it), then the training loop's."""
        own = [f for f in dataclasses.fields(cls) if f.name in cls.__dict__["__annotations__"]]
        inherited = [f for f in dataclasses.fields(cls) if f not in own]
        return [*own, *strategy_fields().values(), *inherited]


def _taking_strategy_settings(init):
    """DistillConfig's __init__, taking the strategy's settings as keywords too: they go into
    `strategy_settings` (over those it holds), so `dataclasses.replace(config, beta=1.0)` works."""

    @functools.wraps(init)
    def __init__(self, *args, strategy_settings=None, **values):
        names = {f.name for f in dataclasses.fields(DistillConfig)}
        given = {k: values.pop(k) for k in list(values) if k not in names}
        if given:
            held = strategy_settings
            held = dataclasses.asdict(held) if dataclasses.is_dataclass(held) else dict(held or {})
            strategy_settings = {**held, **given}
        init(self, *args, strategy_settings=strategy_settings, **values)

    return __init__


DistillConfig.__init__ = _taking_strategy_settings(DistillConfig.__init__)


def strategy_fields() -> dict[str, dataclasses.Field]:
    """Every registered strategy's settings by name; a name that is also a distill field is refused
    (one option cannot be both)."""
    found = strategies.setting_fields()
    clash = set(found) & {f.name for f in dataclasses.fields(DistillConfig)}
    if clash:
        raise ConfigError(
            f"a strategy's setting has the name of a distill setting ({', '.join(sorted(clash))}): rename it"
        )
    return found


def sweep_fields() -> dict[str, dataclasses.Field]:
    """The settings a sweep or search may vary, by name: distill's own and the training loop's
    marked `sweep=True` (strategy, layers, lr, seed) and every registered strategy's."""
    return {f.name: f for f in DistillConfig.option_fields() if sweepable(f)}


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
        check_positive(batch_size=self.batch_size, timing_rows=self.timing_rows)
        _check_threads(self.threads)
        if self.max_seq_len is not None:
            check_positive(max_seq_len=self.max_seq_len)
        if self.timing_rounds < 0:
            raise ConfigError(f"--timing-rounds must be 0 (no timing) or more; got {self.timing_rounds}")
        check_choice("--precision", self.precision, PRECISIONS)

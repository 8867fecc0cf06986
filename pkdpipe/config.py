"""Typed configs, one per stage. The CLI fills these; scripts and notebooks can too.

Each stage saves its resolved config next to what it writes, so every output says what made it.
Cross-field checks live in `__post_init__`, so a bad combination fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from pkdpipe import strategies
from pkdpipe.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
HIDDEN_DTYPES = ("float16", "float32")


def default_cache_root() -> Path:
    """`PKDPIPE_CACHE_DIR`, else `~/.cache/pkdpipe`."""
    env = os.environ.get("PKDPIPE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pkdpipe"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{name.replace('_', '-')} must be positive; got {value}")


def to_dict(config) -> dict:
    """The config as JSON-able data (paths as strings)."""
    return {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(config).items()
    }


@dataclass
class CacheConfig:
    """`pkdpipe cache-teacher`: run the teacher once over the splits and cache what distill needs."""

    task: str  # a task name (sst2, mnli, banking77, ...) or a task file (.toml / .json)
    data_dir: Path | None = None  # local copy of the data; None = the Hugging Face hub
    teacher: str | None = None  # fine-tuned classifier folder or hub name; None = runs/<task>/teacher
    splits: tuple[str, ...] = ("train", "dev")  # which splits to cache
    cache_dir: Path | None = None  # cache root; None = PKDPIPE_CACHE_DIR or ~/.cache/pkdpipe
    max_seq_len: int = 128  # longer inputs are truncated (longest_first for pairs)
    batch_size: int = 64  # teacher batch; batches are length-sorted and padded per batch
    dtype: str = "float16"  # storage dtype of the [CLS] vectors (logits are always float32)
    layers: tuple[int, ...] | None = None  # hidden layers to store (0 = embeddings); None = all
    shard_size: int = 8192  # rows per HDF5 shard: the unit of resume and of parallel writing
    device: str = "auto"  # cpu, cuda, or auto (cuda when available)
    precision: str = "fp32"  # autocast for the teacher forward: fp32, bf16, fp16
    force: bool = False  # recompute even when a complete cache with this key exists
    store: str | None = None  # shared store URL to look the key up in (and push to with push=True)
    push: bool = False  # after computing, publish the cache to `store`
    runs_dir: Path = Path("runs")  # where `finetune` puts teachers (for the default teacher)
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    quiet: bool = False  # no progress bars
    command: str | None = None  # the command line, recorded in the manifest

    def __post_init__(self):
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_root()
        self.runs_dir = Path(self.runs_dir)
        self.splits = tuple(self.splits)
        if not self.splits:
            raise ConfigError("--splits needs at least one split")
        if self.layers is not None:
            self.layers = tuple(sorted(set(self.layers)))
        _check_positive(max_seq_len=self.max_seq_len, batch_size=self.batch_size, shard_size=self.shard_size)
        _check_choice("--dtype", self.dtype, HIDDEN_DTYPES)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        if self.push and not self.store:
            raise ConfigError("--push needs --store URL (or PKDPIPE_STORE)")


@dataclass
class TrainConfig:
    """What every training run shares: optimisation, schedule, evaluation, precision.

    Defaults follow the PKD paper (Sun et al. 2019, after BERT): batch 32, 4 epochs, 10% linear
    warm-up, weight decay 0.01; lr from the paper's grid {1e-5, 2e-5, 5e-5}.
    """

    task: str = ""  # task name or task file (taken from the cache when distilling)
    output: Path | None = None  # output folder; None = a default under runs_dir
    lr: float = 5e-5  # peak learning rate (AdamW)
    epochs: int = 4
    batch_size: int = 32  # the global batch: split across ranks under torchrun
    warmup: float = 0.1  # fraction of the steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # AdamW, not applied to biases and LayerNorm weights
    max_grad_norm: float = 1.0  # gradient clipping (0 turns it off)
    seed: int = 42
    eval_every: int = 0  # evaluate on dev every N steps; 0 = at the end of each epoch
    checkpoint_every: int = 200  # save a resumable checkpoint every N steps (and each epoch)
    precision: str = "fp32"  # autocast: fp32, bf16, fp16 (fp16 uses a gradient scaler on CUDA)
    device: str = "auto"
    resume: bool = True  # continue from output/checkpoint when it exists
    runs_dir: Path = Path("runs")
    report_to: str | None = None  # "tensorboard" to also log there (needs tensorboard installed)
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); for smoke tests
    group_by_length: bool = False  # batches of similar length inside random megabatches (less padding)
    trust_remote_code: bool = False
    quiet: bool = False
    command: str | None = None

    def __post_init__(self):
        self.output = Path(self.output) if self.output else None
        self.runs_dir = Path(self.runs_dir)
        _check_positive(lr=self.lr, epochs=self.epochs, batch_size=self.batch_size)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1); got {self.warmup}")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--device", self.device, ("auto", "cpu", "cuda"))
        if self.report_to not in (None, "tensorboard"):
            raise ConfigError(f"--report-to supports tensorboard; got {self.report_to!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """`pkdpipe finetune`: fine-tune a teacher, or a K-layer student baseline (`layers=K`)."""

    model: str = ""  # pre-trained model folder or hub name to start from
    data_dir: Path | None = None
    layers: int | None = None  # keep only the first K encoder layers (a fine-tuned-only student)
    max_seq_len: int = 128

    def __post_init__(self):
        super().__post_init__()
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        if not self.task:
            raise ConfigError("finetune needs --task")
        if not self.model:
            raise ConfigError("finetune needs --model (a pre-trained model folder or hub name)")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"--layers must be at least 1; got {self.layers}")


@dataclass
class DistillConfig(TrainConfig):
    """`pkdpipe distill`: train a K-layer student from a teacher cache alone.

    Loss: (1 - alpha) * CE + alpha * T^2 * KL + beta * PT; see `pkdpipe.losses` for the reductions
    and how the paper's hyperparameters map onto them.
    """

    cache: str | None = None  # cache folder or key; None = the newest complete cache under cache_dir
    cache_dir: Path | None = None
    strategy: str = "last"  # in pkdpipe.strategies: last, skip (PKD), kd (vanilla KD), ft (gold labels)
    layers: int = 6  # student depth K
    teacher_layers: tuple[int, ...] | None = None  # explicit map for student layers 1..K-1
    student_init: str | None = None  # None = the model the teacher was fine-tuned from
    alpha: float = 0.5  # weight of the soft-label term
    beta: float = (
        0.5  # weight of the patient term; pkdpipe scale = authors' beta / hidden size (pkdpipe.losses)
    )
    temperature: float = 10.0
    normalize: bool = True  # L2-normalise the [CLS] vectors before the patient loss

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
        if self.teacher_layers is not None:
            self.teacher_layers = tuple(self.teacher_layers)


@dataclass
class EvaluateConfig:
    """`pkdpipe evaluate`: metrics, size and speed of one or more models on one split."""

    models: list[str] = field(default_factory=list)
    task: str = ""
    data_dir: Path | None = None
    split: str = "dev"
    batch_size: int = 64
    max_seq_len: int = 128
    device: str = "auto"
    precision: str = "fp32"
    trust_remote_code: bool = False
    quiet: bool = False

    def __post_init__(self):
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        if not self.models:
            raise ConfigError("evaluate needs at least one model folder")
        _check_positive(batch_size=self.batch_size, max_seq_len=self.max_seq_len)
        _check_choice("--precision", self.precision, PRECISIONS)

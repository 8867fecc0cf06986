"""Distillation strategies, in one place: what a student learns from, and how its step is built.

A `Strategy` declares its name, which teacher layers its student layers learn from (if any), which
cached targets its batches need, its settings (a dataclass of `pkdpipe.settings.setting` fields),
the loss terms its step returns, and how to build that step. The loop, the logs, the progress bar
and `pkdpipe report` take whatever terms come back, and the CLI, sweeps, searches, run names, the
resume check and the model card take whatever settings it declares, so a new objective is one
`register(Strategy(...))` away, from any module; nothing else in pkdpipe changes. The CLI imports
the modules named in $PKDPIPE_PLUGINS first (`load_plugins`), so a strategy registered there is
an option of `pkdpipe distill` and `pkdpipe sweep` like the built-in ones.

The paper's four rows share one objective, `(1 - alpha) * CE + alpha * KD + beta * PT`
(`pkdpipe.losses.pkd_loss`), with the terms a row does not use reported as 0:

    ft     gold labels only             terms loss, ce (kd, pt = 0)
    kd     + the teacher's soft labels  reads alpha, temperature
    last   + PT on the K-1 layers just below the teacher's top
    skip   + PT on every (N/K)-th teacher layer           reads beta, normalize, pt_space too

All four take the objective's settings (`PKDSettings`), as their runs have always been named and
resumed by all five; `reads` says which of them each step uses (what its model card lists).

`last` and `skip` also take `--teacher-layers auto` (the K-1 layers whose normalised [CLS] varies
most between examples, from the cache's statistics) and `pt_space` (where PT compares the vectors:
the paper's raw [CLS], or centred or standardised with the teacher's cached statistics; see
`pkdpipe.losses.patient_space`).

A step is `step(model, batch) -> {"loss": tensor, term: tensor, ...}`. A batch holds the model's
inputs, "labels", and, as the strategy asks, "teacher_logits" (batch, labels) and "teacher_cls"
(batch, M, hidden): the cached [CLS] vectors of the M teacher layers its map names, in order.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pkdpipe import layermap
from pkdpipe.errors import ConfigError
from pkdpipe.settings import IF_CHANGED, check_choice, check_positive, default_of, flag, kind_of, setting

# torch is imported when a step is built, not here: configs check strategy names before any heavy import
StepFn = Callable[[object, dict], dict]  # (model, batch on device) -> {"loss": tensor, term: tensor, ...}


@dataclass(frozen=True)
class StepSpec:
    """What a strategy builds its step from."""

    config: object  # the run's DistillConfig
    regression: bool  # a one-output task (MSE instead of cross-entropy)
    teacher_layers: list[int]  # the layer map: teacher layers whose [CLS] vectors are in the batch
    student_layers: list[int]  # the student layers matched to them, in the same order
    teacher_stats: dict | None = None  # {teacher layer: pkdpipe.cache.stats.LayerStats} over train
    # the strategy's settings for the run (None: the config's, `config.strategy_settings`)
    settings: object = None

    @property
    def values(self):
        """The strategy's settings: `spec.values.beta`."""
        return self.settings if self.settings is not None else self.config.strategy_settings


@dataclass(frozen=True)
class NoSettings:
    """The settings of a strategy that has none."""


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line, for help texts and model cards
    terms: tuple[str, ...]  # what its step returns, "loss" first; logged and drawn as they come
    # its settings: a dataclass of `setting(...)` fields with defaults (None: it has none); a tuple
    # of names, the older form, takes those settings of the paper's objective (`PKDSettings`)
    settings: type | tuple[str, ...] | None
    make_step: Callable[[StepSpec], StepFn]
    uses_logits: bool = True  # batches carry the cached teacher logits
    pick_layers: Callable[[int, int], list[int]] | None = None  # (teacher N, student K) -> map; None: no PT
    reads: tuple[str, ...] | None = None  # the settings its step reads, on its card (None: all of them)

    def __post_init__(self):
        if self.settings is None:
            object.__setattr__(self, "settings", NoSettings)
        elif isinstance(self.settings, tuple):
            _check_names(self.name, self.settings, PKDSettings)
            object.__setattr__(self, "reads", self.settings)
            object.__setattr__(self, "settings", PKDSettings)
        if not dataclasses.is_dataclass(self.settings):
            raise ConfigError(
                f"strategy {self.name!r}: its settings must be a dataclass of setting(...) fields"
            )
        _check_names(self.name, self.reads or (), self.settings)

    @property
    def maps_layers(self) -> bool:
        return self.pick_layers is not None

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The settings its step reads: what its model card lists."""
        return self.reads if self.reads is not None else tuple(self.setting_names)

    @property
    def setting_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def make_settings(self, values=None):
        """Its settings from `values` (a dict, a settings object or None: the defaults). A value for
        another strategy's setting is dropped at that setting's default and refused otherwise (a
        user who typed it expects it to count); a name no strategy has is a TypeError."""
        given = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values or {})
        own = set(self.setting_names)
        for name, value in given.items():
            if name in own:
                continue
            other = setting_field(name)  # TypeError for a name no strategy has
            if value != default_of(other):
                raise ConfigError(
                    f"{flag(name)} is not a setting of strategy {self.name!r} (strategies with it: "
                    f"{', '.join(s.name for s in _REGISTRY.values() if name in s.setting_names)})"
                )
        return self.settings(**{k: v for k, v in given.items() if k in own})

    def layer_map(
        self,
        teacher_layers: int,
        student_layers: int,
        explicit: Sequence[int] | str | None = None,
        shares: dict[int, float] | None = None,
    ):
        """The teacher layers matched to student layers 1..K-1 (empty without a patient term).
        `explicit` "auto" picks them by `shares` ({layer: varying share}, `layermap.by_signal`)."""
        layermap.check_depths(teacher_layers, student_layers)
        if not self.maps_layers:
            if explicit is not None:
                patient = " and ".join(s.name for s in _REGISTRY.values() if s.maps_layers)
                raise ConfigError(
                    f"--teacher-layers only applies to the {patient} strategies; "
                    f"{self.name!r} has no patient loss"
                )
            return []
        if explicit == "auto":
            if shares is None:
                raise ValueError("an auto layer map needs each teacher layer's varying share")
            return layermap.by_signal(shares, teacher_layers, student_layers)
        if explicit is not None:
            return layermap.check_explicit(list(explicit), teacher_layers, student_layers)
        return self.pick_layers(teacher_layers, student_layers)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Make a strategy available to `distill`, `sweep` and the CLI by its name; its settings become
    options of both. A setting another strategy also has must be that same setting (one option)."""
    if not strategy.terms or strategy.terms[0] != "loss":
        raise ConfigError(f"strategy {strategy.name!r}: its terms must start with 'loss'")
    for f in dataclasses.fields(strategy.settings):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"strategy {strategy.name!r}: its setting {f.name!r} needs a default")
        other = setting_fields().get(f.name)
        if other is not None and (default_of(other), kind_of(other)) != (default_of(f), kind_of(f)):
            raise ConfigError(
                f"strategy {strategy.name!r}: its setting {f.name!r} differs from the one of that name "
                "another strategy has (another default or type); one option cannot be both: rename it"
            )
    _REGISTRY[strategy.name] = strategy
    return strategy


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every registered strategy's settings, by name, in the order they were registered."""
    found: dict[str, dataclasses.Field] = {}
    for strategy in _REGISTRY.values():
        for f in dataclasses.fields(strategy.settings):
            found.setdefault(f.name, f)
    return found


def setting_field(name: str) -> dataclasses.Field:
    try:
        return setting_fields()[name]
    except KeyError:
        raise TypeError(f"no strategy has a setting {name!r}") from None


def _check_names(strategy: str, names: tuple[str, ...], settings) -> None:
    unknown = set(names) - {f.name for f in dataclasses.fields(settings)}
    if unknown:
        raise ConfigError(
            f"strategy {strategy!r} reads settings it does not have: {', '.join(sorted(unknown))}"
        )


PLUGINS_ENV = "PKDPIPE_PLUGINS"


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the user's modules that register strategies: `spec` (default: $PKDPIPE_PLUGINS), a
    comma-separated list of module names (`my_strategies`) or .py files (`./my_strategy.py`). The
    CLI calls this before it builds its options; a script or notebook imports its module itself."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    loaded = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser()
                module_spec = importlib.util.spec_from_file_location(path.stem, path)
                if module_spec is None or not path.is_file():
                    raise ImportError(f"no such file: {path}")
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_spec.name] = module  # as an import would (dataclasses look there)
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except ImportError as err:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import {entry}: {err}") from None
        loaded.append(entry)
    return loaded


def get(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def layer_map(
    strategy: str,
    teacher_layers: int,
    student_layers: int,
    explicit: Sequence[int] | str | None = None,
    shares: dict[int, float] | None = None,
) -> list[int]:
    """The 1-based teacher layers matched to student layers 1..K-1, in order (see pkdpipe.layermap).

    Raises:
        ConfigError: an unknown strategy, a student that is not shallower than its teacher, or an
            explicit map that does not fit (wrong length, out of range, not increasing, or given to
            a strategy without a patient loss).
    """
    return get(strategy).layer_map(teacher_layers, student_layers, explicit, shares)


# -- the paper's four rows -------------------------------------------------------------------------
PKD_TERMS = ("loss", "ce", "kd", "pt")


@dataclass(frozen=True)
class PKDSettings:
    """The settings of the paper's objective, `(1 - alpha) * CE + alpha * T^2 * KL + beta * PT`
    (`pkdpipe.losses.pkd_loss`, which says the reductions and how the paper's numbers map onto them)."""

    alpha: float = setting(
        0.5, "Weight of the soft-label (KD) term against CE, in [0, 1].", sweep=True, tag="a"
    )
    beta: float = setting(
        0.5,
        "Weight of the patient term (pkdpipe scale: the authors' beta / hidden size).",
        sweep=True,
        tag="b",
    )
    temperature: float = setting(10.0, "KD temperature T.", sweep=True, tag="t")
    normalize: bool = setting(True, "L2-normalise the [CLS] vectors in the patient loss.", tag="")
    pt_space: str = setting(
        "raw",
        "Where the patient loss compares [CLS] vectors: raw (the paper), centered, standardized (by the "
        "cache's per-dimension statistics; the student by its batch's), standardized-teacher, or "
        "relational (how each pair of examples relates, in standardised coordinates).",
        sweep=True,
        tag=IF_CHANGED,
    )

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1]; got {self.alpha}")
        if self.beta < 0:
            raise ConfigError(f"--beta must be non-negative; got {self.beta}")
        check_positive(temperature=self.temperature)
        if self.pt_space != "raw":  # the paper's needs no check, and no torch (losses imports it)
            from pkdpipe.losses import PT_SPACES

            check_choice("--pt-space", self.pt_space, PT_SPACES)


def _pkd_step(spec: StepSpec, soft_labels: bool = True) -> StepFn:
    """The step of ft, kd, last and skip: one forward (with hidden states when there is a map), then
    `pkd_loss` with the run's alpha, beta, temperature, normalize and pt_space (CE alone without
    soft labels)."""
    from pkdpipe.losses import pkd_loss
    from pkdpipe.models import cls_vectors

    c, layers = spec.values, spec.student_layers
    space = c.pt_space if layers else "raw"
    stats = _stat_tensors(spec) if space != "raw" else {}

    def step(model, batch: dict) -> dict:
        out = model(**model_inputs(batch), output_hidden_states=bool(layers))
        if stats and stats["mean"].device != out.logits.device:
            stats.update({k: v.to(out.logits.device) for k, v in stats.items()})
        return pkd_loss(
            out.logits,
            batch["teacher_logits"] if soft_labels else None,
            batch["labels"],
            cls_vectors(out.hidden_states, layers) if layers else None,
            batch["teacher_cls"] if layers else None,
            alpha=c.alpha,
            beta=c.beta,
            temperature=c.temperature,
            normalize=c.normalize,
            regression=spec.regression,
            pt_space=space,
            teacher_mean=stats.get("mean"),
            teacher_std=stats.get("std"),
        )

    return step


def _stat_tensors(spec: StepSpec) -> dict:
    """{"mean", "std"}: (M, hidden) float32 tensors of the mapped teacher layers' train statistics."""
    import numpy as np
    import torch

    if not spec.teacher_stats or any(layer not in spec.teacher_stats for layer in spec.teacher_layers):
        raise ConfigError("a patient space other than raw needs the cache's statistics of the mapped layers")
    chosen = [spec.teacher_stats[layer] for layer in spec.teacher_layers]
    return {
        "mean": torch.from_numpy(np.stack([s.mean for s in chosen])).float(),
        "std": torch.from_numpy(np.stack([s.std for s in chosen])).float(),
    }


def model_inputs(batch: dict) -> dict:
    """The tensors a model's forward takes, from a batch that also carries labels and targets."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


LAST = register(
    Strategy(
        "last",
        "PKD-Last: KD + the K-1 teacher layers just below the top",
        PKD_TERMS,
        PKDSettings,
        _pkd_step,
        pick_layers=layermap.last_layers,
    )
)
SKIP = register(
    Strategy(
        "skip",
        "PKD-Skip: KD + every (N/K)-th teacher layer",
        PKD_TERMS,
        PKDSettings,
        _pkd_step,
        pick_layers=layermap.skip_layers,
    )
)
KD = register(
    Strategy(
        "kd",
        "vanilla KD: gold labels and the teacher's soft labels",
        PKD_TERMS,
        PKDSettings,
        _pkd_step,
        reads=("alpha", "temperature"),
    )
)
FT = register(
    Strategy(
        "ft",
        "fine-tuning on the gold labels only",
        PKD_TERMS,
        PKDSettings,
        partial(_pkd_step, soft_labels=False),
        uses_logits=False,
        reads=(),
    )
)


# -- fine-tuning a teacher (or a baseline) on gold labels: not a distillation ----------------------
def finetune_step(regression: bool) -> StepFn:
    """`finetune`'s objective: cross-entropy (MSE for regression) on the gold labels."""
    from pkdpipe.losses import ce_loss

    def step(model, batch: dict) -> dict:
        loss = ce_loss(model(**model_inputs(batch)).logits, batch["labels"], regression=regression)
        return {"loss": loss}

    return step


FINETUNE_TERMS = ("loss",)

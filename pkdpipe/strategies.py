"""Distillation strategies, in one place: what a student learns from, and how its step is built.

A `Strategy` declares its name, which teacher layers its student layers learn from (if any), which
cached targets its batches need, which `DistillConfig` fields it reads, the loss terms its step
returns, and how to build that step. The loop, the logs, the progress bar and `pkdpipe report`
take whatever terms come back, so a new objective is one `register(Strategy(...))` away, from any
module; nothing else in pkdpipe changes.

The paper's four rows share one objective, `(1 - alpha) * CE + alpha * KD + beta * PT`
(`pkdpipe.losses.pkd_loss`), with the terms a row does not use reported as 0:

    ft     gold labels only             terms loss, ce (kd, pt = 0)
    kd     + the teacher's soft labels  reads alpha, temperature
    last   + PT on the K-1 layers just below the teacher's top
    skip   + PT on every (N/K)-th teacher layer           reads beta, normalize, pt_space too

`last` and `skip` also take `--teacher-layers auto` (the K-1 layers whose normalised [CLS] varies
most between examples, from the cache's statistics) and `pt_space` (where PT compares the vectors:
the paper's raw [CLS], or centred or standardised with the teacher's cached statistics; see
`pkdpipe.losses.patient_space`).

A step is `step(model, batch) -> {"loss": tensor, term: tensor, ...}`. A batch holds the model's
inputs, "labels", and, as the strategy asks, "teacher_logits" (batch, labels) and "teacher_cls"
(batch, M, hidden): the cached [CLS] vectors of the M teacher layers its map names, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from pkdpipe import layermap
from pkdpipe.errors import ConfigError

# torch is imported when a step is built, not here: configs check strategy names before any heavy import
StepFn = Callable[[object, dict], dict]  # (model, batch on device) -> {"loss": tensor, term: tensor, ...}


@dataclass(frozen=True)
class StepSpec:
    """What a strategy builds its step from."""

    config: object  # the run's DistillConfig (the fields the strategy lists in `hyperparameters`)
    regression: bool  # a one-output task (MSE instead of cross-entropy)
    teacher_layers: list[int]  # the layer map: teacher layers whose [CLS] vectors are in the batch
    student_layers: list[int]  # the student layers matched to them, in the same order
    teacher_stats: dict | None = None  # {teacher layer: pkdpipe.cache.stats.LayerStats} over train


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line, for help texts and model cards
    terms: tuple[str, ...]  # what its step returns, "loss" first; logged and drawn as they come
    hyperparameters: tuple[str, ...]  # the DistillConfig fields its step reads (recorded on its card)
    make_step: Callable[[StepSpec], StepFn]
    uses_logits: bool = True  # batches carry the cached teacher logits
    pick_layers: Callable[[int, int], list[int]] | None = None  # (teacher N, student K) -> map; None: no PT

    @property
    def maps_layers(self) -> bool:
        return self.pick_layers is not None

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
    """Make a strategy available to `distill`, `sweep` and the CLI by its name."""
    if not strategy.terms or strategy.terms[0] != "loss":
        raise ConfigError(f"strategy {strategy.name!r}: its terms must start with 'loss'")
    _REGISTRY[strategy.name] = strategy
    return strategy


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


def _pkd_step(spec: StepSpec, soft_labels: bool = True) -> StepFn:
    """The step of ft, kd, last and skip: one forward (with hidden states when there is a map), then
    `pkd_loss` with the run's alpha, beta, temperature, normalize and pt_space (CE alone without
    soft labels)."""
    from pkdpipe.losses import pkd_loss
    from pkdpipe.models import cls_vectors

    c, layers = spec.config, spec.student_layers
    space = getattr(c, "pt_space", "raw") if layers else "raw"
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
        ("alpha", "beta", "temperature", "normalize", "pt_space"),
        _pkd_step,
        pick_layers=layermap.last_layers,
    )
)
SKIP = register(
    Strategy(
        "skip",
        "PKD-Skip: KD + every (N/K)-th teacher layer",
        PKD_TERMS,
        ("alpha", "beta", "temperature", "normalize", "pt_space"),
        _pkd_step,
        pick_layers=layermap.skip_layers,
    )
)
KD = register(
    Strategy(
        "kd",
        "vanilla KD: gold labels and the teacher's soft labels",
        PKD_TERMS,
        ("alpha", "temperature"),
        _pkd_step,
    )
)
FT = register(
    Strategy(
        "ft",
        "fine-tuning on the gold labels only",
        PKD_TERMS,
        (),
        partial(_pkd_step, soft_labels=False),
        uses_logits=False,
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

"""`sweep --search asha`: a hyperparameter search that stops bad runs early, on Optuna.

PKD wants a search over lr, alpha, beta, T and the strategy, and the cache makes each trial cheap:
a student alone. Instead of training every point of a grid to the end, each trial reports its dev
metric after every evaluation (every epoch, or every --eval-every steps) to Optuna's successive
halving pruner, which stops the trials that fall behind (ASHA). Optuna is a well-kept library made
for exactly this, so pkdpipe writes no scheduler of its own; it is an optional extra
(`pip install 'pkdpipe[search]'`).

The study lives in an Optuna storage: by default an SQLite file beside the sweep
(`<sweep dir>/study.db`); any URL Optuna takes (`postgresql://...`) lets any number of workers on
any machines share one study (`pkdpipe sweep --search asha --study NAME --storage URL`). Workers
stop once the study holds `trials` finished or pruned trials that trained a student (one extra
trial per extra worker at most, from the race between workers; none is ever run twice), once every
setting of a space of choices has been tried, or when their last 3 trials all failed. A student is
fixed by its settings and seed, so a trial whose sampler draws the run an earlier trial already
trained (the same run key, `pkdpipe.runfolder.run_key`: TPE often draws the same settings over a
space of choices, and kd drawn with two betas is one run) is answered from that trial, its dev
metric or its pruning, without training, and does not count against `trials`.

A worker killed mid-trial stops sending heartbeats; after the grace period its trial is
marked failed and queued again with the same settings and folder (a trial's folder is named by its
number and settings, and travels with the retry), and the next worker resumes it from its
checkpoint. Finished trials are never rerun.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from pkdpipe import files, progress, runfolder, strategies
from pkdpipe.config import DistillConfig, strategy_fields, sweep_fields
from pkdpipe.errors import ConfigError
from pkdpipe.settings import default_of, flag, kind_of, parse_bool
from pkdpipe.sweep import grid_settings, run_name

# How often a running trial tells the storage it is alive; a trial silent for 4 heartbeats is taken
# for dead, failed and queued again. $PKDPIPE_SEARCH_HEARTBEAT sets it (tests use 1 second).
HEARTBEAT_S = int(os.environ.get("PKDPIPE_SEARCH_HEARTBEAT", "30"))


def _kind(name: str) -> str:
    """How a searched setting's values are typed (`pkdpipe.settings.kind_of`): "int", "float",
    "bool" (true/false), or anything else, whose values are names; only numbers take a range."""
    return kind_of(sweep_fields()[name])


@dataclass(frozen=True)
class Param:
    """One searched setting: a list of choices, or a range (`low:high`, `:log` for a log scale)."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if _kind(self.name) == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def parse_param(name: str, text: str) -> Param:
    """'2e-5:2e-4:log', '0.2:0.9', '5,10,20' or 'skip,last' for the setting `name`."""
    fields = sweep_fields()
    if name not in fields:
        raise ConfigError(f"cannot search over {name!r}; choose from {', '.join(fields)}")
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        log = len(parts) == 3 and parts[2] == "log"
        if _kind(name) not in ("int", "float") or len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ConfigError(f"{flag(name)}: a range is LOW:HIGH or LOW:HIGH:log; got {text!r}")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise ConfigError(f"{flag(name)}: a range takes numbers; got {text!r}") from None
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{flag(name)}: the range {text!r} is empty (or not positive on a log scale)")
        return Param(name, low=low, high=high, log=log)
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"{flag(name)} has no values")
    return Param(name, choices=tuple(_typed(name, v) for v in values))


def _typed(name: str, value: str):
    kind = _kind(name)
    if kind == "bool":
        return parse_bool(value, flag(name))
    if kind not in ("int", "float") or value in sweep_fields()[name].metadata.get("words", ()):
        return value  # a name, or a word the setting takes (--lr auto: the default rule's)
    try:
        if kind == "int":
            if not re.fullmatch(r"-?\d+", value):
                raise ValueError
            return int(value)
        return float(value)
    except ValueError:
        kind = "whole numbers" if kind == "int" else "numbers"
        raise ConfigError(f"{flag(name)} takes {kind}; got {value!r}") from None


def split_space(params: dict[str, Param]) -> tuple[dict[str, Param], dict]:
    """The searched settings (a range or several values) and the fixed ones (one value each). When
    the strategy is searched, a fixed setting that not all its strategies have, away from its
    default, stays in the space (one choice; `trial_config` gives it to the trials of the
    strategies that have it), and the first strategy stands for them all among the fixed."""
    searched = {k: p for k, p in params.items() if p.choices is None or len(p.choices) > 1}
    fixed = {k: p.choices[0] for k, p in params.items() if k not in searched}
    if "strategy" in searched:
        chosen = [strategies.get(name) for name in searched["strategy"].choices]
        theirs = strategy_fields()
        for name in [k for k in fixed if k in theirs and fixed[k] != default_of(theirs[k])]:
            if not all(name in s.setting_names for s in chosen):
                searched[name] = params[name]
                del fixed[name]
        fixed["strategy"] = chosen[0].name
    return searched, fixed


def load_space(path: Path) -> dict[str, Param]:
    """A search space from a TOML file: `lr = "2e-5:2e-4:log"`, `strategy = ["skip", "last"]`."""
    from pkdpipe.tasks import tomllib  # the standard library's, or tomli on Python 3.10

    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read the search space {path}: {err}") from None
    return {
        name: parse_param(name, ",".join(map(str, v)) if isinstance(v, list) else str(v))
        for name, v in raw.items()
    }


@dataclass
class Trial:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    settings: dict
    value: float | None  # the best dev metric it reached
    epochs: int  # how many evaluations it reported (0 for a repeat: it trained nothing)
    output: str | None
    error: str | None = None  # why a failed trial failed
    repeat_of: int | None = None  # the earlier trial with the same settings that answered it


def search(
    base: DistillConfig,
    space: dict[str, Param],
    trials: int,
    sweep_dir: Path,
    study_name: str,
    storage: str | None = None,
    seed: int | None = None,
    source_hook=None,
) -> list[Trial]:
    """Run trials of `space` on top of `base` until the study holds `trials` finished or pruned
    ones; return every trial of the study, best first. `seed` seeds this worker's sampler (None:
    random, so that workers sharing a study do not all draw the same settings)."""
    optuna = _optuna()
    from pkdpipe import checkpoint
    from pkdpipe.errors import PkdError
    from pkdpipe.train import distill

    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(study_name, storage or default_storage(sweep_dir), seed, create=True)
    cache_path, main_metric, steps_per_epoch = _describe(base)
    base = replace(base, cache=str(cache_path))
    every = base.eval_every or steps_per_epoch  # the pruner's unit: one evaluation

    def objective(trial) -> float:
        settings = {name: param.suggest(trial) for name, param in space.items()}
        config = trial_config(base, settings)
        key = _run_key(config)
        earlier = _tried(trial.study, key, settings)
        if earlier is not None:  # the same student again: answer from it, train nothing
            trial.set_user_attr("repeat_of", earlier.number)
            trial.set_user_attr("output", earlier.user_attrs.get("output"))
            said = f"trial {trial.number}: the settings of trial {earlier.number}, not trained again"
            progress.info(said, base.quiet)
            if earlier.state == optuna.trial.TrialState.PRUNED:
                raise optuna.TrialPruned()
            return earlier.value
        trial.set_user_attr("run_key", key)
        # a trial's own folder (two trials may draw the same settings); a trial queued again after
        # its worker died keeps the folder (user attributes travel with it) and resumes there
        if "output" not in trial.user_attrs:
            trial.set_user_attr(
                "output", str(sweep_dir / f"{trial.number:04d}_{run_name(grid_settings(config))}")
            )
        output = Path(trial.user_attrs["output"])
        name = output.name

        def report(step: int, metrics: dict) -> None:
            evaluations = max(1, round(step / every))  # the same count when a retried trial resumes
            trial.report(metrics[main_metric], evaluations)
            if trial.should_prune():
                progress.info(
                    f"trial {trial.number} ({name}): pruned after {evaluations} evaluations", base.quiet
                )
                raise optuna.TrialPruned()

        progress.info(f"trial {trial.number}: {name}", base.quiet)
        try:
            result = distill(replace(config, output=output), source_hook, on_evaluate=report)
        except optuna.TrialPruned:
            checkpoint.remove(output / runfolder.CHECKPOINT)  # a pruned trial is never resumed
            raise
        except PkdError as err:
            trial.set_user_attr("error", str(err))  # kept with the failed trial, said if all fail
            raise
        return result.metrics[main_metric]

    budget = _Budget(trials, _size(space))
    failures = _FailureStop(MAX_FAILURES_IN_A_ROW)
    if not budget.spent(study):
        # a trial that fails with a user-facing error (a loss that became NaN at a high lr) is
        # recorded as failed and the search goes on, unless every trial keeps failing
        study.optimize(objective, callbacks=[budget, failures], gc_after_trial=True, catch=(PkdError,))
    records = trials_of(study)
    _write_results(sweep_dir, study_name, main_metric, records)  # failed trials too, with their errors
    if failures.stopped:
        raise ConfigError(
            f"the last {MAX_FAILURES_IN_A_ROW} trials of study {study_name} failed; the last said: "
            f"{failures.last_error or 'see the log'}"
        )
    return records


MAX_FAILURES_IN_A_ROW = 3
DONE = ("COMPLETE", "PRUNED")


def trial_config(base: DistillConfig, settings: dict) -> DistillConfig:
    """`base` with a trial's settings, less those its strategy does not have (a space over several
    strategies draws each one's settings for all of them)."""
    own = strategies.get(settings.get("strategy", base.strategy)).setting_names
    return replace(base, **{k: v for k, v in settings.items() if k in own or k not in strategy_fields()})


def _trained(study) -> list:
    """The finished or pruned trials that trained a student (not repeats answered from another)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name in DONE and "repeat_of" not in t.user_attrs
    ]


def _run_key(config: DistillConfig) -> str:
    """The run key of the student a trial's `config` trains (`pkdpipe.train.distill_settings`)."""
    from pkdpipe.cache.reader import TeacherCache
    from pkdpipe.train import distill_settings

    with TeacherCache(config.cache) as cache:
        return runfolder.run_key(distill_settings(config, cache)[3])


def _tried(study, key: str, settings: dict):
    """The first trial that trained the run of key `key` (a trial from before keys were recorded:
    with `settings`), or None."""
    for t in _trained(study):
        if t.user_attrs.get("run_key", None) == key or (
            "run_key" not in t.user_attrs and t.params == settings
        ):
            return t
    return None


def _size(space: dict[str, Param]) -> float:
    """How many distinct settings the space holds (inf when a float is searched over a range)."""
    size = 1.0
    for param in space.values():
        if param.choices is not None:
            size *= len(param.choices)
        elif _kind(param.name) == "int":
            size *= int(param.high) - int(param.low) + 1
        else:
            size = math.inf
    return size


class _Budget:
    """Stops the study once `trials` trials have trained a student (repeats answered from an
    earlier trial are free), or once every setting of a space of choices has been drawn (trained,
    or answered from a trial that trained the same run)."""

    def __init__(self, trials: int, size: float):
        self.trials, self.size = trials, size

    def spent(self, study) -> bool:
        done = [t for t in study.get_trials(deepcopy=False) if t.state.name in DONE]
        drawn = {tuple(sorted(t.params.items())) for t in done}
        return len(_trained(study)) >= self.trials or len(drawn) >= self.size

    def __call__(self, study, trial) -> None:
        if self.spent(study):
            study.stop()


class _FailureStop:
    """Stops this worker when its last trials all failed: a setting no trial can train with
    (a student as deep as the teacher, a tokenizer that does not fit) would fail for ever."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.stopped, self.last_error = limit, 0, False, None

    def __call__(self, study, trial) -> None:
        if trial.state.name != "FAIL":
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.last_error = trial.user_attrs.get("error") or self.last_error
        if self.in_a_row >= self.limit:
            self.stopped = True
            study.stop()


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(Path(sweep_dir) / runfolder.STUDY_DB).resolve()}"


def open_study(name: str, storage: str, seed: int | None = None, create: bool = False):
    """The study `name` in `storage`, with the ASHA pruner, and heartbeats that re-queue the trial
    of a worker that died."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(5):
        try:
            rdb = optuna.storages.RDBStorage(
                storage,
                # several workers on one SQLite file wait for its lock instead of failing at once
                engine_kwargs={"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=4 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
            break
        except Exception as err:  # a wrong URL, a server that is not there, a missing driver
            if attempt < 4 and (storage.startswith("sqlite") or _database_error(err)):
                time.sleep(1)  # another worker is creating the same tables right now
                continue
            raise ConfigError(
                f"cannot open the study storage {storage}: {str(err).splitlines()[0]}"
            ) from None
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    sampler = optuna.samplers.TPESampler(seed=seed)
    if create:
        return optuna.create_study(
            study_name=name,
            storage=rdb,
            direction="maximize",
            pruner=pruner,
            sampler=sampler,
            load_if_exists=True,
        )
    try:
        return optuna.load_study(study_name=name, storage=rdb, pruner=pruner, sampler=sampler)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {storage}") from None


def _database_error(err: Exception) -> bool:
    """Whether the database itself refused, which a retry can mend: workers started together on a
    fresh PostgreSQL database race to create Optuna's tables, and all but one are told the table's
    type already exists (UniqueViolation). A missing driver or a malformed URL is not retried."""
    from sqlalchemy.exc import DBAPIError

    return isinstance(err, DBAPIError)


def trials_of(study) -> list[Trial]:
    """Every trial of the study, best first (then pruned by how far they got, then the rest)."""
    records = [
        Trial(
            number=t.number,
            state=t.state.name,
            settings=dict(t.params),
            value=t.value if t.value is not None else max(t.intermediate_values.values(), default=None),
            epochs=len(t.intermediate_values),
            output=t.user_attrs.get("output"),
            error=t.user_attrs.get("error"),
            repeat_of=t.user_attrs.get("repeat_of"),
        )
        for t in study.get_trials(deepcopy=False)
    ]
    by_number = {r.number: r for r in records}
    for r in records:  # a repeat stands for the trial that answered it (a pruned one has no value of its own)
        if r.repeat_of is not None and r.repeat_of in by_number:
            r.value = by_number[r.repeat_of].value
    rank = {"COMPLETE": 0, "PRUNED": 1}
    return sorted(
        records, key=lambda r: (rank.get(r.state, 2), -(r.value if r.value is not None else -math.inf))
    )


def _write_results(sweep_dir: Path, study_name: str, main_metric: str, records: list[Trial]) -> None:
    rows = [vars(r) for r in records]
    text = json.dumps({"study": study_name, "main_metric": main_metric, "trials": rows}, indent=2)
    files.write_text(sweep_dir / runfolder.SEARCH_RESULTS, text + "\n")


def _describe(base: DistillConfig) -> tuple[Path, str, int]:
    """The cache a search trains from, its task's main metric and the steps of one epoch."""
    from pkdpipe.cache.local import resolve_cache
    from pkdpipe.cache.reader import TeacherCache
    from pkdpipe.tasks import get_task
    from pkdpipe.train import task_of

    task_name = get_task(base.task).name if base.task else None
    path = resolve_cache(base.cache, base.cache_dir, task_name)
    with TeacherCache(path) as cache:
        if "dev" not in cache.splits:
            raise ConfigError(f"a search ranks trials on dev, and cache {cache.key} has no dev split")
        steps = len(cache.epoch_plan("train", base.batch_size, 0, base.seed))
        return path, task_of(cache).main_metric, steps


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "--search asha needs Optuna: pip install 'pkdpipe[search]' (or pip install optuna)"
        ) from None
    return optuna

"""`sweep`: a hyperparameter grid trained from one cache, one run after another.

PKD needs a search over alpha, beta, T and lr; with the teacher cached, each run costs a student's
training alone. Runs are named by their settings, so a restarted sweep keeps every finished run
(one whose run key, `pkdpipe.runfolder.run_key`, is the key of the run it would train) and resumes
the interrupted one from its checkpoint. A finished run in a run's folder with other settings than
the name shows (another --epochs, say) is not kept: distill says so and stops.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from pkdpipe import files, progress, runfolder, strategies
from pkdpipe.cache.local import resolve_cache
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.config import DistillConfig, strategy_fields, sweep_fields
from pkdpipe.errors import ConfigError
from pkdpipe.settings import IF_CHANGED, default_of, tag_of
from pkdpipe.tasks import get_task
from pkdpipe.train import SourceHook, distill, distill_settings, layers_needed, task_of


@dataclass
class SweepRun:
    name: str
    settings: dict
    output: Path
    metrics: dict
    reused: bool
    seconds: float | None


def grid_settings(config: DistillConfig) -> dict:
    """The settings a sweep may vary, as `config` has them (its strategy's own, not another's): what
    a run's folder is named after."""
    own = set(strategies.get(config.strategy).setting_names)
    fields = sweep_fields()
    return {name: getattr(config, name) for name in fields if name in own or name not in strategy_fields()}


def run_name(settings: dict) -> str:
    """A folder name from the settings that vary, e.g. skip-3_a0.5_b0.1_t5_lr5e-05_s42: strategy
    and depth, then each setting by its `tag`, the strategy's before the training loop's, and at the
    end those tagged IF_CHANGED by their value where it differs from the default (`_standardized`
    for a patient space other than the paper's raw one)."""
    tagged, changed = [], []
    for name, f in sweep_fields().items():
        if name not in settings or name in ("strategy", "layers") or tag_of(f) == "":
            continue
        value = settings[name]
        if tag_of(f) == IF_CHANGED:
            changed += [] if value == default_of(f) else [str(value)]
        else:  # lr "auto" (the default rule's) as it is
            tagged.append(f"{tag_of(f)}{value:g}" if isinstance(value, float) else f"{tag_of(f)}{value}")
    return "_".join([f"{settings['strategy']}-{settings['layers']}", *tagged, *changed])


def grid(values: dict[str, list], strategy: str | None = None) -> list[dict]:
    """Every combination of `values`, in order. A setting that a combination's strategy (its own,
    else `strategy`) does not have is left out of that combination, and combinations that are then
    the same are one."""
    fields = sweep_fields()
    for name, options in values.items():
        if name not in fields:
            raise ConfigError(f"cannot sweep over {name!r}; choose from {', '.join(fields)}")
        if not options:
            raise ConfigError(f"the sweep over {name} has no values")
    names = list(values)
    combos = []
    for combo in (dict(zip(names, c)) for c in itertools.product(*(values[n] for n in names))):
        chosen = combo.get("strategy", strategy)
        if chosen is not None:
            own, theirs = set(strategies.get(chosen).setting_names), strategy_fields()
            combo = {k: v for k, v in combo.items() if k in own or k not in theirs}
        if combo not in combos:
            combos.append(combo)
    return combos


def pull_for(base: DistillConfig, values: dict[str, list], store: str) -> DistillConfig:
    """`sweep --store`: `base` on its cache's local folder, pulled first with the teacher layers that
    any run of the grid `values` maps (only those the local copy lacks; none for kd and ft). Only
    `strategy`, `layers` and `teacher_layers` among `values` change which layers those are."""
    from pkdpipe.cache.store import local_or_pull_for  # fsspec only when a store is used

    configs = [replace(base, **combo) for combo in grid(values, base.strategy)]

    def needs(manifest) -> list[int]:
        layers = set()
        for config in configs:
            layers.update(layers_needed(strategies.get(config.strategy), config, manifest))
        return sorted(layers)

    return replace(base, cache=str(local_or_pull_for(base.cache, base.cache_dir, store, needs, base.quiet)))


def sweep(
    base: DistillConfig,
    values: dict[str, list],
    sweep_dir: Path | None = None,
    source_hook: SourceHook | None = None,
) -> list[SweepRun]:
    """Train every combination of `values` on top of `base`; return the runs, best first.
    `source_hook` is passed to every `distill` (see `pkdpipe.train.SourceHook`)."""
    cache_path = resolve_cache(base.cache, base.cache_dir, get_task(base.task).name if base.task else None)
    # every run's settings checked before the first trains
    configs = [replace(base, cache=str(cache_path), **combo) for combo in grid(values, base.strategy)]
    with TeacherCache(cache_path) as cache:
        task = task_of(cache)
        keys = [runfolder.run_key(distill_settings(config, cache)[3]) for config in configs]
    sweep_dir = Path(sweep_dir) if sweep_dir else base.runs_dir / task.name / "sweep"
    runs = []
    for i, (config, key) in enumerate(zip(configs, keys), 1):
        settings = grid_settings(config)
        output = sweep_dir / run_name(settings)
        done = runfolder.read(output, "distill")
        if done.finished_as(key):
            runs.append(SweepRun(output.name, settings, output, done.dev, True, done.train_seconds))
            progress.info(f"[{i}/{len(configs)}] {output.name}: done before, kept", base.quiet)
            continue
        progress.info(f"[{i}/{len(configs)}] {output.name}", base.quiet)
        result = distill(replace(config, output=output), source_hook)
        runs.append(SweepRun(output.name, settings, output, result.metrics, False, result.seconds))
    main = task.main_metric
    runs.sort(key=lambda r: r.metrics.get(main, float("-inf")), reverse=True)
    summary = [
        {"name": r.name, **r.settings, **r.metrics, "seconds": r.seconds, "output": str(r.output)}
        for r in runs
    ]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"main_metric": main, "runs": summary}, indent=2)
    files.write_text(sweep_dir / runfolder.SWEEP_RESULTS, text + "\n")
    return runs

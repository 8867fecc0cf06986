"""`sweep`: a hyperparameter grid trained from one cache, one run after another.

PKD needs a search over alpha, beta, T and lr; with the teacher cached, each run costs a student's
training alone. Runs are named by their settings, so a restarted sweep keeps every finished run
(its metrics.json exists) and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from pkdpipe import files, progress
from pkdpipe.cache.local import resolve_cache
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.config import DistillConfig
from pkdpipe.errors import ConfigError
from pkdpipe.tasks import get_task
from pkdpipe.train import SourceHook, distill, task_of

GRID_FIELDS = ("strategy", "layers", "alpha", "beta", "temperature", "lr", "seed", "pt_space")


@dataclass
class SweepRun:
    name: str
    settings: dict
    output: Path
    metrics: dict
    reused: bool
    seconds: float | None


def grid_settings(config) -> dict:
    """The fields a grid may vary, as `config` has them: what a run's folder is named after."""
    return {field: getattr(config, field) for field in GRID_FIELDS}


def run_name(settings: dict) -> str:
    """A folder name from the settings that vary, e.g. skip-3_a0.5_b0.1_t5_lr5e-05_s42 (and
    `_standardized` at the end for a patient space other than the paper's raw one)."""
    s = settings
    lr = s["lr"] if isinstance(s["lr"], str) else f"{s['lr']:g}"  # "auto": the default rule's lr
    hyper = f"a{s['alpha']:g}_b{s['beta']:g}_t{s['temperature']:g}_lr{lr}"
    space = s.get("pt_space", "raw")
    return f"{s['strategy']}-{s['layers']}_{hyper}_s{s['seed']}" + ("" if space == "raw" else f"_{space}")


def grid(values: dict[str, list]) -> list[dict]:
    for name, options in values.items():
        if name not in GRID_FIELDS:
            raise ConfigError(f"cannot sweep over {name!r}; choose from {', '.join(GRID_FIELDS)}")
        if not options:
            raise ConfigError(f"the sweep over {name} has no values")
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


def sweep(
    base: DistillConfig,
    values: dict[str, list],
    sweep_dir: Path | None = None,
    source_hook: SourceHook | None = None,
) -> list[SweepRun]:
    """Train every combination of `values` on top of `base`; return the runs, best first.
    `source_hook` is passed to every `distill` (see `pkdpipe.train.SourceHook`)."""
    cache_path = resolve_cache(base.cache, base.cache_dir, get_task(base.task).name if base.task else None)
    with TeacherCache(cache_path) as cache:
        task = task_of(cache)
    sweep_dir = Path(sweep_dir) if sweep_dir else base.runs_dir / task.name / "sweep"
    combos = grid(values)
    runs = []
    for i, combo in enumerate(combos, 1):
        config = replace(base, cache=str(cache_path), **combo)
        settings = grid_settings(config)
        output = sweep_dir / run_name(settings)
        done = output / "metrics.json"
        if done.is_file():
            metrics = json.loads(done.read_text())
            runs.append(
                SweepRun(output.name, settings, output, metrics["dev"], True, metrics.get("train_seconds"))
            )
            progress.info(f"[{i}/{len(combos)}] {output.name}: done before, kept", base.quiet)
            continue
        progress.info(f"[{i}/{len(combos)}] {output.name}", base.quiet)
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
    files.write_text(sweep_dir / "sweep_results.json", text + "\n")
    return runs

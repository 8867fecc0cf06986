"""A training run's folder: every file a run writes, named once; the run read back as one record;
who may write into it; and whether its run is done. What `pkdpipe.cache.schema` is for shards.

    OUTPUT/                          what `finetune` and `distill` write (rank 0)
      config.json, model.safetensors, tokenizer files     the model, in Hugging Face format
      pkdpipe_finetune.json | pkdpipe_config.json          the run's record: stage, settings, run key,
                                                           config (RECORDS)
      metrics.json                   written once the model is whole: its presence means finished
      train_log.jsonl                a line per logged step and per evaluation
      README.md                      the model card (`pkdpipe.cards`), rendered from the record
      eval_results.json              {split: metrics} that `evaluate --record` added
      checkpoint/, best/, tensorboard/   while the run is going (tensorboard: --report-to)
    <parent>/.<OUTPUT name>.lock     held by the run writing OUTPUT, for its whole life

    SWEEP/                           a grid (`sweep`) or a search (`sweep --search asha`)
      <run name>/ ...                one run folder each
      sweep_results.json | search_results.json, study.db (the search's default storage)
    DEMO/                            `pkdpipe demo`: teacher/, student-*/, quick-data/, demo_results.json

A run is read through `read(folder)`: a `Run` with its stage, record, metrics and recorded
evaluations, whatever wrote them (old folders included).

"Already done?" is one rule: a run's identity is its *run key*, a short hash of the canonical JSON
of the settings that change what is trained (`pkdpipe.loop.resume_settings`), the way a cache's key
is made. The key is stored in the record (and computed from the recorded settings for a run written
before keys were); `claim` (distill and finetune's rerun), `sweep`'s skip of finished runs, the
demo's reuse of a stage and a search's answer to a repeated trial all compare keys.

`claim(output, stage, settings, resume)` is how a run takes its folder. It refuses, with one line:
a folder another process is writing (the lock names its pid); a folder holding a teacher cache; a
folder holding a model that no run of this stage made (a teacher given as `distill --output`, say);
a finished run of other settings (unless --no-resume). A finished run of the same settings is
reported done, and a rerun returns it instead of training again.

Reading a run takes no torch (`report` draws runs without it): `pkdpipe.checkpoint` is imported by
the few functions that look into a checkpoint, all called where training is under way.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from pkdpipe import files
from pkdpipe.cache.fingerprint import KEY_LENGTH, sha256_json
from pkdpipe.cache.manifest import MANIFEST as CACHE_MANIFEST
from pkdpipe.errors import ConfigError, PkdError

# -- the files of a run folder ---------------------------------------------------------------------
DISTILL_RECORD = "pkdpipe_config.json"
FINETUNE_RECORD = "pkdpipe_finetune.json"  # also names the pre-trained model it started from
RECORDS = {"distill": DISTILL_RECORD, "finetune": FINETUNE_RECORD}  # stage -> its record
METRICS = "metrics.json"  # best dev metrics, steps, seconds, warnings: written last
EVAL_RESULTS = "eval_results.json"  # {split: {metric: value}}, beside metrics.json's dev
TRAIN_LOG = "train_log.jsonl"
CARD = "README.md"
CHECKPOINT = "checkpoint"
BEST = "best"
TENSORBOARD = "tensorboard"
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")

# -- the files of a folder of runs -----------------------------------------------------------------
SWEEP_RESULTS = "sweep_results.json"
SEARCH_RESULTS = "search_results.json"
STUDY_DB = "study.db"
DEMO_RESULTS = "demo_results.json"


def run_key(settings: dict) -> str:
    """The run's identity: a short sha256 of the canonical JSON of its result-changing settings.
    A whole float counts as its integer (`epochs` 4 and 4.0 are one run), as the settings compared
    equal when runs were told apart by comparing them."""
    return sha256_json(_whole_numbers(settings))[:KEY_LENGTH]


def _whole_numbers(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


@dataclass(frozen=True)
class Run:
    """A run folder as read back: what every reader of a run (a rerun, a sweep, the demo, the card,
    evaluate, report) takes instead of opening its JSON files itself."""

    folder: Path
    stage: str | None = None  # "distill" or "finetune"; None: no pkdpipe record
    record: dict = field(default_factory=dict)  # the stage's record ({} without one)
    metrics: dict | None = None  # metrics.json; None until the run has finished
    eval_results: dict = field(default_factory=dict)  # {split: metrics} that evaluate --record added

    @property
    def settings(self) -> dict | None:
        """The result-changing settings it recorded (None: a record from before they were)."""
        return self.record.get("settings")

    @property
    def key(self) -> str | None:
        """Its run key: the one recorded, else the recorded settings' (a run from before keys)."""
        settings = self.settings
        return self.record.get("run_key") or (run_key(settings) if settings is not None else None)

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    def finished_as(self, key: str) -> bool:
        """Whether it is a finished run whose key is `key`: nothing is left to train for it."""
        return self.finished and self.key == key

    @property
    def config(self) -> dict:
        return self.record.get("config") or {}

    @property
    def dev(self) -> dict:
        return (self.metrics or {}).get("dev", {})

    @property
    def warnings(self) -> list[str]:
        return (self.metrics or {}).get("warnings", [])

    @property
    def train_seconds(self) -> float | None:
        return (self.metrics or {}).get("train_seconds")

    @property
    def strategy(self) -> str:
        """How it trained: a distill strategy's name, or finetune."""
        return self.config.get("strategy", "finetune") if self.stage == "distill" else "finetune"

    @property
    def max_seq_len(self) -> int | None:
        """The length it trained at (distill: the cache's), when it recorded one."""
        length = self.record.get("max_seq_len") or self.config.get("max_seq_len")
        return length if isinstance(length, int) and length > 0 else None


def read(folder: Path, stage: str | None = None) -> Run:
    """The run in `folder`: of `stage` when given, else of whichever stage's record is there (a
    `Run` with no stage for a folder no pkdpipe run wrote, or none at all)."""
    folder = Path(folder)
    for name in (stage,) if stage else RECORDS:
        record = _read(folder / RECORDS[name])
        if record is not None:
            return Run(folder, name, record, _read(folder / METRICS), _read(folder / EVAL_RESULTS) or {})
    return Run(folder, metrics=_read(folder / METRICS))


def write(output: Path, stage: str, record: dict, metrics: dict) -> Run:
    """Write a finished run's record (its run key added) and then its metrics.json, which says the
    run is finished; return the run as written."""
    record = {**record, "run_key": run_key(record["settings"])}
    files.write_text(Path(output) / RECORDS[stage], json.dumps(record, indent=2) + "\n")
    files.write_text(Path(output) / METRICS, json.dumps(metrics, indent=2) + "\n")
    return Run(Path(output), stage, record, metrics, _read(Path(output) / EVAL_RESULTS) or {})


def add_results(run: Run, split: str, metrics: dict[str, float]) -> Run:
    """`run` with a split's metrics added to its eval_results.json."""
    results = {**run.eval_results, split: metrics}
    files.write_text(run.folder / EVAL_RESULTS, json.dumps(results, indent=2) + "\n")
    return Run(run.folder, run.stage, run.record, run.metrics, results)


def read_log(folder: Path) -> list[dict] | None:
    """The lines of the run's train_log.jsonl (one a kill cut short left out); None without one."""
    path = Path(folder) / TRAIN_LOG
    if not path.is_file():
        return None
    lines = []
    for line in filter(str.strip, path.read_text().splitlines()):
        with suppress(ValueError):
            lines.append(json.loads(line))
    return lines


def resumable_as(folder: Path, key: str) -> bool:
    """Whether `folder` holds an unfinished run's checkpoint whose settings have the key `key`: a
    rerun of that run resumes it."""
    from pkdpipe import checkpoint

    settings = checkpoint.saved_settings(Path(folder) / CHECKPOINT)
    return settings is not None and run_key(settings) == key


def changed_settings(saved: dict, now: dict) -> str:
    """'lr 5e-05 -> 0.0001, epochs 4 -> 2' for every setting that differs; '' when none does."""
    names = sorted(set(saved) | set(now))
    return ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in names if saved.get(k) != now.get(k))


@dataclass(frozen=True)
class Claim:
    output: Path
    done: Run | None  # the finished run with the same run key (nothing to train)


def lock_path(output: Path) -> Path:
    """The run's lock, beside its folder (a model folder stays free of pkdpipe's own files)."""
    return output.parent / f".{output.name}.lock"


@contextmanager
def claim(output: Path, stage: str, settings: dict, resume: bool) -> Iterator[Claim]:
    """Hold `output` for a `stage` run with `settings` while the block runs (see the module doc)."""
    output = Path(output)
    files.probe_writable(output.parent, PkdError, what="output folder's parent")
    with files.exclusive_lock(lock_path(output), wait=False) as held:
        if not held:
            raise ConfigError(
                f"{output} is being written by another pkdpipe run ({_holder(output)}): "
                "wait for it to finish, or choose another --output"
            )
        _write_holder(output)
        yield Claim(output, _check(output, stage, settings, resume))


def _check(output: Path, stage: str, settings: dict, resume: bool) -> Run | None:
    """None when `stage` may train into `output`; the finished run when it is already done."""
    if not output.is_dir():
        return None
    if (output / CACHE_MANIFEST).is_file():
        raise ConfigError(f"{output} holds a teacher cache: choose another --output")
    run = read(output, stage)
    if run.stage is None:
        if any((output / name).is_file() for name in MODEL_FILES) or read(output).stage is not None:
            raise ConfigError(
                f"{output} holds a model that no pkdpipe {stage} run made (a teacher, or another "
                "stage's output): choose another --output"
            )
        return None
    if not run.finished:  # a run that has not finished: the checkpoint (if any) says how it resumes
        return None
    from pkdpipe import checkpoint

    ckpt = output / CHECKPOINT
    if checkpoint.exists(ckpt) and checkpoint.finished_state(ckpt) is not None:
        return None  # finished, and stopped while writing its files: the run completes them
    if resume and run.key == run_key(settings):
        checkpoint.remove(ckpt)  # a stale checkpoint: what a kill during its removal left behind
        return run
    if resume:
        saved = run.settings
        changed = changed_settings(saved, settings) if saved is not None else "settings not recorded"
        raise ConfigError(
            f"{output} holds a finished {stage} run with other settings ({changed}): choose another "
            "--output, or pass --no-resume to train again and replace it"
        )
    return None


def kept(output: Path, checkpoint_every: int) -> str:
    """What an interrupted run of `output` leaves for a rerun, in words: the checkpoint and its step,
    a finished training whose files a rerun completes, or nothing (a rerun starts over)."""
    from pkdpipe import checkpoint

    ckpt = output / CHECKPOINT
    if not checkpoint.exists(ckpt):
        every = f"every {checkpoint_every} steps and " if checkpoint_every else ""
        return (
            "no checkpoint had been written yet (one is saved "
            f"{every}at the end of each epoch): nothing was kept; the same command starts over"
        )
    if checkpoint.finished_state(ckpt) is not None:
        return f"training had finished ({ckpt}); run the same command again to complete the output"
    step = checkpoint.saved_step(ckpt)
    at = f"at step {step} " if step is not None else ""
    return f"the checkpoint {at}is kept in {ckpt}; run the same command again to resume from it"


def start_fresh(output: Path) -> None:
    """What a new run must not finish with: an earlier run's metrics and recorded evaluations."""
    for name in (METRICS, EVAL_RESULTS):
        (output / name).unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_holder(output: Path) -> None:
    """Who holds the lock, for the line another run prints (the lock is on the open file, not on
    its content, so rewriting it is harmless)."""
    with suppress(OSError):
        lock_path(output).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")


def _holder(output: Path) -> str:
    try:
        return lock_path(output).read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"

"""A training run's folder: what it holds, who may write into it, and whether its run is done.

    OUTPUT/                          what `finetune` and `distill` write (rank 0)
      config.json, model.safetensors, tokenizer files     the model, in Hugging Face format
      pkdpipe_finetune.json | pkdpipe_config.json          the run's record: stage, settings, config
      metrics.json                   written once the model is whole: its presence means finished
      train_log.jsonl, README.md (the card), eval_results.json (evaluate --record)
      checkpoint/, best/             while the run is going
    <parent>/.<OUTPUT name>.lock     held by the run writing OUTPUT, for its whole life

`claim(output, stage, settings, resume)` is how a run takes its folder. It refuses, with one line:
a folder another process is writing (the lock names its pid); a folder holding a teacher cache; a
folder holding a model that no run of this stage made (a teacher given as `distill --output`, say);
a finished run of other settings (unless --no-resume). A finished run of the same settings is
reported done, and a rerun returns it instead of training again.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from pkdpipe import checkpoint, files
from pkdpipe.errors import ConfigError, PkdError

RECORDS = {"distill": "pkdpipe_config.json", "finetune": "pkdpipe_finetune.json"}  # stage -> its record
METRICS = "metrics.json"
CHECKPOINT = "checkpoint"
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")
CACHE_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Claim:
    output: Path
    done: dict | None  # metrics.json of a finished run with the same settings (nothing to train)


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


def _check(output: Path, stage: str, settings: dict, resume: bool) -> dict | None:
    """None when `stage` may train into `output`; metrics.json when its run is already done."""
    if not output.is_dir():
        return None
    if (output / CACHE_MANIFEST).is_file():
        raise ConfigError(f"{output} holds a teacher cache: choose another --output")
    record = _read(output / RECORDS[stage])
    if record is None:
        if any((output / name).is_file() for name in MODEL_FILES) or _other_record(output, stage):
            raise ConfigError(
                f"{output} holds a model that no pkdpipe {stage} run made (a teacher, or another "
                "stage's output): choose another --output"
            )
        return None
    metrics = _read(output / METRICS)
    if metrics is None:  # a run that has not finished: the checkpoint (if any) says how it resumes
        return None
    ckpt = output / CHECKPOINT
    if checkpoint.exists(ckpt) and checkpoint.finished_state(ckpt) is not None:
        return None  # finished, and stopped while writing its files: the run completes them
    saved = record.get("settings")
    if saved is not None and saved == settings and resume:
        checkpoint.remove(ckpt)  # a stale checkpoint: what a kill during its removal left behind
        return metrics
    if resume:
        changed = _changed(saved or {}, settings) if saved is not None else "settings not recorded"
        raise ConfigError(
            f"{output} holds a finished {stage} run with other settings ({changed}): choose another "
            "--output, or pass --no-resume to train again and replace it"
        )
    return None


def kept(output: Path, checkpoint_every: int) -> str:
    """What an interrupted run of `output` leaves for a rerun, in words: the checkpoint and its step,
    a finished training whose files a rerun completes, or nothing (a rerun starts over)."""
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
    for name in (METRICS, "eval_results.json"):
        (output / name).unlink(missing_ok=True)


def _other_record(output: Path, stage: str) -> bool:
    return any((output / name).is_file() for other, name in RECORDS.items() if other != stage)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _changed(saved: dict, now: dict) -> str:
    names = sorted(set(saved) | set(now))
    return ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in names if saved.get(k) != now.get(k))


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

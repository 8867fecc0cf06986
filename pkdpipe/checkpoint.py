"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds the model weights, the optimizer's tensors and settings, the scheduler's
position, the trainer's counters and the torch RNG state. It is written aside and swapped in whole
(`pkdpipe.files.replace_dir`), so a kill at any moment leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from pkdpipe import files
from pkdpipe.errors import PkdError


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"state": {}, "param_groups": state["param_groups"]}
    for pid, slots in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(folder: Path, model, optimizer, scheduler, trainer_state: dict, scaler=None) -> None:
    with files.replace_dir(folder) as tmp:
        _write(tmp, model, optimizer, scheduler, trainer_state, scaler)


def _write(tmp: Path, model, optimizer, scheduler, trainer_state: dict, scaler) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "trainer": trainer_state,
        "optimizer": meta,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))


FINISHED = "finished.json"  # written once training is over and the result is whole in best/


def exists(folder: Path) -> bool:
    """Whether there is a checkpoint to resume from (or a finished run to complete); a kill between
    the two renames in `save` leaves only the previous checkpoint, which is then put back."""
    return files.restore_dir(folder) and ((folder / "state.json").is_file() or (folder / FINISHED).is_file())


def mark_finished(folder: Path, trainer_state: dict) -> None:
    """Record that training is over: a rerun after a kill during the last moves completes them
    instead of training again (or finishing with whatever weights a checkpoint held)."""
    folder.mkdir(parents=True, exist_ok=True)
    files.write_text(folder / FINISHED, json.dumps(trainer_state, indent=1), PkdError)


def finished_state(folder: Path) -> dict | None:
    """The trainer state `mark_finished` recorded, or None while training is not over."""
    path = folder / FINISHED
    return json.loads(path.read_text()) if path.is_file() else None


def saved_step(folder: Path) -> int | None:
    """The step a checkpoint was saved at (None without a readable one): what a rerun resumes from."""
    try:
        return int(json.loads((folder / "state.json").read_text())["trainer"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_settings(folder: Path) -> dict | None:
    """The run settings a checkpoint (or a finished run's marker) was saved with; None without one."""
    for path, trainer in ((folder / FINISHED, False), (folder / "state.json", True)):
        try:
            state = json.loads(path.read_text())
            return (state["trainer"] if trainer else state)["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def remove(folder: Path) -> None:
    """Delete a checkpoint and any half-written or superseded copy of it."""
    files.remove_dir(folder)


def load(folder: Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore everything saved by `save`; return the trainer state."""
    try:
        state = json.loads((folder / "state.json").read_text())
        load_model(model, str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))
        tensors.pop("_empty", None)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    # a damaged file (SafetensorError is no OSError), or a checkpoint of another model (RuntimeError)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PkdError(f"cannot resume from {folder}: {reason}; delete it to start over") from None
    scheduler_state = dict(state["scheduler"])
    if hasattr(scheduler, "lr_lambdas"):
        # LambdaLR.load_state_dict needs the key `save` leaves out (None: a plain function, nothing to load)
        scheduler_state.setdefault("lr_lambdas", [None] * len(scheduler.lr_lambdas))
    scheduler.load_state_dict(scheduler_state)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state["trainer"]

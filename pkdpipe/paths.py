"""Paths and names as the user gives them: where caches live by default, and which model or data
names can only be local folders. A leaf module (no pkdpipe imports beyond errors), so that settings
and model loading can both ask without importing each other."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pkdpipe.errors import ConfigError

M = TypeVar("M")
D = TypeVar("D")


def default_cache_root() -> Path:
    """`PKDPIPE_CACHE_DIR`, else `~/.cache/pkdpipe`."""
    env = os.environ.get("PKDPIPE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pkdpipe"


def looks_local(name: str) -> bool:
    """A model name that can only be a folder on this machine: it exists, is absolute or relative
    (/, ., ~), or has more parts than a hub id (org/name). Such a name is never looked up on the hub."""
    text = str(name)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1


def check_local(flag: str, name: str | Path | None, what: str = "data dir") -> None:
    """Refuse a local path that is not there, before anything is loaded or downloaded."""
    if name is not None and looks_local(str(name)) and not Path(str(name)).expanduser().exists():
        raise ConfigError(f"{flag}: {what} not found: {name}")


def check_task_path(task: str) -> None:
    """A task given as a file (.toml / .json) must be there."""
    if str(task).endswith((".toml", ".json")) and not Path(task).expanduser().is_file():
        raise ConfigError(f"--task: task file not found: {task}")


HUB_DOWN_WORDS = ("connect", "offline", "resolve", "timed out", "timeout", "network", "max retries")


def hub_unreachable(err: Exception) -> bool:
    """Whether a failed hub call says the hub could not be reached (no network, HF_HUB_OFFLINE=1),
    rather than that it has no such name: the two want different advice."""
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in HUB_DOWN_WORDS)


def local_first(model: str, load_model: Callable[[], M], load_data: Callable[[], D]) -> tuple[M, D]:
    """(load_model(), load_data()), run in the order that asks the hub last: a model in a local
    folder is read first (its own checks, say a label count, come at once), a model by hub name after
    the data, so a wrong data folder is one line at once, not after a minute of hub retries."""
    if Path(str(model)).expanduser().is_dir():
        loaded = load_model()
        return loaded, load_data()
    data = load_data()
    return load_model(), data

"""manifest.json: the table of contents of a cache, written last (its presence means complete).

Reading a manifest checks everything a malicious or damaged one could get wrong before any shard
is opened: the format and its version, and that every file it names is a plain name inside the
cache folder (no absolute paths, no `..`, no sub-folders).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pkdpipe import files
from pkdpipe.cache.fingerprint import FORMAT_VERSION
from pkdpipe.errors import CacheError

MANIFEST = "manifest.json"
FORMAT_NAME = "pkdpipe-teacher-cache"
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.h5$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def safe_file(folder: Path, name: str) -> Path:
    """`folder/name`, refusing anything but a plain shard file name."""
    if not isinstance(name, str) or not _SAFE_FILE.match(name) or ".." in name:
        raise CacheError(f"manifest in {folder} names an unsafe file {name!r}: refusing to read it")
    return folder / name


def validate(manifest: dict, where: Path) -> dict:
    """Check a manifest's format, version and file names; return it unchanged."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{where} is not a pkdpipe cache manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{where} has cache format version {version!r}; this pkdpipe reads version {FORMAT_VERSION}"
        )
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise CacheError(f"{where} lists no splits")
    for split, info in splits.items():
        for shard in info.get("shards", []):
            safe_file(where.parent, shard.get("file"))
            if not isinstance(shard.get("rows"), int) or not isinstance(shard.get("sha256"), str):
                raise CacheError(f"{where}: shard entry of split {split!r} lacks rows or sha256")
    return manifest


def read(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if folder.is_dir():
            raise CacheError(f"{folder} has no {MANIFEST}: the cache is incomplete (run cache-teacher again)")
        raise CacheError(f"no cache at {folder}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"cannot read {path}: {err}") from None
    return validate(manifest, path)


def write(folder: Path, manifest: dict) -> None:
    """Write the manifest whole or not at all (a full disk or a read-only folder: one line)."""
    files.write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n", CacheError)

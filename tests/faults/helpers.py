"""Running real pkdpipe processes for the fault tests: killed at a named point, or under a file-size limit."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file


def pkdpipe(
    *args,
    kill_at: str | None = None,
    file_limit: int | None = None,
    cwd: Path | None = None,
    quiet: bool = True,
):
    """`python -m pkdpipe ARGS` in a fresh process; PKDPIPE_KILL_AT=kill_at makes it SIGKILL itself
    at that point; file_limit caps the size of any file it writes (RLIMIT_FSIZE, SIGXFSZ ignored so a
    write past it fails with EFBIG, as a full disk fails with ENOSPC); quiet=False keeps its
    progress and information lines (on stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if quiet:
        env["PKDPIPE_QUIET"] = "1"
    else:
        env.pop("PKDPIPE_QUIET", None)
    env.pop("PKDPIPE_KILL_AT", None)
    if kill_at:
        env["PKDPIPE_KILL_AT"] = kill_at

    def limit():
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, "-m", "pkdpipe", *map(str, args)],
        env=env, cwd=cwd, capture_output=True, text=True, preexec_fn=limit, timeout=300,
    )  # fmt: skip


def assert_killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, f"not killed at the point: rc {proc.returncode}\n{proc.stderr}"


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def one_error_line(proc) -> str:
    """A refusal: exit 1, one `error:` line on stderr, no traceback."""
    assert proc.returncode == 1, f"rc {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Writing model shards" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def same_weights(a: Path, b: Path) -> None:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert float((one[key] - two[key]).abs().max()) <= 1e-6, key


def leftovers(folder: Path) -> list[str]:
    """Names a finished run must not leave: checkpoints, best models, scratch."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.startswith(("checkpoint", "best")) or p.name.endswith(".tmp")
    )


def arrays_by_id(cache_path: Path, split: str = "train") -> dict[int, tuple]:
    from pkdpipe.cache.reader import open_cache

    with open_cache(cache_path) as cache:
        data = cache.read(split, cache.layers)
    return {
        int(i): (data["logits"][k], data["hidden"][k], np.asarray(data["input_ids"][k]))
        for k, i in enumerate(data["example_id"])
    }


def rewrite_shard(folder: Path, shard: str, edit) -> None:
    """Change shard `shard` of the cache `folder` through HDF5 (`edit(h5py.File)`), then give the
    manifest its new sha256 and size: what a careless or hostile teammate can do, so that only the
    checks of the values themselves can catch it."""
    import json

    import h5py

    from pkdpipe.cache.fingerprint import sha256_file

    path = folder / shard
    with h5py.File(path, "r+") as f:
        edit(f)
    rewrite_manifest(folder, lambda m: _set_shard_sums(m, shard, sha256_file(path), path.stat().st_size))
    json.loads((folder / "manifest.json").read_text())  # still JSON


def rewrite_manifest(folder: Path, change) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _set_shard_sums(manifest: dict, shard: str, sha256: str, size: int) -> None:
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            if entry["file"] == shard:
                entry["sha256"], entry["bytes"] = sha256, size

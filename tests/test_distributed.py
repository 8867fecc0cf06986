"""pkdpipe.distributed, and both stages under torchrun: two real processes on CPU, gloo backend.

A two-rank run is checked against a one-process run of the same inputs (same global batch, same
seed): the same cache, byte for byte in its arrays; the same loss curve and final weights in distill
and finetune. Each launch costs a few seconds of torchrun start-up, so each test combines the checks
of one launch. The tiny models here have no dropout: dropout masks are drawn per rank, so with
dropout on, a two-rank run and a one-process run are different (equally valid) random runs.

Run as a script (only by `test_cache_teacher_two_ranks`), this file is the pkdpipe CLI with a pause
after each finished shard, so that a kill surely lands in the middle of the teacher pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SHARD_PAUSE_ENV = "PKDPIPE_TEST_SHARD_PAUSE"  # read by this file's __main__ block only
SHARD_SIZE = 16  # tiny task: 6 train shards and 2 dev shards, 4 per rank


# -- helpers -------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    # one thread per rank: two ranks on a 2-core machine; more threads only wait on each other
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PKDPIPE_QUIET="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _torchrun_cmd(*args: str, script: str | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 -m pkdpipe ARGS` (or the script instead of -m pkdpipe).

    `python -m torch.distributed.run` is torchrun with this interpreter; --standalone picks a free
    port, so parallel test runs do not clash."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*launcher, *([script] if script else ["-m", "pkdpipe"]), *args]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _torchrun_cmd(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc; psutil is not a dependency)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _local_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in env if b"=" in item)
    return int(values[b"LOCAL_RANK"]) if b"LOCAL_RANK" in values else None


def _log_lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


def _assert_same_curve(one: list[dict], two: list[dict]) -> None:
    """The same log lines (steps, epochs, keys) with the loss terms within rtol 1e-4, atol 1e-5.

    Splitting a batch over two ranks changes only float summation order (each rank pads its half
    to its own longest row; padded keys get zero attention), so the curves agree to ~1e-7 here."""
    assert [(r["step"], r["epoch"], sorted(r)) for r in one] == [
        (r["step"], r["epoch"], sorted(r)) for r in two
    ]
    for a, b in zip(one, two):
        for key in ("loss", "ce", "kd", "pt", "lr"):
            if key in a:
                np.testing.assert_allclose(
                    b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=f"{key} at step {a['step']}"
                )
        for key in (k for k in a if k.startswith("dev_")):
            # a dev example whose logits nearly tie may flip: at most one of the 30
            assert b[key] == pytest.approx(a[key], abs=1 / 30 + 1e-9), (key, a["step"])


def _max_weight_diff(one: Path, two: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _shard_list(manifest: dict) -> dict[str, list[tuple[str, int]]]:
    return {
        split: [(s["file"], s["rows"]) for s in info["shards"]] for split, info in manifest["splits"].items()
    }


def _rows_by_id(folder: Path) -> dict[str, dict[int, dict]]:
    """split -> example id -> every array the cache holds for it."""
    from pkdpipe.cache.reader import TeacherCache

    out = {}
    with TeacherCache(folder) as cache:
        for split in cache.splits:
            data = cache.read(split, cache.layers)
            out[split] = {
                int(i): {
                    "logits": data["logits"][n],
                    "hidden": data["hidden"][n],
                    "labels": data["labels"][n],
                    "input_ids": data["input_ids"][n],
                    "token_type_ids": None if data["token_type_ids"] is None else data["token_type_ids"][n],
                }
                for n, i in enumerate(data["example_id"])
            }
    return out


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny task, a tiny pre-trained BERT and a teacher on it, all without dropout."""
    from conftest import write_tiny_bert, write_tiny_task, write_tiny_teacher

    root = tmp_path_factory.mktemp("dist")
    task_file = write_tiny_task(root / "data")
    pretrained = write_tiny_bert(root / "pretrained")
    config = json.loads((pretrained / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (pretrained / "config.json").write_text(json.dumps(config, indent=2))
    teacher = write_tiny_teacher(root / "teacher", pretrained)  # inherits the config: no dropout either
    return {"root": root, "task": str(task_file), "pretrained": pretrained, "teacher": teacher}


@pytest.fixture(scope="module")
def one_process_cache(world, tmp_path_factory) -> Path:
    """The tiny teacher's cache made by one plain process (the reference for the two-rank runs)."""
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher

    config = CacheConfig(
        task=world["task"],
        teacher=str(world["teacher"]),
        cache_dir=tmp_path_factory.mktemp("one-cache"),
        shard_size=SHARD_SIZE,
        batch_size=16,
        device="cpu",
        quiet=True,
    )
    return cache_teacher(config).path


def _cache_args(world: dict, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher", "--task", world["task"], "--teacher", str(world["teacher"]),
        "--cache-dir", str(cache_dir), "--shard-size", str(SHARD_SIZE), "--batch-size", "16",
        "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


# -- the backend choice and the one-process answers ------------------------------------------------
@pytest.mark.parametrize(
    ("device", "cuda", "nccl", "expected"),
    [
        ("auto", True, True, "nccl"),
        ("cuda", True, True, "nccl"),
        ("auto", False, True, "gloo"),
        ("auto", True, False, "gloo"),
        ("cpu", True, True, "gloo"),  # CPU ranks on a GPU machine: nccl cannot reduce CPU tensors
    ],
)
def test_choose_backend(monkeypatch, device, cuda, nccl, expected):
    from pkdpipe import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    assert distributed.choose_backend(device) == expected


@pytest.mark.parametrize(("cuda", "backend"), [(False, "gloo"), (True, "nccl")])
def test_init_under_torchrun_starts_the_chosen_backend(monkeypatch, cuda, backend):
    from pkdpipe import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend)
    )
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: calls.setdefault("at_exit", fn))
    distributed.init()
    # the group is destroyed at exit, before interpreter shutdown (where gloo can abort the process)
    assert calls.pop("at_exit") is distributed.shutdown
    assert calls == ({"backend": "nccl", "device": 1} if cuda else {"backend": "gloo"})


def test_one_process_answers_as_the_only_rank(monkeypatch):
    from pkdpipe import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init()  # no torchrun: starts nothing
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_ok(True) and not distributed.all_ok(False)
    assert distributed.mean_over_ranks({"loss": 0.5, "ce": 0.25}) == {"loss": 0.5, "ce": 0.25}
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()


# -- cache-teacher on two ranks ------------------------------------------------------------------
def test_cache_teacher_two_ranks(world, one_process_cache, tmp_path):
    """`cache gc` leaves a build in progress alone; a rank killed mid-run leaves finished shards
    and no manifest; the same torchrun command then resumes from those shards, and the finished
    cache equals the one-process cache: the same key, the same shard list, the same arrays for
    every example id."""
    cache_dir = tmp_path / "cache"
    args = _cache_args(world, cache_dir)
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(
            _torchrun_cmd(*args, script=__file__),
            cwd=tmp_path,
            env=_env(**{SHARD_PAUSE_ENV: "1.0"}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 120
            while not list(cache_dir.glob("*/*/*.h5")):
                assert run.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.time() < deadline, "no shard was finished in 120 s"
                time.sleep(0.05)
            # the ranks' build holds the key's lock: `cache gc` meanwhile leaves it alone
            from pkdpipe.cache.local import gc

            building = sorted(p.name for p in cache_dir.glob("*/*/*.h5"))
            assert gc(cache_dir) == [] and set(building) <= {p.name for p in cache_dir.glob("*/*/*.h5")}
            workers = {pid: _local_rank(pid) for pid in _children(run.pid)}
            rank1 = [pid for pid, local_rank in workers.items() if local_rank == 1]
            assert len(rank1) == 1, f"cannot find rank 1's process among torchrun's children {workers}"
            os.kill(rank1[0], signal.SIGKILL)  # rank 1 dies; torchrun then stops rank 0
            assert run.wait(timeout=120) != 0, (tmp_path / "killed.log").read_text()
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    folder = next(cache_dir.glob("*/*/"))
    assert folder.name == one_process_cache.name  # the key does not depend on the number of ranks
    assert not (folder / "manifest.json").exists(), (tmp_path / "killed.log").read_text()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.h5")}
    assert 1 <= len(finished) < 8, (sorted(finished), (tmp_path / "killed.log").read_text())

    proc = _torchrun(*args, cwd=tmp_path)  # the same command again: resumes
    assert proc.stdout.count(f"teacher cache {folder.name}") == 1, proc.stdout  # rank 0 alone prints it
    assert "cache hit" not in proc.stdout, proc.stdout
    kept = {
        name: (p.stat().st_ino, p.stat().st_mtime_ns) for name in finished if (p := folder / name).is_file()
    }
    assert kept == finished, f"finished shards were rewritten instead of resumed from: {finished} -> {kept}"
    assert not list(folder.glob("*.tmp")), sorted(p.name for p in folder.iterdir())

    one = json.loads((one_process_cache / "manifest.json").read_text())
    two = json.loads((folder / "manifest.json").read_text())
    assert two["key"] == one["key"]
    assert _shard_list(two) == _shard_list(one), (_shard_list(two), _shard_list(one))
    listed = sorted(name for shards in _shard_list(two).values() for name, _ in shards)
    assert sorted(p.name for p in folder.glob("*.h5")) == listed
    assert two["teacher_metrics"] == one["teacher_metrics"], (two["teacher_metrics"], one["teacher_metrics"])

    ref, got = _rows_by_id(one_process_cache), _rows_by_id(folder)
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in ref.items()}
    for split, rows in ref.items():
        for example_id, arrays in rows.items():
            for name, value in arrays.items():
                other = got[split][example_id][name]
                if value is None:
                    assert other is None
                else:  # on CPU the two runs compute the very same floats: no tolerance
                    assert np.array_equal(other, value), (split, example_id, name)


# -- distill and finetune under DDP --------------------------------------------------------------
# a 2-layer PKD-Skip student over 3 epochs of global batch 8 (12 steps an epoch), evaluated every 5 steps
DISTILL = dict(strategy="skip", layers=2, epochs=3, batch_size=8, lr=1e-3, eval_every=5, seed=7)


def test_distill_two_ranks_matches_one_process(world, one_process_cache, distill_config, tmp_path):
    """Global batch 8 as 2 x 4 under DDP against 8 in one process, same seed: the same loss curve
    (the logged terms are averaged over the ranks) and the same final weights (max |diff| < 1e-5;
    about 3e-7 is typical). eval_every 5 is not a multiple of the log interval: a log line after an
    evaluation must not leave the other rank out of the loss all-reduce (it would hang)."""
    from pkdpipe.train import distill

    one = distill(distill_config(one_process_cache, tmp_path / "one", device="cpu", **DISTILL))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in DISTILL.items()]
    output = ["--device", "cpu", "--quiet", "--output", str(tmp_path / "two")]
    proc = _torchrun("distill", "--cache", str(one_process_cache), *flags, *output, cwd=tmp_path)
    assert proc.stdout.count("distill skip-2") == 1, proc.stdout  # rank 0 alone prints the summary
    assert "error" not in proc.stderr.lower(), proc.stderr

    curve_one, curve_two = _log_lines(tmp_path / "one"), _log_lines(tmp_path / "two")
    assert len(curve_one) >= 8 and one.steps == 36
    _assert_same_curve(curve_one, curve_two)
    assert _max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    # the same files, and no checkpoint/ or best/ left behind
    files = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("one", "two")}
    assert files["two"] == files["one"]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["steps"] == 36


def test_finetune_two_ranks_bf16(world, tmp_path):
    """finetune under DDP with --precision bf16 on CPU: rank 0 alone writes the model, the log (one
    line per logged step) and the summary; the curve follows a one-process bf16 run within rtol 1e-3
    (bf16 rounds the two halves of a batch a little differently from the whole: ~1e-5 here)."""
    from pkdpipe.config import FinetuneConfig
    from pkdpipe.train import finetune

    settings = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "eval_every": 5, "seed": 3, "precision": "bf16"}
    finetune(
        FinetuneConfig(
            task=world["task"],
            model=str(world["pretrained"]),
            layers=2,
            output=tmp_path / "one",
            device="cpu",
            quiet=True,
            **settings,
        )
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    output = ["--device", "cpu", "--quiet", "--output", str(tmp_path / "two")]
    model = ["--model", str(world["pretrained"]), "--layers", "2"]
    proc = _torchrun("finetune", "--task", world["task"], *model, *flags, *output, cwd=tmp_path)
    titles = [line for line in proc.stdout.splitlines() if line.strip().startswith("finetune ")]
    assert len(titles) == 1, proc.stdout  # rank 0 alone prints the summary (its title line)
    assert "error" not in proc.stderr.lower(), proc.stderr
    two = _log_lines(tmp_path / "two")
    steps = [(r["step"], "loss" in r) for r in two]
    assert len(steps) == len(set(steps))  # no line written twice
    one = _log_lines(tmp_path / "one")
    assert [(r["step"], sorted(r)) for r in one] == [(r["step"], sorted(r)) for r in two]
    for a, b in zip(one, two):
        if "loss" in a:
            assert np.isfinite(b["loss"])
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-3)
    record = json.loads((tmp_path / "two" / "pkdpipe_finetune.json").read_text())
    assert record["config"]["precision"] == "bf16"
    assert (tmp_path / "two" / "model.safetensors").is_file()
    assert not (tmp_path / "two" / "checkpoint").exists()


def test_fit_stops_when_ranks_disagree_about_the_checkpoint(
    one_process_cache, distill_config, tmp_path, monkeypatch
):
    """On several nodes whose --output is not shared, rank 0 can see a checkpoint that other ranks
    do not: fit stops with one clear error on every rank instead of training them from different
    steps and weights (simulated in one process: rank 0's answer is patched to "resuming")."""
    from pkdpipe import distributed
    from pkdpipe.errors import ConfigError
    from pkdpipe.train import distill

    # rank 0's "resuming?" is True; its other broadcasts (the run folder's state) go through as they are
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: True if isinstance(obj, bool) else obj)
    with pytest.raises(ConfigError, match="every node shares"):
        distill(distill_config(one_process_cache, tmp_path / "out", device="cpu"))


# -- precision -----------------------------------------------------------------------------------
def test_bf16_on_cpu_cache_and_distill(world, one_process_cache, distill_config, tmp_path):
    """bf16 autocast on CPU: a cache under its own key (precision changes the contents), whose
    stored vectors stay within bf16 rounding of fp32's; a bf16 distill from it with finite losses."""
    from pkdpipe.config import CacheConfig
    from pkdpipe.teacher import cache_teacher
    from pkdpipe.train import distill

    result = cache_teacher(
        CacheConfig(
            task=world["task"],
            teacher=str(world["teacher"]),
            cache_dir=tmp_path / "c",
            shard_size=SHARD_SIZE,
            batch_size=16,
            device="cpu",
            precision="bf16",
            quiet=True,
        )
    )
    assert result.key != one_process_cache.name and result.manifest["precision"] == "bf16"
    ref, got = _rows_by_id(one_process_cache), _rows_by_id(result.path)
    diff = 0.0
    for split, rows in ref.items():
        for example_id, arrays in rows.items():
            other = got[split][example_id]
            assert np.array_equal(other["input_ids"], arrays["input_ids"])
            # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation)
            np.testing.assert_allclose(other["logits"], arrays["logits"], atol=1e-2)
            np.testing.assert_allclose(
                other["hidden"].astype(np.float32), arrays["hidden"].astype(np.float32), rtol=2e-2, atol=5e-2
            )
            diff = max(diff, float(np.abs(other["hidden"].astype(np.float32) - arrays["hidden"]).max()))
    assert diff > 0  # bf16 really was used

    out = tmp_path / "student"
    distill(distill_config(result.path, out, device="cpu", precision="bf16", epochs=2))
    losses = [r["loss"] for r in _log_lines(out) if "loss" in r]
    assert losses and np.isfinite(losses).all()
    assert json.loads((out / "pkdpipe_config.json").read_text())["config"]["precision"] == "bf16"


def test_fp16_on_cpu_is_one_clear_error(world, one_process_cache, tmp_path):
    from pkdpipe_cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    commands = {
        "distill": [
            "distill",
            "--cache",
            str(one_process_cache),
            "--layers",
            "2",
            "--output",
            str(tmp_path / "d"),
        ],
        "finetune": [
            "finetune",
            "--task",
            world["task"],
            "--model",
            str(world["pretrained"]),
            "--output",
            str(tmp_path / "f"),
        ],
        "cache-teacher": _cache_args(world, tmp_path / "c"),
    }
    for name, args in commands.items():
        result = runner.invoke(app, [*args, "--device", "cpu", "--precision", "fp16"])
        assert result.exit_code == 1, (name, result.output)
        assert result.output.strip().splitlines() == [
            "error: --precision fp16 needs a GPU; use bf16 on CPU"
        ], name
    # the training stages check before writing anything
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


if __name__ == "__main__":
    # Run by torchrun in test_cache_teacher_two_ranks: the pkdpipe CLI with a pause after each finished
    # shard (this process's copy of pkdpipe.teacher is wrapped; the library itself has no test hook).
    from pkdpipe_cli.main import run

    import pkdpipe.teacher as teacher

    pause = float(os.environ.get(SHARD_PAUSE_ENV, "0"))
    write_shard = teacher._write_shard

    def write_and_pause(*args, **kwargs):
        write_shard(*args, **kwargs)
        time.sleep(pause)

    teacher._write_shard = write_and_pause
    run()

"""`pkdpipe cache-teacher`, `pkdpipe cache info` and `pkdpipe cache verify` through the CLI: what a user
sees, the exit codes, and that every bad input gives one clear line and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from conftest import write_tiny_teacher
from pkdpipe_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cache_teacher(tiny, root: Path, *extra, task=None, teacher=None):
    """`pkdpipe cache-teacher` on the tiny task and teacher (or the ones given)."""
    args = ["cache-teacher", "--task", task or tiny["task"], "--teacher", teacher or tiny["teacher"]]
    return invoke(*args, "--cache-dir", root, "--shard-size", 40, "--batch-size", 16, "--quiet", *extra)


def assert_user_error(result, *needles: str) -> str:
    """Non-zero exit, one line of output holding every needle, no exception escaping (a traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(root: Path) -> None:
    """No manifest, no shard and no temporary file anywhere under the cache root."""
    if root.exists():
        left = [p for p in root.rglob("*") if p.name == "manifest.json" or p.suffix in (".h5", ".tmp")]
        assert not left, left


def copy_data(tiny, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    return data


def replace_row(path: Path, row: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[row + 1] = line  # + 1: the header
    path.write_text("\n".join(lines) + "\n")


# --- a good run ---------------------------------------------------------------------------------------


@pytest.fixture
def forward_calls(monkeypatch):
    from transformers.models.bert import modeling_bert

    calls = {"n": 0}
    original = modeling_bert.BertForSequenceClassification.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertForSequenceClassification, "forward", counted)
    return calls


def test_cache_teacher_then_hit_then_force(tiny, tmp_path, forward_calls, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pkdpipe", "cache-teacher", "--task", "tiny.toml"])
    first = cache_teacher(tiny, tmp_path)
    assert first.exit_code == 0, first.output
    [folder] = list(tmp_path.glob("tiny/*/manifest.json"))
    folder = folder.parent
    assert f"cache: {folder}" in first.output  # the whole path on one line, to copy
    assert f"teacher cache {folder.name}" in first.output
    assert "126" in first.output and "cache hit" not in first.output
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["command"] == "pkdpipe cache-teacher --task tiny.toml"
    assert forward_calls["n"] > 0

    forward_calls["n"] = 0
    started = time.time()
    second = cache_teacher(tiny, tmp_path)
    assert second.exit_code == 0, second.output
    assert "cache hit" in second.output and f"cache: {folder}" in second.output
    assert forward_calls["n"] == 0 and time.time() - started < 5

    forced = cache_teacher(tiny, tmp_path, "--force")
    assert forced.exit_code == 0, forced.output
    assert "cache hit" not in forced.output and forward_calls["n"] > 0


def test_a_large_float16_cache_mentions_the_int8_codec_and_a_small_or_int8_one_does_not(
    tiny, tmp_path, monkeypatch
):
    from pkdpipe_cli import cache_cmd

    small = cache_teacher(tiny, tmp_path / "a")
    assert small.exit_code == 0, small.output
    assert "--codec int8" not in small.output  # a few KB: nothing to save
    monkeypatch.setattr(cache_cmd, "INT8_HINT_BYTES", 1)  # as if the cache were an MNLI-sized one
    large = cache_teacher(tiny, tmp_path / "b")
    assert "in float16: --codec int8 stores such a cache in about half the bytes" in " ".join(
        large.output.split()
    )
    int8 = cache_teacher(tiny, tmp_path / "c", "--codec", "int8")
    assert int8.exit_code == 0, int8.output
    assert "--codec int8" not in int8.output


def test_cache_info_shows_key_task_teacher_layers(tiny, tiny_cache):
    for args in ([tiny_cache], [tiny_cache.name[:8], "--cache-dir", tiny_cache.parents[1]]):  # a path, a key
        result = invoke("cache", "info", *args)
        assert result.exit_code == 0, result.output
        assert f"cache {tiny_cache.name}" in result.output
        assert "│ task             │ tiny" in result.output
        assert "BertForSequenceClassification" in result.output and "4 layers" in result.output
        assert "[0, 1, 2, 3, 4] as float16" in result.output
        assert "96 examples, 3 shard(s)" in result.output and "accuracy" in result.output


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    assert "cache-teacher" in names and "cache" in names
    for name in names:
        assert name in result.output
    group = invoke("cache", "--help")
    assert group.exit_code == 0 and "info" in group.output and "verify" in group.output


# --- stats --------------------------------------------------------------------------------------------


def test_cache_stats_names_the_constant_layer_its_dimension_and_the_maps(planted_cache, tmp_path):
    from conftest import PLANTED_DIM

    result = invoke("cache", "stats", planted_cache, "--layers", "2,3", "--plot", tmp_path / "signal.png")
    assert result.exit_code == 0, result.output
    layers_table, maps_table = result.output.split("teacher layers each map would name")
    rows = {line.split("│")[1].strip(): line for line in layers_table.splitlines() if line.startswith("│")}
    dims = rows["2"].split("│")[3]
    assert dims.strip().startswith(f"{PLANTED_DIM} (100%)")  # one dimension holds the vector
    assert "skip-2" in rows["2"] and "last-3" in rows["2"]  # the paper's maps point at layer 2
    assert "auto" not in rows["2"] and "auto-3" in rows["1"]  # the signal-aware map does not
    (k3,) = [line for line in maps_table.splitlines() if line.startswith("│         3 │")]
    maps = [[part.split(" (")[0] for part in cell.strip().split("), ")] for cell in k3.split("│")[2:5]]
    assert maps == [["1", "3"], ["2", "3"], ["1", "3"]]  # skip, last, auto
    assert "vary by under 1%" in result.output and "--pt-space relational" in result.output
    assert (tmp_path / "signal.png").read_bytes()[:4] == b"\x89PNG"


def test_cache_stats_as_json_gives_the_figures(planted_cache):
    from conftest import PLANTED_DIM, PLANTED_LAYER

    result = invoke("cache", "stats", planted_cache, "--json", "--layers", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rows"] == 96 and [r["layer"] for r in report["layers"]] == [0, 1, 2, 3, 4]
    planted = report["layers"][PLANTED_LAYER]
    assert planted["dominant_dims"][0]["dim"] == PLANTED_DIM and planted["dominant_dims"][0]["share"] > 0.999
    assert planted["varying_share"] < report["layers"][1]["varying_share"] / 100
    assert report["maps"]["3"]["skip"]["layers"] == [1, 3] and report["maps"]["3"]["last"]["layers"] == [2, 3]
    assert report["maps"]["3"]["auto"]["layers"] == [1, 3]


def test_cache_stats_refuses_a_student_as_deep_as_the_teacher(planted_cache):
    assert_user_error(invoke("cache", "stats", planted_cache, "--layers", "4"), "must be shallower")


# --- verify -------------------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    target = tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name
    shutil.copytree(tiny_cache, target)
    return target


def test_verify_ok(cache_copy):
    result = invoke("cache", "verify", cache_copy)
    assert result.exit_code == 0, result.output
    assert "OK: 4 shard(s), 126 rows verified" in result.output


def test_the_light_cache_commands_never_load_torch(cache_copy):
    """cache ls, info, verify and stats read HDF5 and JSON only: loading torch and transformers would turn
    a 0.1 s check into seconds of start-up (about 3 s here)."""
    root = cache_copy.parent.parent
    script = (
        "import sys\n"
        "from pkdpipe_cli.main import app\n"
        "for args in (['cache', 'ls', '--cache-dir', sys.argv[1]], ['cache', 'info', sys.argv[2]],\n"
        "             ['cache', 'verify', sys.argv[2]], ['cache', 'stats', sys.argv[2]]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, (args, stop.code)\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(root), str(cache_copy)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "rows verified" in done.stdout and "loaded: []" in done.stdout, done.stdout


def test_verify_flipped_byte_fails_naming_the_file(cache_copy):
    shard = cache_copy / "train-00002-of-00003.h5"
    with h5py.File(shard, "r") as f:
        offset = f["logits"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    result = invoke("cache", "verify", cache_copy)
    assert result.exit_code == 1
    assert "FAIL train-00002-of-00003.h5: checksum mismatch" in result.output
    assert "OK" not in result.output


def test_verify_truncated_shard_fails(cache_copy):
    shard = cache_copy / "train-00000-of-00003.h5"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = invoke("cache", "verify", cache_copy)
    assert result.exit_code == 1
    assert "train-00000-of-00003.h5: checksum mismatch" in result.output
    assert "train-00000-of-00003.h5: unreadable" in result.output


@pytest.mark.parametrize("name", ["../x.h5", "/etc/x.h5"])
@pytest.mark.parametrize("command", ["verify", "info"])
def test_unsafe_manifest_is_refused(cache_copy, name, command):
    (cache_copy.parent / "x.h5").write_bytes((cache_copy / "dev-00000-of-00001.h5").read_bytes())
    manifest = json.loads((cache_copy / "manifest.json").read_text())
    manifest["splits"]["dev"]["shards"][0]["file"] = name
    (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(invoke("cache", command, cache_copy), "unsafe file", repr(name))


def test_verify_without_a_cache(tmp_path):
    assert_user_error(invoke("cache", "verify", tmp_path / "nothing", "--cache-dir", tmp_path), "no cache")


# --- bad input: one clear line, non-zero exit, nothing half-written ------------------------------------


def test_unknown_task(tiny, tmp_path):
    assert_user_error(cache_teacher(tiny, tmp_path, task="nosuch"), "unknown task 'nosuch'", "sst2")
    assert_nothing_written(tmp_path)


def test_unknown_split(tiny, tmp_path):
    assert_user_error(cache_teacher(tiny, tmp_path, "--splits", "train,nope"), "no split", "nope")
    assert_nothing_written(tmp_path)


def test_missing_data_folder(tiny, tmp_path):
    result = cache_teacher(tiny, tmp_path / "root", "--data-dir", tmp_path / "nope")
    assert_user_error(result, "data dir not found", str(tmp_path / "nope"))
    assert_nothing_written(tmp_path / "root")


def test_missing_split_file(tiny, tmp_path):
    data = copy_data(tiny, tmp_path)
    (data / "dev.csv").unlink()
    result = cache_teacher(tiny, tmp_path / "root", task=data / "tiny.toml")
    assert_user_error(result, "dev file", "not found", str(data / "dev.csv"))
    assert_nothing_written(tmp_path / "root")


def test_missing_field(tiny, tmp_path):
    data = copy_data(tiny, tmp_path)
    task = data / "tiny.toml"
    task.write_text(task.read_text().replace('text_fields = ["text"]', 'text_fields = ["review"]'))
    result = cache_teacher(tiny, tmp_path / "root", task=task)
    assert_user_error(result, "no column 'review'", "train.csv", "'text'")
    assert_nothing_written(tmp_path / "root")


def test_label_outside_the_label_list(tiny, tmp_path):
    data = copy_data(tiny, tmp_path)
    replace_row(data / "dev.csv", 7, "a fine film,meh")
    result = cache_teacher(tiny, tmp_path / "root", task=data / "tiny.toml")
    assert_user_error(result, "dev.csv line 9", "label 'meh' is not a label of task 'tiny'")
    assert_nothing_written(tmp_path / "root")


def test_empty_text(tiny, tmp_path):
    data = copy_data(tiny, tmp_path)
    replace_row(data / "dev.csv", 4, '"   ",neg')
    result = cache_teacher(tiny, tmp_path / "root", task=data / "tiny.toml")
    assert_user_error(result, "dev.csv line 6", "empty text", "id 4")
    assert_nothing_written(tmp_path / "root")


def test_teacher_not_found(tiny, tmp_path):
    result = cache_teacher(tiny, tmp_path / "root", teacher=tmp_path / "no-teacher")
    assert_user_error(result, "not found", str(tmp_path / "no-teacher"))
    assert_nothing_written(tmp_path / "root")


def test_no_teacher_and_no_default(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/tiny/teacher is looked up here
    result = invoke("cache-teacher", "--task", tiny["task"], "--cache-dir", tmp_path / "root")
    assert_user_error(result, "runs/tiny/teacher", "--teacher")
    assert_nothing_written(tmp_path / "root")


def test_teacher_label_count_differs_from_the_task(tiny, tmp_path):
    result = cache_teacher(tiny, tmp_path, task="sst2")
    assert_user_error(result, "3 labels", "sst2 has 2")
    assert_nothing_written(tmp_path)


def test_hub_unreachable_points_at_data_dir(tiny, tmp_path):
    """HF_HUB_OFFLINE=1 (set by conftest) stands in for no network: it must fail fast, and say how
    to use a local copy instead."""
    teacher = write_tiny_teacher(tmp_path / "teacher2", tiny["pretrained"], num_labels=2)
    started = time.time()
    result = cache_teacher(tiny, tmp_path / "root", task="sst2", teacher=teacher)
    assert_user_error(result, "hub", "--data-dir")
    assert time.time() - started < 20
    assert_nothing_written(tmp_path / "root")


def test_bad_layers(tiny, tmp_path):
    assert_user_error(cache_teacher(tiny, tmp_path, "--layers", "0,9"), "--layers", "0..4")
    assert_user_error(cache_teacher(tiny, tmp_path, "--layers", "0,x"), "--layers", "comma-separated")
    assert_nothing_written(tmp_path)


def test_cache_root_that_cannot_be_written(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cache_teacher(tiny, blocker / "cache")
    assert_user_error(result, "cannot be written", str(blocker / "cache"))
    assert blocker.read_text() == "not a folder"


def test_out_of_space(tiny, tmp_path, monkeypatch):
    """A full disk while writing a shard (simulated: the write raises ENOSPC; tests/faults/ fills a
    real file-size limit) gives one line that says how much to free, and no shard, temporary or final,
    behind."""
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".h5.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    result = cache_teacher(tiny, tmp_path)
    line = assert_user_error(result, "no space left on device while writing", "train-00000-of-00003.h5")
    assert re.search(
        r"free \d+ MB \(or use --cache-dir elsewhere\) and rerun; finished shards are kept", line
    )
    assert_nothing_written(tmp_path)

"""`pkdpipe cache ls | push | pull | rm | gc` and `cache verify --recompute`, through the CLI."""

from __future__ import annotations

import shutil
import uuid

import pytest
from conftest import write_tiny_teacher
from pkdpipe_cli import common
from pkdpipe_cli.main import app
from typer.testing import CliRunner

from pkdpipe.cache import manifest as mf
from pkdpipe.cache.local import PARTIAL, list_caches


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.setattr(common.console, "_width", 200)  # tables unwrapped, whatever the terminal
    return CliRunner()


@pytest.fixture
def root(tiny_cache, tmp_path):
    """A cache root holding a private copy of the session cache."""
    shutil.copytree(tiny_cache, tmp_path / "root" / tiny_cache.parent.name / tiny_cache.name)
    return tmp_path / "root"


def test_cache_help_lists_the_store_commands(runner):
    result = runner.invoke(app, ["cache", "--help"])
    assert result.exit_code == 0
    for command in ("ls", "push", "pull", "rm", "gc", "verify"):
        assert command in result.output
    assert "--recompute" in runner.invoke(app, ["cache", "verify", "--help"]).output


def test_ls_lists_complete_and_incomplete_caches(runner, root, tiny_cache):
    (root / "tiny" / "0123456789abcdef").mkdir()
    result = runner.invoke(app, ["cache", "ls", "--cache-dir", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if tiny_cache.name in line)
    row, below = lines[at].split(), lines[at + 1].split()  # a cell's second line is on the next line
    assert row[:3] == ["tiny", tiny_cache.name, str(mf.read(tiny_cache)["teacher"]["name_or_path"])]
    assert row[3:7] == ["train", "96", "layers", "0-4"] and row[-1] == "yes"
    assert below[:3] == ["dev", "30", "float16"]
    assert next(line for line in lines if "0123456789abcdef" in line).split()[-1] == "no"


def test_ls_on_an_empty_root_says_so(runner, tmp_path):
    result = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path / "empty")])
    assert result.exit_code == 0 and "no caches under" in result.output


def test_push_then_pull_by_key_through_the_cli(runner, root, tiny_cache, tmp_path):
    url = f"memory://pkd-{uuid.uuid4().hex[:8]}"
    result = runner.invoke(app, ["cache", "push", tiny_cache.name, url, "--cache-dir", str(root), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"in store: {url}/tiny/{tiny_cache.name}" in result.output

    fresh = tmp_path / "fresh"
    result = runner.invoke(
        app,
        ["cache", "pull", tiny_cache.name[:8], "--cache-dir", str(fresh), "--quiet"],
        env={"PKDPIPE_STORE": url},
    )
    assert result.exit_code == 0, result.output
    assert f"cache: {fresh / 'tiny' / tiny_cache.name}" in result.output
    assert runner.invoke(app, ["cache", "verify", tiny_cache.name, "--cache-dir", str(fresh)]).exit_code == 0


def test_pull_some_layers_then_ls_and_a_distill_needing_another_layer(
    runner, root, tiny, tiny_cache, tmp_path
):
    """`cache pull KEY --layers`: the copy lists as partial, and a student whose map needs a layer
    it lacks stops with one line naming the pull to run."""
    url = str(tmp_path / "store")
    assert (
        runner.invoke(
            app, ["cache", "push", tiny_cache.name, url, "--cache-dir", str(root), "--quiet"]
        ).exit_code
        == 0
    )
    laptop = str(tmp_path / "laptop")
    result = runner.invoke(
        app, ["cache", "pull", tiny_cache.name[:8], "--store", url, "--cache-dir", laptop, "--layers", "2,4"]
    )
    assert result.exit_code == 0, result.output
    assert mf.read(tmp_path / "laptop" / "tiny" / tiny_cache.name).layers_present == [2, 4]
    assert "layers 2,4 (partial)" in runner.invoke(app, ["cache", "ls", "--cache-dir", laptop]).output
    info = runner.invoke(app, ["cache", "info", tiny_cache.name, "--cache-dir", laptop]).output
    assert "layers [2, 4] (pulled with --layers)" in info
    result = runner.invoke(
        app,
        ["distill", "--cache", tiny_cache.name, "--cache-dir", laptop, "--strategy", "skip", "--layers", "2",
         "--teacher-layers", "3", "--student-init", str(tiny["pretrained"]), "--device", "cpu", "--quiet",
         "--output", str(tmp_path / "student")],
    )  # fmt: skip
    assert f"pkdpipe cache pull {tiny_cache.name} --layers 3 --store URL" in error_line(result)
    result = runner.invoke(
        app, ["cache", "pull", tiny_cache.name, "--store", url, "--cache-dir", laptop, "--layers", "2,x"]
    )
    assert "comma-separated integers" in error_line(result)


def error_line(result) -> str:
    """The one-line message of a failed command: what the app printed as `error: ...`, or the
    PkdError it raised (CliRunner hands it back as is when the app's handler does not print it)."""
    assert result.exit_code == 1, result.output
    printed = [
        line for line in (result.output + (result.stderr or "")).splitlines() if line.startswith("error: ")
    ]
    message = printed[-1].removeprefix("error: ") if printed else str(result.exception)
    assert "\n" not in message
    return message


def test_pull_errors_are_one_line(runner, tmp_path):
    result = runner.invoke(
        app,
        [
            "cache",
            "pull",
            str(tmp_path / "nowhere" / "tiny" / "0123456789abcdef"),
            "--cache-dir",
            str(tmp_path / "root"),
        ],
    )
    assert error_line(result).startswith("no cache at")
    if not _installed("s3fs"):
        result = runner.invoke(
            app, ["cache", "pull", "s3://bucket/tiny/0123456789abcdef", "--cache-dir", str(tmp_path)]
        )
        assert "pip install s3fs" in error_line(result)
    result = runner.invoke(
        app, ["cache", "pull", "0123456789abcdef", "--cache-dir", str(tmp_path)], env={"PKDPIPE_STORE": ""}
    )
    assert "--store" in error_line(result)


def _installed(package: str) -> bool:
    try:
        __import__(package)
        return True
    except ImportError:
        return False


def test_rm_removes_a_cache(runner, root, tiny_cache):
    result = runner.invoke(app, ["cache", "rm", tiny_cache.name[:8], "--cache-dir", str(root)])
    assert result.exit_code == 0, result.output
    assert f"removed {root / 'tiny' / tiny_cache.name}" in result.output
    assert list_caches(root) == []
    result = runner.invoke(app, ["cache", "rm", tiny_cache.name, "--cache-dir", str(root)])
    assert error_line(result).startswith("no cache")


def test_gc_removes_a_partial_pull_and_an_incomplete_folder(runner, root, tiny_cache):
    partial = root / "tiny" / f".0123456789abcdef{PARTIAL}"
    partial.mkdir()
    (partial / "train-00000-of-00003.h5").write_bytes(b"x" * 10)
    incomplete = root / "tiny" / "fedcba9876543210"
    incomplete.mkdir()
    (incomplete / "dev-00000-of-00001.h5.tmp").write_bytes(b"y" * 20)
    result = runner.invoke(app, ["cache", "gc", "--cache-dir", str(root)])
    assert result.exit_code == 0, result.output
    assert str(partial) in result.output and str(incomplete) in result.output
    assert "freed 30 B in 2 item(s)" in result.output
    assert not partial.exists() and not incomplete.exists()
    assert list_caches(root) == [root / "tiny" / tiny_cache.name]


def test_verify_recompute_passes_with_the_right_teacher_and_fails_with_another(
    runner, root, tiny, tiny_cache, tmp_path
):
    args = [
        "cache",
        "verify",
        tiny_cache.name,
        "--cache-dir",
        str(root),
        "--recompute",
        "4",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*args, "--teacher", str(tiny["teacher"])])
    assert result.exit_code == 0, result.output
    assert "OK: 4 example(s) recomputed" in result.output and "tolerance 0.999" in result.output

    other = write_tiny_teacher(tmp_path / "other-teacher", tiny["pretrained"], seed=7)
    result = runner.invoke(app, [*args, "--teacher", str(other)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and f"not made by {other}" in result.output
    assert "weights of" in result.output  # the note: not the teacher the manifest records


def test_verify_recompute_needs_a_teacher(runner, root, tiny_cache):
    result = runner.invoke(
        app, ["cache", "verify", tiny_cache.name, "--cache-dir", str(root), "--recompute", "4"]
    )
    assert "--recompute needs --teacher" in error_line(result)

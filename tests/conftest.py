"""Test fixtures: one throwaway PostgreSQL per test session, one fresh database per test.

The server is the project's own embedded launcher (a real PostgreSQL, never a mock). Each test gets
its own database cloned from a template that has every migration applied, so tests cannot see each
other's jobs and cloning costs milliseconds.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate
from engine.queue import Queue

TEMPLATE = "skiplock_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    base = make_temp_dir("skiplock-test-")
    # Durability is not under test here (the benchmarks keep fsync on); fsync off keeps the suite fast.
    server = EmbeddedPostgres(base / "data", settings={"fsync": "off", "synchronous_commit": "off",
                                                      "full_page_writes": "off", "max_connections": "200"})
    server.start()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    with db.connect(server.dsn(TEMPLATE)) as conn:
        migrate(conn)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def create_database(server: EmbeddedPostgres, template: str = TEMPLATE) -> str:
    name = f"t{next(_counter)}"
    # FILE_COPY copies the template's files instead of writing them all to the WAL (PostgreSQL 15+).
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY = FILE_COPY")
    return server.dsn(name)


def drop_database(server: EmbeddedPostgres, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test (dropped afterwards)."""
    database = create_database(pg_server)
    yield database
    drop_database(pg_server, database)


@pytest.fixture
def empty_dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of a fresh database with no skiplock schema (dropped afterwards)."""
    database = create_database(pg_server, template="template0")
    yield database
    drop_database(pg_server, database)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with db.connect(dsn) as connection:
        yield connection


@pytest.fixture
def queue(dsn: str) -> Iterator[Queue]:
    with Queue(dsn) as q:
        yield q


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Real `engine run` processes


SUPPORT_DIR = Path(__file__).resolve().parent / "support"


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"raw": raw})
        return lines

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator:
    """start_engine(dsn, config_text, *args, env=None) -> EngineProcess running `engine run *args`.

    The config file is written to tmp_path; tests/support is on PYTHONPATH so test handlers
    (`support.handlers:...`) import in the workers. Every process is killed at teardown.
    """
    started: list[EngineProcess] = []

    def start(dsn: str, config_text: str, *args: str, env: dict[str, str] | None = None) -> EngineProcess:
        config = tmp_path / f"config-{len(started)}.toml"
        config.write_text(config_text)
        log_path = tmp_path / f"engine-{len(started)}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{SUPPORT_DIR.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "SKIPLOCK_DSN": dsn, **(env or {})}
        full_env.pop("SKIPLOCK_ENV", None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config), *args],
                                       stdout=log, stderr=subprocess.STDOUT, env=full_env)
        engine = EngineProcess(process, log_path)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


def wait_for(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll until predicate() is truthy; returns its value or fails the test with `message`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


def scalar(dsn: str, sql: str, params: tuple = ()):
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(sql, params).fetchone()
        return row[0] if row else None

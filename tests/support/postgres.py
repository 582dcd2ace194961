"""Fixtures: one throwaway PostgreSQL per test session, one fresh database per test.

The server is the project's own embedded launcher (a real PostgreSQL, never a mock). Each test gets
its own database cloned from a template that has every migration applied, so tests cannot see each
other's jobs and cloning costs milliseconds. Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator

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


def scalar(dsn: str, sql: str, params: tuple = ()):
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(sql, params).fetchone()
        return row[0] if row else None

"""Applies the numbered SQL files in migrations/ in order, each in its own transaction.

A session advisory lock serialises concurrent `engine migrate` runs; re-running is a no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from engine import store
from engine.errors import ConfigError, SchemaOutdated

_FILE_NAME: Final = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):  # wheel, then source tree
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"migrations directory not found next to {here}")


def available_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if not match:
            raise ConfigError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigError(f"{directory}: migration numbers must run 1, 2, 3, ... without gaps: {versions}")
    return found


REQUIRED_SCHEMA_VERSION: Final = len(available_migrations())


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply what is missing; returns the migrations applied by this call."""
    conn.autocommit = True
    store.migrations_lock(conn)
    try:
        with conn.transaction():
            store.migrations_bootstrap(conn)
        applied = store.migrations_applied(conn)
        done: list[Migration] = []
        for migration in available_migrations():
            if migration.version in applied:
                continue
            with conn.transaction():
                conn.execute(migration.path.read_text())
                store.migrations_record(conn, migration.version, migration.name)
            done.append(migration)
        return done
    finally:
        store.migrations_unlock(conn)


def schema_version(conn: psycopg.Connection) -> int:
    return store.schema_version(conn)


def require_schema(conn: psycopg.Connection) -> None:
    version = schema_version(conn)
    if version < REQUIRED_SCHEMA_VERSION:
        raise SchemaOutdated(
            f"database schema is at version {version}, this skiplock needs {REQUIRED_SCHEMA_VERSION}: "
            "run `engine migrate`"
        )

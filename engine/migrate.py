"""Applies the numbered SQL files in migrations/ in order, for a fleet that keeps running.

A session advisory lock serialises concurrent `engine migrate` runs; re-running is a no-op.

- Each file runs in its own transaction with a `lock_timeout`: a migration waiting for a lock held by
  an open batch transaction would otherwise block every claim queued behind it. On a lock timeout the
  transaction rolls back and is retried, with backoff, for up to `retry_for` seconds.
- A file whose header says `-- skiplock: no-transaction` runs statement by statement outside a
  transaction (CREATE INDEX CONCURRENTLY). Its statements end with `;` at the end of a line, hold no
  `$$` bodies, and must be safe to run again (IF NOT EXISTS; DROP INDEX CONCURRENTLY IF EXISTS before
  a CREATE INDEX CONCURRENTLY that may have left an invalid index): a failure half-way leaves the
  file unrecorded, and the next `engine migrate` runs it from the top.
- A file whose header says `-- skiplock: min-code-version X.Y.Z` (it drops or renames something older
  code uses) records that version; code older than it refuses the schema with a message naming both
  versions instead of failing at run time.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
import psycopg.errors

from engine import __version__, store
from engine.errors import ConfigError, SchemaOutdated

log = logging.getLogger("skiplock.migrate")

_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_DIRECTIVE: Final = re.compile(r"^--\s*skiplock:\s*(.*?)\s*$")
_RELEASE: Final = re.compile(r"^\d+(\.\d+)*")  # the release numbers of a version: 0.2.0 of 0.2.0.dev1
NO_TRANSACTION: Final = "no-transaction"
MIN_CODE_VERSION: Final = "min-code-version"

LOCK_TIMEOUT: Final = 2.0  # seconds a migration statement may wait for a lock before it backs off
LOCK_RETRY_FOR: Final = 600.0  # seconds of lock-timeout retries before `engine migrate` gives up
_BACKOFF_CAP: Final = 10.0


CODE_VERSION: Final = __version__


def _release(version: str) -> tuple[int, ...]:
    match = _RELEASE.match(version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    transactional: bool = True
    min_code_version: str | None = None


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):  # wheel, then source tree
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"migrations directory not found next to {here}")


def _directives(path: Path, version: int, name: str) -> Migration:
    """Read the `-- skiplock: ...` lines of the file's leading comment block."""
    transactional, min_code = True, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("--"):
            break
        match = _DIRECTIVE.match(line.strip())
        if not match:
            continue
        words = match.group(1).split()
        if words == [NO_TRANSACTION]:
            transactional = False
        elif len(words) == 2 and words[0] == MIN_CODE_VERSION:
            if not re.fullmatch(r"\d+(\.\d+)*", words[1]):
                raise ConfigError(f"{path}:{number}: {MIN_CODE_VERSION} {words[1]!r} is not a version like 1.2.0")
            min_code = words[1]
        else:
            raise ConfigError(f"{path}:{number}: unknown directive {match.group(1)!r}: use "
                              f"'-- skiplock: {NO_TRANSACTION}' or '-- skiplock: {MIN_CODE_VERSION} X.Y.Z'")
    return Migration(version, name, path, transactional, min_code)


def available_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if not match:
            raise ConfigError(f"{path}: migration files are named NNNN_name.sql")
        found.append(_directives(path, int(match.group(1)), match.group(2)))
    versions = [m.version for m in found]
    # Numbers increase and never repeat; a gap is allowed (branches number their files apart).
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise ConfigError(f"{directory}: migration numbers must be unique and start at 1 or more: {versions}")
    return found


KNOWN_MIGRATIONS: Final = frozenset(m.version for m in available_migrations())
REQUIRED_SCHEMA_VERSION: Final = max(KNOWN_MIGRATIONS, default=0)


def _statements(text: str) -> list[str]:
    """Split a no-transaction file into statements: each ends with ';' at the end of a line."""
    statements, current = [], []
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current))
            current = []
    if any(line.strip() and not line.lstrip().startswith("--") for line in current):
        statements.append("\n".join(current))
    return statements


def _with_lock_retry(what: str, action: Callable[[], object], deadline: float) -> None:
    delay = 0.2
    while True:
        try:
            action()
            return
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("migration %s waited past lock_timeout for a lock; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_CAP)


def _apply(conn: psycopg.Connection, migration: Migration, lock_timeout: float, deadline: float) -> None:
    text = migration.path.read_text()
    what = f"{migration.version:04d}_{migration.name}"
    if migration.transactional:
        def run_in_transaction() -> None:
            with conn.transaction():
                store.migrations_lock_timeout(conn, lock_timeout, local=True)
                conn.execute(text)
                store.migrations_record(conn, migration.version, migration.name, migration.min_code_version)

        _with_lock_retry(what, run_in_transaction, deadline)
        return
    # Session-level, and only now: the advisory lock above must wait without a timeout.
    store.migrations_lock_timeout(conn, lock_timeout, local=False)
    try:
        for statement in _statements(text):
            _with_lock_retry(what, lambda: conn.execute(statement), deadline)  # noqa: B023 (runs at once)
        store.migrations_record(conn, migration.version, migration.name, migration.min_code_version)
    finally:
        store.migrations_lock_timeout(conn, None, local=False)


def migrate(
    conn: psycopg.Connection,
    directory: Path | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    retry_for: float = LOCK_RETRY_FOR,
) -> list[Migration]:
    """Apply what is missing (from `directory`, default the shipped migrations); returns the
    migrations applied by this call. A statement waits at most `lock_timeout` s for a lock, then its
    file is retried with backoff for up to `retry_for` s (psycopg.errors.LockNotAvailable after)."""
    conn.autocommit = True
    store.migrations_lock(conn)
    try:
        with conn.transaction():
            store.migrations_bootstrap(conn)
        applied = store.migrations_applied(conn)
        done: list[Migration] = []
        deadline = time.monotonic() + retry_for
        for migration in available_migrations(directory):
            if migration.version in applied:
                continue
            _apply(conn, migration, lock_timeout, deadline)
            done.append(migration)
        return done
    finally:
        store.migrations_unlock(conn)


def schema_version(conn: psycopg.Connection) -> int:
    return store.schema_version(conn)


def require_schema(conn: psycopg.Connection) -> None:
    """Refuse a schema that lacks a migration this code needs, or that has one needing newer code."""
    applied = store.schema_migrations_detail(conn)
    versions = {version for version, _, _ in applied}
    if not KNOWN_MIGRATIONS <= versions:
        version = max(versions, default=0)
        missing = sorted(KNOWN_MIGRATIONS - versions)
        # Migrations may land out of order (gaps are allowed): name the ones missing below the top.
        gap = ("" if version < REQUIRED_SCHEMA_VERSION else
               f" (migration{'s' if len(missing) > 1 else ''} {', '.join(f'{m:04d}' for m in missing)} not applied)")
        raise SchemaOutdated(
            f"database schema is at version {version}{gap}, this skiplock needs {REQUIRED_SCHEMA_VERSION}: "
            "run `engine migrate`"
        )
    code = _release(CODE_VERSION)
    for version, min_code, name in applied:
        if min_code is not None and _release(min_code) > code:
            raise SchemaOutdated(
                f"database schema migration {version:04d}_{name} needs skiplock >= {min_code}; this is "
                f"skiplock {CODE_VERSION}: upgrade skiplock to run against this database"
            )

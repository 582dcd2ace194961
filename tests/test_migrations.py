"""Migrations: apply, idempotence, concurrent runs, refusal of an old schema, and the schema built from
all migrations checked against every statement the code sends and against the claim's index."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from typing import Any

import psycopg
import pytest

from engine import db
from engine.errors import SchemaOutdated
from engine.migrate import KNOWN_MIGRATIONS, REQUIRED_SCHEMA_VERSION, available_migrations, migrate, schema_version
from engine.queue import Queue
from engine.sql import Q
from support.postgres import register_flows

PLACEHOLDER = re.compile(r"%\((\w+)\)s")
EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s*(\([^)]*\))?\s*", re.IGNORECASE)


def test_migrate_applies_all_then_nothing(empty_dsn: str) -> None:
    expected = [m.version for m in available_migrations()]
    assert expected == sorted(KNOWN_MIGRATIONS) and expected[-1] == REQUIRED_SCHEMA_VERSION
    with db.connect(empty_dsn) as conn:
        assert schema_version(conn) == 0
        assert [m.version for m in migrate(conn)] == expected
        assert schema_version(conn) == REQUIRED_SCHEMA_VERSION
        assert migrate(conn) == []
        rows = conn.execute("SELECT version, name FROM skiplock.schema_migrations ORDER BY version").fetchall()
        assert rows == [(m.version, m.name) for m in available_migrations()]
        # the session lock is released after each run
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
    with Queue(empty_dsn) as queue:
        assert queue.enqueue("f", {}, allow_unknown_flow=True) is not None


def _migrate_in_child(dsn: str, start: Any, results: Any) -> None:
    from engine import db
    from engine.migrate import migrate

    try:
        with db.connect(dsn) as conn:
            start.wait(60)
            results.put(("ok", [m.version for m in migrate(conn)]))
    except Exception as exc:  # reported to the parent, which fails the test with the message
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_concurrent_migrate_from_two_processes(empty_dsn: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_child, args=(empty_dsn, start, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    with db.connect(empty_dsn) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()").fetchone()
            if row and row[0] >= 3:  # both children and this connection
                break
            time.sleep(0.02)
        start.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert [p.exitcode for p in procs] == [0, 0]
        assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
        applied = sorted((o[1] for o in outcomes), key=len)
        assert applied == [[], sorted(KNOWN_MIGRATIONS)]
        rows = conn.execute("SELECT version, count(*) FROM skiplock.schema_migrations GROUP BY version"
                            " ORDER BY version").fetchall()
        assert rows == [(v, 1) for v in sorted(KNOWN_MIGRATIONS)]
        assert schema_version(conn) == REQUIRED_SCHEMA_VERSION


def test_code_refuses_an_outdated_schema(empty_dsn: str) -> None:
    with Queue(empty_dsn) as queue:
        with pytest.raises(SchemaOutdated, match=r"run `engine migrate`") as info:
            queue.enqueue("f", {})
        assert f"needs {REQUIRED_SCHEMA_VERSION}" in str(info.value) and "version 0" in str(info.value)
        with pytest.raises(SchemaOutdated):
            queue.claim("f", "w", 10)
        with pytest.raises(SchemaOutdated):
            queue.get_queue_status()
    with db.connect(empty_dsn) as conn:  # the check did not create anything
        assert conn.execute("SELECT to_regnamespace('skiplock')").fetchone() == (None,)


def test_code_refuses_a_partly_migrated_schema(empty_dsn: str) -> None:
    with db.connect(empty_dsn) as conn:
        migrate(conn)
        conn.execute("DELETE FROM skiplock.schema_migrations WHERE version = %s", (REQUIRED_SCHEMA_VERSION,))
    with Queue(empty_dsn) as queue, pytest.raises(SchemaOutdated, match=r"run `engine migrate`"):
        queue.enqueue("f", {})


def _numbered(statement: str) -> tuple[str, list[str]]:
    """`%(name)s` placeholders to `$n` (same name, same number), as libpq's prepare wants them."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return PLACEHOLDER.sub(number, statement).replace("%%", "%"), names


def test_every_statement_prepares_against_the_migrated_schema(empty_dsn: str) -> None:
    """Any statement naming a column, table, type or function the migrations do not create fails here."""
    with db.connect(empty_dsn) as conn:
        migrate(conn)
        checked, skipped = [], []
        failures: list[str] = []
        for name in Q.names():
            statement = getattr(Q, name)
            if statement.lstrip().upper().startswith("COPY") or ";" in statement.rstrip().rstrip(";"):
                skipped.append(name)
                continue
            # Parse does not analyse utility statements: check the statement inside an EXPLAIN.
            sql, _ = _numbered(EXPLAIN_PREFIX.sub("", statement, count=1))
            result = conn.pgconn.prepare(f"check_{name}".encode(), sql.encode())
            if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                failures.append(f"{name}: {result.error_message.decode(errors='replace').strip()}")
            else:
                checked.append(name)
        assert failures == []
    assert {"claim_batch", "ack_batch", "release_batch", "rescue_jobs", "dlq_retry", "schema_version"} <= set(checked)
    assert "enqueue_copy" in skipped and "migrations_bootstrap" in skipped
    assert len(checked) >= 30 and len(checked) > 4 * len(skipped)


def test_prepare_check_catches_a_missing_column(empty_dsn: str) -> None:
    """The check above is able to fail: the same machinery on a statement with a wrong column."""
    with db.connect(empty_dsn) as conn:
        migrate(conn)
        sql, names = _numbered(Q.claim_batch.replace("j.attempts + 1", "j.attempt_count + 1"))
        assert sorted(names) == ["flow", "limit", "max_attempts", "token", "worker"]
        assert "%(" not in sql and "$5" in sql and "$6" not in sql  # same name, same number
        result = conn.pgconn.prepare(b"broken", sql.encode())
        assert result.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert b"attempt_count" in result.error_message


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


def test_claim_plan_uses_the_claim_index(dsn: str, conn: psycopg.Connection) -> None:
    flows = [f"flow-{i}" for i in range(6)]
    conn.execute(
        "INSERT INTO skiplock.jobs (flow, payload, priority, run_at)"
        " SELECT 'flow-' || (g % 6), jsonb_build_object('n', g), (g % 3)::smallint,"
        "        now() - (g || ' milliseconds')::interval"
        " FROM generate_series(1, 6000) g")
    # history that must not matter: running and dead rows of the same flows
    conn.execute("UPDATE skiplock.jobs SET status = 'running', claimed_by = 'w', claimed_at = now()"
                 " WHERE id % 10 = 0")
    conn.execute("UPDATE skiplock.jobs SET status = 'dead', finished_at = now() WHERE id % 10 = 1")
    conn.execute("ANALYZE skiplock.jobs")
    conn.execute("ANALYZE skiplock.flows")
    for limit in (1, 100):
        with psycopg.ClientCursor(conn) as cur:
            literal = cur.mogrify(Q.claim_batch, {"flow": flows[2], "worker": "w-1", "limit": limit, "token": 12345,
                                                  "max_attempts": 5})
        assert "%(" not in literal and "'flow-2'" in literal
        row = conn.execute("EXPLAIN (FORMAT JSON) " + literal).fetchone()
        assert row is not None
        document = row[0] if not isinstance(row[0], str) else json.loads(row[0])
        nodes = _plan_nodes(document[0]["Plan"])
        text = json.dumps(document)
        assert "jobs_claim_idx" in text, text
        claim_scans = [n for n in nodes if n.get("Index Name") == "jobs_claim_idx"]
        assert claim_scans and all(n["Node Type"] in ("Index Scan", "Index Only Scan") for n in claim_scans)
        seq_on_jobs = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"]
        assert seq_on_jobs == [], text
        assert not any(n["Node Type"] == "Sort" for n in nodes), "the index should give the claim order"
    # EXPLAIN without ANALYZE changed nothing
    assert conn.execute("SELECT count(*) FROM skiplock.jobs WHERE claimed_by = 'w-1'").fetchone() == (0,)


# ---------------------------------------------------------------------------------------------
# Migrations for a running fleet (issue 10 item 10): each test writes a migration of its own into a
# test migrations directory next to copies of the shipped ones.


def _with_extra(tmp_path: Any, name: str, text: str) -> Any:
    import shutil

    from engine.migrate import migrations_dir

    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    (directory / name).write_text(text)
    return directory


def test_migration_behind_an_open_batch_transaction_does_not_block_claims(empty_dsn: str, tmp_path: Any) -> None:
    import threading

    from engine import store

    directory = _with_extra(tmp_path, "0099_probe.sql", "ALTER TABLE skiplock.jobs ADD COLUMN probe integer;\n")
    with db.connect(empty_dsn) as conn:
        migrate(conn)
    register_flows(empty_dsn, "f")
    with Queue(empty_dsn) as queue:
        queue.enqueue_many("f", [{}] * 3)
    holder = psycopg.connect(empty_dsn)  # an open batch transaction: its claimed rows are locked
    assert len(holder.execute("SELECT id FROM skiplock.jobs FOR UPDATE").fetchall()) == 3
    # Without lock_timeout a migration queued behind it would stop this claim until the holder ends.
    claimer = db.connect(empty_dsn, statement_timeout_ms=3000)
    outcome: list[Any] = []

    def run() -> None:
        try:
            with db.connect(empty_dsn) as conn:
                outcome.append([m.version for m in migrate(conn, directory, lock_timeout=0.3, retry_for=60)])
        except Exception as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 2.5
        slowest = 0.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            store.claim_batch(claimer, "f", "w-1", 10, store.new_claim_token())
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        assert slowest < 1.0, f"a claim waited {slowest:.2f} s behind the migration"
        assert outcome == [] and 99 not in store.migrations_applied(claimer)
    finally:
        holder.commit()
    thread.join(30)
    assert outcome == [[99]]
    assert claimer.execute("SELECT probe FROM skiplock.jobs LIMIT 1").fetchone() == (None,)
    # Giving up after retry_for: the file is not recorded.
    directory = _with_extra(tmp_path / "again", "0100_probe2.sql",
                            "ALTER TABLE skiplock.jobs ADD COLUMN probe2 integer;\n")
    (directory / "0099_probe.sql").write_text("ALTER TABLE skiplock.jobs ADD COLUMN probe integer;\n")
    holder.execute("SELECT id FROM skiplock.jobs FOR UPDATE")
    with db.connect(empty_dsn) as conn, pytest.raises(psycopg.errors.LockNotAvailable):
        migrate(conn, directory, lock_timeout=0.1, retry_for=0.5)
    holder.rollback()
    assert 100 not in store.migrations_applied(claimer)
    claimer.close()
    holder.close()


def test_a_no_transaction_migration_creates_an_index_concurrently(empty_dsn: str, tmp_path: Any) -> None:
    directory = _with_extra(tmp_path, "0099_concurrent.sql", (
        "-- An index built without blocking writes.\n"
        "-- skiplock: no-transaction\n"
        "\n"
        "DROP INDEX CONCURRENTLY IF EXISTS skiplock.jobs_probe_idx;\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_probe_idx\n"
        "    ON skiplock.jobs (created_at);\n"
        "-- a second statement\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_probe2_idx ON skiplock.jobs (updated_at);\n"))
    with db.connect(empty_dsn) as conn:
        applied = migrate(conn, directory)
        assert [m.version for m in applied][-1] == 99 and not applied[-1].transactional
        valid = conn.execute("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                             " WHERE c.relname LIKE 'jobs_probe%' ORDER BY 1").fetchall()
        assert valid == [("jobs_probe2_idx", True), ("jobs_probe_idx", True)]
        assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)  # the session's setting is back
        assert migrate(conn, directory) == []


def test_old_code_refuses_a_schema_that_needs_newer_code(empty_dsn: str, tmp_path: Any) -> None:
    import subprocess
    import sys

    from engine.migrate import CODE_VERSION, require_schema

    directory = _with_extra(tmp_path, "0099_rename.sql", (
        "-- Renames a column older engines read.\n"
        "-- skiplock: min-code-version 99.0\n"
        "ALTER TABLE skiplock.jobs RENAME COLUMN error_message TO last_error;\n"))
    with db.connect(empty_dsn) as conn:
        migrate(conn, directory)
        assert conn.execute("SELECT min_code_version FROM skiplock.schema_migrations WHERE version = 99"
                            ).fetchone() == ("99.0",)
        message = (f"database schema migration 0099_rename needs skiplock >= 99.0; this is skiplock "
                   f"{CODE_VERSION}: upgrade skiplock to run against this database")
        with pytest.raises(SchemaOutdated) as info:
            require_schema(conn)
        assert str(info.value) == message
    with Queue(empty_dsn) as queue, pytest.raises(SchemaOutdated, match="needs skiplock >= 99.0"):
        queue.enqueue("f", {})
    config = tmp_path / "config.toml"
    config.write_text("[flows.noop]\n")  # a flow to serve: the schema check comes after the config's
    result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--dsn", empty_dsn, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"engine: error: {message}"]


def test_a_migration_for_older_code_is_accepted_and_directives_are_checked(empty_dsn: str, tmp_path: Any) -> None:
    from engine.errors import ConfigError
    from engine.migrate import require_schema

    directory = _with_extra(tmp_path, "0099_add.sql", "-- skiplock: min-code-version 0.0.1\nSELECT 1;\n")
    with db.connect(empty_dsn) as conn:
        migrate(conn, directory)
        require_schema(conn)
    bad = _with_extra(tmp_path / "bad", "0099_bad.sql", "-- fine\n-- skiplock: no-transactions\nSELECT 1;\n")
    with pytest.raises(ConfigError, match=r"0099_bad.sql:2: unknown directive 'no-transactions'"):
        available_migrations(bad)
    bad = _with_extra(tmp_path / "bad2", "0099_bad.sql", "-- skiplock: min-code-version soon\nSELECT 1;\n")
    with pytest.raises(ConfigError, match=r"0099_bad.sql:1: min-code-version 'soon' is not a version"):
        available_migrations(bad)

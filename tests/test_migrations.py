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
        assert queue.enqueue("f", {}) is not None


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

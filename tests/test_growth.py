"""Growth (issue 10 item 11): retention of workers, runs, per-minute history and receipts in bounded
slices; a capped error history that `dlq retry` keeps; the console's worker reads on indexes."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

import engine.supervisor as supervisor
from engine import store
from engine.config import EngineConfig
from engine.queue import DeadLetterFilter, Queue
from engine.sql import Q
from engine.store import ERRORS_KEPT, Failure
from support.postgres import register_flows_for


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "f")


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_retention_pass_deletes_old_history_in_slices(conn: psycopg.Connection,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    conn.execute("""
        INSERT INTO skiplock.workers (id, engine_id, host, pid, state, stopped_at, heartbeat_at)
        SELECT 'old-' || g, 'e', 'h', g, CASE WHEN g % 2 = 0 THEN 'stopped' ELSE 'lost' END,
               now() - interval '2 days', now() - interval '2 days'
        FROM generate_series(1, 7) g;
        INSERT INTO skiplock.workers (id, engine_id, host, pid, state, stopped_at, heartbeat_at) VALUES
            ('recent', 'e', 'h', 1, 'stopped', now() - interval '1 hour', now() - interval '1 hour'),
            ('live', 'e', 'h', 2, 'busy', NULL, now() - interval '3 days');
        INSERT INTO skiplock.runs (id, flow, total, completed, created_at, finished_at)
        SELECT 'old-' || g, 'f', 1, 1, now() - interval '9 days', now() - interval '8 days'
        FROM generate_series(1, 5) g;
        INSERT INTO skiplock.runs (id, flow, total, completed, created_at, finished_at) VALUES
            ('recent', 'f', 1, 1, now() - interval '1 day', now() - interval '1 day'),
            ('open', 'f', 2, 1, now() - interval '30 days', NULL);
        INSERT INTO skiplock.stats_minute (minute, flow, completed)
        SELECT date_trunc('minute', now()) - g * interval '1 day', 'f', 1 FROM generate_series(0, 9) g;
        INSERT INTO skiplock.ack_receipts (id, completed, retried, dead_ids, finished_runs, created_at) VALUES
            (1, 1, 0, '{}', '{}', now() - interval '2 hours'), (2, 1, 0, '{}', '{}', now());
        INSERT INTO skiplock.enqueue_receipts (batch_key, flow, created_at) VALUES
            ('old', 'f', now() - interval '2 days'), ('new', 'f', now());
    """)
    monkeypatch.setattr(supervisor, "RETENTION_SLICE", 2)  # several slices per table
    counts = supervisor.retention_pass(conn, EngineConfig())
    assert counts == {"workers": 7, "runs": 5, "stats": 3, "receipts": 2}
    assert [r[0] for r in conn.execute("SELECT id FROM skiplock.workers ORDER BY id")] == ["live", "recent"]
    assert [r[0] for r in conn.execute("SELECT id FROM skiplock.runs ORDER BY id")] == ["open", "recent"]
    assert one(conn, "SELECT count(*) FROM skiplock.stats_minute") == 7  # days 0-6 kept
    assert one(conn, "SELECT array_agg(id) FROM skiplock.ack_receipts") == [2]
    assert one(conn, "SELECT array_agg(batch_key) FROM skiplock.enqueue_receipts") == ["new"]
    assert supervisor.retention_pass(conn, EngineConfig()) == {"workers": 0, "runs": 0, "stats": 0, "receipts": 0}


def _fail_once(conn: psycopg.Connection, job_id: int, permanent: bool = False) -> None:
    token = store.new_claim_token()
    rows = store.claim_batch(conn, "f", "w-1", 1, token)
    assert [r[0] for r in rows] == [job_id]
    store.ack_batch(conn, "w-1", token, [], None,
                    [Failure(job_id, "ValueError", f"failure {rows[0][2]}", "tb " * 1000, permanent, 0.0)])


def _attempts(conn: psycopg.Connection, job_id: int) -> list[int]:
    errors = one(conn, "SELECT errors FROM skiplock.jobs WHERE id = %s", (job_id,))
    return [e["attempt"] for e in errors]


def test_error_history_keeps_the_first_and_the_last_attempts(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, max_attempts=100)
    assert job_id is not None
    for _ in range(25):
        _fail_once(conn, job_id)
    # Before the cap: 25 entries of ~3 KB each, rewritten whole on every failure.
    assert _attempts(conn, job_id) == [1, *range(25 - ERRORS_KEPT + 1, 26)]
    _fail_once(conn, job_id, permanent=True)
    assert one(conn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job_id,)) == "dead"
    assert queue.retry_dead(DeadLetterFilter(ids=[job_id])) == [job_id]
    # dlq retry keeps the capped history; attempts restart, and the cap still holds the first ever.
    assert _attempts(conn, job_id) == [1, *range(26 - ERRORS_KEPT + 1, 27)]
    _fail_once(conn, job_id)
    assert _attempts(conn, job_id) == [1, *range(26 - ERRORS_KEPT + 2, 27), 1]
    # The rescue path appends through the same cap.
    token = store.new_claim_token()
    assert store.claim_batch(conn, "f", "w-2", 1, token)
    store.worker_register(conn, "w-2", "e", "h", 1, ["f"], version="test")
    store.worker_mark_lost(conn, {"w-2": "was killed by the test"})
    assert store.rescue(conn, 30.0).rescued == 1
    errors = one(conn, "SELECT errors FROM skiplock.jobs WHERE id = %s", (job_id,))
    assert len(errors) == ERRORS_KEPT + 1 and errors[0]["message"] == "failure 1"
    assert errors[-1]["type"] == "WorkerLost"


def _plan(conn: psycopg.Connection, statement: str, params: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    with psycopg.ClientCursor(conn) as cur:
        literal = cur.mogrify(statement, params)
    row = conn.execute("EXPLAIN (FORMAT JSON) " + literal).fetchone()
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])

    def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
        found = [plan]
        for child in plan.get("Plans", []):
            found.extend(nodes(child))
        return found

    return nodes(document[0]["Plan"]), json.dumps(document)


def test_worker_reads_use_the_worker_indexes(conn: psycopg.Connection) -> None:
    """A row per spawn: with a long history the console's and `engine status`'s worker reads must not
    scan it all (before: an OR of live and recently stopped, answered by a Seq Scan)."""
    conn.execute("""
        INSERT INTO skiplock.workers (id, engine_id, host, pid, state, started_at, stopped_at, heartbeat_at)
        SELECT 'gone-' || g, 'e', 'h', g, CASE WHEN g % 2 = 0 THEN 'stopped' ELSE 'lost' END,
               now() - interval '1 day', now() - interval '1 day' + g * interval '1 second', now() - interval '1 day'
        FROM generate_series(1, 20000) g;
        INSERT INTO skiplock.workers (id, engine_id, host, pid, state, stopped_at)
        SELECT 'live-' || g, 'e', 'h', g, 'busy', NULL FROM generate_series(1, 20) g;
        INSERT INTO skiplock.workers (id, engine_id, host, pid, state, stopped_at)
        SELECT 'recent-' || g, 'e', 'h', g, 'stopped', now() - interval '1 minute' FROM generate_series(1, 5) g;
        ANALYZE skiplock.workers;
    """)
    for name, statement, params in (
        ("console_workers", Q.console_workers, {"now": None, "limit": 200}),
        ("workers_list", Q.workers_list, {}),
        ("purge_workers", Q.purge_workers, {"retention": 86400.0 * 2, "limit": 10_000}),
    ):
        nodes, text = _plan(conn, statement, params)
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "workers"]
        assert seq == [], f"{name}: {text}"
        assert "workers_stopped_idx" in text, f"{name}: {text}"
    assert len(store.workers_list(conn)) == 25
    rows = store.console_workers(conn, dict_row_class(), None, 200)
    assert len(rows) == 25 and rows[0]["state"] == "busy"


def dict_row_class() -> Any:
    """A row class for store.console_workers that keeps every column (console/data.py has its own)."""
    class Row(dict):  # type: ignore[type-arg]
        def __init__(self, **columns: Any) -> None:
            super().__init__(columns)
    return Row

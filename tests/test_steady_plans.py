"""The ack's plan at steady state (issue 17): statistics gathered while few jobs ran must not make it
scan every running job and rescan its unnest per row (quadratic in the batch). Checked on the
generic plan a prepared statement ends up with."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest

from engine import store
from engine.queue import Queue
from engine.sql import Q
from support.postgres import register_flows_for

BATCH = 500


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    register_flows_for(request, "f")


def _generic_plan(conn: psycopg.Connection, statement: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of `statement` run through PREPARE under force_generic_plan: every node."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement).replace("%%", "%")
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE steady_plan AS {text}")
    try:
        with psycopg.ClientCursor(conn) as cur:
            args = ", ".join(cur.mogrify("%s", (params[name],)) for name in names)
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE steady_plan({args})").fetchone()
    finally:
        conn.execute("DEALLOCATE steady_plan")
        conn.execute("RESET plan_cache_mode")
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])

    def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [plan, *(n for child in plan.get("Plans", []) for n in nodes(child))]

    return nodes(document[0]["Plan"])


def _few_running_statistics(conn: psycopg.Connection, queue: Queue) -> None:
    """What an idle moment's ANALYZE leaves: a small table with a few jobs running."""
    queue.enqueue_many("f", [{"i": i} for i in range(20)])
    store.claim_batch(conn, "f", "w-early", 3, store.new_claim_token())
    conn.execute("ANALYZE skiplock.jobs")


def test_ack_of_a_full_batch_probes_the_primary_key(conn: psycopg.Connection, queue: Queue) -> None:
    _few_running_statistics(conn, queue)
    queue.enqueue_many("f", [{"i": i} for i in range(BATCH)])
    token = store.new_claim_token()
    rows = store.claim_batch(conn, "f", "w-1", BATCH, token)
    ids = [r[0] for r in rows]
    assert len(ids) == BATCH
    params = store.ack_params("w-1", token, ids, [f'{{"n": {i}}}' for i in ids], (), 5, ack_id=store.new_ack_id())
    nodes = _generic_plan(conn, Q.ack_batch, params)
    deletes = [n for n in nodes if n.get("Operation") == "Delete" and n.get("Relation Name") == "jobs"]
    assert len(deletes) == 1
    ran = [n for n in nodes if n.get("Actual Loops", 0) > 0]
    # Before: a Bitmap Heap Scan of jobs_running_idx joined to the unnest with a Join Filter, rescanning
    # the unnest per running job; the failure branch read every running job too, with no failures.
    assert {n["Index Name"] for n in ran if n.get("Index Name", "").startswith("jobs")} == {"jobs_pkey"}
    assert not [n for n in ran if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"]
    assert not [n for n in nodes if n["Node Type"] == "Function Scan" and n.get("Actual Loops", 1) > 1]
    assert deletes[0]["Actual Rows"] == len(ids)
    # The results went in by id: each job's own.
    stored = dict(conn.execute("SELECT id, (result ->> 'n')::bigint FROM skiplock.jobs_done WHERE id = ANY(%s)",
                               (ids,)).fetchall())
    assert stored == {i: i for i in ids}


def test_vacuum_leaves_the_hot_tables_empty_tail_in_place(dsn: str) -> None:
    """Truncating the tail takes an ACCESS EXCLUSIVE lock on skiplock.jobs, which stops every claim,
    ack and enqueue (seen as 0.3 s stalls at steady state): neither the vacuum pass nor autovacuum
    (the table's vacuum_truncate) may do it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO skiplock.jobs (flow, payload, status, attempts) "
                     "SELECT 'f', '{}', 'pending', 0 FROM generate_series(1, 5000)")
        size = conn.execute("SELECT pg_relation_size('skiplock.jobs')").fetchone()[0]
        conn.execute("DELETE FROM skiplock.jobs")
        store.jobs_vacuum(conn)
        assert conn.execute("SELECT pg_relation_size('skiplock.jobs')").fetchone()[0] == size
        conn.execute("VACUUM skiplock.jobs")  # autovacuum's way: the table's own setting decides
        assert conn.execute("SELECT pg_relation_size('skiplock.jobs')").fetchone()[0] == size
        assert conn.execute("SELECT count(*) FROM skiplock.jobs").fetchone() == (0,)

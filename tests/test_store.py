"""engine/store.py and engine/runs.py against a real PostgreSQL: typed rows, the shared stats upsert,
and run hooks fired exactly once whoever fires them."""

from __future__ import annotations

import logging

import psycopg
import pytest

from engine import store
from engine.queue import Queue
from engine.runs import fire_run_hooks
from engine.store import DeadLetter, Failure, Job, RunSummary
from engine.telemetry import FlowCounts

log = logging.getLogger("test.store")


def finish_run(queue: Queue, conn: psycopg.Connection, run_id: str, flow: str = "f", jobs: int = 2,
               dead: int = 0) -> None:
    queue.enqueue_many(flow, [{"i": i} for i in range(jobs)], run_id=run_id)
    token = store.new_claim_token()
    ids = [row[0] for row in store.claim_batch(conn, flow, "w", jobs, token)]
    failures = [Failure(i, "Boom", "no", None, True, 0.0) for i in ids[:dead]]
    result = store.ack_batch(conn, "w", token, ids[dead:], None, failures)
    assert result.finished_runs == [run_id]


def test_run_hooks_fire_once_and_a_failing_hook_does_not_stop_the_others(
        queue: Queue, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    finish_run(queue, conn, "first", "f", jobs=2, dead=1)
    finish_run(queue, conn, "second", "g", jobs=1)
    finish_run(queue, conn, "third", "unhooked", jobs=1)
    called: list[tuple[str, dict]] = []
    seen: list[RunSummary] = []

    def broken(run_id: str, summary: dict) -> None:
        raise RuntimeError("hook bug")

    hooks = {"f": broken, "g": lambda run_id, summary: called.append((run_id, summary))}
    with caplog.at_level(logging.ERROR, logger="test.store"):
        claimed = fire_run_hooks(conn, ["first", "second", "third", "unknown"], hooks, log, on_finished=seen.append)
    assert claimed == seen == [RunSummary("first", "f", 2, 1, 1), RunSummary("second", "g", 1, 1, 0),
                               RunSummary("third", "unhooked", 1, 1, 0)]
    assert called == [("second", {"run": "second", "flow": "g", "total": 1, "completed": 1, "dead": 0})]
    assert [r.getMessage() for r in caplog.records] == ["on_complete hook of run first failed"]
    # Every run was claimed, hooked or not: nobody fires them again.
    assert fire_run_hooks(conn, ["first", "second", "third"], hooks, log) == []
    assert called == [("second", {"run": "second", "flow": "g", "total": 1, "completed": 1, "dead": 0})]
    assert conn.execute("SELECT count(*) FROM skiplock.runs WHERE hook_fired_at IS NULL").fetchone() == (0,)


def test_stats_upsert_adds_to_this_minute(conn: psycopg.Connection) -> None:
    store.stats_upsert(conn, {})  # nothing to send
    store.stats_upsert(conn, {"f": FlowCounts(completed=3, failed=1, wait_ms_sum=2.5, run_ms_sum=4),
                              "g": FlowCounts(dead=2, rescued=5)})
    store.stats_upsert(conn, {"f": FlowCounts(completed=1, dead=1, rescued=1, wait_ms_sum=0.5, run_ms_sum=1.0)})
    rows = conn.execute("SELECT flow, completed, failed, dead, rescued, wait_ms_sum, run_ms_sum"
                        " FROM skiplock.stats_minute ORDER BY flow").fetchall()
    assert rows == [("f", 4, 1, 1, 1, 3.0, 5.0), ("g", 0, 0, 2, 5, 0.0, 0.0)]


def test_rows_come_back_typed(queue: Queue, conn: psycopg.Connection) -> None:
    pending = queue.enqueue("f", {"a": 1}, dedupe_key="k", max_attempts=3)
    assert pending is not None
    job = store.job_get(conn, pending)
    assert isinstance(job, Job)
    assert (job.id, job.flow, job.payload, job.status, job.max_attempts, job.dedupe_key, job.result) == (
        pending, "f", {"a": 1}, "pending", 3, "k", None)
    token = store.new_claim_token()
    store.claim_batch(conn, "f", "w", 1, token)
    store.ack_batch(conn, "w", token, [], None, [Failure(pending, "Boom", "bad", None, True, 0.0)])
    [letter] = store.dlq_list(conn, {"ids": None, "flow": "f", "error_type": None, "older_than": None}, 10)
    assert isinstance(letter, DeadLetter)
    assert (letter.id, letter.attempts, letter.max_attempts, letter.error_type, letter.error_message) == (
        pending, 1, 3, "Boom", "bad")
    [live] = store.status_live(conn, None)
    assert (live.flow, live.pending, live.scheduled, live.running, live.dead) == ("f", 0, 0, 0, 1)
    assert store.job_get(conn, pending + 1000) is None

"""Clocks in transactions (issue 10 item 9): now() is the transaction's start; a transactional flow's
ack is the last statement of a batch transaction that began before its handlers ran. The times that
matter (finished_at, so run_ms; the backoff's run_at; claimed_at) must be the statement's."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from engine import store
from engine.queue import Queue
from engine.store import Failure
from support.postgres import register_flows_for


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "f", "g")


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def test_a_two_second_batch_transaction_reports_its_run_time_and_backs_off_from_the_failure(
        queue: Queue, conn: psycopg.Connection, dsn: str) -> None:
    queue.enqueue_many("f", [{"n": 1}, {"n": 2}])
    token = store.new_claim_token()
    ok_id, failed_id = sorted(r[0] for r in store.claim_batch(conn, "f", "w-1", 10, token))
    with psycopg.connect(dsn) as batch:  # a transactional flow's batch: BEGIN, handlers, ack, COMMIT
        begun = one(batch, "SELECT now()")
        time.sleep(2.0)
        ack = store.ack_batch(batch, "w-1", token, [ok_id], None,
                              [Failure(failed_id, "ValueError", "boom", None, False, 2.0)])
        acked = one(batch, "SELECT clock_timestamp()")
        batch.commit()
    assert ack.completed == 1 and ack.retried == 1
    run_s = one(conn, "SELECT extract(epoch FROM finished_at - claimed_at)::float8 FROM skiplock.jobs_done"
                      " WHERE id = %s", (ok_id,))
    assert 2.0 <= run_s < 4.0, f"run time {run_s} s: finished_at was stamped at BEGIN"
    run_at, at = one(conn, "SELECT run_at, (errors -> -1 ->> 'at')::timestamptz FROM skiplock.jobs"
                           " WHERE id = %s", (failed_id,))
    due_after_ack = (run_at - acked).total_seconds()
    assert 1.5 <= due_after_ack <= 2.0, f"backoff due {due_after_ack} s after the ack: counted from BEGIN"
    assert (at - begun).total_seconds() >= 2.0
    # The console's run-time percentiles read the same columns.
    latency = one(conn, "SELECT run_ms FROM (SELECT extract(epoch FROM finished_at - claimed_at)::float8 * 1000"
                        " AS run_ms FROM skiplock.jobs_done) s")
    assert latency >= 2000.0


def test_a_claim_inside_a_transaction_stamps_its_own_time(queue: Queue, conn: psycopg.Connection,
                                                          dsn: str) -> None:
    """A claim under a fleet-wide concurrency limit waits for the flow's lock inside its transaction."""
    queue.enqueue("f", {})
    with psycopg.connect(dsn) as claimer:
        begun = one(claimer, "SELECT now()")
        time.sleep(1.0)
        store.claim_flow_lock(claimer, "f")
        rows = store.claim_batch(claimer, "f", "w-1", 1, store.new_claim_token())
        claimer.commit()
    assert len(rows) == 1
    claimed_at = one(conn, "SELECT claimed_at FROM skiplock.jobs WHERE id = %s", (rows[0][0],))
    assert (claimed_at - begun).total_seconds() >= 1.0


def test_a_delay_enqueued_inside_a_transaction_counts_from_the_enqueue(dsn: str, conn: psycopg.Connection) -> None:
    with psycopg.connect(dsn) as producer:
        queue = Queue(conn=producer, check_schema=False)
        producer.execute("SELECT 1")
        time.sleep(1.0)
        job_id = queue.enqueue("f", {}, delay=2.0)
        queue.enqueue_many("g", [{}], delay=2.0)
        sent = one(producer, "SELECT clock_timestamp()")
        producer.commit()
    for run_at in (one(conn, "SELECT run_at FROM skiplock.jobs WHERE id = %s", (job_id,)),
                   one(conn, "SELECT run_at FROM skiplock.jobs WHERE flow = 'g'")):
        assert 1.5 <= (run_at - sent).total_seconds() <= 2.0

"""The queue core against a real PostgreSQL: enqueue, claim, ack, backoff, release, rescue, the seeds'
maintenance calls, runs, status and health. Effects are checked in SQL, not only through the API."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.types.json import Jsonb

import engine.queue as queue_module
import engine.store as store_module
from engine.errors import DatabaseUnavailable, ValidationError
from engine.migrate import REQUIRED_SCHEMA_VERSION
from engine import store
from engine.queue import AckResult, Failure, Queue, ack_batch, claim_batch, new_claim_token
from engine.sql import Q
from support.postgres import register_flows

TRICKY = "back\\slash \\n not-a-newline\ttab\nnewline\r\n ünïcødé 日本語 🎉 \"quoted\" \u2028 \x7f end\\"


# The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows).
FLOWS = ("a", "b", "bulk", "f", "g", "other")


@pytest.fixture(autouse=True)
def registered_flows(dsn: str) -> None:
    register_flows(dsn, *FLOWS)



# ---------------------------------------------------------------------------------------------
# helpers


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def job_row(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT id, flow, status::text AS status, priority, attempts, max_attempts, claimed_by, claim_token,"
        " claimed_at, error_type, error_message, errors, run_id, dedupe_key, finished_at, payload, run_at,"
        " extract(epoch FROM run_at - now())::float8 AS due_in"
        " FROM skiplock.jobs WHERE id = %s",
        (job_id,),
    )
    row = cur.fetchone()
    assert row is not None, f"job {job_id} is not in skiplock.jobs"
    return dict(zip([c.name for c in cur.description], row))


def snapshot(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    """The stored state of a job, without the time-dependent `due_in`."""
    row = job_row(conn, job_id)
    del row["due_in"]
    return row


def count(conn: psycopg.Connection, table: str, where: str = "true", params: Any = None) -> int:
    return int(one(conn, f"SELECT count(*) FROM skiplock.{table} WHERE {where}", params))


def fail(job_id: int, *, permanent: bool = False, delay: float = 0.0, error_type: str = "ValueError",
         message: str = "boom") -> Failure:
    return Failure(job_id, error_type, message, f"Traceback (most recent call last):\n  {message}\n", permanent, delay)


def make_due(conn: psycopg.Connection, *ids: int) -> None:
    conn.execute("UPDATE skiplock.jobs SET run_at = now() WHERE id = ANY(%s)", (list(ids),))


def register_worker(conn: psycopg.Connection, worker_id: str, flows: tuple[str, ...] = ("f",)) -> None:
    store.worker_register(conn, worker_id, "engine-1", "host-1", 4242, list(flows), version="test")
    beat = conn.execute(Q.worker_report,
                        {"id": worker_id, "state": "busy", "counters": Jsonb({"done": 0}), "pool": Jsonb({})})
    assert beat.fetchone() == (worker_id,)


# Heartbeat ages count from the server's start at the earliest (rescue_stale_workers), and the
# suite's server is seconds old: stale in these tests means older than STALE.
STALE = 1.0


def make_stale(conn: psycopg.Connection, worker_id: str) -> None:
    conn.execute("UPDATE skiplock.workers SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (worker_id,))
    uptime = conn.execute("SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8").fetchone()[0]
    time.sleep(max(0.0, 2 * STALE - uptime))


def claim_ids(queue: Queue, flow: str, worker: str, limit: int = 100) -> tuple[int, list[int]]:
    token, jobs = queue.claim(flow, worker, limit)
    return token, sorted(j.id for j in jobs)


def kill(queue: Queue, conn: psycopg.Connection, job_id: int, error_type: str = "ValueError") -> None:
    """Drive one pending job to dead through a real claim and a permanent failure."""
    token, jobs = queue.claim(one(conn, "SELECT flow FROM skiplock.jobs WHERE id = %s", (job_id,)), "killer", 1000)
    others = [j.id for j in jobs if j.id != job_id]
    assert job_id in [j.id for j in jobs]
    result = queue.ack("killer", token, [], failures=[fail(job_id, permanent=True, error_type=error_type)])
    assert result.dead_ids == [job_id]
    assert queue.release("killer", token, others) == len(others)


# ---------------------------------------------------------------------------------------------
# 1. enqueue


def test_enqueue_one_returns_id_and_payload_round_trips(queue: Queue, conn: psycopg.Connection) -> None:
    payload = {"s": TRICKY, "nested": {"list": [1, 2.5, None, True, "x\\y"]}, "ключ\t": "значение"}
    job_id = queue.enqueue("f", payload)
    assert isinstance(job_id, int)
    row = job_row(conn, job_id)
    assert row["status"] == "pending" and row["flow"] == "f" and row["attempts"] == 0
    assert row["payload"] == payload
    assert one(conn, "SELECT payload->>'s' FROM skiplock.jobs WHERE id = %s", (job_id,)) == TRICKY
    token, jobs = queue.claim("f", "w1", 10)
    assert [(j.id, j.payload) for j in jobs] == [(job_id, payload)]


def test_enqueue_many_copy_path_round_trips_payloads(queue: Queue, conn: psycopg.Connection) -> None:
    payloads = [{"i": i, "s": TRICKY + str(i), "k\\ey": ["\\", "\t", "\n", "\\N", "\\."]} for i in range(50)]
    result = queue.enqueue_many("f", payloads)
    assert (result.inserted, result.skipped) == (50, 0)
    stored = {r[0]["i"]: r[0] for r in conn.execute("SELECT payload FROM skiplock.jobs WHERE flow = 'f'")}
    assert stored == {p["i"]: p for p in payloads}
    texts = [r[0] for r in conn.execute("SELECT payload->>'s' FROM skiplock.jobs ORDER BY id")]
    assert texts == [TRICKY + str(i) for i in range(50)]
    _, jobs = queue.claim("f", "w1", 100)
    assert sorted((j.payload for j in jobs), key=lambda p: p["i"]) == payloads


def test_enqueue_ids_are_distinct_and_returned(queue: Queue, conn: psycopg.Connection) -> None:
    ids = [queue.enqueue("f", {"n": n}) for n in range(5)]
    assert len(set(ids)) == 5 and all(isinstance(i, int) for i in ids)
    assert sorted(r[0] for r in conn.execute("SELECT id FROM skiplock.jobs")) == sorted(ids)


def test_enqueue_priority_and_max_attempts_are_stored(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, priority=7, max_attempts=9)
    row = job_row(conn, job_id)
    assert (row["priority"], row["max_attempts"]) == (7, 9)
    queue.enqueue_many("g", [{}, {}], priority=-3, max_attempts=2)
    assert conn.execute(
        "SELECT DISTINCT priority, max_attempts FROM skiplock.jobs WHERE flow = 'g'").fetchall() == [(-3, 2)]
    _, jobs = queue.claim("f", "w", 1)
    assert jobs[0].max_attempts == 9


@pytest.mark.parametrize("bad", [{"priority": 40000}, {"priority": 1.5}, {"max_attempts": 0},
                                 {"delay": -1}, {"delay": float("nan")}, {"run_id": ""}])
def test_enqueue_rejects_bad_options(queue: Queue, conn: psycopg.Connection, bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        queue.enqueue("f", {}, **bad)
    with pytest.raises(ValidationError):
        queue.enqueue_many("f", [{}], **bad)
    assert count(conn, "jobs") == 0


def test_enqueue_delay_is_not_claimable_until_due(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, delay=60)
    assert job_row(conn, job_id)["due_in"] == pytest.approx(60, abs=2)
    assert queue.claim("f", "w", 10)[1] == []
    make_due(conn, job_id)
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [job_id]


def test_enqueue_many_short_delay_becomes_claimable(queue: Queue, conn: psycopg.Connection) -> None:
    started = time.monotonic()
    queue.enqueue_many("f", [{"i": i} for i in range(3)], delay=0.3)
    due = [r[0] for r in conn.execute("SELECT extract(epoch FROM run_at - created_at)::float8 FROM skiplock.jobs")]
    assert due == pytest.approx([0.3] * 3, abs=0.05)
    assert queue.claim("f", "w", 10)[1] == []
    claimed: list[Any] = []
    while not claimed and time.monotonic() - started < 3:
        time.sleep(0.02)
        claimed = queue.claim("f", "w", 10)[1]
    assert len(claimed) == 3
    assert time.monotonic() - started >= 0.25


def test_enqueue_run_at(queue: Queue, conn: psycopg.Connection) -> None:
    when = datetime.now(timezone.utc) + timedelta(hours=1)
    job_id = queue.enqueue("f", {}, run_at=when)
    stored = one(conn, "SELECT run_at FROM skiplock.jobs WHERE id = %s", (job_id,))
    assert abs((stored - when).total_seconds()) < 1
    queue.enqueue_many("f", [{}, {}], run_at=when)
    assert count(conn, "jobs", "run_at > now() + interval '59 minutes'") == 3
    assert queue.claim("f", "w", 10)[1] == []
    past = queue.enqueue("f", {}, run_at=datetime.now(timezone.utc) - timedelta(hours=1))
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [past]
    with pytest.raises(ValidationError, match="either delay or run_at"):
        queue.enqueue("f", {}, run_at=when, delay=5)
    with pytest.raises(ValidationError, match="timezone"):
        queue.enqueue("f", {}, run_at=datetime.now())


def test_run_id_counts_inserted_jobs(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue("f", {}, run_id="nightly")
    assert one(conn, "SELECT total FROM skiplock.runs WHERE id = 'nightly'") == 1
    queue.enqueue_many("f", [{}] * 5, run_id="nightly")
    assert conn.execute("SELECT flow, total, completed, dead, finished_at FROM skiplock.runs").fetchall() == [
        ("f", 6, 0, 0, None)]
    # With dedupe keys only the inserted jobs count.
    result = queue.enqueue_many("f", [{}, {}, {}], run_id="nightly", dedupe_keys=["a", "a", "b"])
    assert (result.inserted, result.skipped) == (2, 1)
    assert one(conn, "SELECT total FROM skiplock.runs WHERE id = 'nightly'") == 8
    assert count(conn, "jobs", "run_id = 'nightly'") == 8
    _, jobs = queue.claim("f", "w", 1)
    assert jobs[0].run_id == "nightly"


def test_dedupe_key_while_unfinished_then_allowed_after_completion(queue: Queue, conn: psycopg.Connection) -> None:
    first = queue.enqueue("f", {"v": 1}, dedupe_key="order-1")
    assert first is not None
    assert queue.enqueue("f", {"v": 2}, dedupe_key="order-1") is None
    assert queue.enqueue("other", {"v": 2}, dedupe_key="order-1") is not None  # keys are per flow
    result = queue.enqueue_many("f", [{"v": 3}, {"v": 4}], dedupe_keys=["order-1", "order-2"])
    assert (result.inserted, result.skipped) == (1, 1)
    token, jobs = queue.claim("f", "w", 1)
    assert [j.id for j in jobs] == [first]
    assert queue.enqueue("f", {"v": 5}, dedupe_key="order-1") is None  # still running
    assert queue.ack("w", token, [first]).completed == 1
    again = queue.enqueue("f", {"v": 6}, dedupe_key="order-1")
    assert again is not None and again != first
    assert count(conn, "jobs", "flow = 'f' AND dedupe_key = 'order-1'") == 1
    assert one(conn, "SELECT payload FROM skiplock.jobs WHERE id = %s", (again,)) == {"v": 6}


def test_dedupe_key_allowed_again_after_job_died(queue: Queue, conn: psycopg.Connection) -> None:
    first = queue.enqueue("f", {}, dedupe_key="k")
    assert first is not None
    kill(queue, conn, first)
    assert queue.enqueue("f", {}, dedupe_key="k") is not None


def test_enqueue_many_dedupe_key_count_must_match(queue: Queue, conn: psycopg.Connection) -> None:
    with pytest.raises(ValidationError, match="2 dedupe keys for 3 payloads"):
        queue.enqueue_many("f", [{}, {}, {}], dedupe_keys=["a", "b"])
    assert count(conn, "jobs") == 0


def test_bulk_enqueue_100k_in_one_call(queue: Queue, conn: psycopg.Connection) -> None:
    payloads = [{"i": i, "name": f"record-{i}"} for i in range(100_000)]
    started = time.perf_counter()
    result = queue.enqueue_many("bulk", payloads, run_id="load")
    elapsed = time.perf_counter() - started
    print(f"\nenqueue_many: 100,000 jobs in {elapsed:.2f} s ({100_000 / elapsed:,.0f} jobs/s)")
    assert (result.inserted, result.skipped) == (100_000, 0)
    assert conn.execute(
        "SELECT count(*), count(DISTINCT id), min((payload->>'i')::int), max((payload->>'i')::int)"
        " FROM skiplock.jobs WHERE flow = 'bulk' AND status = 'pending'").fetchone() == (100_000, 100_000, 0, 99_999)
    assert one(conn, "SELECT total FROM skiplock.runs WHERE id = 'load'") == 100_000


@pytest.mark.parametrize(
    ("payloads", "dedupe_keys", "fragment"),
    [
        ([{}, {}, {}, [1, 2]], None, "item 3: payload must be a JSON object"),
        ([{}, {}, {"x": object()}, {}], None, "item 2: payload is not JSON-serialisable"),
        ([{}, {1: "int key"}], None, "item 1: payload is not JSON-serialisable"),
        ([{}, {"nul": "a\x00b"}], None, "item 1: payload contains a NUL"),
        ([{}, {}, {}, {}], ["a", "b", "c", ""], "item 3: dedupe key"),
        ([{}, {}, {}], ["a", "b\nc", "d"], "item 1: dedupe key"),
    ],
)
def test_enqueue_many_bad_item_inserts_nothing_and_names_it(
    queue: Queue, conn: psycopg.Connection, payloads: list[Any], dedupe_keys: list[str] | None, fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        queue.enqueue_many("f", payloads, dedupe_keys=dedupe_keys, run_id="r")
    assert fragment in str(info.value)
    assert count(conn, "jobs") == 0
    assert count(conn, "runs") == 0


def test_enqueue_many_uses_item_names(queue: Queue, conn: psycopg.Connection) -> None:
    names = ["row A1", "row A2", "row A3"]
    with pytest.raises(ValidationError, match=r"^row A3: payload must be a JSON object, got str"):
        queue.enqueue_many("f", [{}, {}, "not an object"], item_names=names)
    with pytest.raises(ValidationError, match=r"^row A2: dedupe key"):
        queue.enqueue_many("f", [{}, {}, {}], dedupe_keys=["a", "x" * 300, "c"], item_names=names)
    assert count(conn, "jobs") == 0


def test_enqueue_one_bad_payload(queue: Queue, conn: psycopg.Connection) -> None:
    with pytest.raises(ValidationError, match="payload must be a JSON object, got list"):
        queue.enqueue("f", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not JSON-serialisable"):
        queue.enqueue("f", {"when": {1, 2}})
    with pytest.raises(ValidationError, match="dedupe key"):
        queue.enqueue("f", {}, dedupe_key="")
    assert count(conn, "jobs") == 0


@pytest.mark.parametrize("name", ["bad name!", "", "x" * 64, "-leading-dash", "a/b", 123, None])
def test_invalid_flow_names_are_rejected(queue: Queue, conn: psycopg.Connection, name: Any) -> None:
    for call in (lambda: queue.enqueue(name, {}), lambda: queue.enqueue_many(name, [{}]),
                 lambda: queue.claim(name, "w", 1), lambda: queue.pause(name)):
        with pytest.raises(ValidationError) as info:
            call()
        assert repr(name) in str(info.value)
    assert count(conn, "jobs") == 0 and count(conn, "flows") == len(FLOWS)


def test_valid_flow_name_edge_cases(queue: Queue, conn: psycopg.Connection) -> None:
    longest = "a" * 63
    for name in (longest, "0", "billing.v2-export_daily"):
        assert queue.enqueue(name, {}, allow_unknown_flow=True) is not None
    assert count(conn, "jobs") == 3


# ---------------------------------------------------------------------------------------------
# 2. claim


def test_claim_priority_then_fifo(queue: Queue, conn: psycopg.Connection) -> None:
    low = queue.enqueue("f", {"n": "low"}, priority=0)
    high_1 = queue.enqueue("f", {"n": "high-1"}, priority=10)
    mid = queue.enqueue("f", {"n": "mid"}, priority=5)
    high_2 = queue.enqueue("f", {"n": "high-2"}, priority=10)
    low_earlier = queue.enqueue("f", {"n": "low-earlier"}, priority=0)
    # FIFO is by run_at, then id: a later-inserted job with an earlier run_at goes first.
    conn.execute("UPDATE skiplock.jobs SET run_at = now() - interval '1 minute' WHERE id = %s", (low_earlier,))
    conn.execute("UPDATE skiplock.jobs SET run_at = now() - interval '2 minutes' WHERE id = %s", (high_1,))
    conn.execute("UPDATE skiplock.jobs SET run_at = now() - interval '3 minutes' WHERE id = %s", (high_2,))
    same_time = queue.enqueue("f", {"n": "same-time"}, priority=5)
    conn.execute("UPDATE skiplock.jobs SET run_at = (SELECT run_at FROM skiplock.jobs WHERE id = %s) WHERE id = %s",
                 (mid, same_time))
    order = []
    while True:
        _, jobs = queue.claim("f", "w", 1)
        if not jobs:
            break
        order.append(jobs[0].id)
    assert order == [high_2, high_1, mid, same_time, low_earlier, low]


def test_claim_respects_limit_and_flow(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue_many("f", [{"i": i} for i in range(10)])
    other = queue.enqueue("g", {})
    token, jobs = queue.claim("f", "w", 3)
    assert len(jobs) == 3 and other not in [j.id for j in jobs]
    assert count(conn, "jobs", "status = 'running'") == 3
    _, rest = queue.claim("f", "w2", 100)
    assert len(rest) == 7 and not {j.id for j in rest} & {j.id for j in jobs}
    assert queue.claim("f", "w3", 100)[1] == []
    assert [j.id for j in queue.claim("g", "w", 100)[1]] == [other]


def test_claim_only_due_jobs(queue: Queue, conn: psycopg.Connection) -> None:
    due = queue.enqueue("f", {})
    queue.enqueue("f", {}, delay=3600)
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [due]
    assert count(conn, "jobs", "status = 'pending'") == 1


def test_paused_flow_claims_nothing_until_resumed(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {})
    queue.enqueue("g", {})
    queue.pause("f")
    assert one(conn, "SELECT paused FROM skiplock.flows WHERE name = 'f'") is True
    assert queue.claim("f", "w", 10)[1] == []
    assert len(queue.claim("g", "w", 10)[1]) == 1  # other flows are unaffected
    assert job_row(conn, job_id)["status"] == "pending"
    queue.resume("f")
    assert one(conn, "SELECT paused FROM skiplock.flows WHERE name = 'f'") is False
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [job_id]
    assert [f["name"] for f in queue.flows()] == sorted(FLOWS)


def test_pause_sends_flow_event(queue: Queue, dsn: str) -> None:
    from engine.telemetry import EVENTS_CHANNEL

    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        queue.pause("f")
        queue.resume("f")
        got = [orjson.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
    assert [(e["kind"], e["flow"]) for e in got] == [("flow_paused", "f"), ("flow_resumed", "f")]


def test_open_circuit_claims_nothing(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {})
    conn.execute("UPDATE skiplock.flows SET circuit_state = 'open', circuit_until = now() + interval '1 hour'")
    assert queue.claim("f", "w", 10)[1] == []
    assert job_row(conn, job_id)["attempts"] == 0
    # an open circuit whose time is up lets the claim through (half-open probing is the worker's job)
    conn.execute("UPDATE skiplock.flows SET circuit_until = now() - interval '1 second'")
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [job_id]


def test_claim_stamps_the_row(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {"a": 1}, max_attempts=4, run_id="r")
    conn.execute("UPDATE skiplock.jobs SET run_at = now() - interval '2 seconds' WHERE id = %s", (job_id,))
    token, jobs = queue.claim("f", "worker-7", 10)
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.id, job.payload, job.attempts, job.max_attempts, job.run_id) == (job_id, {"a": 1}, 1, 4, "r")
    assert 1500 <= job.wait_ms < 60_000
    row = job_row(conn, job_id)
    assert (row["status"], row["claimed_by"], row["claim_token"], row["attempts"]) == ("running", "worker-7", token, 1)
    assert one(conn, "SELECT now() - claimed_at < interval '5 seconds' FROM skiplock.jobs WHERE id = %s", (job_id,))
    assert queue.claim("f", "worker-8", 10)[1] == []


def test_hot_path_claim_and_ack_on_plain_connection(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO skiplock.jobs (flow, payload) SELECT 'f', jsonb_build_object('i', g)"
                 " FROM generate_series(1, 5) g")
    token = new_claim_token()
    rows = claim_batch(conn, "f", "w", 10, token)
    assert len(rows) == 5 and all(len(r) == 6 for r in rows)
    result = ack_batch(conn, "w", token, [r[0] for r in rows])  # results=None: no results stored
    assert result == AckResult(5, 0, [], [], 0)
    assert count(conn, "jobs") == 0
    assert count(conn, "jobs_done", "result IS NULL") == 5


# ---------------------------------------------------------------------------------------------
# 3. ack


def test_ack_completed_moves_to_jobs_done_with_result(queue: Queue, conn: psycopg.Connection) -> None:
    assert queue.enqueue_many("f", [{"i": i} for i in range(3)]).inserted == 3
    token, jobs = queue.claim("f", "w", 10)
    ordered = sorted(jobs, key=lambda j: j.payload["i"])
    results = [{"ok": True, "text": TRICKY}, None, [1, "two"]]
    outcome = queue.ack("w", token, [j.id for j in ordered], results)
    assert outcome == AckResult(completed=3, retried=0, dead_ids=[], finished_runs=[], refused=0)
    assert count(conn, "jobs") == 0
    done = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, result, payload, attempts, claimed_by, finished_at IS NOT NULL FROM skiplock.jobs_done")}
    assert done == {j.id: (r, j.payload, 1, "w", True) for j, r in zip(ordered, results)}
    job = queue.job(ordered[0].id)
    assert job is not None and job.status == "completed" and job.result == results[0] and job.payload == {"i": 0}


def test_transient_failure_goes_back_to_pending_with_history(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, max_attempts=3)
    token, _ = queue.claim("f", "w1", 1)
    outcome = queue.ack("w1", token, [], failures=[fail(job_id, delay=30, message="db timeout")])
    assert outcome == AckResult(0, 1, [], [], 0)
    row = job_row(conn, job_id)
    assert (row["status"], row["attempts"], row["claimed_by"], row["claim_token"]) == ("pending", 1, None, None)
    assert row["due_in"] == pytest.approx(30, abs=2)
    assert (row["error_type"], row["error_message"], row["finished_at"]) == ("ValueError", "db timeout", None)
    [entry] = row["errors"]
    assert entry["attempt"] == 1 and entry["type"] == "ValueError" and entry["message"] == "db timeout"
    assert entry["traceback"].startswith("Traceback") and entry["worker"] == "w1" and entry["permanent"] is False
    assert entry["at"]
    # second attempt appends, keeps the first
    make_due(conn, job_id)
    token, jobs = queue.claim("f", "w2", 1)
    assert jobs[0].attempts == 2
    queue.ack("w2", token, [], failures=[fail(job_id, delay=30, error_type="KeyError", message="again")])
    errors = job_row(conn, job_id)["errors"]
    assert [(e["attempt"], e["type"], e["message"], e["worker"]) for e in errors] == [
        (1, "ValueError", "db timeout", "w1"), (2, "KeyError", "again", "w2")]


def test_permanent_failure_goes_dead(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, max_attempts=5)
    token, _ = queue.claim("f", "w", 1)
    outcome = queue.ack("w", token, [], failures=[fail(job_id, permanent=True, error_type="PermanentError")])
    assert outcome == AckResult(0, 0, [job_id], [], 0)
    row = job_row(conn, job_id)
    assert (row["status"], row["attempts"], row["error_type"], row["claimed_by"]) == ("dead", 1, "PermanentError", None)
    assert row["finished_at"] is not None and row["errors"][0]["permanent"] is True
    make_due(conn, job_id)
    assert queue.claim("f", "w", 1)[1] == []


def test_attempts_used_up_goes_dead(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {}, max_attempts=2)
    token, _ = queue.claim("f", "w", 1)
    assert queue.ack("w", token, [], failures=[fail(job_id)]).retried == 1
    make_due(conn, job_id)
    token, jobs = queue.claim("f", "w", 1)
    assert jobs[0].attempts == 2
    outcome = queue.ack("w", token, [], failures=[fail(job_id, delay=1)])
    assert (outcome.retried, outcome.dead_ids) == (0, [job_id])
    row = job_row(conn, job_id)
    assert (row["status"], row["attempts"], len(row["errors"])) == ("dead", 2, 2)
    assert row["finished_at"] is not None


def test_ack_result_counts_a_mixed_batch(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue_many("f", [{"i": i} for i in range(4)])
    token, jobs = queue.claim("f", "w", 4)
    foreign = queue.enqueue("f", {"i": "foreign"})
    _, foreign_jobs = queue.claim("f", "other", 1)
    assert [j.id for j in foreign_jobs] == [foreign]
    a, b, c, d = sorted(j.id for j in jobs)
    outcome = queue.ack("w", token, [a, b, foreign], failures=[fail(c, delay=5), fail(d, permanent=True)])
    assert outcome == AckResult(completed=2, retried=1, dead_ids=[d], finished_runs=[], refused=1)
    states = dict(conn.execute("SELECT id, status::text FROM skiplock.jobs").fetchall())
    assert states == {c: "pending", d: "dead", foreign: "running"}
    assert sorted(r[0] for r in conn.execute("SELECT id FROM skiplock.jobs_done")) == [a, b]


def test_ack_is_fenced_by_worker_and_token(queue: Queue, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue("f", {})
    token, _ = queue.claim("f", "w", 1)
    before = snapshot(conn, job_id)
    for worker, tok in (("intruder", token), ("w", token + 1 if token < 2**62 else token - 1)):
        assert queue.ack(worker, tok, [job_id], [{"x": 1}]) == AckResult(0, 0, [], [], 1)
        assert queue.ack(worker, tok, [], failures=[fail(job_id, permanent=True)]) == AckResult(0, 0, [], [], 1)
        assert queue.ack(worker, tok, [], failures=[fail(job_id)]).refused == 1
        assert queue.release(worker, tok, [job_id]) == 0
    assert snapshot(conn, job_id) == before
    assert count(conn, "jobs_done") == 0
    assert queue.ack("w", token, [job_id]).completed == 1
    # a second ack of the same job finds nothing left to change
    assert queue.ack("w", token, [job_id]) == AckResult(0, 0, [], [], 1)
    assert count(conn, "jobs_done") == 1


def test_late_ack_after_rescue_and_reclaim_changes_nothing(queue: Queue, conn: psycopg.Connection) -> None:
    register_worker(conn, "A")
    register_worker(conn, "B")
    job_id = queue.enqueue("f", {"v": 1}, max_attempts=3)
    token_a, jobs = queue.claim("f", "A", 10)
    assert [j.id for j in jobs] == [job_id]
    make_stale(conn, "A")
    rescued = queue.rescue(stale_after=STALE)
    assert rescued.lost_workers == ["A"] and rescued.rescued_by_flow == {"f": 1}
    # A is lost: its heartbeat no longer revives it
    assert conn.execute(Q.worker_report, {"id": "A", "state": "busy", "counters": Jsonb({}),
                                             "pool": Jsonb({})}).fetchone() is None
    token_b, jobs = queue.claim("f", "B", 10)
    assert [(j.id, j.attempts) for j in jobs] == [(job_id, 2)]
    before = snapshot(conn, job_id)
    assert queue.ack("A", token_a, [job_id], [{"from": "A"}]) == AckResult(0, 0, [], [], 1)
    assert queue.ack("A", token_a, [], failures=[fail(job_id, permanent=True)]).refused == 1
    assert queue.release("A", token_a, [job_id]) == 0
    assert snapshot(conn, job_id) == before
    assert (before["status"], before["claimed_by"], before["claim_token"]) == ("running", "B", token_b)
    assert count(conn, "jobs_done") == 0
    assert queue.ack("B", token_b, [job_id], [{"from": "B"}]) == AckResult(1, 0, [], [], 0)
    assert conn.execute("SELECT id, claimed_by, attempts, result FROM skiplock.jobs_done").fetchall() == [
        (job_id, "B", 2, {"from": "B"})]
    assert count(conn, "jobs") == 0


# ---------------------------------------------------------------------------------------------
# 4. backoff timing


def test_backoff_delay_holds_the_job_until_due(queue: Queue, conn: psycopg.Connection) -> None:
    delay = 0.4
    job_id = queue.enqueue("f", {})
    token, _ = queue.claim("f", "w", 1)
    acked_at = time.monotonic()
    assert queue.ack("w", token, [], failures=[fail(job_id, delay=delay)]).retried == 1
    # run_at and updated_at both come from the ack's now(): their difference is exactly the delay
    assert one(conn, "SELECT extract(epoch FROM run_at - updated_at)::float8 FROM skiplock.jobs") == pytest.approx(
        delay, abs=0.001)
    assert 0 < job_row(conn, job_id)["due_in"] <= delay
    assert queue.claim("f", "w", 1)[1] == []
    claimed: list[Any] = []
    while not claimed and time.monotonic() - acked_at < 3:
        time.sleep(0.02)
        claimed = queue.claim("f", "w", 1)[1]
    waited = time.monotonic() - acked_at
    assert [j.id for j in claimed] == [job_id]
    assert delay - 0.05 <= waited < delay + 1.0
    assert claimed[0].attempts == 2


# ---------------------------------------------------------------------------------------------
# 5. release


def test_release_unclaims_without_burning_an_attempt(queue: Queue, conn: psycopg.Connection) -> None:
    fresh = queue.enqueue("f", {"n": "fresh"})
    retried = queue.enqueue("f", {"n": "retried"})
    token, _ = queue.claim("f", "w", 10)
    queue.ack("w", token, [fresh], failures=[fail(retried)])  # fresh completes; retried has 1 attempt used
    fresh_2 = queue.enqueue("f", {"n": "fresh-2"})
    make_due(conn, retried)
    token, jobs = queue.claim("f", "w", 10)
    assert {j.id: j.attempts for j in jobs} == {retried: 2, fresh_2: 1}
    assert queue.release("other", token, [retried, fresh_2]) == 0
    assert queue.release("w", token + 1, [retried, fresh_2]) == 0
    assert count(conn, "jobs", "status = 'running'") == 2
    assert queue.release("w", token, [retried, fresh_2, 999_999]) == 2
    rows = {r[0]: r[1:] for r in conn.execute(
        "SELECT id, status::text, attempts, claimed_by, claim_token, claimed_at FROM skiplock.jobs")}
    assert rows == {retried: ("pending", 1, None, None, None), fresh_2: ("pending", 0, None, None, None)}
    # released jobs are claimable at once; the late ack of the releasing claim changes nothing
    token_2, jobs = queue.claim("f", "w2", 10)
    assert {j.id: j.attempts for j in jobs} == {retried: 2, fresh_2: 1}
    assert queue.ack("w", token, [retried]).refused == 1
    assert queue.ack("w2", token_2, [retried, fresh_2]).completed == 2


# ---------------------------------------------------------------------------------------------
# 6. rescue


def test_rescue_stale_workers_and_unknown_holders(queue: Queue, conn: psycopg.Connection) -> None:
    register_worker(conn, "stale")
    register_worker(conn, "live")
    register_worker(conn, "stopping")
    j_stale = queue.enqueue("f", {"n": 1}, max_attempts=3)
    j_stale_last = queue.enqueue("f", {"n": 2}, max_attempts=1)
    _, jobs = queue.claim("f", "stale", 10)
    assert sorted(j.id for j in jobs) == sorted([j_stale, j_stale_last])
    j_live = queue.enqueue("f", {"n": 3})
    queue.claim("f", "live", 10)
    # a long job of a worker that keeps heartbeating is not rescued, however old its claim
    conn.execute("UPDATE skiplock.jobs SET claimed_at = now() - interval '1 hour' WHERE id = %s", (j_live,))
    j_ghost_old = queue.enqueue("g", {"n": 4})
    queue.claim("g", "ghost-old", 10)
    conn.execute("UPDATE skiplock.jobs SET claimed_at = now() - interval '1 hour' WHERE id = %s", (j_ghost_old,))
    j_ghost_new = queue.enqueue("g", {"n": 5})
    queue.claim("g", "ghost-new", 10)
    j_stopped = queue.enqueue("g", {"n": 6})
    queue.claim("g", "stopping", 10)
    conn.execute(Q.worker_stopped, {"id": "stopping"})
    make_stale(conn, "stale")

    result = queue.rescue(stale_after=STALE)

    assert result.lost_workers == ["stale"]
    assert result.rescued_by_flow == {"f": 1, "g": 2}
    assert result.dead_by_flow == {"f": 1}
    assert (result.rescued, result.dead) == (3, 1)
    workers = dict(conn.execute("SELECT id, state FROM skiplock.workers").fetchall())
    assert workers == {"stale": "lost", "live": "busy", "stopping": "stopped"}
    assert one(conn, "SELECT stopped_at IS NOT NULL FROM skiplock.workers WHERE id = 'stale'")

    row = job_row(conn, j_stale)
    assert (row["status"], row["attempts"], row["claimed_by"], row["claim_token"]) == ("pending", 1, None, None)
    assert row["error_type"] == "WorkerLost" and "stale" in row["error_message"]
    [entry] = row["errors"]
    assert (entry["type"], entry["attempt"], entry["worker"], entry["permanent"]) == ("WorkerLost", 1, "stale", False)
    assert row["due_in"] <= 0

    row = job_row(conn, j_stale_last)
    assert (row["status"], row["error_type"]) == ("dead", "WorkerLost") and row["finished_at"] is not None
    assert row["errors"][-1]["type"] == "WorkerLost"

    for job_id in (j_ghost_old, j_stopped):
        row = job_row(conn, job_id)
        assert (row["status"], row["errors"][-1]["type"]) == ("pending", "WorkerLost")
    for job_id, holder in ((j_live, "live"), (j_ghost_new, "ghost-new")):
        row = job_row(conn, job_id)
        assert (row["status"], row["claimed_by"], row["errors"]) == ("running", holder, [])

    again = queue.rescue(stale_after=STALE)
    assert (again.lost_workers, again.rescued, again.dead) == ([], 0, 0)


def test_rescue_works_in_slices(queue: Queue, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RESCUE_SLICE", 3)
    register_worker(conn, "w")
    queue.enqueue_many("f", [{}] * 7)
    queue.enqueue_many("g", [{}] * 2)
    queue.claim("f", "w", 100)
    queue.claim("g", "w", 100)
    make_stale(conn, "w")
    result = queue.rescue(stale_after=STALE)
    assert result.rescued_by_flow == {"f": 7, "g": 2}
    assert count(conn, "jobs", "status = 'pending'") == 9


def test_rescue_notifies_workers(queue: Queue, conn: psycopg.Connection, dsn: str) -> None:
    queue.enqueue("f", {})
    queue.claim("f", "nobody-knows", 1)
    conn.execute("UPDATE skiplock.jobs SET claimed_at = now() - interval '1 hour'")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN skiplock_enqueued")
        assert queue.rescue(stale_after=STALE).rescued == 1
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1


# ---------------------------------------------------------------------------------------------
# 7. the seeds' maintenance calls


def test_cleanup_orphaned_records(queue: Queue, conn: psycopg.Connection) -> None:
    old = queue.enqueue("f", {"n": "old"})
    new = queue.enqueue("f", {"n": "new"})
    token, _ = queue.claim("f", "w", 10)
    conn.execute("UPDATE skiplock.jobs SET claimed_at = now() - interval '2 hours' WHERE id = %s", (old,))
    assert queue.cleanup_orphaned_records(timeout_hours=3) == 0
    assert queue.cleanup_orphaned_records(timeout_hours=1.5) == 1
    row = job_row(conn, old)
    assert (row["status"], row["claimed_by"], row["claim_token"], row["claimed_at"]) == ("pending", None, None, None)
    assert row["attempts"] == 1  # the attempt it used stays counted (the seeds' retry_count += 1)
    assert job_row(conn, new)["status"] == "running"
    assert queue.ack("w", token, [old, new]) == AckResult(1, 0, [], [], 1)  # the old claim is fenced off
    assert queue.cleanup_orphaned_records() == 0


def test_reset_failed_records(queue: Queue, conn: psycopg.Connection) -> None:
    early = queue.enqueue("f", {"n": "early"}, max_attempts=5)
    late = queue.enqueue("f", {"n": "late"}, max_attempts=5)
    used_up = queue.enqueue("f", {"n": "used up"}, max_attempts=1)
    other_flow = queue.enqueue("g", {"n": "other flow"})
    pending = queue.enqueue("f", {"n": "pending"})
    for job_id in (early, late, used_up, other_flow):
        kill(queue, conn, job_id)
    conn.execute("UPDATE skiplock.jobs SET attempts = 3 WHERE id = %s", (late,))
    assert queue.reset_failed_records("f", max_retries=3) == 1
    states = dict(conn.execute("SELECT id, status::text FROM skiplock.jobs").fetchall())
    assert states == {early: "pending", late: "dead", used_up: "dead", other_flow: "dead", pending: "pending"}
    row = job_row(conn, early)
    assert row["finished_at"] is None and row["due_in"] <= 0 and row["attempts"] == 1
    assert len(row["errors"]) == 1  # history kept
    assert queue.reset_failed_records("f", max_retries=4) == 1  # now `late` (3 < 4)
    assert job_row(conn, late)["status"] == "pending"
    assert queue.reset_failed_records("f", max_retries=10) == 0  # used_up has no attempts left
    with pytest.raises(ValidationError):
        queue.reset_failed_records("bad name!")


# ---------------------------------------------------------------------------------------------
# 8. runs


def test_run_finishes_exactly_once_including_dead_jobs(queue: Queue, conn: psycopg.Connection) -> None:
    assert queue.enqueue_many("f", [{"i": i} for i in range(3)], run_id="r").inserted == 3
    queue.enqueue("f", {"i": "outside the run"})
    token, jobs = queue.claim("f", "w", 10)
    by_i = {j.payload["i"]: j.id for j in jobs}
    assert queue.ack("w", token, [by_i[0]]).finished_runs == []
    outcome = queue.ack("w", token, [], failures=[fail(by_i[1], permanent=True)])
    assert (outcome.dead_ids, outcome.finished_runs) == ([by_i[1]], [])
    assert one(conn, "SELECT finished_at FROM skiplock.runs WHERE id = 'r'") is None
    outcome = queue.ack("w", token, [by_i[2], by_i["outside the run"]])
    assert (outcome.completed, outcome.finished_runs) == (2, ["r"])
    assert conn.execute("SELECT total, completed, dead, finished_at IS NOT NULL FROM skiplock.runs").fetchall() == [
        (3, 2, 1, True)]
    finished_at = one(conn, "SELECT finished_at FROM skiplock.runs WHERE id = 'r'")
    assert store.run_claim_hook(conn, "r", "first") is not None
    # the operator retries the dead job: the run reopens (issue 15), and finishes again after it;
    # its hook fired once already, and its flow does not ask for a repeat (on_complete_repeat)
    assert queue.retry_dead(queue_module.DeadLetterFilter(ids=[by_i[1]])) == [by_i[1]]
    assert conn.execute("SELECT dead, finished_at, reopened FROM skiplock.runs WHERE id = 'r'").fetchall() == [
        (0, None, 1)]
    token, jobs = queue.claim("f", "w", 10)
    assert queue.ack("w", token, [j.id for j in jobs]).finished_runs == ["r"]
    assert conn.execute("SELECT total, completed, dead, finished_at > %s FROM skiplock.runs", (finished_at,)).fetchall() == [
        (3, 3, 0, True)]
    assert store.run_claim_hook(conn, "r", "second") is None


def test_run_whose_last_job_dies_finishes(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue_many("f", [{"i": 0}, {"i": 1}], run_id="r2", max_attempts=1)
    queue.enqueue("f", {}, run_id="r3")
    token, jobs = queue.claim("f", "w", 10)
    by_i = {j.payload.get("i"): j.id for j in jobs}
    outcome = queue.ack("w", token, [by_i[0], by_i[None]], failures=[fail(by_i[1], delay=0)])
    assert outcome.dead_ids == [by_i[1]]
    assert sorted(outcome.finished_runs) == ["r2", "r3"]
    assert sorted(conn.execute("SELECT id, completed, dead FROM skiplock.runs").fetchall()) == [
        ("r2", 1, 1), ("r3", 1, 0)]


def test_concurrent_acks_finish_a_run_once(queue: Queue, conn: psycopg.Connection, dsn: str) -> None:
    queue.enqueue_many("f", [{}] * 40, run_id="big")
    token_a, jobs_a = queue.claim("f", "a", 20)
    token_b, jobs_b = queue.claim("f", "b", 20)
    with psycopg.connect(dsn, autocommit=True) as other:
        # b's ack waits on the run row that a's open transaction has updated
        conn.execute("BEGIN")
        first = ack_batch(conn, "a", token_a, [j.id for j in jobs_a])
        box: dict[str, AckResult] = {}
        thread = threading.Thread(target=lambda: box.setdefault("b", ack_batch(other, "b", token_b,
                                                                               [j.id for j in jobs_b])))
        thread.start()
        time.sleep(0.2)
        conn.execute("COMMIT")
        thread.join(10)
    assert first.finished_runs == [] and box["b"].finished_runs == ["big"]
    assert conn.execute("SELECT completed, dead, finished_at IS NOT NULL FROM skiplock.runs").fetchall() == [
        (40, 0, True)]


def test_rescue_that_kills_the_last_job_finishes_the_run(queue: Queue, conn: psycopg.Connection) -> None:
    register_worker(conn, "w")
    queue.enqueue_many("f", [{}, {}], run_id="r", max_attempts=1)
    token, jobs = queue.claim("f", "w", 10)
    queue.ack("w", token, [jobs[0].id])
    make_stale(conn, "w")
    assert queue.rescue(stale_after=STALE).dead == 1
    assert conn.execute("SELECT completed, dead, finished_at IS NOT NULL FROM skiplock.runs").fetchall() == [
        (1, 1, True)]


def test_reset_failed_keeps_run_progress_consistent(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue_many("f", [{}, {}], run_id="r")
    token, jobs = queue.claim("f", "w", 10)
    a, b = sorted(j.id for j in jobs)
    assert queue.ack("w", token, [a], failures=[fail(b, permanent=True)]).finished_runs == ["r"]
    assert queue.reset_failed_records("f") == 1
    assert one(conn, "SELECT dead FROM skiplock.runs WHERE id = 'r'") == 0
    token, _ = queue.claim("f", "w", 10)
    assert queue.ack("w", token, [b]).completed == 1
    assert conn.execute("SELECT total, completed, dead FROM skiplock.runs").fetchall() == [(2, 2, 0)]


# ---------------------------------------------------------------------------------------------
# 10. status and health


def test_get_queue_status_format_and_counts(queue: Queue, conn: psycopg.Connection) -> None:
    queue.enqueue_many("a", [{}] * 6)
    queue.enqueue("a", {}, delay=3600)
    queue.enqueue("b", {})
    token, jobs = queue.claim("a", "w", 4)
    ids = [j.id for j in jobs]
    queue.ack("w", token, ids[:2], failures=[fail(ids[2], permanent=True)])  # 2 completed, 1 dead, 1 running
    queue.pause("b")
    queue.pause("c")  # a paused flow with no jobs does not appear

    status = queue.get_queue_status()
    assert status == {
        "total_records": 8,
        "pending_records": 4,
        "scheduled_records": 1,
        "processing_records": 1,
        "completed_records": 2,
        "failed_records": 1,
        "cancelled_records": 0,
        "by_flow": {
            "a": {"pending": 3, "scheduled": 1, "processing": 1, "completed": 2, "failed": 1, "cancelled": 0,
                  "paused": False},
            "b": {"pending": 1, "scheduled": 0, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0,
                  "paused": True},
        },
    }
    seed_keys = {"total_records", "pending_records", "processing_records", "completed_records", "failed_records",
                 "by_flow"}
    assert seed_keys <= status.keys()
    assert all(isinstance(v, int) for k, v in status.items() if k != "by_flow")
    only_b = queue.get_queue_status("b")
    assert only_b["total_records"] == 1 and list(only_b["by_flow"]) == ["b"]
    # a flow that only has completed jobs is still listed
    token, jobs = queue.claim("b", "w", 10)
    assert jobs == []
    queue.resume("b")
    token, jobs = queue.claim("b", "w", 10)
    queue.ack("w", token, [j.id for j in jobs])
    assert queue.get_queue_status("b")["by_flow"] == {
        "b": {"pending": 0, "scheduled": 0, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0,
              "paused": False}}
    assert queue.get_queue_status("nothing-here") == {
        "total_records": 0, "pending_records": 0, "scheduled_records": 0, "processing_records": 0,
        "completed_records": 0, "failed_records": 0, "cancelled_records": 0, "by_flow": {}}


def test_health_check_healthy(queue: Queue, conn: psycopg.Connection) -> None:
    register_worker(conn, "w1")
    queue.enqueue_many("f", [{}] * 3)
    report = queue.health_check()
    assert report["status"] == "healthy", report["reasons"]
    assert report["reasons"] == []
    database = report["databases"]["skiplock"]
    assert database["status"] == "healthy" and database["connection"] is True
    assert isinstance(database["response_time_ms"], float) and database["response_time_ms"] >= 0
    assert report["schema"] == {"version": REQUIRED_SCHEMA_VERSION, "required": REQUIRED_SCHEMA_VERSION}
    assert report["workers"] == {"live": 1, "stale": 0, "lost": 0}
    assert report["queue_status"] == {"pending_records": 3, "processing_records": 0, "failed_records": 0,
                                      "completed_records": 0, "cancelled_records": 0, "total_records": 3}
    assert set(report["instance_info"]) == {"instance_id", "hostname"}
    datetime.strptime(report["timestamp"], "%Y-%m-%dT%H:%M:%SZ")


def test_health_check_degraded(queue: Queue, conn: psycopg.Connection) -> None:
    register_worker(conn, "w2")
    make_stale(conn, "w2")  # may wait for the server to be up 2 x STALE: w1 registers after it, fresh
    register_worker(conn, "w1")
    report = queue.health_check(stale_after=STALE)
    assert report["status"] == "degraded"
    assert report["workers"] == {"live": 1, "stale": 1, "lost": 0}  # each worker counted once
    assert any("stale" in reason for reason in report["reasons"])
    assert queue.health_check(stale_after=7200)["status"] == "healthy"
    slow = queue.health_check(stale_after=7200, slow_ms=-1)
    assert slow["status"] == "degraded" and any("answered in" in r for r in slow["reasons"])


def test_health_check_unreachable_database() -> None:
    started = time.monotonic()
    with Queue("host=/nonexistent-skiplock-dir port=5432 dbname=x user=x") as q:
        report = q.health_check()
        with pytest.raises(DatabaseUnavailable):
            q.enqueue("f", {})
    assert time.monotonic() - started < 5
    assert report["status"] == "unhealthy"
    assert report["databases"]["skiplock"]["connection"] is False
    assert report["schema"]["version"] is None
    assert any(r.startswith("database unreachable") for r in report["reasons"])


def test_health_check_old_schema(empty_dsn: str) -> None:
    with Queue(empty_dsn) as q:
        report = q.health_check()
    assert report["status"] == "unhealthy"
    assert report["databases"]["skiplock"]["connection"] is True
    assert report["schema"] == {"version": 0, "required": REQUIRED_SCHEMA_VERSION}
    assert any("engine migrate" in r for r in report["reasons"])

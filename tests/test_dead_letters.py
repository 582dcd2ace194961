"""Dead letters against a real PostgreSQL: list and filter, inspect, retry (guarded by state), purge,
analyze. Every state change is checked in SQL."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from engine.errors import ValidationError
from engine.queue import DeadLetterFilter, Failure, Queue
from support.postgres import register_flows



@pytest.fixture(autouse=True)
def registered_flows(dsn: str) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows(dsn, "a", "b", "f")


def one(conn: psycopg.Connection, sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def states(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT id, status::text FROM skiplock.jobs").fetchall())


def bury(queue: Queue, flow: str, error_type: str = "ValueError", message: str = "boom", *,
         payload: dict[str, Any] | None = None, run_id: str | None = None, dedupe_key: str | None = None) -> int:
    """Enqueue one job and drive it to dead through a real claim and a permanent failure."""
    job_id = queue.enqueue(flow, payload or {}, run_id=run_id, dedupe_key=dedupe_key, priority=32767)
    assert job_id is not None
    token, jobs = queue.claim(flow, "undertaker", 1)
    assert [j.id for j in jobs] == [job_id]
    failure = Failure(job_id, error_type, message, f"Traceback:\n  {error_type}: {message}", True, 0.0)
    assert queue.ack("undertaker", token, [], failures=[failure]).dead_ids == [job_id]
    return job_id


def age(conn: psycopg.Connection, job_id: int, interval: str = "3 days") -> None:
    conn.execute("UPDATE skiplock.jobs SET finished_at = now() - %s::interval WHERE id = %s", (interval, job_id))


@pytest.fixture
def graveyard(queue: Queue, conn: psycopg.Connection) -> dict[str, int]:
    """Four dead letters in two flows, one of them old, plus a pending and a running job."""
    jobs = {
        "a_value": bury(queue, "a", "ValueError", "bad value"),
        "a_value_old": bury(queue, "a", "ValueError", "old bad value"),
        "a_key": bury(queue, "a", "KeyError", "missing key"),
        "b_value": bury(queue, "b", "ValueError", "bad b"),
    }
    age(conn, jobs["a_value_old"])
    jobs["a_pending"] = queue.enqueue("a", {"alive": True}, priority=-1)  # type: ignore[assignment]
    jobs["b_running"] = queue.enqueue("b", {"alive": True}, priority=-1)  # type: ignore[assignment]
    queue.claim("b", "busy-worker", 1)
    assert states(conn)[jobs["b_running"]] == "running"
    return jobs


def ids_of(letters: list[Any]) -> list[int]:
    return sorted(d.id for d in letters)


def test_list_and_filters(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    g = graveyard
    dead = queue.dead_letters()
    assert ids_of(dead) == sorted([g["a_value"], g["a_value_old"], g["a_key"], g["b_value"]])
    assert dead[-1].id == g["a_value_old"]  # newest first: the aged one is last
    letter = next(d for d in dead if d.id == g["a_key"])
    assert (letter.flow, letter.error_type, letter.error_message, letter.attempts, letter.max_attempts) == (
        "a", "KeyError", "missing key", 1, 5)
    assert letter.finished_at is not None and letter.to_dict()["id"] == g["a_key"]

    assert ids_of(queue.dead_letters(DeadLetterFilter(flow="a"))) == sorted(
        [g["a_value"], g["a_value_old"], g["a_key"]])
    assert ids_of(queue.dead_letters(DeadLetterFilter(error_type="ValueError"))) == sorted(
        [g["a_value"], g["a_value_old"], g["b_value"]])
    assert ids_of(queue.dead_letters(DeadLetterFilter(flow="a", error_type="KeyError"))) == [g["a_key"]]
    assert ids_of(queue.dead_letters(DeadLetterFilter(older_than=86400))) == [g["a_value_old"]]
    assert ids_of(queue.dead_letters(DeadLetterFilter(older_than=86400, flow="b"))) == []
    assert ids_of(queue.dead_letters(DeadLetterFilter(ids=[g["b_value"], g["a_pending"]]))) == [g["b_value"]]
    assert queue.dead_letters(DeadLetterFilter(flow="nope")) == []
    assert len(queue.dead_letters(limit=2)) == 2


@pytest.mark.parametrize("bad", [DeadLetterFilter(flow="bad name!"), DeadLetterFilter(older_than=-1),
                                 DeadLetterFilter(older_than=float("inf"))])
def test_bad_filters_are_rejected(queue: Queue, conn: psycopg.Connection, bad: DeadLetterFilter) -> None:
    dead = bury(queue, "a")
    for call in (queue.dead_letters, queue.retry_dead, queue.purge_dead):
        with pytest.raises(ValidationError):
            call(bad)
    assert states(conn) == {dead: "dead"}


def test_job_shows_payload_and_every_attempt(queue: Queue, conn: psycopg.Connection) -> None:
    payload = {"customer": 42, "note": "tab\there \\ and ünïcode"}
    job_id = queue.enqueue("a", payload, max_attempts=3)
    assert job_id is not None
    for attempt in (1, 2, 3):
        conn.execute("UPDATE skiplock.jobs SET run_at = now() WHERE id = %s", (job_id,))
        token, jobs = queue.claim("a", f"w{attempt}", 1)
        assert [(j.id, j.attempts) for j in jobs] == [(job_id, attempt)]
        failure = Failure(job_id, f"Err{attempt}", f"failure {attempt}", f"Traceback {attempt}", False, 60.0)
        queue.ack(f"w{attempt}", token, [], failures=[failure])
    job = queue.job(job_id)
    assert job is not None
    assert (job.status, job.payload, job.attempts, job.max_attempts) == ("dead", payload, 3, 3)
    assert (job.error_type, job.error_message) == ("Err3", "failure 3")
    assert job.finished_at is not None and job.claimed_by is None and job.result is None
    assert [(e["attempt"], e["type"], e["message"], e["traceback"], e["worker"]) for e in job.errors] == [
        (n, f"Err{n}", f"failure {n}", f"Traceback {n}", f"w{n}") for n in (1, 2, 3)]
    assert set(job.to_dict()) >= {"id", "payload", "errors", "status"}
    assert queue.job(10**12) is None


def test_retry_one(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    target = graveyard["a_key"]
    assert queue.retry_dead(DeadLetterFilter(ids=[target])) == [target]
    row = conn.execute("SELECT status::text, attempts, finished_at, run_at <= now(), jsonb_array_length(errors)"
                       " FROM skiplock.jobs WHERE id = %s", (target,)).fetchone()
    assert row == ("pending", 0, None, True, 1)  # attempts restart, history is kept
    assert sorted(i for i, s in states(conn).items() if s == "dead") == sorted(
        [graveyard["a_value"], graveyard["a_value_old"], graveyard["b_value"]])
    token, jobs = queue.claim("a", "w", 10)
    assert {j.id: j.attempts for j in jobs} == {target: 1, graveyard["a_pending"]: 1}


def test_retry_many_and_by_filter(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    g = graveyard
    assert queue.retry_dead(DeadLetterFilter(ids=[g["a_value"], g["b_value"]])) == sorted([g["a_value"], g["b_value"]])
    assert queue.retry_dead(DeadLetterFilter(flow="a", error_type="ValueError")) == [g["a_value_old"]]
    assert [i for i, s in states(conn).items() if s == "dead"] == [g["a_key"]]
    assert queue.retry_dead(DeadLetterFilter(older_than=3600)) == []
    assert queue.retry_dead(DeadLetterFilter(flow="a")) == [g["a_key"]]
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'dead'") == 0


def test_retry_by_age(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    assert queue.retry_dead(DeadLetterFilter(older_than=86400)) == [graveyard["a_value_old"]]
    assert states(conn)[graveyard["a_value_old"]] == "pending"
    assert one(conn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'dead'") == 3


def test_retry_of_a_job_no_longer_dead_does_nothing(
    queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]
) -> None:
    g = graveyard
    target = g["a_key"]
    assert queue.retry_dead(DeadLetterFilter(ids=[target])) == [target]
    # a second operator retries the same job: it is pending already, nothing changes
    before = conn.execute("SELECT * FROM skiplock.jobs ORDER BY id").fetchall()
    assert queue.retry_dead(DeadLetterFilter(ids=[target])) == []
    assert conn.execute("SELECT * FROM skiplock.jobs ORDER BY id").fetchall() == before
    # now it is running: a retry must not pull it from under its worker
    token, jobs = queue.claim("a", "w", 10)
    assert target in [j.id for j in jobs]
    running = conn.execute("SELECT status::text, claimed_by, claim_token, attempts FROM skiplock.jobs"
                           " WHERE id = %s", (target,)).fetchone()
    assert running == ("running", "w", token, 1)
    assert queue.retry_dead(DeadLetterFilter(ids=[target, g["b_running"], g["a_pending"]])) == []
    assert conn.execute("SELECT status::text, claimed_by, claim_token, attempts FROM skiplock.jobs"
                        " WHERE id = %s", (target,)).fetchone() == running
    # and completed: it is gone from the hot table, a retry does not resurrect it
    assert queue.ack("w", token, [target]).completed == 1
    assert queue.retry_dead(DeadLetterFilter(ids=[target])) == []
    assert target not in states(conn)
    assert one(conn, "SELECT count(*) FROM skiplock.jobs_done WHERE id = %s", (target,)) == 1


def test_retry_dead_with_empty_filter_raises(queue: Queue, conn: psycopg.Connection,
                                             graveyard: dict[str, int]) -> None:
    before = states(conn)
    with pytest.raises(ValidationError, match="needs job ids or a filter"):
        queue.retry_dead(DeadLetterFilter())
    with pytest.raises(ValidationError, match="needs job ids or a filter"):
        queue.purge_dead(DeadLetterFilter())
    assert states(conn) == before
    assert queue.retry_dead(DeadLetterFilter(ids=[])) == []  # explicit empty id list: nothing, not everything
    assert states(conn) == before


def test_retry_all_dead(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    g = graveyard
    assert queue.retry_all_dead() == sorted([g["a_value"], g["a_value_old"], g["a_key"], g["b_value"]])
    assert states(conn) == {g["a_value"]: "pending", g["a_value_old"]: "pending", g["a_key"]: "pending",
                            g["b_value"]: "pending", g["a_pending"]: "pending", g["b_running"]: "running"}
    assert queue.retry_all_dead() == []


def test_retry_notifies_workers(queue: Queue, dsn: str) -> None:
    dead = bury(queue, "a")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN skiplock_enqueued")
        assert queue.retry_dead(DeadLetterFilter(ids=[dead])) == [dead]
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1


def test_retry_skips_a_job_whose_dedupe_key_is_taken(queue: Queue, conn: psycopg.Connection) -> None:
    dead = bury(queue, "a", dedupe_key="invoice-7")
    live = queue.enqueue("a", {}, dedupe_key="invoice-7")
    assert live is not None
    assert queue.retry_dead(DeadLetterFilter(ids=[dead])) == []
    assert states(conn) == {dead: "dead", live: "pending"}


def test_retry_of_dead_jobs_sharing_a_dedupe_key(queue: Queue, conn: psycopg.Connection) -> None:
    # The key is free again once its job died, so a producer may enqueue (and lose) it twice.
    older = bury(queue, "a", dedupe_key="daily-2024-01-01")
    newer = bury(queue, "a", dedupe_key="daily-2024-01-01")
    other = bury(queue, "a", dedupe_key="daily-2024-01-02")
    assert queue.retry_all_dead() == sorted([newer, other])  # one per key: the newest
    assert states(conn) == {older: "dead", newer: "pending", other: "pending"}
    assert queue.reset_failed_records("a") == 0  # the key is taken by the retried job
    assert states(conn)[older] == "dead"


def test_retry_reopens_run_progress(queue: Queue, conn: psycopg.Connection) -> None:
    dead = bury(queue, "a", run_id="r")
    assert conn.execute("SELECT total, completed, dead, finished_at IS NOT NULL FROM skiplock.runs").fetchall() == [
        (1, 0, 1, True)]
    assert queue.retry_dead(DeadLetterFilter(flow="a")) == [dead]
    assert one(conn, "SELECT dead FROM skiplock.runs WHERE id = 'r'") == 0


def test_purge_by_id_removes_only_dead_rows(queue: Queue, conn: psycopg.Connection,
                                            graveyard: dict[str, int]) -> None:
    g = graveyard
    assert queue.purge_dead(DeadLetterFilter(ids=[g["a_key"], g["a_pending"], g["b_running"]])) == [g["a_key"]]
    assert states(conn) == {g["a_value"]: "dead", g["a_value_old"]: "dead", g["b_value"]: "dead",
                            g["a_pending"]: "pending", g["b_running"]: "running"}
    assert queue.job(g["a_key"]) is None
    assert queue.purge_dead(DeadLetterFilter(ids=[g["a_key"]])) == []


def test_purge_by_age(queue: Queue, conn: psycopg.Connection, graveyard: dict[str, int]) -> None:
    g = graveyard
    # pending and running rows have no finished_at; give one an old updated/created time for good measure
    conn.execute("UPDATE skiplock.jobs SET created_at = now() - interval '30 days' WHERE id = %s", (g["a_pending"],))
    assert queue.purge_dead(DeadLetterFilter(older_than=86400)) == [g["a_value_old"]]
    assert sorted(states(conn)) == sorted([g["a_value"], g["a_key"], g["b_value"], g["a_pending"], g["b_running"]])
    assert queue.purge_dead(DeadLetterFilter(older_than=86400)) == []
    assert queue.purge_dead(DeadLetterFilter(flow="b")) == [g["b_value"]]
    assert states(conn)[g["b_running"]] == "running"


def test_analyze_counts_by_flow_and_error_type(queue: Queue, conn: psycopg.Connection,
                                              graveyard: dict[str, int]) -> None:
    bury(queue, "a", "ValueError", "newest bad value")
    rows = queue.analyze_dead()
    assert [(r["flow"], r["error_type"], r["count"]) for r in rows] == [
        ("a", "ValueError", 3), ("a", "KeyError", 1), ("b", "ValueError", 1)]
    a_value = rows[0]
    assert a_value["sample_message"] == "newest bad value"
    assert a_value["first_at"] < a_value["last_at"]
    assert [(r["flow"], r["error_type"], r["count"]) for r in queue.analyze_dead("b")] == [("b", "ValueError", 1)]
    assert queue.analyze_dead("nothing-dead") == []
    with pytest.raises(ValidationError):
        queue.analyze_dead("bad name!")

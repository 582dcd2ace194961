"""Job control (issue 14): cancel (pending and scheduled now, running as a request), wait, the job
browser and its plans, the unknown-flow refusal, unserved flows in health. Python API and real
`engine` subprocesses, against the suite's PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import psycopg
import pytest

from engine.errors import JobCancelled, JobDead, JobNotFound, UnknownFlow, ValidationError, WaitTimeout
from engine.queue import Failure, JobFilter, Queue
from engine.sql import Q
from support.cli import engine, ok, one_line_error
from support.postgres import register_flows_for, scalar

FLOWS = ("f", "g", "emails")


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, *FLOWS)


def where_is(dsn: str, job_id: int) -> tuple[str, str] | None:
    """(table, status) of a job: the hot table or jobs_done."""
    hot = scalar(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job_id,))
    if hot is not None:
        return "jobs", hot
    done = scalar(dsn, "SELECT status FROM skiplock.jobs_done WHERE id = %s", (job_id,))
    return None if done is None else ("jobs_done", done)


def finish(queue: Queue, flow: str, ok_ids: int = 0, dead: bool = False) -> list[int]:
    """Claim everything due of `flow` and ack it: completed with {"n": id}, or dead (permanent)."""
    token, jobs = queue.claim(flow, "w-test", 1000)
    ids = [j.id for j in jobs]
    if dead:
        queue.ack("w-test", token, [], failures=[Failure(i, "Boom", "it broke", None, True, 0.0) for i in ids])
    else:
        queue.ack("w-test", token, ids, results=[{"n": i} for i in ids])
    return ids


def live_worker(dsn: str, worker_id: str, *flows: str) -> None:
    scalar(dsn, "INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state)"
                " VALUES (%s, 'e-1', 'h', 1, %s, 'idle') RETURNING 1", (worker_id, list(flows)))


# ---------------------------------------------------------------------------------------------
# cancel


def test_cancelled_pending_job_never_runs_and_is_kept_for_inspection(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {"x": 1}, dedupe_key="k1")
    other = queue.enqueue("f", {"x": 2})
    report = queue.cancel([job_id])
    assert report.cancelled == [job_id] and report.requested == [] and report.unchanged == {}
    assert where_is(dsn, job_id) == ("jobs_done", "cancelled")
    assert [j.id for j in queue.claim("f", "w", 10)[1]] == [other]  # never claimed
    job = queue.job(job_id)
    assert job is not None and job.status == "cancelled" and job.payload == {"x": 1}
    # the dedupe key is free again, and the status counts the cancelled job
    assert queue.enqueue("f", {"x": 3}, dedupe_key="k1") is not None
    status = queue.get_queue_status("f")
    assert status["cancelled_records"] == 1 and status["by_flow"]["f"]["cancelled"] == 1
    # a second cancel changes nothing and says why
    again = queue.cancel([job_id, 999_999])
    assert again.changed == 0
    assert again.unchanged == {job_id: "already cancelled", 999_999: "not found"}


def test_cancel_by_flow_and_status(queue: Queue, dsn: str) -> None:
    due = queue.enqueue_many("f", [{"n": i} for i in range(3)]).inserted
    later = [queue.enqueue("f", {"later": i}, delay=3600) for i in range(2)]
    untouched = queue.enqueue("g", {})
    report = queue.cancel(flow="f", status="scheduled")
    assert report.cancelled == sorted(later) and report.unchanged == {}
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'f' AND status = 'pending'") == due
    report = queue.cancel(flow="f", status=["pending"])
    assert len(report.cancelled) == due
    assert where_is(dsn, untouched) == ("jobs", "pending")
    assert queue.cancel(flow="f").changed == 0


def test_cancel_of_running_job_records_the_request_only(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {})
    token, _ = queue.claim("f", "w", 1)
    report = queue.cancel([job_id])
    assert report.cancelled == [] and report.requested == [job_id]
    assert where_is(dsn, job_id) == ("jobs", "running")
    assert scalar(dsn, "SELECT cancel_requested_at IS NOT NULL FROM skiplock.jobs WHERE id = %s", (job_id,))
    assert queue.cancel([job_id]).unchanged == {job_id: "running, cancel already requested"}
    # --status pending leaves running jobs alone
    queue.enqueue("f", {})
    assert queue.cancel(flow="f", status="pending").requested == []
    # A custom claim loop that never looks at the request still completes it with its ack (engine
    # workers act on it: tests/test_job_control.py).
    assert queue.ack("w", token, [job_id]).completed == 1


def test_cancel_of_jobs_that_already_ended_changes_nothing(queue: Queue, dsn: str) -> None:
    done = queue.enqueue("f", {})
    finish(queue, "f")
    dead = queue.enqueue("g", {})
    finish(queue, "g", dead=True)
    report = queue.cancel([done, dead])
    assert report.changed == 0
    assert report.unchanged == {done: "already completed", dead: "already dead"}
    assert where_is(dsn, done) == ("jobs_done", "completed") and where_is(dsn, dead) == ("jobs", "dead")


def test_cancelled_jobs_end_their_part_of_a_run_once(queue: Queue, dsn: str) -> None:
    queue.enqueue_many("f", [{"n": i} for i in range(3)], run_id="r1")
    token, jobs = queue.claim("f", "w", 1)
    assert queue.ack("w", token, [jobs[0].id]).finished_runs == []
    report = queue.cancel(run_id="r1")
    assert len(report.cancelled) == 2
    row = psycopg.connect(dsn, autocommit=True).execute(
        "SELECT total, completed, dead, cancelled, finished_at IS NOT NULL FROM skiplock.runs WHERE id = 'r1'"
    ).fetchone()
    assert row == (1, 1, 0, 2, True)  # the cancel was the last man standing
    # a run whose last job ends after the cancel finishes at that ack, once
    queue.enqueue_many("f", [{"n": i} for i in range(3)], run_id="r2")
    token, jobs = queue.claim("f", "w", 1)
    queue.cancel(run_id="r2", status="pending")
    assert scalar(dsn, "SELECT finished_at FROM skiplock.runs WHERE id = 'r2'") is None
    assert queue.ack("w", token, [jobs[0].id]).finished_runs == ["r2"]
    assert scalar(dsn, "SELECT cancelled FROM skiplock.runs WHERE id = 'r2'") == 2


def test_cancel_validates_its_selectors(queue: Queue) -> None:
    with pytest.raises(ValidationError, match="cancel takes job ids"):
        queue.cancel()
    with pytest.raises(ValidationError, match="cancel takes job ids"):
        queue.cancel([1], flow="f")
    with pytest.raises(ValidationError, match="cancel status done is invalid"):
        queue.cancel(flow="f", status="done")
    with pytest.raises(ValidationError, match="positive integers"):
        queue.cancel([0])
    with pytest.raises(ValidationError, match="flow name"):
        queue.cancel(flow="no way")


def test_a_large_cancel_goes_in_slices(queue: Queue, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.store as store_module

    monkeypatch.setattr(store_module, "CANCEL_SLICE", 7)
    queue.enqueue_many("f", [{"n": i} for i in range(30)])
    assert len(queue.cancel(flow="f").cancelled) == 30
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE status = 'cancelled'") == 30


# ---------------------------------------------------------------------------------------------
# wait


def test_wait_returns_the_result_once_completed(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {})
    assert job_id is not None

    def complete_later() -> None:
        time.sleep(0.3)
        with Queue(dsn) as other:
            finish(other, "f")

    thread = threading.Thread(target=complete_later)
    started = time.monotonic()
    thread.start()
    assert queue.wait(job_id, timeout=10) == {"n": job_id}
    thread.join()
    assert 0.25 < time.monotonic() - started < 3


def test_wait_raises_for_dead_cancelled_timeout_and_unknown(queue: Queue) -> None:
    dead = queue.enqueue("g", {})
    finish(queue, "g", dead=True)
    with pytest.raises(JobDead, match="Boom: it broke") as info:
        queue.wait(dead, timeout=1)
    assert info.value.error_type == "Boom" and info.value.job_id == dead
    cancelled = queue.enqueue("f", {})
    queue.cancel([cancelled])
    with pytest.raises(JobCancelled):
        queue.wait(cancelled, timeout=1)
    pending = queue.enqueue("f", {"later": True}, delay=3600)
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="still pending after 0.3 s") as timeout:
        queue.wait(pending, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5 and timeout.value.status == "pending"
    with pytest.raises(JobNotFound):
        queue.wait(987_654, timeout=1)
    with pytest.raises(ValidationError, match="timeout"):
        queue.wait(pending, timeout=-1)


def test_wait_async(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {})
    assert job_id is not None

    async def main() -> Any:
        waiter = asyncio.create_task(queue.wait_async(job_id, timeout=10))
        ticks = 0
        while not waiter.done():  # the loop is not blocked while waiting
            ticks += 1
            await asyncio.sleep(0.01)
            if ticks == 20:
                await asyncio.to_thread(lambda: finish(Queue(dsn), "f"))
        return await waiter, ticks

    result, ticks = asyncio.run(main())
    assert result == {"n": job_id} and ticks >= 20
    late = queue.enqueue("f", {}, delay=3600)
    with pytest.raises(WaitTimeout):
        asyncio.run(queue.wait_async(late, timeout=0.1))


# ---------------------------------------------------------------------------------------------
# the browser


@pytest.fixture
def browsed(queue: Queue) -> dict[str, Any]:
    """Jobs in every state across two flows and a run."""
    ids: dict[str, Any] = {}
    ids["completed"] = queue.enqueue("g", {"customer": 7})
    finish(queue, "g")
    ids["dead"] = queue.enqueue("g", {"customer": 8})
    finish(queue, "g", dead=True)
    ids["running"] = queue.enqueue("g", {"customer": 7})
    queue.claim("g", "w", 1)
    ids["pending"] = queue.enqueue_many("f", [{"customer": i, "tier": "gold" if i % 2 else "free"}
                                               for i in range(5)], run_id="nightly").inserted
    ids["scheduled"] = queue.enqueue("f", {"customer": 7}, delay=3600)
    ids["cancelled"] = queue.enqueue("f", {"customer": 9})
    queue.cancel([ids["cancelled"]])
    return ids


def test_list_jobs_in_every_state(queue: Queue, browsed: dict[str, Any]) -> None:
    everything = queue.list_jobs()
    by_status: dict[str, list[int]] = {}
    for job in everything:
        by_status.setdefault(job.status, []).append(job.id)
    assert set(by_status) == {"pending", "scheduled", "running", "dead", "completed", "cancelled"}
    assert len(by_status["pending"]) == 5
    for status in ("scheduled", "running", "dead", "completed", "cancelled"):
        assert by_status[status] == [browsed[status]]
    assert [j.status for j in queue.list_jobs(JobFilter(statuses=["dead", "running"]))] == ["dead", "running"]


def test_list_jobs_filters(queue: Queue, browsed: dict[str, Any]) -> None:
    seven = queue.list_jobs(JobFilter(payload={"customer": 7}))
    assert sorted(j.status for j in seven) == ["completed", "running", "scheduled"]
    gold = queue.list_jobs(JobFilter(flow="f", payload={"tier": "gold"}))
    assert [j.payload["customer"] for j in gold] == [1, 3]
    assert {j.run_id for j in queue.list_jobs(JobFilter(run_id="nightly"))} == {"nightly"}
    assert len(queue.list_jobs(JobFilter(run_id="nightly"))) == 5
    assert queue.list_jobs(JobFilter(flow="g", statuses=["pending"])) == []
    assert len(queue.list_jobs(JobFilter(flow="f"), limit=2)) == 2
    # completed and cancelled jobs are searched only `since` back
    assert queue.list_jobs(JobFilter(statuses=["completed", "cancelled"], since=0)) == []
    assert queue.list_jobs(JobFilter(older_than=3600)) == []
    with pytest.raises(ValidationError, match="status done is invalid"):
        queue.list_jobs(JobFilter(statuses=["done"]))
    with pytest.raises(ValidationError, match="limit"):
        queue.list_jobs(limit=0)


def test_purge_cancelled(queue: Queue, dsn: str, browsed: dict[str, Any]) -> None:
    assert queue.purge_cancelled([browsed["cancelled"], browsed["completed"]]) == [browsed["cancelled"]]
    assert where_is(dsn, browsed["cancelled"]) is None
    assert where_is(dsn, browsed["completed"]) == ("jobs_done", "completed")


# ---------------------------------------------------------------------------------------------
# plans: every browser statement stays on its index


def _plan(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    with psycopg.ClientCursor(conn) as cur:
        literal = cur.mogrify(sql, params)
    row = conn.execute("EXPLAIN (FORMAT JSON) " + literal).fetchone()
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return document[0]["Plan"]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


@pytest.fixture
def big(dsn: str) -> psycopg.Connection:
    """40,000 live jobs over 8 flows in every live state, and 60,000 finished ones spread over 10 days."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, run_at, claimed_at, finished_at, run_id)
                        SELECT 'flow-' || (g % 8), jsonb_build_object('n', g),
                               (CASE WHEN g / 8 % 20 = 0 THEN 'running' WHEN g / 8 % 20 = 1 THEN 'dead'
                                     ELSE 'pending' END)::skiplock.job_status,
                               now() + ((g / 8 % 3) - 1) * interval '1 hour',
                               CASE WHEN g / 8 % 20 = 0 THEN now() END, CASE WHEN g / 8 % 20 = 1 THEN now() END,
                               CASE WHEN g % 100 = 0 THEN 'run-' || (g / 1000) END
                        FROM generate_series(1, 40000) g""")
        conn.execute("""INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, errors, created_at,
                                                        finished_at, status)
                        SELECT 100000 + g, 'flow-' || (g % 8), '{}', 0, 1, '[]',
                               now() - interval '10 days' + g * interval '14 seconds',
                               now() - interval '10 days' + g * interval '14 seconds',
                               CASE WHEN g / 8 % 10 = 0 THEN 'cancelled' ELSE 'completed' END
                        FROM generate_series(1, 60000) g""")
        conn.execute("ANALYZE skiplock.jobs")
        conn.execute("ANALYZE skiplock.jobs_done")
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


LIST_PARAMS = {"run_id": None, "older_than": None, "payload": None, "limit": 50, "scheduled": False,
               "since": 3600.0}


@pytest.mark.parametrize("name,index,status", [
    ("jobs_list_pending", "jobs_claim_idx", "pending"),
    ("jobs_list_pending", "jobs_claim_idx", "scheduled"),
    ("jobs_list_running", "jobs_running_idx", "running"),
    ("jobs_list_dead", "jobs_dead_idx", "dead"),
])
@pytest.mark.parametrize("flow", [None, "flow-3"])
@pytest.mark.parametrize("payload", [None, '{"n": 5}'])
def test_live_browser_plans_use_their_partial_index(big: psycopg.Connection, name: str, index: str, status: str,
                                                    flow: str | None, payload: str | None) -> None:
    params = {**LIST_PARAMS, "flow": flow, "status": status, "scheduled": status == "scheduled",
              "payload": payload}
    plan = _plan(big, getattr(Q, name), params)
    nodes = _nodes(plan)
    text = json.dumps(plan)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], text
    assert any(n.get("Index Name") == index for n in nodes), text
    assert plan["Node Type"] == "Limit", text
    # and the statement answers what it says
    rows = big.execute(getattr(Q, name), params).fetchall()
    assert 0 < len(rows) <= 50 or payload is not None


@pytest.mark.parametrize("status", ["completed", "cancelled"])
@pytest.mark.parametrize("flow", [None, "flow-3"])
def test_done_browser_plan_reads_only_the_time_window(big: psycopg.Connection, status: str, flow: str | None) -> None:
    params = {**LIST_PARAMS, "flow": flow, "status": status, "since": 86400.0}
    plan = _plan(big, Q.jobs_list_done, params)
    nodes = _nodes(plan)
    text = json.dumps(plan)
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], text
    assert any(n.get("Index Name") == "jobs_done_finished_brin" for n in nodes), text
    assert big.execute(Q.jobs_list_done, params).fetchall()


def test_wait_cancel_and_health_plans_stay_on_indexes(big: psycopg.Connection) -> None:
    job_id = big.execute("SELECT max(id) FROM skiplock.jobs").fetchone()[0]
    for sql, params in (
        (Q.job_outcome, {"id": job_id}),
        (Q.job_outcome, {"id": 100_123}),
        (Q.job_states, {"ids": [job_id, 100_123]}),
        (Q.cancel_jobs, {"ids": [job_id], "flow": None, "run_id": None, "pending": True, "scheduled": True,
                         "running": True, "limit": 10_000}),
        (Q.cancel_jobs, {"ids": None, "flow": "flow-3", "run_id": None, "pending": True, "scheduled": False,
                         "running": False, "limit": 10_000}),
        (Q.health_flows, {"stale_after": 30.0, "window": 300.0, "cap": 1000, "now": None}),
        (Q.health_workers, {"stale_after": 30.0, "now": None}),
    ):
        plan = _plan(big, sql, params)
        nodes = _nodes(plan)
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in ("jobs", "jobs_done")]
        assert seq == [], json.dumps(plan)
        # health_flows reads through skiplock.flows_with_status: inlined, or its scans go unchecked
        assert not [n for n in nodes if n["Node Type"] == "Function Scan"], json.dumps(plan)


def test_worker_job_control_plans_stay_on_indexes(big: psycopg.Connection) -> None:
    """The worker's ~1 s cancel check rides its partial index (nearly empty), and the fenced endings
    and progress writes probe the primary key, whatever the size of the hot table."""
    big.execute("UPDATE skiplock.jobs SET claimed_by = 'w-' || (id % 50), claim_token = 7 WHERE status = 'running'")
    job_id = big.execute("SELECT min(id) FROM skiplock.jobs WHERE status = 'running'").fetchone()[0]
    big.execute("UPDATE skiplock.jobs SET cancel_requested_at = now() WHERE id = %s", (job_id,))
    big.execute("ANALYZE skiplock.jobs")
    common = {"worker": "w-1", "token": 7, "ids": [job_id], "errors_kept": 10}
    for sql, params, index in (
        (Q.jobs_cancel_requested, {"worker": "w-1", "limit": 1000}, {"jobs_cancel_requested_idx"}),
        (Q.ack_cancelled, {**common, "message": "cancelled while running"}, {"jobs_pkey", "jobs_cancel_requested_idx"}),
        (Q.snooze_jobs, {**common, "delays": [1.0]}, {"jobs_pkey"}),
        (Q.jobs_progress_set, {"worker": "w-1", "ids": [job_id], "tokens": [7], "fractions": [0.5],
                               "messages": [None]}, {"jobs_pkey"}),
        (Q.job_progress, {"id": job_id}, {"jobs_pkey"}),
    ):
        plan = _plan(big, sql, params)
        nodes = _nodes(plan)
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in ("jobs", "jobs_done")]
        assert seq == [], json.dumps(plan)
        assert index & {n.get("Index Name") for n in nodes}, json.dumps(plan)


# ---------------------------------------------------------------------------------------------
# unknown flows


def test_enqueue_to_an_unknown_flow_is_refused_naming_the_known_ones(queue: Queue, dsn: str) -> None:
    with pytest.raises(UnknownFlow) as info:
        queue.enqueue("emials", {})
    message = str(info.value)
    assert "'emials' is unknown" in message and "did you mean 'emails'?" in message
    assert "known flows: emails, f, g" in message and "allow_unknown_flow=True" in message
    with pytest.raises(UnknownFlow):
        queue.enqueue_many("emials", [{}, {}])
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    # the override, for a producer deployed before its engines
    assert queue.enqueue("later", {}, allow_unknown_flow=True) is not None
    assert queue.enqueue_many("later", [{}], allow_unknown_flow=True).inserted == 1
    # once an engine registers the flow, no override is needed
    scalar(dsn, "INSERT INTO skiplock.flows (name) VALUES ('later') RETURNING 1")
    assert queue.enqueue("later", {}) is not None


def test_health_reports_pending_jobs_no_live_worker_serves(queue: Queue, dsn: str) -> None:
    queue.enqueue_many("f", [{}] * 3)
    queue.enqueue("g", {}, delay=3600)  # not due: not counted
    live_worker(dsn, "w-g", "g")
    report = queue.health_check()
    assert report["status"] == "degraded"
    assert report["unserved_flows"] == {"f": 3}
    assert "pending jobs of flows no live worker serves: f (3)" in report["reasons"]
    live_worker(dsn, "w-f", "f", "emails")
    report = queue.health_check()
    assert report["status"] == "healthy" and report["unserved_flows"] == {}
    # a worker with a stale heartbeat serves nothing
    scalar(dsn, "UPDATE skiplock.workers SET heartbeat_at = now() - interval '1 hour' WHERE id = 'w-f' RETURNING 1")
    assert queue.health_check(stale_after=30)["unserved_flows"] == {"f": 3}


# ---------------------------------------------------------------------------------------------
# the CLI, through real subprocesses


def test_cli_cancel(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {})
    running = queue.enqueue("g", {})
    queue.claim("g", "w", 1)
    assert ok(engine("cancel", str(job_id), dsn=dsn)) == f"cancelled 1 job(s): {job_id}\n"
    result = engine("cancel", str(job_id), dsn=dsn)
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout == f"cancelled 0 job(s)\njob {job_id}: already cancelled, nothing changed\n"
    out = ok(engine("cancel", "--flow", "g", "--status", "pending,running", dsn=dsn))
    assert out == f"cancelled 0 job(s)\ncancel requested for 1 running job(s) (their workers stop them): {running}\n"
    queue.enqueue_many("f", [{}] * 2, run_id="r")
    report = json.loads(ok(engine("cancel", "--run", "r", "--json", dsn=dsn)))
    assert len(report["cancelled"]) == 2 and report["requested"] == [] and report["unchanged"] == {}
    assert engine("cancel", "--flow", "f", dsn=dsn).returncode == 1  # nothing left to cancel


@pytest.mark.parametrize("args,message", [
    ([], "say what to cancel"),
    (["1", "--flow", "f"], "not both"),
    (["--flow", "f", "--status", "done"], "--status done is invalid"),
    (["1", "--status", "pending"], "--status goes with --flow or --run"),
    (["--flow", "bad flow!"], "flow name 'bad flow!' is invalid"),
])
def test_cli_cancel_bad_input(dsn: str, args: list[str], message: str) -> None:
    assert message in one_line_error(engine("cancel", *args, dsn=dsn))


def test_cli_wait(queue: Queue, dsn: str) -> None:
    done = queue.enqueue("f", {})
    finish(queue, "f")
    assert ok(engine("wait", str(done), dsn=dsn)) == json.dumps({"n": done}, separators=(",", ":")) + "\n"
    dead = queue.enqueue("g", {})
    finish(queue, "g", dead=True)
    result = engine("wait", str(dead), dsn=dsn)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"engine: job {dead} is dead: Boom: it broke\n"
    cancelled = queue.enqueue("f", {})
    queue.cancel([cancelled])
    result = engine("wait", str(cancelled), dsn=dsn)
    assert (result.returncode, result.stderr) == (1, f"engine: job {cancelled} was cancelled\n")
    later = queue.enqueue("f", {}, delay=3600)
    result = engine("wait", str(later), "--timeout", "300ms", dsn=dsn)
    assert (result.returncode, result.stderr) == (3, f"engine: job {later} still pending after 0.3 s\n")
    assert one_line_error(engine("wait", "424242", dsn=dsn)) == "engine: error: job 424242 not found\n"
    assert "--timeout" in engine("wait", "1", "--timeout", "soon", dsn=dsn).stderr


def test_cli_wait_for_a_job_completed_meanwhile(queue: Queue, dsn: str) -> None:
    job_id = queue.enqueue("f", {})
    timer = threading.Timer(0.5, lambda: finish(Queue(dsn), "f"))
    timer.start()
    try:
        assert json.loads(ok(engine("wait", str(job_id), "--timeout", "20s", dsn=dsn))) == {"n": job_id}
    finally:
        timer.join()


def test_cli_jobs_list_and_show(queue: Queue, dsn: str, browsed: dict[str, Any]) -> None:
    listed = json.loads(ok(engine("jobs", "list", "--json", dsn=dsn)))
    assert {j["status"] for j in listed} == {"pending", "scheduled", "running", "dead", "completed", "cancelled"}
    gold = json.loads(ok(engine("jobs", "list", "--flow", "f", "--where", "tier=gold", "--json", dsn=dsn)))
    assert [j["payload"]["customer"] for j in gold] == [1, 3]
    seven = json.loads(ok(engine("jobs", "list", "--where", "customer=7", "--status", "completed",
                                 "--status", "running", "--json", dsn=dsn)))
    assert [j["id"] for j in seven] == [browsed["completed"], browsed["running"]]
    text = ok(engine("jobs", "list", "--run", "nightly", "--limit", "3", dsn=dsn))
    lines = text.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["id", "flow", "status", "attempts", "run", "since", "error", "payload"]
    assert len(lines) == 4 and all("nightly" in line for line in lines[1:])
    assert ok(engine("jobs", "list", "--status", "completed", "--since", "0s", "--json", dsn=dsn)) == "[]\n"
    shown = ok(engine("jobs", "show", str(browsed["completed"]), dsn=dsn))
    assert f"job {browsed['completed']}  flow g  status completed" in shown and "result:" in shown
    assert f'"n": {browsed["completed"]}' in shown
    shown = json.loads(ok(engine("jobs", "show", str(browsed["cancelled"]), "--json", dsn=dsn)))
    assert shown["status"] == "cancelled"
    assert "cancel requested" not in ok(engine("jobs", "show", str(browsed["running"]), dsn=dsn))
    queue.cancel([browsed["running"]])
    assert "cancel requested" in ok(engine("jobs", "show", str(browsed["running"]), dsn=dsn))
    assert one_line_error(engine("jobs", "show", "777777", dsn=dsn)) == "engine: error: job 777777 not found\n"


@pytest.mark.parametrize("args,message", [
    (["--status", "finished"], "--status finished is invalid"),
    (["--where", "novalue"], "--where 'novalue': use KEY=VALUE"),
    (["--limit", "0"], "--limit 0 must be from 1 to 10000"),
    (["--flow", "no way"], "flow name 'no way' is invalid"),
])
def test_cli_jobs_list_bad_input(dsn: str, args: list[str], message: str) -> None:
    assert message in one_line_error(engine("jobs", "list", *args, dsn=dsn))


def test_cli_enqueue_unknown_flow(dsn: str) -> None:
    line = one_line_error(engine("enqueue", "emials", "--payload", "{}", dsn=dsn))
    assert "flow 'emials' is unknown" in line and "did you mean 'emails'?" in line and "--allow-unknown-flow" in line
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    assert ok(engine("enqueue", "emials", "--payload", "{}", "--allow-unknown-flow", dsn=dsn)) == \
        "enqueued 1 job(s) to emials\n"
    result = engine("health", dsn=dsn)
    assert result.returncode == 1 and "pending jobs of flows no live worker serves: emials (1)" in result.stdout


@pytest.mark.parametrize("command", [["cancel"], ["wait"], ["jobs", "list"], ["jobs", "show"], ["enqueue"]])
def test_cli_help(command: list[str]) -> None:
    out = ok(engine(*command, "--help"))
    assert out.startswith("usage: engine " + " ".join(command))
    expected = {"cancel": "exit codes", "wait": "exit codes", "enqueue": "--allow-unknown-flow"}
    assert expected.get(command[0], "--json") in out

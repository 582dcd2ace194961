"""Liveness under faults (issue 10 items 1, 2, 3, 6, 7, 12): real engines, real signals, a real proxy.

The handler (support.handlers:record_span) writes a start line, a tick every 20 ms and an end line
per execution, with its pid and attempt, so a test sees every stretch of time a process ran a job:
an execution that was killed stops ticking, one that was frozen and resumed ticks again. Two
executions of one job by two processes must never overlap in time, zombies included.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.liveness import lease_span
from engine.migrate import migrate
from engine.queue import Queue
from support.engines import wait_for
from support.postgres import register_flows, scalar
from support.proxy import TcpProxy, unix_socket_of

HEARTBEAT = 0.5
STALE_AFTER = 2.0
SPAN = lease_span(STALE_AFTER, HEARTBEAT)  # 1.5 s: how long a worker runs without a renewal

BASE = f"""
[global]
heartbeat_interval = "{HEARTBEAT}s"
stale_after = "{STALE_AFTER}s"
rescue_interval = "0.5s"
poll_interval = "0.5s"
grace_period = "5s"
tick_interval = "0.25s"
"""
SPANS = BASE + """
[flows.span]
handler = "support.handlers:record_span"
batch_size = 1
max_attempts = 5
backoff = { base = "0s", cap = "0.05s", jitter = 0 }
"""


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class Execution:
    pid: int
    attempt: int
    start: float
    last: float
    ended: bool


def executions(path: Path) -> dict[int, list[Execution]]:
    """Every execution of every job, from the span records."""
    found: dict[tuple[int, int, int], Execution] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            kind, n, pid, attempt, at = line.split()
            key = (int(n), int(pid), int(attempt))
            run = found.setdefault(key, Execution(int(pid), int(attempt), float(at), float(at), False))
            run.last = max(run.last, float(at))
            run.ended = run.ended or kind == "end"
    by_job: dict[int, list[Execution]] = defaultdict(list)
    for (n, _, _), run in found.items():
        by_job[n].append(run)
    return by_job


def assert_no_overlap(by_job: dict[int, list[Execution]]) -> None:
    for n, runs in by_job.items():
        runs = sorted(runs, key=lambda r: r.start)
        for before, after in zip(runs, runs[1:]):
            assert before.last <= after.start, f"job {n} ran in two processes at once: {runs}"


def last_seen(path: Path, pid: int) -> float:
    return max((r.last for runs in executions(path).values() for r in runs if r.pid == pid), default=0.0)


def enqueue(dsn: str, payloads: list[dict[str, Any]], flow: str = "span", **options: Any) -> None:
    register_flows(dsn, flow)  # as an engine that ran before would have
    with Queue(dsn) as q:
        assert q.enqueue_many(flow, payloads, **options).inserted == len(payloads)


def rows(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()


def live_worker_pids(dsn: str, engine_pid: int) -> list[int]:
    """The engine's worker processes (the supervisor's children)."""
    pids: list[int] = []
    for task in Path(f"/proc/{engine_pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def running_pid(path: Path, among: list[int] | None = None, timeout: float = 20.0) -> int:
    """The pid of a process running a job now (it ticked in the last 50 ms)."""
    def find() -> int | None:
        now = time.time()
        for runs in executions(path).values():
            for run in runs:
                if not run.ended and now - run.last < 0.05 and (among is None or run.pid in among):
                    return run.pid
        return None
    return wait_for(find, timeout, interval=0.01, message="a job to be running")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def log_has(engine: Any, msg: str) -> list[dict]:
    return [line for line in engine.log_lines() if msg in line.get("msg", "")]


def tail(engine: Any, chars: int = 4000) -> str:
    return engine.log_path.read_text(errors="replace")[-chars:]


def worker_lost_errors(dsn: str) -> list[tuple[int, str, str]]:
    """(job n, worker, message) of every WorkerLost entry, finished jobs or not."""
    return rows(dsn, """
        SELECT (payload->>'n')::int, e->>'worker', e->>'message'
        FROM (SELECT payload, errors FROM skiplock.jobs UNION ALL SELECT payload, errors FROM skiplock.jobs_done) j,
             jsonb_array_elements(j.errors) e
        WHERE e->>'type' = 'WorkerLost'""")


def done_count(dsn: str) -> int:
    return scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done")


def stop(engine: Any) -> int:
    engine.signal(signal.SIGTERM)
    return engine.wait(20)


# ---------------------------------------------------------------------------------------------
# item 1: a worker nobody can prove alive is stopped before its jobs go to another


@pytest.mark.slow
def test_sigstop_of_a_worker_is_killed_at_once_and_never_resumes(dsn, start_engine, tmp_path):
    spans = tmp_path / "spans.txt"
    enqueue(dsn, [{"n": i, "sleep": 1.0} for i in range(6)])
    engine = start_engine(dsn, SPANS, "--workers", "2", env={"SKIPLOCK_TEST_SPANS": str(spans)})
    victim = running_pid(spans)
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        time.sleep(STALE_AFTER + 1.0)
        assert not alive(victim), "a stopped worker must be killed, not left to resume"
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGCONT)
    wait_for(lambda: done_count(dsn) == 6, 20, message="every job to complete")
    assert stop(engine) == 0, tail(engine)

    by_job = executions(spans)
    assert_no_overlap(by_job)
    assert set(by_job) == set(range(6))
    assert last_seen(spans, victim) <= stopped_at + 0.05, "the stopped worker ran again"
    (n, worker, message), = worker_lost_errors(dsn)
    assert message == "rescued: worker exited with signal 9 (SIGKILL)"
    # Rescued at once, not after stale_after: the other worker started it within the lease.
    retry = min(r.start for r in by_job[n] if r.pid != victim)
    assert retry - stopped_at < STALE_AFTER, retry - stopped_at
    assert log_has(engine, "worker killed: stopped by someone else")
    assert scalar(dsn, "SELECT state FROM skiplock.workers WHERE id = %s", (worker,)) == "lost"


@pytest.mark.slow
def test_sigstop_of_a_whole_engine_past_stale_after_with_another_engine_running(dsn, start_engine, tmp_path):
    spans = tmp_path / "spans.txt"
    total = 16
    enqueue(dsn, [{"n": i, "sleep": 0.6} for i in range(total)])
    env = {"SKIPLOCK_TEST_SPANS": str(spans)}
    first = start_engine(dsn, SPANS, "--workers", "2", env=env)
    wait_for(lambda: len(live_worker_pids(dsn, first.process.pid)) == 2, 10, message="the first engine's workers")
    frozen = [first.process.pid, *live_worker_pids(dsn, first.process.pid)]
    second = start_engine(dsn, SPANS, "--workers", "2", env=env)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'busy'") == 4, 20,
             message="both engines busy")
    running_pid(spans, among=frozen[1:])
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    time.sleep(STALE_AFTER + 1.5)  # the second engine rescues the first one's jobs meanwhile
    for pid in reversed(frozen):
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: done_count(dsn) == total, 30, message="every job to complete")
    assert stop(second) == 0, tail(second)
    assert stop(first) == 0, tail(first)

    by_job = executions(spans)
    assert_no_overlap(by_job)
    assert set(by_job) == set(range(total))
    for pid in frozen[1:]:
        # The kernel timer killed them while stopped: nothing after the freeze, not even on resume.
        assert last_seen(spans, pid) <= stopped_at + 0.05, f"worker {pid} ran after its lease"
    lost = worker_lost_errors(dsn)
    assert lost, "the frozen engine's jobs were rescued"
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0


@pytest.mark.slow
def test_handler_holding_the_gil_past_its_lease_is_killed_before_another_runs_the_job(dsn, start_engine, tmp_path):
    spans = tmp_path / "spans.txt"
    # The first attempt holds the GIL for 4 s, longer than stale_after: the heartbeat thread of the
    # old design starved, the job was rescued and ran twice at once.
    enqueue(dsn, [{"n": 0, "gil": 4, "sleep": 0.2}])
    engine = start_engine(dsn, SPANS, "--workers", "2", env={"SKIPLOCK_TEST_SPANS": str(spans)})
    wait_for(lambda: done_count(dsn) == 1, 20, message="the job to complete")
    time.sleep(4.5)  # past the GIL call: a surviving first execution would write its tick now
    assert stop(engine) == 0, tail(engine)

    runs = executions(spans)[0]
    assert_no_overlap({0: runs})
    first, second = sorted(runs, key=lambda r: r.start)
    assert (first.attempt, first.ended, second.attempt, second.ended) == (1, False, 2, True)
    assert first.last == first.start, "the GIL-bound execution must not run past its C call"
    assert second.start - first.start < STALE_AFTER, "killed (kernel timer) and rescued within the lease"
    (_, _, message), = worker_lost_errors(dsn)
    assert message == "rescued: worker exited with signal 9 (SIGKILL)"


@pytest.mark.slow
def test_failing_ticks_do_not_stop_liveness(dsn, start_engine, tmp_path):
    spans = tmp_path / "spans.txt"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS
                        $$ BEGIN RAISE EXCEPTION 'stats_minute is not writable'; END $$""")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON skiplock.stats_minute "
                     "FOR EACH ROW EXECUTE FUNCTION public.refuse()")
    # 4 s of work, past stale_after, finishing jobs in every tick: every tick's stats write fails.
    total = 40
    enqueue(dsn, [{"n": i, "sleep": 0.1} for i in range(total)])
    engine = start_engine(dsn, SPANS, "--workers", "1", env={"SKIPLOCK_TEST_SPANS": str(spans)})
    wait_for(lambda: done_count(dsn) == total, 20, message="every job to complete")
    assert stop(engine) == 0, tail(engine)
    assert log_has(engine, "telemetry tick failed")
    assert worker_lost_errors(dsn) == []
    assert scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'lost'") == 0
    assert {n: len(runs) for n, runs in executions(spans).items()} == dict.fromkeys(range(total), 1)


@pytest.mark.slow
def test_engine_cut_off_from_the_database_while_its_handlers_run(dsn, start_engine, tmp_path):
    spans = tmp_path / "spans.txt"
    # Jobs longer than stale_after: a cut-off worker left running would still run its job when the
    # direct engine, having rescued it, starts it again.
    enqueue(dsn, [{"n": i, "sleep": STALE_AFTER + 4.0} for i in range(2)])
    env = {"SKIPLOCK_TEST_SPANS": str(spans)}
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        cut_off = start_engine(proxy.dsn(dsn), SPANS, "--workers", "2", env=env)
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'running'") == 2, 20,
                 message="the cut-off engine to run both jobs")
        victims = live_worker_pids(dsn, cut_off.process.pid)
        direct = start_engine(dsn, SPANS, "--workers", "2", env=env)
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 20,
                 message="the direct engine, idle")
        proxy.cut()
        cut_at = time.time()
        time.sleep(STALE_AFTER + 2.0)
        proxy.restore()
        enqueue(dsn, [{"n": i, "sleep": 0.1} for i in range(2, 12)])
        wait_for(lambda: done_count(dsn) == 12, 30, message="every job to complete")
        assert stop(direct) == 0, tail(direct)
        assert stop(cut_off) == 0, tail(cut_off)

    by_job = executions(spans)
    assert_no_overlap(by_job)
    assert set(by_job) == set(range(12))
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    assert log_has(cut_off, "worker frozen")
    for pid in victims:
        # Frozen before their lease ended, then killed (lost, or frozen past a lease): never resumed.
        assert last_seen(spans, pid) < cut_at + SPAN, f"worker {pid} ran past its lease"
        assert not alive(pid)
    assert {n for n, _, _ in worker_lost_errors(dsn)} == {0, 1}, "the direct engine rescued both"


# ---------------------------------------------------------------------------------------------
# item 2: a database outage does not count against liveness


@pytest.fixture
def own_server() -> Any:
    """A PostgreSQL of this test's own, so restarting it leaves the suite's server alone."""
    base = make_temp_dir("skiplock-restart-")
    server = EmbeddedPostgres(base / "data", settings={"fsync": "off", "synchronous_commit": "off",
                                                      "full_page_writes": "off"})
    server.start()
    with db.connect(server.dsn()) as conn:
        migrate(conn)
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_postgres_outage_longer_than_stale_after_marks_no_worker_lost(own_server, start_engine, tmp_path):
    dsn = own_server.dsn()
    spans = tmp_path / "spans.txt"
    stale_after = 5.0
    config = SPANS.replace(f'stale_after = "{STALE_AFTER}s"', f'stale_after = "{stale_after}s"')
    total = 60
    enqueue(dsn, [{"n": i, "sleep": 0.3} for i in range(total)])
    engine = start_engine(dsn, config, "--workers", "2", env={"SKIPLOCK_TEST_SPANS": str(spans)})
    wait_for(lambda: done_count(dsn) >= 6, 20, message="the engine to be working")
    down_at = time.monotonic()
    own_server.stop()
    time.sleep(stale_after + 0.5)  # the workers are frozen near the end of their lease, not killed
    own_server.start()
    restarted_at = time.time()
    outage = time.monotonic() - down_at
    assert outage > stale_after
    wait_for(lambda: done_count(dsn) == total, 40, message="every job to complete")
    assert stop(engine) == 0, tail(engine)

    assert scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'lost'") == 0
    assert worker_lost_errors(dsn) == []
    assert not log_has(engine, "worker died")
    assert log_has(engine, "worker frozen") and log_has(engine, "worker resumed")
    by_job = executions(spans)
    assert_no_overlap(by_job)
    assert {len(runs) for runs in by_job.values()} == {1} and set(by_job) == set(range(total))
    # The workers' lag behind the database's return (measured: about 0.5 s), well inside stale_after.
    lag = min(r.start for runs in by_job.values() for r in runs if r.start > restarted_at) - restarted_at
    print(f"outage {outage:.1f}s; first job started {lag:.2f}s after the server was back")
    assert lag < 2.0, lag


# ---------------------------------------------------------------------------------------------
# item 3: custom claim loops


def test_custom_claim_loop_keeps_its_jobs_by_heartbeat(queue: Queue, conn: psycopg.Connection) -> None:
    stale_after = 1.0
    conn.execute("INSERT INTO skiplock.flows (name) VALUES ('f') ON CONFLICT DO NOTHING")  # as an engine would
    queue.enqueue_many("f", [{"n": i} for i in range(4)])
    token_a, jobs_a = queue.claim("f", "loop-a", 2)
    token_b, jobs_b = queue.claim("f", "loop-b", 2)
    assert queue.heartbeat("loop-a") and queue.heartbeat("loop-b")
    uptime = conn.execute("SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8").fetchone()[0]
    time.sleep(max(0.0, 2 * stale_after - uptime))
    until = time.monotonic() + 2 * stale_after
    while time.monotonic() < until:  # loop-a works and heartbeats; loop-b works and does not
        assert queue.heartbeat("loop-a")
        time.sleep(0.2)
    result = queue.rescue(stale_after)
    assert result.lost_workers == ["loop-b"] and result.rescued == 2

    assert queue.ack("loop-a", token_a, [j.id for j in jobs_a]).completed == 2
    assert queue.ack("loop-b", token_b, [j.id for j in jobs_b]).refused == 2
    assert queue.heartbeat("loop-b") is False, "a lost id stays lost"
    assert queue.heartbeat("loop-a")


# ---------------------------------------------------------------------------------------------
# item 6: the orphaned-run-hook sweep claims only this engine's flows


@pytest.mark.slow
def test_orphaned_run_hooks_of_other_flows_are_left_alone(dsn, start_engine, tmp_path):
    hooks = tmp_path / "hooks.txt"
    config = BASE + """
[flows.reports]
handler = "support.handlers:record"
on_complete = "support.handlers:on_run_complete"
[flows.emails]
handler = "support.handlers:record"
on_complete = "support.handlers:on_run_complete"
"""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.runs (id, flow, total, completed, finished_at) VALUES
                        ('r-reports', 'reports', 1, 1, now() - interval '1 minute'),
                        ('r-emails', 'emails', 1, 1, now() - interval '1 minute')""")
    engine = start_engine(dsn, config, "--workers", "1", "--flows", "reports",
                          env={"SKIPLOCK_TEST_HOOKS": str(hooks), "SKIPLOCK_TEST_RECORD": str(tmp_path / "r.txt")})
    wait_for(lambda: hooks.exists() and "r-reports" in hooks.read_text(), 10, message="the reports run's hook")
    time.sleep(1.0)  # more rescue passes
    assert stop(engine) == 0, tail(engine)
    assert [line.split()[0] for line in hooks.read_text().splitlines()] == ["r-reports"]
    assert rows(dsn, "SELECT id, hook_fired_at IS NOT NULL FROM skiplock.runs ORDER BY id") == [
        ("r-emails", False), ("r-reports", True)]


# ---------------------------------------------------------------------------------------------
# item 7: the rescue commits first; telemetry and hooks after it, off the loop


@pytest.mark.slow
def test_rescue_commits_despite_failing_stats_and_a_slow_hook_does_not_stall_the_loop(dsn, start_engine, tmp_path):
    spans, hooks = tmp_path / "spans.txt", tmp_path / "hooks.txt"
    config = SPANS + 'on_complete = "support.handlers:slow_hook"\n'
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS
                        $$ BEGIN RAISE EXCEPTION 'stats_minute is not writable'; END $$""")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON skiplock.stats_minute "
                     "FOR EACH ROW EXECUTE FUNCTION public.refuse()")
        conn.execute("INSERT INTO skiplock.runs (id, flow, total, completed, finished_at) "
                     "VALUES ('orphan', 'span', 1, 1, now() - interval '1 minute')")
    enqueue(dsn, [{"n": i, "sleep": 1.0} for i in range(4)])
    hook_sleep = 3 * STALE_AFTER
    engine = start_engine(dsn, config, "--workers", "2",
                          env={"SKIPLOCK_TEST_SPANS": str(spans), "SKIPLOCK_TEST_HOOKS": str(hooks),
                               "SKIPLOCK_TEST_HOOK_SLEEP": str(hook_sleep)})
    wait_for(lambda: hooks.exists() and hooks.read_text().startswith("start orphan"), 10, message="the slow hook")
    victim = running_pid(spans)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    # While the hook sleeps, the loop reaps, rescues (despite the failing stats write) and restarts.
    wait_for(lambda: worker_lost_errors(dsn), 3, message="the dead worker's job to be rescued")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state <> 'lost'") == 2, 3,
             message="the slot to be restarted")
    assert time.time() - killed_at < hook_sleep - 1.0
    assert "end" not in hooks.read_text(), "the hook is still running"
    wait_for(lambda: done_count(dsn) == 4, 20, message="every job to complete")
    assert stop(engine) == 0, tail(engine)
    assert log_has(engine, "rescue committed, but its stats write failed")


# ---------------------------------------------------------------------------------------------
# item 12: killing on the way out is recorded, reported and rescued


HANG = BASE.replace('grace_period = "5s"', 'grace_period = "1s"') + """
[flows.hang]
handler = "support.handlers:hang"
batch_size = 1
"""


@pytest.mark.slow
def test_kill_after_grace_period_is_recorded_rescued_and_exits_5(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    enqueue(dsn, [{"n": 0, "sleep": 60}], flow="hang")
    engine = start_engine(dsn, HANG, "--workers", "1", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: record.exists() and record.read_text(), 10, message="the job to start")
    engine.signal(signal.SIGTERM)
    assert engine.wait(15) == 5, tail(engine)
    (status, claimed_by, message, errors), = rows(
        dsn, "SELECT status::text, claimed_by, error_message, errors FROM skiplock.jobs")
    assert (status, claimed_by) == ("pending", None)
    assert "killed after grace period" in message
    assert errors[-1]["message"] == "rescued: worker killed after grace period"
    assert rows(dsn, "SELECT state FROM skiplock.workers") == [("lost",)]


@pytest.mark.slow
def test_second_signal_exits_3_and_leaves_no_job_running(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    enqueue(dsn, [{"n": 0, "sleep": 60}], flow="hang")
    config = HANG.replace('grace_period = "1s"', 'grace_period = "30s"')
    engine = start_engine(dsn, config, "--workers", "1", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: record.exists() and record.read_text(), 10, message="the job to start")
    engine.signal(signal.SIGTERM)
    time.sleep(0.3)
    engine.signal(signal.SIGTERM)
    assert engine.wait(15) == 3, tail(engine)
    (status, message), = rows(dsn, "SELECT status::text, error_message FROM skiplock.jobs")
    assert status == "pending" and "killed by a second signal" in message

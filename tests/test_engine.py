"""The engine under faults: real `engine run` processes against the real PostgreSQL, no mocks.

Every test drives one or more `engine run` subprocesses (tests/conftest.py: start_engine) whose
workers run the handlers in tests/support/handlers.py; those append one line per execution to a
file, so a test can count how often each job really ran, and by which process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from engine.logs import JsonFormatter
from engine.queue import Queue
from support.engines import BASE, GRACE, RESCUE_INTERVAL, STALE_AFTER, log_has, rows, tail, wait_for
from support.handlers import read_records
from support.postgres import register_flows, scalar

# Small intervals keep fault tests fast: a silent worker is stale after 2 s, looked for every 0.5 s.

SLOW = BASE + """
[flows.slow]
handler = "support.handlers:record_slow"
batch_size = 20
"""
BATCH = 20


# ---------------------------------------------------------------------------------------------
# helpers


def enqueue(dsn: str, flow: str, payloads: list[dict[str, Any]], **options: Any) -> None:
    """Enqueue before the engine starts: the flow is registered first, as an earlier engine would have."""
    register_flows(dsn, flow)
    with Queue(dsn) as q:
        assert q.enqueue_many(flow, payloads, **options).inserted == len(payloads)


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def child_pids(pid: int) -> list[int]:
    """The supervisor's children: its worker processes."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def kill_on_fresh_record(path: Path, signum: int, timeout: float = 20.0) -> int:
    """Wait for the next execution to start (a new record line) and signal its process at once, so
    it is hit while that job runs (record_slow records first, then sleeps)."""
    offset = path.stat().st_size
    deadline = time.monotonic() + timeout
    with open(path, "rb") as handle:
        while time.monotonic() < deadline:
            handle.seek(offset)
            chunk = handle.read()
            if b"\n" in chunk:
                line = chunk.split(b"\n", 1)[0]
                pid = int(line.split()[1])
                os.kill(pid, signum)
                return pid
            time.sleep(0.001)
    pytest.fail("no job started")


def assert_all_completed_once_in_db(dsn: str, total: int) -> None:
    left = rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1")
    assert left == [], f"jobs left in the hot table: {left}"
    count, distinct = rows(dsn, "SELECT count(*), count(DISTINCT id) FROM skiplock.jobs_done")[0]
    assert count == distinct == total


class Events:
    """LISTEN on skiplock_events from the test, collecting raw payloads in a thread."""

    def __init__(self, dsn: str) -> None:
        self.payloads: list[str] = []
        self._stop = threading.Event()
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._conn.execute("LISTEN skiplock_events")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for notify in self._conn.notifies(timeout=0.1):
                self.payloads.append(notify.payload)

    def decoded(self) -> list[dict[str, Any]]:
        return [orjson.loads(p) for p in list(self.payloads)]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.decoded() if e.get("kind") == kind]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


@pytest.fixture
def events(dsn: str):
    listener = Events(dsn)
    yield listener
    listener.close()


# ---------------------------------------------------------------------------------------------
# 1. kill -9


def test_kill_9_of_a_worker_mid_batch_loses_nothing(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    total = 300
    enqueue(dsn, "slow", [{"n": i, "sleep": 0.02} for i in range(total)])
    engine = start_engine(dsn, SLOW, "--workers", "2", "--drain", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: line_count(record) >= 40, 20, message="the engine to start working")
    victim = kill_on_fresh_record(record, signal.SIGKILL)

    assert engine.wait(40) == 0, tail(engine)
    records = read_records(str(record))
    runs = Counter(n for n, _ in records)
    assert set(runs) == set(range(total)), "a job never ran"
    twice = {n for n, c in runs.items() if c > 1}
    assert set(runs.values()) <= {1, 2}
    # Only the killed worker's batch runs again: the jobs it had started (at least the one running
    # when it was killed), and at most a batch of them.
    assert 1 <= len(twice) <= BATCH
    by_victim = [n for n, pid in records if pid == victim]
    assert set(by_victim[-len(twice):]) == twice, "repeats must be the victim's last executions"
    for n in twice:
        pids = [pid for m, pid in records if m == n]
        assert pids[0] == victim and pids[1] != victim

    assert_all_completed_once_in_db(dsn, total)
    (victim_id, state), = rows(dsn, "SELECT id, state FROM skiplock.workers WHERE pid = %s", (victim,))
    assert state == "lost"
    # The rescued jobs are exactly the killed batch: each carries one WorkerLost error naming the
    # victim and used two attempts; those the victim had started are the ones that ran twice.
    rescued = rows(dsn, """SELECT (payload->>'n')::int, attempts, errors FROM skiplock.jobs_done
                           WHERE errors @> '[{"type": "WorkerLost"}]'""")
    assert 1 <= len(rescued) <= BATCH
    for _, attempts, errors in rescued:
        assert attempts == 2 and [e["worker"] for e in errors] == [victim_id]
    rescued_ns = {n for n, _, _ in rescued}
    assert rescued_ns & set(by_victim) == twice
    died = log_has(engine, "worker died", worker=victim_id)
    assert died and died[0]["exit_code"] == -signal.SIGKILL
    assert sum(line["rescued"] for line in log_has(engine, "rescued jobs")) == len(rescued)


def test_engine_killed_outright_is_rescued_by_another_engine(dsn, start_engine, tmp_path):
    """A host loss: supervisor and workers die at once (no PDEATHSIG drain, no reaping). Another
    engine on the database rescues the dead engine's claims once their heartbeats are stale_after
    old, within one rescue interval, and finishes the work."""
    record = tmp_path / "record.txt"
    total = 400
    enqueue(dsn, "slow", [{"n": i, "sleep": 0.02} for i in range(total)])
    env = {"SKIPLOCK_TEST_RECORD": str(record)}
    # Paused until both engines are up: however slowly the second starts, the first is still working.
    with Queue(dsn) as q:
        q.pause("slow")
    first = start_engine(dsn, SLOW, "--workers", "2", env=env)
    second = start_engine(dsn, SLOW, "--workers", "2", "--drain", env=env)
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 4, 30,
             message="both engines")
    supervisor = first.process.pid
    workers = child_pids(supervisor)
    assert len(workers) == 2
    dead_ids = [r[0] for r in rows(dsn, "SELECT id FROM skiplock.workers WHERE pid = ANY(%s)", (workers,))]
    with Queue(dsn) as q:
        q.resume("slow")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'busy' AND id = ANY(%s)",
                            (dead_ids,)) == 2, 20, message="the first engine to start working")

    def freeze() -> set[int]:
        """Stop the whole first engine; keep it stopped only once its workers hold claimed jobs, one
        of them started (a stop just as a claim's reply arrived holds only jobs never started)."""
        for pid in (supervisor, *workers):
            os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)  # a claim statement already sent still commits
        held = {r[0] for r in rows(dsn, "SELECT (payload->>'n')::int FROM skiplock.jobs "
                                        "WHERE status = 'running' AND claimed_by = ANY(%s)", (dead_ids,))}
        if not held & {n for n, pid in read_records(str(record)) if pid in workers}:
            held = set()
            for pid in (*workers, supervisor):
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        return held

    stuck = wait_for(freeze, 10, interval=0, message="the first engine's workers to hold claimed jobs, one started")
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.kill(supervisor, signal.SIGKILL)
    first.process.wait(10)
    started_by_dead = {n for n, pid in read_records(str(record)) if pid in workers}

    assert second.wait(40) == 0, tail(second)
    assert_all_completed_once_in_db(dsn, total)
    assert rows(dsn, "SELECT DISTINCT state FROM skiplock.workers WHERE id = ANY(%s)", (dead_ids,)) == [("lost",)]
    # Rescued no earlier than stale_after after the last heartbeat (a live worker is never robbed),
    # and no later than stale_after plus one rescue interval (slack: the supervisor's 0.2 s wake-ups).
    lags = rows(dsn, """
        SELECT (d.payload->>'n')::int, extract(epoch FROM (e->>'at')::timestamptz - w.heartbeat_at)::float8
        FROM skiplock.jobs_done d, jsonb_array_elements(d.errors) e, skiplock.workers w
        WHERE e->>'type' = 'WorkerLost' AND w.id = e->>'worker'""")
    assert {n for n, _ in lags} == stuck and len(lags) == len(stuck)
    for _, lag in lags:
        assert STALE_AFTER <= lag <= STALE_AFTER + RESCUE_INTERVAL + 0.7, lag
    assert log_has(second, "rescued jobs")
    runs = Counter(n for n, _ in read_records(str(record)))
    assert set(runs) == set(range(total))
    twice = {n for n, c in runs.items() if c > 1}
    assert twice <= stuck & started_by_dead and max(runs.values()) == 2


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM


def test_sigterm_stops_cleanly_and_gives_back_unstarted_jobs(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    total = 600
    enqueue(dsn, "slow", [{"n": i, "sleep": 0.02} for i in range(total)])
    env = {"SKIPLOCK_TEST_RECORD": str(record)}
    engine = start_engine(dsn, SLOW, "--workers", "2", env=env)
    wait_for(lambda: line_count(record) >= 60, 20, message="the engine to start working")
    worker_ids = [r[0] for r in rows(dsn, "SELECT id FROM skiplock.workers")]
    assert len(worker_ids) == 2
    asked = time.monotonic()
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)
    assert time.monotonic() - asked < GRACE, "must stop within the grace period"
    assert not log_has(engine, "did not stop within the grace period")
    assert not log_has(engine, "worker died"), "a worker stopping on request did not die"

    statuses = dict(rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1"))
    assert set(statuses) == {"pending"}, statuses
    # Nothing that never ran used an attempt; everything that ran was finished and acked.
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE attempts <> 0 OR claimed_by IS NOT NULL") == 0
    ran = Counter(n for n, _ in read_records(str(record)))
    assert set(ran.values()) == {1}
    done = {r[0] for r in rows(dsn, "SELECT (payload->>'n')::int FROM skiplock.jobs_done")}
    assert done == set(ran)
    assert statuses["pending"] == total - len(done) > 0
    assert rows(dsn, "SELECT DISTINCT state FROM skiplock.workers") == [("stopped",)]

    again = start_engine(dsn, SLOW, "--workers", "2", "--drain", env=env)
    assert again.wait(40) == 0, tail(again)
    assert_all_completed_once_in_db(dsn, total)
    runs = Counter(n for n, _ in read_records(str(record)))
    assert set(runs) == set(range(total)) and set(runs.values()) == {1}


# ---------------------------------------------------------------------------------------------
# 3. PostgreSQL restarts


@pytest.mark.parametrize("outage", [0.0, STALE_AFTER + 1.0], ids=["restart", "outage-past-stale_after"])
def test_postgres_restart_mid_run_loses_nothing(dsn, pg_server, start_engine, tmp_path, outage):
    """A fast restart; and a longer outage, after which every heartbeat is stale: workers are marked
    lost, exit, and are replaced, and the run still ends with every job completed."""
    record = tmp_path / "record.txt"
    total = 20_000
    config = BASE + """
[flows.rec]
handler = "support.handlers:record_slow"
batch_size = 100
"""
    enqueue(dsn, "rec", [{"n": i, "sleep": 0.0002} for i in range(total)])
    engine = start_engine(dsn, config, "--workers", "2", "--drain", env={"SKIPLOCK_TEST_RECORD": str(record)})
    try:
        wait_for(lambda: line_count(record) >= 3000, 30, message="the engine to be well into the run")
        pg_server.stop()  # fast shutdown: every session is cut
        time.sleep(outage)
        pg_server.start()
    finally:
        if pg_server.process is None or pg_server.process.poll() is not None:
            pg_server.start()
    assert line_count(record) < total - 2000, "the restart should land mid-run"
    assert engine.wait(90) == 0, tail(engine)
    assert_all_completed_once_in_db(dsn, total)
    runs = Counter(n for n, _ in read_records(str(record)))
    assert set(runs) == set(range(total))
    assert not rows(dsn, "SELECT id FROM skiplock.workers WHERE state NOT IN ('stopped', 'lost')")


# ---------------------------------------------------------------------------------------------
# 4. two engines, one database


def test_two_engines_never_run_a_job_concurrently(dsn, start_engine, tmp_path):
    timed = tmp_path / "timed.txt"
    total = 5000
    config = BASE + """
[flows.timed]
handler = "support.handlers:record_timed"
batch_size = 25
"""
    enqueue(dsn, "timed", [{"n": i, "sleep": 0.001} for i in range(total)])
    env = {"SKIPLOCK_TEST_TIMED": str(timed)}
    engines = [start_engine(dsn, config, "--workers", "2", "--drain", env=env) for _ in range(2)]
    for engine in engines:
        assert engine.wait(60) == 0, tail(engine)

    executions: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    for line in timed.read_text().splitlines():
        n, pid, start, end = line.split()
        executions[int(n)].append((int(pid), float(start), float(end)))
    for n, runs in executions.items():
        runs.sort(key=lambda r: r[1])
        for before, after in zip(runs, runs[1:]):
            assert before[2] <= after[1], f"job {n} ran concurrently: {runs}"
    assert set(executions) == set(range(total))
    assert {len(runs) for runs in executions.values()} == {1}, "nothing failed: each job runs exactly once"
    assert_all_completed_once_in_db(dsn, total)
    engine_of = dict(rows(dsn, "SELECT pid, engine_id FROM skiplock.workers"))
    per_engine = Counter(engine_of[runs[0][0]] for runs in executions.values())
    assert len(per_engine) == 2, f"both engines should have worked: {per_engine}"


# ---------------------------------------------------------------------------------------------
# 5. a stopped worker (a would-be zombie)


def test_stopped_worker_is_killed_and_its_job_rescued_at_once(dsn, start_engine, tmp_path):
    """A SIGSTOPped worker cannot prove it is alive: the supervisor stops renewing it and kills it
    before its heartbeat goes stale, so it never resumes as a zombie next to the job's new runner
    (tests/test_liveness.py checks the executions' times). Late acks of a rescued batch are fenced
    (tests/test_queue.py)."""
    record = tmp_path / "record.txt"
    config = BASE + """
[flows.zombie]
handler = "support.handlers:hang"
batch_size = 1
"""
    engine = start_engine(dsn, config, "--workers", "2", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'idle'") == 2, 20,
             message="two idle workers")
    enqueue(dsn, "zombie", [{"n": 0, "sleep": 1.5}])
    job_id = scalar(dsn, "SELECT id FROM skiplock.jobs")
    wait_for(lambda: line_count(record) >= 1, 10, message="the job to start")
    zombie = read_records(str(record))[0][1]
    zombie_id = scalar(dsn, "SELECT id FROM skiplock.workers WHERE pid = %s", (zombie,))
    os.kill(zombie, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: scalar(dsn, "SELECT claimed_by FROM skiplock.jobs_done WHERE id = %s", (job_id,)),
                 STALE_AFTER + 10, message="another worker to complete the rescued job")
    finally:
        try:
            os.kill(zombie, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert time.monotonic() - stopped < STALE_AFTER + 1.5 + 0.5, "rescued at once, not after stale_after"
    died = wait_for(lambda: log_has(engine, "worker died", worker=zombie_id), 5, message="the zombie's death")
    assert died[0]["exit_code"] == -signal.SIGKILL
    (claimed_by, attempts, errors), = rows(
        dsn, "SELECT claimed_by, attempts, errors FROM skiplock.jobs_done WHERE id = %s", (job_id,))
    assert claimed_by != zombie_id and attempts == 2
    assert [(e["type"], e["worker"]) for e in errors] == [("WorkerLost", zombie_id)]
    assert scalar(dsn, "SELECT state FROM skiplock.workers WHERE id = %s", (zombie_id,)) == "lost"
    assert len(read_records(str(record))) == 2 and not log_has(engine, "acks refused")

    # The slot is refilled; new jobs each run once, by live workers only.
    enqueue(dsn, "zombie", [{"n": i, "sleep": 0.15} for i in range(1, 21)])
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 21, 20,
             message="the new jobs to complete")
    runs = Counter(n for n, _ in read_records(str(record)))
    assert {runs[n] for n in range(1, 21)} == {1}, runs
    assert scalar(dsn, "SELECT max(attempts) FROM skiplock.jobs_done WHERE id <> %s", (job_id,)) == 1
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)


# ---------------------------------------------------------------------------------------------
# 6. circuit breaker


def test_circuit_breaker_opens_and_closes(dsn, start_engine, tmp_path, events):
    record = tmp_path / "record.txt"
    marker = tmp_path / "dependency-up"
    config = BASE + """
[flows.fragile]
handler = "support.handlers:fail_until_marker"
batch_size = 1
max_attempts = 100
backoff = { base = "0s", cap = "0.05s", jitter = 0 }
circuit = { failures = 3, cooldown = "1s" }
"""
    total = 8
    enqueue(dsn, "fragile", [{"n": i, "sleep": 0.05} for i in range(total)])
    engine = start_engine(dsn, config, "--workers", "1",
                          env={"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_TEST_MARKER": str(marker)})
    wait_for(lambda: scalar(dsn, "SELECT circuit_state FROM skiplock.flows WHERE name = 'fragile'") == "open",
             20, message="the circuit to open")
    assert line_count(record) == 3, "three failures in a row open it"
    opened = wait_for(lambda: events.of_kind("circuit_opened"), 5, message="a circuit_opened event")
    assert opened[0]["flow"] == "fragile" and opened[0]["failures"] == 3
    # While open nothing is tried; once the cool-down is over one trial job runs (half-open), fails,
    # and the circuit opens again.
    until = scalar(dsn, "SELECT extract(epoch FROM circuit_until - now())::float8 FROM skiplock.flows "
                        "WHERE name = 'fragile'")
    worker_pid = scalar(dsn, "SELECT pid FROM skiplock.workers")
    cpu_before = _cpu_seconds(worker_pid)
    time.sleep(max(until - 0.2, 0))
    tried = line_count(record)
    if scalar(dsn, "SELECT circuit_until > now() FROM skiplock.flows WHERE name = 'fragile'"):
        assert tried == 3, "no job may run while the circuit is open"
    assert _cpu_seconds(worker_pid) - cpu_before < 0.3 * max(until, 0.1), "an idle worker must not spin"
    wait_for(lambda: len(events.of_kind("circuit_opened")) >= 2, 10, message="the failed half-open trial")
    assert line_count(record) == 4, "half-open: exactly one trial job"

    marker.touch()
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == total, 20,
             message="the jobs to complete once the dependency is back")
    wait_for(lambda: scalar(dsn, "SELECT circuit_state FROM skiplock.flows WHERE name = 'fragile'") == "closed",
             5, message="the circuit to close")
    wait_for(lambda: events.of_kind("circuit_closed"), 5, message="a circuit_closed event")
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)


def test_concurrency_limit_holds_and_held_flows_do_not_spin(dsn, start_engine, tmp_path):
    """A fleet-wide concurrency limit is never exceeded, and workers with nothing they may claim
    (flow at its limit, or paused) sleep instead of polling in a loop; a resume wakes them."""
    timed, record = tmp_path / "timed.txt", tmp_path / "record.txt"
    config = BASE + """
[flows.limited]
handler = "support.handlers:record_timed"
batch_size = 1
concurrency = 2
[flows.held]
handler = "support.handlers:record"
"""
    enqueue(dsn, "limited", [{"n": i, "sleep": 0.4} for i in range(8)])
    enqueue(dsn, "held", [{"n": i} for i in range(5)])
    with Queue(dsn) as q:
        q.pause("held")
    engine = start_engine(dsn, config, "--workers", "4",
                          env={"SKIPLOCK_TEST_TIMED": str(timed), "SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state = 'busy'") == 2, 20,
             message="two busy workers")
    pids = [r[0] for r in rows(dsn, "SELECT pid FROM skiplock.workers")]
    assert len(pids) == 4
    before = sum(_cpu_seconds(pid) for pid in pids)
    time.sleep(1.0)
    assert sum(_cpu_seconds(pid) for pid in pids) - before < 0.35, "idle workers must not spin"
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'limited'") == 8, 20,
             message="the limited flow to finish")
    spans = [tuple(map(float, line.split()[2:])) for line in timed.read_text().splitlines()]
    assert len(spans) == 8
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2, f"concurrency = 2, but {peak} jobs ran at once"

    assert line_count(record) == 0 and scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'held'") == 5
    with Queue(dsn) as q:
        q.resume("held")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'held'") == 5, 3,
             message="a resume to wake the workers")
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)
    assert not log_has(engine, "worker died"), "idle workers stopping on request did not die"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# 7. timeouts


def test_handler_timeout_counts_an_attempt(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    config = BASE + """
[flows.stuck]
handler = "support.handlers:hang"
timeout = "0.5s"
max_attempts = 2
backoff = { base = "0.1s", cap = "0.1s", jitter = 0 }
"""
    # The job's own max_attempts is given too: the engine does not apply a flow's max_attempts to jobs
    # enqueued without one (they get the API default of 5); see the report.
    enqueue(dsn, "stuck", [{"n": 0, "sleep": 30}], max_attempts=2)
    started = time.monotonic()
    engine = start_engine(dsn, config, "--workers", "1", "--drain", "--wait-scheduled",
                          env={"SKIPLOCK_TEST_RECORD": str(record)})
    assert engine.wait(30) == 0, tail(engine)
    assert time.monotonic() - started < 10, "the handler must be interrupted, not waited for"
    (status, attempts, error_type, errors), = rows(
        dsn, "SELECT status::text, attempts, error_type, errors FROM skiplock.jobs")
    assert (status, attempts, error_type) == ("dead", 2, "JobTimeout")
    assert [(e["attempt"], e["type"]) for e in errors] == [(1, "JobTimeout"), (2, "JobTimeout")]
    assert len(read_records(str(record))) == 2
    assert not log_has(engine, "handler ignored its timeout")
    assert not log_has(engine, "worker died")


def test_flow_max_attempts_applies_to_jobs_enqueued_without_one(dsn, start_engine, tmp_path):
    config = BASE + """
[flows.capped]
handler = "support.handlers:always_fail"
max_attempts = 2
backoff = { base = "0s", cap = "0.05s", jitter = 0 }
"""
    enqueue(dsn, "capped", [{"n": 0}])
    engine = start_engine(dsn, config, "--workers", "1", "--drain", "--wait-scheduled",
                          env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")})
    assert engine.wait(30) == 0, tail(engine)
    assert rows(dsn, "SELECT status::text, attempts FROM skiplock.jobs") == [("dead", 2)]


# ---------------------------------------------------------------------------------------------
# 8. run hooks


def test_run_on_complete_hook_fires_exactly_once(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    hooks = tmp_path / "hooks.txt"
    config = BASE + """
[flows.batch]
handler = "support.handlers:record"
batch_size = 10
on_complete = "support.handlers:on_run_complete"
"""
    enqueue(dsn, "batch", [{"n": i} for i in range(2000)], run_id="r1")
    enqueue(dsn, "batch", [{"n": 2000 + i} for i in range(3)], run_id="r2")
    engine = start_engine(dsn, config, "--workers", "4", "--drain",
                          env={"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_TEST_HOOKS": str(hooks)})
    assert engine.wait(60) == 0, tail(engine)
    assert_all_completed_once_in_db(dsn, 2003)
    lines = [line.split() for line in hooks.read_text().splitlines()]
    assert sorted(line[:4] for line in lines) == [["r1", "2000", "2000", "0"], ["r2", "3", "3", "0"]]
    assert rows(dsn, "SELECT id, total, completed, dead, finished_at IS NOT NULL, hook_fired_at IS NOT NULL "
                     "FROM skiplock.runs ORDER BY id") == [("r1", 2000, 2000, 0, True, True),
                                                          ("r2", 3, 3, 0, True, True)]
    assert len(log_has(engine, "run finished", run="r1")) == 1


# ---------------------------------------------------------------------------------------------
# 9. bad configuration


def _engine_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    support = Path(__file__).resolve().parent
    full_env = {**os.environ, "PYTHONPATH": f"{support}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    full_env.pop("SKIPLOCK_ENV", None)
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_unknown_config_key_and_unknown_handler_exit_2(dsn, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '[flows.x]\nhandler = "support.handlers:record"\nbatch_szie = 10\n')
    result = _engine_cli("run", "--config", str(bad), "--drain", env={"SKIPLOCK_DSN": dsn})
    assert result.returncode == 2, result
    assert str(bad) in result.stderr and "batch_szie" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    missing = tmp_path / "missing.toml"
    missing.write_text(BASE + '[flows.x]\nhandler = "no_such_module_skl:handle"\n')
    result = _engine_cli("run", "--config", str(missing), "--drain", env={"SKIPLOCK_DSN": dsn})
    assert result.returncode == 2, result
    assert "no_such_module_skl" in result.stderr and "flow x" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert scalar(dsn, "SELECT count(*) FROM skiplock.workers") == 0, "no worker may start"


# ---------------------------------------------------------------------------------------------
# 10. telemetry


def test_telemetry_ticks_stats_and_heartbeats(dsn, start_engine, tmp_path, events):
    record = tmp_path / "record.txt"
    total = 4000
    config = BASE + """
[flows.tel]
handler = "support.handlers:record_slow"
batch_size = 50
"""
    enqueue(dsn, "tel", [{"n": i, "sleep": 0.0005} for i in range(total)])
    started = time.monotonic()
    engine = start_engine(dsn, config, "--workers", "2", env={"SKIPLOCK_TEST_RECORD": str(record)})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers") == 2, 20, message="two workers")
    first = dict(rows(dsn, "SELECT id, heartbeat_at FROM skiplock.workers"))
    wait_for(lambda: all(hb > first[w] for w, hb in rows(dsn, "SELECT id, heartbeat_at FROM skiplock.workers")),
             5, message="every worker's heartbeat to advance")
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == total, 30, message="the drain")
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)
    elapsed = time.monotonic() - started
    time.sleep(0.3)

    assert events.payloads
    for payload in events.payloads:
        assert len(payload.encode()) < 8000
    decoded = events.decoded()
    assert {e["v"] for e in decoded} == {1}
    ticks = [e for e in decoded if e["kind"] == "tick"]
    assert len(ticks) >= 2
    assert len(ticks) <= 2 * (elapsed / 0.25 + 3) and len(ticks) < total / 20, "ticks are per worker per tick"
    assert sum(t["flows"].get("tel", {}).get("completed", 0) for t in ticks) == total
    for tick in ticks:
        assert tick["engine"] and tick["worker"]
        for counts in tick["flows"].values():
            assert set(counts) >= {"completed", "failed", "dead", "rescued"}
    worker_ids = {r[0] for r in rows(dsn, "SELECT id FROM skiplock.workers")}
    assert {e["worker"] for e in decoded if e["kind"] == "worker_started"} == worker_ids
    assert {e["worker"] for e in decoded if e["kind"] == "worker_stopped"} == worker_ids
    assert scalar(dsn, "SELECT sum(completed) FROM skiplock.stats_minute WHERE flow = 'tel'") == total
    assert rows(dsn, "SELECT DISTINCT state FROM skiplock.workers") == [("stopped",)]


def test_idle_workers_send_no_ticks(dsn, start_engine, events):
    """A tick with nothing to report sends nothing: idle workers make no NOTIFY (each one takes the
    server's global notify lock) and no transaction. The first job after the quiet is in a tick."""
    config = BASE + '\n[flows.quiet]\nhandler = "engine.flows.builtin:noop"\n'
    engine = start_engine(dsn, config, "--workers", "2")
    wait_for(lambda: len(events.of_kind("worker_started")) == 2, 20, message="two workers")
    time.sleep(1.5)  # six tick intervals
    assert events.of_kind("tick") == [], tail(engine)
    enqueue(dsn, "quiet", [{}])
    wait_for(lambda: events.of_kind("tick"), 5, message="the tick of the job")
    assert sum(t["flows"].get("quiet", {}).get("completed", 0) for t in events.of_kind("tick")) == 1
    engine.signal(signal.SIGTERM)
    assert engine.wait(GRACE + 5) == 0, tail(engine)
    assert scalar(dsn, "SELECT sum(completed) FROM skiplock.stats_minute WHERE flow = 'quiet'") == 1


# ---------------------------------------------------------------------------------------------
# 11. logs


def test_engine_logs_are_json_lines_with_ids(dsn, start_engine, tmp_path):
    config = BASE + """
[flows.rec]
handler = "support.handlers:record"
"""
    enqueue(dsn, "rec", [{"n": i} for i in range(100)])
    engine = start_engine(dsn, config, "--workers", "2", "--drain",
                          env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")})
    assert engine.wait(30) == 0, tail(engine)
    lines = engine.log_lines()
    assert lines and all("raw" not in line for line in lines), tail(engine)
    assert all({"ts", "level", "msg", "logger"} <= set(line) for line in lines)
    engine_ids = {line.get("engine") for line in lines}
    assert len(engine_ids) == 1 and None not in engine_ids, "every line carries the engine id"
    started = [line for line in lines if line["msg"] == "worker started"]
    worker_ids = {r[0] for r in rows(dsn, "SELECT id FROM skiplock.workers")}
    assert {line["worker"] for line in started} == worker_ids and len(worker_ids) == 2
    assert all(line.get("worker") in worker_ids for line in lines if line["logger"] == "skiplock.worker")


def test_dsn_passwords_never_reach_logs_or_errors(dsn):
    formatter = JsonFormatter()
    url = "postgresql://skiplock:hunter2@db.internal:5432/skiplock"
    record = logging.LogRecord("skiplock.engine", logging.WARNING, __file__, 1,
                               "cannot connect to %s: refused", (url,), None)
    line = orjson.loads(formatter.format(record))
    assert "hunter2" not in line["msg"] and "db.internal" in line["msg"], line
    try:
        raise RuntimeError(f"invalid URI: \"{url}\"")
    except RuntimeError:
        record = logging.LogRecord("skiplock.engine", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "hunter2" not in formatter.format(record)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "host=db password=hunter2 user=u", (), None)
    assert "hunter2" not in formatter.format(record)

    unreachable = "postgresql://u:hunter2@127.0.0.1:1/x"
    for args in (("status", "--dsn", unreachable), ("run", "--dsn", unreachable, "--drain")):
        result = _engine_cli(*args)
        assert result.returncode == 2, result
        assert "hunter2" not in result.stderr + result.stdout
        assert result.stderr.startswith("engine: error:"), result.stderr
    result = _engine_cli("status", env={"SKIPLOCK_DSN": unreachable})
    assert result.returncode == 2 and "hunter2" not in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# fairness between flows


def test_a_deep_backlog_of_one_flow_does_not_starve_another(dsn, start_engine, tmp_path):
    """One batch per flow per round: jobs of a quiet flow run while another flow has a deep backlog."""
    config = BASE + """
[flows.deep]
handler = "support.handlers:record_slow"
batch_size = 10
[flows.quick]
handler = "support.handlers:record"
batch_size = 10
"""
    enqueue(dsn, "deep", [{"n": i, "sleep": 0.01} for i in range(3000)])  # about 30 s of work for one worker
    engine = start_engine(dsn, config, "--workers", "1", env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")})
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'deep'") >= 20, 20,
             message="the deep flow to start")
    enqueue(dsn, "quick", [{"n": 100_000 + i} for i in range(30)])
    wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'quick'") == 30, 10,
             message="the quick flow's jobs to run beside the deep backlog")
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'deep' AND status = 'pending'") > 1000
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0, tail(engine)

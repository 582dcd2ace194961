"""Workloads measured by the benchmark suite, as plain functions returning figures.

Every figure is read next to a ceiling measured in the same run on the same server: the raw-SQL
drain (a minimal table, batch claim with FOR UPDATE SKIP LOCKED and batch ack, one statement each,
from plain psycopg processes, no engine code) and raw COPY. Timings start when every process is
connected and ready (a barrier, or an engine whose workers all LISTEN), so process start-up and
imports are not counted on either side.

The engine is always a real `engine run` subprocess (supervisor plus forked workers) with its
heartbeats, telemetry ticks and fenced acks on: nothing here reaches into its hot path.
"""

from __future__ import annotations

import compileall
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.handlers import read_stamps
from engine import db
from engine.queue import Queue
from engine.telemetry import ENQUEUED_CHANNEL

REPO = Path(__file__).resolve().parent.parent

RAW_DDL = """
DROP TABLE IF EXISTS bench_raw_jobs;
CREATE TABLE bench_raw_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload jsonb NOT NULL,
    status smallint NOT NULL DEFAULT 0
);
CREATE INDEX bench_raw_pending ON bench_raw_jobs (id) WHERE status = 0;
"""
RAW_CLAIM = """
UPDATE bench_raw_jobs SET status = 1
WHERE id IN (SELECT id FROM bench_raw_jobs WHERE status = 0 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
RAW_ACK = "DELETE FROM bench_raw_jobs WHERE id = ANY(%s)"

# The flows the suite configures. `noop` is the built-in no-op flow; `bench` runs the latency handler.
NOOP = "engine.flows.builtin:noop"
STAMP = "bench.handlers:stamp"
WAIT_IO = "bench.handlers:wait_io"  # each job waits 50 ms, blocking (threads)
ASYNC_WAIT_IO = "bench.handlers:async_wait_io"  # each job waits 50 ms, awaited (asyncio)


@dataclass(frozen=True)
class Rate:
    jobs: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EndToEnd(Rate):
    """An end-to-end drain's time in its three phases (wall clock, from the jobs' own timestamps):
    spawn to the first claim, the first claim to the last ack, the last ack to the exit."""

    start: float
    drain: float
    stop: float


def best(rates: list[Rate]) -> Rate:
    """The best of several rounds: noise on a shared machine only ever slows a round down."""
    return max(rates, key=lambda r: r.per_second)


def _payloads(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"n": i, "kind": "bench"} for i in range(start, start + n)]


def _raw_text(n: int) -> str:
    return "".join(f'{{"n": {i}, "kind": "bench"}}\n' for i in range(n))


# -- raw-SQL ceilings ------------------------------------------------------------------------------


def _raw_drainer(dsn: str, batch: int, ready: Any, go: Any, results: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        ready.release()
        go.wait()
        done = 0
        while True:
            rows = conn.execute(RAW_CLAIM, (batch,)).fetchall()
            if not rows:
                break
            conn.execute(RAW_ACK, ([row[0] for row in rows],))
            done += len(rows)
        results.put((done, time.perf_counter()))


def run_together(target: Any, args: tuple[Any, ...], processes: int) -> tuple[float, list[Any]]:
    """`processes` spawned processes of target(*args, ready, go, results), let go at once when all are
    ready (each releases `ready`, waits for `go`, puts one result): (the time they were let go, their
    results)."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, ready, go, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    outcomes = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return started, outcomes


def raw_drain(dsn: str, jobs: int, processes: int, batch: int = 500) -> Rate:
    """The ceiling: `processes` psycopg loops claiming `batch` rows and deleting them, one statement each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # as in Engine.drain_round
        conn.execute(RAW_DDL)
        with conn.cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
            copy.write(_raw_text(jobs))
        conn.execute("VACUUM ANALYZE bench_raw_jobs")
    started, outcomes = run_together(_raw_drainer, (dsn, batch), processes)
    done = sum(n for n, _ in outcomes)
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM bench_raw_jobs").fetchone()[0]
    if done != jobs or left != 0:
        raise AssertionError(f"raw drain: {done} of {jobs} drained, {left} left")
    return Rate(done, max(t for _, t in outcomes) - started)


def raw_copy(dsn: str, rows: int) -> Rate:
    """The ceiling of bulk enqueue: COPY of ready-made text into the minimal table, in one transaction."""
    text = _raw_text(rows)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RAW_DDL)
        started = time.perf_counter()
        with conn.transaction(), conn.cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
            copy.write(text)
        elapsed = time.perf_counter() - started
        count = conn.execute("SELECT count(*) FROM bench_raw_jobs").fetchone()[0]
    if count != rows:
        raise AssertionError(f"raw COPY: {count} rows of {rows}")
    return Rate(rows, elapsed)


def raw_copy_jobs(dsn: str, rows: int, flow: str = "noop") -> Rate:
    """COPY of ready-made rows into skiplock.jobs itself (the columns enqueue_many sends), in one
    transaction: what the engine's table and indexes cost the server, with no Python in the timing."""
    text = "".join(f'{flow}\t{{"n": {i}, "kind": "bench"}}\t0\t2026-01-01 00:00:00+00\t\\N\t\\N\n'
                   for i in range(rows))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM skiplock.jobs WHERE flow = %s", (flow,))
        conn.execute("VACUUM skiplock.jobs")
        started = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(
                "COPY skiplock.jobs (flow, payload, priority, run_at, max_attempts, run_id) FROM STDIN") as copy:
            copy.write(text)
        elapsed = time.perf_counter() - started
        count = conn.execute("SELECT count(*) FROM skiplock.jobs WHERE flow = %s", (flow,)).fetchone()[0]
        conn.execute("DELETE FROM skiplock.jobs WHERE flow = %s", (flow,))
    if count != rows:
        raise AssertionError(f"COPY into skiplock.jobs: {count} rows of {rows}")
    return Rate(rows, elapsed)


# -- the engine: enqueue ---------------------------------------------------------------------------


def bulk_enqueue(dsn: str, jobs: int, flow: str = "noop") -> Rate:
    """`Queue.enqueue_many` of `jobs` payload dicts (validation, encoding and COPY all timed)."""
    payloads = _payloads(jobs)
    with Queue(dsn) as queue:
        with queue.connection() as conn:  # connect and check the schema outside the timing
            conn.execute("DELETE FROM skiplock.jobs WHERE flow = %s", (flow,))
            conn.execute("VACUUM skiplock.jobs")
        started = time.perf_counter()
        result = queue.enqueue_many(flow, payloads, allow_unknown_flow=True)
        elapsed = time.perf_counter() - started
        with queue.connection() as conn:
            count = conn.execute("SELECT count(*) FROM skiplock.jobs WHERE flow = %s AND status = 'pending'",
                                 (flow,)).fetchone()[0]
    if result.inserted != jobs or count != jobs:
        raise AssertionError(f"bulk enqueue: inserted {result.inserted}, {count} pending, of {jobs}")
    return Rate(jobs, elapsed)


# -- the engine: a real `engine run` ---------------------------------------------------------------


def _clean_exit_race(line: str) -> bool:
    """After SIGTERM the supervisor may log "worker died" for a worker that exited 0, when that exit
    wakes its loop before it looks at its signal flag (engine/supervisor.py, run()): not an error."""
    return '"msg":"worker died"' in line and '"exit_code":0,' in line


def _toml_flow(name: str, policy: Mapping[str, Any]) -> str:
    lines = [f"[flows.{name}]"]
    for key, value in policy.items():
        lines.append(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines).replace("'", '"')


def _die_with_parent() -> None:
    """In the engine's process before exec: SIGTERM (a graceful stop) when the suite dies, so a killed
    run leaves no engine behind reconnecting to a server that is gone."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Engine:
    """`engine run --workers N --flows ...` as a subprocess, with every flow paused until a round.

    `drain_round` enqueues while the flow is paused, resumes it (the clock starts) and stops the
    clock when a poll sees nothing of the flow pending or running, then checks every job completed
    exactly once.
    """

    def __init__(self, dsn: str, workdir: Path, workers: int, flows: Mapping[str, Mapping[str, Any]],
                 name: str = "engine", settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})  # more [global] keys
        self.dsn = dsn
        self.workdir = workdir
        self.workers = workers
        self.flows = {k: dict(v) for k, v in flows.items()}
        self.name = name
        self.stamps = Path(tempfile.mkdtemp(prefix="stamps-", dir=workdir))
        self.config = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.probes = 0  # latency probes sent through this engine so far
        self.conn: psycopg.Connection[Any] | None = None

    # lifecycle

    def start(self) -> "Engine":
        extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in self.settings.items())
        self.config.write_text(
            "[global]\nlog_format = \"json\"\nheartbeat_interval = \"1s\"\n" + extra + "\n"
            + "\n\n".join(_toml_flow(name, policy) for name, policy in self.flows.items()) + "\n")
        self.conn = db.connect(self.dsn, application_name="skiplock-bench")
        queue = Queue(conn=self.conn)
        for flow in self.flows:
            queue.pause(flow)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK_")}
        env.update({"SKIPLOCK_DSN": self.dsn, "SKIPLOCK_BENCH_STAMPS": str(self.stamps),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        command = [sys.executable, "-m", "engine.cli", "run", "--config", str(self.config),
                   "--workers", str(self.workers), "--flows", ",".join(self.flows)]
        profile = os.environ.get("SKIPLOCK_BENCH_PROFILE")  # a directory: py-spy records every process
        if profile:
            command = ["py-spy", "record", "--subprocesses", "--nonblocking", "-r", "200", "-f", "raw", "-o",
                       os.path.join(profile, f"{self.name}-{os.getpid()}.txt"), "--", *command]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, preexec_fn=_die_with_parent)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Every worker has registered (the step before its loop), and the supervisor LISTENs
        (it relays wake-ups to its workers)."""
        assert self.conn is not None and self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                # recursive: under SKIPLOCK_BENCH_PROFILE the engine is py-spy's child, its workers grandchildren
                pids = [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = []
            ready = self.conn.execute(
                "SELECT count(*) FROM skiplock.workers WHERE pid = ANY(%s) AND state NOT IN ('stopped', 'lost')",
                (pids,)).fetchone()[0]
            listening = self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
                " AND application_name LIKE '%%-supervisor'").fetchone()[0]
            if ready >= self.workers and listening > 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"engine did not start: see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.02)
        time.sleep(0.2)  # from LISTEN to the first wait in the loop

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if os.environ.get("SKIPLOCK_BENCH_PROFILE"):  # py-spy writes its profile once the engine exits
                import psutil

                for child in psutil.Process(self.process.pid).children():
                    child.send_signal(signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            if self.conn is not None:  # wake idle workers now rather than at their next poll
                time.sleep(0.05)
                self.conn.execute("SELECT pg_notify(%s, '')", (ENQUEUED_CHANNEL,))
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"engine ignored SIGTERM for 60 s: see {self.log_path}")
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        code = self.process.returncode if self.process is not None else 0
        errors, stopping = [], False
        for line in self.log_text().splitlines():
            stopping = stopping or '"msg":"stopping: ' in line
            if ('"level":"error"' in line or '"level":"critical"' in line) and not (stopping and _clean_exit_race(line)):
                errors.append(line)
        if code != 0 or errors:
            raise AssertionError(f"engine exited with {code}; errors in its log {self.log_path}:\n"
                                 + "\n".join(errors[-10:]))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            try:
                self.stop()
            except AssertionError:
                pass
            return
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    # helpers

    @property
    def queue(self) -> Queue:
        assert self.conn is not None
        return Queue(conn=self.conn)

    def vacuum(self) -> None:
        assert self.conn is not None
        self.conn.execute("VACUUM ANALYZE skiplock.jobs")

    def wait_drained(self, flow: str, timeout: float = 600.0, interval: float = 0.02) -> float:
        """Poll (cheap, index-backed) until nothing of `flow` is pending or running; returns the time."""
        assert self.conn is not None and self.process is not None
        deadline = time.monotonic() + timeout
        while self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM skiplock.jobs WHERE flow = %(f)s AND status = 'pending') "
            "OR EXISTS (SELECT 1 FROM skiplock.jobs WHERE flow = %(f)s AND status = 'running')",
            {"f": flow},
        ).fetchone()[0]:
            if self.process.poll() is not None:
                raise AssertionError(f"engine exited with {self.process.returncode} mid-drain:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"flow {flow} not drained within {timeout:.0f} s")
            time.sleep(interval)
        return time.time()

    def check_completed(self, flow: str, since: float, expected: int) -> float:
        """Every job of the round completed exactly once and nothing is left (no dead letters);
        returns the server time of the last acknowledgement."""
        assert self.conn is not None
        total, distinct, last = self.conn.execute(
            "SELECT count(*), count(DISTINCT id), extract(epoch FROM max(finished_at))::float8 "
            "FROM skiplock.jobs_done WHERE flow = %s AND finished_at >= to_timestamp(%s)", (flow, since)).fetchone()
        left = self.conn.execute("SELECT count(*) FROM skiplock.jobs WHERE flow = %s", (flow,)).fetchone()[0]
        if total != expected or distinct != expected or left:
            raise AssertionError(f"flow {flow}: {total} completions ({distinct} distinct jobs) of {expected}; "
                                 f"{left} jobs left in the hot table")
        return float(last)

    def drain_round(self, flow: str, jobs: int) -> Rate:
        """Enqueue `jobs` no-op jobs while `flow` is paused, resume, time until the last ack."""
        queue = self.queue
        queue.pause(flow)
        # A checkpoint first, so every round's enqueue and drain fall in one checkpoint cycle: no
        # full-page writes on first touch, no checkpoint in the middle of the timing.
        self.conn.execute("CHECKPOINT")
        for start in range(0, jobs, 100_000):
            queue.enqueue_many(flow, _payloads(min(100_000, jobs - start), start), allow_unknown_flow=True)
        self.vacuum()
        started = time.time()
        queue.resume(flow)
        seen = self.wait_drained(flow, interval=0.01)
        queue.pause(flow)
        self.check_completed(flow, started, jobs)
        # The clock stops when a poll (every 10 ms) sees nothing left: it errs against the engine by
        # at most one poll interval, where the last ack's own timestamp would err in its favour.
        return Rate(jobs, seen - started)


def engine_drain(dsn: str, jobs: int, workers: int, batch: int, workdir: Path, rounds: int = 1) -> list[Rate]:
    """Drain `jobs` no-op jobs with a real `engine run` of `workers` workers at `batch`, `rounds` times."""
    with Engine(dsn, workdir, workers, {"noop": {"handler": NOOP, "batch_size": batch}},
                name=f"drain-w{workers}-b{batch}") as engine:
        return [engine.drain_round("noop", jobs) for _ in range(rounds)]


def engine_drain_end_to_end(dsn: str, jobs: int, workers: int, batch: int, workdir: Path) -> Rate:
    """`engine run --drain` of `jobs` no-op jobs timed from the process's spawn to its exit: start-up,
    the drain, noticing it is done, and stopping all count. The engine's bytecode is compiled first,
    as installing a wheel does (pip compiles it), so an environment with PYTHONDONTWRITEBYTECODE set
    (this suite's machines) does not pay about 60 ms of compiling on every start."""
    compileall.compile_dir(REPO / "engine", quiet=1)
    config = workdir / "e2e.toml"
    config.write_text("[global]\nlog_format = \"json\"\n\n" + _toml_flow("noop", {"handler": NOOP, "batch_size": batch})
                      + "\n")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        conn.execute("DELETE FROM skiplock.jobs WHERE flow = 'noop'")
    with Queue(dsn) as queue:
        for start in range(0, jobs, 100_000):
            queue.enqueue_many("noop", _payloads(min(100_000, jobs - start), start), allow_unknown_flow=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE skiplock.jobs")
        since = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK_")}
    env.update({"SKIPLOCK_DSN": dsn, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    log_path = workdir / "e2e.log"
    with open(log_path, "wb") as log:
        spawned = time.time()
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "engine.cli", "run", "--config", str(config), "--workers",
                                str(workers), "--flows", "noop", "--drain"], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=REPO, preexec_fn=_die_with_parent)
        elapsed = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        done, first_claim, last_ack = conn.execute(
            "SELECT count(DISTINCT id), extract(epoch FROM min(claimed_at))::float8, "
            "extract(epoch FROM max(finished_at))::float8 FROM skiplock.jobs_done WHERE flow = 'noop' "
            "AND finished_at >= to_timestamp(%s)", (since,)).fetchone()
        left = conn.execute("SELECT count(*) FROM skiplock.jobs WHERE flow = 'noop'").fetchone()[0]
    if code != 0 or done != jobs or left:
        raise AssertionError(f"end-to-end drain: exit {code}, {done} of {jobs} done, {left} left; see {log_path}")
    start = first_claim - spawned
    return EndToEnd(jobs, elapsed, start, last_ack - first_claim, elapsed - start - (last_ack - first_claim))


def sweep_flows(batches: list[int]) -> dict[str, dict[str, Any]]:
    """One no-op flow per batch size, so one engine serves the whole sweep (one flow resumed at a time)."""
    return {f"noop_b{b}": {"handler": NOOP, "batch_size": b} for b in batches}


# -- history ---------------------------------------------------------------------------------------

FILL_HISTORY = """
INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, claimed_by, errors,
                                result, run_id, created_at, claimed_at, finished_at)
SELECT g, %(flow)s, jsonb_build_object('n', g, 'kind', 'history'), 0, 1, 5, 'history:0:0:0.1', '[]'::jsonb,
       NULL, NULL, f - interval '20 ms', f - interval '2 ms', f
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     LATERAL (SELECT now() - make_interval(secs => 518400.0 * (%(hi)s - g) / %(rows)s) - interval '1 hour' AS f) t
"""


def fill_history(dsn: str, rows: int, flow: str = "noop") -> float:
    """`rows` completed jobs of `flow` in jobs_done, finished over the last 6 days (inside the default
    7-day retention, so the engine's purge leaves them), ids below every new job's; then VACUUM
    ANALYZE. Returns the seconds it took."""
    started = time.perf_counter()
    with db.connect(dsn, application_name="skiplock-bench") as conn:
        seq = conn.execute("SELECT pg_get_serial_sequence('skiplock.jobs', 'id')").fetchone()[0]
        base = conn.execute(
            f"SELECT greatest((SELECT last_value FROM {seq}), (SELECT coalesce(max(id), 0) FROM skiplock.jobs_done))"
        ).fetchone()[0]
        lo, hi = base + 1, base + rows
        conn.execute(FILL_HISTORY, {"flow": flow, "lo": lo, "hi": hi, "rows": rows})
        conn.execute("SELECT setval(%s, %s)", (seq, hi))
        conn.execute("VACUUM ANALYZE skiplock.jobs_done")
        conn.execute("VACUUM ANALYZE skiplock.jobs")
        count = conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE id BETWEEN %s AND %s", (lo, hi)).fetchone()[0]
    if count != rows:
        raise AssertionError(f"history: {count} rows of {rows}")
    return time.perf_counter() - started


# -- background load -------------------------------------------------------------------------------


# Jobs enqueued and not yet claimed, from ids (they grow with enqueue order): the newest id handed out
# minus the id of the job the next claim would take. Two index-backed lookups, exact enough to steer by.
BACKLOG = """
SELECT s.last_value - coalesce((SELECT id FROM skiplock.jobs WHERE flow = %(flow)s AND status = 'pending'
                                ORDER BY priority DESC, run_at, id LIMIT 1), s.last_value)
FROM skiplock.jobs_id_seq s
"""


def _load_producer(dsn: str, flow: str, rate: float, seconds: float, backlog_cap: float, ready: Any, go: Any,
                   stop: Any, results: Any) -> None:
    tick = 0.01
    with Queue(dsn, application_name="skiplock-bench-load") as queue:
        queue.enqueue_many(flow, [{"warm": 1}], allow_unknown_flow=True)  # connect and check the schema before the barrier
        ready.release()
        go.wait()
        started = next_tick = next_check = time.perf_counter()
        sent = skipped = 0
        backlog = 0
        while not stop.is_set():
            now = time.perf_counter()
            elapsed = now - started
            if elapsed >= seconds:
                break
            if now >= next_check:
                next_check = now + 0.1
                with queue.connection() as conn:
                    backlog = conn.execute(BACKLOG, {"flow": flow}).fetchone()[0]
            due = int(rate * elapsed) - skipped
            if due > sent:
                n = min(due - sent, max(int(rate * 0.25), 1))  # catch up at most a quarter second at once
                if backlog > rate * backlog_cap:
                    skipped += n  # the engine is not keeping up: offered load is shed, not queued
                else:
                    queue.enqueue_many(flow, [{"bg": 1, "n": sent + k} for k in range(n)], allow_unknown_flow=True)
                    sent += n
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        results.put((sent + 1, skipped, time.perf_counter() - started))


class Load:
    """A separate process enqueueing `rate` jobs/s of `flow` in 10 ms slices (COPY), for `seconds`
    or until stopped. `sent` counts every job it enqueued (its warm-up job too).

    When the engine falls behind by more than `backlog_cap` seconds of load, the producer sheds the
    excess (`skipped`) instead of queueing it: a backlog that grows without end would turn latency
    into queueing delay and table size into backlog, and the run would spend minutes draining it.
    `achieved` tells what the engine sustained."""

    def __init__(self, dsn: str, flow: str, rate: float, seconds: float, backlog_cap: float = 2.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._go, self._stop, self._results = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=_load_producer, args=(dsn, flow, rate, seconds, backlog_cap, self._ready,
                                                              self._go, self._stop, self._results))
        self.rate = rate
        self.sent = 0
        self.skipped = 0
        self.seconds = 0.0

    def start(self) -> "Load":
        self._proc.start()
        if not self._ready.acquire(timeout=60):
            raise RuntimeError("load producer did not start")
        self._go.set()
        return self

    def stop(self) -> int:
        self._stop.set()
        self.sent, self.skipped, self.seconds = self._results.get(timeout=120)
        self._proc.join(30)
        return self.sent

    @property
    def achieved(self) -> float:
        return (self.sent - 1) / self.seconds if self.seconds > 0 else 0.0


# -- latency ---------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Latency:
    probes: int
    offered: float  # probes per second asked for
    achieved: float  # probes per second sent
    p50: float  # ms, from just before Queue.enqueue() to the handler's first line
    p95: float
    p99: float
    max: float
    call_p50: float  # ms spent inside Queue.enqueue() (INSERT and its commit)
    call_p99: float
    after_call_p50: float  # ms from enqueue() returning to the handler's first line
    after_call_p99: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_probes(engine: Engine, flow: str | list[str], rate: float, seconds: float) -> Latency:
    """Single `Queue.enqueue` calls of `flow` at `rate` per second for `seconds` (open loop: a late
    call does not delay the schedule), on a connection of their own; every probe must start. With a
    list of flows, probe i goes to flow i modulo its length."""
    flows = [flow] if isinstance(flow, str) else flow
    count = max(1, int(rate * seconds))
    first = engine.probes  # probe numbers are unique for the engine's life: its stamp files only grow
    engine.probes += count
    interval = 1.0 / rate
    calls: list[tuple[float, float]] = []
    with Queue(engine.dsn, application_name="skiplock-bench-probe") as queue:
        queue.enqueue(flows[0], {"warm": 1}, allow_unknown_flow=True)  # connects and checks the schema outside the measurement
        time.sleep(0.2)
        next_at = time.perf_counter()
        for i in range(count):
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.time()
            queue.enqueue(flows[i % len(flows)], {"i": first + i, "t": sent})
            calls.append((sent, time.time()))
            next_at += interval
        span = calls[-1][0] - calls[0][0]
    deadline = time.monotonic() + 60
    while True:
        stamps = read_stamps(engine.stamps)
        if all(first + i in stamps for i in range(count)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = [i for i in range(count) if first + i not in stamps]
    if missing:
        raise AssertionError(f"{len(missing)} of {count} probes never started (first: {missing[:5]})")
    total = sorted((stamps[first + i][1] - calls[i][0]) * 1000.0 for i in range(count))
    call = sorted((after - sent) * 1000.0 for sent, after in calls)
    after = sorted((stamps[first + i][1] - calls[i][1]) * 1000.0 for i in range(count))
    return Latency(count, rate, (count - 1) / span if span > 0 else 0.0,
                   percentile(total, 50), percentile(total, 95), percentile(total, 99), total[-1],
                   percentile(call, 50), percentile(call, 99), percentile(after, 50), percentile(after, 99))


# -- sizes -----------------------------------------------------------------------------------------

SIZES = """
SELECT pg_total_relation_size('skiplock.jobs'), pg_relation_size('skiplock.jobs'),
       pg_indexes_size('skiplock.jobs'), pg_total_relation_size('skiplock.jobs_done'),
       s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.vacuum_count
FROM pg_stat_user_tables s WHERE s.relid = 'skiplock.jobs'::regclass
"""


@dataclass
class Sizes:
    at: float  # seconds since the soak started
    jobs_total: int  # bytes: heap, indexes, TOAST
    jobs_heap: int
    jobs_indexes: int
    jobs_done_total: int
    live_tuples: int  # statistics (up to a second behind)
    dead_tuples: int
    autovacuums: int
    vacuums: int
    backlog: int  # jobs waiting to be claimed (see BACKLOG)


def sizes(conn: psycopg.Connection[Any], at: float, flow: str) -> Sizes:
    row = conn.execute(SIZES).fetchone()
    backlog = conn.execute(BACKLOG, {"flow": flow}).fetchone()[0]
    return Sizes(round(at, 2), *(int(v) for v in row), int(backlog))


@dataclass
class Soak:
    rate: float  # offered, jobs/s
    seconds: float
    jobs: int  # enqueued and completed
    shed: int  # offered but not enqueued because the engine was behind (see Load)
    samples: list[Sizes] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        return self.jobs / self.seconds

    @property
    def start(self) -> Sizes:
        return self.samples[0]

    @property
    def end(self) -> Sizes:
        return self.samples[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "seconds": self.seconds, "jobs": self.jobs, "shed": self.shed,
                "achieved": self.achieved, "samples": [asdict(s) for s in self.samples]}


def soak(engine: Engine, flow: str, rate: float, seconds: float, sample_every: float) -> Soak:
    """Steady load of `rate` jobs/s through the engine for `seconds`; sizes of skiplock.jobs sampled
    every `sample_every` s from just before the load to its end, then the backlog drains."""
    assert engine.conn is not None
    engine.queue.resume(flow)
    samples = [sizes(engine.conn, 0.0, flow)]
    since = time.time()
    load = Load(engine.dsn, flow, rate, seconds).start()
    started = time.monotonic()
    next_sample = sample_every
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            break
        if engine.process is not None and engine.process.poll() is not None:
            load.stop()
            raise AssertionError(f"engine exited mid-soak:\n{engine.log_tail()}")
        if elapsed >= next_sample:
            samples.append(sizes(engine.conn, elapsed, flow))
            next_sample += sample_every
        time.sleep(min(0.25, max(0.0, next_sample - elapsed)))
    sent = load.stop()
    samples.append(sizes(engine.conn, time.monotonic() - started, flow))
    engine.wait_drained(flow, timeout=300)
    engine.check_completed(flow, since - 1.0, sent)
    return Soak(rate, seconds, sent, load.skipped, samples)

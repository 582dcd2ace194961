"""Snapshot reads and operator actions: the console's synchronous side of the database.

The console reads a snapshot of the tables every refresh interval (in a thread worker, so a slow
database never freezes the keys) and follows the engine live over LISTEN/NOTIFY (console/feed.py).
Every read here is bounded: per-flow counts stop at `COUNT_CAP` rows through the partial indexes and
fall back to the planner's estimate beyond it, rates and history come from `skiplock.stats_minute`,
latency percentiles from a LIMITed sample of recent `jobs_done` rows. The statements are in
engine/sql/queries.sql under `-- console`, sent through engine/store.py, whose `class_row` reads fill
the row classes below (their fields are the column aliases); dead-letter listing, retry, purge, pause and the job
detail go through the public `engine.queue.Queue` API, whose SQL is guarded by status.

Each read takes `now`: None means the server's clock; tests pass a fixed time so what the console
shows is deterministic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, TypeVar

import orjson
import psycopg

from engine import db, store
from engine.errors import JobNotFound
from engine.explain import Explanation
from engine.pipelines import Pipeline
from engine.queue import (CancelReport, DeadLetter, DeadLetterFilter, Job, JobFilter, JobSummary, Queue, RunningJob,
                          Schedule)
from engine.health import Facts, Thresholds, read_facts
from engine.store import ChildJob
from engine.telemetry import CONSOLE_APPLICATION_NAME

APPLICATION_NAME: Final = CONSOLE_APPLICATION_NAME
COUNT_CAP: Final = 5_000  # exact counts up to this many rows per flow and state, then an estimate
HISTORY_MINUTES: Final = 60
LATENCY_SECONDS: Final = 10.0  # a short window: the LIMITed sample is then close to now
LATENCY_SAMPLE: Final = 3_000
LATENCY_MIN_SAMPLES: Final = 10  # fewer: the overview shows the mean from stats_minute instead
WORKERS_LIMIT: Final = 200
RUNS_LIMIT: Final = 20
DEAD_LIMIT: Final = 500
JOBS_LIMIT: Final = 500
ACTION_TIMEOUT_MS: Final = 30_000  # an operator's purge of many rows may take longer than a refresh
ENGINE_COMMAND_TIMEOUT: Final = 20.0  # seconds the Engines view waits for an engine to acknowledge

T = TypeVar("T")


def statement_timeout_ms(refresh_interval: float) -> int:
    """Shorter than the refresh interval, so a slow read gives up before the next one is due."""
    return int(max(0.2, min(refresh_interval * 0.75, 10.0)) * 1000)


# ---------------------------------------------------------------------------------------------
# What a snapshot holds


@dataclass(frozen=True)
class FlowRow:
    name: str
    paused: bool
    circuit_state: str  # closed | open | half_open
    circuit_open_for: float | None  # seconds until an open circuit goes half-open
    max_attempts: int | None
    ready: int  # pending and due now
    scheduled: int  # pending with run_at in the future (delayed, or backing off before a retry)
    retrying: int  # pending jobs that failed before (attempts > 0)
    pending_total: int
    running: int
    dead: int
    pending_estimate: int | None = None  # planner estimate when pending_total reached COUNT_CAP
    dead_estimate: int | None = None

    @property
    def state(self) -> str:
        if self.paused:
            return "paused"
        if self.circuit_state == "open" and (self.circuit_open_for is None or self.circuit_open_for > 0):
            return "circuit open"
        if self.circuit_state in ("open", "half_open"):
            return "half-open"
        return "active"


@dataclass(frozen=True)
class MinuteStats:
    minute: float  # unix seconds at the start of the minute
    flow: str
    completed: int
    failed: int
    dead: int
    rescued: int
    wait_ms_sum: float
    run_ms_sum: float


@dataclass(frozen=True)
class Latency:
    samples: int
    wait_p50: float | None
    wait_p95: float | None
    run_p50: float | None
    run_p95: float | None


@dataclass(frozen=True)
class WorkerRow:
    id: str
    engine_id: str
    host: str
    pid: int
    state: str
    flows: list[str]
    uptime: float
    heartbeat_age: float
    counters: dict[str, Any]
    pool: dict[str, Any]

    @property
    def live(self) -> bool:
        return self.state not in ("stopped", "lost")


@dataclass(frozen=True)
class RunRow:
    id: str
    flow: str
    total: int
    completed: int
    dead: int
    age: float  # seconds since the run was created
    took: float | None  # seconds from creation to finish, when finished

    @property
    def done(self) -> int:
        return self.completed + self.dead

    @property
    def finished(self) -> bool:
        return self.took is not None


@dataclass(frozen=True)
class Snapshot:
    now: float  # the reference time of every age in it (unix seconds)
    server_version: str
    flows: list[FlowRow]
    history: list[MinuteStats]
    latency: dict[str, Latency]
    workers: list[WorkerRow]
    runs: list[RunRow]
    timings_ms: dict[str, float] = field(default_factory=dict)
    health: Facts | None = None  # engine/health.py's facts, read in the same transaction

    @property
    def live_workers(self) -> list[WorkerRow]:
        return [w for w in self.workers if w.live]

    @property
    def engines(self) -> int:
        return len({w.engine_id for w in self.workers if w.live})


@dataclass(frozen=True)
class DeadLetterPage:
    letters: list[DeadLetter]
    by_error: list[dict[str, Any]]  # Queue.analyze_dead(): flow, error_type, count, first_at, last_at, sample
    where: DeadLetterFilter
    now: float
    limit: int
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobsPage:
    """What the jobs screen lists: Queue.list_jobs() for `where`, at most `limit` rows."""

    jobs: list[JobSummary]
    where: JobFilter
    now: float
    limit: int


@dataclass(frozen=True)
class RunningPage:
    """The Running view: Queue.running(), at most `limit` rows, and the reference time of their ages."""

    jobs: list[RunningJob]
    now: float
    limit: int


@dataclass(frozen=True)
class SchedulePage:
    """Every schedule (Queue.schedules()) and the reference time of its relative times."""

    schedules: list[Schedule]
    now: float


@dataclass(frozen=True)
class EnginePage:
    """The fleet's engines (store.engines_list: gone ones flagged) as the Engines view shows them."""

    engines: list[store.EngineRow]


# ---------------------------------------------------------------------------------------------
# The data source


class DataSource:
    """One read connection (snapshots, dead letters, job detail) and one for operator actions, both
    opened lazily, named `skiplock-console`, and reopened after the database comes back.

    Methods are blocking: the app calls them from thread workers. A lock serialises them per
    connection. `now` (a callable returning unix seconds, or None for the server's clock) is the
    reference time passed to every read.
    """

    def __init__(self, dsn: str, *, refresh_interval: float = 2.0,
                 now: Callable[[], float] | None = None, count_cap: int = COUNT_CAP,
                 thresholds: Thresholds = Thresholds()) -> None:
        self.dsn = dsn
        self.thresholds = thresholds
        self.refresh_interval = refresh_interval
        self.count_cap = count_cap
        self._now = now
        self._read: psycopg.Connection[Any] | None = None
        self._write: psycopg.Connection[Any] | None = None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()

    # -- connections -------------------------------------------------------------------------------

    def _reader(self) -> psycopg.Connection[Any]:
        if self._read is None or self._read.closed or self._read.broken:
            self._read = db.connect(self.dsn, application_name=APPLICATION_NAME,
                                    statement_timeout_ms=statement_timeout_ms(self.refresh_interval))
        return self._read

    def _writer(self) -> psycopg.Connection[Any]:
        if self._write is None or self._write.closed or self._write.broken:
            self._write = db.connect(self.dsn, application_name=APPLICATION_NAME,
                                     statement_timeout_ms=ACTION_TIMEOUT_MS)
        return self._write

    def close(self) -> None:
        for conn in (self._read, self._write):
            if conn is not None and not conn.closed:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not hide the error that broke it
                    pass
        self._read = self._write = None

    def _reading(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._read_lock:
            try:
                return work(self._reader())
            except psycopg.OperationalError:
                # The connection is gone (server restart, network): drop it, the next call reconnects.
                if self._read is not None:
                    try:
                        self._read.close()
                    except Exception:
                        pass
                self._read = None
                raise

    def _writing(self, work: Callable[[Queue], T]) -> T:
        with self._write_lock:
            try:
                return work(Queue(conn=self._writer(), check_schema=False))
            except psycopg.OperationalError:
                if self._write is not None:
                    try:
                        self._write.close()
                    except Exception:
                        pass
                self._write = None
                raise

    def _reference(self) -> datetime | None:
        now = self._now() if self._now is not None else None
        return datetime.fromtimestamp(now, timezone.utc) if now is not None else None

    # -- reads ---------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything the overview shows, read in one repeatable-read transaction."""
        return self._reading(self._snapshot)

    def _snapshot(self, conn: psycopg.Connection[Any]) -> Snapshot:
        ref = self._reference()
        timings: dict[str, float] = {}

        def timed(name: str, read: Callable[[], T]) -> T:
            started = time.perf_counter()
            result = read()
            timings[name] = (time.perf_counter() - started) * 1000.0
            return result

        with conn.transaction():
            store.console_snapshot_begin(conn)
            now, server_version = timed("now", lambda: store.console_now(conn, ref))
            flows = timed("flows", lambda: store.console_flows(conn, FlowRow, ref, self.count_cap))
            history = timed("history", lambda: store.console_history(conn, MinuteStats, ref, HISTORY_MINUTES))
            latency = timed("latency", lambda: store.console_latency(conn, Latency, ref, LATENCY_SECONDS,
                                                                     LATENCY_SAMPLE))
            workers = timed("workers", lambda: store.console_workers(conn, WorkerRow, ref, WORKERS_LIMIT))
            runs = timed("runs", lambda: store.console_runs(conn, RunRow, ref, RUNS_LIMIT))
            health = timed("health", lambda: read_facts(conn, self.thresholds, now=ref, ping=False))
        if any(f.pending_total >= self.count_cap or f.dead >= self.count_cap for f in flows):
            started = time.perf_counter()
            flows = [self._with_estimates(conn, f) for f in flows]
            timings["estimates"] = (time.perf_counter() - started) * 1000.0
        return Snapshot(now=now.timestamp(), server_version=server_version, flows=flows, history=history,
                        latency=latency, workers=workers, runs=runs, timings_ms=timings,
                        health=health)

    def _with_estimates(self, conn: psycopg.Connection[Any], flow: FlowRow) -> FlowRow:
        """Past the cap an exact count would read every row: ask the planner instead (Oban does too)."""
        pending = dead = None  # stays None when the statistics are stale (estimate under the cap): "5,000+"
        if flow.pending_total >= self.count_cap:
            estimate = self._estimate(conn, flow.name, "pending")
            pending = estimate if estimate > self.count_cap else None
        if flow.dead >= self.count_cap:
            estimate = self._estimate(conn, flow.name, "dead")
            dead = estimate if estimate > self.count_cap else None
        return FlowRow(**{**flow.__dict__, "pending_estimate": pending, "dead_estimate": dead})

    @staticmethod
    def _estimate(conn: psycopg.Connection[Any], flow: str, status: str) -> int:
        plan = store.console_estimate(conn, flow, status)
        if isinstance(plan, (str, bytes)):
            plan = orjson.loads(plan)
        try:
            return int(plan[0]["Plan"]["Plan Rows"])  # type: ignore[index]
        except (TypeError, KeyError, IndexError, ValueError):
            return 0

    def dead_letters(self, where: DeadLetterFilter, limit: int = DEAD_LIMIT) -> DeadLetterPage:
        def read(conn: psycopg.Connection[Any]) -> DeadLetterPage:
            queue = Queue(conn=conn, check_schema=False)
            started = time.perf_counter()
            now, _ = store.console_now(conn, self._reference())
            letters = queue.dead_letters(where, limit=limit)
            listed = time.perf_counter()
            by_error = queue.analyze_dead(where.flow)
            done = time.perf_counter()
            return DeadLetterPage(letters, by_error, where, now.timestamp(), limit,
                                  {"dlq_list": (listed - started) * 1000.0, "dlq_analyze": (done - listed) * 1000.0})

        return self._reading(read)

    def recent_dead(self, limit: int = 50) -> list[DeadLetter]:
        """The latest dead letters: what the failures screen shows before live failures arrive."""
        return self._reading(lambda conn: Queue(conn=conn, check_schema=False).dead_letters(limit=limit))

    def job(self, job_id: int) -> Job | None:
        return self._reading(lambda conn: Queue(conn=conn, check_schema=False).job(job_id))

    def explain(self, job_id: int) -> Explanation | None:
        """Why the job waits, or what runs it (None: no such job any more)."""
        def read(conn: psycopg.Connection[Any]) -> Explanation | None:
            try:
                return Queue(conn=conn, check_schema=False).explain(job_id)
            except JobNotFound:
                return None

        return self._reading(read)

    def jobs(self, where: JobFilter, limit: int = JOBS_LIMIT) -> JobsPage:
        def read(conn: psycopg.Connection[Any]) -> JobsPage:
            now, _ = store.console_now(conn, self._reference())
            return JobsPage(Queue(conn=conn, check_schema=False).list_jobs(where, limit=limit), where,
                            now.timestamp(), limit)

        return self._reading(read)

    def schedules(self) -> SchedulePage:
        def read(conn: psycopg.Connection[Any]) -> SchedulePage:
            now, _ = store.console_now(conn, self._reference())
            return SchedulePage(Queue(conn=conn, check_schema=False).schedules(), now.timestamp())

        return self._reading(read)

    def running(self, limit: int = JOBS_LIMIT) -> RunningPage:
        def read(conn: psycopg.Connection[Any]) -> RunningPage:
            now, _ = store.console_now(conn, self._reference())
            return RunningPage(Queue(conn=conn, check_schema=False).running(limit), now.timestamp(), limit)

        return self._reading(read)

    def pipelines(self) -> list[Pipeline]:
        return self._reading(lambda conn: Queue(conn=conn, check_schema=False).pipelines())

    def job_children(self, job_id: int, limit: int = 50) -> list[ChildJob]:
        return self._reading(lambda conn: Queue(conn=conn, check_schema=False).job_children(job_id, limit))

    # -- operator actions: every one returns the ids it changed -------------------------------------

    def cancel_running(self, ids: list[int]) -> CancelReport:
        """Ask the workers running these jobs to stop them (they end cancelled within cancel_grace)."""
        return self._writing(lambda queue: queue.cancel(ids, status="running"))

    def cancel(self, ids: list[int]) -> CancelReport:
        return self._writing(lambda queue: queue.cancel(ids, status=("pending", "scheduled")))

    def purge_cancelled(self, ids: list[int]) -> list[int]:
        return self._writing(lambda queue: queue.purge_cancelled(ids))

    def retry(self, where: DeadLetterFilter) -> list[int]:
        return self._writing(lambda queue: queue.retry_dead(where))

    def retry_all(self) -> list[int]:
        return self._writing(lambda queue: queue.retry_all_dead())

    def purge(self, where: DeadLetterFilter) -> list[int]:
        return self._writing(lambda queue: queue.purge_dead(where))

    def set_paused(self, flow: str, paused: bool) -> None:
        self._writing(lambda queue: queue.pause(flow) if paused else queue.resume(flow))

    def set_schedule_paused(self, name: str, paused: bool) -> None:
        self._writing(lambda queue: queue.pause_schedule(name) if paused else queue.resume_schedule(name))

    def trigger_schedule(self, name: str) -> int:
        return self._writing(lambda queue: queue.trigger_schedule(name))

    # -- the control plane (engine/control.py) -----------------------------------------------------

    def engines(self) -> EnginePage:
        return self._reading(lambda conn: EnginePage(store.engines_list(conn, limit=500)))

    def engine_command(self, engine_id: str, command: str, workers: int | None) -> str:
        """Send a command and wait for the engine's acknowledgement; its outcome, or SkiplockError."""
        from engine import control

        def send(queue: Queue) -> str:
            with queue.connection() as conn:
                return control.send_command(conn, engine_id, command, workers, timeout=ENGINE_COMMAND_TIMEOUT).outcome

        return self._writing(send)


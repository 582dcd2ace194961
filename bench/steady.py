"""Steady state (issue 17 items 1, 2 and 5): producers enqueue at a fixed offered rate while the
consumer drains, next to the raw-SQL pair in the same run.

- The engine: a `Load` process (Queue.enqueue_many every 10 ms) into a real `engine run`.
- The raw pair: a raw COPY producer (the same 10 ms slices, same shedding rule) into the raw ceiling's
  table, and 2 raw claim/ack drainers (the raw ceiling's loop; 1 ms sleep when they find nothing).

A step offers one rate for a fixed time. It is sustained when nothing was shed, the producer sent at
least 95% of the offered rate, and the backlog at the end is under one second of load. The ramp
raises the rate by RAMP_FACTOR until a step is not sustained, then tries the midpoint once. WAL bytes
per completed job come from pg_current_wal_lsn() deltas over each step (the whole server: the
engine's heartbeats, telemetry and stats are counted, as they are part of its cost).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psycopg

from bench.workloads import RAW_ACK, RAW_CLAIM, RAW_DDL, BACKLOG, Engine, Load, sizes

RAMP_FACTOR = 1.3
RAW_BACKLOG = """
SELECT (SELECT last_value FROM bench_raw_jobs_id_seq)
       - coalesce((SELECT min(id) FROM bench_raw_jobs WHERE status = 0), (SELECT last_value FROM bench_raw_jobs_id_seq))
"""
RAW_SIZES = "SELECT pg_total_relation_size('bench_raw_jobs'), pg_indexes_size('bench_raw_jobs')"
WINDOW_SLACK = 1.0  # seconds: see trend_mb_per_min
# A flow's jobs completed since a time, counted exactly (a scan of that much history).
DONE_SINCE = "SELECT count(*) FROM skiplock.jobs_done WHERE flow = %s AND finished_at >= %s"
# Rows ever inserted into jobs_done (all flows: the steady database serves one), from the statistics.
DONE_INSERTED = "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'skiplock.jobs_done'::regclass"


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()[0])


@dataclass
class Step:
    rate: float  # offered, jobs/s
    seconds: float
    sent: int
    shed: int
    completed: int
    backlog_end: int
    wal_bytes: int

    @property
    def achieved(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def wal_per_job(self) -> float:
        return self.wal_bytes / self.completed if self.completed else 0.0

    @property
    def sustained(self) -> bool:
        return (self.shed == 0 and self.sent >= 0.95 * self.rate * self.seconds
                and self.backlog_end <= self.rate * 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved": self.achieved, "wal_per_job": self.wal_per_job,
                "sustained": self.sustained}


@dataclass
class Ramp:
    steps: list[Step] = field(default_factory=list)

    @property
    def best(self) -> Step | None:
        good = [s for s in self.steps if s.sustained]
        return max(good, key=lambda s: s.rate) if good else None

    @property
    def sustained_rate(self) -> float:
        return self.best.rate if self.best else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "sustained_rate": self.sustained_rate}


def ramp(step: Callable[[float], Step], start: float, limit: int = 12) -> Ramp:
    """Raise the offered rate until a step fails, then try the midpoint of the last good and the
    failed rate once. When the first rate already fails (a loaded machine), halve it until a step
    holds, then go up from there."""
    result = Ramp()
    rate = start
    for _ in range(limit):
        s = step(rate)
        result.steps.append(s)
        if s.sustained:
            rate *= RAMP_FACTOR
            continue
        good = result.best
        if good is None:
            rate /= 2  # nothing sustained yet: look lower
            continue
        if rate > good.rate * 1.05:
            result.steps.append(step((good.rate + rate) / 2))
        break
    return result


# -- the raw pair ----------------------------------------------------------------------------------


def _raw_producer(dsn: str, rate: float, seconds: float, backlog_cap: float, ready: Any, go: Any, results: Any) -> None:
    tick = 0.01
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        ready.release()
        go.wait()
        started = next_tick = next_check = time.perf_counter()
        sent = skipped = backlog = 0
        while True:
            now = time.perf_counter()
            elapsed = now - started
            if elapsed >= seconds:
                break
            if now >= next_check:
                next_check = now + 0.1
                backlog = conn.execute(RAW_BACKLOG).fetchone()[0] or 0
            due = int(rate * elapsed) - skipped
            if due > sent:
                n = min(due - sent, max(int(rate * 0.25), 1))
                if backlog > rate * backlog_cap:
                    skipped += n
                else:
                    text = "".join(f'{{"n": {sent + k}, "kind": "bench"}}\n' for k in range(n))
                    with conn.cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
                        copy.write(text)
                    sent += n
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        results.put(("producer", sent, skipped))


def _raw_consumer(dsn: str, batch: int, ready: Any, go: Any, stop: Any, results: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        ready.release()
        go.wait()
        done = 0
        while not stop.is_set():
            rows = conn.execute(RAW_CLAIM, (batch,)).fetchall()
            if not rows:
                time.sleep(0.001)
                continue
            conn.execute(RAW_ACK, ([row[0] for row in rows],))
            done += len(rows)
        results.put(("consumer", done, 0))


def _next_result(results: Any, procs: list[Any], seconds: float) -> Any:
    """The next child's result; a child that died without one fails the step at once with its exit code."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            dead = [proc for proc in procs if proc.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"raw pair child {dead[0].name} died with exit code {dead[0].exitcode}")
    raise RuntimeError(f"raw pair: no result within {seconds:.0f} s")


class RawPair:
    """The raw COPY producer and `consumers` raw drainers on the raw table of `dsn`."""

    def __init__(self, dsn: str, consumers: int = 2, batch: int = 500) -> None:
        self.dsn = dsn
        self.consumers = consumers
        self.batch = batch
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(RAW_DDL)

    def step(self, rate: float, seconds: float) -> Step:
        ctx = multiprocessing.get_context("spawn")
        ready, go, stop, results = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_raw_consumer, args=(self.dsn, self.batch, ready, go, stop, results))
                 for _ in range(self.consumers)]
        procs.append(ctx.Process(target=_raw_producer, args=(self.dsn, rate, seconds, 2.0, ready, go, results)))
        for proc in procs:
            proc.start()
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("raw pair did not start")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            wal_before = wal_lsn(conn)
            go.set()
            time.sleep(seconds)
            outcomes = [_next_result(results, procs, 600)]  # the producer, when its time is up (late on a loaded machine)
            backlog = int(conn.execute(RAW_BACKLOG).fetchone()[0] or 0)
            stop.set()
            outcomes += [_next_result(results, procs, 600) for _ in range(self.consumers)]
            wal_after = wal_lsn(conn)
            for proc in procs:
                proc.join(30)
            conn.execute("DELETE FROM bench_raw_jobs")  # what the step left behind: the next starts empty
            # and vacuumed, as the engine's table is by its vacuum pass: otherwise each raw step inherits
            # the dead tuples of all the steps before it (autovacuum wakes once a minute).
            conn.execute("VACUUM bench_raw_jobs")
        sent = sum(n for kind, n, _ in outcomes if kind == "producer")
        shed = sum(s for kind, _, s in outcomes if kind == "producer")
        completed = sum(n for kind, n, _ in outcomes if kind == "consumer")
        return Step(rate, seconds, sent, shed, completed, backlog, wal_after - wal_before)

    def sizes(self) -> tuple[int, int]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            total, indexes = conn.execute(RAW_SIZES).fetchone()
        return int(total), int(indexes)


# -- the engine ------------------------------------------------------------------------------------


def engine_step(engine: Engine, flow: str, rate: float, seconds: float) -> Step:
    """`rate` jobs/s offered to a running engine for `seconds`; completions counted from jobs_done."""
    conn = engine.conn
    assert conn is not None
    engine.wait_drained(flow, timeout=300)
    since = conn.execute("SELECT now()").fetchone()[0]
    wal_before = wal_lsn(conn)
    load = Load(engine.dsn, flow, rate, seconds).start()
    time.sleep(seconds)
    sent = load.stop()
    backlog = int(conn.execute(BACKLOG, {"flow": flow}).fetchone()[0] or 0)
    completed = conn.execute(DONE_SINCE, (flow, since)).fetchone()[0]
    wal_after = wal_lsn(conn)
    return Step(rate, load.seconds or seconds, sent, load.skipped, int(completed), backlog, wal_after - wal_before)


@dataclass
class SizeSample:
    at: float
    jobs_total_mb: float
    jobs_indexes_mb: float
    jobs_done_total_mb: float
    dead_tuples: int
    autovacuums: int
    vacuums: int
    backlog: int
    completed: int  # since the run started: statistics (up to a second behind), exact in the last sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steady_run(engine: Engine, flow: str, rate: float, seconds: float, sample_every: float) -> tuple[Step, list[SizeSample]]:
    """A long step at `rate`, sampling the hot table's size every `sample_every` s."""
    conn = engine.conn
    assert conn is not None
    engine.wait_drained(flow, timeout=300)
    mb = 1024 * 1024
    since = conn.execute("SELECT now()").fetchone()[0]
    wal_before = wal_lsn(conn)

    inserted_before = conn.execute(DONE_INSERTED).fetchone()[0]

    def sample(at: float, exact: bool = False) -> SizeSample:
        s = sizes(conn, at, flow)
        # Mid-run, from the statistics: an exact count scans the run's whole history (20 M rows by the
        # tenth minute), and its snapshot, held for seconds, keeps VACUUM from removing the hot table's
        # dead tuples, so the table grew while the bench measured it (session 11).
        if exact:
            done = conn.execute(DONE_SINCE, (flow, since)).fetchone()[0]
        else:
            done = conn.execute(DONE_INSERTED).fetchone()[0] - inserted_before
        return SizeSample(round(at, 1), s.jobs_total / mb, s.jobs_indexes / mb, s.jobs_done_total / mb,
                          s.dead_tuples, s.autovacuums, s.vacuums, s.backlog, int(done))

    samples = [sample(0.0)]
    load = Load(engine.dsn, flow, rate, seconds).start()
    started = time.monotonic()
    next_sample = sample_every
    while (elapsed := time.monotonic() - started) < seconds:
        if engine.process is not None and engine.process.poll() is not None:
            load.stop()
            raise AssertionError(f"engine exited mid-run:\n{engine.log_tail()}")
        if elapsed >= next_sample:
            samples.append(sample(elapsed))
            next_sample += sample_every
        time.sleep(min(0.25, max(0.0, next_sample - elapsed)))
    sent = load.stop()
    samples.append(sample(time.monotonic() - started, exact=True))  # the run is over; sizes are read first
    backlog = samples[-1].backlog
    wal_after = wal_lsn(conn)
    return Step(rate, load.seconds or seconds, sent, load.skipped, samples[-1].completed, backlog,
                wal_after - wal_before), samples


def trend_mb_per_min(samples: list[SizeSample], last_seconds: float) -> float:
    """Least-squares slope of the hot table's total size over the last `last_seconds`, MB per minute.
    The window includes the sample that opens it: the last one is taken a moment after the run's end
    (600.1 s), and a strict window left the 420 s sample out, so a step in the eighth minute of a
    10-minute run was never seen (session 11)."""
    end = samples[-1].at
    points = [(s.at, s.jobs_total_mb) for s in samples if s.at >= end - last_seconds - WINDOW_SLACK]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if not var:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in points) / var

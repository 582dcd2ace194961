"""Fleet-scale workloads (issue 17 items 3-4): one engine serving many flows, many engines on one
database. Process figures (CPU seconds, RSS, USS) come from psutil; connections from pg_stat_activity.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import psycopg

from bench.workloads import NOOP, Engine, Rate, _payloads
from engine.telemetry import ENQUEUED_CHANNEL


def many_flows(count: int, handler: str = NOOP, batch: int = 500) -> dict[str, dict[str, Any]]:
    """`count` flows of the same handler: f0000, f0001, ..."""
    return {f"f{i:04d}": {"handler": handler, "batch_size": batch} for i in range(count)}


def tree(pid: int) -> list[psutil.Process]:
    """An engine's processes: the supervisor and every worker it forked."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def backends(conn: psycopg.Connection[Any]) -> list[psutil.Process]:
    """The server backends of this database (the engine's connections), bench connections excluded."""
    pids = [row[0] for row in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name NOT LIKE 'skiplock-bench%%'")]
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return found


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


@dataclass
class IdleCpu:
    seconds: float
    engine_pct: float  # % of one core: the engine's processes
    server_pct: float  # % of one core: the backends serving it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def idle_cpu(engine: Engine, seconds: float) -> IdleCpu:
    """CPU the engine (and its backends) burn doing nothing for `seconds`, as % of one core."""
    assert engine.process is not None and engine.conn is not None
    procs, servers = tree(engine.process.pid), backends(engine.conn)
    before, before_s = cpu_seconds(procs), cpu_seconds(servers)
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return IdleCpu(round(elapsed, 2), 100.0 * (cpu_seconds(procs) - before) / elapsed,
                   100.0 * (cpu_seconds(servers) - before_s) / elapsed)


def set_paused(conn: psycopg.Connection[Any], flows: list[str], paused: bool) -> None:
    """All these flows paused or resumed in one statement (the bench's shortcut for Queue.pause per
    flow), then one wake-up for the workers."""
    conn.execute("INSERT INTO skiplock.flows (name, paused) SELECT unnest(%s::text[]), %s "
                 "ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()", (flows, paused))
    if not paused:
        conn.execute("SELECT pg_notify(%s, '')", (ENQUEUED_CHANNEL,))


def spread_drain(engine: Engine, flows: list[str], jobs: int) -> Rate:
    """`jobs` no-op jobs spread evenly over `flows` (one flow: all in it), enqueued while paused;
    timed from the resume of all of them to the moment nothing is pending or running."""
    conn = engine.conn
    assert conn is not None
    queue = engine.queue
    set_paused(conn, flows, True)
    conn.execute("CHECKPOINT")
    first_id = conn.execute("SELECT last_value FROM skiplock.jobs_id_seq").fetchone()[0]  # this round's ids are above
    per, extra = divmod(jobs, len(flows))
    start = 0
    for i, flow in enumerate(flows):
        n = per + (1 if i < extra else 0)
        if n:
            queue.enqueue_many(flow, _payloads(n, start), allow_unknown_flow=True)
            start += n
    engine.vacuum()
    since = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()[0]
    started = time.time()
    set_paused(conn, flows, False)
    deadline = time.monotonic() + 600
    while conn.execute("SELECT EXISTS (SELECT 1 FROM skiplock.jobs WHERE status IN ('pending', 'running'))"
                       ).fetchone()[0]:
        if engine.process is not None and engine.process.poll() is not None:
            raise AssertionError(f"engine exited mid-drain:\n{engine.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError("spread drain did not finish within 600 s")
        time.sleep(0.01)
    seen = time.time()
    done, distinct = conn.execute("SELECT count(*), count(DISTINCT id) FROM skiplock.jobs_done "
                                  "WHERE id > %s AND finished_at >= to_timestamp(%s)", (first_id, since - 1.0)).fetchone()
    left = conn.execute("SELECT count(*) FROM skiplock.jobs").fetchone()[0]
    if done != jobs or distinct != jobs or left:
        raise AssertionError(f"spread drain: {done} completions ({distinct} distinct) of {jobs}, {left} left")
    return Rate(jobs, seen - started)


@dataclass
class Memory:
    processes: int
    rss_mb_per_worker: float
    uss_mb_per_worker: float
    rss_mb_total: float  # every engine process, supervisors included
    uss_mb_total: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory(engines: list[Engine]) -> Memory:
    """RSS and USS (memory only this process holds: what another forked worker really costs)."""
    supervisors, workers = [], []
    for engine in engines:
        assert engine.process is not None
        procs = tree(engine.process.pid)
        supervisors.append(procs[0])
        workers += procs[1:]
    mb = 1024 * 1024

    def full(proc: psutil.Process) -> tuple[float, float]:
        try:
            info = proc.memory_full_info()
            return info.rss / mb, info.uss / mb
        except psutil.Error:
            return 0.0, 0.0

    w = [full(p) for p in workers]
    s = [full(p) for p in supervisors]
    n = max(len(w), 1)
    return Memory(len(w) + len(s), sum(r for r, _ in w) / n, sum(u for _, u in w) / n,
                  sum(r for r, _ in w + s), sum(u for _, u in w + s))


@dataclass
class Connections:
    idle: int
    busy: int  # active or idle in transaction
    total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def connections(conn: psycopg.Connection[Any]) -> Connections:
    idle, busy = conn.execute(
        "SELECT count(*) FILTER (WHERE state = 'idle'), count(*) FILTER (WHERE state <> 'idle') "
        "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND application_name NOT LIKE 'skiplock-bench%%'").fetchone()
    return Connections(int(idle), int(busy), int(idle) + int(busy))


def statement_counts(conn: psycopg.Connection[Any]) -> dict[str, float] | None:
    """Calls so far of the supervisors' fleet-wide work (rescue and leader statements), when
    pg_stat_statements is there; None otherwise."""
    try:
        rows = conn.execute(
            "SELECT query, calls FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())").fetchall()
    except psycopg.Error:
        return None
    return {q: float(c) for q, c in rows}


def xact_count(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                            "WHERE datname = current_database()").fetchone()[0])

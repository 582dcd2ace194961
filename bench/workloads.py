"""Workloads measured by the benchmark suite, as plain functions returning rates.

Every figure is a ratio to a ceiling measured in the same run on the same database: the raw-SQL
drain (a minimal table, batch claim with FOR UPDATE SKIP LOCKED and batch ack, one statement each,
no engine code) and raw COPY. Timings start when every process is connected and ready (a barrier),
so process start-up and imports are not counted on either side.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from engine import db
from engine.queue import Queue

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


@dataclass(frozen=True)
class Rate:
    jobs: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0


def _payloads(n: int) -> list[dict[str, Any]]:
    return [{"n": i, "kind": "bench"} for i in range(n)]


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


def raw_drain(dsn: str, jobs: int, processes: int, batch: int = 500) -> Rate:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RAW_DDL)
        with conn.cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
            copy.write("".join(f'{{"n": {i}, "kind": "bench"}}\n' for i in range(jobs)))
        conn.execute("VACUUM ANALYZE bench_raw_jobs")
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_raw_drainer, args=(dsn, batch, ready, go, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    outcomes = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return Rate(sum(n for n, _ in outcomes), max(t for _, t in outcomes) - started)


def raw_copy(dsn: str, rows: int) -> Rate:
    text = "".join(f'{{"n": {i}, "kind": "bench"}}\n' for i in range(rows))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RAW_DDL)
        started = time.perf_counter()
        with conn.transaction(), conn.cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
            copy.write(text)
        return Rate(rows, time.perf_counter() - started)


# -- the engine ------------------------------------------------------------------------------------


def bulk_enqueue(dsn: str, jobs: int) -> Rate:
    payloads = _payloads(jobs)
    with Queue(dsn) as queue:
        started = time.perf_counter()
        queue.enqueue_many("noop", payloads)
        return Rate(jobs, time.perf_counter() - started)


def _write_config(directory: Path, batch: int) -> Path:
    path = directory / f"bench-{batch}.toml"
    path.write_text(
        "[global]\nlog_format = \"json\"\nheartbeat_interval = \"1s\"\n"
        f"[flows.noop]\nbatch_size = {batch}\n"
    )
    return path


def engine_drain(dsn: str, jobs: int, workers: int, batch: int, workdir: Path) -> Rate:
    """Drain `jobs` no-op jobs with a real `engine run` (heartbeats, telemetry and fencing on).

    The flow is paused while the engine starts; the clock starts at resume, when every worker is up
    and idle, and stops when nothing is pending or running.
    """
    with Queue(dsn) as queue:
        queue.pause("noop")
        queue.enqueue_many("noop", _payloads(jobs))
    config = _write_config(workdir, batch)
    log = open(workdir / f"engine-{workers}-{batch}.log", "wb")
    env = {**os.environ, "SKIPLOCK_DSN": dsn}
    env.pop("SKIPLOCK_ENV", None)
    engine = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config),
                               "--workers", str(workers), "--flows", "noop"], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    try:
        with db.connect(dsn) as conn:
            deadline = time.monotonic() + 60
            while conn.execute("SELECT count(*) FROM skiplock.workers WHERE state = 'idle'").fetchone()[0] < workers:
                if engine.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"engine did not start: see {log.name}")
                time.sleep(0.01)
            conn.execute("VACUUM ANALYZE skiplock.jobs")
            Queue(conn=conn).resume("noop")
            started = time.perf_counter()
            while conn.execute(
                "SELECT EXISTS (SELECT 1 FROM skiplock.jobs WHERE flow = 'noop' AND status IN ('pending', 'running'))"
            ).fetchone()[0]:
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
            completed = conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'noop'").fetchone()[0]
    finally:
        engine.terminate()
        engine.wait(60)
        log.close()
    if completed < jobs:
        raise RuntimeError(f"only {completed} of {jobs} jobs completed")
    return Rate(jobs, elapsed)

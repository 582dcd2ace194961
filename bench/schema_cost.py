"""What the jobs table's schema costs a drain: the raw 2-process loop on a ladder of tables, from the
raw ceiling's own to a copy of skiplock.jobs, and the engine's statements on skiplock.jobs itself.

    python -m bench.schema_cost [--jobs 200000] [--rounds 3]

Each round fills every table of the ladder with `jobs` rows and drains it with 2 processes, each
claiming 500 rows and deleting them (the raw ceiling's loop), in turn, so the steps share the
machine's moment; the best round of each is printed, with the server CPU per job of its two backends
(from /proc). The steps:

- raw: the raw ceiling's table (id, payload, status smallint; a partial index on id);
- columns: skiplock.jobs's columns and check constraints, its primary key and claim index only; the
  claim sets what claim_batch sets (status, claimed_by, claim_token, claimed_at, attempts, updated_at)
  in claim_batch's order;
- + running index: and jobs_running_idx (flow, claimed_at) WHERE status = 'running';
- all indexes: every index of skiplock.jobs (LIKE ... INCLUDING ALL);
- all but running: the same without the running index;
- engine statements: store.claim_batch and store.ack_batch (with an ack id, history row and all) on
  skiplock.jobs; no handler, no engine process.

It runs on a PostgreSQL of its own, with the suite's server settings (BENCH_SERVER_SETTINGS).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import time
from typing import Any, Callable

import psutil

from bench.conftest import BENCH_SERVER_SETTINGS
from bench.workloads import run_together
from engine import db, store
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate

BATCH = 500
WORKER = "schema-cost:{pid}"
PAYLOAD = "jsonb_build_object('n', g, 'kind', 'bench')"
ENGINE_CLAIM_SET = ("status = 'running', claimed_by = %(worker)s, claim_token = 1, claimed_at = clock_timestamp(), "
                    "attempts = attempts + 1, updated_at = now()")
JOBS_CLAIM = (f"UPDATE {{table}} SET {ENGINE_CLAIM_SET} WHERE id IN (SELECT id FROM {{table}} WHERE flow = 'noop' "
              f"AND status = 'pending' ORDER BY priority DESC, run_at, id LIMIT {BATCH} FOR UPDATE SKIP LOCKED) "
              "RETURNING id, payload")
JOBS_FILL = f"INSERT INTO {{table}} (id, flow, payload) SELECT g, 'noop', {PAYLOAD} FROM generate_series(1, %s) g"
# skiplock.jobs's columns and checks, with its primary key and claim index only
COLUMNS = ["CREATE TABLE {table} (LIKE skiplock.jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
           "ALTER TABLE {table} ADD PRIMARY KEY (id)",
           "CREATE INDEX ON {table} (flow, priority DESC, run_at, id) WHERE status = 'pending'"]
RUNNING_INDEX = "CREATE INDEX ON {table} (flow, claimed_at) WHERE status = 'running'"

# name: (DDL statements, fill, claim); every step's table is `sc_<n>`, deleted from by id.
STEPS: dict[str, tuple[list[str], str, str]] = {
    "raw": (["CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload jsonb NOT NULL, "
             "status smallint NOT NULL DEFAULT 0)", "CREATE INDEX ON {table} (id) WHERE status = 0"],
            f"INSERT INTO {{table}} (payload) SELECT {PAYLOAD} FROM generate_series(1, %s) g",
            f"UPDATE {{table}} SET status = 1 WHERE id IN (SELECT id FROM {{table}} WHERE status = 0 ORDER BY id "
            f"LIMIT {BATCH} FOR UPDATE SKIP LOCKED) RETURNING id, payload"),
    "columns": (COLUMNS, JOBS_FILL, JOBS_CLAIM),
    "+ running index": (COLUMNS + [RUNNING_INDEX], JOBS_FILL, JOBS_CLAIM),
    "all indexes": (["CREATE TABLE {table} (LIKE skiplock.jobs INCLUDING ALL)"], JOBS_FILL, JOBS_CLAIM),
    "all but running": (["CREATE TABLE {table} (LIKE skiplock.jobs INCLUDING ALL)", "DROP_RUNNING"],
                        JOBS_FILL, JOBS_CLAIM),
    "engine statements": ([], "", ""),
}


def _backend_cpu(conn: Any) -> float:
    return sum(psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0]).cpu_times()[:2])


def _drainer(dsn: str, table: str | None, claim: str, ready: Any, go: Any, results: Any) -> None:
    with db.connect(dsn) as conn:
        conn.autocommit = True
        worker = WORKER.format(pid=multiprocessing.current_process().pid)
        if table is None:
            conn.execute("INSERT INTO skiplock.workers (id, engine_id, host, pid, state) "
                         "VALUES (%s, 'e', 'h', 1, 'busy')", (worker,))
        cpu = _backend_cpu(conn)
        ready.release()
        go.wait()
        done = 0
        while True:
            if table is None:
                token = store.new_claim_token()
                rows = store.claim_batch(conn, "noop", worker, BATCH, token)
                if not rows:
                    break
                store.ack_batch(conn, worker, token, [r[0] for r in rows], ack_id=store.new_ack_id())
            else:
                rows = conn.execute(claim, {"worker": worker}).fetchall()
                if not rows:
                    break
                conn.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", ([r[0] for r in rows],))
            done += len(rows)
        results.put((done, time.perf_counter(), _backend_cpu(conn) - cpu))


def _prepare(conn: Any, step: str, table: str, jobs: int) -> None:
    ddl, fill, _ = STEPS[step]
    if not ddl:  # the engine's own table
        conn.execute("DELETE FROM skiplock.jobs")
        conn.execute("INSERT INTO skiplock.jobs (flow, payload) SELECT 'noop', "
                     f"{PAYLOAD} FROM generate_series(1, %s) g", (jobs,))
        conn.execute("VACUUM ANALYZE skiplock.jobs")
        conn.execute("VACUUM skiplock.jobs_done")
        return
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    for statement in ddl:
        if statement == "DROP_RUNNING":
            for (name,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s "
                                        "AND indexdef LIKE '%%(flow, claimed_at)%%'", (table,)).fetchall():
                conn.execute(f"DROP INDEX {name}")
        else:
            conn.execute(statement.format(table=table))
    conn.execute(fill.format(table=table), (jobs,))
    conn.execute(f"VACUUM ANALYZE {table}")


def drain(dsn: str, step: str, jobs: int) -> tuple[float, float]:
    """One round of `step` on the database `dsn`: (jobs per second, server CPU us per job). A table step
    drops its table afterwards; the engine step empties skiplock.jobs first."""
    index = list(STEPS).index(step)
    table = f"sc_{index}" if STEPS[step][0] else None
    with db.connect(dsn) as conn:
        conn.autocommit = True
        _prepare(conn, step, table or "", jobs)
        conn.execute("CHECKPOINT")
    claim = STEPS[step][2].format(table=table)
    started, outcomes = run_together(_drainer, (dsn, table, claim), 2)
    if table is not None:
        with db.connect(dsn) as conn:
            conn.autocommit = True
            conn.execute(f"DROP TABLE {table}")
    done = sum(o[0] for o in outcomes)
    if done != jobs:
        raise AssertionError(f"{step}: {done} of {jobs} drained")
    return done / (max(o[1] for o in outcomes) - started), sum(o[2] for o in outcomes) * 1e6 / done


def measure(dsn: str, jobs: int, rounds: int, report: Callable[[str], None] = print) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {step: [] for step in STEPS}
    for r in range(rounds):
        for step in STEPS:
            out[step].append(drain(dsn, step, jobs))
            report(f"  round {r + 1} {step:18} {out[step][-1][0]:9,.0f} j/s  server {out[step][-1][1]:5.1f} us/job")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.schema_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    base = make_temp_dir("skiplock-schema-cost-")
    server = EmbeddedPostgres(base / "data", settings=BENCH_SERVER_SETTINGS).start()
    try:
        dsn = server.dsn("postgres")
        with db.connect(dsn) as conn:
            migrate(conn)
        figures = measure(dsn, args.jobs, args.rounds)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    raw = max(rate for rate, _ in figures["raw"])
    print(f"{args.jobs:,} jobs, 2 processes, batch {BATCH}, best of {args.rounds} rounds")
    for step, rounds in figures.items():
        rate, cpu = max(rounds)
        print(f"  {step:18} {rate:9,.0f} j/s  {rate / raw:5.0%} of raw  server {cpu:5.1f} us/job")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Server CPU per job of each hot statement, the engine's against the raw pair's, at one batch size.

    python -m bench.statement_cost [--batch 500] [--rounds 300]

One connection per kind of statement (its backend's CPU from /proc is that statement's alone), on a
PostgreSQL of its own: per round, enqueue `batch` jobs (Queue.enqueue_many), claim them
(claim_batch), ack them (ack_batch with an ack id), an empty claim, next_run_at; and the raw
pair's COPY, claim and DELETE of as many rows, and its empty claim. Both tables are vacuumed every
200 rounds. CPU time does not move with the machine's load, wall time does (printed beside it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Callable

import psutil

from bench.workloads import RAW_ACK, RAW_CLAIM, RAW_DDL
from engine import db, store
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.migrate import migrate
from engine.queue import Queue

KINDS = ("enqueue", "claim", "ack", "empty_claim", "next_run_at", "raw_copy", "raw_claim", "raw_ack", "raw_empty")
RAW_EMPTY = RAW_CLAIM.replace("status = 0", "status = 7")  # the same claim, finding nothing
WORKER = "statement-cost:1:0:0.1"


def measure(dsn: str, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{kind: (backend CPU us per job, wall us per job)}"""
    conns: dict[str, Any] = {}
    backends: dict[str, psutil.Process] = {}
    for kind in KINDS:
        conn = db.connect(dsn, application_name=f"statement-cost-{kind}")
        conn.autocommit = True
        conns[kind] = conn
        backends[kind] = psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    queue = Queue(conn=conns["enqueue"])
    claimer = conns["claim"]
    claimer.execute("INSERT INTO skiplock.workers (id, engine_id, host, pid, state) VALUES (%s, 'e', 'h', 1, 'busy')",
                    (WORKER,))
    for flow in ("steady", "empty"):  # the flows exist, and the first statements are prepared
        queue.enqueue_many(flow, [{"warm": 1}], allow_unknown_flow=True)
        rows = store.claim_batch(claimer, flow, WORKER, 500, 1)
        store.ack_batch(conns["ack"], WORKER, 1, [r[0] for r in rows])
    conns["raw_copy"].execute(RAW_DDL)
    text = "".join('{"bg": 1, "n": %d}\n' % i for i in range(batch))
    wall = dict.fromkeys(KINDS, 0.0)

    def timed(kind: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = call()
        wall[kind] += time.perf_counter() - started
        return out

    def raw_copy() -> None:
        with conns["raw_copy"].cursor().copy("COPY bench_raw_jobs (payload) FROM STDIN") as copy:
            copy.write(text)

    cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in backends.items()}
    for i in range(rounds):
        token = i + 2
        timed("enqueue", lambda: queue.enqueue_many("steady", [{"bg": 1, "n": k} for k in range(batch)],
                                                    allow_unknown_flow=True))
        rows = timed("claim", lambda: store.claim_batch(claimer, "steady", WORKER, 500, token))
        assert len(rows) == batch, len(rows)
        timed("ack", lambda: store.ack_batch(conns["ack"], WORKER, token, [r[0] for r in rows],
                                             ack_id=store.new_ack_id()))
        timed("empty_claim", lambda: store.claim_batch(conns["empty_claim"], "empty", WORKER, 500, 1))
        timed("next_run_at", lambda: store.next_run_at(conns["next_run_at"], ["steady"]))
        timed("raw_copy", raw_copy)
        raw_rows = timed("raw_claim", lambda: conns["raw_claim"].execute(RAW_CLAIM, (500,)).fetchall())
        assert len(raw_rows) == batch
        timed("raw_ack", lambda: conns["raw_ack"].execute(RAW_ACK, ([r[0] for r in raw_rows],)))
        timed("raw_empty", lambda: conns["raw_empty"].execute(RAW_EMPTY, (500,)).fetchall())
        if i % 200 == 199:
            conns["enqueue"].execute("VACUUM skiplock.jobs")
            conns["enqueue"].execute("VACUUM bench_raw_jobs")
    jobs = rounds * batch
    out = {k: ((sum(backends[k].cpu_times()[:2]) - cpu_before[k]) * 1e6 / jobs, wall[k] * 1e6 / jobs) for k in KINDS}
    for conn in conns.values():
        conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statement_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    base = make_temp_dir("skiplock-statement-cost-")
    server = EmbeddedPostgres(base / "data").start()
    try:
        with db.connect(server.dsn("postgres")) as conn:
            migrate(conn)
        figures = measure(server.dsn("postgres"), args.batch, args.rounds)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"batch {args.batch}, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}: server CPU and wall time per job")
    for kind, (cpu, wall) in figures.items():
        print(f"  {kind:12} cpu {cpu:6.1f} us/job ({cpu * args.batch:8.0f} per statement)  wall {wall:6.1f} us/job")
    return 0


if __name__ == "__main__":
    sys.exit(main())

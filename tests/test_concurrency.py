"""Several OS processes claim from one queue at once: every job is claimed exactly once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import psycopg

from engine.queue import Queue
from support.postgres import register_flows

JOBS = 20_000
PROCESSES = 4
BATCH = 100


def drain(dsn: str, flow: str, index: int, start: Any, out: str) -> None:
    """Child process: its own connection, claim batches of BATCH and ack them until the flow is empty.
    Writes every claimed id, one per line, to `out`."""
    from engine import db
    from engine.queue import ack_batch, claim_batch, new_claim_token

    worker = f"proc-{index}"
    claimed: list[int] = []
    with db.connect(dsn, application_name=worker) as conn:
        start.wait(60)
        empty_in_a_row = 0
        while empty_in_a_row < 3:  # a claim can come back empty while others hold the last rows
            token = new_claim_token()
            rows = claim_batch(conn, flow, worker, BATCH, token)
            if not rows:
                empty_in_a_row += 1
                time.sleep(0.01)
                continue
            empty_in_a_row = 0
            ids = [row[0] for row in rows]
            result = ack_batch(conn, worker, token, ids, [None] * len(ids))
            if result.completed != len(ids) or result.refused:
                raise SystemExit(f"{worker}: ack of {len(ids)} jobs completed {result.completed}")
            claimed.extend(ids)
    Path(out).write_text("\n".join(map(str, claimed)))


def test_processes_claim_each_job_exactly_once(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    register_flows(dsn, "race")
    with Queue(dsn) as queue:
        assert queue.enqueue_many("race", [{"n": n} for n in range(JOBS)]).inserted == JOBS
    all_ids = {row[0] for row in conn.execute("SELECT id FROM skiplock.jobs WHERE flow = 'race'")}
    assert len(all_ids) == JOBS

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outs = [tmp_path / f"claimed-{i}.txt" for i in range(PROCESSES)]
    procs = [ctx.Process(target=drain, args=(dsn, "race", i, start, str(out))) for i, out in enumerate(outs)]
    for proc in procs:
        proc.start()
    # release the children together, once they are connected
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        connected = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'proc-%'").fetchone()
        if connected and connected[0] == PROCESSES:
            break
        time.sleep(0.02)
    started = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join(120)
    elapsed = time.perf_counter() - started
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    claimed = [[int(x) for x in out.read_text().split()] for out in outs]
    print(f"\n{PROCESSES} processes drained {JOBS} jobs in {elapsed:.2f} s; per process: "
          f"{[len(c) for c in claimed]}")
    for ids in claimed:
        assert len(ids) == len(set(ids)), "a process claimed the same job twice"
    sets = [set(ids) for ids in claimed]
    for i in range(PROCESSES):
        for j in range(i + 1, PROCESSES):
            assert not sets[i] & sets[j], f"processes {i} and {j} both claimed {sorted(sets[i] & sets[j])[:5]}"
    assert set().union(*sets) == all_ids
    assert sum(len(s) for s in sets) == JOBS
    assert sum(1 for s in sets if s) >= 2, "the processes did not run concurrently"

    assert conn.execute("SELECT count(*) FROM skiplock.jobs").fetchone() == (0,)
    done = conn.execute("SELECT count(*), count(DISTINCT id), min(attempts), max(attempts)"
                        " FROM skiplock.jobs_done WHERE flow = 'race'").fetchone()
    assert done == (JOBS, JOBS, 1, 1)
    by_worker = dict(conn.execute("SELECT claimed_by, count(*) FROM skiplock.jobs_done GROUP BY 1").fetchall())
    assert by_worker == {f"proc-{i}": len(sets[i]) for i in range(PROCESSES) if sets[i]}

"""Pauses at steady state, and what the server's backends waited on during each (issue 17).

    python -m bench.steady_gaps [--rate 30000] [--seconds 90] [--set max_wal_size=8GB ...]

Starts its own PostgreSQL (default durability; lock waits over 200 ms, checkpoints, autovacuum and
statements over 300 ms logged), runs the engine (2 workers, batch 500, test_steady.py's flow) under
a producer offering --rate jobs/s for --seconds, and samples pg_stat_activity every 50 ms for
backends waiting on a lock, an LWLock, I/O or IPC. Afterwards it bins completions
(jobs_done.finished_at) per 100 ms and prints every pause of 0.3 s or more with the waits seen
around it, then the server log's lock waits and checkpoints (the log is copied to --log).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench.conftest import new_database
from bench.workloads import STAMP, Engine, Load

LOGGING = {"logging_collector": "on", "log_directory": "log", "log_filename": "pg.log",
           "log_line_prefix": "%m [%p] %a ", "log_lock_waits": "on", "deadlock_timeout": "200ms",
           "log_autovacuum_min_duration": "0", "log_checkpoints": "on", "log_min_duration_statement": "300"}
WAITING = """
SELECT clock_timestamp(), a.application_name, a.wait_event_type, a.wait_event, l.locktype, l.mode
FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.state = 'active'
  AND a.wait_event_type IN ('Lock', 'LWLock', 'IO', 'IPC', 'BufferPin')
"""
BINS = """
SELECT floor(extract(epoch FROM finished_at - %(since)s) * 10)::int, count(*) FROM skiplock.jobs_done
WHERE finished_at >= %(since)s GROUP BY 1
"""
GAP_BINS = 3  # 100 ms bins with nothing completed


def gaps(bins: dict[int, int], last: int) -> list[tuple[float, float]]:
    """(start s, length s) of each run of GAP_BINS or more empty bins up to bin `last`."""
    out, b = [], 0
    while b <= last:
        if b in bins:
            b += 1
            continue
        start = b
        while b <= last and b not in bins:
            b += 1
        if b - start >= GAP_BINS:
            out.append((start / 10, (b - start) / 10))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steady_gaps", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=30_000)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    parser.add_argument("--log", type=Path, default=Path("steady-gaps-pg.log"))
    args = parser.parse_args(argv)
    from engine.embedded import EmbeddedPostgres, make_temp_dir

    workdir = make_temp_dir("skiplock-gaps-")
    settings = {"max_connections": "300", **LOGGING, **dict(s.split("=", 1) for s in args.set)}
    server = EmbeddedPostgres(workdir / "data", settings=settings).start()
    waits: list[tuple[Any, ...]] = []
    stop = threading.Event()
    try:
        dsn = new_database(server.dsn("postgres"))

        def sample() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not stop.wait(0.05):
                    waits.extend(conn.execute(WAITING).fetchall())

        with Engine(dsn, workdir, 2, {"steady": {"handler": STAMP, "batch_size": 500}}, name="gaps") as engine:
            engine.queue.resume("steady")
            conn = engine.conn
            assert conn is not None
            threading.Thread(target=sample, daemon=True).start()
            since = conn.execute("SELECT now()").fetchone()[0]
            load = Load(engine.dsn, "steady", args.rate, args.seconds).start()
            time.sleep(args.seconds)
            sent = load.stop()
            engine.wait_drained("steady", timeout=300)
            stop.set()
            bins = dict(conn.execute(BINS, {"since": since}).fetchall())
        print(f"offered {args.rate:.0f} j/s for {args.seconds:.0f} s: sent {sent}, completed {sum(bins.values())}; "
              f"load average {os.getloadavg()[0]:.1f}")
        found = gaps(bins, min(max(bins, default=0), int(args.seconds * 10)))
        print(f"pauses of {GAP_BINS / 10:.1f} s or more with nothing completed: {len(found)}")
        for start, length in found:
            first = since + datetime.timedelta(seconds=start - 0.5)
            end = since + datetime.timedelta(seconds=start + length + 0.2)
            seen = Counter((w[1], w[2], w[3], w[4], w[5]) for w in waits if first <= w[0] <= end)
            print(f"  at {start:5.1f} s, {length:.1f} s: " + "; ".join(
                f"{n}x {app} {kind}:{event}" + (f" ({lock} {mode})" if lock else "") for (app, kind, event, lock, mode), n
                in seen.most_common(5)))
    finally:
        stop.set()
        log = workdir / "data" / "log" / "pg.log"
        if log.exists():
            shutil.copy(log, args.log)
            for line in log.read_text(errors="replace").splitlines():
                if "still waiting" in line or "checkpoint starting" in line or "truncat" in line:
                    print(line[:200])
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

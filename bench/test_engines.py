"""Many engines on one database (issue 17 item 4): 20 engines of 2 workers each (smoke: 3) serving
one sleep-free no-op flow, against one engine with the same worker count on a database of its own.

Reported: connections of the fleet (idle and busy) while idle and at the busiest sample of a drain;
the fleet's background work while idle (transactions per second on the database: heartbeats, rescue
and schedule leader passes, telemetry), and the supervisors' and workers' CPU then; the drain rate
against the one big engine (the ceiling of this comparison); RSS and USS per worker and in total.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench.conftest import Target, figure, new_database, record, size
from bench.fleet import Connections, connections, cpu_seconds, memory, tree, xact_count
from bench.workloads import NOOP, Engine, best

ENGINES = size(20, 2)
WORKERS = 2
JOBS = size(100_000, 2_000)
ROUNDS = size(2, 1)
IDLE_SECONDS = size(10, 1)


def _busiest(engine: Engine, stop: threading.Event, seen: list[Connections]) -> None:
    from engine import db

    with db.connect(engine.dsn, application_name="skiplock-bench-sampler") as conn:
        while not stop.is_set():
            seen.append(connections(conn))
            time.sleep(0.05)


@pytest.mark.timeout(1800)
def test_many_engines(benchmark, bench_server: str, bench_dsn: str, workdir: Path) -> None:
    flows = {"noop": {"handler": NOOP, "batch_size": 500}}

    def run():
        with ExitStack() as stack:
            fleet = [stack.enter_context(Engine(bench_dsn, workdir, WORKERS, flows, name=f"fleet-{i}"))
                     for i in range(ENGINES)]
            first = fleet[0]
            assert first.conn is not None
            deadline = time.monotonic() + 120  # every worker of the fleet registered (Engine.start saw its own)
            while first.conn.execute(
                    "SELECT count(*) FROM skiplock.workers WHERE state NOT IN ('stopped', 'lost')"
                    ).fetchone()[0] < ENGINES * WORKERS:
                assert time.monotonic() < deadline, "the fleet's workers did not all start"
                time.sleep(0.1)
            time.sleep(2.0)  # every engine past its start-up
            idle_conns = connections(first.conn)
            procs = [p for e in fleet for p in tree(e.process.pid)]  # type: ignore[union-attr]
            supervisors = [tree(e.process.pid)[0] for e in fleet]  # type: ignore[union-attr]
            x0, c0, s0 = xact_count(first.conn), cpu_seconds(procs), cpu_seconds(supervisors)
            started = time.monotonic()
            time.sleep(IDLE_SECONDS)
            elapsed = time.monotonic() - started
            idle_xacts = (xact_count(first.conn) - x0) / elapsed
            idle_cpu = 100.0 * (cpu_seconds(procs) - c0) / elapsed
            idle_sup_cpu = 100.0 * (cpu_seconds(supervisors) - s0) / elapsed
            mem = memory(fleet)
            rates, busy = [], []
            for _ in range(ROUNDS):
                stop, seen = threading.Event(), []
                sampler = threading.Thread(target=_busiest, args=(first, stop, seen))
                sampler.start()
                try:
                    rates.append(first.drain_round("noop", JOBS))
                finally:
                    stop.set()
                    sampler.join()
                busy.append(max(seen, key=lambda c: c.busy) if seen else connections(first.conn))
        with Engine(new_database(bench_server), workdir, ENGINES * WORKERS, flows, name="one-big") as big:
            one = [big.drain_round("noop", JOBS) for _ in range(ROUNDS)]
        return idle_conns, idle_xacts, idle_cpu, idle_sup_cpu, mem, rates, busy, one

    idle_conns, idle_xacts, idle_cpu, idle_sup_cpu, mem, rates, busy, one = benchmark.pedantic(
        run, rounds=1, iterations=1)
    busiest = max(busy, key=lambda c: c.busy)
    figure("many_engines", {"engines": ENGINES, "workers_each": WORKERS, "jobs": JOBS,
                            "idle_connections": idle_conns.to_dict(), "busiest_connections": busiest.to_dict(),
                            "idle_xacts_per_s": idle_xacts, "idle_cpu_pct": idle_cpu,
                            "idle_supervisor_cpu_pct": idle_sup_cpu, "memory": mem.to_dict(),
                            "fleet_drain": [r.per_second for r in rates], "one_engine": [r.per_second for r in one]})
    label = f"{ENGINES} engines x {WORKERS}"
    record(Target(f"{label}: connections idle (idle/busy)", idle_conns.total, f"({idle_conns.idle}/{idle_conns.busy})"))
    record(Target(f"{label}: connections in a drain, busiest (idle/busy)", busiest.total,
                  f"({busiest.idle}/{busiest.busy})"))
    record(Target(f"{label}: idle fleet, database transactions", idle_xacts, "/s"))
    record(Target(f"{label}: idle fleet, CPU (supervisors)", idle_cpu, f"% core ({idle_sup_cpu:.1f})"))
    record(Target(f"{label}: drain", best(rates).per_second, "j/s", f"1 engine x {ENGINES * WORKERS}",
                  best(one).per_second))
    record(Target(f"{label}: RSS / USS per worker", mem.rss_mb_per_worker, f"MB ({mem.uss_mb_per_worker:.1f})"))
    record(Target(f"{label}: RSS / USS total ({mem.processes} processes)", mem.rss_mb_total,
                  f"MB ({mem.uss_mb_total:.0f})"))

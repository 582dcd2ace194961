"""What metrics cost (issue 16): the endpoint and the leader's gauge reads with 20 simulated engines at a
15 s scrape interval must stay under 1% of a core; the no-op drain with metrics on must match it off.

Simulated engines: 20 MetricsHubs, each with its own HTTP server (engine/metrics.py's MetricsServer)
holding the figures of 4 workers x FLOWS flows, and its own GaugeReader on the same database, which
holds a realistic queue (FLOWS flows with pending, scheduled, running and dead jobs, 80 worker rows).
One 15 s interval's work (20 lease claims, one leader reading, 20 scrapes over HTTP) runs back to back;
its cost is this process's CPU time (servers, scrapers and readers: the scraper's own share makes it
conservative) plus the CPU of each PostgreSQL backend that served a call (from /proc), over 15 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.conftest import REPORT, Target, record, size
from bench.workloads import NOOP, Engine, best
from engine import db
from engine.health import Thresholds
from engine.metrics import FlowFigures, GaugeReader, MetricsHub, MetricsPipe, MetricsServer, Readiness

ENGINES = 20
WORKERS_PER_ENGINE = 4
FLOWS = size(20, 10)
PENDING_PER_FLOW = size(20_000, 2_000)
INTERVAL = 15.0
ROUNDS = size(5, 2)
DRAIN_JOBS = size(100_000, 5_000)
DRAIN_ROUNDS = size(2, 1)


def _seed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for f in range(FLOWS):
            flow = f"flow_{f:02d}"
            conn.execute("INSERT INTO skiplock.flows (name) VALUES (%s)", (flow,))
            conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, priority, run_at, attempts)
                SELECT %s, '{}', 'pending', i %% 3, now() - (i %% 600) * interval '1 second'
                                                     + CASE WHEN i %% 10 = 0 THEN interval '1 hour' ELSE '0s' END, 0
                FROM generate_series(1, %s) i""", (flow, PENDING_PER_FLOW))
            conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, claimed_at, claimed_by, attempts)
                SELECT %s, '{}', 'running', now(), 'w', 1 FROM generate_series(1, 50)""", (flow,))
            conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, finished_at, attempts)
                SELECT %s, '{}', 'dead', now(), 5 FROM generate_series(1, 200)""", (flow,))
        conn.execute("""INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state)
            SELECT 'w' || i, 'e' || (i / 4), 'h', i, %s, 'busy' FROM generate_series(1, %s) i""",
                     ([f"flow_{f:02d}" for f in range(FLOWS)], ENGINES * WORKERS_PER_ENGINE))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _hub(index: int) -> MetricsHub:
    hub = MetricsHub(f"engine-{index:02d}", MetricsPipe())
    for slot in range(WORKERS_PER_ENGINE):
        figures = FlowFigures(counts=[1000, 10, 2, 8, 0], errors={"ValueError": 6, "TimeoutError": 4})
        frame = {"k": "flow", "id": f"w{slot}", "s": slot, **figures.frame()}
        for f in range(FLOWS):
            hub.take({**frame, "flow": f"flow_{f:02d}"})
        hub.take({"k": "worker", "id": f"w{slot}", "s": slot, "pool": {"size": 2, "available": 1, "waiting": 0,
                                                                        "max": 4},
                  "circuits": {f"flow_{f:02d}": False for f in range(FLOWS)}})
    hub.live_workers = lambda: WORKERS_PER_ENGINE
    return hub


# Scrapes every port once per line read on stdin; answers the largest body's size.
SCRAPER = """
import sys, urllib.request
ports = sys.argv[1:]
for _ in sys.stdin:
    sizes = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            sizes.append(len(answer.read()))
    print(max(sizes), flush=True)
"""


def _cpu_of(pid: int) -> float:
    """utime + stime of a process on this machine, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Measured:
    """A connection factory that adds each call's server CPU (its backend's, read from /proc just before
    the connection closes: start-up included) to `server_cpu`, and its wall time to `wall`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.server_cpu = 0.0
        self.wall = 0.0

    def __call__(self) -> Any:
        measured = self

        class _Conn:
            def __enter__(self) -> Any:
                self.started = time.perf_counter()
                self.conn = db.connect(measured.dsn, application_name="skiplock-bench-metrics")
                return self.conn

            def __exit__(self, *exc: object) -> None:
                try:
                    measured.server_cpu += _cpu_of(self.conn.info.backend_pid)
                except OSError:  # a server on another host: count its wall time instead
                    measured.server_cpu += time.perf_counter() - self.started
                self.conn.close()
                measured.wall += time.perf_counter() - self.started

        return _Conn()


def test_metrics_cost_twenty_engines(benchmark, bench_dsn: str) -> None:
    _seed(bench_dsn)
    thresholds = Thresholds()
    hubs = [_hub(i) for i in range(ENGINES)]
    measured = _Measured(bench_dsn)
    readers = [GaugeReader(hub, measured, thresholds, INTERVAL) for hub in hubs]
    servers = [MetricsServer("127.0.0.1", 0, hub, Readiness(measured, thresholds)) for hub in hubs]
    for server in servers:
        server.start()
    sizes: list[int] = []
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, *(str(s.port) for s in servers)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    parts: list[dict[str, float]] = []

    def interval() -> float:
        measured.server_cpu = measured.wall = 0.0
        cpu = time.process_time()
        for reader in readers:
            reader.once()
        gauges_cpu = time.process_time() - cpu
        # Prometheus' side runs in another process: only the engines' side counts here.
        scraper.stdin.write(b"go\n")
        scraper.stdin.flush()
        sizes.append(int(scraper.stdout.readline()))
        client = time.process_time() - cpu
        parts.append({"gauges_client_cpu": gauges_cpu, "scrapes_cpu": client - gauges_cpu,
                      "server_cpu": measured.server_cpu, "db_wall": measured.wall})
        return client + measured.server_cpu

    try:
        interval()  # the first: takes the lease, warms the caches
        costs = benchmark.pedantic(lambda: [interval() for _ in range(ROUNDS)], rounds=1, iterations=1)
    finally:
        scraper.kill()
        scraper.wait()
        for server in servers:
            server.stop()
    leaders = [hub.engine_id for hub in hubs if hub.leader]
    assert len(leaders) == 1, leaders  # one engine reads the fleet-wide gauges
    assert hubs[0].gauges is not None and len(hubs[0].gauges.flows) == FLOWS
    share = min(costs) / INTERVAL
    REPORT.figures["metrics_cost"] = ({"engines": ENGINES, "flows": FLOWS, "pending_per_flow": PENDING_PER_FLOW,
                            "interval_s": INTERVAL, "seconds_per_interval": costs, "parts": parts[1:],
                                     "scrape_bytes": max(sizes)})
    benchmark.extra_info["core_share"] = share
    record(Target(f"metrics: {ENGINES} engines, scrape + leader gauges every {INTERVAL:.0f}s, share of a core",
                  share * 100.0, "%", goal=1.0, lower_is_better=True))


@pytest.mark.parametrize("metrics", [False, True])
def test_engine_drain_metrics(benchmark, bench_dsn: str, workdir: Path, metrics: bool) -> None:
    """The no-op drain (2 workers, batch 500) with metrics off and on; the two figures side by side."""
    extra = {"metrics_port": 0} if metrics else {}

    def run() -> list[Any]:
        with Engine(bench_dsn, workdir, 2, {"noop": {"handler": NOOP, "batch_size": 500}},
                    name=f"drain-metrics-{metrics}", settings=extra) as engine:
            return [engine.drain_round("noop", DRAIN_JOBS) for _ in range(DRAIN_ROUNDS)]

    rates = benchmark.pedantic(run, rounds=1, iterations=1)
    rate = best(rates).per_second
    drains = REPORT.figures.setdefault("drain_metrics", {})
    drains["on" if metrics else "off"] = rate
    if metrics and "off" in drains:
        record(Target("engine drain, no-op, batch 500, 2 workers, metrics on", rate, "j/s", "metrics off",
                      drains["off"], goal=0.95))
    assert all(r.jobs == DRAIN_JOBS for r in rates)

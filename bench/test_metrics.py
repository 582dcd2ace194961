"""What metrics cost (issue 16): the endpoint and the leader's gauge reads with 20 simulated engines at a
15 s scrape interval must stay under 1% of a core; the no-op drain with metrics on must match it off.

Simulated engines: 20 MetricsHubs, each with its own HTTP server (engine/metrics.py's MetricsServer)
holding the figures of 4 workers x FLOWS flows, and its own GaugeReader on the same database, which
holds a realistic queue (FLOWS flows with pending, scheduled, running and dead jobs, 80 worker rows).
One 15 s interval's work (20 lease claims, one leader reading, 20 scrapes over HTTP) runs back to back;
its cost is this process's CPU time (servers and readers; the scraper is another process) plus the
growth of the CPU of each PostgreSQL backend the readers opened (from /proc), over 15 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

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
ROUNDS = size(10, 3)
DRAIN_JOBS = size(100_000, 5_000)
DRAIN_ROUNDS = size(4, 1)


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
    """The readers' connection factory: remembers each connection's backend, so an interval's server
    CPU is the growth of those backends' CPU over it (a connection opened in it counts from zero: its
    start-up included). /proc counts in clock ticks (10 ms): a single interval's figure is coarse, the
    mean over the rounds is not."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.backends: list[int] = []
        self.opened = 0

    def __call__(self) -> Any:
        conn = db.connect(self.dsn, application_name="skiplock-bench-metrics")
        self.backends.append(conn.info.backend_pid)
        self.opened += 1
        return conn

    def cpu(self) -> dict[int, float]:
        out = {}
        for pid in self.backends:
            try:
                out[pid] = _cpu_of(pid)
            except OSError:  # closed (or a server on another host: then this figure is 0)
                pass
        return out


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
    changing = {"k": "flow", "id": "w0", "s": 0, "flow": "flow_00", **FlowFigures().frame()}

    def interval() -> float:
        for hub in hubs:  # a busy fleet: every engine's figures changed since the last scrape
            hub.take({**changing, "c": [len(parts), 0, 0, 0, 0]})
        before = measured.cpu()
        opened = measured.opened
        cpu = time.process_time()
        for reader in readers:
            reader.once()
        gauges_cpu = time.process_time() - cpu
        # Prometheus' side runs in another process: only the engines' side counts here.
        scraper.stdin.write(b"go\n")
        scraper.stdin.flush()
        sizes.append(int(scraper.stdout.readline()))
        client = time.process_time() - cpu
        server = sum(used - before.get(pid, 0.0) for pid, used in measured.cpu().items())
        parts.append({"gauges_client_cpu": gauges_cpu, "scrapes_cpu": client - gauges_cpu, "server_cpu": server,
                      "connections_opened": measured.opened - opened})
        return client + server

    try:
        interval()  # the first: takes the lease, warms the caches
        costs = benchmark.pedantic(lambda: [interval() for _ in range(ROUNDS)], rounds=1, iterations=1)
    finally:
        scraper.kill()
        scraper.wait()
        for server in servers:
            server.stop()
        for reader in readers:
            reader.stop(release=False)
    leaders = [hub.engine_id for hub in hubs if hub.leader]
    assert len(leaders) == 1, leaders  # one engine reads the fleet-wide gauges
    assert hubs[0].gauges is not None and len(hubs[0].gauges.flows) == FLOWS
    share = sum(costs) / len(costs) / INTERVAL  # the mean: see _Measured
    REPORT.figures["metrics_cost"] = ({"engines": ENGINES, "flows": FLOWS, "pending_per_flow": PENDING_PER_FLOW,
                            "interval_s": INTERVAL, "seconds_per_interval": costs, "min_share": min(costs) / INTERVAL, "parts": parts[1:],
                                     "scrape_bytes": max(sizes)})
    benchmark.extra_info["core_share"] = share
    record(Target(f"metrics: {ENGINES} engines, scrape + leader gauges every {INTERVAL:.0f}s, share of a core",
                  share * 100.0, "%", goal=1.0, lower_is_better=True))


def test_engine_drain_metrics(benchmark, bench_dsn: str, workdir: Path) -> None:
    """The no-op drain (2 workers, batch 500) with metrics off and on: two engines on one database, a
    flow each, their rounds interleaved (off, on, on, off, off, on...), so the load of the moment and
    the wake of the previous round (autovacuum) hit both alike."""
    flows = {"off": "noop_off", "on": "noop_on"}

    def run() -> dict[str, list[Any]]:
        rates: dict[str, list[Any]] = {"off": [], "on": []}
        with Engine(bench_dsn, workdir, 2, {flows["off"]: {"handler": NOOP, "batch_size": 500}},
                    name="drain-metrics-off") as off, \
                Engine(bench_dsn, workdir, 2, {flows["on"]: {"handler": NOOP, "batch_size": 500}},
                       name="drain-metrics-on", settings={"metrics_port": 0}) as on:
            pair = [("off", off), ("on", on)]
            for round_ in range(DRAIN_ROUNDS):
                for side, engine in pair if round_ % 2 == 0 else pair[::-1]:  # the second of a pair
                    rates[side].append(engine.drain_round(flows[side], DRAIN_JOBS))  # meets the first's vacuum
        return rates

    rates = benchmark.pedantic(run, rounds=1, iterations=1)
    drains = {side: best(r).per_second for side, r in rates.items()}
    REPORT.figures["drain_metrics"] = {**drains, "rounds": {side: [r.per_second for r in rs]
                                                            for side, rs in rates.items()}}
    record(Target("engine drain, no-op, batch 500, 2 workers, metrics on", drains["on"], "j/s", "metrics off",
                  drains["off"], goal=0.95))
    assert all(r.jobs == DRAIN_JOBS for rs in rates.values() for r in rs)

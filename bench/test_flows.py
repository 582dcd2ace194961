"""Many flows (issue 17 item 3): one engine (2 workers) serving 1,000 generated flows.

- idle CPU of the engine's processes (and, beside it, of the backends serving them), % of one core;
- enqueue-to-start latency of single enqueues spread over all the flows, on the idle engine;
- a backlog spread evenly over the 1,000 flows against the same backlog in one of them, same engine,
  same round: the ceiling is the one-flow drain.
Targets: idle CPU < 2% of a core, p50 < 10 ms, spread drain >= 70% of one flow.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.conftest import Target, figure, record, size
from bench.fleet import idle_cpu, many_flows, set_paused, spread_drain
from bench.workloads import STAMP, Engine, best, latency_probes

FLOWS = size(1_000, 50)
JOBS = size(100_000, 1_000)
ROUNDS = size(2, 1)
IDLE_SECONDS = size(20, 1)
PROBE_RATE = 50.0
PROBE_SECONDS = size(10, 1)


@pytest.mark.timeout(1800)
def test_many_flows(benchmark, bench_dsn: str, workdir: Path) -> None:
    flows = many_flows(FLOWS, STAMP)
    names = list(flows)

    def run():
        with Engine(bench_dsn, workdir, 2, flows, name="flows") as engine:
            assert engine.conn is not None
            set_paused(engine.conn, names, False)
            time.sleep(1.0)  # the resume's wake-up settles
            cpu = idle_cpu(engine, IDLE_SECONDS)
            since = time.time()
            latency = latency_probes(engine, names[::-1], PROBE_RATE, PROBE_SECONDS)
            deadline = time.monotonic() + 60
            while engine.conn.execute("SELECT count(*) FROM skiplock.jobs").fetchone()[0]:
                assert time.monotonic() < deadline, "probes not all completed"
                time.sleep(0.05)
            assert since
            one, spread = [], []
            for _ in range(ROUNDS):
                one.append(spread_drain(engine, names[:1], JOBS))
                spread.append(spread_drain(engine, names, JOBS))
            return cpu, latency, one, spread

    cpu, latency, one, spread = benchmark.pedantic(run, rounds=1, iterations=1)
    figure("many_flows", {"flows": FLOWS, "jobs": JOBS, "idle_cpu": cpu.to_dict(), "latency": latency.to_dict(),
                          "one_flow": [r.per_second for r in one], "spread": [r.per_second for r in spread]})
    record(Target(f"{FLOWS} flows: idle CPU, engine processes", cpu.engine_pct, "% core", "goal", 2.0,
                  goal=2.0, lower_is_better=True))
    record(Target(f"{FLOWS} flows: idle CPU, their backends", cpu.server_pct, "% core"))
    record(Target(f"{FLOWS} flows: enqueue-to-start p50 (idle, {PROBE_RATE:.0f}/s)", latency.p50, "ms", "goal", 10.0,
                  goal=10.0, lower_is_better=True))
    record(Target(f"{FLOWS} flows: enqueue-to-start p99", latency.p99, "ms"))
    record(Target(f"{FLOWS} flows: backlog drain, spread over all", best(spread).per_second, "j/s",
                  "one flow", best(one).per_second, goal=0.70))

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
from bench.fleet import idle_cpu, many_flows, set_paused, spread_drain, xact_count
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
            xacts = xact_count(engine.conn)
            latency = latency_probes(engine, names[::-1], PROBE_RATE, PROBE_SECONDS)
            per_probe = (xact_count(engine.conn) - xacts) / latency.probes
            deadline = time.monotonic() + 60
            while engine.conn.execute("SELECT count(*) FROM skiplock.jobs").fetchone()[0]:
                assert time.monotonic() < deadline, "probes not all completed"
                time.sleep(0.05)
            assert since
            one, spread, xacts_one, xacts_spread = [], [], [], []
            for _ in range(ROUNDS):
                for flows_of_round, rates, per_job in ((names[:1], one, xacts_one), (names, spread, xacts_spread)):
                    xacts = xact_count(engine.conn)
                    rates.append(spread_drain(engine, flows_of_round, JOBS))
                    per_job.append((xact_count(engine.conn) - xacts) / JOBS)
            return cpu, latency, per_probe, one, spread, xacts_one, xacts_spread

    cpu, latency, per_probe, one, spread, xacts_one, xacts_spread = benchmark.pedantic(run, rounds=1, iterations=1)
    # Transactions (every engine statement commits on its own) are load-independent: the drain's
    # includes the bench's enqueue (a few per round) and its polls, the probe's the enqueue itself.
    figure("many_flows", {"flows": FLOWS, "jobs": JOBS, "idle_cpu": cpu.to_dict(), "latency": latency.to_dict(),
                          "xacts_per_probe": per_probe, "one_flow": [r.per_second for r in one],
                          "spread": [r.per_second for r in spread], "xacts_per_job_one_flow": xacts_one,
                          "xacts_per_job_spread": xacts_spread})
    record(Target(f"{FLOWS} flows: idle CPU, engine processes", cpu.engine_pct, "% core", "goal", 2.0,
                  goal=2.0, lower_is_better=True))
    record(Target(f"{FLOWS} flows: idle CPU, their backends", cpu.server_pct, "% core"))
    record(Target(f"{FLOWS} flows: enqueue-to-start p50 (idle, {PROBE_RATE:.0f}/s)", latency.p50, "ms", "goal", 10.0,
                  goal=10.0, lower_is_better=True))
    record(Target(f"{FLOWS} flows: enqueue-to-start p99", latency.p99, "ms"))
    record(Target(f"{FLOWS} flows: backlog drain, spread over all", best(spread).per_second, "j/s",
                  "one flow", best(one).per_second, goal=0.70))
    record(Target(f"{FLOWS} flows: database transactions per probe", per_probe, "xacts"))
    record(Target(f"{FLOWS} flows: database transactions per 1,000 jobs, spread", 1000 * min(xacts_spread), "xacts",
                  "one flow", 1000 * min(xacts_one)))

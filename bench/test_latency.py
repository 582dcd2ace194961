"""Enqueue-to-start latency: single `Queue.enqueue` calls at 500/s offered, on an idle engine and
under 50% load (a background producer enqueueing half the peak drain rate of this run into the same
flow). Measured from just before the enqueue call to the first line of the handler
(bench/handlers.py:stamp); the producer and the workers share the machine clock."""

from __future__ import annotations

import time
from pathlib import Path

from bench.conftest import Target, figure, half_of, record, size
from bench.workloads import STAMP, Engine, Load, latency_probes

RATE = 500.0
SECONDS = size(10, 2)


def test_enqueue_to_start_latency(benchmark, bench_dsn: str, workdir: Path, peak: float) -> None:
    def run() -> tuple:
        with Engine(bench_dsn, workdir, 2, {"bench": {"handler": STAMP, "batch_size": 500}}, name="latency") as engine:
            engine.queue.resume("bench")
            since = time.time()
            idle = latency_probes(engine, "bench", RATE, SECONDS)
            load = Load(bench_dsn, "bench", half_of(peak), SECONDS + 60).start()
            time.sleep(size(2, 0.5))  # steady state before the probes
            loaded = latency_probes(engine, "bench", RATE, SECONDS)
            load.stop()
            engine.wait_drained("bench", timeout=120)
            engine.check_completed("bench", since - 1.0, idle.probes + loaded.probes + 2 + load.sent)
        return idle, loaded, load

    idle, loaded, load = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"idle_p50_ms": idle.p50, "idle_p99_ms": idle.p99, "loaded_p50_ms": loaded.p50})
    figure("latency", {"idle": idle.to_dict(), "loaded": loaded.to_dict(),
                       "load": {"offered": load.rate, "achieved": load.achieved, "jobs": load.sent,
                                "shed": load.skipped, "peak": peak}})
    record(Target(f"latency idle p50, 500/s offered ({idle.achieved:.0f}/s sent)", idle.p50, "ms", "goal", 1.5,
                  goal=1.5, lower_is_better=True))
    record(Target("latency idle p95", idle.p95, "ms"))
    record(Target("latency idle p99", idle.p99, "ms", "goal", 3.0, goal=3.0, lower_is_better=True))
    record(Target("  of which inside enqueue() (INSERT+commit) p50", idle.call_p50, "ms"))
    record(Target(f"latency at 50% load ({load.achieved:,.0f} of {load.rate:,.0f} j/s) p50", loaded.p50, "ms"))
    record(Target("latency at 50% load p95", loaded.p95, "ms"))
    record(Target("latency at 50% load p99", loaded.p99, "ms"))

"""Drain throughput of the engine against the raw-SQL ceiling, in the same run on the same server:
by workers (batch 500) and by batch size (2 workers).

Each engine round is preceded by a raw-SQL round of the matching ceiling (interleaved), so the two
see the same machine; figures are the best round of each (other work on the machine only ever slows
a round down). Every round enqueues its jobs right after a CHECKPOINT and then drains them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.conftest import PEAK, REPORT, Ceilings, Target, figure, record, size
from bench.workloads import NOOP, Engine, Rate, best, sweep_flows

DRAIN_JOBS = size(100_000, 5_000)
ROUNDS = size(2, 1)
# Batch 1 costs two commits per job: N scales with the batch so each point takes a few seconds at most.
SWEEP_JOBS = {1: size(3_000, 300), 10: size(20_000, 1_500), 50: size(50_000, 3_000), 100: size(100_000, 5_000)}


@pytest.mark.parametrize("processes", [1, 2])
def test_raw_sql_drain_ceiling(benchmark, ceilings: Ceilings, processes: int) -> None:
    row = benchmark.pedantic(ceilings.record_drain, args=(processes, 500, DRAIN_JOBS, ROUNDS), rounds=1, iterations=1)
    benchmark.extra_info["jobs_per_second"] = row.value


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_engine_drain(benchmark, bench_dsn: str, workdir: Path, ceilings: Ceilings, workers: int) -> None:
    processes = min(workers, 2)  # 2 cores: the 2-process ceiling is the machine's

    def run() -> list[Rate]:
        with Engine(bench_dsn, workdir, workers, {"noop": {"handler": NOOP, "batch_size": 500}},
                    name=f"drain-w{workers}") as engine:
            rates = []
            for _ in range(ROUNDS):
                ceilings.measure_drain(processes, 500, DRAIN_JOBS)
                rates.append(engine.drain_round("noop", DRAIN_JOBS))
            return rates

    rates = benchmark.pedantic(run, rounds=1, iterations=1)
    rate = best(rates).per_second
    benchmark.extra_info["jobs_per_second"] = rate
    REPORT.figures.setdefault("engine_drain", {})[str(workers)] = {
        "jobs": DRAIN_JOBS, "rounds": [r.per_second for r in rates], "best": rate}
    if workers == 2:
        PEAK["drain_w2"] = rate
    record(Target(f"engine drain, no-op, batch 500, {workers} worker{'s' if workers > 1 else ''}", rate, "j/s",
                  f"raw {processes} proc", ceilings.drain(processes, 500, DRAIN_JOBS, ROUNDS),
                  goal=0.70 if workers == 2 else None))
    assert all(r.jobs == DRAIN_JOBS for r in rates)


@pytest.mark.parametrize("batch", sorted(SWEEP_JOBS))
def test_raw_sql_drain_ceiling_by_batch(benchmark, ceilings: Ceilings, batch: int) -> None:
    row = benchmark.pedantic(ceilings.record_drain, args=(2, batch, SWEEP_JOBS[batch], ROUNDS), rounds=1, iterations=1)
    benchmark.extra_info["jobs_per_second"] = row.value


def test_engine_batch_sweep(benchmark, bench_dsn: str, workdir: Path, ceilings: Ceilings) -> None:
    """One engine (2 workers) with one no-op flow per batch size; each flow is resumed alone in turn.
    Batch 500 is the 2-worker point of test_engine_drain."""
    def sweep() -> dict[int, list[Rate]]:
        results: dict[int, list[Rate]] = {}
        with Engine(bench_dsn, workdir, 2, sweep_flows(sorted(SWEEP_JOBS)), name="sweep") as engine:
            for batch in sorted(SWEEP_JOBS):
                for _ in range(ROUNDS):
                    ceilings.measure_drain(2, batch, SWEEP_JOBS[batch])
                    results.setdefault(batch, []).append(engine.drain_round(f"noop_b{batch}", SWEEP_JOBS[batch]))
        return results

    results = benchmark.pedantic(sweep, rounds=1, iterations=1)
    points = figure("batch_sweep", {})
    for batch, rates in results.items():
        rate = best(rates).per_second
        points[str(batch)] = {"jobs": SWEEP_JOBS[batch], "rounds": [r.per_second for r in rates], "best": rate}
        benchmark.extra_info[f"batch_{batch}_jobs_per_second"] = rate
        record(Target(f"engine drain, no-op, batch {batch}, 2 workers", rate, "j/s",
                      f"raw 2 proc b{batch}", ceilings.drain(2, batch, SWEEP_JOBS[batch], ROUNDS)))
        assert all(r.jobs == SWEEP_JOBS[batch] for r in rates)

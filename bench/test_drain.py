"""Drain throughput of the engine against the raw-SQL ceiling, in the same run on the same server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.conftest import Target, record, size
from bench.workloads import engine_drain, raw_drain

DRAIN_JOBS = size(100_000, 5_000)
CEILING: dict[int, float] = {}


@pytest.mark.parametrize("processes", [1, 2])
def test_raw_sql_drain_ceiling(benchmark, bench_dsn: str, processes: int) -> None:
    rate = benchmark.pedantic(raw_drain, args=(bench_dsn, DRAIN_JOBS, processes, 500), rounds=1, iterations=1)
    CEILING[processes] = rate.per_second
    benchmark.extra_info["jobs_per_second"] = rate.per_second
    record(Target(f"raw-SQL drain, batch 500, {processes} proc", rate.per_second, "j/s"))
    assert rate.jobs == DRAIN_JOBS


def test_engine_drain_2_workers(benchmark, bench_dsn: str, workdir: Path) -> None:
    rate = benchmark.pedantic(engine_drain, args=(bench_dsn, DRAIN_JOBS, 2, 500, workdir), rounds=1, iterations=1)
    benchmark.extra_info["jobs_per_second"] = rate.per_second
    ceiling = CEILING.get(2)
    record(Target("engine drain, no-op, batch 500, 2 workers", rate.per_second, "j/s",
                  "raw 2 proc", ceiling, goal=0.70))
    assert rate.jobs == DRAIN_JOBS

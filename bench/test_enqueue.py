"""Bulk enqueue through the public API against raw COPY into a minimal table, in the same run.

Each enqueue round is preceded by a raw COPY round and by a COPY of ready-made rows into
skiplock.jobs itself (same table, same indexes, no Python in the timing): the second ratio tells how
much of the gap is the engine's Python and how much its table.
"""

from __future__ import annotations

from bench.conftest import Ceilings, Target, figure, record, size
from bench.workloads import Rate, best, bulk_enqueue, raw_copy_jobs

ENQUEUE_JOBS = size(100_000, 5_000)
ROUNDS = size(3, 1)


def test_raw_copy_ceiling(benchmark, ceilings: Ceilings) -> None:
    row = benchmark.pedantic(ceilings.record_copy, args=(ENQUEUE_JOBS, ROUNDS), rounds=1, iterations=1)
    benchmark.extra_info["rows_per_second"] = row.value


def test_bulk_enqueue(benchmark, bench_dsn: str, ceilings: Ceilings) -> None:
    """`Queue.enqueue_many("noop", 100,000 dicts)`: validation, orjson encoding and COPY, one transaction."""
    def run() -> tuple[list[Rate], list[Rate]]:
        table: list[Rate] = []
        engine: list[Rate] = []
        for _ in range(ROUNDS):
            ceilings.measure_copy(ENQUEUE_JOBS)
            table.append(raw_copy_jobs(bench_dsn, ENQUEUE_JOBS))
            engine.append(bulk_enqueue(bench_dsn, ENQUEUE_JOBS))
        return table, engine

    table, engine = benchmark.pedantic(run, rounds=1, iterations=1)
    rate, table_rate = best(engine).per_second, best(table).per_second
    benchmark.extra_info.update({"jobs_per_second": rate, "copy_into_jobs_rows_per_second": table_rate})
    figure("bulk_enqueue", {"jobs": ENQUEUE_JOBS, "rounds": [r.per_second for r in engine], "best": rate,
                            "copy_into_jobs_rounds": [r.per_second for r in table], "copy_into_jobs_best": table_rate})
    record(Target(f"bulk enqueue, {ENQUEUE_JOBS:,} jobs (enqueue_many)", rate, "j/s", "raw COPY",
                  ceilings.copy(ENQUEUE_JOBS, ROUNDS), goal=0.70))
    record(Target("  COPY of ready rows into skiplock.jobs", table_rate, "r/s", "raw COPY",
                  ceilings.copy(ENQUEUE_JOBS, ROUNDS)))
    record(Target("  bulk enqueue against that", rate, "j/s", "COPY into jobs", table_rate))

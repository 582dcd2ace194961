"""The drain with 1,000,000 completed jobs in history against the same drain on an empty history.

Completed jobs leave the hot table at acknowledgement, so the claim's cost must not grow with
history. Two databases, each with its own engine (2 workers, batch 500): one whose jobs_done is
filled with 1,000,000 completed jobs by SQL (then VACUUM ANALYZE), one empty. Their drain rounds
alternate (empty, history, empty, history), so both see the same machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.conftest import Target, figure, new_database, record, size
from bench.workloads import NOOP, Engine, Rate, best, fill_history

DRAIN_JOBS = size(100_000, 5_000)
HISTORY_ROWS = size(1_000_000, 20_000)
ROUNDS = size(2, 1)
FLOWS = {"noop": {"handler": NOOP, "batch_size": 500}}


@pytest.mark.timeout(1200)
def test_drain_with_history(benchmark, bench_server: str, workdir: Path) -> None:
    empty_dsn, history_dsn = new_database(bench_server), new_database(bench_server)

    def run() -> tuple[list[Rate], float, list[Rate]]:
        fill_seconds = fill_history(history_dsn, HISTORY_ROWS)
        empty: list[Rate] = []
        full: list[Rate] = []
        with Engine(empty_dsn, workdir, 2, FLOWS, name="history-empty") as plain, \
                Engine(history_dsn, workdir, 2, FLOWS, name="history-1m") as loaded:
            for _ in range(ROUNDS):
                empty.append(plain.drain_round("noop", DRAIN_JOBS))
                full.append(loaded.drain_round("noop", DRAIN_JOBS))
            done = loaded.conn.execute("SELECT count(*) FROM skiplock.jobs_done").fetchone()[0]
        assert done == HISTORY_ROWS + ROUNDS * DRAIN_JOBS
        return empty, fill_seconds, full

    empty, fill_seconds, full = benchmark.pedantic(run, rounds=1, iterations=1)
    empty_rate, full_rate = best(empty).per_second, best(full).per_second
    benchmark.extra_info.update({"empty_jobs_per_second": empty_rate, "history_jobs_per_second": full_rate})
    figure("history_drain", {"jobs": DRAIN_JOBS, "history_rows": HISTORY_ROWS, "fill_seconds": fill_seconds,
                             "empty_rounds": [r.per_second for r in empty],
                             "history_rounds": [r.per_second for r in full]})
    record(Target("engine drain, 2 workers, empty history", empty_rate, "j/s"))
    record(Target(f"engine drain, 2 workers, {HISTORY_ROWS:,} jobs in history", full_rate, "j/s",
                  "empty history", empty_rate, goal=0.90))

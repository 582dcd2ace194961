"""A steady soak at 50% of this run's peak drain rate: the hot table and its indexes must not grow
without bound (autovacuum keeps up). Sizes of skiplock.jobs at the start and end are reported; the
bound is asserted only at full size (a 20-second soak shows nothing about autovacuum)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.conftest import SMOKE, Target, figure, half_of, record, size
from bench.workloads import NOOP, Engine, soak

SECONDS = size(300, 20)
SAMPLE_EVERY = size(10, 2)
MB = 1024 * 1024


@pytest.mark.timeout(SECONDS + 900)
def test_soak(benchmark, bench_dsn: str, workdir: Path, peak: float) -> None:
    def run():
        with Engine(bench_dsn, workdir, 2, {"noop": {"handler": NOOP, "batch_size": 500}}, name="soak") as engine:
            return soak(engine, "noop", half_of(peak), SECONDS, SAMPLE_EVERY)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    start, end = result.start, result.end
    figure("soak", result.to_dict())
    benchmark.extra_info.update({"jobs": result.jobs, "jobs_total_bytes_start": start.jobs_total,
                                 "jobs_total_bytes_end": end.jobs_total})
    record(Target(f"soak {SECONDS} s at 50% of peak: sustained", result.achieved, "j/s", "offered", result.rate))
    record(Target("soak: backlog at end (jobs waiting)", end.backlog, "job"))
    record(Target("soak: skiplock.jobs total size at start", start.jobs_total / MB, "MB"))
    record(Target("soak: skiplock.jobs total size at end", end.jobs_total / MB, "MB"))
    record(Target("soak: skiplock.jobs indexes at start", start.jobs_indexes / MB, "MB"))
    record(Target("soak: skiplock.jobs indexes at end", end.jobs_indexes / MB, "MB"))
    record(Target("soak: skiplock.jobs largest size seen", max(s.jobs_total for s in result.samples) / MB, "MB"))
    if not SMOKE:
        # Bounded: the second half of the soak adds little to what the first half reached (autovacuum
        # frees the dead tuples of each naptime for reuse), and the table stays far below the volume
        # that went through it.
        first_half = max(s.jobs_total for s in result.samples if s.at <= SECONDS / 2)
        assert end.jobs_total <= 1.5 * first_half + 16 * MB, (
            f"skiplock.jobs grew from {first_half / MB:.0f} MB (first half) to {end.jobs_total / MB:.0f} MB")
        assert end.autovacuums > 0, "autovacuum never vacuumed skiplock.jobs during the soak"

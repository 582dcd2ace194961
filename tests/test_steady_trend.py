"""The steady bench's size trend: its window of the last minutes includes the sample that opens it."""

from bench.steady import SizeSample, trend_mb_per_min


def _samples(sizes: list[float], last_at: float) -> list[SizeSample]:
    ats = [60.0 * i for i in range(len(sizes) - 1)] + [last_at]
    return [SizeSample(at, mb, 0.0, 0.0, 0, 0, 0, 0, 0) for at, mb in zip(ats, sizes)]


def test_a_step_in_the_eighth_minute_counts_in_the_last_three_minutes():
    # The last sample comes a moment after the run's end (600.1 s); the step is between 420 and 480 s.
    samples = _samples([85.0] * 8 + [95.0] * 3, last_at=600.1)
    assert trend_mb_per_min(samples, 180) > 2.5  # 3 MB/min: a least-squares line through 85, 95, 95, 95


def test_a_flat_end_after_an_earlier_step_has_no_trend():
    samples = _samples([85.0] * 6 + [95.0] * 5, last_at=600.1)
    assert trend_mb_per_min(samples, 180) == 0.0

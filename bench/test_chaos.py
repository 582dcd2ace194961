"""The chaos run (issue 10; bench/chaos.py): 10 minutes of faults under a steady load, or 60 s in
smoke mode (the one .ci/run runs). It asserts what must hold (no job lost, none stuck, none dead, no
two executions of one job overlapping, no worker lost to a short outage) and reports repeats and the
longest stall after each kind of fault. Its own JSON goes to bench/results/chaos[-smoke].json.

SKIPLOCK_CHAOS_SECONDS and SKIPLOCK_CHAOS_RATE override the length and the offered load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.chaos import ChaosRun
from bench.conftest import RESULTS, SMOKE, Target, figure, record

SECONDS = float(os.environ.get("SKIPLOCK_CHAOS_SECONDS") or (55 if SMOKE else 600))  # smoke: ~70 s with start and drain
RATE = float(os.environ.get("SKIPLOCK_CHAOS_RATE") or (200 if SMOKE else 500))


@pytest.mark.timeout(SECONDS + 600)
def test_chaos(tmp_path: Path) -> None:
    lines: list[str] = []
    result = ChaosRun(tmp_path, SECONDS, RATE, log=lines.append).run()
    report = result.to_dict()
    report["timeline"] = lines
    figure("chaos", {k: v for k, v in report.items() if k not in ("events", "timeline")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("chaos-smoke.json" if SMOKE else "chaos.json")).write_text(json.dumps(report, indent=2) + "\n")
    label = f"chaos {SECONDS:g} s at {RATE:g} j/s"
    record(Target(f"{label}: jobs enqueued", result.produced, "job"))
    record(Target("chaos: lost / stuck / dead", len(result.lost) + result.stuck + result.dead, "job", goal=0,
                  lower_is_better=True))
    record(Target("chaos: overlapping executions", len(result.overlaps), "job", goal=0, lower_is_better=True))
    record(Target("chaos: repeats (at-least-once re-runs)", result.repeats, "run"))
    record(Target("chaos: drain after the producers stopped", result.drain_seconds, "s"))
    for kind, seconds in sorted(result.longest_stall.items()):
        record(Target(f"chaos: longest stall, {kind} (x{result.faults.get(kind, 1)})", seconds, "s"))
    assert result.produced > 0
    assert not result.lost, f"{len(result.lost)} jobs never finished, e.g. {result.lost[:10]} ({tmp_path})"
    assert result.stuck == 0 and result.dead == 0, (result.stuck, result.dead, tmp_path)
    assert not result.overlaps, f"{len(result.overlaps)} overlapping executions: {result.overlaps[:5]}"
    assert result.lost_after_short_outage == 0, "an outage shorter than stale_after marked workers lost"

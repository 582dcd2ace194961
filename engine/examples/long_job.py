"""A long job that reports its progress with ctx.progress and stops when it is cancelled
(ctx.check_cancelled): what the console's Running view shows. console/screenshots.py runs it for the
README's screenshot; `[flows.NAME] handler = "engine.examples.long_job:long_job"` runs it anywhere."""

from __future__ import annotations

import time
from typing import Any


def long_job(payload: dict[str, Any], ctx: Any) -> dict[str, int]:
    steps = int(payload.get("steps", 60))
    pause = float(payload.get("pause", 1.0))
    what = str(payload.get("what", "step"))
    for step in range(steps):
        ctx.check_cancelled()
        ctx.progress(step / steps, f"{what} {step + 1} of {steps}")
        time.sleep(pause)
    return {"steps": steps}

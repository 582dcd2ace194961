"""Built-in flows for demos and benchmarks.

- `noop`: does nothing; measures the engine's own cost per job.
- `sleep`: sleeps `payload["seconds"]` (default 0.01).
- `flaky`: fails a fraction `payload["fail"]` (default 0.2) of attempts; of those failures, a fraction
  `payload["permanent"]` (default 0.1) is permanent and goes straight to dead letters.
"""

from __future__ import annotations

import random
import time
from typing import Any

from engine.errors import PermanentError


class FlakyError(Exception):
    """A transient failure of the `flaky` demo flow."""


def noop(payload: dict[str, Any]) -> None:
    return None


def sleep(payload: dict[str, Any]) -> None:
    time.sleep(float(payload.get("seconds", 0.01)))


def flaky(payload: dict[str, Any]) -> dict[str, Any]:
    if random.random() < float(payload.get("fail", 0.2)):
        if random.random() < float(payload.get("permanent", 0.1)):
            raise PermanentError("flaky: permanent failure (demo)")
        raise FlakyError("flaky: transient failure (demo)")
    return {"ok": True}

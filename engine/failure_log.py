"""One log line per failed attempt (WARNING; ERROR when the job became a dead letter), rate-limited
per flow so a failure storm cannot flood stdout.

Each worker keeps a token bucket per flow (a burst of FAILURE_LOG_BURST lines, then
FAILURE_LOG_PER_SECOND). A line left out is counted; the next line of that flow says how many were
left out (`suppressed`), and the telemetry tick writes that count on its own line once the bucket
allows, so a storm that ends is still accounted for. Called after an ack with failures only: the
success path never comes here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from engine.limits import FAILURE_LOG_BURST, FAILURE_LOG_PER_SECOND
from engine.redact import redact_text
from engine.telemetry import FailureSample


def first_line(message: str, limit: int = 300) -> str:
    line = message.strip().split("\n", 1)[0].strip()
    return redact_text(line[:limit])


class _Bucket:
    __slots__ = ("tokens", "at", "suppressed", "suppressed_dead")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.at = now
        self.suppressed = 0
        self.suppressed_dead = 0


class FailureLog:
    def __init__(self, log: logging.LoggerAdapter | logging.Logger, *,  # type: ignore[type-arg]
                 burst: int = FAILURE_LOG_BURST, per_second: float = FAILURE_LOG_PER_SECOND,
                 clock: Any = time.monotonic) -> None:
        self.log = log
        self.burst = float(burst)
        self.per_second = per_second
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # after_ack (main or completer thread) and the tick thread

    def _take(self, flow: str, now: float) -> _Bucket | None:
        """The flow's bucket with a token taken, or None (the line is suppressed)."""
        bucket = self._buckets.get(flow)
        if bucket is None:
            bucket = self._buckets[flow] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_second)
        bucket.at = now
        if bucket.tokens < 1.0:
            return None
        bucket.tokens -= 1.0
        return bucket

    def failed(self, flow: str, samples: Iterable[FailureSample], dead_ids: Iterable[int]) -> None:
        dead = set(dead_ids)
        with self._lock:
            now = self.clock()
            for s in samples:
                is_dead = s.job in dead
                bucket = self._take(flow, now)
                if bucket is None:
                    b = self._buckets[flow]
                    b.suppressed += 1
                    b.suppressed_dead += is_dead
                    continue
                extra: dict[str, Any] = {"flow": flow, "job": s.job, "run": s.run, "attempt": s.attempt,
                                         "max_attempts": s.max_attempts, "error_type": s.type}
                if bucket.suppressed:
                    extra["suppressed"] = bucket.suppressed
                    extra["suppressed_dead"] = bucket.suppressed_dead
                    bucket.suppressed = bucket.suppressed_dead = 0
                attempt = f"attempt {s.attempt} of {s.max_attempts}" if s.max_attempts else "attempt ?"
                run = f", run {s.run}" if s.run else ""
                what = "dead letter" if is_dead else "failed"
                self.log.log(logging.ERROR if is_dead else logging.WARNING,
                             "%s job %s %s (%s%s): %s: %s", flow, s.job, what, attempt, run, s.type,
                             first_line(s.message), extra=extra)

    def flush(self) -> None:
        """Report counts left out, once a flow's bucket has a token again (the telemetry tick)."""
        with self._lock:
            now = self.clock()
            for flow, bucket in self._buckets.items():
                if bucket.suppressed and self._take(flow, now) is not None:
                    self.log.warning("%s: %d failed attempts not logged (rate limit), %d of them dead letters",
                                     flow, bucket.suppressed, bucket.suppressed_dead,
                                     extra={"flow": flow, "suppressed": bucket.suppressed,
                                            "suppressed_dead": bucket.suppressed_dead})
                    bucket.suppressed = bucket.suppressed_dead = 0

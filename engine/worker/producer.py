"""Per flow: the claim, with its gates, and how many jobs to claim.

Gates: the fleet-wide concurrency limit (an advisory lock serialises the flow's claimers, so the count
and the claim agree), the circuit's half-open trial (one job at a time), and in SQL the paused flow
and the open circuit. Size: never more than `batch_size` per claim; a concurrent executor keeps at
most `concurrency_per_worker` + one batch in hand and claims again once what it holds drops below
`concurrency_per_worker` (the low-water mark); the inline executor claims about HOLD_TARGET seconds
of work (from the flow's observed run time), so slow jobs are not hoarded.

Flow control: a rate-limited flow claims through claim_rated (the token bucket is refilled and debited
by the claim statement); a flow with a per-key limit through claim_keyed (two statements in one
transaction). Every other flow sends claim_batch unchanged. A limited flow whose claim comes back
empty is held (`hold_until`, monotonic): until its bucket holds a token, or, blocked by its keys,
for KEY_RECHECK doubling to KEY_RECHECK_MAX while claims stay empty (a finished job of another
worker sends no wake-up). The worker's loop skips held flows and sleeps until the earliest hold ends.
"""

from __future__ import annotations

import time
from typing import Any, Final

from engine import store
from engine.handlers import FlowRuntime
from engine.store import claim_batch, new_claim_token

HOLD_TARGET: Final = 1.0  # seconds of work the inline executor claims at once
RUN_TIME_WEIGHT: Final = 0.3  # EWMA weight of a batch's mean run time
KEY_RECHECK: Final = 0.05  # seconds a flow whose keys are all blocked waits before claiming again
KEY_RECHECK_MAX: Final = 1.0


class Producer:
    def __init__(self, worker: Any, flow: FlowRuntime) -> None:
        self.worker = worker
        self.flow = flow
        self.batch_size = flow.config.batch_size
        self.mean_run = 0.0  # seconds per job, observed (inline executor)
        config = flow.config
        self.rate = config.rate_limit
        self.burst = config.burst
        self.per_key = config.per_key
        self.limited = self.rate is not None or self.per_key is not None
        # No gate but the flow's row (paused, circuit): claim_flows may claim it among others.
        self.plain = config.concurrency is None and not self.limited
        self.hold_until = 0.0  # monotonic; a limited flow with nothing claimable now is skipped until then
        self._key_backoff = KEY_RECHECK
        self._bucket_ready = False

    def inline_limit(self) -> int:
        if self.flow.half_open:
            return 1
        mean = self.mean_run
        if mean <= HOLD_TARGET / self.batch_size:
            return self.batch_size
        return max(1, min(self.batch_size, int(HOLD_TARGET / mean)))

    def observe(self, jobs: int, seconds: float) -> None:
        if jobs:
            mean = seconds / jobs
            self.mean_run = mean if not self.mean_run else self.mean_run + RUN_TIME_WEIGHT * (mean - self.mean_run)

    def concurrent_limit(self, in_hand: int, concurrency: int) -> int:
        """How many to claim now for a concurrent executor holding `in_hand` jobs (0: none)."""
        if self.flow.half_open:
            return 0 if in_hand else 1  # one trial at a time
        if in_hand >= concurrency:
            return 0
        return min(self.batch_size, concurrency + self.batch_size - in_hand)

    def claim(self, limit: int) -> tuple[list[tuple[Any, ...]], int, bool]:
        """(rows, claim token, trial). On a lost connection the claim may have committed: what that
        token took is handed back (attempts refunded) and nothing is returned."""
        w = self.worker
        trial = self.flow.half_open
        token = new_claim_token()
        try:
            return self._claim(limit, token), token, trial
        except w.transient_errors:
            w.with_db("release claim", lambda conn: store.claim_release_token(conn, w.id, token))
            return [], token, trial

    def _claim(self, limit: int, token: int) -> list[tuple[Any, ...]]:
        w = self.worker
        flow = self.flow
        concurrency = flow.config.concurrency
        with w.pool.connection() as conn:
            if concurrency is None and not self.limited:
                return claim_batch(conn, flow.name, w.id, limit, token, flow.config.max_attempts)
            if self.limited:
                return self._claim_limited(conn, limit, token, concurrency)
            with conn.transaction():
                store.claim_flow_lock(conn, flow.name)
                room = concurrency - store.claim_running_count(conn, flow.name)
                if room <= 0:
                    return []
                return claim_batch(conn, flow.name, w.id, min(limit, room), token, flow.config.max_attempts)

    def _claim_limited(self, conn: Any, limit: int, token: int, concurrency: int | None) -> list[tuple[Any, ...]]:
        """The claim of a rate-limited or per-key-limited flow (and its fleet limit, if it has one)."""
        w = self.worker
        name = self.flow.name
        config = self.flow.config
        rate = self.rate
        if rate is not None and not self._bucket_ready:
            store.rate_bucket_ensure(conn, name, self.burst)
            self._bucket_ready = True
        if concurrency is None and self.per_key is None:
            assert rate is not None
            rows = store.claim_rated(conn, name, w.id, limit, token, config.max_attempts, rate=rate, burst=self.burst)
        else:
            with conn.transaction():
                if concurrency is not None:
                    store.claim_flow_lock(conn, name)
                    limit = min(limit, concurrency - store.claim_running_count(conn, name))
                    if limit <= 0:
                        return []
                if self.per_key is not None:
                    rows = store.claim_keyed(conn, name, w.id, limit, token, config.max_attempts,
                                             key_field=config.concurrency_key, per_key=self.per_key,
                                             rate=rate, burst=self.burst if rate is not None else None)
                else:
                    assert rate is not None
                    rows = store.claim_rated(conn, name, w.id, limit, token, config.max_attempts,
                                             rate=rate, burst=self.burst)
        if rows:
            self._key_backoff = KEY_RECHECK
            return rows
        wait = 0.0
        if rate is not None:
            wait = store.rate_bucket_wait(conn, name, rate=rate, burst=self.burst)
        if wait <= 0 and self.per_key is not None:
            wait = self._key_backoff  # blocked keys, or nothing due: look again soon, then less often
            self._key_backoff = min(self._key_backoff * 2, KEY_RECHECK_MAX)
        if wait > 0:
            self.hold_until = time.monotonic() + wait
        return rows

    @property
    def due_rate(self) -> tuple[float, float] | None:
        """(rate, burst) for flows_due: a rate-limited flow is due only with a token in its bucket."""
        return (self.rate, self.burst) if self.rate is not None else None

    def woken(self) -> None:
        """An enqueue wake-up: a keyed flow looks again at once (its rate hold stays)."""
        self._key_backoff = KEY_RECHECK
        if self.rate is None:
            self.hold_until = 0.0

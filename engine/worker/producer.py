"""Per flow: the claim, with its gates, and how many jobs to claim.

Gates: the fleet-wide concurrency limit (an advisory lock serialises the flow's claimers, so the count
and the claim agree), the circuit's half-open trial (one job at a time), and in SQL the paused flow
and the open circuit. Size: never more than `batch_size` per claim; a concurrent executor keeps at
most `concurrency_per_worker` + one batch in hand and claims again once what it holds drops below
`concurrency_per_worker` (the low-water mark); the inline executor claims about HOLD_TARGET seconds
of work (from the flow's observed run time), so slow jobs are not hoarded.
"""

from __future__ import annotations

from typing import Any, Final

from engine import store
from engine.handlers import FlowRuntime
from engine.store import claim_batch, new_claim_token

HOLD_TARGET: Final = 1.0  # seconds of work the inline executor claims at once
RUN_TIME_WEIGHT: Final = 0.3  # EWMA weight of a batch's mean run time


class Producer:
    def __init__(self, worker: Any, flow: FlowRuntime) -> None:
        self.worker = worker
        self.flow = flow
        self.batch_size = flow.config.batch_size
        self.mean_run = 0.0  # seconds per job, observed (inline executor)

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
            if concurrency is None:
                return claim_batch(conn, flow.name, w.id, limit, token, flow.config.max_attempts)
            with conn.transaction():
                store.claim_flow_lock(conn, flow.name)
                room = concurrency - store.claim_running_count(conn, flow.name)
                if room <= 0:
                    return []
                return claim_batch(conn, flow.name, w.id, min(limit, room), token, flow.config.max_attempts)

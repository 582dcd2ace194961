"""The circuit breaker of a flow, in one place: counting consecutive failures, opening the circuit
(in SQL, so every worker of the fleet sees it), half-open trials of one job, closing it again.

The claim SQL refuses to claim while the circuit is open and its cool-down runs; `half_open` (set
from the flows table on every tick, and when this worker opens it) makes the producer claim one trial
job at a time until a trial succeeds.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from engine import store
from engine.handlers import FlowRuntime
from engine.telemetry import encode_event


class CircuitBreaker:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._lock = threading.Lock()  # the completer thread and the main loop both report

    def after_batch(self, flow: FlowRuntime, had_failures: bool, had_success: bool, trial: bool = False) -> None:
        """Called after each ack with what the batch did; `flow.consecutive_failures` is kept by the
        executor (reset on success, counted per failure)."""
        policy = flow.config.circuit
        if policy is None:
            return
        w = self.worker
        # Only a trial (a job claimed while the circuit was open) closes or re-opens it: a batch that
        # was already running when another worker opened the circuit proves nothing.
        if trial and had_success and not had_failures:
            flow.half_open = False
            closed = w.with_db("circuit", lambda conn: store.circuit_close(conn, flow.name))
            if closed:
                w.log.info("circuit closed", extra={"flow": flow.name})
                w.notify([encode_event("circuit_closed", engine=w.spec.engine_id, worker=w.id, flow=flow.name)])
            return
        with self._lock:
            if not (flow.consecutive_failures >= policy.failures or (trial and had_failures)):
                return
            failures = flow.consecutive_failures
            flow.consecutive_failures = 0
            flow.half_open = True  # open now (by us or by another worker): claims are trials until it closes

        until = w.with_db("circuit", lambda conn: store.circuit_open(conn, flow.name, policy.cooldown))
        if until is not None:
            w.log.warning("circuit opened", extra={"flow": flow.name, "failures": failures})
            w.notify([encode_event("circuit_opened", engine=w.spec.engine_id, worker=w.id, flow=flow.name,
                                   failures=failures, until=until)])

    @staticmethod
    def guards(flows: list[FlowRuntime]) -> list[FlowRuntime]:
        """The flows whose circuit state the tick reads: those with a circuit, or seen open."""
        return [f for f in flows if f.config.circuit is not None or f.half_open]

    @staticmethod
    def refresh(guarded: list[FlowRuntime], conn: psycopg.Connection[Any]) -> None:
        """While a flow's circuit is open, claims are trials of one job: none succeeds during the
        cool-down (the claim SQL holds the flow), the first one after it is the half-open trial. Set as
        soon as the circuit is seen open, so a worker waking just after the cool-down cannot claim a
        full batch before the next tick. `guarded`: guards(flows), which the tick has already taken."""
        if not guarded:
            return  # no flow here has a circuit: nothing to read each tick
        open_now = store.flows_circuit_open(conn, [f.name for f in guarded])
        for flow in guarded:
            flow.half_open = flow.name in open_now

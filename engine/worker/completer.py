"""Buffered, fenced acks for the concurrent executors (threads, asyncio).

Completions go into a buffer; one completer thread flushes it when FLUSH_COUNT are buffered or
FLUSH_INTERVAL after the first one arrived (River batches for 50 ms, pgqueuer for 0.1 s), with one ack
statement per claim token (every ack is fenced by token, as the inline path's), on a pooled
connection. Telemetry, the circuit breaker and run hooks follow each ack, on this thread.
The inline executor does not come here: it acks its batch itself, in one statement.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from engine.handlers import FlowRuntime
from engine.store import Children, Failure, ack_batch, new_ack_id
from engine.telemetry import FailureSample

FLUSH_COUNT: Final = 200
FLUSH_INTERVAL: Final = 0.05


@dataclass
class _Group:
    """What one claim (token) has completed since the last flush."""

    flow: FlowRuntime
    trial: bool
    done_ids: list[int] = field(default_factory=list)
    results: list[str | None] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    samples: list[FailureSample] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # rare paths, each its own fenced statement
    snoozed: list[tuple[int, float]] = field(default_factory=list)
    children: Children | None = None  # Next(...) jobs of this group's parents
    wait_ms: float = 0.0
    run_ms: float = 0.0


class Completer:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._cond = threading.Condition()
        self._groups: dict[int, _Group] = {}
        self._count = 0
        self._first_at = 0.0
        self._flushing = 0  # completions taken by a flush still being written
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._count + self._flushing

    def _group(self, flow: FlowRuntime, token: int, trial: bool) -> _Group:
        group = self._groups.get(token)
        if group is None:
            group = self._groups[token] = _Group(flow, trial)
        if not self._count:
            self._first_at = time.monotonic()
            self._cond.notify()  # the completer sleeps until the first completion, then FLUSH_INTERVAL
        self._count += 1
        if self._count == FLUSH_COUNT:
            self._cond.notify()
        return group

    def done(self, flow: FlowRuntime, token: int, row: tuple[Any, ...], result: str | None, run_ms: float,
             trial: bool = False, children: Children | None = None) -> None:
        with self._cond:
            group = self._group(flow, token, trial)
            if children is not None:
                if group.children is None:
                    group.children = Children()
                group.children.extend(children)
            group.done_ids.append(row[0])
            group.results.append(result)
            group.wait_ms += row[5]
            group.run_ms += run_ms
            flow.consecutive_failures = 0

    def failed(self, flow: FlowRuntime, token: int, row: tuple[Any, ...], failure: Failure, run_ms: float,
               trial: bool = False) -> None:
        with self._cond:
            group = self._group(flow, token, trial)
            group.failures.append(failure)
            group.samples.append(FailureSample(row[0], row[2], row[3], failure.error_type, failure.message, row[4]))
            group.wait_ms += row[5]
            group.run_ms += run_ms
            flow.consecutive_failures += 1

    def cancelled(self, flow: FlowRuntime, token: int, job_id: int, trial: bool = False) -> None:
        """A job whose cancel was requested ended (or was no longer waited for): it ends cancelled."""
        with self._cond:
            self._group(flow, token, trial).cancelled.append(job_id)

    def snoozed(self, flow: FlowRuntime, token: int, job_id: int, delay: float, trial: bool = False) -> None:
        with self._cond:
            self._group(flow, token, trial).snoozed.append((job_id, delay))

    def flush(self) -> None:
        """Write everything buffered now (shutdown, or before the worker reports itself idle)."""
        with self._cond:
            groups, self._groups = self._groups, {}
            taken, self._count = self._count, 0
            self._flushing += taken
        try:
            for token, group in groups.items():
                self._ack(token, group)
        finally:
            with self._cond:
                self._flushing -= taken

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    if self._count >= FLUSH_COUNT:
                        break
                    if self._count:
                        left = self._first_at + FLUSH_INTERVAL - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
                if self._closing:
                    return
            try:
                self.flush()
            except Exception as exc:  # with_db retried for a minute: the worker is losing the database
                self.worker.log.error("completer could not ack: %s", exc)
                self.worker.request_stop(self.worker.exit_db_lost)
                return

    def _ack(self, token: int, group: _Group) -> None:
        w = self.worker
        flow = group.flow
        if group.cancelled:
            w.control.ack_cancelled(flow, token, group.cancelled)
        if group.snoozed:
            w.control.snooze(token, [i for i, _ in group.snoozed], [d for _, d in group.snoozed])
        if not group.done_ids and not group.failures:
            return
        results = group.results if any(r is not None for r in group.results) else None
        ack_id = new_ack_id()  # once, outside the retries: a retry after a lost reply reads the first outcome
        ack = w.with_db("ack", lambda conn: ack_batch(conn, w.id, token, group.done_ids, results, group.failures,
                                                      flow.config.max_attempts, ack_id=ack_id,
                                                      children=group.children))
        w.after_ack(flow, ack, len(group.failures), group.wait_ms, group.run_ms, group.samples,
                    had_success=bool(group.done_ids), trial=group.trial)

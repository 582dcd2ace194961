"""How a worker runs a flow's jobs; one executor per flow, chosen when the flow loads (FlowRuntime.mode).

- InlineExecutor (`inline`): the hot path. Claim a batch, run each row in the main thread (SIGALRM for
  timeouts), ack the batch in one statement. No per-job object, log line or round trip. The monitor
  releases the unstarted rest of a batch held HOLD_BOUND past its current job's start, and stops a
  handler that ignored its timeout (after acking what finished and releasing what never started).
- BatchExecutor (`batch`): one handler call with the whole batch; one outcome per job.
- ThreadExecutor (`threads`): N handler threads of our own fed from a queue; a thread past its job's
  deadline is abandoned (its job fails with JobTimeout, a new thread takes its place).
- AsyncExecutor (`asyncio`): one event loop in its own thread, up to N tasks in flight; a job is
  cancelled at its deadline.
Concurrent executors report completions to the completer (buffered, fenced acks).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from typing import Any, Final

import psycopg
from psycopg import pq

from engine.errors import JobCancelled, Snooze
from engine import db
from engine.handlers import FlowRuntime, JobContext, JobTimeout
from engine.stages import HANDOFF_TYPES, split
from engine.store import Children, Failure, ack_batch, new_ack_id, release_batch
from engine.sources import SourceRegistry
from engine.telemetry import FailureSample
from engine.worker.context import AsyncPg, BatchTransaction, PerJobPg, make_context, swallowed_error
from engine.worker.outcome import BatchResultError, encode_result, failure, timeout_error

HOLD_BOUND: Final = 2.0  # seconds a batch's unstarted jobs may wait behind the job that runs
CANCEL_HARD_STOP: Final = 2.0  # after a forced cancel's SIGALRM, seconds before the inline hard stop
TOP_UP_INTERVAL: Final = 0.05  # seconds between top-ups of concurrent flows while an inline batch runs
ACTIVE: Final = pq.TransactionStatus.ACTIVE
CHILD: Final = [False]  # set in a child forked by a handler: it must exit as soon as the handler returns


def _after_fork_in_child() -> None:
    CHILD[0] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _cancel_statement(conn: Any) -> bool:
    """Cancel the statement `conn` runs on the server, so the connection stays usable."""
    if conn is None or conn.pgconn.transaction_status != ACTIVE:
        return False
    try:
        conn.cancel_safe(timeout=2.0)
    except Exception:
        return False
    return True


# -- inline ------------------------------------------------------------------------------------------


class InlineBatch:
    """The batch the main thread runs now: shared with the monitor thread and the SIGALRM handler."""

    __slots__ = ("flow", "rows", "token", "tx", "index", "end", "started", "hard_stop", "timed_out",
                 "ctx", "done_ids", "results", "failures", "whole", "cancel_forced", "cancelled", "snoozed",
                 "children")

    def __init__(self, flow: FlowRuntime, rows: Any, token: int, tx: BatchTransaction | None,
                 whole: bool = False) -> None:
        self.flow = flow
        self.rows = rows
        self.token = token
        self.tx = tx
        self.index = 0
        self.end = len(rows)
        self.started = time.monotonic()
        self.hard_stop = 0.0
        self.timed_out = False
        self.ctx: JobContext | None = None
        self.done_ids: list[int] = []
        self.results: list[str | None] | None = None
        self.failures: list[Failure] = []
        self.whole = whole  # a batch handler: the batch is one call, nothing to release beside it
        self.cancel_forced = 0  # the job id whose cancel_grace passed: SIGALRM raises JobCancelled in it
        self.cancelled: list[int] = []  # ended cancelled (engine/worker/control.py): acked apart
        self.snoozed: list[tuple[int, float]] = []  # raised Snooze(delay): put back apart
        self.children = Children()  # Next(...) jobs of this batch's parents, inserted by its ack


class InlineExecutor:
    concurrent = False

    def __init__(self, worker: Any, flow: FlowRuntime, producer: Any) -> None:
        self.worker = worker
        self.flow = flow
        self.producer = producer
        self.pg = PerJobPg(worker)

    # job control (engine/worker/control.py)

    def cancel(self, job_id: int, token: int) -> bool:
        """Do we hold this job? (ctx.cancelled reads the worker's requests: nothing to set here.)"""
        batch = self.worker.inline
        return (batch is not None and batch.flow is self.flow and batch.token == token
                and any(r[0] == job_id for r in batch.rows))

    def force_cancel(self, job_id: int, token: int) -> None:
        """cancel_grace passed: interrupt the handler as a timeout does (SIGALRM raises JobCancelled in
        it); a handler that ignores that too meets the hard stop. A job not started yet ends cancelled
        when the batch reaches it."""
        w = self.worker
        with w.inline_lock:
            batch = w.inline
            if batch is None or batch.flow is not self.flow or batch.token != token:
                return
            if batch.whole:
                if not all(w.control.is_requested(r[0]) for r in batch.rows):
                    return  # a batch call ends early only when all of its jobs are cancelled
            elif batch.rows[batch.index][0] != job_id:
                return
            batch.cancel_forced = job_id
            stop = time.monotonic() + CANCEL_HARD_STOP
            if not batch.hard_stop or batch.hard_stop > stop:
                batch.hard_stop = stop
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)

    def step(self) -> int:
        rows, token, trial = self.producer.claim(self.claim_limit())
        return self.take(rows, token, trial)

    def claim_limit(self) -> int:
        """How many jobs to claim now (<= 0: none)."""
        return self.producer.inline_limit()

    def take(self, rows: Any, token: int, trial: bool) -> int:
        """Run what a claim (this flow's own, or claim_flows across flows) returned."""
        if not rows:
            return 0
        self.worker.busy()
        self.run(rows, token, trial)
        return len(rows)

    # timeouts (SIGALRM: main thread only)

    def _arm(self, batch: InlineBatch, seconds: float) -> None:
        batch.timed_out = False
        # A handler stuck where SIGALRM cannot interrupt it is stopped by the monitor thread.
        batch.hard_stop = time.monotonic() + seconds + max(1.0, seconds * 0.5)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    @staticmethod
    def _disarm(batch: InlineBatch) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        batch.hard_stop = 0.0

    def _call(self, batch: InlineBatch, row: tuple[Any, ...], tx: BatchTransaction | None) -> Any:
        """A (payload, ctx) handler. If it used ctx.pg, the job's writes commit when it returns and roll
        back when it raises (in a transactional batch: its savepoint is released or rolled back)."""
        flow = self.flow
        if tx is None:
            ctx = make_context(self.worker, flow, row, self.pg.provider, token=batch.token)
            end = self.pg.end
        else:
            ctx = make_context(self.worker, flow, row, tx.provider, token=batch.token)
            ctx._enqueue = tx.enqueue(ctx)
            end = tx.end
        batch.ctx = ctx
        try:
            result = self.flow.handler(row[1], ctx)
        except BaseException:
            batch.ctx = None
            if ctx._pg is not None:
                end(ctx._pg, False)
            raise
        batch.ctx = None
        if ctx._pg is not None:
            end(ctx._pg, not batch.timed_out and not ctx.cancelled)  # a cancelled job's writes roll back
        return result

    def _ack(self, token: int, done_ids: list[int], results: list[str | None] | None, failures: list[Failure],
             tx: BatchTransaction | None, children: Children | None) -> Any:
        """The batch's one fenced ack (with its parents' Next children): inside its transaction, or on
        its own with a fresh ack id."""
        if tx is not None:
            return tx.ack(token, done_ids, results, failures, children)
        w = self.worker
        max_attempts = self.flow.config.max_attempts
        ack_id = new_ack_id()  # once, outside the retries: a retry reads the first outcome
        return w.with_db("ack", lambda conn: ack_batch(conn, w.id, token, done_ids, results, failures,
                                                       max_attempts, ack_id=ack_id, children=children))

    def run(self, rows: Any, token: int, trial: bool) -> None:
        w = self.worker
        flow = self.flow
        tx = BatchTransaction(w, flow, rows) if flow.config.transactional else None  # once per batch
        if tx is not None:
            tx.begin()
        batch = InlineBatch(flow, rows, token, tx)
        handler = flow.handler
        with_context = flow.with_context
        timeout = flow.config.timeout
        lock = w.inline_lock
        done_ids = batch.done_ids
        failures = batch.failures
        children = batch.children
        flow_next = flow.config.next
        known = w.known_flow
        results: list[str | None] | None = None
        samples: list[FailureSample] = []
        stopped_at: int | None = None
        clock = time.monotonic
        control = w.control
        cancelled = batch.cancelled
        started = clock()
        # Concurrent flows of this worker are topped up between inline jobs, not only between batches.
        top_up = w.top_up if w.concurrent_executors else None
        next_top_up = started + TOP_UP_INTERVAL
        w.inline = batch
        try:
            for index, row in enumerate(rows):
                if top_up is not None and clock() >= next_top_up:
                    top_up()
                    next_top_up = clock() + TOP_UP_INTERVAL
                with lock:  # against the monitor releasing the rest of the batch
                    if index >= batch.end:
                        break
                    if w.stopping:
                        stopped_at = index
                        break
                    batch.index = index
                    batch.started = clock()
                if control.requests and row[0] in control.requests:
                    cancelled.append(row[0])  # cancelled before it started: it never runs
                    continue
                try:
                    if timeout is not None:
                        self._arm(batch, timeout)
                    try:
                        if with_context:
                            result = self._call(batch, row, tx)
                        else:
                            result = handler(row[1])
                    finally:
                        if timeout is not None:
                            self._disarm(batch)
                        elif batch.hard_stop:
                            batch.hard_stop = 0.0  # a forced cancel's hard stop, for this job only
                    if CHILD[0]:
                        w.exit_child()
                    if control.requests and row[0] in control.requests:
                        cancelled.append(row[0])  # returned after its cancel: it ends cancelled
                        continue
                    if timeout is not None and batch.timed_out:
                        raise timeout_error(timeout)  # it caught its JobTimeout and went on: it fails all the same
                    if result is not None and (result.__class__ in HANDOFF_TYPES or flow_next is not None):
                        result = split(result, row[0], flow_next, known, children)
                    if result is not None:
                        text = encode_result(result)
                        if results is None:
                            results = batch.results = [None] * len(done_ids)
                        results.append(text)
                    elif results is not None:
                        results.append(None)
                    done_ids.append(row[0])
                    if flow.consecutive_failures:
                        flow.consecutive_failures = 0
                except BaseException as exc:  # every BaseException of a handler fails its job alone
                    if CHILD[0]:
                        w.exit_child()
                    if control.requests and row[0] in control.requests:
                        cancelled.append(row[0])
                        continue
                    if timeout is not None and batch.timed_out and not isinstance(exc, JobTimeout):
                        exc = timeout_error(timeout)
                    elif isinstance(exc, Snooze):
                        batch.snoozed.append((row[0], exc.delay))
                        continue
                    fail = failure(flow, row, exc)
                    failures.append(fail)
                    samples.append(FailureSample(row[0], row[2], row[3], fail.error_type, fail.message, row[4]))
                    flow.consecutive_failures += 1
            run_s = clock() - started
            with lock:
                w.inline = None
                unstarted = [r[0] for r in rows[stopped_at:batch.end]] if stopped_at is not None else []
            # Batches of one claim_flows statement: their acks commit together (Worker._claim_across).
            deferred = w.deferred_acks if tx is None else None
            if deferred is None:
                ack = self._ack(token, done_ids, results, failures, tx, children or None)
        finally:
            w.inline = None
            if tx is not None:
                tx.close()
        if unstarted:
            w.with_db("release", lambda conn: release_batch(conn, w.id, token, unstarted))
        end_apart(w, flow, token, batch)
        ran = len(done_ids) + len(failures) + len(batch.cancelled) + len(batch.snoozed)
        self.producer.observe(ran, run_s)
        wait_ms = sum(r[5] for r in rows[:ran])

        def after(ack: Any) -> None:
            w.after_ack(flow, ack, len(failures), wait_ms, run_s * 1000.0, samples, had_success=bool(done_ids),
                        trial=trial)
        if deferred is not None:
            deferred.add(flow, token, done_ids, results, failures, children or None, after)
        else:
            after(ack)


class BatchExecutor(InlineExecutor):
    """`batch = true`: handler(payloads) or handler(payloads, ctx) -> one result or Exception per job."""

    def claim_limit(self) -> int:
        return self.producer.batch_size if not self.flow.half_open else 1

    def run(self, rows: Any, token: int, trial: bool) -> None:
        w = self.worker
        flow = self.flow
        tx = BatchTransaction(w, flow, rows) if flow.config.transactional else None
        if tx is not None:
            tx.begin()
        batch = InlineBatch(flow, rows, token, tx, whole=True)
        timeout = flow.config.timeout
        payloads = [r[1] for r in rows]
        done_ids: list[int] = []
        results: list[str | None] = []
        failures: list[Failure] = []
        failed_rows: list[Any] = []
        children = batch.children
        flow_next = flow.config.next
        started = time.monotonic()
        w.inline = batch
        outcomes: Any = None
        error: BaseException | None = None
        try:
            try:
                if timeout is not None:
                    self._arm(batch, timeout)
                try:
                    if flow.with_context:
                        ctx = make_context(w, flow, rows[0], tx.provider if tx else self.pg.provider, token=token)
                        ctx.job_id = None  # type: ignore[assignment]  # the batch's call: no single job
                        _batch_control(ctx, w.control, rows)
                        if tx is not None:
                            ctx._enqueue = tx.enqueue(ctx)
                        batch.ctx = ctx
                        try:
                            outcomes = flow.handler(payloads, ctx)
                        except BaseException:
                            if ctx._pg is not None:
                                (tx.end if tx else self.pg.end)(ctx._pg, False)
                            raise
                        if ctx._pg is not None:
                            (tx.end if tx else self.pg.end)(ctx._pg, not batch.timed_out)
                    else:
                        outcomes = flow.handler(payloads)
                finally:
                    if timeout is not None:
                        self._disarm(batch)
                if CHILD[0]:
                    w.exit_child()
                if timeout is not None and batch.timed_out:
                    raise timeout_error(timeout)
                if not isinstance(outcomes, (list, tuple)):
                    raise BatchResultError(f"batch handler returned {type(outcomes).__name__}, "
                                           f"not a list of {len(rows)} outcomes")
                if len(outcomes) != len(rows):
                    raise BatchResultError(f"batch handler returned {len(outcomes)} outcomes for {len(rows)} jobs")
            except BaseException as exc:
                if CHILD[0]:
                    w.exit_child()
                error = exc if not (timeout is not None and batch.timed_out) else timeout_error(timeout)
            requests = w.control.requests
            for index, row in enumerate(rows):
                item = error if error is not None else outcomes[index]
                if requests and row[0] in requests:
                    batch.cancelled.append(row[0])
                    continue
                if isinstance(item, Snooze):
                    batch.snoozed.append((row[0], item.delay))
                    continue
                if isinstance(item, BaseException):
                    failures.append(failure(flow, row, item))
                    failed_rows.append(row)
                    continue
                try:
                    if item is not None and (item.__class__ in HANDOFF_TYPES or flow_next is not None):
                        item = split(item, row[0], flow_next, w.known_flow, children)
                    text = encode_result(item) if item is not None else None
                except Exception as exc:
                    failures.append(failure(flow, row, exc))
                    failed_rows.append(row)
                    continue
                done_ids.append(row[0])
                results.append(text)
            w.inline = None
            run_s = time.monotonic() - started
            stored = results if any(r is not None for r in results) else None
            ack = self._ack(token, done_ids, stored, failures, tx, children or None)
        finally:
            w.inline = None
            if tx is not None:
                tx.close()
        end_apart(w, flow, token, batch)
        flow.consecutive_failures = 0 if done_ids else flow.consecutive_failures + len(failures)
        samples = [FailureSample(f.job_id, r[2], r[3], f.error_type, f.message, r[4])
                   for f, r in zip(failures, failed_rows)]
        w.after_ack(flow, ack, len(failures), sum(r[5] for r in rows), run_s * 1000.0, samples,
                    had_success=bool(done_ids), trial=trial)


def on_alarm(worker: Any) -> Any:
    """The SIGALRM handler of the inline executors. Inside a ctx.pg statement the statement is cancelled
    on the server instead of interrupting psycopg mid-protocol: the handler gets QueryCanceled, the
    connection stays usable (the next job of a transactional batch is not poisoned), and the job fails
    with JobTimeout all the same."""
    def handler(signum: int, frame: Any) -> None:
        batch = worker.inline
        if batch is None:
            return
        forced, batch.cancel_forced = batch.cancel_forced, 0
        if forced:  # cancel_grace passed (InlineExecutor.force_cancel), not a timeout
            if batch.whole or batch.rows[batch.index][0] == forced:
                ctx = batch.ctx
                if ctx is not None and _cancel_statement(ctx._pg):
                    return
                raise JobCancelled(forced)
            return  # that job ended meanwhile
        batch.timed_out = True
        ctx = batch.ctx
        if ctx is not None and _cancel_statement(ctx._pg):
            return
        raise timeout_error(batch.flow.config.timeout)
    return handler


def _batch_control(ctx: JobContext, control: Any, rows: Any) -> None:
    """A batch handler's ctx: progress applies to every job of the batch; cancelled once all are."""
    ids = [r[0] for r in rows]
    ctx._cancel_source = lambda _: all(control.is_requested(i) for i in ids)
    ctx._report = lambda _, token, fraction, message: [control.report(i, token, fraction, message) for i in ids]


def end_apart(worker: Any, flow: FlowRuntime, token: int, batch: InlineBatch) -> None:
    """The inline batch's cancelled and snoozed jobs, each kind one fenced statement (rare paths)."""
    if batch.cancelled:
        worker.control.ack_cancelled(flow, token, batch.cancelled)
    if batch.snoozed:
        worker.control.snooze(token, [i for i, _ in batch.snoozed], [d for _, d in batch.snoozed])


def inline_check(worker: Any) -> Any:
    """The monitor's check of the inline batch in hand (see InlineExecutor)."""
    lock = worker.inline_lock

    def check(now: float) -> None:
        batch = worker.inline
        if batch is None:
            return
        if batch.hard_stop and now > batch.hard_stop:
            return _hard_stop(worker, batch)
        if batch.whole or batch.end <= batch.index + 1 or now - batch.started < HOLD_BOUND:
            return
        with lock:
            if worker.inline is not batch:
                return
            cut = batch.index + 1
            if cut >= batch.end:
                return
            ids = [r[0] for r in batch.rows[cut:batch.end]]
            batch.end = cut
        worker.with_db("release", lambda conn: release_batch(conn, worker.id, batch.token, ids))
    return check


def _hard_stop(worker: Any, batch: InlineBatch) -> None:
    """The handler swallowed its timeout and runs past the hard stop: ack what finished, release what
    never started (attempts refunded), fail the stuck job with JobTimeout, all fenced; then exit so the
    supervisor replaces this worker."""
    flow = batch.flow
    with worker.inline_lock:
        index = batch.index
        stuck = list(batch.rows[:batch.end]) if batch.whole else [batch.rows[index]]
        rest = [] if batch.whole else [r[0] for r in batch.rows[index + 1:batch.end]]
        done = list(batch.done_ids)
        results = list(batch.results) if batch.results is not None else None
        failures = list(batch.failures)
        children = batch.children or None
    timeout = timeout_error(flow.config.timeout)
    if batch.tx is not None:  # the finished jobs' writes sit in the batch's open transaction: they run again
        rest += done + [f.job_id for f in failures]
        done, results, failures, children = [], None, [], None
    requests = worker.control.requests
    cancelled = [row[0] for row in stuck if requests and row[0] in requests]  # cancel_grace passed
    failures += [failure(flow, row, timeout) for row in stuck if row[0] not in cancelled]
    worker.log.error("handler ignored its timeout; acking what finished and replacing this worker",
                     extra={"flow": flow.name, "job": stuck[0][0]})
    try:
        ack_id = new_ack_id()
        ack = worker.with_db("ack", lambda conn: ack_batch(conn, worker.id, batch.token, done, results, failures,
                                                           flow.config.max_attempts, ack_id=ack_id,
                                                           children=children), quick=True)
        if rest:
            worker.with_db("release", lambda conn: release_batch(conn, worker.id, batch.token, rest), quick=True)
        if batch.tx is None:
            batch.cancelled += cancelled
        else:  # the batch's earlier endings were rolled back with it: they run again (released above)
            batch.cancelled, batch.snoozed = cancelled, []
        end_apart(worker, flow, batch.token, batch)
        worker.telemetry.record_batch(flow.name, ack.completed, len(failures), ack.dead_ids, 0.0, 0.0, [])
        if worker.metrics is not None:
            worker.metrics.batch(flow.name, ack.completed, len(failures), len(ack.dead_ids), ack.retried, 0.0, 0.0,
                                   observe=False)
            worker.metrics.failures(flow.name, [f.error_type for f in failures])
        worker.failure_log.failed(flow.name, [FailureSample(f.job_id, 0, 0, f.error_type, f.message)
                                              for f in failures], ack.dead_ids)
        worker.telemetry_thread.final_tick()
    except Exception as exc:
        worker.log.warning("could not ack before exiting (the supervisor rescues): %s", exc)
    worker.hard_exit(worker.exit_stuck_handler)


# -- threads -----------------------------------------------------------------------------------------

RUNNING, FINISHING, ABANDONED = 1, 2, 3


class _Slot:
    """One handler thread and the job it runs."""

    __slots__ = ("lock", "state", "row", "token", "trial", "started", "deadline", "ctx", "conn", "thread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = 0
        self.row: Any = None
        self.token = 0
        self.trial = False
        self.started = 0.0
        self.deadline = 0.0
        self.ctx: JobContext | None = None
        self.conn: Any = None
        self.thread: threading.Thread | None = None


class _ConcurrentBase:
    concurrent = True

    def __init__(self, worker: Any, flow: FlowRuntime, producer: Any) -> None:
        self.worker = worker
        self.flow = flow
        self.producer = producer
        self.n = flow.per_worker
        self._lock = threading.Lock()
        self.in_hand = 0  # claimed and not yet completed (running or waiting)
        self.unstarted: list[tuple[tuple[Any, ...], int]] = []  # taken back on stop: released

    def step(self) -> int:
        """Top up: claim if what we hold dropped below the low-water mark. -1: full, nothing claimed."""
        limit = self.claim_limit()
        if limit <= 0:
            return -1
        rows, token, trial = self.producer.claim(limit)
        return self.take(rows, token, trial)

    def claim_limit(self) -> int:
        return self.producer.concurrent_limit(self.in_hand, self.n)

    def take(self, rows: Any, token: int, trial: bool) -> int:
        if not rows:
            return 0
        self.worker.busy()
        with self._lock:
            self.in_hand += len(rows)
        self.submit(rows, token, trial)
        return len(rows)

    def submit(self, rows: Any, token: int, trial: bool) -> None:
        raise NotImplementedError

    def _finished(self, count: int = 1) -> None:
        with self._lock:
            self.in_hand -= count
            # Wake the main loop when crossing the low-water mark (claim more) or when empty (go idle),
            # not on every completion below it: that would be a write per job.
            wake = self.in_hand == self.n - 1 or self.in_hand == 0
        if wake:
            self.worker.wake.set()

    def _give_back(self, row: tuple[Any, ...], token: int) -> None:
        with self._lock:
            self.unstarted.append((row, token))

    def release_unstarted(self) -> None:
        with self._lock:
            items, self.unstarted = self.unstarted, []
            self.in_hand -= len(items)
        by_token: dict[int, list[int]] = {}
        for row, token in items:
            by_token.setdefault(token, []).append(row[0])
        w = self.worker
        for token, ids in by_token.items():
            w.with_db("release", lambda conn: release_batch(conn, w.id, token, ids), quick=True)

    def _complete(self, row: tuple[Any, ...], token: int, trial: bool, result: Any, exc: BaseException | None,
                  run_s: float) -> None:
        """Hand a finished job's outcome to the completer."""
        flow = self.flow
        completer = self.worker.completer
        requests = self.worker.control.requests
        if requests and row[0] in requests:  # whatever the handler did after the request
            completer.cancelled(flow, token, row[0], trial)
            return
        if isinstance(exc, Snooze):
            completer.snoozed(flow, token, row[0], exc.delay, trial)
            return
        if exc is None:
            kids = None
            try:
                if result is not None and (result.__class__ in HANDOFF_TYPES or flow.config.next is not None):
                    kids = Children()
                    result = split(result, row[0], flow.config.next, self.worker.known_flow, kids)
                text = encode_result(result) if result is not None else None
            except Exception as bad:
                exc = bad
            else:
                completer.done(flow, token, row, text, run_s * 1000.0, trial, kids or None)
                return
        completer.failed(flow, token, row, failure(flow, row, exc), run_s * 1000.0, trial)


class ThreadExecutor(_ConcurrentBase):
    def __init__(self, worker: Any, flow: FlowRuntime, producer: Any) -> None:
        super().__init__(worker, flow, producer)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.slots: list[_Slot] = []  # live handler threads; an abandoned one leaves the list
        self.abandoned_alive = 0
        self.max_abandoned = max(2, self.n // 4)
        self.pg = PerJobPg(worker)
        self._spawned = 0

    def start(self) -> None:
        for _ in range(self.n):
            self._spawn()

    def _spawn(self) -> None:
        slot = _Slot()
        self._spawned += 1
        slot.thread = threading.Thread(target=self._work, args=(slot,), name=f"{self.flow.name}-{self._spawned}",
                                       daemon=True)
        with self._lock:
            self.slots.append(slot)
        slot.thread.start()

    def submit(self, rows: Any, token: int, trial: bool) -> None:
        for row in rows:
            self.queue.put((row, token, trial))

    def _work(self, slot: _Slot) -> None:
        w = self.worker
        # pyodbc connections must not be shared by two threads: each handler thread has its own sources.
        registry = SourceRegistry(w.spec.sources)
        sources = registry.for_flow(self.flow.name, self.flow.config.sources)
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                row, token, trial = item
                if w.stopping:
                    self._give_back(row, token)
                    continue
                requests = w.control.requests
                if requests and row[0] in requests:  # cancelled while it waited for a thread
                    w.completer.cancelled(self.flow, token, row[0], trial)
                    self._finished()
                    continue
                self._run(slot, row, token, trial, sources)
                if slot.state == ABANDONED:
                    return  # a new thread took this one's place
        finally:
            registry.close()
            if slot.state == ABANDONED:
                with self._lock:
                    self.abandoned_alive -= 1

    def _claim_slot(self, slot: _Slot) -> bool:
        """The thread's side of the race with the monitor: True if the job is still ours to complete."""
        with slot.lock:
            if slot.state == ABANDONED:
                return False
            slot.state = FINISHING
            return True

    def _run(self, slot: _Slot, row: tuple[Any, ...], token: int, trial: bool, sources: Any) -> None:
        w = self.worker
        flow = self.flow
        timeout = flow.config.timeout
        started = time.monotonic()
        with slot.lock:
            slot.state, slot.row, slot.token, slot.trial = RUNNING, row, token, trial
            slot.started, slot.deadline = started, (started + timeout if timeout else 0.0)
            slot.ctx = slot.conn = None
        if flow.config.transactional:
            return self._run_in_transaction(slot, row, token, trial, sources, started)
        ctx = make_context(w, flow, row, self.pg.provider, sources, token=token) if flow.with_context else None
        slot.ctx = ctx
        result: Any = None
        exc: BaseException | None = None
        try:
            result = flow.handler(row[1], ctx) if ctx is not None else flow.handler(row[1])
        except BaseException as error:
            exc = error
        if CHILD[0]:
            w.exit_child()
        mine = self._claim_slot(slot)
        if mine and exc is None and slot.deadline and time.monotonic() > slot.deadline:
            exc = timeout_error(timeout)
        if ctx is not None and ctx._pg is not None:
            try:
                self.pg.end(ctx._pg, ok=mine and exc is None and not ctx.cancelled)
            except BaseException as error:
                exc = exc or error
        if not mine:
            return
        self._complete(row, token, trial, result, exc, time.monotonic() - started)
        self._finished()

    def _run_in_transaction(self, slot: _Slot, row: tuple[Any, ...], token: int, trial: bool, sources: Any,
                            started: float) -> None:
        """Each job its own transaction on its own connection, its fenced ack the last statement."""
        w = self.worker
        flow = self.flow
        conn = w.pool.getconn()
        slot.conn = conn
        exc: BaseException | None = None
        result: Any = None
        mine = False
        try:
            tx = conn.transaction()
            tx.__enter__()
            try:
                ctx = make_context(w, flow, row, lambda: conn, sources, token=token) if flow.with_context else None
                if ctx is not None:
                    ctx._enqueue = lambda flow_name, payload, **options: w.queue_on(conn).enqueue(
                        flow_name, payload, **options)
                slot.ctx = ctx
                kids = Children()
                try:
                    result = flow.handler(row[1], ctx) if ctx is not None else flow.handler(row[1])
                    if result is not None and (result.__class__ in HANDOFF_TYPES or flow.config.next is not None):
                        result = split(result, row[0], flow.config.next, w.known_flow, kids)
                    text = encode_result(result) if result is not None else None
                except BaseException as error:
                    exc = error
                if CHILD[0]:
                    w.exit_child()
                mine = self._claim_slot(slot)
                if mine and exc is None and slot.deadline and time.monotonic() > slot.deadline:
                    exc = timeout_error(flow.config.timeout)
                if mine and exc is None and conn.info.transaction_status == pq.TransactionStatus.INERROR:
                    exc = swallowed_error()
                if not mine or exc is not None or w.control.is_requested(row[0]):
                    raise psycopg.Rollback()  # failed, abandoned, snoozed or cancelled: no writes land
                ack = ack_batch(conn, w.id, token, [row[0]], [text] if text is not None else None, [],
                                flow.config.max_attempts, children=kids or None)
                if ack.refused:
                    raise psycopg.Rollback()  # rescued from us: its writes must not land
                tx.__exit__(None, None, None)
            except psycopg.Rollback:
                tx.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
                ack = None
            except BaseException as error:
                try:
                    tx.__exit__(type(error), error, None)
                except BaseException:
                    pass
                raise
        except w.transient_errors as error:
            exc = exc or error  # the transaction is lost: the job fails (transiently), acked on a fresh connection
            ack = None
            mine = mine or self._claim_slot(slot)
        finally:
            w.pool.putconn(conn)
        if not mine:
            return
        run_s = time.monotonic() - started
        if ack is not None:
            w.after_ack(flow, ack, 0, row[5], run_s * 1000.0, [], had_success=True, trial=trial)
        elif exc is not None or w.control.is_requested(row[0]):
            self._complete(row, token, trial, None, exc, run_s)  # failed, snoozed or cancelled
        self._finished()

    def check(self, now: float) -> None:
        """The monitor's check: a job past its deadline fails with JobTimeout now; its thread is
        abandoned (its later result ignored) and replaced. Too many abandoned threads: stop the worker."""
        if not self.flow.config.timeout:
            return
        for slot in list(self.slots):
            if not slot.deadline or now <= slot.deadline or slot.state != RUNNING:
                continue
            if self._abandon(slot, now, cancelled=False):
                return

    def cancel(self, job_id: int, token: int) -> bool:
        """Do we run this job? (ctx.cancelled reads the worker's requests: nothing to set here.)"""
        return any(slot.state == RUNNING and slot.row is not None and slot.row[0] == job_id and slot.token == token
                   for slot in list(self.slots))

    def force_cancel(self, job_id: int, token: int) -> None:
        """cancel_grace passed: abandon the job's thread as a timeout does; the job ends cancelled."""
        for slot in list(self.slots):
            if slot.state == RUNNING and slot.row is not None and slot.row[0] == job_id and slot.token == token:
                self._abandon(slot, time.monotonic(), cancelled=True)
                return

    def _abandon(self, slot: _Slot, now: float, cancelled: bool) -> bool:
        """Stop waiting for the slot's job (failed with JobTimeout, or cancelled) and replace its thread.
        True when too many threads are stuck and the worker is stopping."""
        with slot.lock:
            if slot.state != RUNNING:
                return False
            slot.state = ABANDONED
        # Inside a ctx.pg statement: cancel it on the server, so the thread comes back soon.
        _cancel_statement(slot.conn if slot.conn is not None else (slot.ctx._pg if slot.ctx else None))
        row = slot.row
        if cancelled:
            self.worker.completer.cancelled(self.flow, slot.token, row[0], slot.trial)
        else:
            self.worker.completer.failed(self.flow, slot.token, row,
                                         failure(self.flow, row, timeout_error(self.flow.config.timeout)),
                                         (now - slot.started) * 1000.0, slot.trial)
        with self._lock:
            self.slots.remove(slot)
            self.abandoned_alive += 1
            too_many = self.abandoned_alive > self.max_abandoned
        self._finished()
        if too_many:
            self.worker.log.error("too many handler threads stuck past their timeout; replacing this worker",
                                  extra={"flow": self.flow.name, "stuck": self.abandoned_alive})
            self.worker.request_stop(self.worker.exit_stuck_handler)
            return True
        if not self.worker.stopping:
            self._spawn()
        return False

    def stop(self, deadline: float) -> None:
        """Stop: take back what never started, let running jobs finish until `deadline`."""
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._give_back(item[0], item[1])
        with self._lock:
            live = [slot.thread for slot in self.slots if slot.thread is not None]
        for _ in live:
            self.queue.put(None)
        self.release_unstarted()
        for thread in live:  # abandoned threads are not waited for
            thread.join(max(0.0, deadline - time.monotonic()))
        self.release_unstarted()  # taken by a thread while we were stopping


# -- asyncio -----------------------------------------------------------------------------------------


class AsyncExecutor(_ConcurrentBase):
    def __init__(self, worker: Any, flow: FlowRuntime, producer: Any) -> None:
        super().__init__(worker, flow, producer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name=f"{flow.name}-loop", daemon=True)
        self.running = 0
        self._sem: asyncio.Semaphore | None = None
        self._tasks: dict[int, asyncio.Task[Any]] = {}  # by job id: a cancel request finds its task
        self._abandoned: set[int] = set()  # cancelled jobs no longer waited for (loop thread only)
        self._apool: Any = None
        self._apool_lock: asyncio.Lock | None = None
        # The loop's own sources: pyodbc connections must not be shared with the main thread's
        # inline flows or another flow's loop (tasks of this loop take turns in its one thread).
        self.registry = SourceRegistry(worker.spec.sources)
        self.sources = self.registry.for_flow(flow.name, flow.config.sources)

    def start(self) -> None:
        self.thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._sem = asyncio.Semaphore(self.n)
        self._apool_lock = asyncio.Lock()
        self.loop.run_forever()

    def submit(self, rows: Any, token: int, trial: bool) -> None:
        self.loop.call_soon_threadsafe(self._start, rows, token, trial)

    def _start(self, rows: Any, token: int, trial: bool) -> None:
        tasks = self._tasks
        for row in rows:
            tasks[row[0]] = self.loop.create_task(self._job(row, token, trial))

    async def _pool(self) -> Any:
        if self._apool is None:
            assert self._apool_lock is not None
            async with self._apool_lock:
                if self._apool is None:
                    from psycopg_pool import AsyncConnectionPool

                    w = self.worker
                    pool = AsyncConnectionPool(
                        w.spec.dsn, min_size=1, max_size=max(w.spec.engine.pool_max, 4),
                        kwargs={"autocommit": True, "application_name": w.spec.application_name,
                                # the worker's own pool found out whether dsn goes through PgBouncer
                                **({"prepare_threshold": None} if db.known_pooled(w.spec.dsn) else {})},
                        open=False)
                    await pool.open(wait=True, timeout=30)
                    self._apool = pool
        return self._apool

    async def _job(self, row: tuple[Any, ...], token: int, trial: bool) -> None:
        assert self._sem is not None
        w = self.worker
        flow = self.flow
        try:
            await self._sem.acquire()
        except asyncio.CancelledError:
            self._tasks.pop(row[0], None)
            if not w.control.is_requested(row[0]):
                raise
            w.completer.cancelled(flow, token, row[0], trial)  # cancelled while it waited: it never runs
            self._finished()
            return
        try:
            if w.stopping:
                self._tasks.pop(row[0], None)
                self._give_back(row, token)
                return
            timeout = flow.config.timeout
            started = time.monotonic()
            ctx = (make_context(w, flow, row, lambda: AsyncPg(self._pool), self.sources, token=token)
                   if flow.with_context else None)
            result: Any = None
            exc: BaseException | None = None
            try:
                call = flow.handler(row[1], ctx) if ctx is not None else flow.handler(row[1])
                # asyncio.timeout, not wait_for: the handler stays in this task, so a SystemExit or
                # KeyboardInterrupt it raises is caught here instead of escaping the event loop.
                async with asyncio.timeout(timeout or None):
                    result = await call
            except BaseException as error:
                if CHILD[0]:
                    w.exit_child()
                if isinstance(error, asyncio.CancelledError):  # our cancel (control): the task goes on
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
                timed_out = timeout and isinstance(error, TimeoutError) and time.monotonic() - started >= timeout
                exc = timeout_error(timeout) if timed_out else error
            if CHILD[0]:
                w.exit_child()
            self._tasks.pop(row[0], None)
            if ctx is not None and ctx._pg is not None:
                try:
                    await ctx._pg.end(ok=exc is None and not ctx.cancelled)
                except BaseException as error:
                    exc = exc or error
            if self._abandoned and row[0] in self._abandoned:
                self._abandoned.discard(row[0])  # ended cancelled at its cancel_grace already
                return
            self._complete(row, token, trial, result, exc, time.monotonic() - started)
            self._finished()
        finally:
            self._sem.release()

    # job control (engine/worker/control.py); called from the control thread

    def cancel(self, job_id: int, token: int) -> bool:
        """Cancel the job's task (CancelledError where it awaits). A job still waiting for a slot ends
        cancelled without running; one that swallows the cancel is given cancel_grace."""
        if job_id not in self._tasks:
            return False
        self.loop.call_soon_threadsafe(self._cancel_task, job_id)
        return True

    def _cancel_task(self, job_id: int) -> None:
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()

    def force_cancel(self, job_id: int, token: int) -> None:
        self.loop.call_soon_threadsafe(self._abandon, job_id, token)

    def _abandon(self, job_id: int, token: int) -> None:
        """cancel_grace passed and the task still runs: end the job cancelled now and ignore the task's
        end (its slot stays taken until it returns, as an abandoned thread's)."""
        if self._tasks.pop(job_id, None) is None:
            return  # it ended meanwhile
        self._abandoned.add(job_id)
        self.worker.completer.cancelled(self.flow, token, job_id, False)
        self._finished()

    def stop(self, deadline: float) -> None:
        """Stop: jobs waiting for a slot are given back (released); running ones finish until deadline."""
        while time.monotonic() < deadline:
            with self._lock:
                left = self.in_hand - len(self.unstarted)
            if left <= 0:
                break
            time.sleep(0.01)
        self.release_unstarted()

        async def close() -> None:
            self.registry.close()  # in the loop's thread, the only one that used these connections
            if self._apool is not None:
                await self._apool.close(timeout=2)

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(3)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)


def make_executor(worker: Any, flow: FlowRuntime, producer: Any) -> Any:
    return {"inline": InlineExecutor, "batch": BatchExecutor, "threads": ThreadExecutor,
            "asyncio": AsyncExecutor}[flow.mode](worker, flow, producer)

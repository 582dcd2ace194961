"""One worker process: claim a batch, run the handlers, acknowledge the batch in one round trip.

Everything database-related is opened here, after the fork: a psycopg_pool for claims, acks and
heartbeats, and one dedicated autocommit connection outside the pool that LISTENs for enqueues.
A telemetry thread sends ticks and reports state; liveness is the supervisor's (engine/liveness.py):
it heartbeats for us, and a lease guard thread plus a kernel timer stop this process once nobody can
prove it alive.

The hot path avoids per-job objects, log lines, NOTIFYs and round trips: rows stay tuples, stats are
added once per batch.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import psycopg
from psycopg_pool import ConnectionPool
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from engine import db
from engine.config import EngineConfig, FlowConfig
from engine.handlers import FlowRuntime, JobContext, JobTimeout, format_traceback, load_flow
from engine.liveness import GUARD_INTERVAL_CAP, Lease, WorkerGuard, lease_span
from engine.queue import AckResult, Failure, Queue, ack_batch, claim_batch, new_claim_token, release_batch
from engine.sources import SourceRegistry
from engine.logs import ContextLogger
from engine.sql import Q
from engine.telemetry import ENQUEUED_CHANNEL, FailureSample, Telemetry, encode_event, tick_events

log = logging.getLogger("skiplock.worker")

TRANSIENT_DB_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError)
DB_RETRY_SECONDS: Final = 60.0
IDLE_WAIT_CAP: Final = 1.0  # an idle worker re-checks its stop flag at least this often
EMPTY_FLOW_RECHECK: Final = 0.1  # seconds an empty flow is skipped while the worker is busy with others

EXIT_OK: Final = 0
EXIT_DB_LOST: Final = 3
EXIT_STUCK_HANDLER: Final = 5
EXIT_LOST: Final = 6  # marked lost (heartbeat went stale): the supervisor replaces us under a new id


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    worker_id: str
    engine_id: str
    dsn: str
    application_name: str
    flows: tuple[FlowConfig, ...]
    engine: EngineConfig
    sources: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # Settings.sources
    lease: Lease | None = None  # published by the supervisor (engine/liveness.py)


def _db_retry(what: str) -> Retrying:
    """Bounded retries of the engine's own statements on transient errors (restart, network)."""
    def before_sleep(state: Any) -> None:
        log.warning("database call %s failed, retrying: %s", what, state.outcome.exception())
    return Retrying(
        retry=retry_if_exception_type(TRANSIENT_DB_ERRORS),
        wait=wait_exponential(multiplier=0.05, max=0.5),  # back within 0.5 s of the database's return
        stop=stop_after_delay(DB_RETRY_SECONDS),
        before_sleep=before_sleep,
        reraise=True,
    )


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.id = spec.worker_id
        self.flows: list[FlowRuntime] = [load_flow(f) for f in spec.flows]
        self.flow_names = [f.name for f in self.flows]
        self.stopping = False
        self._closing = False
        self.state = "starting"
        self.telemetry = Telemetry()
        self.pool: ConnectionPool | None = None
        self.listen_conn: psycopg.Connection[Any] | None = None
        self._queue: Queue | None = None
        self._tick_thread: threading.Thread | None = None
        self._current_deadline = 0.0
        self._hard_stop_at = 0.0
        self.jobs_done = 0
        self.lost = False
        self.log = ContextLogger(log, {"engine": spec.engine_id, "worker": self.id})
        # Source databases: opened by the first handler that uses one, then kept for this process.
        self.sources = SourceRegistry(spec.sources)
        self._flow_sources = {f.name: self.sources.for_flow(f.name, f.config.sources) for f in self.flows}
        self._batch_conn: psycopg.Connection[Any] | None = None  # transactional flows: the batch's
        self._batch: tuple[FlowRuntime, Sequence[tuple[Any, ...]]] | None = None
        self._batch_tx: Any = None  # transactional flows: conn.transaction() of the batch, entered
        self._job_tx: Any = None  # transactional flows: the job's savepoint (conn.transaction(), entered)

    # -- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; a terminal ^C reaches it
        engine = self.spec.engine
        if self.spec.lease is not None:
            WorkerGuard(self.spec.lease, lease_span(engine.stale_after, engine.heartbeat_interval),
                        min(engine.heartbeat_interval / 2, GUARD_INTERVAL_CAP), self.id).start()
        self.pool = db.open_pool(self.spec.dsn, application_name=self.spec.application_name,
                                 min_size=1, max_size=max(self.spec.engine.pool_max, 2), name=self.id)
        self._queue = Queue(pool=self.pool, check_schema=False)
        self._with_db("register", lambda conn: conn.execute(Q.worker_register, {
            "id": self.id, "engine_id": self.spec.engine_id, "host": socket.gethostname(),
            "pid": os.getpid(), "flows": self.flow_names}))
        self._notify([encode_event("worker_started", engine=self.spec.engine_id, worker=self.id,
                                   host=socket.gethostname(), pid=os.getpid(), flows=self.flow_names)])
        self._connect_listener()
        self._tick_thread = threading.Thread(target=self._tick_loop, name="telemetry", daemon=True)
        self._tick_thread.start()
        self.log.info("worker started", extra={"flows": self.flow_names, "pid": os.getpid()})
        code = EXIT_OK
        try:
            self._loop()
            if self.lost:
                code = EXIT_LOST
        except TRANSIENT_DB_ERRORS as exc:
            self.log.error("database unreachable for %.0fs, worker exits: %s", DB_RETRY_SECONDS, exc)
            code = EXIT_DB_LOST
        finally:
            self._shutdown(code)
        return code

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _shutdown(self, code: int) -> None:
        self.stopping = True
        self._closing = True  # the telemetry thread stops before the pool closes
        reason = "signal" if code == EXIT_OK else f"exit code {code}"
        try:
            try:
                self._send_tick()
            except psycopg.Error as exc:  # the last counters are lost; stopping cleanly matters more
                if isinstance(exc, TRANSIENT_DB_ERRORS):
                    raise
                self.log.warning("last telemetry tick failed: %s", exc)
            self._with_db("stopped", lambda conn: conn.execute(Q.worker_stopped, {"id": self.id}), quick=True)
            self._notify([encode_event("worker_stopped", engine=self.spec.engine_id, worker=self.id,
                                       reason=reason)], quick=True)
        except TRANSIENT_DB_ERRORS:
            pass  # the supervisor marks us lost and rescues
        self.log.info("worker stopped", extra={"jobs_done": self.jobs_done, "reason": reason})
        self.sources.close()
        if self.listen_conn is not None:
            self.listen_conn.close()
        if self.pool is not None:
            self.pool.close(timeout=2)

    # -- database helpers ----------------------------------------------------------------------------

    def _with_db(self, what: str, action: Any, quick: bool = False) -> Any:
        assert self.pool is not None
        if quick:
            with self.pool.connection(timeout=5) as conn:
                return action(conn)
        for attempt in _db_retry(what):
            with attempt:
                with self.pool.connection() as conn:
                    return action(conn)
        return None  # pragma: no cover - Retrying re-raises

    def _notify(self, events: list[str], quick: bool = False) -> None:
        if events:
            self._with_db("notify", lambda conn: conn.execute(Q.events_notify, {"events": events}), quick=quick)

    def _connect_listener(self) -> None:
        for attempt in _db_retry("listen"):
            with attempt:
                if self.listen_conn is not None:
                    self.listen_conn.close()
                self.listen_conn = db.connect(self.spec.dsn, application_name=self.spec.application_name)
                self.listen_conn.execute(f"LISTEN {ENQUEUED_CHANNEL}")

    # -- the loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        """One batch per flow per round, so a deep backlog of one flow cannot starve the others. A flow
        that had nothing is skipped for EMPTY_FLOW_RECHECK while others keep the worker busy."""
        self.state = "idle"
        recheck_at = {flow.name: 0.0 for flow in self.flows}
        while not self.stopping:
            worked = False
            now = time.monotonic()
            for flow in self.flows:
                if self.stopping:
                    break
                if recheck_at[flow.name] > now:
                    continue
                if self._claim_and_run(flow) > 0:
                    worked = True
                else:
                    recheck_at[flow.name] = now + EMPTY_FLOW_RECHECK
            if not worked and not self.stopping:
                self.state = "idle"
                self._wait_for_work()
                recheck_at = dict.fromkeys(recheck_at, 0.0)

    def _claim_and_run(self, flow: FlowRuntime) -> int:
        assert self.pool is not None
        trial = flow.half_open  # the circuit is open: once its cool-down is over, one trial job at a time
        limit = 1 if trial else flow.config.batch_size
        token = new_claim_token()
        try:
            rows = self._claim(flow, limit, token)
        except TRANSIENT_DB_ERRORS:
            # The claim may have committed before the connection broke: give back what it took.
            self._with_db("release claim", lambda conn: conn.execute(
                Q.claim_release_token, {"worker": self.id, "token": token}))
            return 0
        if not rows:
            return 0
        self.state = "busy"
        self._run_batch(flow, rows, token, trial)
        return len(rows)

    def _claim(self, flow: FlowRuntime, limit: int, token: int) -> list[tuple[Any, ...]]:
        assert self.pool is not None
        concurrency = flow.config.concurrency
        with self.pool.connection() as conn:
            if concurrency is None:
                return claim_batch(conn, flow.name, self.id, limit, token, flow.config.max_attempts)
            with conn.transaction():
                conn.execute(Q.claim_flow_lock, {"flow": flow.name})
                row = conn.execute(Q.claim_running_count, {"flow": flow.name}).fetchone()
                room = concurrency - int(row[0]) if row else 0
                if room <= 0:
                    return []
                return claim_batch(conn, flow.name, self.id, min(limit, room), token, flow.config.max_attempts)

    def _run_batch(self, flow: FlowRuntime, rows: Sequence[tuple[Any, ...]], token: int,
                   trial: bool = False) -> None:
        if flow.config.transactional and self._batch_conn is None:
            return self._run_batch_in_transaction(flow, rows, token, trial)
        handler = flow.handler
        with_context = flow.with_context
        timeout = flow.config.timeout
        done_ids: list[int] = []
        results: list[str | None] | None = None
        failures: list[Failure] = []
        samples: list[FailureSample] = []
        unstarted: list[int] = []
        perf = time.perf_counter
        started = perf()
        for index, row in enumerate(rows):
            if self.stopping:
                unstarted = [r[0] for r in rows[index:]]
                break
            job_id = row[0]
            try:
                try:
                    if timeout is not None:
                        self._arm_timeout(timeout)
                    if with_context:
                        result = self._call_with_context(handler, flow, row)
                    else:
                        result = handler(row[1])
                finally:
                    if timeout is not None:
                        self._disarm_timeout()
                if result is not None:
                    if results is None:
                        results = [None] * len(done_ids)
                    results.append(orjson.dumps(result, default=str).decode())
                elif results is not None:
                    results.append(None)
                done_ids.append(job_id)
                if flow.consecutive_failures:
                    flow.consecutive_failures = 0
            except Exception as exc:
                failures.append(self._failure(flow, row, exc))
                samples.append(FailureSample(job_id, row[2], row[3], failures[-1].error_type, failures[-1].message))
                flow.consecutive_failures += 1
        run_ms = (perf() - started) * 1000.0
        ack = self._ack(token, done_ids, results, failures, flow.config.max_attempts)
        if unstarted:
            self._with_db("release", lambda conn: release_batch(conn, self.id, token, unstarted))
        self.jobs_done += ack.completed
        self.telemetry.record_batch(flow.name, ack.completed, len(failures), ack.dead_ids,
                                    sum(r[5] for r in rows), run_ms, samples)
        if ack.refused:
            self.log.warning("acks refused: jobs were rescued from this worker", extra={
                "flow": flow.name, "refused": ack.refused})
        if ack.finished_runs:
            self._fire_run_hooks(ack.finished_runs)
        self._update_circuit(flow, had_failures=bool(failures), had_success=bool(done_ids), trial=trial)

    def _ack(self, token: int, done_ids: list[int], results: list[str | None] | None,
             failures: list[Failure], max_attempts: int) -> Any:
        if self._batch_conn is not None:
            return self._ack_in_transaction(self._batch_conn, token, done_ids, results, failures, max_attempts)
        return self._with_db("ack", lambda conn: ack_batch(conn, self.id, token, done_ids, results, failures,
                                                           max_attempts))

    def _failure(self, flow: FlowRuntime, row: tuple[Any, ...], exc: BaseException) -> Failure:
        permanent = flow.is_permanent(exc)
        delay = 0.0 if permanent else flow.config.backoff.delay(row[2], random.random())
        message = str(exc) or type(exc).__name__
        return Failure(row[0], type(exc).__name__, message[:2000], format_traceback(exc), permanent, delay)

    def _context(self, flow: FlowRuntime, row: tuple[Any, ...]) -> JobContext:
        adapter = ContextLogger(log, {"engine": self.spec.engine_id, "worker": self.id,
                                              "flow": flow.name, "job": row[0], "run": row[4]})
        assert self._queue is not None
        if self._batch_conn is None:
            return JobContext(row[0], flow.name, row[2], row[3], row[4], self.id, adapter, self._queue.enqueue,
                              self._flow_sources[flow.name], self._borrow_pg)
        # Transactional flow: ctx.pg is the batch's connection (a savepoint taken on first use), and
        # follow-up jobs are enqueued through it, so they commit with the ack too.
        ctx = JobContext(row[0], flow.name, row[2], row[3], row[4], self.id, adapter, self._queue.enqueue,
                         self._flow_sources[flow.name], self._job_savepoint)
        ctx._enqueue = lambda flow_name, payload, **options: Queue(conn=ctx.pg, check_schema=False).enqueue(
            flow_name, payload, **options)
        return ctx

    # -- ctx.pg and transactional flows --------------------------------------------------------------

    def _call_with_context(self, handler: Any, flow: FlowRuntime, row: tuple[Any, ...]) -> Any:
        """A (payload, ctx) handler. If it used ctx.pg, the job's writes commit when it returns and roll
        back when it raises (in a transactional flow: its savepoint is released or rolled back)."""
        ctx = self._context(flow, row)
        try:
            result = handler(row[1], ctx)
        except BaseException:
            if ctx._pg is not None:
                self._end_pg(ctx._pg, ok=False)
            raise
        if ctx._pg is not None:
            self._end_pg(ctx._pg, ok=True)
        return result

    def _borrow_pg(self) -> psycopg.Connection[Any]:
        assert self.pool is not None
        conn = self.pool.getconn()
        try:
            conn.autocommit = False
        except BaseException:
            self.pool.putconn(conn)
            raise
        return conn

    def _job_savepoint(self) -> psycopg.Connection[Any]:
        conn = self._batch_conn
        assert conn is not None
        tx = conn.transaction()  # inside the batch's BEGIN, so a savepoint; explicit commit() is refused
        tx.__enter__()
        self._job_tx = tx
        return conn

    def _end_pg(self, conn: psycopg.Connection[Any], ok: bool) -> None:
        if self._batch_conn is not None:
            self._end_savepoint(conn, ok)
            return
        assert self.pool is not None
        try:
            # COMMIT of an aborted transaction is a silent ROLLBACK: such a job fails instead.
            swallowed = ok and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            if ok and not swallowed:
                conn.commit()
            else:
                try:
                    conn.rollback()
                except Exception:
                    pass  # the handler's own error is the one to report; the pool drops a broken connection
            if swallowed:
                raise _swallowed_error()
        finally:
            try:
                conn.autocommit = True
            except Exception:
                conn.close()  # never return a connection that is not in autocommit to the pool
            self.pool.putconn(conn)

    def _end_savepoint(self, conn: psycopg.Connection[Any], ok: bool) -> None:
        tx, self._job_tx = self._job_tx, None
        if tx is None:
            return
        if ok and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            error = _swallowed_error()
            tx.__exit__(RuntimeError, error, None)
            raise error
        if ok:
            tx.__exit__(None, None, None)
        else:
            tx.__exit__(Exception, Exception("handler failed"), None)  # rollback errors surface at the ack

    def _run_batch_in_transaction(self, flow: FlowRuntime, rows: Sequence[tuple[Any, ...]], token: int,
                                  trial: bool) -> None:
        """`transactional = true`: the batch runs in one transaction on one pooled connection. Handlers
        write through ctx.pg (each job in a savepoint, so a failed job's writes roll back alone), and the
        ack is the last statement before COMMIT: results and acks commit together or not at all."""
        pool = self.pool
        assert pool is not None
        conn = None
        for attempt in _db_retry("begin"):
            with attempt:
                conn = pool.getconn()
                batch_tx = conn.transaction()  # psycopg's: a handler's explicit commit() is refused
                try:
                    batch_tx.__enter__()
                except BaseException:
                    pool.putconn(conn)
                    raise
        assert conn is not None
        self._batch_conn = conn
        self._batch_tx = batch_tx
        self._batch = (flow, rows)
        try:
            self._run_batch(flow, rows, token, trial)  # its _ack ends the transaction
        finally:
            if self._job_tx is not None:  # only after an unexpected error
                self._end_savepoint(conn, ok=False)
            self._end_batch_tx(commit=False)
            self._batch_conn = None
            self._batch = None
            pool.putconn(conn)

    def _end_batch_tx(self, commit: bool) -> None:
        tx, self._batch_tx = self._batch_tx, None
        if tx is None:
            return
        if commit:
            tx.__exit__(None, None, None)
            return
        try:
            tx.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
        except Exception:
            pass  # a broken connection: the pool discards it

    def _ack_in_transaction(self, conn: psycopg.Connection[Any], token: int, done_ids: list[int],
                            results: list[str | None] | None, failures: list[Failure],
                            max_attempts: int) -> AckResult:
        ids = done_ids + [f.job_id for f in failures]
        try:
            ack = ack_batch(conn, self.id, token, done_ids, results, failures, max_attempts)
            if ack.refused:
                # Some of the batch was rescued from us: its writes must not land. Roll everything
                # back and give back what we still hold; it runs again (the attempt is not counted).
                self._end_batch_tx(commit=False)
                self._with_db("release", lambda c: release_batch(c, self.id, token, ids))
                return AckResult(0, 0, [], [], ack.refused)
            self._end_batch_tx(commit=True)
            return ack
        except TRANSIENT_DB_ERRORS as exc:
            self._end_batch_tx(commit=False)
            # The transaction is lost (or its COMMIT's outcome is unknown): every job of the batch fails
            # as a transient error, on a fresh connection. Acks are fenced, so if the COMMIT did land,
            # this changes nothing.
            assert self._batch is not None
            flow, rows = self._batch
            by_id = {r[0]: r for r in rows}
            text = str(exc).strip().splitlines()
            message = f"batch transaction lost before commit: {text[0] if text else type(exc).__name__}"
            lost = [Failure(job_id, type(exc).__name__, message[:2000], format_traceback(exc), False,
                            flow.config.backoff.delay(by_id[job_id][2], random.random())) for job_id in ids]
            self.log.warning(message, extra={"flow": flow.name, "jobs": len(ids)})
            return self._with_db("ack", lambda c: ack_batch(c, self.id, token, [], None, lost, max_attempts))

    # -- timeouts ------------------------------------------------------------------------------------

    def _arm_timeout(self, seconds: float) -> None:
        self._current_deadline = time.monotonic() + seconds
        # A handler stuck where SIGALRM cannot interrupt it is stopped by the telemetry thread.
        self._hard_stop_at = self._current_deadline + max(1.0, seconds * 0.5)
        signal.signal(signal.SIGALRM, self._on_timeout)
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def _disarm_timeout(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._current_deadline = 0.0
        self._hard_stop_at = 0.0

    def _on_timeout(self, signum: int, frame: Any) -> None:
        raise JobTimeout("handler ran past its timeout")

    # -- idle ----------------------------------------------------------------------------------------

    def _wait_for_work(self) -> None:
        assert self.listen_conn is not None
        wait = self.spec.engine.poll_interval
        try:
            with self.pool.connection() as conn:  # type: ignore[union-attr]
                row = conn.execute(Q.next_run_at, {"flows": self.flow_names}).fetchone()
            if row is not None and row[0] is not None:
                wait = min(wait, max(float(row[0]), 0.0))
            if wait <= 0:
                return
            for _ in self.listen_conn.notifies(timeout=min(wait, IDLE_WAIT_CAP), stop_after=1):
                pass
        except TRANSIENT_DB_ERRORS as exc:
            self.log.warning("listen connection lost, reconnecting: %s", exc)
            time.sleep(0.1)
            self._connect_listener()

    # -- runs and circuit breakers -------------------------------------------------------------------

    def _fire_run_hooks(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            row = self._with_db("run hook", lambda conn: conn.execute(Q.run_claim_hook, {"run_id": run_id}).fetchone())
            if row is None:
                continue
            _, flow_name, total, completed, dead = row
            summary = {"run": run_id, "flow": flow_name, "total": total, "completed": completed, "dead": dead}
            self._notify([encode_event("run_finished", engine=self.spec.engine_id, worker=self.id, **summary)])
            runtime = next((f for f in self.flows if f.name == flow_name), None)
            hook = runtime.on_complete if runtime is not None else None
            self.log.info("run finished", extra={"run": run_id, "flow": flow_name, "total": total,
                                                 "completed": completed, "dead": dead})
            if hook is None:
                continue
            try:
                hook(run_id, summary)
            except Exception:
                self.log.exception("on_complete hook of run %s failed", run_id, extra={"run": run_id})

    def _update_circuit(self, flow: FlowRuntime, had_failures: bool, had_success: bool,
                        trial: bool = False) -> None:
        policy = flow.config.circuit
        if policy is None:
            return
        # Only a trial (a job claimed while the circuit was open) closes or re-opens it: a batch that
        # was already running when another worker opened the circuit proves nothing.
        if trial and had_success and not had_failures:
            flow.half_open = False
            closed = self._with_db("circuit", lambda conn: conn.execute(Q.circuit_close, {"flow": flow.name}).fetchone())
            if closed:
                self.log.info("circuit closed", extra={"flow": flow.name})
                self._notify([encode_event("circuit_closed", engine=self.spec.engine_id, worker=self.id,
                                           flow=flow.name)])
            return
        if flow.consecutive_failures >= policy.failures or (trial and had_failures):
            failures = flow.consecutive_failures
            flow.consecutive_failures = 0
            flow.half_open = True  # open now (by us or by another worker): claims are trials until it closes

            def open_circuit(conn: psycopg.Connection[Any]) -> Any:
                conn.execute(Q.circuit_ensure_flow, {"flow": flow.name})
                return conn.execute(Q.circuit_open, {"flow": flow.name, "cooldown": policy.cooldown}).fetchone()

            opened = self._with_db("circuit", open_circuit)
            if opened:
                self.log.warning("circuit opened", extra={"flow": flow.name, "failures": failures})
                self._notify([encode_event("circuit_opened", engine=self.spec.engine_id, worker=self.id,
                                           flow=flow.name, failures=failures, until=opened[0])])

    def _refresh_flow_states(self, conn: psycopg.Connection[Any]) -> None:
        """While a flow's circuit is open, claims are trials of one job: none succeeds during the
        cool-down (the claim SQL holds the flow), the first one after it is the half-open trial. Set as
        soon as the circuit is seen open, so a worker waking just after the cool-down cannot claim a
        full batch before the next tick."""
        for name, _paused, circuit_state, _open_for in conn.execute(Q.flows_state, {"flows": self.flow_names}):
            runtime = next(f for f in self.flows if f.name == name)
            runtime.half_open = circuit_state == "open"

    # -- telemetry thread ----------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        engine = self.spec.engine
        next_heartbeat = 0.0
        while not self._closing:
            time.sleep(engine.tick_interval)
            if self._closing:
                return
            now = time.monotonic()
            if self._hard_stop_at and now > self._hard_stop_at:
                self.log.error("handler ignored its timeout; replacing this worker")
                os._exit(EXIT_STUCK_HANDLER)  # the supervisor rescues our jobs (timeout counts an attempt)
            try:
                self._send_tick()
            except Exception as exc:  # keep ticking through outages and failing writes
                self.log.warning("telemetry tick failed: %s", exc)
            if now >= next_heartbeat:
                next_heartbeat = now + engine.heartbeat_interval
                try:
                    self._heartbeat()
                except Exception as exc:
                    self.log.warning("worker report failed: %s", exc)

    def _send_tick(self) -> None:
        buffer = self.telemetry.take()
        events = tick_events(buffer, self.spec.engine_id, self.id)
        flows = list(buffer.flows)
        assert self.pool is not None
        with self.pool.connection(timeout=5) as conn:
            with conn.transaction():
                conn.execute(Q.events_notify, {"events": events})
                if flows:
                    counts = [buffer.flows[f] for f in flows]
                    conn.execute(Q.stats_upsert, {
                        "flows": flows, "completed": [c.completed for c in counts],
                        "failed": [c.failed for c in counts], "dead": [c.dead for c in counts],
                        "rescued": [c.rescued for c in counts], "wait_ms": [c.wait_ms_sum for c in counts],
                        "run_ms": [c.run_ms_sum for c in counts]})
            self._refresh_flow_states(conn)

    def _heartbeat(self) -> None:
        assert self.pool is not None
        stats = self.pool.get_stats()
        pool = {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
                "max": self.pool.max_size, "waiting": stats.get("requests_waiting", 0)}
        totals = self.telemetry.totals
        counters = {"completed": totals.completed, "failed": totals.failed, "dead": totals.dead}
        with self.pool.connection(timeout=5) as conn:
            row = conn.execute(Q.worker_report, {
                "id": self.id, "state": "draining" if self.stopping else self.state,
                "counters": orjson.dumps(counters).decode(), "pool": orjson.dumps(pool).decode()}).fetchone()
        if row is None and not self.stopping:
            # Our claims were rescued and our acks are refused; claims under this id are refused too.
            # Stop before the next job and exit, so the supervisor starts a replacement.
            self.log.warning("this worker was marked lost; its claims were rescued and its acks will be "
                             "refused; exiting so that a new worker replaces it")
            self.lost = True
            self.stopping = True


def _swallowed_error() -> RuntimeError:
    return RuntimeError("a statement on ctx.pg failed and the handler went on; the job's writes were rolled back")


def worker_main(spec: WorkerSpec, log_format: str) -> None:
    """Entry point of a forked worker process."""
    from engine.logs import setup_logging

    setup_logging(log_format)
    _die_with_parent()
    try:
        code = Worker(spec).run()
    except Exception:
        log.exception("worker crashed", extra={"worker": spec.worker_id})
        code = 1
    logging.shutdown()
    os._exit(code)


def _die_with_parent() -> None:
    """If the supervisor is killed outright, workers get SIGTERM and drain instead of running on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)

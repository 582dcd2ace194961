"""The handler's context and its `ctx.pg`, as strategies chosen once per batch (or per job):

- PerJobPg: ctx.pg is a pooled connection taken on first use, committed when the handler returns,
  rolled back when it raises (default flows, inline or threaded).
- BatchTransaction: `transactional = true` inline and batch flows: the batch runs in one transaction;
  each job's writes sit in a savepoint and the ack is the last statement before COMMIT.
- JobTransaction: `transactional = true` threaded flows: each job is its own transaction on its own
  connection, with its fenced ack inside.
- AsyncPg: async handlers: `conn = await ctx.pg` is an AsyncConnection from the worker's
  AsyncConnectionPool, committed or rolled back like PerJobPg.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
from psycopg import pq

from engine.handlers import FlowRuntime, JobContext
from engine.logs import ContextLogger
from engine.queue import Queue
from engine.store import AckResult, Children, Failure, ack_batch, ack_receipt_get, new_ack_id, release_batch
from engine.worker.outcome import MESSAGE_CHARS, describe

INERROR = pq.TransactionStatus.INERROR


def swallowed_error() -> RuntimeError:
    return RuntimeError("a statement on ctx.pg failed and the handler went on; the job's writes were rolled back")


def make_context(worker: Any, flow: FlowRuntime, row: tuple[Any, ...], pg: Any, sources: Any = None,
                 enqueue: Any = None, token: int = 0) -> JobContext:
    adapter = ContextLogger(worker.base_log, {"engine": worker.spec.engine_id, "worker": worker.id,
                                              "flow": flow.name, "job": row[0], "run": row[4]})
    ctx = JobContext(row[0], flow.name, row[2], row[3], row[4], worker.id, adapter,
                     enqueue or worker.queue.enqueue,
                     sources if sources is not None else worker.flow_sources[flow.name], pg)
    control = worker.control  # ctx.cancelled and ctx.progress go to the worker's job control
    ctx._cancel_source = control.is_requested
    ctx._report = control.report
    ctx._token = token
    return ctx


class PerJobPg:
    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def provider(self) -> psycopg.Connection[Any]:
        pool = self.worker.pool
        conn = pool.getconn()
        try:
            conn.autocommit = False
        except BaseException:
            pool.putconn(conn)
            raise
        return conn

    def end(self, conn: psycopg.Connection[Any], ok: bool) -> None:
        pool = self.worker.pool
        try:
            # COMMIT of an aborted transaction is a silent ROLLBACK: such a job fails instead.
            swallowed = ok and conn.info.transaction_status == INERROR
            if ok and not swallowed:
                conn.commit()
            else:
                try:
                    conn.rollback()
                except Exception:
                    pass  # the handler's own error is the one to report; the pool drops a broken connection
            if swallowed:
                raise swallowed_error()
        finally:
            try:
                conn.autocommit = True
            except Exception:
                conn.close()  # never return a connection that is not in autocommit to the pool
            pool.putconn(conn)


class BatchTransaction:
    """One transaction per batch on one pooled connection; a savepoint per job."""

    def __init__(self, worker: Any, flow: FlowRuntime, rows: Any) -> None:
        self.worker = worker
        self.flow = flow
        self.rows = rows
        self.conn: psycopg.Connection[Any] | None = None
        self._tx: Any = None
        self._job_tx: Any = None

    def begin(self) -> None:
        pool = self.worker.pool
        for attempt in self.worker.db_retry("begin"):
            with attempt:
                conn = pool.getconn()
                tx = conn.transaction()  # psycopg's: a handler's explicit commit() is refused
                try:
                    tx.__enter__()
                except BaseException:
                    pool.putconn(conn)
                    raise
        self.conn, self._tx = conn, tx

    def provider(self) -> psycopg.Connection[Any]:
        conn = self.conn
        assert conn is not None
        tx = conn.transaction()  # inside the batch's BEGIN, so a savepoint; explicit commit() is refused
        tx.__enter__()
        self._job_tx = tx
        return conn

    def enqueue(self, ctx: JobContext) -> Any:
        # Follow-up jobs are enqueued through the batch's connection, so they commit with the ack too.
        return lambda flow_name, payload, **options: Queue(conn=ctx.pg, check_schema=False).enqueue(
            flow_name, payload, **options)

    def end(self, conn: psycopg.Connection[Any], ok: bool) -> None:
        tx, self._job_tx = self._job_tx, None
        if tx is None:
            return
        if ok and conn.info.transaction_status == INERROR:
            error = swallowed_error()
            tx.__exit__(RuntimeError, error, None)
            raise error
        if ok:
            tx.__exit__(None, None, None)
        else:
            tx.__exit__(Exception, Exception("handler failed"), None)  # rollback errors surface at the ack

    def _end_batch(self, commit: bool) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        if commit:
            tx.__exit__(None, None, None)
            return
        try:
            tx.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
        except Exception:
            pass  # a broken connection: the pool discards it

    def ack(self, token: int, done_ids: list[int], results: list[str | None] | None,
            failures: list[Failure], children: Children | None = None) -> AckResult:
        w = self.worker
        conn = self.conn
        assert conn is not None
        max_attempts = self.flow.config.max_attempts
        ids = done_ids + [f.job_id for f in failures]
        ack_id = new_ack_id()
        try:
            ack = ack_batch(conn, w.id, token, done_ids, results, failures, max_attempts, ack_id=ack_id,
                            children=children)
            if ack.refused:
                # Some of the batch was rescued from us: its writes must not land. Roll everything
                # back and give back what we still hold; it runs again (the attempt is not counted).
                self._end_batch(commit=False)
                w.with_db("release", lambda c: release_batch(c, w.id, token, ids))
                return AckResult(0, 0, [], [], ack.refused)
            self._end_batch(commit=True)
            return ack
        except w.transient_errors as exc:
            self._end_batch(commit=False)
            # The COMMIT's outcome is unknown: its receipt, read on a fresh connection, says whether the
            # batch (writes and ack together) landed.
            landed = w.with_db("ack receipt", lambda c: ack_receipt_get(c, ack_id, len(ids)))
            if landed is not None:
                return landed
            # The transaction is lost: every job of the batch fails as a transient error.
            by_id = {r[0]: r for r in self.rows}
            # Stored and logged like any job error: the first line, sanitised and redacted (outcome.py).
            error_type, first_line, trace = describe(exc)
            message = f"batch transaction lost before commit: {first_line.splitlines()[0] if first_line else error_type}"
            lost = [Failure(job_id, error_type, message[:MESSAGE_CHARS], trace, False,
                            self.flow.config.backoff.delay(by_id[job_id][2], random.random())) for job_id in ids]
            w.log.warning(message, extra={"flow": self.flow.name, "jobs": len(ids)})
            return w.with_db("ack", lambda c: ack_batch(c, w.id, token, [], None, lost, max_attempts))

    def close(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self._job_tx is not None:  # only after an unexpected error
            try:
                self.end(conn, ok=False)
            except Exception:
                pass
        self._end_batch(commit=False)
        self.conn = None
        self.worker.pool.putconn(conn)


class AsyncPg:
    """`await ctx.pg`: the job's AsyncConnection, taken from the worker's async pool on first await."""

    __slots__ = ("_pool", "conn")

    def __init__(self, pool_getter: Any) -> None:
        self._pool = pool_getter
        self.conn: Any = None

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        if self.conn is None:
            pool = await self._pool()
            conn = await pool.getconn()
            try:
                await conn.set_autocommit(False)
            except BaseException:
                await pool.putconn(conn)
                raise
            self.conn = conn
        return self.conn

    async def end(self, ok: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        pool = await self._pool()
        try:
            swallowed = ok and conn.info.transaction_status == INERROR
            if ok and not swallowed:
                await conn.commit()
            else:
                try:
                    await conn.rollback()
                except Exception:
                    pass
            if swallowed:
                raise swallowed_error()
        finally:
            try:
                await conn.set_autocommit(True)
            except Exception:
                await conn.close()
            await pool.putconn(conn)

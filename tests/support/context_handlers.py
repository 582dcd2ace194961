"""(payload, ctx) handlers for the handler-context tests (tests/test_handler_context.py).

`write` inserts one row into ctx_results through ctx.pg, optionally enqueues a follow-up job through
ctx.enqueue, and then fails in the way the payload asks, so the tests can see which writes survive.
"""

from __future__ import annotations

from typing import Any

import psycopg


def write(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    if payload.get("source"):
        ctx.sources[payload["source"]]  # raises: the flow does not declare it
    # pg_current_xact_id() is the top-level transaction's id, also inside a savepoint.
    ctx.pg.execute("INSERT INTO ctx_results (job_id, n, flow, xact) "
                   "VALUES (%s, %s, %s, pg_current_xact_id()::text::bigint)", (ctx.job_id, payload["n"], ctx.flow))
    if payload.get("kill") and ctx.attempt == 1:  # the batch's connection dies under the handler
        ctx.pg.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    if payload.get("follow_up"):
        ctx.enqueue("ctx_follow_up", {"parent": ctx.job_id})
    if payload.get("swallow"):
        try:  # a failed statement the handler ignores: the job must not complete
            ctx.pg.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass
    if payload.get("fail"):
        raise RuntimeError(f"job {payload['n']} fails after writing")
    return {"n": payload["n"]}

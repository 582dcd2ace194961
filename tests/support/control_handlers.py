"""Handlers for the job-control tests (tests/test_job_control.py): cancel of running jobs, Snooze,
progress. Each writes `n pid event unix-time` lines to the file named by SKIPLOCK_TEST_TIMED, so the
tests judge from execution records."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from engine import Snooze


def _line(payload: dict[str, Any], event: str) -> None:
    fd = os.open(os.environ["SKIPLOCK_TEST_TIMED"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{payload.get('n', 0)} {os.getpid()} {event} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def read_events(path: str) -> list[tuple[int, int, str, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [(int(n), int(pid), event, float(at)) for n, pid, event, at in (line.split() for line in handle)]


def cooperative(payload: dict[str, Any], ctx: Any) -> str:
    """Reports progress, then works in small steps until it sees its cancel (or `steps` run out)."""
    _line(payload, "start")
    ctx.progress(0.25, "step 1 of 4")
    for _ in range(int(payload.get("steps", 600))):
        if ctx.cancelled:
            _line(payload, "saw-cancel")
            ctx.check_cancelled()  # raises JobCancelled
        time.sleep(0.05)
    _line(payload, "end")
    return "finished"


def stubborn(payload: dict[str, Any]) -> str:
    """Ignores cancels: one long sleep (no ctx to look at)."""
    _line(payload, "start")
    time.sleep(payload.get("sleep", 30))
    _line(payload, "end")
    return "slept"


async def async_wait(payload: dict[str, Any], ctx: Any) -> str:
    _line(payload, "start")
    ctx.progress(0.5)
    try:
        await asyncio.sleep(payload.get("sleep", 30))
    except asyncio.CancelledError:
        _line(payload, "task-cancelled")
        raise
    _line(payload, "end")
    return "waited"


def quick(payload: dict[str, Any]) -> int:
    _line(payload, "quick")
    return int(payload.get("n", 0))


async def async_quick(payload: dict[str, Any]) -> int:
    _line(payload, "quick")
    return int(payload.get("n", 0))


def _snoozes(ctx: Any) -> int:
    row = ctx.pg.execute("SELECT count(*) FROM skiplock.jobs j, jsonb_array_elements(j.errors) e "
                         "WHERE j.id = %s AND (e ->> 'snoozed')::boolean", (ctx.job_id,)).fetchone()
    return int(row[0])


def snooze_thrice(payload: dict[str, Any], ctx: Any) -> dict[str, int]:
    """Snoozes three times (0.1 s each), then succeeds; the result says on which attempt."""
    done = _snoozes(ctx)
    _line(payload, f"run-{done}")
    if done < 3:
        raise Snooze(0.1)
    return {"snoozes": done, "attempt": ctx.attempt}


async def async_snooze_thrice(payload: dict[str, Any], ctx: Any) -> dict[str, int]:
    conn = await ctx.pg
    cur = await conn.execute("SELECT count(*) FROM skiplock.jobs j, jsonb_array_elements(j.errors) e "
                             "WHERE j.id = %s AND (e ->> 'snoozed')::boolean", (ctx.job_id,))
    done = int((await cur.fetchone())[0])
    _line(payload, f"run-{done}")
    if done < 3:
        raise Snooze(0.1)
    return {"snoozes": done, "attempt": ctx.attempt}


async def async_swallow(payload: dict[str, Any]) -> str:
    """Swallows its task's cancel and keeps waiting: the worker must stop waiting at cancel_grace."""
    _line(payload, "start")
    deadline = time.monotonic() + payload.get("sleep", 30)
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            _line(payload, "task-cancelled")
    _line(payload, "end")
    return "ignored the cancel"


def batch_snooze_thrice(payloads: list[dict[str, Any]], ctx: Any) -> list[Any]:
    """A batch handler: each job snoozes until it has three snoozes, then succeeds."""
    out: list[Any] = []
    for payload in payloads:
        row = ctx.pg.execute("SELECT count(*) FROM skiplock.jobs j, jsonb_array_elements(j.errors) e "
                             "WHERE (j.payload ->> 'n')::int = %s AND (e ->> 'snoozed')::boolean",
                             (payload["n"],)).fetchone()
        done = int(row[0])
        _line(payload, f"run-{done}")
        out.append(Snooze(0.1) if done < 3 else {"snoozes": done, "attempt": 1})
    return out

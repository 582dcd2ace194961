"""Stage handlers for tests/test_stages.py: each records `flow item chunk pid` per execution to the
file named by SKIPLOCK_TEST_RECORD, then hands off with Next(...)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from engine import Next, Result
from support.handlers import _append_line


def _record(flow: str, payload: dict[str, Any]) -> None:
    _append_line("SKIPLOCK_TEST_RECORD", f"{flow} {payload['item']} {payload.get('chunk', -1)} {os.getpid()}")
    pause = float(os.environ.get("SKIPLOCK_TEST_STAGE_SLEEP", "0"))
    if pause:
        time.sleep(pause)


def parse(payload: dict[str, Any]) -> Any:
    _record("parse", payload)
    return Next("chunk", {"item": payload["item"]})


def chunk(payload: dict[str, Any]) -> Any:
    _record("chunk", payload)
    return [Next("embed", {"item": payload["item"], "chunk": c}) for c in range(2)]


async def embed(payload: dict[str, Any]) -> Any:
    _record("embed", payload)
    await asyncio.sleep(0)
    return {"embedded": [payload["item"], payload["chunk"]]}


# --- one two-stage pipeline per executor: {mode}_a -> {mode}_b ---------------------------------------


def first(payload: dict[str, Any], ctx: Any) -> Any:
    """A stage that writes through ctx.pg (transactional flows: in the ack's transaction), then hands
    off with a result beside the child."""
    if payload.get("write"):
        ctx.pg.execute("INSERT INTO stage_writes (job_id, flow) VALUES (%s, %s)", (ctx.job_id, ctx.flow))
    _record(ctx.flow, payload)
    return Result({"first": payload["item"]}, Next(payload["to"], {"item": payload["item"]}))


async def first_async(payload: dict[str, Any], ctx: Any) -> Any:
    _record(ctx.flow, payload)
    return Result({"first": payload["item"]}, [Next(payload["to"], {"item": payload["item"]})])


def first_batch(payloads: list[dict[str, Any]]) -> list[Any]:
    for payload in payloads:
        _record("batch_a", payload)
    return [Next(p["to"], {"item": p["item"]}) for p in payloads]


def last(payload: dict[str, Any]) -> Any:
    _record("last", payload)
    return {"last": payload["item"]}


def to_next_by_config(payload: dict[str, Any]) -> Any:
    """A flow with `next = ...`: a dict result is the next stage's payload."""
    _record("auto_a", payload)
    return {"item": payload["item"], "seen": True}


def bad_next(payload: dict[str, Any]) -> Any:
    _record("bad", payload)
    kind = payload["kind"]
    if kind == "unknown":
        return Next("no_such_flow", {"item": payload["item"]})
    if kind == "payload":
        return Next("last", ["not", "an", "object"])  # type: ignore[arg-type]
    if kind == "mixed":
        return [Next("last", {"item": 1}), {"item": 2}]
    if kind == "option":
        return Next("last", {"item": payload["item"]}, priority=10**6)
    return Next("last", {"item": payload["item"]})


def fail_once_then_next(payload: dict[str, Any]) -> Any:
    """Dies (permanently) unless the marker file exists; then hands off to `last`."""
    _record("fragile", payload)
    if not os.path.exists(os.environ["SKIPLOCK_TEST_MARKER"]):
        from engine.errors import PermanentError

        raise PermanentError("upstream down")
    return Next("last", {"item": payload["item"]})


def grow(payload: dict[str, Any]) -> Any:
    """A run that grows by its own jobs: item < 100 spawns one child of its own flow (link discovery)."""
    _record("grow", payload)
    time.sleep(float(payload.get("sleep", 0)))
    if payload.get("depth", 0) < 1:
        return Next("grow", {"item": payload["item"] + 1000, "depth": payload.get("depth", 0) + 1,
                             "sleep": payload.get("sleep", 0)})
    return None

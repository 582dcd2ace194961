"""Handlers for the execution-model tests (tests/test_executors.py, tests/test_bad_jobs.py).

Each appends one line per execution, `n pid thread start end` (unix seconds), to the file named by
SKIPLOCK_TEST_TIMED once the job has run (`hang`-like ones write a start line first), so tests can
prove concurrency from execution records: jobs of one process whose spans overlap ran at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import threading
import time
from typing import Any

from engine.handlers import JobTimeout


def _line(env_var: str, text: str) -> None:
    fd = os.open(os.environ[env_var], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def _timed(payload: dict[str, Any], start: float, end: float, extra: str = "") -> None:
    _line("SKIPLOCK_TEST_TIMED",
          f"{payload['n']} {os.getpid()} {threading.get_ident()} {start:.6f} {end:.6f}{extra}")


def read_timed(path: str) -> list[tuple[int, int, int, float, float]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 5:
                out.append((int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4])))
    return out


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def sleepy(payload: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    time.sleep(float(payload.get("sleep", 0.05)))
    _timed(payload, start, time.time())
    return {"n": payload["n"]}


async def async_sleepy(payload: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    await asyncio.sleep(float(payload.get("sleep", 0.05)))
    _timed(payload, start, time.time())
    return {"n": payload["n"], "awaited": True}


class AsyncCallable:
    """An object whose __call__ is async: detected as an async handler too."""

    async def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"n": payload["n"], "awaited": True}


async_callable = AsyncCallable()


def noop_record(payload: dict[str, Any]) -> None:
    _timed(payload, time.time(), time.time())


def pg_sleep_tx(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Writes a row through ctx.pg, then sleeps on the server (a timeout there cancels the statement)."""
    ctx.pg.execute("INSERT INTO exec_results (job_id, n, xact) VALUES (%s, %s, pg_current_xact_id()::text::bigint)",
                   (ctx.job_id, payload["n"]))
    ctx.pg.execute("SELECT pg_sleep(%s)", (float(payload.get("sleep", 0)),))
    return {"n": payload["n"]}


async def async_pg(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    conn = await ctx.pg
    cur = await conn.execute("SELECT %s::int + 1", (payload["n"],))
    (value,) = await cur.fetchone()
    await conn.execute("INSERT INTO exec_results (job_id, n, xact) VALUES (%s, %s, 0)", (ctx.job_id, value))
    return {"n": payload["n"], "plus_one": value}


def odbc_backend(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Which source connection (server backend pid) served this job, from which thread."""
    start = time.time()
    backend = ctx.sources["pgsrc"].query_value("SELECT pg_backend_pid()")
    time.sleep(float(payload.get("sleep", 0.05)))
    _timed(payload, start, time.time(), f" {backend}")
    return {"backend": backend}


async def async_odbc_backend(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """odbc_backend for the asyncio executor (the ODBC call itself blocks the loop briefly)."""
    start = time.time()
    backend = ctx.sources["pgsrc"].query_value("SELECT pg_backend_pid()")
    await asyncio.sleep(float(payload.get("sleep", 0.01)))
    _timed(payload, start, time.time(), f" {backend}")
    return {"backend": backend}


def hang(payload: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    time.sleep(float(payload.get("sleep", 0.0)))
    _timed(payload, start, time.time())
    return {"n": payload["n"]}


async def async_hang(payload: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    await asyncio.sleep(float(payload.get("sleep", 0.0)))
    _timed(payload, start, time.time())
    return {"n": payload["n"]}


def batch_mixed(payloads: list[dict[str, Any]]) -> list[Any]:
    if any(p.get("wrong_length") for p in payloads):
        return []
    return [RuntimeError(f"item {p['n']} failed") if p.get("fail") else {"n": p["n"], "batch": len(payloads)}
            for p in payloads]


def batch_with_ctx(payloads: list[dict[str, Any]], ctx: Any) -> list[Any]:
    return [{"n": p["n"], "worker": bool(ctx.worker_id)} for p in payloads]


# --- bad jobs (tests/test_bad_jobs.py) ---------------------------------------------------------------


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for you")


def bad(payload: dict[str, Any]) -> Any:
    """Healthy unless payload["bad"] names a way to misbehave."""
    kind = payload.get("bad")
    start = time.time()
    try:
        if kind == "set":
            return {"tags": {1, 2}}
        if kind == "nul_result":
            return {"text": "a\x00b"}
        if kind == "str_raises":
            raise BrokenStr()
        if kind == "nul_message":
            raise RuntimeError("bad \x00 byte and a lone \ud800 surrogate")
        if kind == "sys_exit":
            sys.exit(3)
        if kind == "keyboard":
            raise KeyboardInterrupt
        if kind == "os_exit":
            os._exit(1)
        if kind == "fork":
            pid = os.fork()
            if pid == 0:
                return {"side": "child"}  # the child returns into the worker: it must exit at once
            os.waitpid(pid, 0)
            return {"side": "parent"}
        if kind == "swallow_timeout":
            try:
                time.sleep(10)
            except JobTimeout:
                pass
            return {"swallowed": True}
        if kind == "stuck":
            until = time.time() + 30
            while time.time() < until:
                try:
                    time.sleep(0.05)
                except JobTimeout:
                    pass
            return {"stuck": True}
        # Deaths from C, which no Python guard can turn into an exception: the worker process dies.
        if kind == "segfault":
            ctypes.string_at(0)
        if kind == "abort":
            os.abort()
        if kind == "c_exit":
            ctypes.CDLL(None)._exit(7)
        if kind == "password":
            raise RuntimeError("cannot connect to postgresql://u:hunter2@db.internal/x")
        return {"n": payload["n"]}
    finally:
        _timed(payload, start, time.time(), f" {kind or 'ok'}")


async def async_bad(payload: dict[str, Any]) -> Any:
    await asyncio.sleep(0)
    return bad(payload)


def marked(payload: dict[str, Any]) -> dict[str, Any]:
    """Returns the payload's `mark` in its result (a proxy can spot the ack that carries it)."""
    start = time.time()
    _timed(payload, start, time.time())
    return {"n": payload["n"], "mark": payload.get("mark")}

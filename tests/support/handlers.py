"""Handlers for tests that run real engines. Each records what it ran so tests can count executions.

Executions are appended, one `job_number pid` line each, to the file named by SKIPLOCK_TEST_RECORD
(O_APPEND writes of one short line are atomic across processes).
"""

from __future__ import annotations

import os
import time
from typing import Any

from engine.errors import PermanentError


def _append_line(env_var: str, line: str) -> None:
    """One O_APPEND write per line: atomic across worker processes."""
    fd = os.open(os.environ[env_var], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _record(payload: dict[str, Any]) -> None:
    _append_line("SKIPLOCK_TEST_RECORD", f"{payload['n']} {os.getpid()}")


def record(payload: dict[str, Any]) -> None:
    _record(payload)


def record_slow(payload: dict[str, Any]) -> None:
    _record(payload)
    time.sleep(float(payload.get("sleep", 0.05)))


def always_fail(payload: dict[str, Any]) -> None:
    _record(payload)
    raise RuntimeError("always fails")


def fail_permanently(payload: dict[str, Any]) -> None:
    _record(payload)
    raise PermanentError("bad payload")


def hang(payload: dict[str, Any]) -> None:
    _record(payload)
    time.sleep(float(payload.get("sleep", 60)))


def on_run_complete(run_id: str, summary: dict[str, Any]) -> None:
    _append_line("SKIPLOCK_TEST_HOOKS",
                 f"{run_id} {summary['total']} {summary['completed']} {summary['dead']} {os.getpid()}")


def read_records(path: str) -> list[tuple[int, int]]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [(int(a), int(b)) for a, b in (line.split() for line in handle if line.strip())]


# --- tests/test_engine.py -------------------------------------------------------------------------


def record_timed(payload: dict[str, Any]) -> None:
    """Appends `n pid start end` (unix seconds) to SKIPLOCK_TEST_TIMED once the job has run."""
    start = time.time()
    time.sleep(float(payload.get("sleep", 0.0)))
    end = time.time()
    _append_line("SKIPLOCK_TEST_TIMED", f"{payload['n']} {os.getpid()} {start:.6f} {end:.6f}")


def fail_until_marker(payload: dict[str, Any]) -> None:
    """Records every attempt; fails until the file named by SKIPLOCK_TEST_MARKER exists."""
    _record(payload)
    if not os.path.exists(os.environ["SKIPLOCK_TEST_MARKER"]):
        raise RuntimeError("dependency unavailable")
    time.sleep(float(payload.get("sleep", 0.0)))


# --- tests/test_liveness.py -----------------------------------------------------------------------


def record_span(payload: dict[str, Any], ctx: Any) -> None:
    """Writes `start|tick|end n pid attempt unix_time` lines to SKIPLOCK_TEST_SPANS while it runs:
    a tick every 20 ms of `sleep`, so an execution that was killed still shows how long it ran, and
    one that was frozen and resumed shows where it ran again. `gil` (seconds, on the attempts listed
    in `gil_attempts`, default the first) holds the GIL in one C call: libc sleep through PyDLL."""
    def mark(kind: str) -> None:
        _append_line("SKIPLOCK_TEST_SPANS", f"{kind} {payload['n']} {os.getpid()} {ctx.attempt} {time.time():.6f}")

    mark("start")
    if payload.get("gil") and ctx.attempt in payload.get("gil_attempts", [1]):
        import ctypes
        ctypes.PyDLL(None).sleep(int(payload["gil"]))
        mark("tick")
    deadline = time.monotonic() + float(payload.get("sleep", 0.0))
    while time.monotonic() < deadline:
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        mark("tick")
    mark("end")


def slow_hook(run_id: str, summary: dict[str, Any]) -> None:
    """An on_complete hook that takes SKIPLOCK_TEST_HOOK_SLEEP seconds, then records like on_run_complete."""
    _append_line("SKIPLOCK_TEST_HOOKS", f"start {run_id} {time.time():.6f}")
    time.sleep(float(os.environ.get("SKIPLOCK_TEST_HOOK_SLEEP", "0")))
    _append_line("SKIPLOCK_TEST_HOOKS", f"end {run_id} {time.time():.6f}")


# --- tests/test_flow_control.py -------------------------------------------------------------------


def record_keyed(payload: dict[str, Any]) -> None:
    """Writes `start|end n customer pid unix_time` lines to SKIPLOCK_TEST_SPANS around a `sleep`, so an
    execution killed part way shows its start without an end."""
    def mark(kind: str) -> None:
        _append_line("SKIPLOCK_TEST_SPANS",
                     f"{kind} {payload['n']} {payload.get('customer', '-')} {os.getpid()} {time.time():.6f}")

    mark("start")
    time.sleep(float(payload.get("sleep", 0.0)))
    mark("end")

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

"""Handlers of the benchmark flows, run inside real `engine run` workers.

`stamp` measures enqueue-to-start latency without perturbing it: the first thing it does is read the
clock, and it writes one short line per latency probe with a single `os.write` to a per-process file
(O_APPEND; no database round trip, no buffering to lose when the worker exits with `os._exit`).
Probes carry their sequence number and the producer's `time.time()` taken just before its
`Queue.enqueue` call; producer and workers read the same machine clock. Payloads without "t"
(background load) are ignored, so the same flow carries probes and load in one FIFO queue.

The directory comes from SKIPLOCK_BENCH_STAMPS, set by the suite in the engine's environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

_fd: int | None = None
_fd_pid = 0


def _stamp_fd() -> int:
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:  # opened after the fork: one file per worker process
        directory = os.environ.get("SKIPLOCK_BENCH_STAMPS") or "."
        _fd = os.open(os.path.join(directory, f"stamps-{pid}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = pid
    return _fd


def stamp(payload: dict[str, Any]) -> None:
    started = time.time()
    sent = payload.get("t")
    if sent is not None:
        os.write(_stamp_fd(), b"%d %r %r\n" % (payload["i"], sent, started))


def read_stamps(directory: str | os.PathLike[str]) -> dict[int, tuple[float, float]]:
    """{probe number: (enqueue time, start time)} from every worker's file; a probe run twice
    (at-least-once) keeps its first start."""
    found: dict[int, tuple[float, float]] = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("stamps-"):
            continue
        with open(os.path.join(directory, name), "rb") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) != 3:
                    continue
                seq, sent, started = int(parts[0]), float(parts[1]), float(parts[2])
                if seq not in found or started < found[seq][1]:
                    found[seq] = (sent, started)
    return found


IO_WAIT = 0.05  # seconds each I/O-bound job waits (a query to a source database, an API call)


def wait_io(payload: dict[str, Any]) -> None:
    """Blocking I/O stand-in for the threaded executor."""
    time.sleep(IO_WAIT)


async def async_wait_io(payload: dict[str, Any]) -> None:
    """Non-blocking I/O stand-in for the asyncio executor."""
    import asyncio

    await asyncio.sleep(IO_WAIT)


# -- the chaos run (bench/chaos.py) ------------------------------------------------------------------

_exec_fd: int | None = None
_exec_pid = 0


def _exec_file() -> int:
    """One execution-record file per worker process, named by pid and open time (pids are reused over
    a ten-minute run of kills and restarts)."""
    global _exec_fd, _exec_pid
    pid = os.getpid()
    if _exec_fd is None or _exec_pid != pid:
        directory = os.environ.get("SKIPLOCK_CHAOS_RECORDS") or "."
        path = os.path.join(directory, f"exec-{pid}-{time.time_ns()}.txt")
        _exec_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _exec_pid = pid
    return _exec_fd


def chaos(payload: dict[str, Any]) -> None:
    """Writes `s N T` when it starts and `e N T` when it is done (one os.write each: nothing buffered
    to lose when the worker is killed); a few jobs take `ms` milliseconds, so some are running
    whenever a fault strikes."""
    fd = _exec_file()
    n = payload["n"]
    os.write(fd, b"s %d %r\n" % (n, time.time()))
    ms = payload.get("ms")
    if ms:
        time.sleep(ms / 1000)
    os.write(fd, b"e %d %r\n" % (n, time.time()))

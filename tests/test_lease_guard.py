"""The worker's lease guard (engine/liveness.py) on its own: how often an idle one wakes, and that
it still answers a freeze request in the lease's last `lead` seconds. It runs in a forked child,
as in a worker: its kernel switch SIGKILLs the process that armed it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from engine.liveness import LeaseTable, WorkerGuard, freeze_lead

SPAN = 2.0
INTERVAL = 0.1
RECHECK = 0.5


def _guard(table: LeaseTable, checks: "multiprocessing.sharedctypes.Synchronized[int]") -> None:
    class Counting(WorkerGuard):
        def check(self, now: float) -> float:
            checks.value += 1
            return super().check(now)

    Counting(table.slot(0), SPAN, INTERVAL, RECHECK, "guard-test").start()
    while True:
        time.sleep(1)


def _start() -> tuple[LeaseTable, "multiprocessing.sharedctypes.Synchronized[int]", multiprocessing.Process]:
    ctx = multiprocessing.get_context("fork")
    table = LeaseTable(1)
    table.renewed[0] = time.monotonic()
    checks = ctx.Value("i", 0)
    child = ctx.Process(target=_guard, args=(table, checks), daemon=True)
    child.start()
    return table, checks, child


def _end(child: multiprocessing.Process) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)


def test_a_renewed_guard_looks_every_recheck_not_every_interval() -> None:
    table, checks, child = _start()
    try:
        time.sleep(0.3)
        first = checks.value
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # the supervisor renewing, as every heartbeat
            table.renewed[0] = time.monotonic()
            time.sleep(0.2)
        looks = checks.value - first
        assert child.is_alive(), f"the guard exited (code {child.exitcode}) under a lease renewed every 0.2 s"
        # 3 s / RECHECK = 6 looks; at INTERVAL (the old fixed cadence) it would be 30.
        assert 3 <= looks <= 10, f"{looks} lease checks in 3 s"
    finally:
        _end(child)


def test_a_guard_in_its_freeze_window_acknowledges_within_its_interval() -> None:
    table, checks, child = _start()
    try:
        renewed = time.monotonic()
        table.renewed[0] = renewed
        window = renewed + SPAN - freeze_lead(SPAN)
        time.sleep(max(0.0, window - time.monotonic()) + 0.05)  # the supervisor asks once it may
        table.freeze[0] = 1
        asked = time.monotonic()
        while table.frozen_ack[0] != 1:
            assert time.monotonic() - asked < 3 * INTERVAL, "no acknowledgement of the freeze request"
            time.sleep(0.005)
        assert child.is_alive()
        # Thawed and renewed: the guard clears its acknowledgement and keeps the worker alive.
        table.freeze[0] = 0
        table.renewed[0] = time.monotonic()
        deadline = time.monotonic() + 3 * RECHECK
        while table.frozen_ack[0] != 0:
            assert time.monotonic() < deadline, "the acknowledgement outlived the freeze request"
            time.sleep(0.01)
        assert child.is_alive()
    finally:
        _end(child)


def test_a_guard_whose_lease_is_not_renewed_ends_its_process() -> None:
    table, checks, child = _start()
    child.join(SPAN + 2.0)
    assert not child.is_alive(), "the guard let its process outlive the lease"
    # The guard's own exit (7) or the kernel switch (SIGKILL), whichever came first.
    assert child.exitcode in (7, -signal.SIGKILL), child.exitcode

"""Worker liveness: the supervisor's heartbeat, the lease it publishes to its workers, their guard.

The supervisor, which no handler can block, owns `workers.heartbeat_at`: one statement per
heartbeat interval renews every live worker of the engine (`EngineLiveness`). "Live" means the
process exists and is not stopped (`/proc/PID/stat`). A worker the database reports lost is
SIGKILLed at once (its jobs are someone else's); a worker stopped by someone else is not renewed
and is SIGKILLed before its heartbeat can go stale, so its jobs are rescued at once.

The lease. After each successful renewal the supervisor writes the monotonic time it *sent* the
statement (so never later than the database's `heartbeat_at`) into shared memory created before
the fork, one slot per worker. A worker may run while `now < renewed + lease_span`, where

    lease_span = stale_after - margin,  margin = max(heartbeat_interval, 20% of stale_after)

The margin covers what separates "the lease ran out" from "another engine may take the jobs":
clock-rate differences between this host and the database over one `stale_after`, and signal
delivery. (The 2 x heartbeat_interval first proposed doubles the false kills under load and buys
nothing the kernel timer below does not already give.) Each worker runs a `WorkerGuard`:

- a thread that checks the lease and exits the process once it is out (the supervisor is frozen
  or gone: nobody can prove this worker alive). It looks every 0.5 s (at most heartbeat_interval /
  2) until the lease's last `lead` seconds, when the supervisor may ask it to prepare for a freeze,
  and every 0.1 s from then on. The supervisor's check sleeps likewise until the first such window;
  an idle engine's liveness then costs a few wake-ups a second, not 40;
- a kernel dead-man switch that needs no GIL: a POSIX timer on CLOCK_MONOTONIC that sends SIGKILL,
  re-armed by that thread to the lease's end. A whole engine SIGSTOPped past the lease, or a
  handler holding the GIL past it, is killed by the kernel; it never runs another instruction.
  (Not SIGSTOP: a later SIGCONT discards pending stop signals. SIGALRM belongs to job timeouts.)

Database outages. While the database is unreachable the supervisor cannot renew. Before a lease
runs out it freezes the worker instead of letting it die: it asks (freeze request in shared
memory), the worker's guard pushes its kernel timer to `now + lease_span` and acknowledges, and the
supervisor SIGSTOPs it; a stopped process runs nothing, so nothing can overlap. When the database
answers, the supervisor renews (lease first) then SIGCONTs those still not lost, and SIGKILLs the
ones marked lost. A frozen worker's timer still fires one lease_span after it was frozen, which is
never later than the lease of any renewal that could resume it; so a worker frozen for longer is
killed (and replaced) rather than kept stopped forever.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Final

import psycopg

from engine import db, store
from engine.redact import describe_error

log = logging.getLogger("skiplock.engine")

EXIT_LEASE_EXPIRED: Final = 7  # a worker whose lease ran out exits with this code
# Blocked in the supervisor across each fork; the worker unblocks them once its own handlers are in.
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_real_exit = os._exit  # bound at import: the worker guards os._exit against handlers after that
ENFORCE_INTERVAL_CAP: Final = 0.05  # the supervisor's lease checks (no database involved)
GUARD_INTERVAL_CAP: Final = 0.1  # a worker's lease checks in its freeze window: shared memory and one syscall
# Lease checks before that window, worker and supervisor: often enough that the worker's kernel
# switch follows the renewals (a handler holding the GIL loses at most this much of its lease).
LEASE_RECHECK_CAP: Final = 0.5
FREEZE_LEAD_CAP: Final = 1.0


def lease_margin(stale_after: float, heartbeat_interval: float) -> float:
    return max(heartbeat_interval, 0.2 * stale_after)


def freeze_lead(span: float) -> float:
    """How long before a lease ends the supervisor may ask its worker to prepare for a freeze: the
    worker's guard must acknowledge and the supervisor's check must see it in time. The config asks
    stale_after >= 3 x heartbeat_interval, so this is always past one late renewal."""
    return min(FREEZE_LEAD_CAP, span / 4)


def lease_recheck(heartbeat_interval: float) -> float:
    """How often a lease is looked at before its freeze window, by the worker and the supervisor."""
    return min(LEASE_RECHECK_CAP, heartbeat_interval / 2)


def lease_span(stale_after: float, heartbeat_interval: float) -> float:
    """How long after a renewal was sent a worker may still run."""
    return stale_after - lease_margin(stale_after, heartbeat_interval)


def process_stopped(pid: int) -> bool | None:
    """True if `pid` is stopped (SIGSTOP, or a tracer's stop), None if it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    state = stat.rsplit(b")", 1)[1].split()[0]
    if state in (b"Z", b"X"):
        return None
    return state in (b"T", b"t")


# ---------------------------------------------------------------------------------------------
# Shared memory: one lease per worker slot


class LeaseTable:
    """Created by the supervisor before it forks; each worker reads and acknowledges its slot."""

    def __init__(self, slots: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.renewed = ctx.RawArray(ctypes.c_double, slots)  # monotonic time the renewal was sent
        self.freeze = ctx.RawArray(ctypes.c_long, slots)  # freeze request generation, 0: none
        self.frozen_ack = ctx.RawArray(ctypes.c_long, slots)  # generation the worker has prepared for

    def slot(self, index: int) -> "Lease":
        return Lease(self, index)


@dataclass(frozen=True)
class Lease:
    table: LeaseTable
    index: int

    @property
    def renewed(self) -> float:
        return float(self.table.renewed[self.index])


# ---------------------------------------------------------------------------------------------
# Worker side


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):  # Linux layout: value, signo, notify, then padding to 64 bytes
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("_pad", ctypes.c_int * 12)]


_CLOCK_MONOTONIC: Final = 1  # what time.monotonic() reads on Linux
_SIGEV_SIGNAL: Final = 0
_TIMER_ABSTIME: Final = 1


class DeadManSwitch:
    """A POSIX timer that SIGKILLs this process at an absolute CLOCK_MONOTONIC time."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._timer = ctypes.c_void_p()
        event = _Sigevent(None, signal.SIGKILL, _SIGEV_SIGNAL)
        if self._libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)) != 0:
            raise OSError(ctypes.get_errno(), "timer_create failed")

    def arm(self, deadline: float) -> None:
        deadline = max(deadline, 1e-3)  # an all-zero value would disarm it
        whole = int(deadline)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, int((deadline - whole) * 1e9)))
        self._libc.timer_settime(self._timer, _TIMER_ABSTIME, ctypes.byref(spec), None)

    def disarm(self) -> None:
        self._libc.timer_settime(self._timer, 0, ctypes.byref(_Itimerspec()), None)


class WorkerGuard:
    """Runs in a worker: stops the process once its lease is out (see the module docstring)."""

    def __init__(self, lease: Lease, span: float, interval: float, recheck: float, worker_id: str) -> None:
        self.lease = lease
        self.span = span
        self.lead = freeze_lead(span)
        self.interval = interval  # in the freeze window
        self.recheck = recheck  # before it
        self.worker_id = worker_id
        self._stop = threading.Event()
        try:
            self._switch: DeadManSwitch | None = DeadManSwitch()
        except (OSError, AttributeError) as exc:  # not Linux: the thread alone guards
            log.warning("no kernel dead-man switch (%s): a handler holding the GIL is not bounded", exc)
            self._switch = None
        self._thread = threading.Thread(target=self._run, name="lease-guard", daemon=True)

    def start(self) -> "WorkerGuard":
        self.check(time.monotonic())
        self._thread.start()
        return self

    def stop(self) -> None:
        """A worker exiting on its own: the switch must not outlive the checks."""
        self._stop.set()
        if self._switch is not None:
            self._switch.disarm()

    def check(self, now: float) -> float:
        """One check; returns the lease's end."""
        table, index = self.lease.table, self.lease.index
        deadline = table.renewed[index] + self.span
        if now >= deadline:
            log.error("lease expired: the supervisor could not prove this worker alive for %.1fs; stopping",
                      self.span, extra={"worker": self.worker_id})
            _real_exit(EXIT_LEASE_EXPIRED)
        request = table.freeze[index]
        if request:
            if table.frozen_ack[index] != request:
                # About to be frozen through an outage: while stopped, live one more lease_span.
                if self._switch is not None:
                    self._switch.arm(now + self.span)
                table.frozen_ack[index] = request
        else:
            if table.frozen_ack[index]:
                table.frozen_ack[index] = 0
            if self._switch is not None:
                self._switch.arm(deadline)
        return deadline

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            deadline = self.check(now)
            window = deadline - self.lead  # from here on a freeze request may come
            wait = self.interval if now >= window else min(self.recheck, window - now)
            self._stop.wait(max(0.0, min(wait, deadline - time.monotonic())))


# ---------------------------------------------------------------------------------------------
# Supervisor side


@dataclass
class _Held:
    worker_id: str
    pid: int
    frozen: bool = False  # SIGSTOPped by us through an outage


@dataclass
class EngineLiveness:
    """The supervisor's heartbeat (a thread with its own connection) and lease enforcement (a
    thread that never touches the database, so an outage or a slow statement cannot delay it)."""

    dsn: str
    application_name: str
    slots: int
    stale_after: float
    heartbeat_interval: float
    table: LeaseTable = field(init=False)
    _held: dict[int, _Held] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _generation: int = 0
    _conn: psycopg.Connection[Any] | None = None
    _failing_since: float = 0.0
    lost_killed: list[str] = field(default_factory=list)  # worker ids killed because marked lost
    # The engine's own heartbeat (engine/control.py), sent on this thread's connection after each renewal.
    on_beat: Callable[[psycopg.Connection[Any]], None] | None = None

    def __post_init__(self) -> None:
        self.table = LeaseTable(self.slots)
        self.span = lease_span(self.stale_after, self.heartbeat_interval)
        self.lead = freeze_lead(self.span)  # ask for a freeze this long before a lease ends

    # -- hooks the supervisor calls ------------------------------------------------------------

    def lease(self, index: int) -> Lease:
        return self.table.slot(index)

    def before_spawn(self, index: int) -> None:
        with self._lock:
            self._held.pop(index, None)
            self.table.freeze[index] = 0
            self.table.frozen_ack[index] = 0
            self.table.renewed[index] = time.monotonic()

    def spawned(self, index: int, worker_id: str, pid: int) -> None:
        with self._lock:
            self._held[index] = _Held(worker_id, pid)

    def gone(self, index: int) -> None:
        with self._lock:
            self._held.pop(index, None)

    def frozen_pids(self) -> list[int]:
        with self._lock:
            return [h.pid for h in self._held.values() if h.frozen]

    def start(self) -> None:
        for target, name in ((self._renew_loop, "heartbeat"), (self._enforce_loop, "lease-enforcer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self._conn is not None:
            self._conn.close()

    # -- renewal ---------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        timeout_ms = int(max(self.span / 2, 1.0) * 1000)
        conn = psycopg.connect(
            self.dsn, autocommit=True, application_name=self.application_name,
            connect_timeout=max(2, int(self.span / 2)),
            # A renewal must fail fast, not hang on a dead network, so the enforcer's freeze is the
            # only thing that waits. Ignored on Unix sockets.
            tcp_user_timeout=timeout_ms, keepalives=1, keepalives_idle=1, keepalives_interval=1,
            keepalives_count=3, options=f"-c statement_timeout={timeout_ms}")
        db.fit_to_pooler(conn, self.dsn)
        return conn

    def renew_once(self) -> bool:
        """One heartbeat of every live worker; True if the database answered."""
        with self._lock:
            held = dict(self._held)
        candidates = {i: h for i, h in held.items() if h.frozen or process_stopped(h.pid) is False}
        if not candidates:
            return True
        sent = time.monotonic()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            lost = store.workers_renew(self._conn, [h.worker_id for h in candidates.values()])
        except psycopg.Error as exc:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            if not self._failing_since:
                self._failing_since = sent
                log.warning("heartbeat failed (workers are frozen before their lease ends): %s", describe_error(exc))
            return False
        if self._failing_since:
            log.info("heartbeat restored after %.1fs", time.monotonic() - self._failing_since)
            self._failing_since = 0.0
        with self._lock:
            for index, was in candidates.items():
                now_held = self._held.get(index)
                if now_held is None or now_held.worker_id != was.worker_id:
                    continue  # died or replaced meanwhile
                if now_held.worker_id in lost:
                    _signal(now_held.pid, signal.SIGKILL)
                    self.lost_killed.append(now_held.worker_id)
                    log.warning("worker marked lost by the database: killed (its jobs are someone else's)",
                                extra={"worker": now_held.worker_id, "pid": now_held.pid})
                    continue
                # Lease first, then thaw: the guard must find a valid lease when it runs again.
                self.table.renewed[index] = sent
                if now_held.frozen:
                    self.table.freeze[index] = 0
                    now_held.frozen = False
                    _signal(now_held.pid, signal.SIGCONT)
                    log.info("worker resumed: the database answers again", extra={"worker": now_held.worker_id})
        return True

    def _renew_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = self.renew_once()
            except Exception:  # never let the heartbeat thread die: the leases would run out
                log.exception("heartbeat failed unexpectedly")
                ok = False
            if ok:
                self._beat_engine()
            # After a failure retry sooner, so workers resume promptly when the database returns.
            interval = self.heartbeat_interval if ok else min(self.heartbeat_interval, 0.25)
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _beat_engine(self) -> None:
        """After the workers' renewal, never before it: a slow engine row must not delay a lease."""
        if self.on_beat is None:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            self.on_beat(self._conn)
        except psycopg.Error as exc:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            log.warning("engine heartbeat failed: %s", describe_error(exc))
        except Exception:
            log.exception("engine heartbeat failed unexpectedly")

    # -- enforcement ----------------------------------------------------------------------------

    def enforce_once(self, now: float) -> float:
        """One check of every held worker's lease; returns how long until one may need acting on
        (0: a lease is in its freeze window now)."""
        gap = float("inf")
        with self._lock:
            for index, held in self._held.items():
                if held.frozen:
                    continue
                deadline = self.table.renewed[index] + self.span
                if now < deadline - self.lead:
                    gap = min(gap, deadline - self.lead - now)
                    continue
                gap = 0.0
                stopped = process_stopped(held.pid)
                if stopped is None:
                    continue  # exited: the supervisor reaps it
                if stopped or now >= deadline:
                    # Stopped by someone else (we cannot resume it safely), or the lease is out
                    # without a freeze: kill now so its jobs are rescued at once.
                    _signal(held.pid, signal.SIGKILL)
                    log.warning("worker killed: %s", "stopped by someone else" if stopped else "lease expired",
                                extra={"worker": held.worker_id, "pid": held.pid})
                    continue
                request = self.table.freeze[index]
                if not request:
                    self._generation += 1
                    self.table.freeze[index] = self._generation
                elif self.table.frozen_ack[index] == request:
                    _signal(held.pid, signal.SIGSTOP)
                    held.frozen = True
                    log.warning("worker frozen: its lease is ending and the heartbeat cannot reach the database",
                                extra={"worker": held.worker_id, "pid": held.pid})
        return gap

    def _enforce_loop(self) -> None:
        interval = min(ENFORCE_INTERVAL_CAP, self.heartbeat_interval / 4)
        recheck = lease_recheck(self.heartbeat_interval)
        wait = interval
        while not self._stop.wait(wait):
            try:
                # A renewal only moves a lease's end later and a new worker's ends a full span
                # away, so sleeping until the first window computed here misses nothing.
                wait = max(interval, min(recheck, self.enforce_once(time.monotonic())))
            except Exception:
                wait = interval
                log.exception("lease enforcement failed unexpectedly")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

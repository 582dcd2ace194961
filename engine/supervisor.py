"""`engine run`: the supervisor of a pool of forked worker processes.

Start method: fork. Workers start in milliseconds and inherit the handler modules the supervisor
imported (and checked) at start-up. Each worker opens its own pool after the fork. The supervisor's
own database work (rescue, drain checks) opens a short-lived connection and closes it before the
loop goes on. Two threads of engine/liveness.py (the heartbeat, with its own connection, and the
lease enforcer) and the users' hook threads run while it forks: a child never uses what they hold
(psycopg does not close a connection it did not open in this process, logging re-creates its locks
at fork), and the child only runs worker_main.

Liveness (engine/liveness.py): the supervisor heartbeats its live workers and publishes a lease
each worker checks, so a handler cannot stop the heartbeat and a worker nobody can prove alive
stops itself before its jobs can be handed to another.

The control plane (engine/control.py): the engine's row in skiplock.engines is renewed by the
heartbeat thread, which also looks for pending commands; a listener thread holds the engine's one
LISTEN connection: it wakes the main loop for commands and relays enqueue notifications to the
workers over a pipe each. `scale` forks through _spawn and retires workers with SIGTERM (reaped
without restart, rescued if they did not exit cleanly); `drain` leaves as on SIGTERM; `stop` kills.

The supervisor restarts workers that die (with exponential backoff per slot, so a crash loop cannot
spin), rescues a dead worker's jobs at once, runs the fleet-wide rescue of stale heartbeats when it
holds the leader lock, and stops gracefully on SIGTERM/SIGINT.

Exit codes: 0 stopped cleanly, or --drain found nothing left; 2 bad configuration, or the database
unreachable or outdated at start; 3 a second signal forced the stop; 4 workers kept crashing;
5 workers still busy after the grace period had to be killed.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
import psycopg

from engine import __version__, control, db, roles, schedules, store
from engine.config import BUILTIN_FLOW_NAMES, EngineConfig, FlowConfig, Settings, recorded_policy, resolve_dsn
from engine.errors import ConfigError, SkiplockError
from engine.handlers import load_flow
from engine.hooks import HookRunner
from engine.limits import MAX_PORT, MAX_WORKERS, validate_flow
from engine.liveness import STOP_SIGNALS, EngineLiveness
from engine.logs import ContextLogger, setup_logging
from engine.migrate import require_schema
from engine.redact import describe_error
from engine.telemetry import CONSOLE_APPLICATION_NAME, RELAY_ENQUEUED, RELAY_FLOW, FlowCounts, encode_event
from engine.vacuum import VacuumThread

if TYPE_CHECKING:
    from engine.metrics import EngineMetrics

log = logging.getLogger("skiplock.engine")

EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2
EXIT_FORCED: Final = 3
EXIT_CRASH_LOOP: Final = 4
EXIT_KILLED: Final = 5  # workers still busy after the grace period were killed (their jobs rescued)

RESTART_BACKOFF_BASE: Final = 0.5
RESTART_BACKOFF_CAP: Final = 30.0
HEALTHY_RUN_SECONDS: Final = 30.0  # a worker that lived this long resets its slot's backoff
CRASH_LOOP_LIMIT: Final = 10  # consecutive early deaths of one slot before the engine gives up
DRAIN_CHECK_INTERVAL: Final = 0.5
RETENTION_INTERVAL: Final = 600.0


class IdleReport:
    """Workers report when a claim round found nothing and they hold nothing (a flag per slot in shared
    memory, and a byte on a pipe to wake the supervisor); `--drain` confirms with one SQL statement
    only then, instead of polling. Made before the fork, so every worker inherits it."""

    def __init__(self, context: Any, slots: int) -> None:
        self.flags = context.Array("b", slots, lock=False)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def idle(self, index: int) -> None:  # in the worker
        self.flags[index] = 1
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass

    def busy(self, index: int) -> None:  # in the worker
        self.flags[index] = 0

    def fileno(self) -> int:
        return self._r

    def take(self) -> bool:
        """Whether any report arrived since the last call."""
        got = False
        try:
            while os.read(self._r, 4096):
                got = True
        except BlockingIOError:
            pass
        return got

    def all_idle(self, indices: list[int]) -> bool:
        return all(self.flags[i] for i in indices)


@dataclass
class Slot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    worker_id: str = ""
    started_at: float = 0.0
    early_deaths: int = 0
    restart_at: float = 0.0
    generation: int = 0


@dataclass
class Supervisor:
    settings: Settings
    dsn: str
    flows: tuple[FlowConfig, ...]
    workers: int
    drain: bool = False
    wait_scheduled: bool = False  # with drain: also wait for jobs scheduled for later
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    slots: list[Slot] = field(default_factory=list)
    signals: int = 0
    _context: Any = None
    report: Any = None
    metrics_port: int | None = None  # --metrics-port, else the config's metrics_port (None: off)
    metrics: EngineMetrics | None = None
    listen_dsn: str | None = None  # a direct connection for LISTEN (and session locks) behind PgBouncer

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("fork")
        self.slots = [Slot(i) for i in range(self.workers)]
        # Shared memory for every slot `engine scale` may add: made now, before any fork.
        self.report = IdleReport(self._context, MAX_WORKERS)
        self.log = ContextLogger(log, {"engine": self.engine_id})
        engine = self.settings.engine
        self.liveness = EngineLiveness(self.dsn, f"{self.settings.application_name}-supervisor", MAX_WORKERS,
                                       engine.stale_after, engine.heartbeat_interval, on_beat=self._beat)
        self.control_wake = control.ControlWakeup()
        self.control_listener = control.ControlListener(
            self.listen_dsn or self.dsn, f"{self.settings.application_name}-supervisor", self.engine_id,
            self.control_wake, relay=self._relay)
        # Enqueue wake-ups relayed to the workers: slot index -> write end of that worker's pipe.
        self._relays: dict[int, int] = {}
        self._relay_lock = threading.Lock()  # a write never meets a closed (and reused) descriptor
        self._relay_owed: set[int] = set()  # pipes that lost a flow-named wake-up (_relay)
        self._retiring: list[tuple[Slot, float]] = []  # scaled away: SIGTERMed, reaped without restart
        self._spare: dict[int, Slot] = {}  # slots scaled away, kept for their generation counters
        self._scale_acks: list[tuple[int, str]] = []  # scale-downs acknowledged once the retiring exit
        self._stop_now = False  # `engine stop`: the workers are killed, not drained
        self.hooks = HookRunner()
        self.vacuum = VacuumThread(self.dsn, f"{self.settings.application_name}-vacuum", engine.vacuum_dead_tuples,
                                   engine.vacuum_check_interval)
        self._unreported_lost: dict[str, str] = {}  # worker id -> reason, marked lost once the database answers
        port = self.metrics_port if self.metrics_port is not None else engine.metrics_port
        if port is not None:  # the pipe exists before the first fork, so every worker inherits it
            from engine.health import Thresholds
            from engine.metrics import EngineMetrics

            self.metrics = EngineMetrics(self.engine_id, self.dsn, self.settings.application_name,
                                         engine.metrics_host, port, Thresholds.from_engine(engine),
                                         engine.metrics_interval)
        self._stalled_listeners: set[tuple[int, Any]] = set()  # console backends seen blocked last pass
        self._unpin_failed = False
        self._pass_conn: psycopg.Connection[Any] | None = None  # _pass_db

    # -- database work on short-lived connections (never open across a fork) -----------------------

    def _db(self, action: Any, *, session: bool = False) -> Any:
        """session=True: work that holds a session advisory lock (the rescue leader) goes over the
        direct listen_dsn when there is one; a transaction pooler would hand the lock to strangers."""
        with self._connect((self.listen_dsn or self.dsn) if session else self.dsn) as conn:
            return action(conn)

    def _connect(self, dsn: str) -> psycopg.Connection[Any]:
        return db.connect(dsn, application_name=f"{self.settings.application_name}-supervisor")

    def _pass_db(self, action: Any) -> Any:
        """The schedule pass's connection (every second): kept between passes, as a connection each
        time costs the server about 3 ms of CPU; closed before each fork (_spawn) and after an error."""
        if self._pass_conn is None or self._pass_conn.closed:
            self._pass_conn = self._connect(self.dsn)
        try:
            return action(self._pass_conn)
        except BaseException:
            self._close_pass_conn()
            raise

    def _close_pass_conn(self) -> None:
        if self._pass_conn is not None:
            self._pass_conn.close()
            self._pass_conn = None

    # -- start ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        for flow in self.flows:
            load_flow(flow)  # import handlers now: a bad handler is a config error (exit 2), not a crash loop

        def sync(conn: psycopg.Connection[Any]) -> None:
            require_schema(conn)
            roles.require(conn, "run")  # one line now, not workers failing in a crash loop later
            store.flows_sync(conn, {flow.name: orjson.dumps(recorded_policy(flow)).decode() for flow in self.flows})
            schedules.sync_config(conn, (s.spec() for s in self.settings.schedules.values()))
            store.engine_register(conn, self.engine_id, os.uname().nodename, os.getpid(), __version__,
                                  self.workers, self.settings.engine.stale_after, [f.name for f in self.flows])

        # LISTEN through PgBouncer loses notifications: refuse at start (exit 2), in one line.
        def listen(conn: psycopg.Connection[Any]) -> None:
            db.listen(conn, control.CONTROL_CHANNEL)

        # On the kept connection: an empty --drain then opens one connection in all (see _stop).
        if self.listen_dsn in (None, self.dsn):
            self._pass_db(lambda conn: (sync(conn), listen(conn)))
        else:
            self._pass_db(sync)
            self._db(listen, session=True)

    def _spawn(self, slot: Slot) -> None:
        # Loaded by _supervise before the first fork (the workers inherit it), and only then: a --drain
        # that finds nothing to do at start never loads the workers' modules.
        from engine.worker import WorkerSpec, worker_main

        self._close_pass_conn()  # never open across a fork
        slot.generation += 1
        slot.worker_id = f"{os.uname().nodename}:{os.getpid()}:{self.engine_id[:8]}:{slot.index}.{slot.generation}"
        spec = WorkerSpec(slot.index, slot.worker_id, self.engine_id, self.dsn,
                          f"{self.settings.application_name}-worker", self.flows, self.settings.engine,
                          sources=self.settings.sources, report=self.report,
                          lease=self.liveness.lease(slot.index), listen_dsn=self.listen_dsn,
                          metrics=self.metrics.pipe if self.metrics is not None else None)
        relay_r, relay_w = os.pipe()
        os.set_blocking(relay_r, False)
        os.set_blocking(relay_w, False)
        spec = dataclasses.replace(spec, relay_fd=relay_r)
        self.report.busy(slot.index)
        process = self._context.Process(target=worker_main, args=(spec, self.settings.engine.log_format),
                                        name=f"skiplock-worker-{slot.index}", daemon=False)
        self.liveness.before_spawn(slot.index)
        # The child starts with the stop signals blocked (Worker.run unblocks them once its own handler
        # is in): one sent before then waits for that handler instead of running our _on_signal in it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(relay_r)
        with self._relay_lock:
            old = self._relays.pop(slot.index, None)
            self._relays[slot.index] = relay_w
        if old is not None:
            self._close_relay(old)
        self.liveness.spawned(slot.index, slot.worker_id, process.pid)
        slot.process = process
        slot.started_at = time.monotonic()

    # -- main loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped or drained; then the process ends here, without the interpreter's
        teardown (unloading psycopg's libpq alone takes 0.1-0.3 s, a third of a fast drain)."""
        code = self._supervise()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    def _supervise(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("engine starting", extra={"workers": self.workers, "flows": [f.name for f in self.flows],
                                                "pid": os.getpid(), "version": __version__})
        checked_at_start = self.drain and self.metrics is None  # a metrics port is opened (or refused) first
        if checked_at_start and self._drained_at_start():
            return self._stop(EXIT_OK)  # nothing forked, nothing to wait for
        importlib.import_module("engine.worker")  # now, not at the first fork: /healthz opens next
        self.liveness.start()
        if self.metrics is not None:
            try:
                port = self.metrics.start(self._live_workers)
            except OSError as exc:
                self.log.error("metrics port cannot be opened: %s", exc, extra={
                    "host": self.settings.engine.metrics_host, "port": self.metrics.port})
                self.liveness.stop()
                return EXIT_CONFIG
            self.log.info("metrics listening", extra={"host": self.settings.engine.metrics_host, "port": port})
        self.control_listener.start()
        self.vacuum.start()
        for slot in self.slots:
            self._spawn(slot)
        engine = self.settings.engine
        next_rescue = time.monotonic() + engine.rescue_interval
        next_drain_check = time.monotonic() + DRAIN_CHECK_INTERVAL
        next_retention = time.monotonic() + 5.0
        next_schedules = time.monotonic() + (schedules.PASS_INTERVAL if checked_at_start else 0.0)  # that ran one
        while not self.signals:
            sentinels: list[Any] = [s.process.sentinel for s in self._all_slots() if s.process is not None]
            # Until the next timed duty (the schedule pass bounds it to a second); exits, commands,
            # drain reports and signals (_on_signal) end the wait sooner.
            due = [next_rescue, next_schedules, next_retention, *self._timed_deadlines()]
            if self.drain:
                due.append(next_drain_check)
            multiprocessing.connection.wait(sentinels + [self.control_wake] + ([self.report] if self.drain else []),
                                            timeout=max(min(due) - time.monotonic(), 0.0))
            if self.signals:
                break  # workers exiting on our SIGTERM did not die: _stop reaps them, none is restarted
            now = time.monotonic()
            if self.metrics is not None:
                self.metrics.hub.loop_at = now
            crashed = self._reap(now)
            if crashed is not None:
                return self._stop(crashed)
            self._reap_retiring(now)
            self._restart_due(now)
            if self.control_wake.take():
                try:
                    leave = self._control_pass()
                except psycopg.Error as exc:
                    self.log.warning("could not run control commands (the heartbeat asks again): %s",
                                     describe_error(exc))
                    leave = None
                if leave is not None:
                    return self._stop(EXIT_OK)
            self.hooks.check(now)
            try:
                if now >= next_rescue:
                    next_rescue = now + engine.rescue_interval
                    if self._unreported_lost:
                        self._rescue_workers({})
                    self._rescue_pass()
                if now >= next_schedules:
                    next_schedules = now + schedules.PASS_INTERVAL
                    self._schedule_pass()
                if now >= next_retention:
                    next_retention = now + RETENTION_INTERVAL
                    self._retention_pass()
                # The workers' reports say when to look; the interval bounds the looks while jobs
                # wait for a later run_at (or a paused flow) with every worker idle. The deadline
                # moves on whenever it passes, busy or not: left in the past it made the wait above
                # return at once, and the loop spun a core for the whole drain.
                reported = self.drain and self.report.take()
                if self.drain and (reported or now >= next_drain_check):
                    next_drain_check = now + DRAIN_CHECK_INTERVAL
                    if self.report.all_idle([s.index for s in self.slots]) and self._db(self._drained):
                        return self._stop(EXIT_OK)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.log.warning("supervisor database call failed (will retry): %s", exc)
        return self._stop(EXIT_OK)

    def _live_workers(self) -> int:
        return sum(1 for s in self.slots if s.process is not None and s.process.exitcode is None)

    def _timed_deadlines(self) -> list[float]:
        """When the loop must turn for a slot: a dead worker's restart, a retiring one's kill."""
        return ([s.restart_at for s in self.slots if s.process is None]
                + [deadline for _, deadline in self._retiring])

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        self.control_wake.set()  # the loop's wait resumes after a handler (PEP 475): end it
        if self.signals == 1:
            self.log.info("stopping: %s received, draining workers (grace %.0fs)",
                          signal.Signals(signum).name, self.settings.engine.grace_period)
            for slot in self.slots:
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        else:
            self.log.warning("second signal: stopping now")
            for slot in self._all_slots():
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid, signal.SIGKILL)  # type: ignore[arg-type]

    def _reap(self, now: float) -> int | None:
        dead: list[tuple[Slot, int]] = []
        for slot in self.slots:
            if slot.process is not None and not slot.process.is_alive():
                slot.process.join()
                self.liveness.gone(slot.index)
                dead.append((slot, slot.process.exitcode if slot.process.exitcode is not None else -1))
        if not dead:
            return None
        lost = {slot.worker_id: exit_reason(code) for slot, code in dead}
        for slot, code in dead:
            lived = now - slot.started_at
            slot.early_deaths = 0 if lived >= HEALTHY_RUN_SECONDS else slot.early_deaths + 1
            delay = min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_BASE * 2 ** max(slot.early_deaths - 1, 0))
            slot.restart_at = now + delay
            slot.process = None
            self.log.error("worker died", extra={"worker": slot.worker_id, "exit_code": code,
                                                 "restart_in": round(delay, 2)})
            if slot.early_deaths >= CRASH_LOOP_LIMIT:
                self.log.critical("worker slot %d died %d times in a row; giving up", slot.index, slot.early_deaths)
                self._rescue_workers(lost)
                return EXIT_CRASH_LOOP
        self._rescue_workers(lost)
        return None

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is None and now >= slot.restart_at:
                self._spawn(slot)

    def _rescue_workers(self, reasons: dict[str, str]) -> None:
        """Workers we saw die (or killed): mark them lost and rescue their jobs now rather than after
        stale_after. If the database is unreachable they are remembered and marked once it answers."""
        self._unreported_lost.update(reasons)
        pending = dict(self._unreported_lost)

        def act(conn: psycopg.Connection[Any]) -> None:
            store.worker_mark_lost(conn, pending)
            for worker in pending:
                self._unreported_lost.pop(worker, None)
            events = [encode_event("worker_lost", engine=self.engine_id, worker=w, reason=reason)
                      for w, reason in pending.items()]
            self._rescue_and_report(conn, events)

        try:
            self._db(act)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.log.warning("could not rescue jobs of dead workers now (will retry): %s", exc)

    def _rescue_pass(self) -> None:
        def act(conn: psycopg.Connection[Any]) -> None:
            if not store.rescue_leader(conn):
                return
            try:
                self._rescue_and_report(conn)
            finally:
                store.rescue_leader_release(conn)
            self._fire_orphaned_run_hooks(conn)
            self._unpin_notify_queue(conn)

        self._db(act, session=True)

    def _unpin_notify_queue(self, conn: psycopg.Connection[Any]) -> None:
        """A console that stops reading its LISTEN connection pins PostgreSQL's NOTIFY queue for every
        channel (issue 10 item 8): end its backends once they have been blocked writing to it for a
        whole rescue interval (seen on two passes in a row)."""
        try:
            seen = store.stalled_listeners(conn, CONSOLE_APPLICATION_NAME)
            blocked = seen & self._stalled_listeners
            self._stalled_listeners = seen - blocked
            if blocked:
                ended = store.stalled_listeners_terminate(conn, blocked)
                self.log.warning("ended console connections that stopped reading (they pin the NOTIFY queue)",
                                 extra={"backends": sorted(pid for pid, _ in blocked), "ended": ended})
        except psycopg.Error as exc:  # e.g. a role that may not signal the console's backends
            if not self._unpin_failed:  # once: it would fail the same way every pass
                self.log.warning("could not end stalled console connections: %s", describe_error(exc))
            self._unpin_failed = True

    def _schedule_pass(self, conn: psycopg.Connection[Any] | None = None) -> None:
        """Fire due schedule ticks when this engine holds the schedule leader lock (engine/schedules.py)."""
        def bad(name: str, exc: Exception) -> None:
            self.log.error("schedule cannot be evaluated", extra={"schedule": name, "error": str(exc)})

        def run(c: psycopg.Connection[Any]) -> Any:
            return schedules.run_pass(c, self.settings.engine.stale_after, bad)

        result = self._pass_db(run) if conn is None else run(conn)
        if result.skipped:  # downtime: say what catch_up dropped (fires alone are in the jobs table)
            self.log.info("schedule ticks missed", extra={"fired": result.fired, "skipped": result.skipped})

    def _rescue_and_report(self, conn: psycopg.Connection[Any], events: list[str] | None = None) -> None:
        """The rescue commits first (store.rescue: its own short transactions); the stats, the
        notifications and the log come after it, each on its own, so none can undo it."""
        result = store.rescue(conn, self.settings.engine.stale_after)
        events = list(events or [])
        flows = {flow: {"rescued": result.rescued_by_flow.get(flow, 0), "dead": result.dead_by_flow.get(flow, 0)}
                 for flow in set(result.rescued_by_flow) | set(result.dead_by_flow)}
        events += [encode_event("worker_lost", engine=self.engine_id, worker=w, reason="heartbeat stale")
                   for w in result.lost_workers]
        if self.metrics is not None and result.rescued_by_flow:
            self.metrics.hub.add_rescued(result.rescued_by_flow)
        if flows:
            events.append(encode_event("rescued", engine=self.engine_id, flows=flows, workers=result.lost_workers))
            self._after_rescue("stats", lambda: store.stats_upsert(
                conn, {flow: FlowCounts(dead=v["dead"], rescued=v["rescued"]) for flow, v in flows.items()}))
        if events:
            self._after_rescue("notify", lambda: store.events_notify(conn, events))
        if result.lost_workers or result.rescued or result.dead:
            self.log.warning("rescued jobs", extra={"rescued": result.rescued, "dead": result.dead,
                                                    "lost_workers": result.lost_workers})

    def _after_rescue(self, what: str, action: Any) -> None:
        try:
            action()
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the connection is gone: the caller's retry handles it
        except psycopg.Error as exc:
            self.log.error("rescue committed, but its %s write failed: %s", what, describe_error(exc))

    def _fire_orphaned_run_hooks(self, conn: psycopg.Connection[Any]) -> None:
        served = {f.name: f for f in self.flows if f.on_complete}
        if not served:
            return
        for summary in store.runs_claim_orphaned_hooks(conn, list(served)):
            hook = load_flow(served[summary.flow]).on_complete
            if hook is not None:
                self.hooks.submit(f"on_complete hook of run {summary.run}", hook, summary.run, summary.as_dict())

    def _retention_pass(self) -> None:
        from engine.queue import Queue  # off the start-up path (an empty --drain exits before the first pass)

        def act(conn: psycopg.Connection[Any]) -> None:
            purged = Queue(conn=conn, check_schema=False).purge_completed(self.settings.engine.retention)
            if purged:
                self.log.info("purged completed jobs past retention", extra={"purged": purged})
            counts = retention_pass(conn, self.settings.engine)
            counts["engines"] = store.purge_engines(conn, self.settings.engine.worker_retention, RETENTION_SLICE)
            if any(counts.values()):
                self.log.info("purged history past retention", extra=counts)

        self._db(act)

    def _drained_at_start(self) -> bool:
        """--drain, before any fork: the schedule pass (due ticks enqueue jobs), then the drain check,
        on one connection. Drained already: the engine stops without starting a worker."""
        def act(conn: psycopg.Connection[Any]) -> bool:
            self._schedule_pass(conn)
            return self._drained(conn)

        try:
            return bool(self._pass_db(act))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.log.warning("supervisor database call failed (will retry): %s", exc)
            return False  # the loop below retries, as for any drain check

    def _drained(self, conn: psycopg.Connection[Any]) -> bool:
        """--drain: nothing due and nothing running (--wait-scheduled: nothing pending at all); if so,
        the log says so, with what is left for later."""
        names = [f.name for f in self.flows]
        remaining = store.drain_remaining if self.wait_scheduled else store.drain_due
        if remaining(conn, names):
            return False
        self._report_drained(conn, names)
        return True

    def _report_drained(self, conn: psycopg.Connection[Any], names: list[str]) -> None:
        if self.wait_scheduled:
            self.log.info("drain complete: nothing pending or running")
            return
        later = store.drain_scheduled(conn, names)
        if not later:
            self.log.info("drain complete: nothing due or running, nothing scheduled for later")
            return
        total = sum(s.jobs for s in later)
        first = min(s.next_run_at for s in later)
        self.log.info("drain complete: nothing due or running; %d job(s) scheduled for later, the first at %s "
                      "(--wait-scheduled waits for them)", total, first.isoformat(timespec="seconds"),
                      extra={"scheduled": {s.flow: s.jobs for s in later},
                             "next_run_at": first.isoformat(timespec="seconds")})

    # -- stop ----------------------------------------------------------------------------------------

    def _stop(self, code: int) -> int:
        self.vacuum.stop()
        # Workers frozen through an outage cannot be resumed safely (nobody renewed them): kill them.
        frozen = set(self.liveness.frozen_pids())
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)
        slots = self._all_slots()
        # After a signal too: _on_signal may have run while a worker was being forked, before its slot
        # held the process, and missed it. A worker told twice stops once.
        if self.signals < 2:
            for slot in slots:
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid,  # type: ignore[arg-type]
                            signal.SIGKILL if self._stop_now else signal.SIGTERM)
        deadline = time.monotonic() + self.settings.engine.grace_period
        for slot in slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
        reasons: dict[str, str] = {}
        for slot in slots:
            if slot.process is None:
                continue
            if self._stop_now and slot.process.exitcode == -signal.SIGKILL:
                reasons[slot.worker_id] = "killed by `engine stop`"
            elif slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
                reasons[slot.worker_id] = "killed after grace period"
            elif slot.process.exitcode != 0:
                # Killed by a second signal or frozen, or it died while stopping: its jobs must not
                # stay running until another engine rescues them.
                reasons[slot.worker_id] = ("killed by a second signal" if self.signals >= 2 and slot.process.exitcode == -signal.SIGKILL
                                           else "killed while frozen" if slot.process.pid in frozen
                                           else exit_reason(slot.process.exitcode))
        self.liveness.stop()
        killed = [w for w, reason in reasons.items() if reason == "killed after grace period"]
        if killed:
            self.log.warning("workers did not stop within the grace period; killed", extra={"workers": killed})
            if code == EXIT_OK:
                code = EXIT_KILLED
        if reasons:
            self._rescue_workers(reasons)
        if self.signals >= 2:
            code = EXIT_FORCED
        if self.metrics is not None:
            self.metrics.stop()
        self.control_listener.stop()
        self._record_stop(code)
        self.log.info("engine stopped", extra={"exit_code": code})
        return code

    def _record_stop(self, code: int) -> None:
        record = lambda conn: store.engine_stopped(conn, self.engine_id, code)  # noqa: E731
        kept = self._pass_conn is not None and not self._pass_conn.closed
        try:
            try:
                self._pass_db(record)  # the kept connection when one is open: a fast drain opens no other
            except psycopg.Error:
                if not kept:
                    raise
                self._pass_db(record)  # on a new one: the kept one may have died with a server restart
        except psycopg.Error as exc:  # the row goes stale and reads as gone
            self.log.warning("could not record the engine's stop: %s", describe_error(exc))
        finally:
            self._close_pass_conn()

    # -- control plane (engine/control.py) -------------------------------------------------------------

    def _relay(self, record: bytes) -> None:
        """On the listener thread: a record to every worker (a full pipe already says "look"; a cancel
        lost to a full pipe is still found by the worker's once-a-second re-read). A flow-named record
        lost to a full pipe is owed: the next write to that pipe says "look at every flow" first."""
        with self._relay_lock:
            for fd in self._relays.values():
                owed = fd in self._relay_owed
                try:
                    os.write(fd, RELAY_ENQUEUED + record if owed else record)
                except OSError:  # BlockingIOError: already woken; EPIPE: that worker is gone
                    if record[:1] == RELAY_FLOW:
                        self._relay_owed.add(fd)
                else:
                    if owed:
                        self._relay_owed.discard(fd)

    def _close_relay(self, fd: int) -> None:
        with self._relay_lock:
            self._relay_owed.discard(fd)
            os.close(fd)

    def _all_slots(self) -> list[Slot]:
        return self.slots + [slot for slot, _ in self._retiring]

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        """On the heartbeat thread: the engine's row, and a look for commands (a missed NOTIFY)."""
        if store.engine_heartbeat(conn, self.engine_id, len(self.slots)):
            self.control_wake.set()

    def _control_pass(self) -> str | None:
        """Run this engine's pending commands in order and acknowledge each; returns "drain" or
        "stop" when the engine must leave now."""
        commands = self._db(lambda conn: store.engine_commands_pending(conn, self.engine_id))
        leave: str | None = None
        waiting = {cid for cid, _ in self._scale_acks}
        for command in commands:
            if command.id in waiting:
                continue  # a scale-down still under way: acknowledged when its workers have exited
            if leave is not None:
                ok, outcome = False, f"refused: the engine is already {'draining' if leave == 'drain' else 'stopping'}"
            elif command.command == "scale":
                ok, outcome = self._scale(command.id, int(command.workers or 0))
                if outcome is None:
                    continue  # acknowledged when the retiring workers have exited
            else:
                leave = command.command
                state = "draining" if leave == "drain" else "stopping"
                ok = True
                busy = len(self.slots) + len(self._retiring)
                outcome = (f"draining: {busy} worker(s) finish the jobs they hold (grace "
                           f"{self.settings.engine.grace_period:g}s), then the engine exits 0" if leave == "drain"
                           else f"stopping: {busy} worker(s) killed now, their jobs go back to pending; the "
                                "engine exits 0")
                self._db(lambda conn, state=state: store.engine_set_state(conn, self.engine_id, state))
            self.log.info("control command", extra={"command": command.command, "workers": command.workers,
                                                    "ok": ok, "outcome": outcome})
            workers = len(self.slots) if command.command == "scale" and ok else None
            self._db(lambda conn, c=command, o=ok, t=outcome, n=workers: store.engine_command_ack(conn, c.id, o, t, n))
        if leave == "stop":
            self._stop_now = True
        return leave

    def _scale(self, command_id: int, workers: int) -> tuple[bool, str | None]:
        """Fork or retire workers through the usual paths: _spawn (lease, idle report) and SIGTERM (the
        worker drains its batch, is reaped, and rescued if it did not exit cleanly)."""
        if not 1 <= workers <= MAX_WORKERS:
            return False, f"refused: workers {workers} must be from 1 to {MAX_WORKERS}"
        before = len(self.slots)
        if workers == before:
            return True, f"already {before} worker(s)"
        if workers > before:
            used = {slot.index for slot in self._all_slots()}
            free = (i for i in range(MAX_WORKERS) if i not in used)
            for index in itertools.islice(free, workers - before):
                slot = self._spare.pop(index, None) or Slot(index)
                slot.early_deaths = 0
                self.slots.append(slot)
                self._spawn(slot)
            self.slots.sort(key=lambda s: s.index)
            return True, f"scaled from {before} to {workers} worker(s)"
        deadline = time.monotonic() + self.settings.engine.grace_period
        for slot in self.slots[workers:]:
            if slot.process is not None and slot.process.is_alive():
                os.kill(slot.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
            self._retiring.append((slot, deadline))
        del self.slots[workers:]
        self._scale_acks.append((command_id, f"scaled from {before} to {workers} worker(s)"))
        self._ack_scaled()
        return True, None

    def _reap_retiring(self, now: float) -> None:
        if not self._retiring:
            self._ack_scaled()  # a scale-down whose acknowledgement failed earlier
            return
        left: list[tuple[Slot, float]] = []
        lost: dict[str, str] = {}
        for slot, deadline in self._retiring:
            process = slot.process
            if process is not None and process.is_alive():
                if now >= deadline:
                    process.kill()  # reaped on a later pass, rescued then
                left.append((slot, deadline))
                continue
            if process is not None:
                process.join()
                self.liveness.gone(slot.index)
                if process.exitcode != 0:
                    lost[slot.worker_id] = (f"exited with code {process.exitcode}" if now < deadline
                                            else "killed after grace period")
            slot.process = None
            self._spare[slot.index] = slot
            with self._relay_lock:
                fd = self._relays.pop(slot.index, None)
            if fd is not None:
                self._close_relay(fd)
        self._retiring = left
        if lost:
            self._rescue_workers(lost)
        self._ack_scaled()

    def _ack_scaled(self) -> None:
        if self._retiring or not self._scale_acks:
            return
        acks, self._scale_acks = self._scale_acks, []
        try:
            workers = len(self.slots)
            self._db(lambda conn: [store.engine_command_ack(conn, cid, True, text, workers) for cid, text in acks])
        except (psycopg.OperationalError, psycopg.InterfaceError):
            self._scale_acks = acks + self._scale_acks  # acknowledged on a later pass


_BUILTIN_HINT: Final = (f"the built-in demo flows ({', '.join(BUILTIN_FLOW_NAMES)}) are served by `engine dev`, "
                        "or where the config names them ([flows.noop])")

RETENTION_SLICE: Final = 10_000


def exit_reason(code: int | None) -> str:
    """What a worker's exit code says, for its lost_reason and so its jobs' errors."""
    if code is not None and code < 0:
        try:
            return f"exited with signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with signal {-code}"
    return f"exited with code {code}"


def retention_pass(conn: psycopg.Connection[Any], engine: EngineConfig) -> dict[str, int]:
    """Delete old workers, runs, per-minute history and receipts, each in bounded slices (autocommit:
    one short transaction per slice). Returns how many rows of each went."""
    def slices(purge: Any) -> int:
        total = 0
        while True:
            deleted = purge()
            total += deleted
            if deleted < RETENTION_SLICE:
                return total

    return {
        "workers": slices(lambda: store.purge_workers(conn, engine.worker_retention, RETENTION_SLICE)),
        "runs": slices(lambda: store.purge_runs(conn, engine.retention, RETENTION_SLICE)),
        "stats": slices(lambda: store.purge_stats(conn, engine.stats_retention, RETENTION_SLICE)),
        "receipts": slices(lambda: store.purge_receipts(conn, RETENTION_SLICE)),
    }


def select_flows(settings: Settings, names: str | None) -> tuple[FlowConfig, ...]:
    if not names:
        if not settings.flows:
            where = f"in {settings.path}" if settings.path else "(no config file: pass --config or set SKIPLOCK_CONFIG)"
            raise ConfigError(f"no flows configured {where}; add [flows.NAME] with handler = \"module:function\"")
        return tuple(settings.flows.values())
    chosen: list[FlowConfig] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        validate_flow(name)
        if name not in settings.flows:
            known = ", ".join(sorted(settings.flows)) or "none"
            hint = f"; {_BUILTIN_HINT}" if name in BUILTIN_FLOW_NAMES else ""
            raise ConfigError(f"--flows: flow {name!r} is not configured (known: {known}){hint}")
        chosen.append(settings.flows[name])
    if not chosen:
        raise ConfigError("--flows: no flow named")
    return tuple(chosen)


@dataclass(frozen=True)
class EngineOptions:
    """What `engine run` takes besides the settings (None: the config's value)."""

    workers: int | None = None
    flows: str | None = None  # comma-separated names, as --flows; None: every configured flow
    drain: bool = False
    wait_scheduled: bool = False  # with drain: jobs scheduled for later (delays, retry backoff) hold it too
    metrics_port: int | None = None  # --metrics-port (None: the config's metrics_port)


def run_engine(settings: Settings, options: EngineOptions) -> int:
    setup_logging(settings.engine.log_format)
    workers = options.workers if options.workers is not None else settings.engine.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be at least 1 and at most {MAX_WORKERS}, got {workers}")
    if options.wait_scheduled and not options.drain:
        raise ConfigError("--wait-scheduled goes with --drain")
    if options.metrics_port is not None and not 0 <= options.metrics_port <= MAX_PORT:
        raise ConfigError(f"--metrics-port must be from 0 to {MAX_PORT}, got {options.metrics_port}")
    flows = select_flows(settings, options.flows)  # after the option checks: they name what the user typed
    supervisor = Supervisor(settings, resolve_dsn(settings), flows, workers, drain=options.drain,
                            wait_scheduled=options.wait_scheduled, metrics_port=options.metrics_port,
                            listen_dsn=settings.listen_dsn)
    try:
        supervisor.prepare()
    except psycopg.OperationalError as exc:
        raise SkiplockError(f"database unreachable: {describe_error(exc)}") from None
    return supervisor.run()

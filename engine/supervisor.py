"""`engine run`: the supervisor of a pool of forked worker processes.

Start method: fork. Workers start in milliseconds and inherit the handler modules the supervisor
imported (and checked) at start-up. Forking is safe here because the supervisor holds no database
connection, pool or thread when it forks: its own database work (rescue, drain checks) opens a
short-lived connection and closes it before the loop goes on. Each worker opens its own pool after
the fork.

The supervisor restarts workers that die (with exponential backoff per slot, so a crash loop cannot
spin), rescues a dead worker's jobs at once, runs the fleet-wide rescue of stale heartbeats when it
holds the leader lock, and stops gracefully on SIGTERM/SIGINT.

Exit codes: 0 stopped cleanly, or --drain found nothing left; 2 bad configuration, or the database
unreachable or outdated at start; 3 a second signal forced the stop; 4 workers kept crashing.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import psycopg

from engine import db, schedules, store
from engine.config import FlowConfig, Settings, recorded_policy, resolve_dsn
from engine.errors import ConfigError, SkiplockError
from engine.handlers import load_flow
from engine.logs import ContextLogger, setup_logging
from engine.migrate import require_schema
from engine.queue import Queue, new_engine_id, validate_flow
from engine.redact import describe_error
from engine.runs import fire_run_hooks
from engine.telemetry import FlowCounts, encode_event
from engine.worker import WorkerSpec, worker_main

log = logging.getLogger("skiplock.engine")

EXIT_OK: Final = 0
EXIT_FORCED: Final = 3
EXIT_CRASH_LOOP: Final = 4

RESTART_BACKOFF_BASE: Final = 0.5
RESTART_BACKOFF_CAP: Final = 30.0
HEALTHY_RUN_SECONDS: Final = 30.0  # a worker that lived this long resets its slot's backoff
CRASH_LOOP_LIMIT: Final = 10  # consecutive early deaths of one slot before the engine gives up
DRAIN_CHECK_INTERVAL: Final = 0.5
RETENTION_INTERVAL: Final = 600.0


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
    engine_id: str = field(default_factory=new_engine_id)
    slots: list[Slot] = field(default_factory=list)
    signals: int = 0
    _context: Any = None

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("fork")
        self.slots = [Slot(i) for i in range(self.workers)]
        self.log = ContextLogger(log, {"engine": self.engine_id})

    # -- database work on short-lived connections (never open across a fork) -----------------------

    def _db(self, action: Any) -> Any:
        with db.connect(self.dsn, application_name=f"{self.settings.application_name}-supervisor") as conn:
            return action(conn)

    # -- start ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        for flow in self.flows:
            load_flow(flow)  # import handlers now: a bad handler is a config error (exit 2), not a crash loop

        def sync(conn: psycopg.Connection[Any]) -> None:
            require_schema(conn)
            store.flows_sync(conn, {flow.name: orjson.dumps(recorded_policy(flow)).decode() for flow in self.flows})
            schedules.sync_config(conn, (s.spec() for s in self.settings.schedules.values()))

        self._db(sync)

    def _spawn(self, slot: Slot) -> None:
        slot.generation += 1
        slot.worker_id = f"{os.uname().nodename}:{os.getpid()}:{self.engine_id[:8]}:{slot.index}.{slot.generation}"
        spec = WorkerSpec(slot.index, slot.worker_id, self.engine_id, self.dsn,
                          f"{self.settings.application_name}-worker", self.flows, self.settings.engine,
                          sources=self.settings.sources)
        process = self._context.Process(target=worker_main, args=(spec, self.settings.engine.log_format),
                                        name=f"skiplock-worker-{slot.index}", daemon=False)
        process.start()
        slot.process = process
        slot.started_at = time.monotonic()

    # -- main loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("engine starting", extra={"workers": self.workers, "flows": [f.name for f in self.flows],
                                                "pid": os.getpid()})
        for slot in self.slots:
            self._spawn(slot)
        engine = self.settings.engine
        next_rescue = time.monotonic() + engine.rescue_interval
        next_drain_check = time.monotonic() + DRAIN_CHECK_INTERVAL
        next_retention = time.monotonic() + 5.0
        next_schedules = time.monotonic()
        while not self.signals:
            sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            if self.signals:
                break  # workers exiting on our SIGTERM did not die: _stop reaps them, none is restarted
            now = time.monotonic()
            crashed = self._reap(now)
            if crashed is not None:
                return self._stop(crashed)
            self._restart_due(now)
            try:
                if now >= next_rescue:
                    next_rescue = now + engine.rescue_interval
                    self._rescue_pass()
                if now >= next_schedules:
                    next_schedules = now + schedules.PASS_INTERVAL
                    self._schedule_pass()
                if now >= next_retention:
                    next_retention = now + RETENTION_INTERVAL
                    self._retention_pass()
                if self.drain and now >= next_drain_check:
                    next_drain_check = now + DRAIN_CHECK_INTERVAL
                    if self._drained():
                        self.log.info("drain complete: nothing pending or running")
                        return self._stop(EXIT_OK)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.log.warning("supervisor database call failed (will retry): %s", exc)
        return self._stop(EXIT_OK)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.signals == 1:
            self.log.info("stopping: %s received, draining workers (grace %.0fs)",
                          signal.Signals(signum).name, self.settings.engine.grace_period)
            for slot in self.slots:
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        else:
            self.log.warning("second signal: stopping now")
            for slot in self.slots:
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid, signal.SIGKILL)  # type: ignore[arg-type]

    def _reap(self, now: float) -> int | None:
        dead: list[tuple[Slot, int]] = []
        for slot in self.slots:
            if slot.process is not None and not slot.process.is_alive():
                slot.process.join()
                dead.append((slot, slot.process.exitcode if slot.process.exitcode is not None else -1))
        if not dead:
            return None
        lost = [slot.worker_id for slot, _ in dead]
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
        self._rescue_workers(lost, codes={slot.worker_id: code for slot, code in dead})
        return None

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is None and now >= slot.restart_at:
                self._spawn(slot)

    def _rescue_workers(self, worker_ids: list[str], codes: dict[str, int] | None = None) -> None:
        """Workers we saw die: mark them lost and rescue their jobs now rather than after stale_after."""
        def act(conn: psycopg.Connection[Any]) -> None:
            store.worker_mark_lost(conn, worker_ids)
            events = [encode_event("worker_lost", engine=self.engine_id, worker=w,
                                   reason=f"process exited with code {(codes or {}).get(w, '?')}")
                      for w in worker_ids]
            store.events_notify(conn, events)
            self._rescue_and_report(conn)

        try:
            self._db(act)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.log.warning("could not rescue jobs of dead workers now (rescue pass will): %s", exc)

    def _rescue_pass(self) -> None:
        def act(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                if not store.rescue_leader(conn):
                    return
                self._rescue_and_report(conn)
                self._fire_orphaned_run_hooks(conn)

        self._db(act)

    def _schedule_pass(self) -> None:
        """Fire due schedule ticks when this engine holds the schedule leader lock (engine/schedules.py)."""
        def bad(name: str, exc: Exception) -> None:
            self.log.error("schedule cannot be evaluated", extra={"schedule": name, "error": str(exc)})

        result = self._db(lambda conn: schedules.run_pass(conn, self.settings.engine.stale_after, bad))
        if result.skipped:  # downtime: say what catch_up dropped (fires alone are in the jobs table)
            self.log.info("schedule ticks missed", extra={"fired": result.fired, "skipped": result.skipped})

    def _rescue_and_report(self, conn: psycopg.Connection[Any]) -> None:
        result = store.rescue(conn, self.settings.engine.stale_after)
        if not (result.lost_workers or result.rescued or result.dead):
            return
        flows = {flow: {"rescued": result.rescued_by_flow.get(flow, 0), "dead": result.dead_by_flow.get(flow, 0)}
                 for flow in set(result.rescued_by_flow) | set(result.dead_by_flow)}
        events = [encode_event("worker_lost", engine=self.engine_id, worker=w, reason="heartbeat stale")
                  for w in result.lost_workers]
        if flows:
            events.append(encode_event("rescued", engine=self.engine_id, flows=flows, workers=result.lost_workers))
            store.stats_upsert(conn, {flow: FlowCounts(dead=v["dead"], rescued=v["rescued"])
                                      for flow, v in flows.items()})
        store.events_notify(conn, events)
        self.log.warning("rescued jobs", extra={"rescued": result.rescued, "dead": result.dead,
                                                "lost_workers": result.lost_workers})

    def _fire_orphaned_run_hooks(self, conn: psycopg.Connection[Any]) -> None:
        hooked = [f for f in self.flows if f.on_complete]
        if not hooked:
            return
        run_ids = store.runs_unfired(conn)
        if run_ids:
            fire_run_hooks(conn, run_ids, {f.name: load_flow(f).on_complete for f in hooked}, self.log)

    def _retention_pass(self) -> None:
        def act(conn: psycopg.Connection[Any]) -> None:
            purged = Queue(conn=conn, check_schema=False).purge_completed(self.settings.engine.retention)
            if purged:
                self.log.info("purged completed jobs past retention", extra={"purged": purged})

        self._db(act)

    def _drained(self) -> bool:
        names = [f.name for f in self.flows]
        return not self._db(lambda conn: store.drain_remaining(conn, names))

    # -- stop ----------------------------------------------------------------------------------------

    def _stop(self, code: int) -> int:
        if not self.signals:
            for slot in self.slots:
                if slot.process is not None and slot.process.is_alive():
                    os.kill(slot.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.settings.engine.grace_period
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
        killed = []
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
                killed.append(slot.worker_id)
        if killed:
            self.log.warning("workers did not stop within the grace period; killed", extra={"workers": killed})
            self._rescue_workers(killed)
        if self.signals >= 2:
            code = EXIT_FORCED
        self.log.info("engine stopped", extra={"exit_code": code})
        return code


def select_flows(settings: Settings, names: str | None) -> tuple[FlowConfig, ...]:
    if not names:
        return tuple(settings.flows.values())
    chosen: list[FlowConfig] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        validate_flow(name)
        if name not in settings.flows:
            raise ConfigError(f"--flows: flow {name!r} is not configured (known: {', '.join(sorted(settings.flows))})")
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


def run_engine(settings: Settings, options: EngineOptions) -> int:
    setup_logging(settings.engine.log_format)
    flows = select_flows(settings, options.flows)
    workers = options.workers if options.workers is not None else settings.engine.workers
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    supervisor = Supervisor(settings, resolve_dsn(settings), flows, workers, drain=options.drain)
    try:
        supervisor.prepare()
    except psycopg.OperationalError as exc:
        raise SkiplockError(f"database unreachable: {describe_error(exc)}") from None
    return supervisor.run()

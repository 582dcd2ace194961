"""The worker's two background threads.

- Telemetry: every tick_interval it sends the tick (NOTIFY + stats upsert; nothing when nothing
  happened since the last one) and refreshes the flows' circuit states; every heartbeat_interval it
  reports the worker's state, counters and pool. A worker the database marks lost stops. Liveness
  (heartbeat_at) is the supervisor's: engine/liveness.py, whose WorkerGuard (started in process.py)
  stops this process when nobody can prove it alive.
- Monitor: every MONITOR_INTERVAL it asks each executor to check its jobs against their deadlines
  (inline: release the unstarted rest of a batch held too long, stop a handler that ignored its
  timeout; threads: fail and abandon a thread past its job's deadline). It never touches the database
  unless it acts, and it sleeps while the worker is idle (holding no job): `wake` when it turns busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from engine import store
from engine.metrics import send_worker_metrics
from engine.telemetry import tick_events

MONITOR_INTERVAL: Final = 0.05


class TelemetryThread:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._tick_lock = threading.Lock()  # the last tick (at shutdown) waits for one being sent

    def start(self) -> None:
        self._thread.start()

    def final_tick(self) -> None:
        with self._tick_lock:
            self._send_tick()
        send_worker_metrics(self.worker)

    def _loop(self) -> None:
        w = self.worker
        engine = w.spec.engine
        next_heartbeat = 0.0
        while not w.closing:
            time.sleep(engine.tick_interval)
            if w.closing:
                return
            now = time.monotonic()
            try:
                with self._tick_lock:
                    if w.closing:
                        return
                    self._send_tick()
            except Exception as exc:  # keep ticking through outages and failing writes
                w.log.warning("telemetry tick failed: %s", exc)
            try:
                send_worker_metrics(w)  # to the supervisor's pipe: no database involved
            except Exception as exc:
                w.log.warning("metrics report failed: %s", exc)
            if now >= next_heartbeat:
                next_heartbeat = now + engine.heartbeat_interval
                try:
                    self.heartbeat()
                except Exception as exc:
                    w.log.warning("worker report failed: %s", exc)

    def _send_tick(self) -> None:
        w = self.worker
        buffer = w.telemetry.take()
        w.failure_log.flush()
        quiet = not (buffer.flows or buffer.failures or buffer.dead)
        guarded = w.circuit.guards(w.flows)
        if quiet and not guarded:
            return  # nothing happened and no circuit to read: an idle worker costs the database nothing
        with w.pool.connection(timeout=5) as conn:
            if not quiet:
                with conn.transaction():
                    store.events_notify(conn, tick_events(buffer, w.spec.engine_id, w.id))
                    store.stats_upsert(conn, buffer.flows)
            w.circuit.refresh(guarded, conn)

    def heartbeat(self) -> None:
        w = self.worker
        stats = w.pool.get_stats()
        pool = {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
                "max": w.pool.max_size, "waiting": stats.get("requests_waiting", 0)}
        totals = w.telemetry.totals
        counters = {"completed": totals.completed, "failed": totals.failed, "dead": totals.dead}
        with w.pool.connection(timeout=5) as conn:
            alive = store.worker_report(conn, w.id, "draining" if w.stopping else w.state,
                                           orjson.dumps(counters).decode(), orjson.dumps(pool).decode())
        if not alive and not w.stopping:
            # Our claims were rescued and our acks are refused; claims under this id are refused too.
            # Stop before the next job and exit, so the supervisor starts a replacement.
            w.log.warning("this worker was marked lost; its claims were rescued and its acks will be "
                          "refused; exiting so that a new worker replaces it")
            w.lost = True
            w.request_stop()


class Monitor:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.checks: list[Callable[[float], None]] = []
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)

    def wake(self) -> None:
        """The worker turned busy (after setting its state): check its jobs again."""
        self._busy.set()

    def start(self) -> None:
        if self.checks:
            self._thread.start()

    def _loop(self) -> None:
        w = self.worker
        while not w.closing:
            self._busy.clear()  # before reading the state: a busy() after this read sets it again
            if w.state == "idle":
                self._busy.wait()
                continue
            time.sleep(MONITOR_INTERVAL)
            now = time.monotonic()
            for check in self.checks:
                try:
                    check(now)
                except Exception as exc:
                    w.log.warning("monitor check failed: %s", exc)

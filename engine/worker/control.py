"""Job control inside a worker: operators' cancel requests for the jobs it runs, and the progress its
handlers report. One thread, woken by a `skiplock_cancel` notification (the listener thread) and
every CHECK_INTERVAL while the worker holds jobs, so a missed notification costs at most that long.

Each pass:
- writes the progress reports made since the last pass in one statement (the latest per job), so a
  job writes at most one report per pass, and nothing is written while nobody reports;
- reads which of this worker's running jobs have a cancel request (one bounded statement,
  jobs_cancel_requested), tells the executor holding each (an asyncio task is cancelled; every
  handler's `ctx.cancelled` reads `requests`), and once the flow's `cancel_grace` has passed asks the
  executor to stop waiting (its timeout abandonment) and end the job cancelled.

Executors look a job up in `requests` when it starts and when it ends (`if requests and id in
requests`: an empty dict while no cancel is pending, so nothing runs per job on the hot path). A job
in `requests` ends cancelled, whatever its handler did after the request (returned, raised, snoozed).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

from engine import store
from engine.redact import redact_text

CHECK_INTERVAL: Final = 1.0  # seconds between cancel checks and progress writes while jobs are held


class CancelRequest:
    __slots__ = ("token", "seen", "executor", "forced")

    def __init__(self, token: int, seen: float) -> None:
        self.token = token
        self.seen = seen  # monotonic time this worker learned of it: cancel_grace counts from here
        self.executor: Any = None  # the executor that said it holds the job
        self.forced = False


class Control:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.requests: dict[int, CancelRequest] = {}  # replaced whole by each check, never mutated
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._news: dict[int, tuple[int, float, str | None]] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A cancel notification arrived: check now."""
        self._event.set()

    def is_requested(self, job_id: int) -> bool:
        """`ctx.cancelled` of the worker's handlers."""
        requests = self.requests
        return bool(requests) and job_id in requests

    def report(self, job_id: int, token: int, fraction: float, message: str | None) -> None:
        """`ctx.progress`: keep the latest report per job until the next pass writes it."""
        with self._lock:
            self._news[job_id] = (token, fraction, message)

    # -- the thread ---------------------------------------------------------------------------------

    def _holds_jobs(self) -> bool:
        w = self.worker
        return w.inline is not None or any(e.concurrent and e.in_hand for e in w.executors)

    def _run(self) -> None:
        w = self.worker
        wait = CHECK_INTERVAL
        while not w.closing:
            self._event.wait(wait)
            self._event.clear()
            if w.closing:
                return
            try:
                self._write_progress()
                if self._holds_jobs() or self.requests:
                    self._check()
                wait = self._enforce()
            except w.transient_errors as exc:
                if w.closing:
                    return  # the pool closed under us on the way out
                w.log.warning("cancel check / progress write failed (tried again in %.0fs): %s", CHECK_INTERVAL, exc)
                wait = CHECK_INTERVAL
            except Exception as exc:  # never let job control take the worker down
                if w.closing:
                    return
                w.log.error("job control pass failed: %s", exc)
                wait = CHECK_INTERVAL

    def _write_progress(self) -> None:
        if not self._news:
            return
        with self._lock:
            news, self._news = self._news, {}
        w = self.worker
        clean = {job_id: (token, fraction, redact_text(message) if message else message)
                 for job_id, (token, fraction, message) in news.items()}
        w.with_db("progress", lambda conn: store.jobs_progress_set(conn, w.id, clean), quick=True)

    def _check(self) -> None:
        w = self.worker
        found = w.with_db("cancel check", lambda conn: store.jobs_cancel_requested(conn, w.id), quick=True)
        now = time.monotonic()
        old = self.requests
        new: dict[int, CancelRequest] = {}
        for job_id, token in found:
            request = old.get(job_id)
            new[job_id] = request if request is not None and request.token == token else CancelRequest(token, now)
        self.requests = new  # published before the executors are told, so the job's end sees it
        for job_id, request in new.items():
            if request.executor is None:
                for executor in w.executors:
                    if executor.cancel(job_id, request.token):
                        request.executor = executor
                        w.log.info("cancel requested: stopping the job", extra={
                            "flow": executor.flow.name, "job": job_id})
                        break

    def _enforce(self) -> float:
        """Force the cancels whose grace has passed; the wait until the next pass."""
        now = time.monotonic()
        wait = CHECK_INTERVAL
        for job_id, request in self.requests.items():
            executor = request.executor
            if executor is None or request.forced:
                continue
            left = request.seen + executor.flow.config.cancel_grace - now
            if left > 0:
                wait = min(wait, left)
                continue
            request.forced = True
            self.worker.log.warning("cancelled job still running after cancel_grace: no longer waiting for it",
                                    extra={"flow": executor.flow.name, "job": job_id})
            executor.force_cancel(job_id, request.token)
        return max(wait, 0.01)

    # -- endings (rare paths, apart from ack_batch) ----------------------------------------------------

    def ack_cancelled(self, flow: Any, token: int, ids: list[int]) -> None:
        w = self.worker
        ended, finished_runs = w.with_db("ack cancelled", lambda conn: store.ack_cancelled(conn, w.id, token, ids))
        if ended:
            w.log.info("jobs cancelled", extra={"flow": flow.name, "jobs": ended})
            if w.metrics is not None:
                w.metrics.cancelled(flow.name, len(ended))
        if finished_runs:
            w._fire_run_hooks(finished_runs)

    def snooze(self, token: int, ids: list[int], delays: list[float]) -> None:
        w = self.worker
        w.with_db("snooze", lambda conn: store.snooze_jobs(conn, w.id, token, ids, delays))

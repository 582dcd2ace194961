"""One worker process: its lifecycle, signals, pool, the main loop that asks each flow's executor for
work, and shutdown.

Everything database-related is opened here, after the fork: a psycopg_pool for claims, acks and
heartbeats. Enqueue wake-ups arrive on a pipe from the supervisor, whose one LISTEN connection serves
every worker (`relay_fd`); a worker started without one (no supervisor) opens a dedicated autocommit
LISTEN connection outside the pool. Either way a listener thread reads continuously (an unread
backend would pin PostgreSQL's NOTIFY queue while the worker is busy). The main loop waits on a Wakeup (a pipe, so a
signal handler may set it too) that the listener, SIGTERM and the concurrent executors set.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from engine import __version__, db, store
from engine.config import EngineConfig, FlowConfig
from engine.handlers import FlowRuntime, load_flow
from engine.liveness import GUARD_INTERVAL_CAP, STOP_SIGNALS, Lease, WorkerGuard, lease_recheck, lease_span
from engine.logs import ContextLogger
from engine.queue import Queue
from engine.store import AckResult
from engine.runs import claim_finished_runs, fire_claimed
from engine.sources import SourceRegistry
from engine.store import RunSummary
from engine.telemetry import (CANCEL_CHANNEL, ENQUEUED_CHANNEL, FailureSample, RelayRead, Telemetry, encode_event,
                              parse_relay)
from engine.failure_log import FailureLog
from engine.metrics import WorkerMetrics
from engine.worker.circuit import CircuitBreaker
from engine.worker.completer import FLUSH_INTERVAL, Completer
from engine.worker.control import Control
from engine.worker.executors import CHILD, ThreadExecutor, inline_check, make_executor, on_alarm
from engine.worker.heartbeat import Monitor, TelemetryThread
from engine.worker.outcome import HandlerExit
from engine.worker.producer import Producer

log = logging.getLogger("skiplock.worker")

TRANSIENT_DB_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError)
DB_RETRY_SECONDS: Final = 60.0
EMPTY_FLOW_RECHECK: Final = 0.1  # seconds an empty flow is skipped while the worker is busy with others
DUE_PROBE_MIN: Final = 8  # above this many flows, a round claims across them (claim_flows) and probes (flows_due)
CROSS_WINDOW_MIN: Final = 16  # the fewest flows one claim_flows statement is sent
LISTEN_READ_TIMEOUT: Final = 0.5  # the listener thread re-checks its stop flag this often
STOP_MARGIN: Final = 0.5  # concurrent jobs get the grace period minus this before the worker exits

EXIT_OK: Final = 0
EXIT_DB_LOST: Final = 3
EXIT_STUCK_HANDLER: Final = 5
EXIT_LOST: Final = 6  # marked lost (heartbeat went stale): the supervisor replaces us under a new id

_real_exit = os._exit  # the worker's own exits; handlers get a guarded os._exit (install_exit_guard)


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    worker_id: str
    engine_id: str
    dsn: str
    application_name: str
    flows: tuple[FlowConfig, ...]
    engine: EngineConfig
    sources: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # Settings.sources
    report: Any = None  # the supervisor's IdleReport: this worker says when it has nothing to do
    lease: Lease | None = None  # the supervisor's heartbeat lease of this slot (engine/liveness.py)
    metrics: Any = None  # the supervisor's MetricsPipe (engine/metrics.py) with --metrics-port, else None
    listen_dsn: str | None = None  # a direct connection for LISTEN when dsn goes through PgBouncer
    # The read end of a pipe on which the supervisor relays enqueue notifications (its one LISTEN
    # connection serves every worker); None: this worker LISTENs on a connection of its own.
    relay_fd: int | None = None


@dataclass
class _Deferred:
    flow: FlowRuntime
    token: int
    done_ids: list[int]
    results: list[str | None] | None
    failures: list[Any]
    children: Any
    after: Any  # the batch's after_ack, called with its AckResult


class DeferredAcks:
    """The acks of the inline batches one claim_flows statement handed out, sent together: one
    statement for all of them (store.ack_across: each flow's rows fenced by that statement's tokens,
    the outcome counted per flow), in one transaction with one commit, instead of one statement and
    commit per flow. A batch with Next(...) children keeps a statement of its own in that transaction.
    A retry after a lost reply re-sends them all with the same ack ids (the receipts of a committed
    try answer). Crash semantics are those of one batch of their size."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.items: list[_Deferred] = []

    def add(self, flow: FlowRuntime, token: int, done_ids: list[int], results: list[str | None] | None,
            failures: list[Any], children: Any, after: Any) -> None:
        self.items.append(_Deferred(flow, token, done_ids, results, failures, children, after))

    def flush(self) -> None:
        items, self.items = self.items, []
        if not items:
            return
        w = self.worker
        together = [d for d in items if not d.children]
        alone = [d for d in items if d.children]
        parts = [store.AckPart(d.flow.name, d.token, d.done_ids, d.results, d.failures, d.flow.config.max_attempts)
                 for d in together]
        across_id = store.new_ack_id()  # the ids once, outside the retries
        alone_ids = [store.new_ack_id() for _ in alone]

        def send(conn: Any) -> list[AckResult]:
            with conn.transaction():
                acks = store.ack_across(conn, w.id, parts, ack_id=across_id) if parts else []
                return acks + [store.ack_batch(conn, w.id, d.token, d.done_ids, d.results, d.failures,
                                               d.flow.config.max_attempts, ack_id=ack_id, children=d.children)
                               for d, ack_id in zip(alone, alone_ids)]
        for d, ack in zip(together + alone, w.with_db("ack", send)):
            d.after(ack)


class Wakeup:
    """A self-pipe: set() from any thread or a signal handler; wait() in the main loop."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # already set

    def wait(self, timeout: float) -> None:
        select.select([self._r], [], [], max(timeout, 0.0))
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass


def install_exit_guard(pid: int) -> None:
    """A handler calling os._exit() in this process fails its job (HandlerExit) instead of killing the
    worker mid-batch; a child it forked exits as asked."""
    def guarded_exit(code: int) -> None:
        if os.getpid() == pid:
            raise HandlerExit(f"handler called os._exit({code})")
        _real_exit(code)
    os._exit = guarded_exit  # type: ignore[assignment]


class Worker:
    transient_errors = TRANSIENT_DB_ERRORS
    exit_stuck_handler = EXIT_STUCK_HANDLER
    exit_db_lost = EXIT_DB_LOST

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.id = spec.worker_id
        self.flows: list[FlowRuntime] = [load_flow(f) for f in spec.flows]
        self.flow_names = [f.name for f in self.flows]
        self._known_flows = set(self.flow_names)  # Next(...) targets known to exist (stages.split)
        self.stopping = False
        self.closing = False
        self.exit_code = EXIT_OK
        self.state = "starting"
        self.telemetry = Telemetry()
        self.pool: Any = None
        self.queue: Any = None
        self.jobs_done = 0
        self.lost = False
        self.base_log = log
        self.log = ContextLogger(log, {"engine": spec.engine_id, "worker": self.id})
        self.failure_log = FailureLog(self.log)
        self.metrics = WorkerMetrics() if spec.metrics is not None else None
        # Source databases: opened by the first handler that uses one, then kept for this process
        # (threaded flows give each handler thread a registry of its own).
        self.sources = SourceRegistry(spec.sources)
        self.flow_sources = {f.name: self.sources.for_flow(f.name, f.config.sources) for f in self.flows}
        self.wake = Wakeup()
        self.inline: Any = None  # the inline batch in hand (executors.InlineBatch)
        self.inline_lock = threading.Lock()
        self.circuit = CircuitBreaker(self)
        self.completer = Completer(self)
        self.control = Control(self)  # cancel requests and progress reports (engine/worker/control.py)
        self.telemetry_thread = TelemetryThread(self)
        self.monitor = Monitor(self)
        self.executors: list[Any] = []
        self.concurrent_executors: list[Any] = []
        self._idle_reported = False
        self._notified = False  # a wake-up for every flow since the loop last looked
        self._named: set[int] = set()  # flows (indices) named by enqueue wake-ups since then
        self._wakeup_lock = threading.Lock()
        self._flow_index = {name: i for i, name in enumerate(self.flow_names)}
        self._look_at = 0.0  # monotonic: the idle worker's next look at every flow (_wait_for_work)
        self._cross_total = max((f.config.batch_size for f in self.flows), default=1)  # jobs per claim_flows
        self._served_up_to = 0  # _claim_across
        self._cross_window = CROSS_WINDOW_MIN  # flows per claim_flows statement (_claim_window)
        self.deferred_acks: DeferredAcks | None = None  # while _claim_across runs the batches it claimed
        self.listen_conn: psycopg.Connection[Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; a terminal ^C reaches it
        signal.signal(signal.SIGALRM, on_alarm(self))
        # Forked with them blocked (Supervisor._spawn): a stop sent since then is handled here, not lost.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        install_exit_guard(os.getpid())
        engine = self.spec.engine
        if self.spec.lease is not None:  # first: from now on nobody proving us alive stops us
            WorkerGuard(self.spec.lease, lease_span(engine.stale_after, engine.heartbeat_interval),
                        min(engine.heartbeat_interval / 2, GUARD_INTERVAL_CAP),
                        lease_recheck(engine.heartbeat_interval), self.id).start()
        CHILD[0] = False  # we are the supervisor's fork; a fork of ours (by a handler) sets it again
        extra = sum(f.per_worker for f in self.flows if f.mode == "threads" and (f.with_context or
                                                                                f.config.transactional))
        self.pool = db.open_pool(self.spec.dsn, application_name=self.spec.application_name,
                                 min_size=1, max_size=max(self.spec.engine.pool_max, 2) + extra, name=self.id)
        self.queue = Queue(pool=self.pool, check_schema=False)
        self.with_db("register", lambda conn: store.worker_register(
            conn, self.id, self.spec.engine_id, socket.gethostname(), os.getpid(), self.flow_names, __version__))
        self.notify([encode_event("worker_started", engine=self.spec.engine_id, worker=self.id,
                                  host=socket.gethostname(), pid=os.getpid(), flows=self.flow_names)])
        if self.spec.relay_fd is not None:
            threading.Thread(target=self._relay_loop, name="listener", daemon=True).start()
        else:
            self._connect_listener()
            threading.Thread(target=self._listen_loop, name="listener", daemon=True).start()
        for flow in self.flows:
            executor = make_executor(self, flow, Producer(self, flow))
            self.executors.append(executor)
            if executor.concurrent:
                executor.start()
                if isinstance(executor, ThreadExecutor):  # asyncio jobs time out in their own task
                    self.monitor.checks.append(executor.check)
        self.concurrent_executors = [e for e in self.executors if e.concurrent]
        if any(not e.concurrent for e in self.executors):
            self.monitor.checks.append(inline_check(self))
        if any(e.concurrent for e in self.executors):
            self.completer.start()
        self.telemetry_thread.start()
        self.monitor.start()
        self.control.start()
        self.log.info("worker started", extra={"flows": self.flow_names, "pid": os.getpid()})
        code = EXIT_OK
        try:
            self._loop()
            code = self.exit_code or (EXIT_LOST if self.lost else EXIT_OK)
        except TRANSIENT_DB_ERRORS as exc:
            self.log.error("database unreachable for %.0fs, worker exits: %s", DB_RETRY_SECONDS, exc)
            code = EXIT_DB_LOST
        finally:
            self._shutdown(code)
        return code

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self.wake.set()

    def request_stop(self, code: int = EXIT_OK) -> None:
        if code and not self.exit_code:
            self.exit_code = code
        self.stopping = True
        self.wake.set()

    def hard_exit(self, code: int) -> None:
        logging.shutdown()
        _real_exit(code)

    def exit_child(self) -> None:
        """In a child a handler forked: the handler returned here, in a copy of the worker. Leave now."""
        _real_exit(0)

    def _shutdown(self, code: int) -> None:
        self.stopping = True
        deadline = time.monotonic() + max(self.spec.engine.grace_period - STOP_MARGIN, 0.0)
        for executor in self.executors:
            if executor.concurrent:
                try:
                    executor.stop(deadline)
                except TRANSIENT_DB_ERRORS:
                    pass  # the supervisor rescues
        try:
            self.completer.close()
        except Exception as exc:
            self.log.warning("could not ack on the way out (the supervisor rescues): %s", exc)
        self.closing = True  # the telemetry thread stops before the pool closes
        reason = "signal" if code == EXIT_OK else f"exit code {code}"
        try:
            try:
                self.telemetry_thread.final_tick()
            except psycopg.Error as exc:  # the last counters are lost; stopping cleanly matters more
                if isinstance(exc, TRANSIENT_DB_ERRORS):
                    raise
                self.log.warning("last telemetry tick failed: %s", exc)
            self.with_db("stopped", lambda conn: store.worker_stopped(conn, self.id), quick=True)
            self.notify([encode_event("worker_stopped", engine=self.spec.engine_id, worker=self.id,
                                      reason=reason)], quick=True)
        except TRANSIENT_DB_ERRORS:
            pass  # the supervisor marks us lost and rescues
        self.log.info("worker stopped", extra={"jobs_done": self.jobs_done, "reason": reason})
        self.sources.close()
        # The listen connection is left to the process exit: closing it would wait for the listener
        # thread's current read.
        if self.pool is not None:
            self.pool.close(timeout=2)

    # -- database helpers ----------------------------------------------------------------------------

    def db_retry(self, what: str) -> Retrying:
        """Bounded retries of the engine's own statements on transient errors (restart, network)."""
        def before_sleep(state: Any) -> None:
            self.log.warning("database call %s failed, retrying: %s", what, state.outcome.exception())
        return Retrying(
            retry=retry_if_exception_type(TRANSIENT_DB_ERRORS),
            wait=wait_exponential(multiplier=0.05, max=0.5),  # back within 0.5 s of the database's return
            stop=stop_after_delay(DB_RETRY_SECONDS),
            before_sleep=before_sleep,
            reraise=True,
        )

    def with_db(self, what: str, action: Any, quick: bool = False) -> Any:
        if quick:
            with self.pool.connection(timeout=5) as conn:
                return action(conn)
        for attempt in self.db_retry(what):
            with attempt:
                with self.pool.connection() as conn:
                    return action(conn)
        return None  # pragma: no cover - Retrying re-raises

    def queue_on(self, conn: psycopg.Connection[Any]) -> Queue:
        return Queue(conn=conn, check_schema=False)

    def notify(self, events: list[str], quick: bool = False) -> None:
        if events:
            self.with_db("notify", lambda conn: store.events_notify(conn, events), quick=quick)

    # -- wake-ups ------------------------------------------------------------------------------------

    def _connect_listener(self) -> None:
        for attempt in self.db_retry("listen"):
            with attempt:
                if self.listen_conn is not None:
                    self.listen_conn.close()
                self.listen_conn = db.connect(self.spec.listen_dsn or self.spec.dsn,
                                              application_name=self.spec.application_name)
                db.listen(self.listen_conn, ENQUEUED_CHANNEL)
                db.listen(self.listen_conn, CANCEL_CHANNEL)

    def _relay_loop(self) -> None:
        """Wake-ups the supervisor relays (a record per notification it heard, or after it reconnected:
        engine/telemetry.py, RELAY_*)."""
        fd = self.spec.relay_fd
        assert fd is not None
        rest = b""
        while not self.closing:
            ready, _, _ = select.select([fd], [], [], LISTEN_READ_TIMEOUT)
            if not ready:
                continue
            try:
                got = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not got:
                return  # the supervisor is gone: the lease guard ends this worker
            read = RelayRead()
            rest = parse_relay(rest + got, read)
            if read.cancel:
                self.control.wake()
            self._enqueued(read.anywhere, read.flows)

    def _enqueued(self, anywhere: bool, flows: set[str]) -> None:
        """An enqueue wake-up: for every flow, or naming flows (those this worker does not serve are
        none of its business)."""
        named = {self._flow_index[name] for name in flows if name in self._flow_index}
        if not anywhere and not named:
            return
        with self._wakeup_lock:
            self._notified = self._notified or anywhere
            self._named |= named
        self.wake.set()

    def _take_wakeups(self) -> tuple[bool, set[int]]:
        with self._wakeup_lock:
            anywhere, named = self._notified, self._named
            self._notified, self._named = False, set()
        return anywhere, named

    def _listen_loop(self) -> None:
        """Reads notifications as they come, busy or idle, and wakes the main loop."""
        while not self.closing:
            try:
                assert self.listen_conn is not None
                for note in self.listen_conn.notifies(timeout=LISTEN_READ_TIMEOUT):
                    if note.channel == CANCEL_CHANNEL:
                        self.control.wake()
                        continue
                    self._enqueued(not note.payload, {note.payload} if note.payload else set())
            except TRANSIENT_DB_ERRORS as exc:
                if self.closing:
                    return
                self.log.warning("listen connection lost, reconnecting: %s", exc)
                time.sleep(0.1)
                try:
                    self._connect_listener()
                except TRANSIENT_DB_ERRORS:
                    self.request_stop(EXIT_DB_LOST)
                    return
                self._enqueued(True, set())  # enqueues while we were away were not heard: look
                self.control.wake()  # and cancels: check now

    # -- the loop ------------------------------------------------------------------------------------

    def busy(self) -> None:
        if self.state != "busy":
            self.state = "busy"
            self.monitor.wake()
        if self._idle_reported:
            self._idle_reported = False
            if self.spec.report is not None:
                self.spec.report.busy(self.spec.index)

    def _loop(self) -> None:
        """One claim per flow per round, so a deep backlog of one flow cannot starve the others. A flow
        that had nothing is skipped for EMPTY_FLOW_RECHECK while others keep the worker busy.

        Past DUE_PROBE_MIN flows: the flows without a gate of their own (`Producer.plain`) are claimed
        together, one claim_flows statement for a batch across them, and one flows_due probe per round
        says which of the others to claim from. An idle worker woken by enqueues that named their flows
        looks at those flows only (`focus`), until its next look at every flow was due anyway."""
        self.state = "idle"
        executors = self.executors
        recheck_at = [0.0] * len(executors)
        many = len(executors) > DUE_PROBE_MIN
        # Many flows: workers of one engine start their rounds at different flows, so they do not
        # race each other for the same flow's jobs (the loser's claim comes back empty).
        start = int(self.spec.index * 0.618034 * len(executors)) % len(executors) if many else 0
        order = list(range(start, len(executors))) + list(range(start))
        across = [i for i in order if executors[i].producer.plain] if many else []
        alone = [i for i in order if not executors[i].producer.plain] if many else order
        focus: set[int] = set()
        idle_probes = 0
        while not self.stopping:
            worked = False
            now = time.monotonic()
            skipping = many and not focus and any(at > now for at in recheck_at)  # else this round looks at all
            if focus:
                visit = [i for i in order if i in focus]
            else:
                visit = alone
                if across:
                    worked = self._claim_across(across, recheck_at, now)
                    if worked:  # the next statement starts past the flows this one served
                        across = across[self._served_up_to:] + across[:self._served_up_to]
                if many:
                    self._skip_flows_without_work(alone, recheck_at, now)
            for i in visit:
                if self.stopping:
                    break
                if recheck_at[i] > now:
                    continue
                claimed = executors[i].step()
                if claimed > 0:
                    worked = True
                elif claimed == 0:
                    # A rate-limited or key-blocked flow is held until it can claim again.
                    hold = executors[i].producer.hold_until
                    recheck_at[i] = hold if hold > now else now + EMPTY_FLOW_RECHECK
            if worked or self.stopping:
                idle_probes = 0
                continue
            if skipping and idle_probes < 2 and self._due_elsewhere(recheck_at):
                idle_probes += 1  # bounded: a due job we cannot claim (a lost worker) must not spin us
                continue
            idle_probes = 0
            in_hand = any(e.concurrent and e.in_hand for e in executors)
            if in_hand:
                # a job finishing below the low-water mark wakes us; a held flow's hold ends
                self.wake.wait(min(EMPTY_FLOW_RECHECK, max(self._earliest_hold() - time.monotonic(), 0.0)))
            else:
                self._wait_for_work(focused=bool(focus))
            anywhere, named = self._take_wakeups()
            if many and named and not anywhere and not in_hand and time.monotonic() < self._look_at:
                focus = named  # only these flows have new jobs: claim them, probe nothing
                for i in named:
                    executors[i].producer.woken()
                    recheck_at[i] = executors[i].producer.hold_until
                continue
            focus = set()
            if anywhere or named or not in_hand:
                for i in (range(len(executors)) if anywhere else named):
                    executors[i].producer.woken()
                recheck_at = [e.producer.hold_until for e in executors]

    def _claim_across(self, across: list[int], recheck_at: list[float], now: float) -> bool:
        """claim_flows statements over the plain flows of `across` not skipped for now, in that order,
        each at most `_cross_total` jobs over at most `_cross_window` flows; each flow's executor takes
        its rows. A window that found nothing is followed by the next, until one claims or every flow
        was reached. A flow a statement reached and found empty is skipped for EMPTY_FLOW_RECHECK.
        `_served_up_to`: the position in `across` where the next statement should start (0: the
        statement reached every flow it could)."""
        self._served_up_to = 0
        start = 0
        while True:
            claimed, reached = self._claim_window(across, start, recheck_at, now)
            if claimed or reached is None:
                return claimed
            start = reached

    def _claim_window(self, across: list[int], start: int, recheck_at: list[float],
                      now: float) -> tuple[bool, int | None]:
        """One claim_flows statement from position `start` of `across`: (claimed anything, the position
        past the window when the window, not the end of `across`, bounded it, else None)."""
        executors = self.executors
        window = self._cross_window
        bounded = False  # the window, not the end of `across`, ended the statement's flows
        claims, picked = [], []
        base = store.new_claim_token()  # one random draw per statement: flow k's token is base ^ k
        for pos in range(start, len(across)):
            i = across[pos]
            if recheck_at[i] > now or executors[i].flow.half_open:
                continue  # a half-open circuit's trial goes through the flow's own claim
            limit = executors[i].claim_limit()
            if limit <= 0:
                continue
            if len(claims) == window:
                bounded = True
                break
            picked.append(pos)
            claims.append(store.FlowClaim(executors[i].flow.name, limit, base ^ pos,
                                          executors[i].flow.config.max_attempts))
        if not claims:
            return False, None
        total = self._cross_total
        try:
            with self.pool.connection() as conn:
                got = store.claim_flows(conn, self.id, claims, total)
        except TRANSIENT_DB_ERRORS:
            # The claim may have committed: what its tokens took is handed back (attempts refunded).
            for claim in claims:
                self.with_db("release claim", lambda conn: store.claim_release_token(conn, self.id, claim.token))
            return False, None
        served = sum(1 for rows in got if rows)
        full = sum(len(rows) for rows in got) >= total
        last = max((k for k, rows in enumerate(got) if rows), default=-1)
        later = now + EMPTY_FLOW_RECHECK
        # Dumping the statement's arrays costs the worker about 3 us per flow sent (3 ms at 1,000 flows):
        # send about twice as many flows as the last full statement needed, more when a window ran dry.
        if full:
            self._cross_window = min(max(CROSS_WINDOW_MIN, 2 * served), len(across))
        elif bounded:
            self._cross_window = min(2 * window, len(across))
        if served > 1:
            self.deferred_acks = DeferredAcks(self)
        try:
            for k, (pos, claim, rows) in enumerate(zip(picked, claims, got)):
                i = across[pos]
                if not rows:
                    if not full or k < last:  # reached and empty; past the last served, not reached
                        recheck_at[i] = later
                    continue
                if self.stopping:  # claimed, not started: back to pending, attempts refunded
                    self.with_db("release", lambda conn: store.claim_release_token(conn, self.id, claim.token))
                    continue
                executors[i].take(rows, claim.token, False)
        finally:
            deferred, self.deferred_acks = self.deferred_acks, None
            if deferred is not None:
                deferred.flush()
        past = picked[-1] + 1 if bounded else None
        if full and last >= 0:
            self._served_up_to = picked[last] + 1
        elif past is not None:
            self._served_up_to = past
        return last >= 0, past

    def _earliest_hold(self) -> float:
        """When the first held (rate-limited or key-blocked) flow may claim again; inf: none held."""
        now = time.monotonic()
        return min((e.producer.hold_until for e in self.executors if e.producer.hold_until > now),
                   default=float("inf"))

    def top_up(self) -> None:
        """From inside an inline batch: claim for the concurrent flows that dropped below their
        low-water mark, so their threads or tasks do not sit idle behind the inline jobs."""
        for executor in self.concurrent_executors:
            if self.stopping:
                return
            if executor.in_hand < executor.n:
                executor.step()

    def _skip_flows_without_work(self, visit: list[int], recheck_at: list[float], now: float) -> None:
        """Many flows: one flows_due probe instead of an empty claim per flow of `visit`; the flows it
        finds without work are skipped like a flow whose claim came back empty."""
        candidates = [i for i in visit if recheck_at[i] <= now]
        if len(candidates) <= DUE_PROBE_MIN:
            return
        try:
            with self.pool.connection() as conn:
                due = self._flows_due(conn, candidates)
        except TRANSIENT_DB_ERRORS:
            return  # the claims find out, and retry
        later = now + EMPTY_FLOW_RECHECK
        for i in candidates:
            if i not in due:
                recheck_at[i] = later

    def _flows_due(self, conn: Any, indices: list[int]) -> set[int]:
        names = [self.flow_names[i] for i in indices]
        due = store.flows_due(conn, names, [self.executors[i].producer.due_rate for i in indices])
        return {i for i in indices if self.flow_names[i] in due}

    def _due_elsewhere(self, recheck_at: list[float]) -> bool:
        """Many flows, a round without work: flows skipped for a while may have work by now (one
        flows_due probe over all of them, cheaper than next_run_at's sort of a deep backlog)."""
        try:
            with self.pool.connection() as conn:
                due = self._flows_due(conn, list(range(len(self.executors))))
        except TRANSIENT_DB_ERRORS:
            return False
        for i in due:
            recheck_at[i] = 0.0
        return bool(due)

    def _wait_for_work(self, focused: bool = False) -> None:
        """Sleeps until a wake-up, a held flow's hold ends, the earliest scheduled job is due or the
        poll interval passed (`_look_at`). Focused (woken since by enqueues naming their flows): until
        that same `_look_at`, without asking again."""
        self.state = "idle"
        if self.completer.pending:  # ack what finished before reporting idle (a drain waits on it)
            self.completer.flush()
            if self.completer.pending:  # the completer thread is writing its own flush
                self.wake.wait(FLUSH_INTERVAL)
                return
        now = time.monotonic()
        wait = min(self.spec.engine.poll_interval, self._earliest_hold() - now)
        if focused:
            wait = min(wait, self._look_at - now)
        else:
            # Held flows have due jobs they cannot claim yet: leave them out, and wake when the hold ends.
            flows = [e.flow.name for e in self.executors if e.producer.hold_until <= now]
            try:
                with self.pool.connection() as conn:
                    next_due = store.next_run_at(conn, flows) if flows else None
            except TRANSIENT_DB_ERRORS as exc:
                self.log.warning("database call next_run_at failed: %s", exc)
                self.wake.wait(0.1)
                return
            if next_due is not None:
                wait = min(wait, max(next_due, 0.0))
            self._look_at = now + max(wait, 0.0)
        if wait <= 0:
            return
        if not self._idle_reported and self.completer.pending == 0:
            self._idle_reported = True
            if self.spec.report is not None:
                self.spec.report.idle(self.spec.index)
        self.wake.wait(wait)

    def known_flow(self, name: str) -> bool:
        """Whether a Next(...) may name `name`: a flow this worker serves, or one an engine has
        registered (looked up once per name and process, as enqueue does)."""
        if name in self._known_flows:
            return True
        from engine.errors import UnknownFlow
        from engine.queue import _require_known_flow

        try:
            with self.pool.connection() as conn:
                _require_known_flow(conn, name, False)
        except UnknownFlow:
            return False
        self._known_flows.add(name)
        return True

    # -- after each ack ------------------------------------------------------------------------------

    def after_ack(self, flow: FlowRuntime, ack: AckResult, failed: int, wait_ms: float, run_ms: float,
                  samples: list[FailureSample], had_success: bool, trial: bool = False) -> None:
        self.jobs_done += ack.completed
        self.telemetry.record_batch(flow.name, ack.completed, failed, ack.dead_ids, wait_ms, run_ms, samples)
        if self.metrics is not None:
            self.metrics.batch(flow.name, ack.completed, failed, len(ack.dead_ids), ack.retried, wait_ms, run_ms)
            if failed:
                self.metrics.failures(flow.name, [s.type for s in samples])
        if failed:
            self.failure_log.failed(flow.name, samples, ack.dead_ids)
        if ack.refused:
            self.log.warning("acks refused: jobs were rescued from this worker", extra={
                "flow": flow.name, "refused": ack.refused})
        if ack.finished_runs:
            self._fire_run_hooks(ack.finished_runs)
        self.circuit.after_batch(flow, had_failures=bool(failed), had_success=had_success, trial=trial)

    def _fire_run_hooks(self, run_ids: list[str]) -> None:
        def finished(summary: RunSummary) -> None:
            fields = summary.as_dict()
            self.notify([encode_event("run_finished", engine=self.spec.engine_id, worker=self.id, **fields)])
            self.log.info("run finished", extra=fields)

        hooks = {f.name: f.on_complete for f in self.flows}
        claimer = store.new_hook_claimer()  # once, outside the retries: a retried claim gets its runs back
        claimed = self.with_db("run hook", lambda conn: claim_finished_runs(conn, run_ids, claimer))
        fire_claimed(claimed, hooks, self.log, finished)


def worker_main(spec: WorkerSpec, log_format: str) -> None:
    """Entry point of a forked worker process."""
    from engine.logs import setup_logging

    setup_logging(log_format)
    _die_with_parent()
    try:
        code = Worker(spec).run()
    except Exception:
        log.exception("worker crashed", extra={"worker": spec.worker_id})
        code = 1
    logging.shutdown()
    _real_exit(code)


def _die_with_parent() -> None:
    """If the supervisor is killed outright, workers get SIGTERM and drain instead of running on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)

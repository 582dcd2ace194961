"""Testing your handlers: a job context for a direct call, and the pending jobs of a flow run in-process.

    from engine.testing import make_context, run_pending

    def test_hello_greets(conn):                       # conn: a psycopg connection your test owns
        ctx = make_context("hello", pg=conn)
        assert hello({"name": "ada"}, ctx) == {"hi": "ada"}
        assert ctx.enqueued == [Enqueued("notify", {"name": "ada"}, {})]

    def test_the_flow_end_to_end(dsn):                  # a real, migrated database
        Queue(dsn).enqueue("hello", {"name": "ada"})
        [outcome] = run_pending("hello", dsn=dsn, config="config.toml")
        assert outcome.status == "completed" and outcome.result == {"hi": "ada"}

`job_context` is a pytest fixture giving `make_context`: import it into your conftest.py
(`from engine.testing import job_context`) or list `engine.testing` in `pytest_plugins`.

`run_pending` claims and acknowledges through the same statements as the engine's workers, so retries,
backoff, attempts and dead letters follow the same rules; each job's handler runs here, in this process,
one job at a time, without the flow's timeout. A transactional flow's writes commit per job, before the
ack, as in a flow without `transactional`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import psycopg

from engine import db, store
from engine.errors import Snooze
from engine.config import FlowConfig, Settings, load_settings
from engine.handlers import FlowRuntime, JobContext, load_flow
from engine.queue import ClaimedJob, Failure, Queue
from engine.sources import SourceRegistry
from engine.stages import HANDOFF_TYPES, split
from engine.store import Children
from engine.worker.outcome import encode_result, failure

__all__ = ["Enqueued", "JobOutcome", "TestContext", "make_context", "run_pending"]  # and the job_context fixture

log = logging.getLogger("skiplock.testing")

BATCH: Final = 100
MAX_JOBS: Final = 10_000  # a flow that enqueues itself forever stops here


@dataclass(frozen=True)
class Enqueued:
    """One `ctx.enqueue(flow, payload, **options)` call a TestContext captured."""

    flow: str
    payload: Mapping[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


class TestContext(JobContext):
    """A JobContext for a direct handler call: `ctx.enqueued` lists the follow-up jobs the handler asked
    for (none is inserted), `ctx.progress_reports` the (fraction, message) of each `ctx.progress` call
    (validated as the worker does), and `ctx.cancelled` may be set by the test."""

    __test__ = False  # not a pytest test class
    __slots__ = ("enqueued", "progress_reports")

    def __init__(self, job_id: int, flow: str, attempt: int, max_attempts: int, run_id: str | None,
                 log: logging.LoggerAdapter[logging.Logger], sources: Mapping[str, Any] | None,
                 pg: Callable[[], Any] | None) -> None:
        super().__init__(job_id, flow, attempt, max_attempts, run_id, "test-worker", log, self._capture, sources, pg)
        self.enqueued: list[Enqueued] = []
        self.progress_reports: list[tuple[float, str | None]] = []
        self._report = lambda _job, _token, fraction, message: self.progress_reports.append((fraction, message))

    def _capture(self, flow: str, payload: Mapping[str, Any], **options: Any) -> int:
        self.enqueued.append(Enqueued(flow, payload, options))
        return len(self.enqueued)  # a stand-in id: 1, 2, ...


def make_context(flow: str = "test", *, job_id: int = 1, attempt: int = 1, max_attempts: int = 5,
                 run_id: str | None = None, pg: psycopg.Connection[Any] | None = None,
                 sources: Mapping[str, Any] | None = None, cancelled: bool = False) -> TestContext:
    """A context for calling a `(payload, ctx)` handler yourself.

    `ctx.pg` is `pg` (your connection: its transaction is yours to commit or roll back), `ctx.sources`
    is `sources` (real `engine.sources.Source`s, or stand-ins with the same methods).
    """
    adapter = logging.LoggerAdapter(log, {"flow": flow, "job": job_id, "run": run_id})
    ctx = TestContext(job_id, flow, attempt, max_attempts, run_id, adapter, sources,
                      (lambda: pg) if pg is not None else None)
    ctx.cancelled = cancelled
    return ctx


# ---------------------------------------------------------------------------------------------
# run_pending


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job: `completed` (with the handler's `result`), `retry` (failed, pending
    again after its backoff), `dead` (permanent error, or attempts used up) or `snoozed` (the handler
    raised Snooze(delay): pending again after the delay, the attempt not counted; `error` is the
    Snooze). `progress`: the job's ctx.progress reports, in order (each also written to the job's row)."""

    job_id: int
    flow: str
    attempt: int
    payload: Mapping[str, Any]
    status: Literal["completed", "retry", "dead", "snoozed"]
    result: Any = None
    error: BaseException | None = None
    progress: tuple[tuple[float, str | None], ...] = ()


def run_pending(flow: str | FlowConfig, *, dsn: str, config: Path | str | None = None, env: str | None = None,
                settings: Settings | None = None, max_jobs: int = MAX_JOBS) -> list[JobOutcome]:
    """Run the jobs of `flow` that are due now, in this process, until none is left; one outcome per run.

    `flow` is a flow name of the config (`config`, else $SKIPLOCK_CONFIG; or `settings`), or a
    FlowConfig. Jobs that fail are retried only once their backoff has passed, so a job retried
    sooner than that appears once, as `retry`. Sources the flow declares are opened from the config.
    """
    if settings is None:
        settings = load_settings(config, env=env, dsn=dsn)
    flow_config = flow if isinstance(flow, FlowConfig) else _flow_config(settings, flow)
    runtime = load_flow(flow_config)
    registry = SourceRegistry(settings.sources)
    worker_id = f"testing:{socket.gethostname()}:{os.getpid()}"
    outcomes: list[JobOutcome] = []
    try:
        with Queue(dsn, application_name=f"{settings.application_name}-testing") as queue:
            flow_sources = registry.for_flow(flow_config.name, flow_config.sources)
            while len(outcomes) < max_jobs:
                limit = min(BATCH, max_jobs - len(outcomes))
                token, jobs = queue.claim(flow_config.name, worker_id, limit, flow_config.max_attempts)
                if not jobs:
                    break
                outcomes += _run_claimed(runtime, queue, worker_id, token, jobs, dsn, flow_sources)
    finally:
        registry.close()
    return outcomes


def _flow_config(settings: Settings, name: str) -> FlowConfig:
    found = settings.flows.get(name)
    if found is None:
        where = settings.path or "no config file (pass config=..., or set SKIPLOCK_CONFIG)"
        raise KeyError(f"flow {name!r} is not configured in {where}")
    return found


def _run_claimed(flow: FlowRuntime, queue: Queue, worker_id: str, token: int, jobs: list[ClaimedJob], dsn: str,
                 sources: Mapping[str, Any]) -> list[JobOutcome]:
    done: list[int] = []
    results: list[Any] = []
    failures: list[Failure] = []
    snoozed: list[tuple[int, float]] = []
    children = Children()
    ran: list[tuple[ClaimedJob, Any, BaseException | None, list[tuple[float, str | None]]]] = []
    for job in jobs:
        reports: list[tuple[float, str | None]] = []
        ctx = _job_context(flow, job, worker_id, queue, dsn, sources) if flow.with_context else None
        if ctx is not None:
            ctx._token = token
            ctx._report = _progress_writer(queue, worker_id, reports)
        ok, result, error = run_job(flow, job, ctx, lambda name: _known(queue, name), children)
        if ok:
            done.append(job.id)
            results.append(result)
        elif isinstance(error, Snooze):
            snoozed.append((job.id, error.delay))
        else:
            assert error is not None
            failures.append(failure_of(flow, job, error))
        ran.append((job, result, error, reports))
    ack = queue.ack(worker_id, token, done, results, failures, flow.config.max_attempts,
                    children=children or None)
    if snoozed:
        with queue.connection() as conn:  # the worker's statement (engine/worker/control.py)
            store.snooze_jobs(conn, worker_id, token, [i for i, _ in snoozed], [d for _, d in snoozed])
    dead = set(ack.dead_ids)
    return [JobOutcome(job.id, flow.name, job.attempts, job.payload,
                       "completed" if error is None else "snoozed" if isinstance(error, Snooze)
                       else "dead" if job.id in dead else "retry", result, error, tuple(reports))
            for job, result, error, reports in ran]


def _progress_writer(queue: Queue, worker_id: str, reports: list[tuple[float, str | None]]) -> Any:
    """ctx.progress in run_pending: recorded, and written to the job's row at once (no throttle here)."""
    def write(job_id: int, token: int, fraction: float, message: str | None) -> None:
        reports.append((fraction, message))
        with queue.connection() as conn:
            store.jobs_progress_set(conn, worker_id, {job_id: (token, fraction, message)})
    return write


def _job_context(flow: FlowRuntime, job: ClaimedJob, worker_id: str, queue: Queue, dsn: str,
                 sources: Mapping[str, Any]) -> JobContext:
    adapter = logging.LoggerAdapter(log, {"worker": worker_id, "flow": flow.name, "job": job.id, "run": job.run_id})
    return JobContext(job.id, flow.name, job.attempts, job.max_attempts, job.run_id, worker_id, adapter,
                      queue.enqueue, sources, lambda: db.connect(dsn, application_name="skiplock-testing", autocommit=False))


# The worker's outcome rules (engine/worker/outcome.py): the same encoding of results and failures.


def _known(queue: Queue, name: str) -> bool:
    from engine.errors import UnknownFlow
    from engine.queue import _require_known_flow

    try:
        with queue.connection() as conn:
            _require_known_flow(conn, name, False)
    except UnknownFlow:
        return False
    return True


def run_job(flow: FlowRuntime, job: ClaimedJob, ctx: JobContext | None, known: Callable[[str], bool] | None = None,
            children: Children | None = None) -> tuple[bool, Any, BaseException | None]:
    """Call the handler as the worker does: (ok, result, error). ctx.pg commits when the handler returns
    and rolls back when it raises; a failed statement the handler swallowed fails the job; a result the
    worker could not store (not JSON, or holding NUL) fails it too. A returned Next(...) (engine.stages)
    is validated as the worker does and added to `children`; the outcome's result is what is stored."""
    try:
        result = flow.handler(job.payload) if ctx is None else flow.handler(job.payload, ctx)
        if result is not None and (result.__class__ in HANDOFF_TYPES or flow.config.next is not None):
            result = split(result, job.id, flow.config.next, known or (lambda name: True),
                           children if children is not None else Children())
        if result is not None:  # the outcome shows what the worker would store
            result = orjson.loads(encode_result(result))
    except Exception as exc:
        _end_pg(ctx, ok=False)
        return False, None, exc
    try:
        _end_pg(ctx, ok=True)
    except Exception as exc:
        return False, None, exc
    return True, result, None


def failure_of(flow: FlowRuntime, job: ClaimedJob, exc: BaseException) -> Failure:
    """A failed attempt as the ack records it: permanent (straight to dead) or retried after backoff."""
    return failure(flow, job, exc)


def _end_pg(ctx: JobContext | None, ok: bool) -> None:
    conn = None if ctx is None else ctx._pg
    if conn is None:
        return
    try:
        swallowed = ok and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        if ok and not swallowed:
            conn.commit()
        else:
            conn.rollback()
        if swallowed:
            raise RuntimeError("a statement on ctx.pg failed and the handler went on; the job's writes were "
                               "rolled back")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# pytest


try:
    import pytest
except ImportError:  # engine.testing without pytest: make_context and run_pending still work
    pass
else:
    @pytest.fixture
    def job_context() -> Iterator[Callable[..., TestContext]]:
        """`make_context`, as a fixture: `ctx = job_context("hello", pg=conn)`."""
        yield make_context

"""Queue operations: enqueue, claim, acknowledge, release, rescue, dead letters, status, health.

The `Queue` class is the public API for application code and the CLI: it owns a connection or a
pool and validates input. Every statement it sends goes through engine/store.py; the hot-path
functions (`claim_batch`, `ack_batch`, `release_batch`) live there and are re-exported here.
"""

from __future__ import annotations

import asyncio
import difflib
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson
import psycopg

from engine import __version__, db, pipelines, store
from engine.redact import describe_error
from engine.errors import (
    DatabaseUnavailable,
    JobCancelled,
    JobDead,
    JobNotFound,
    RunNotFound,
    UnknownFlow,
    ValidationError,
    WaitTimeout,
)
from engine.health import Thresholds, evaluate, read_facts
from engine.health import unreachable as health_unreachable
from engine.limits import INT4_MAX, INT8_MAX, MAX_DURATION_S, utf8_problem, validate_flow
from engine.payloads import MAX_PAYLOAD_BYTES, encode_payload  # noqa: F401  (re-exported)
from engine.migrate import REQUIRED_SCHEMA_VERSION, require_schema
from engine.store import (  # noqa: F401  (re-exported: engine/worker.py imports them from here)
    DEFAULT_MAX_ATTEMPTS,
    LIST_STATUSES,
    AckResult,
    CancelResult,
    DeadLetter,
    Failure,
    Job,
    JobOutcome,
    JobStatus,
    JobSummary,
    RescueResult,
    RunningJob,
    Schedule,
    ack_batch,
    claim_batch,
    new_claim_token,
    release_batch,
    rescue,
)
from engine.schedules import ScheduleError, ScheduleSpec, check_name
from engine.telemetry import encode_event

if TYPE_CHECKING:  # imported where used: `engine run` needs neither
    from psycopg_pool import ConnectionPool

    from engine.explain import Explanation

MAX_KEY_LENGTH: Final = 255
PRIORITY_RANGE: Final = range(-32768, 32768)
CANCEL_STATES: Final = ("pending", "scheduled", "running")
DONE_WINDOW_S: Final = 24 * 3600.0  # how far back the browser searches completed/cancelled jobs by default
MAX_LIST_LIMIT: Final = 10_000
WAIT_POLL_FIRST_S: Final = 0.02
WAIT_POLL_MAX_S: Final = 1.0

# Flows are never deleted, so a flow once seen registered stays known: per database, for the life of
# the process (a worker's follow-up enqueues pay the lookup once per flow, not once per job).
_known_flows: set[tuple[str, ...]] = set()  # (host, port, database, flow)

# The API's own retries of statements made safe by a key (enqueue_many's batch key, an ack id):
# transient errors (a restart, a failover, a dropped connection) are retried for this long.
TRANSIENT_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError, DatabaseUnavailable)
SAFE_RETRY_SECONDS: Final = 30.0
_RETRY_BACKOFF: Final = (0.1, 2.0)  # first delay, cap (doubling)


# ---------------------------------------------------------------------------------------------
# Validation


def _validate_key(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise ValidationError(f"{what} must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
    if any(ord(ch) < 32 for ch in value):
        raise ValidationError(f"{what} {value!r} must not contain control characters")
    _require_utf8(value, what)
    return value


def _require_utf8(value: str, what: str) -> None:
    problem = utf8_problem(value)
    if problem is not None:
        raise ValidationError(f"{what} is not valid UTF-8 text ({problem})")


def _validate_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT8_MAX:
        raise ValidationError(f"{what} {value!r} must be an integer from 1 to {INT8_MAX}")
    return value


def _validate_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_DURATION_S:
        raise ValidationError(f"{what} {value!r} must be a number of seconds from 0 to {MAX_DURATION_S:.0f}")
    return float(value)


@dataclass(frozen=True)
class EnqueueOptions:
    priority: int = 0
    delay: float = 0.0
    max_attempts: int | None = None  # None: the flow's policy decides when the job runs
    run_id: str | None = None

    def validated(self) -> "EnqueueOptions":
        if not isinstance(self.priority, int) or self.priority not in PRIORITY_RANGE:
            raise ValidationError(f"priority {self.priority!r} must be an integer from -32768 to 32767")
        _validate_seconds(self.delay, "delay")
        if self.max_attempts is not None and (isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int)
                                              or not 1 <= self.max_attempts <= INT4_MAX):
            raise ValidationError(f"max_attempts {self.max_attempts!r} must be an integer from 1 to {INT4_MAX}")
        _validate_key(self.run_id, "run id")
        return self


def _delay_from(delay: float | None, run_at: datetime | None) -> float:
    if run_at is not None:
        if delay:
            raise ValidationError("give either delay or run_at, not both")
        if run_at.tzinfo is None:
            raise ValidationError("run_at must be timezone-aware")
        return max(0.0, (run_at - datetime.now(timezone.utc)).total_seconds())
    return float(delay or 0.0)


def _require_known_flow(conn: psycopg.Connection[Any], flow: str, allow_unknown_flow: bool) -> None:
    """Refuse a flow no engine has registered: jobs of a misspelled flow would wait forever."""
    if allow_unknown_flow:
        return
    key = (str(conn.info.host), str(conn.info.port), conn.info.dbname, flow)
    if key in _known_flows:
        return
    if store.flows_known(conn, [flow]):
        _known_flows.add(key)
        return
    names = store.flow_names(conn, 500)
    close = difflib.get_close_matches(flow, names, n=1)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    raise UnknownFlow(
        f"flow {flow!r} is unknown: no engine has registered it"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; known flows: {shown or 'none yet'}. To enqueue for engines not deployed yet, pass "
          "allow_unknown_flow=True (engine enqueue --allow-unknown-flow)")


def _seal_flag(seal: object, run_id: str | None) -> bool | None:
    if seal is None:
        return None
    if not isinstance(seal, bool):
        raise ValidationError(f"seal {seal!r} must be true, false or None")
    if run_id is None:
        raise ValidationError("seal applies to a run: give run_id too")
    return seal


def _grow_run(conn: psycopg.Connection[Any], run_id: str, flow: str, inserted: int, sealed: bool | None) -> None:
    if inserted:
        store.run_add_jobs(conn, run_id, flow, inserted, sealed)
    elif sealed:  # nothing new (duplicates, or an empty last chunk): the seal still counts
        store.run_seal(conn, run_id)


def _cancel_states(status: str | Sequence[str] | None) -> set[str]:
    states = set(CANCEL_STATES) if status is None else {status} if isinstance(status, str) else set(status)
    wrong = sorted(states - set(CANCEL_STATES))
    if wrong or not states:
        raise ValidationError(f"cancel status {', '.join(wrong) or '(none)'} is invalid: use "
                              + ", ".join(CANCEL_STATES))
    return states


def _settled(job_id: int, outcome: JobOutcome | None) -> tuple[bool, Any]:
    """(True, result) once completed; raises when it ended otherwise; (False, status) while unfinished."""
    if outcome is None:
        raise JobNotFound(job_id)
    if outcome.status == "completed":
        return True, outcome.result
    if outcome.status == "dead":
        raise JobDead(job_id, outcome.error_type, outcome.error_message)
    if outcome.status == "cancelled":
        raise JobCancelled(job_id)
    return False, outcome.status


class _Backoff:
    """Poll delays for `wait`: 20 ms doubling to 1 s, never past the deadline (None: timed out)."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and (not isinstance(timeout, (int, float)) or not math.isfinite(timeout)
                                    or timeout < 0):
            raise ValidationError(f"timeout {timeout!r} must be a number of seconds >= 0, or None")
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delay = WAIT_POLL_FIRST_S

    def next(self) -> float | None:
        pause = self.delay
        self.delay = min(self.delay * 2, WAIT_POLL_MAX_S)
        if self.deadline is None:
            return pause
        left = self.deadline - time.monotonic()
        return None if left <= 0 else min(pause, left)


@dataclass(frozen=True)
class CancelReport:
    """What a cancel did. `unchanged` (cancel by id only): id -> why nothing changed."""

    cancelled: list[int]
    requested: list[int]
    unchanged: dict[int, str]

    @property
    def changed(self) -> int:
        return len(self.cancelled) + len(self.requested)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs the browser lists; every field narrows, None means any. `statuses`: any of
    pending, scheduled, running, dead, completed, cancelled (None: all). `payload`: top-level keys the
    payload must contain with these values. Completed and cancelled jobs are searched `since` seconds
    back (default 24 h): their history is never scanned whole."""

    flow: str | None = None
    statuses: Sequence[str] | None = None
    run_id: str | None = None
    older_than: float | None = None
    payload: Mapping[str, Any] | None = None
    since: float = DONE_WINDOW_S

    def validated_statuses(self) -> list[str]:
        statuses = list(LIST_STATUSES) if self.statuses is None else list(dict.fromkeys(self.statuses))
        wrong = [s for s in statuses if s not in LIST_STATUSES]
        if wrong or not statuses:
            raise ValidationError(f"status {', '.join(wrong) or '(none)'} is invalid: use "
                                  + ", ".join(LIST_STATUSES))
        return statuses

    def params(self) -> dict[str, Any]:
        if self.flow is not None:
            validate_flow(self.flow)
        _validate_key(self.run_id, "run id")
        for value, what in ((self.older_than, "older_than"), (self.since, "since")):
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ValidationError(f"{what} {value!r} must be a number of seconds >= 0")
        payload = None if self.payload is None else encode_payload(self.payload, "payload filter")
        return {"flow": self.flow, "run_id": self.run_id, "older_than": self.older_than, "payload": payload,
                "since": float(self.since)}


# ---------------------------------------------------------------------------------------------
# Hot path: plain functions on a connection


class ClaimedJob(NamedTuple):
    id: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    run_id: str | None
    wait_ms: float


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class EnqueueResult:
    inserted: int
    skipped: int  # duplicates of an unfinished job with the same dedupe key
    batch_key: str | None = None  # enqueue_many: the key its rows were recorded under
    replayed: bool = False  # the batch had committed before (a retry): counts are the first call's


def _retry_safe(what: str, action: Any, retry_for: float = SAFE_RETRY_SECONDS,
                reached: Any = lambda: True) -> Any:
    """Run `action()` again on transient errors for up to `retry_for` s: only for actions whose
    retry cannot apply twice. Raises DatabaseUnavailable naming `what` when time runs out.
    `retry_for` 0: one try, its error as it came. A failure to connect is retried only once
    `reached()` (the database was reached before): a bad or unreachable DSN fails at once."""
    if retry_for <= 0:
        return action()
    deadline = time.monotonic() + retry_for
    delay, cap = _RETRY_BACKOFF
    while True:
        try:
            return action()
        except TRANSIENT_ERRORS as exc:
            if isinstance(exc, DatabaseUnavailable) and not reached():
                raise
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(f"{what} failed for {retry_for:g} s: {describe_error(exc)}") from None
            time.sleep(delay)
            delay = min(delay * 2, cap)


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operation applies to; every field narrows, None means any."""

    ids: Sequence[int] | None = None
    flow: str | None = None
    error_type: str | None = None
    older_than: float | None = None  # seconds since the job died

    def params(self) -> dict[str, Any]:
        if self.flow is not None:
            validate_flow(self.flow)
        if self.older_than is not None:
            _validate_seconds(self.older_than, "older_than")
        _validate_key(self.error_type, "error type")
        return {
            "ids": [_validate_id(i, "job id") for i in self.ids] if self.ids is not None else None,
            "flow": self.flow,
            "error_type": self.error_type,
            "older_than": self.older_than,
        }

    def is_empty(self) -> bool:
        return self.ids is None and self.flow is None and self.error_type is None and self.older_than is None


def instance_info() -> dict[str, str]:
    host = socket.gethostname()
    return {"instance_id": f"{host}-{os.getpid()}", "hostname": host}


class Queue:
    """The public API. Give it a DSN (it opens one connection, or a pool with `pool_size`),
    an open psycopg connection, or a psycopg_pool.ConnectionPool.

    >>> q = Queue("postgresql://app@db/skiplock")
    >>> q.enqueue("send_email", {"to": "a@example.com"}, priority=5)
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
        pool: ConnectionPool | None = None,
        pool_size: int = 0,
        application_name: str = "skiplock",
        check_schema: bool = True,
    ) -> None:
        if sum(x is not None for x in (dsn, conn, pool)) != 1:
            raise ValueError("give exactly one of dsn, conn or pool")
        if dsn is not None:
            _require_utf8(dsn, "the DSN")
        self._dsn = dsn
        self._conn = conn
        self._pool = pool
        self._owns = dsn is not None
        self._application_name = application_name
        self._schema_checked = not check_schema
        # Retries need a fresh connection: not possible on a connection the caller gave (it may be
        # broken, or inside the caller's transaction).
        self._retry_for = SAFE_RETRY_SECONDS if conn is None else 0.0
        self._reached = False  # connected once: a later failure to connect is a restart, retried
        if dsn is not None and pool_size > 0:
            self._pool = db.open_pool(dsn, application_name=application_name, max_size=pool_size)

    def close(self) -> None:
        if not self._owns:
            return
        if self._pool is not None:
            self._pool.close()
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pool is not None:
            with self._pool.connection() as conn:
                self._reached = True
                self._check_schema(conn)
                yield conn
            return
        if self._conn is None or self._conn.closed:
            assert self._dsn is not None
            try:
                self._conn = db.connect(self._dsn, application_name=self._application_name)
            except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # Programming: a malformed DSN
                raise DatabaseUnavailable(describe_error(exc)) from None
        self._reached = True
        self._check_schema(self._conn)
        yield self._conn

    def _check_schema(self, conn: psycopg.Connection[Any]) -> None:
        if not self._schema_checked:
            require_schema(conn)
            self._schema_checked = True

    # -- enqueue ---------------------------------------------------------------------------------

    def enqueue(
        self,
        flow: str,
        payload: Mapping[str, Any],
        *,
        priority: int = 0,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        run_id: str | None = None,
        dedupe_key: str | None = None,
        allow_unknown_flow: bool = False,
        seal: bool | None = None,
        key: str | None = None,
    ) -> int | None:
        """Enqueue one job; returns its id, or None when an unfinished job has the same dedupe key.
        A flow no engine has registered is refused (UnknownFlow) unless `allow_unknown_flow`.
        `seal`: as enqueue_many's. `key`: the job's concurrency key (default: the payload field the
        flow's concurrency_key names)."""
        validate_flow(flow)
        options = EnqueueOptions(priority, _delay_from(delay, run_at), max_attempts, run_id).validated()
        text = encode_payload(payload, "payload")
        _validate_key(dedupe_key, "dedupe key")
        sealed = _seal_flag(seal, options.run_id)
        _validate_key(key, "concurrency key")
        with self.connection() as conn, conn.transaction():
            _require_known_flow(conn, flow, allow_unknown_flow)
            job_id = store.enqueue_one(conn, flow, text, priority=options.priority, delay=options.delay,
                                       max_attempts=options.max_attempts, run_id=options.run_id,
                                       dedupe_key=dedupe_key)
            if job_id is not None and key is not None:
                store.job_set_concurrency_key(conn, job_id, key)
            if options.run_id is not None:
                _grow_run(conn, options.run_id, flow, 0 if job_id is None else 1, sealed)
        return job_id

    def enqueue_many(
        self,
        flow: str,
        payloads: Iterable[Mapping[str, Any]],
        *,
        priority: int = 0,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        run_id: str | None = None,
        dedupe_keys: Sequence[str | None] | None = None,
        item_names: Sequence[str] | None = None,
        allow_unknown_flow: bool = False,
        batch_key: str | None = None,
        seal: bool | None = None,
        keys: Sequence[str | None] | None = None,
    ) -> EnqueueResult:
        """Enqueue many jobs of one flow in one transaction (COPY; unnest when dedupe keys are given).

        Every payload is validated before anything is sent: one bad item and nothing is inserted;
        the error names the item (`item_names[i]`, else "item i" counting from 0). A flow no engine
        has registered is refused (UnknownFlow) unless `allow_unknown_flow`.

        The batch is recorded under `batch_key` (default: a new key per call) in the same
        transaction, so it is inserted at most once per key: on a transient error (restart,
        dropped connection) this call retries by itself for SAFE_RETRY_SECONDS, and a retry of a
        batch that had committed inserts nothing and returns the first outcome with
        `replayed=True`. When retries run out it raises DatabaseUnavailable naming the key: call
        again with that `batch_key` (within a day, ENQUEUE_RECEIPT_RETENTION) to retry safely.

        With `run_id`: `seal=False` says more chunks of the run follow, so it cannot finish (and fire
        its hook) before the last one: pass `seal=True` with the last chunk, or call seal_run(run_id).
        Default (None): a new run is sealed; an existing run keeps its state. Jobs added to a run
        that had finished reopen it (README: "Runs").

        `keys`: a concurrency key per payload (None: from the payload field the flow's
        concurrency_key names, at claim).
        """
        validate_flow(flow)
        options = EnqueueOptions(priority, _delay_from(delay, run_at), max_attempts, run_id).validated()
        texts: list[str] = []
        for index, payload in enumerate(payloads):
            texts.append(encode_payload(payload, item_names[index] if item_names else f"item {index}"))
        if dedupe_keys is not None:
            if len(dedupe_keys) != len(texts):
                raise ValidationError(f"{len(dedupe_keys)} dedupe keys for {len(texts)} payloads")
            for index, key in enumerate(dedupe_keys):
                _validate_key(key, f"{item_names[index] if item_names else f'item {index}'}: dedupe key")
        if keys is not None:
            if len(keys) != len(texts):
                raise ValidationError(f"{len(keys)} concurrency keys for {len(texts)} payloads")
            for index, item_key in enumerate(keys):
                _validate_key(item_key, f"{item_names[index] if item_names else f'item {index}'}: concurrency key")
        key = _validate_key(batch_key, "batch key") or uuid.uuid4().hex
        sealed = _seal_flag(seal, options.run_id)
        if not texts and not (options.run_id is not None and sealed is not None):
            return EnqueueResult(0, 0, key)

        def attempt() -> EnqueueResult:
            with self.connection() as conn, conn.transaction():
                _require_known_flow(conn, flow, allow_unknown_flow)
                if not store.enqueue_receipt_claim(conn, key, flow):
                    receipt = store.enqueue_receipt_get(conn, key)
                    assert receipt is not None  # the claim waited for its holder's commit
                    if receipt.flow != flow:
                        raise ValidationError(f"batch key {key!r} was used for flow {receipt.flow!r}, not {flow!r}")
                    return EnqueueResult(receipt.inserted, receipt.skipped, key, replayed=True)
                if keys is not None:
                    inserted = store.enqueue_many_keyed(
                        conn, flow, texts, list(dedupe_keys) if dedupe_keys is not None else [None] * len(texts),
                        list(keys), priority=options.priority, delay=options.delay,
                        max_attempts=options.max_attempts, run_id=options.run_id)
                elif dedupe_keys is not None:
                    inserted = store.enqueue_many_dedupe(
                        conn, flow, texts, list(dedupe_keys), priority=options.priority, delay=options.delay,
                        max_attempts=options.max_attempts, run_id=options.run_id)
                else:
                    inserted = store.enqueue_copy(conn, flow, texts, priority=options.priority,
                                                  delay=options.delay, max_attempts=options.max_attempts,
                                                  run_id=options.run_id)
                if options.run_id is not None:
                    _grow_run(conn, options.run_id, flow, inserted, sealed)
                store.enqueue_receipt_record(conn, key, inserted, len(texts) - inserted)
            return EnqueueResult(inserted, len(texts) - inserted, key)

        return _retry_safe(f"enqueue of batch {key!r} ({len(texts)} jobs of {flow})", attempt, self._retry_for,
                           lambda: self._reached)

    # -- runs and pipelines (issue 15) -----------------------------------------------------------

    def seal_run(self, run_id: str) -> store.RunSealed:
        """The run's producer has added its last chunk (enqueue_many(..., seal=False) before): the run
        finishes once its jobs have all ended, or now if they have (its hook then fires from the
        next rescue pass of an engine serving its flow). Sealing a sealed run changes nothing
        (`was_sealed`). RunNotFound for an unknown run."""
        _validate_key(run_id, "run id")
        with self.connection() as conn, conn.transaction():
            sealed = store.run_seal(conn, run_id)
        if sealed is None:
            raise RunNotFound(run_id)
        return sealed

    def run(self, run_id: str) -> tuple[store.RunInfo, list[store.RunStage]]:
        """A run and its jobs per stage (flow), in pipeline order where its flows are linked."""
        _validate_key(run_id, "run id")
        with self.connection() as conn, conn.transaction():
            info = store.run_get(conn, run_id)
            if info is None:
                raise RunNotFound(run_id)
            stages = store.run_stages(conn, run_id)
            links = store.pipeline_links(conn)
        rank = {flow: i for i, flow in enumerate(f for chain in pipelines.chains(links) for f in chain)}
        stages.sort(key=lambda s: (rank.get(s.flow, len(rank)), s.flow))
        return info, stages

    def pipelines(self) -> list[pipelines.Pipeline]:
        """Each pipeline (flows linked by `next` or by parent -> child jobs) as its stages in order, with
        pending, scheduled, running, dead and done per second per stage."""
        with self.connection() as conn:
            links = store.pipeline_links(conn)
            if not links:
                return []
            live = {c.flow: c for c in store.status_live(conn, None)}
            rates = store.flow_rates(conn)
        return pipelines.build(links, live, rates)

    def job_children(self, job_id: int, limit: int = 100) -> list[store.ChildJob]:
        """The jobs `job_id`'s ack created (Next), any state, by id."""
        _validate_id(job_id, "job id")
        with self.connection() as conn:
            return store.job_children(conn, job_id, limit)

    # -- hot path, for callers that run their own worker loop -------------------------------------

    def claim(self, flow: str, worker_id: str, limit: int,
              max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> tuple[int, list[ClaimedJob]]:
        validate_flow(flow)
        token = new_claim_token()
        with self.connection() as conn:
            rows = claim_batch(conn, flow, worker_id, limit, token, max_attempts)
        return token, [ClaimedJob(*row) for row in rows]

    def ack(
        self,
        worker_id: str,
        token: int,
        done_ids: Sequence[int],
        results: Sequence[Any] | None = None,
        failures: Sequence[Failure] = (),
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        *,
        ack_id: int | None = None,
        children: store.Children | None = None,
    ) -> AckResult:
        """Acknowledge a claimed batch. Retried by itself on transient errors under one ack id
        (default: a new one per call; store.ack_batch), so a retry of an ack that had committed
        returns the first outcome rather than reporting the jobs refused. `children`: Next(...) jobs
        of the acked parents (engine.stages.split builds them), inserted by the same statement."""
        texts = None if results is None else [None if r is None else orjson.dumps(r).decode() for r in results]
        key = ack_id if ack_id is not None else store.new_ack_id()

        def attempt() -> AckResult:
            with self.connection() as conn:
                return ack_batch(conn, worker_id, token, done_ids, texts, failures, max_attempts, ack_id=key,
                                 children=children)

        return _retry_safe(f"ack {key}", attempt, self._retry_for,
                           lambda: self._reached)

    def heartbeat(self, worker_id: str) -> bool:
        """Keep a custom claim loop's jobs: renews `worker_id` (registering it on first use). Call it
        more often than the engines' `stale_after`. False once the id is lost (its jobs were rescued
        and its acks will be refused): stop working on them and claim under a new id."""
        _validate_key(worker_id, "worker id")
        with self.connection() as conn:
            return store.worker_api_heartbeat(conn, worker_id, socket.gethostname(), os.getpid())

    def release(self, worker_id: str, token: int, ids: Sequence[int]) -> int:
        with self.connection() as conn:
            return release_batch(conn, worker_id, token, ids)

    def rescue(self, stale_after: float) -> RescueResult:
        with self.connection() as conn:
            return rescue(conn, stale_after)

    def cleanup_orphaned_records(self, timeout_hours: float = 1.0) -> int:
        """Running jobs claimed more than `timeout_hours` ago go back to pending (seed API)."""
        with self.connection() as conn:
            return store.cleanup_orphaned(conn, timeout_hours * 3600.0)

    def reset_failed_records(self, flow_name: str, max_retries: int = 3) -> int:
        """Dead jobs of a flow that used fewer than `max_retries` attempts go back to pending (seed API)."""
        validate_flow(flow_name)
        with self.connection() as conn:
            return store.reset_failed(conn, flow_name, max_retries)

    def purge_completed(self, retention: float, slice_size: int = 10_000) -> int:
        """Delete completed jobs older than `retention` seconds, in bounded slices."""
        _validate_seconds(retention, "retention")
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or not 1 <= slice_size <= INT4_MAX:
            raise ValidationError(f"slice_size {slice_size!r} must be an integer from 1 to {INT4_MAX}")
        total = 0
        with self.connection() as conn:
            while True:
                deleted = store.purge_done(conn, retention, slice_size)
                total += deleted
                if deleted < slice_size:
                    return total

    # -- dead letters ----------------------------------------------------------------------------

    def dead_letters(self, where: DeadLetterFilter = DeadLetterFilter(), limit: int = 100) -> list[DeadLetter]:
        params = where.params()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= INT4_MAX:
            raise ValidationError(f"limit {limit!r} must be an integer from 0 to {INT4_MAX}")
        with self.connection() as conn:
            return store.dlq_list(conn, params, limit)

    def job(self, job_id: int) -> Job | None:
        _validate_id(job_id, "job id")
        with self.connection() as conn:
            job = store.job_get(conn, job_id)
            if job is not None and job.status in ("running", "pending", "dead"):
                progress = store.job_progress(conn, job_id)
                if progress is not None:
                    job = dataclasses.replace(job, progress=progress.progress,
                                              progress_message=progress.progress_message,
                                              progress_at=progress.progress_at)
            return job

    def explain(self, job_id: int, *, stale_after: float = 30.0) -> Explanation:
        """Why job `job_id` is not running now: every reason (engine.explain.Reason, typed by `kind`),
        or which worker runs it, or that it has ended. `stale_after`: the engines' setting, for "no
        live worker serves its flow". JobNotFound for an id no job has (or a purged one)."""
        from engine.explain import AHEAD_CAP, explain, explain_done

        _validate_id(job_id, "job id")
        with self.connection() as conn:
            facts = store.explain_job(conn, job_id, stale_after=stale_after, cap=AHEAD_CAP)
            if facts is not None:
                return explain(facts)
            done = store.explain_done(conn, job_id)
        if done is None:
            raise JobNotFound(job_id)
        return explain_done(job_id, done)

    def retry_dead(self, where: DeadLetterFilter) -> list[int]:
        """Dead jobs matching `where` go back to pending; returns their ids. Jobs no longer dead are
        left alone. An empty filter is refused: say `DeadLetterFilter(flow=...)` or similar."""
        if where.is_empty():
            raise ValidationError("retry needs job ids or a filter (flow, error type, age)")
        params = where.params()
        with self.connection() as conn, conn.transaction():
            return store.dlq_retry(conn, params)

    def retry_all_dead(self) -> list[int]:
        with self.connection() as conn, conn.transaction():
            return store.dlq_retry(conn, DeadLetterFilter().params())

    def purge_dead(self, where: DeadLetterFilter) -> list[int]:
        if where.is_empty():
            raise ValidationError("purge needs job ids or a filter (flow, error type, age)")
        params = where.params()
        with self.connection() as conn:
            return store.dlq_purge(conn, params)

    def analyze_dead(self, flow: str | None = None) -> list[dict[str, Any]]:
        if flow is not None:
            validate_flow(flow)
        with self.connection() as conn:
            return store.dlq_analyze(conn, flow)

    # -- job control: cancel, wait, browse -------------------------------------------------------

    def cancel(self, ids: Sequence[int] | None = None, *, flow: str | None = None, run_id: str | None = None,
               status: str | Sequence[str] | None = None) -> CancelReport:
        """Cancel jobs by id, or every job of a flow or of a run (narrowed by `status`: pending,
        scheduled, running; default all three). Pending and scheduled jobs end `cancelled` at once and
        never run; a running job's cancel is requested (`requested`): its worker stops it and it ends
        cancelled within the flow's cancel_grace. Guarded by status:
        a job that already ended is left alone and, when cancelled by id, listed in `unchanged`."""
        if (ids is None) == (flow is None and run_id is None):
            raise ValidationError("cancel takes job ids, or --flow and/or --run (not both ids and a selector)")
        if ids is not None:
            ids = list(ids)
            bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 1]
            if bad or not ids:
                raise ValidationError(f"job ids must be positive integers, got {bad or 'none'}")
        if flow is not None:
            validate_flow(flow)
        _validate_key(run_id, "run id")
        states = _cancel_states(status)
        with self.connection() as conn:
            result: CancelResult = store.cancel_jobs(
                conn, ids=ids, flow=flow, run_id=run_id, pending="pending" in states,
                scheduled="scheduled" in states, running="running" in states)
            unchanged: dict[int, str] = {}
            if ids is not None:
                left = sorted(set(ids) - set(result.cancelled) - set(result.requested))
                found = store.job_states(conn, left) if left else {}
                for job_id in left:
                    state = found.get(job_id)
                    if state is None:
                        unchanged[job_id] = "not found"
                    elif state.status == "running" and state.cancel_requested:
                        unchanged[job_id] = "running, cancel already requested"
                    elif state.status in ("pending", "running"):
                        unchanged[job_id] = f"{state.status}, not selected by status or busy: try again"
                    else:
                        unchanged[job_id] = f"already {state.status}"
        return CancelReport(result.cancelled, result.requested, unchanged)

    def wait(self, job_id: int, timeout: float | None = 30.0) -> Any:
        """Block until the job ends; return its result once completed. Raises JobDead, JobCancelled
        (both JobFailed), WaitTimeout when `timeout` seconds pass first (None: no limit), JobNotFound.
        Polls the job's row with backoff (20 ms doubling to 1 s): jobs nobody waits for pay nothing."""
        backoff = _Backoff(timeout)
        while True:
            with self.connection() as conn:
                done, value = _settled(job_id, store.job_outcome(conn, job_id))
            if done:
                return value
            pause = backoff.next()
            if pause is None:
                raise WaitTimeout(job_id, float(timeout or 0), value)
            time.sleep(pause)

    async def wait_async(self, job_id: int, timeout: float | None = 30.0) -> Any:
        """`wait` for asyncio applications: the same results and exceptions; sleeps on the event loop
        and sends each poll from a thread, so the loop never blocks on the database."""
        backoff = _Backoff(timeout)
        while True:
            done, value = _settled(job_id, await asyncio.to_thread(self._outcome, job_id))
            if done:
                return value
            pause = backoff.next()
            if pause is None:
                raise WaitTimeout(job_id, float(timeout or 0), value)
            await asyncio.sleep(pause)

    def _outcome(self, job_id: int) -> JobOutcome | None:
        with self.connection() as conn:
            return store.job_outcome(conn, job_id)

    def running(self, limit: int = 500) -> list[RunningJob]:
        """Jobs running now, longest running first: worker, claim time, attempt, the progress their
        handlers reported (ctx.progress) and whether a cancel was requested. One bounded statement."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValidationError(f"limit {limit!r} must be an integer from 1 to {MAX_LIST_LIMIT}")
        with self.connection() as conn:
            return store.jobs_running_now(conn, limit)

    def list_jobs(self, where: JobFilter = JobFilter(), limit: int = 100) -> list[JobSummary]:
        """Jobs in any state, at most `limit`: each status is one bounded, index-backed statement
        (see the jobs_list_* blocks of queries.sql), listed in the order of `where.statuses`."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValidationError(f"limit {limit!r} must be an integer from 1 to {MAX_LIST_LIMIT}")
        statuses = where.validated_statuses()
        params = where.params()
        found: list[JobSummary] = []
        with self.connection() as conn:
            for status in statuses:
                found.extend(store.jobs_list(conn, status, limit=limit - len(found), **params))
                if len(found) >= limit:
                    break
        return found

    def purge_cancelled(self, ids: Sequence[int]) -> list[int]:
        """Delete cancelled jobs by id (others are left alone); returns the ids deleted."""
        with self.connection() as conn:
            return store.cancelled_purge(conn, list(ids))

    # -- flows -----------------------------------------------------------------------------------

    def pause(self, flow: str) -> None:
        self._set_paused(flow, True)

    def resume(self, flow: str) -> None:
        self._set_paused(flow, False)

    def _set_paused(self, flow: str, paused: bool) -> None:
        validate_flow(flow)
        event = encode_event("flow_paused" if paused else "flow_resumed", flow=flow)
        with self.connection() as conn:
            store.flow_set_paused(conn, flow, paused, event)
        if not paused:
            with self.connection() as conn:
                store.notify_enqueued(conn)

    def flows(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return store.flows_list(conn)

    # -- schedules (engine/schedules.py) -----------------------------------------------------------

    def schedules(self) -> list[Schedule]:
        """Every schedule, with its next tick, last fire and the last job's outcome."""
        with self.connection() as conn:
            return store.schedules_list(conn)

    def schedule(self, name: str) -> Schedule:
        """One schedule; ValidationError when there is none of that name."""
        with self.connection() as conn:
            found = store.schedules_list(conn, _schedule_name(name))
            if not found:
                raise self._unknown_schedule(conn, name)
        return found[0]

    def add_schedule(self, name: str, flow: str, *, cron: str | None = None, every: float | None = None,
                     payload: Mapping[str, Any] | None = None, timezone: str = "UTC", catch_up: str = "last",
                     enabled: bool = True, known_flows: Iterable[str] = ()) -> Schedule:
        """Add a schedule at run time (`cron`: five fields or an @alias; `every`: seconds, at least 1).
        The flow must be one an engine has recorded, or in `known_flows` (the CLI passes the config's).
        Its first tick is the first one after the next schedule pass."""
        validate_flow(flow)
        try:
            spec = ScheduleSpec(name, flow, cron, every, dict(payload or {}), timezone, catch_up,  # type: ignore[arg-type]
                                enabled).validated()
        except ScheduleError as exc:
            raise ValidationError(f"schedule {name!r}: {exc}") from None
        with self.connection() as conn, conn.transaction():
            known = {row["name"] for row in store.flows_list(conn)} | set(known_flows)
            if flow not in known:
                raise ValidationError(f"schedule {name!r}: unknown flow {flow!r} "
                                      f"(known: {', '.join(sorted(known)) or 'none yet: start an engine'})")
            if not store.schedule_add(conn, spec.params()):
                raise ValidationError(f"schedule {name!r} already exists (remove it first)")
            return store.schedules_list(conn, name)[0]

    def remove_schedule(self, name: str) -> None:
        """Delete a schedule. A config schedule comes back when an engine with it in its config starts."""
        with self.connection() as conn:
            if not store.schedule_remove(conn, _schedule_name(name)):
                raise self._unknown_schedule(conn, name)

    def pause_schedule(self, name: str) -> None:
        """Stop firing; ticks missed while paused follow the schedule's catch_up on resume."""
        self._set_schedule_paused(name, True)

    def resume_schedule(self, name: str) -> None:
        self._set_schedule_paused(name, False)

    def _set_schedule_paused(self, name: str, paused: bool) -> None:
        with self.connection() as conn:
            if not store.schedule_set_paused(conn, _schedule_name(name), paused):
                raise self._unknown_schedule(conn, name)

    def trigger_schedule(self, name: str) -> int:
        """Enqueue one job of the schedule now (its own key); returns the job's id. Ticks are unchanged."""
        with self.connection() as conn, conn.transaction():
            job_id = store.schedule_trigger(conn, _schedule_name(name))
            if job_id is None:
                raise self._unknown_schedule(conn, name)
        return job_id

    @staticmethod
    def _unknown_schedule(conn: psycopg.Connection[Any], name: str) -> ValidationError:
        names = [s.name for s in store.schedules_list(conn, limit=50)]
        return ValidationError(f"unknown schedule {name!r} (known: {', '.join(names) or 'none'})")


    # -- status and health -----------------------------------------------------------------------

    def get_queue_status(self, flow_name: str | None = None) -> dict[str, Any]:
        """Counts in the seeds' format. `processing` is our `running`, `failed` our `dead`;
        `scheduled` (pending with a future run_at) is counted inside `pending` and also alone;
        `cancelled` (kept like completed jobs) is ours."""
        if flow_name is not None:
            validate_flow(flow_name)
        with self.connection() as conn:
            live = store.status_live(conn, flow_name)
            done = store.status_done(conn, flow_name)
            paused = {row["name"] for row in store.flows_list(conn) if row["paused"]}
        keys = ("pending", "scheduled", "processing", "completed", "failed", "cancelled")
        by_flow: dict[str, dict[str, Any]] = {}
        for c in live:
            by_flow[c.flow] = {"pending": c.pending + c.scheduled, "scheduled": c.scheduled,
                               "processing": c.running, "completed": 0, "failed": c.dead, "cancelled": 0}
        for d in done:
            counts = by_flow.setdefault(d.flow, dict.fromkeys(keys, 0))
            counts["completed"], counts["cancelled"] = d.completed, d.cancelled
        for flow, counts in by_flow.items():
            counts["paused"] = flow in paused
        totals = {key: sum(int(c[key]) for c in by_flow.values()) for key in keys}
        return {
            "total_records": totals["pending"] + totals["processing"] + totals["completed"] + totals["failed"]
            + totals["cancelled"],
            "pending_records": totals["pending"],
            "scheduled_records": totals["scheduled"],
            "processing_records": totals["processing"],
            "completed_records": totals["completed"],
            "failed_records": totals["failed"],
            "cancelled_records": totals["cancelled"],
            "by_flow": dict(sorted(by_flow.items())),
        }

    def health_check(self, stale_after: float = 30.0, slow_ms: float = 1000.0,
                     thresholds: Thresholds | None = None) -> dict[str, Any]:
        """The seeds' format, judged by engine/health.py (the one definition the CLI, /readyz and the
        console use): `status`, `reasons` (one line each) and `problems` ({code, status, reason}).
        `thresholds` (e.g. Thresholds.from_engine(settings.engine)) overrides stale_after and slow_ms."""
        if thresholds is None:
            thresholds = Thresholds(stale_after=stale_after, slow_ms=slow_ms)
        report: dict[str, Any] = {
            "status": "healthy",
            "version": __version__,
            "databases": {},
            "queue_status": {},
            "workers": {},
            "schema": {"version": None, "required": REQUIRED_SCHEMA_VERSION},
            "instance_info": instance_info(),
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reasons": [],
            "problems": [],
            "unserved_flows": {},
        }
        database: dict[str, Any] = {"status": "unhealthy", "connection": False, "response_time_ms": None}
        report["databases"]["skiplock"] = database
        try:
            with self._raw_connection() as conn:
                facts = read_facts(conn, thresholds)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            facts = health_unreachable(describe_error(exc))
        verdict = evaluate(facts, thresholds)
        if facts.database_up:
            database["connection"] = True
            database["response_time_ms"] = facts.response_ms
            report["schema"]["version"] = facts.schema_version
        current = facts.database_up and (facts.schema_version or 0) >= REQUIRED_SCHEMA_VERSION
        if current:
            database["status"] = "healthy"
            report["workers"] = {"live": facts.live_workers, "stale": facts.stale_workers, "lost": facts.lost_workers}
            report["unserved_flows"] = {f.name: f.due for f in facts.flows if f.due and not f.served}
            try:
                status = self.get_queue_status()
            except (psycopg.Error, DatabaseUnavailable):
                status = None
            if status is not None:
                report["queue_status"] = {k: status[k] for k in (
                    "pending_records", "processing_records", "failed_records", "completed_records",
                    "cancelled_records", "total_records")}
        report["status"] = verdict.status
        report["reasons"] = verdict.texts
        report["problems"] = [{"code": r.code, "status": r.status, "reason": r.text} for r in verdict.reasons]
        return report

    @contextmanager
    def _raw_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection without the schema check (health reports an old schema rather than raising)."""
        checked = self._schema_checked
        self._schema_checked = True
        try:
            with self.connection() as conn:
                yield conn
        finally:
            self._schema_checked = checked

    def workers(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return store.workers_list(conn)




def _schedule_name(name: object) -> str:
    try:
        return check_name(name)
    except ScheduleError as exc:
        raise ValidationError(str(exc)) from None


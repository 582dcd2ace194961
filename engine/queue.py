"""Queue operations: enqueue, claim, acknowledge, release, rescue, dead letters, status, health.

Two layers. The hot-path functions (`claim_batch`, `ack_batch`, `release_batch`) take a connection
and work on plain tuples, because Python CPU per job decides throughput. The `Queue` class is the
public API for application code and the CLI: it owns a connection or a pool and validates input.
All SQL is in engine/sql/queries.sql.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final, Literal, NamedTuple

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from engine import db
from engine.config import redact_text
from engine.errors import DatabaseUnavailable, ValidationError
from engine.migrate import REQUIRED_SCHEMA_VERSION, require_schema, schema_version
from engine.sql import Q
from engine.telemetry import encode_event

FLOW_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_PAYLOAD_BYTES: Final = 1 << 20
MAX_KEY_LENGTH: Final = 255
PRIORITY_RANGE: Final = range(-32768, 32768)
DEFAULT_MAX_ATTEMPTS: Final = 5
RESCUE_SLICE: Final = 10_000
NOTIFY_CHANNEL_ENQUEUED: Final = "skiplock_enqueued"

JobStatus = Literal["pending", "running", "completed", "dead"]


# ---------------------------------------------------------------------------------------------
# Validation


def validate_flow(flow: object) -> str:
    if not isinstance(flow, str) or not FLOW_NAME.match(flow):
        raise ValidationError(
            f"flow name {flow!r} is invalid: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return flow


def _validate_key(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_LENGTH:
        raise ValidationError(f"{what} must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
    if any(ord(ch) < 32 for ch in value):
        raise ValidationError(f"{what} {value!r} must not contain control characters")
    return value


def encode_payload(payload: object, where: str) -> str:
    """orjson-encode a payload; it must be a JSON object. `where` names the item in errors."""
    if not isinstance(payload, Mapping):
        raise ValidationError(f"{where}: payload must be a JSON object, got {type(payload).__name__}")
    try:
        text = orjson.dumps(payload).decode()
    except TypeError as exc:
        raise ValidationError(f"{where}: payload is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_PAYLOAD_BYTES:
        raise ValidationError(f"{where}: payload is {len(text)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed")
    if "\\u0000" in text:
        raise ValidationError(f"{where}: payload contains a NUL character, which PostgreSQL jsonb cannot store")
    return text


@dataclass(frozen=True)
class EnqueueOptions:
    priority: int = 0
    delay: float = 0.0
    max_attempts: int | None = None  # None: the flow's policy decides when the job runs
    run_id: str | None = None

    def validated(self) -> "EnqueueOptions":
        if not isinstance(self.priority, int) or self.priority not in PRIORITY_RANGE:
            raise ValidationError(f"priority {self.priority!r} must be an integer from -32768 to 32767")
        if not isinstance(self.delay, (int, float)) or not math.isfinite(self.delay) or self.delay < 0:
            raise ValidationError(f"delay {self.delay!r} must be a number of seconds >= 0")
        if self.max_attempts is not None and (not isinstance(self.max_attempts, int) or self.max_attempts < 1):
            raise ValidationError(f"max_attempts {self.max_attempts!r} must be an integer >= 1")
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


# ---------------------------------------------------------------------------------------------
# Hot path: plain functions on a connection


class ClaimedJob(NamedTuple):
    id: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    run_id: str | None
    wait_ms: float


class Failure(NamedTuple):
    job_id: int
    error_type: str
    message: str
    traceback: str | None
    permanent: bool
    delay: float  # seconds until the retry, when one is left


@dataclass(frozen=True)
class AckResult:
    completed: int
    retried: int
    dead_ids: list[int]
    finished_runs: list[str]
    refused: int


def new_claim_token() -> int:
    return secrets.randbits(63)


def claim_batch(
    conn: psycopg.Connection[Any], flow: str, worker_id: str, limit: int, token: int,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[tuple[Any, ...]]:
    """Claim up to `limit` jobs of `flow` (rows shaped like ClaimedJob). Autocommit: one round trip.
    `max_attempts` is the flow's policy, for jobs enqueued without their own."""
    cur = conn.execute(Q.claim_batch, {"flow": flow, "worker": worker_id, "limit": limit, "token": token,
                                       "max_attempts": max_attempts})
    return cur.fetchall()


def ack_batch(
    conn: psycopg.Connection[Any],
    worker_id: str,
    token: int,
    done_ids: Sequence[int],
    results: Sequence[str | None] | None = None,
    failures: Sequence[Failure] = (),
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> AckResult:
    """Acknowledge a claimed batch in one statement. `results` are JSON texts parallel to done_ids;
    `max_attempts` is the flow's policy, for jobs enqueued without their own."""
    params: dict[str, Any] = {
        "max_attempts": max_attempts,
        "worker": worker_id,
        "token": token,
        "done_ids": list(done_ids),
        "results": list(results) if results is not None else None,
        "fail_ids": [f.job_id for f in failures],
        "permanent": [f.permanent for f in failures],
        "error_types": [f.error_type for f in failures],
        "messages": [f.message for f in failures],
        "tracebacks": [f.traceback for f in failures],
        "delays": [float(f.delay) for f in failures],  # psycopg refuses lists mixing int and float
    }
    row = conn.execute(Q.ack_batch, params).fetchone()
    assert row is not None
    completed, retried, dead_ids, finished_runs = int(row[0]), int(row[1]), list(row[2]), list(row[3])
    refused = len(done_ids) + len(failures) - completed - retried - len(dead_ids)
    return AckResult(completed, retried, dead_ids, finished_runs, refused)


def release_batch(conn: psycopg.Connection[Any], worker_id: str, token: int, ids: Sequence[int]) -> int:
    row = conn.execute(Q.release_batch, {"ids": list(ids), "token": token, "worker": worker_id}).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class RescueResult:
    lost_workers: list[str]
    rescued_by_flow: dict[str, int]
    dead_by_flow: dict[str, int]

    @property
    def rescued(self) -> int:
        return sum(self.rescued_by_flow.values())

    @property
    def dead(self) -> int:
        return sum(self.dead_by_flow.values())


def rescue(conn: psycopg.Connection[Any], stale_after: float) -> RescueResult:
    """Mark workers with stale heartbeats lost and put their running jobs back (in bounded slices)."""
    with conn.transaction():
        lost = [row[0] for row in conn.execute(Q.rescue_stale_workers, {"stale_after": stale_after})]
    rescued: dict[str, int] = {}
    dead: dict[str, int] = {}
    while True:
        with conn.transaction():
            rows = conn.execute(Q.rescue_jobs, {"stale_after": stale_after, "limit": RESCUE_SLICE}).fetchall()
        for flow, n_rescued, n_dead, _ in rows:
            rescued[flow] = rescued.get(flow, 0) + int(n_rescued)
            dead[flow] = dead.get(flow, 0) + int(n_dead)
        if sum(int(r[1]) + int(r[2]) for r in rows) < RESCUE_SLICE:
            break
    return RescueResult(lost, {k: v for k, v in rescued.items() if v}, {k: v for k, v in dead.items() if v})


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class EnqueueResult:
    inserted: int
    skipped: int  # duplicates of an unfinished job with the same dedupe key


@dataclass(frozen=True)
class Job:
    id: int
    flow: str
    payload: dict[str, Any]
    status: JobStatus
    priority: int
    run_at: datetime | None
    attempts: int
    max_attempts: int
    claimed_by: str | None
    claimed_at: datetime | None
    error_type: str | None
    error_message: str | None
    errors: list[dict[str, Any]]
    result: Any
    run_id: str | None
    dedupe_key: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "Job":
        return cls(*row)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class DeadLetter:
    id: int
    flow: str
    attempts: int
    max_attempts: int
    error_type: str | None
    error_message: str | None
    finished_at: datetime | None
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


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
        if self.older_than is not None and (not math.isfinite(self.older_than) or self.older_than < 0):
            raise ValidationError(f"older_than {self.older_than!r} must be a number of seconds >= 0")
        return {
            "ids": list(self.ids) if self.ids is not None else None,
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
        self._dsn = dsn
        self._conn = conn
        self._pool = pool
        self._owns = dsn is not None
        self._application_name = application_name
        self._schema_checked = not check_schema
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
                self._check_schema(conn)
                yield conn
            return
        if self._conn is None or self._conn.closed:
            assert self._dsn is not None
            try:
                self._conn = db.connect(self._dsn, application_name=self._application_name)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(_first_line(exc)) from None
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
    ) -> int | None:
        """Enqueue one job; returns its id, or None when an unfinished job has the same dedupe key."""
        validate_flow(flow)
        options = EnqueueOptions(priority, _delay_from(delay, run_at), max_attempts, run_id).validated()
        text = encode_payload(payload, "payload")
        _validate_key(dedupe_key, "dedupe key")
        with self.connection() as conn, conn.transaction():
            row = conn.execute(
                Q.enqueue_one,
                {"flow": flow, "payload": text, "priority": options.priority, "delay": options.delay,
                 "max_attempts": options.max_attempts, "run_id": options.run_id, "dedupe_key": dedupe_key},
            ).fetchone()
            if row is not None and options.run_id is not None:
                conn.execute(Q.run_add_jobs, {"run_id": options.run_id, "flow": flow, "count": 1})
        return int(row[0]) if row is not None else None

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
    ) -> EnqueueResult:
        """Enqueue many jobs of one flow in one transaction (COPY; unnest when dedupe keys are given).

        Every payload is validated before anything is sent: one bad item and nothing is inserted;
        the error names the item (`item_names[i]`, else "item i" counting from 0).
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
        if not texts:
            return EnqueueResult(0, 0)
        with self.connection() as conn, conn.transaction():
            if dedupe_keys is not None:
                cur = conn.execute(
                    Q.enqueue_many_dedupe,
                    {"flow": flow, "payloads": texts, "dedupe_keys": list(dedupe_keys),
                     "priority": options.priority, "delay": options.delay,
                     "max_attempts": options.max_attempts, "run_id": options.run_id},
                )
                inserted = cur.rowcount
            else:
                _copy_jobs(conn, flow, texts, options)
                inserted = len(texts)
            if options.run_id is not None and inserted:
                conn.execute(Q.run_add_jobs, {"run_id": options.run_id, "flow": flow, "count": inserted})
        return EnqueueResult(inserted, len(texts) - inserted)

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
    ) -> AckResult:
        texts = None if results is None else [None if r is None else orjson.dumps(r).decode() for r in results]
        with self.connection() as conn:
            return ack_batch(conn, worker_id, token, done_ids, texts, failures, max_attempts)

    def heartbeat(self, worker_id: str) -> bool:
        """Keep a custom claim loop's jobs: renews `worker_id` (registering it on first use). Call it
        more often than the engines' `stale_after`. False once the id is lost (its jobs were rescued
        and its acks will be refused): stop working on them and claim under a new id."""
        _validate_key(worker_id, "worker id")
        with self.connection() as conn:
            row = conn.execute(Q.worker_api_heartbeat, {"id": worker_id, "host": socket.gethostname(),
                                                        "pid": os.getpid()}).fetchone()
        return row is not None

    def release(self, worker_id: str, token: int, ids: Sequence[int]) -> int:
        with self.connection() as conn:
            return release_batch(conn, worker_id, token, ids)

    def rescue(self, stale_after: float) -> RescueResult:
        with self.connection() as conn:
            return rescue(conn, stale_after)

    def cleanup_orphaned_records(self, timeout_hours: float = 1.0) -> int:
        """Running jobs claimed more than `timeout_hours` ago go back to pending (seed API)."""
        with self.connection() as conn:
            row = conn.execute(Q.cleanup_orphaned, {"timeout": timeout_hours * 3600.0}).fetchone()
        return int(row[0]) if row else 0

    def reset_failed_records(self, flow_name: str, max_retries: int = 3) -> int:
        """Dead jobs of a flow that used fewer than `max_retries` attempts go back to pending (seed API)."""
        validate_flow(flow_name)
        with self.connection() as conn:
            row = conn.execute(Q.reset_failed, {"flow": flow_name, "max_retries": max_retries}).fetchone()
        return int(row[0]) if row else 0

    def purge_completed(self, retention: float, slice_size: int = 10_000) -> int:
        """Delete completed jobs older than `retention` seconds, in bounded slices."""
        total = 0
        with self.connection() as conn:
            while True:
                deleted = conn.execute(Q.purge_done, {"retention": retention, "limit": slice_size}).rowcount
                total += deleted
                if deleted < slice_size:
                    return total

    # -- dead letters ----------------------------------------------------------------------------

    def dead_letters(self, where: DeadLetterFilter = DeadLetterFilter(), limit: int = 100) -> list[DeadLetter]:
        params = where.params()
        params["limit"] = limit
        with self.connection() as conn:
            return [DeadLetter(*row) for row in conn.execute(Q.dlq_list, params)]

    def job(self, job_id: int) -> Job | None:
        with self.connection() as conn:
            row = conn.execute(Q.job_get, {"id": job_id}).fetchone()
        return Job.from_row(row) if row else None

    def retry_dead(self, where: DeadLetterFilter) -> list[int]:
        """Dead jobs matching `where` go back to pending; returns their ids. Jobs no longer dead are
        left alone. An empty filter is refused: say `DeadLetterFilter(flow=...)` or similar."""
        if where.is_empty():
            raise ValidationError("retry needs job ids or a filter (flow, error type, age)")
        with self.connection() as conn, conn.transaction():
            row = conn.execute(Q.dlq_retry, where.params()).fetchone()
        return sorted(row[0]) if row else []

    def retry_all_dead(self) -> list[int]:
        with self.connection() as conn, conn.transaction():
            row = conn.execute(Q.dlq_retry, DeadLetterFilter().params()).fetchone()
        return sorted(row[0]) if row else []

    def purge_dead(self, where: DeadLetterFilter) -> list[int]:
        if where.is_empty():
            raise ValidationError("purge needs job ids or a filter (flow, error type, age)")
        with self.connection() as conn:
            row = conn.execute(Q.dlq_purge, where.params()).fetchone()
        return sorted(row[0]) if row else []

    def analyze_dead(self, flow: str | None = None) -> list[dict[str, Any]]:
        if flow is not None:
            validate_flow(flow)
        with self.connection() as conn:
            cur = conn.execute(Q.dlq_analyze, {"flow": flow})
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, row)) for row in cur]

    # -- flows -----------------------------------------------------------------------------------

    def pause(self, flow: str) -> None:
        self._set_paused(flow, True)

    def resume(self, flow: str) -> None:
        self._set_paused(flow, False)

    def _set_paused(self, flow: str, paused: bool) -> None:
        validate_flow(flow)
        event = encode_event("flow_paused" if paused else "flow_resumed", flow=flow)
        with self.connection() as conn, conn.transaction():
            conn.execute(Q.flow_set_paused, {"flow": flow, "paused": paused})
            conn.execute(Q.flow_paused_changed_notify, {"payload": event})
        if not paused:
            with self.connection() as conn:
                conn.execute(Q.notify_enqueued)

    def flows(self) -> list[dict[str, Any]]:
        with self.connection() as conn:
            cur = conn.execute(Q.flows_list)
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, row)) for row in cur]

    # -- status and health -----------------------------------------------------------------------

    def get_queue_status(self, flow_name: str | None = None) -> dict[str, Any]:
        """Counts in the seeds' format. `processing` is our `running`, `failed` our `dead`;
        `scheduled` (pending with a future run_at) is counted inside `pending` and also alone."""
        if flow_name is not None:
            validate_flow(flow_name)
        with self.connection() as conn:
            live = conn.execute(Q.status_live, {"flow": flow_name}).fetchall()
            completed = dict(conn.execute(Q.status_completed, {"flow": flow_name}).fetchall())
            paused = {row[0] for row in conn.execute(Q.flows_list) if row[1]}
        by_flow: dict[str, dict[str, Any]] = {}
        for flow, pending, scheduled, running, dead in live:
            by_flow[flow] = {"pending": pending + scheduled, "scheduled": scheduled, "processing": running,
                             "completed": 0, "failed": dead}
        for flow, count in completed.items():
            by_flow.setdefault(flow, {"pending": 0, "scheduled": 0, "processing": 0, "completed": 0, "failed": 0})
            by_flow[flow]["completed"] = count
        for flow, counts in by_flow.items():
            counts["paused"] = flow in paused
        totals = {key: sum(int(c[key]) for c in by_flow.values())
                  for key in ("pending", "scheduled", "processing", "completed", "failed")}
        return {
            "total_records": totals["pending"] + totals["processing"] + totals["completed"] + totals["failed"],
            "pending_records": totals["pending"],
            "scheduled_records": totals["scheduled"],
            "processing_records": totals["processing"],
            "completed_records": totals["completed"],
            "failed_records": totals["failed"],
            "by_flow": dict(sorted(by_flow.items())),
        }

    def health_check(self, stale_after: float = 30.0, slow_ms: float = 1000.0) -> dict[str, Any]:
        """The seeds' format. unhealthy: database unreachable or schema too old; degraded: workers
        with stale heartbeats, or the database slower than `slow_ms` to answer."""
        report: dict[str, Any] = {
            "status": "healthy",
            "databases": {},
            "queue_status": {},
            "workers": {},
            "schema": {"version": None, "required": REQUIRED_SCHEMA_VERSION},
            "instance_info": instance_info(),
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reasons": [],
        }
        database: dict[str, Any] = {"status": "unhealthy", "connection": False, "response_time_ms": None}
        report["databases"]["skiplock"] = database
        try:
            started = time.perf_counter()
            with self._raw_connection() as conn:
                conn.execute(Q.health_ping)
                database["response_time_ms"] = round((time.perf_counter() - started) * 1000.0, 2)
                database["connection"] = True
                version = schema_version(conn)
                report["schema"]["version"] = version
                if version < REQUIRED_SCHEMA_VERSION:
                    database["status"] = "unhealthy"
                    report["reasons"].append("schema outdated: run `engine migrate`")
                else:
                    database["status"] = "healthy"
                    stale = conn.execute(Q.workers_stale_count, {"stale_after": stale_after}).fetchone()
                    live = conn.execute(Q.workers_list).fetchall()
                    report["workers"] = {"live": sum(1 for w in live if w[5] not in ("stopped", "lost")),
                                         "stale": int(stale[0]) if stale else 0}
        except (psycopg.Error, DatabaseUnavailable) as exc:
            report["reasons"].append(f"database unreachable: {_first_line(exc)}")
        if database["status"] == "healthy":
            status = self.get_queue_status()
            report["queue_status"] = {k: status[k] for k in (
                "pending_records", "processing_records", "failed_records", "completed_records", "total_records")}
            if report["workers"].get("stale"):
                report["reasons"].append(f"{report['workers']['stale']} worker(s) with stale heartbeats")
            if database["response_time_ms"] > slow_ms:
                report["reasons"].append(f"database answered in {database['response_time_ms']} ms")
            report["status"] = "degraded" if report["reasons"] else "healthy"
        else:
            report["status"] = "unhealthy"
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
            cur = conn.execute(Q.workers_list)
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, row)) for row in cur]


def _copy_escape(text: str) -> str:
    # COPY text format: backslash is the escape character. orjson never emits raw tabs or newlines.
    return text.replace("\\", "\\\\")


def _copy_jobs(conn: psycopg.Connection[Any], flow: str, texts: list[str], options: EnqueueOptions) -> None:
    row = conn.execute(Q.run_at_after, {"delay": options.delay}).fetchone()
    assert row is not None
    suffix = "\t{}\t{}\t{}\t{}\n".format(
        options.priority, row[0], "\\N" if options.max_attempts is None else options.max_attempts,
        "\\N" if options.run_id is None else _copy_escape(options.run_id),
    )
    prefix = flow + "\t"
    with conn.cursor().copy(Q.enqueue_copy) as copy:
        chunk: list[str] = []
        for text in texts:
            chunk.append(prefix)
            chunk.append(_copy_escape(text) if "\\" in text else text)
            chunk.append(suffix)
            if len(chunk) >= 3 * 5000:
                copy.write("".join(chunk))
                chunk.clear()
        if chunk:
            copy.write("".join(chunk))


def _first_line(exc: BaseException) -> str:
    """The error's first line with DSN passwords redacted (libpq quotes a malformed URI whole)."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return redact_text(text)


def new_worker_id(engine_id: str, index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{engine_id[:8]}:{index}"


def new_engine_id() -> str:
    return uuid.uuid4().hex

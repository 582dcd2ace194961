"""The store: every statement of engine/sql/queries.sql is sent by one named function here.

A reader finds every database round trip the engine and the console make in this module, and every
statement's text in queries.sql. Functions take an open connection; transactions are the caller's,
except where statements must commit together (`rescue`'s slices, `flow_set_paused` with its event).

Hot path (claim_batch, ack_batch, release_batch): plain tuples, because Python CPU per job decides
throughput. Everything else returns typed rows: psycopg `class_row` into frozen dataclasses whose
field names are the statements' column aliases.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple, TypeVar

import psycopg
from psycopg.rows import class_row, dict_row

from engine.sql import Q
from engine.telemetry import FlowCounts

DEFAULT_MAX_ATTEMPTS: Final = 5
RESCUE_SLICE: Final = 10_000
# A job's error history keeps its first attempt and this many of its last (skiplock.errors_append).
ERRORS_KEPT: Final = 10
# Receipts only serve retries: an ack's within its sender's retry window (the worker retries for a
# minute; one receipt per batch, so at 500 batches/s ten minutes is 300,000 small rows), an enqueue
# batch's within a producer's (a restart, a redeploy).
ACK_RECEIPT_RETENTION: Final = 600.0
ENQUEUE_RECEIPT_RETENTION: Final = 86400.0

# As stored: a scheduled job is `pending` with a future run_at (the browser reports it as "scheduled").
JobStatus = Literal["pending", "running", "completed", "dead", "cancelled"]
CANCEL_SLICE: Final = 10_000
Conn = psycopg.Connection[Any]
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Rows


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
    children: int = 0  # Next(...) jobs the ack inserted (engine/stages.py)


class Children:
    """The Next(...) children of an ack's parents, as the parallel arrays ack_batch sends: one entry
    per child, validated by the worker (engine/stages.py). The ack inserts only the children of
    parents it completed."""

    __slots__ = ("parents", "flows", "payloads", "priorities", "delays", "max_attempts", "dedupe_keys")

    def __init__(self) -> None:
        self.parents: list[int] = []
        self.flows: list[str] = []
        self.payloads: list[str] = []  # JSON texts
        self.priorities: list[int] = []
        self.delays: list[float] = []
        self.max_attempts: list[int | None] = []
        self.dedupe_keys: list[str | None] = []

    def add(self, parent: int, flow: str, payload: str, priority: int, delay: float, max_attempts: int | None,
            dedupe_key: str | None) -> None:
        self.parents.append(parent)
        self.flows.append(flow)
        self.payloads.append(payload)
        self.priorities.append(priority)
        self.delays.append(float(delay))
        self.max_attempts.append(max_attempts)
        self.dedupe_keys.append(dedupe_key)

    def extend(self, other: "Children") -> None:
        for name in self.__slots__:
            getattr(self, name).extend(getattr(other, name))

    def __len__(self) -> int:
        return len(self.parents)

    def params(self) -> dict[str, Any]:
        return {"child_parents": self.parents, "child_flows": self.flows, "child_payloads": self.payloads,
                "child_priorities": self.priorities, "child_delays": self.delays,
                "child_max_attempts": self.max_attempts, "child_dedupe_keys": self.dedupe_keys}


# The plain ack's children arrays: empty, built once.
NO_CHILDREN: Final[Mapping[str, Any]] = Children().params()


@dataclass(frozen=True)
class EnqueueReceipt:
    flow: str
    inserted: int
    skipped: int


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


@dataclass(frozen=True)
class Scheduled:
    """Pending jobs of a flow scheduled for later (what a drain leaves behind)."""

    flow: str
    jobs: int
    next_run_at: datetime


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
    cancel_requested_at: datetime | None = None
    # The current (or last) attempt's ctx.progress, read apart by Queue.job (store.job_progress).
    progress: float | None = None
    progress_message: str | None = None
    progress_at: datetime | None = None
    parent_id: int | None = None  # the job whose ack created this one (Next)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class JobSummary:
    """One row of the job browser. `status` also says "scheduled" (pending with a future run_at)."""

    id: int
    flow: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_id: str | None
    payload: dict[str, Any]
    created_at: datetime
    run_at: datetime | None
    claimed_by: str | None
    claimed_at: datetime | None
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
    cancel_requested_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class CancelResult:
    cancelled: list[int]  # pending or scheduled jobs now cancelled
    requested: list[int]  # running jobs whose cancel is now requested (their worker ends them)
    runs: int  # runs whose accounting changed


@dataclass(frozen=True)
class JobState:
    id: int
    status: str
    cancel_requested: bool


@dataclass(frozen=True)
class JobOutcome:
    status: str
    result: Any
    error_type: str | None
    error_message: str | None


@dataclass(frozen=True)
class DoneCounts:
    flow: str
    completed: int
    cancelled: int


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
class RunSummary:
    """A finished run, as its on-complete hook and the run_finished event see it."""

    run: str
    flow: str
    total: int
    completed: int
    dead: int

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "flow": self.flow, "total": self.total, "completed": self.completed,
                "dead": self.dead}


@dataclass(frozen=True)
class LiveCounts:
    flow: str
    pending: int
    scheduled: int
    running: int
    dead: int


@dataclass(frozen=True)
class ActiveSchedule:
    """A schedule the leader's pass looks at, with the database's clock."""

    name: str
    cron: str | None
    every_ms: int | None
    timezone: str
    catch_up: Literal["last", "none"]
    next_at: datetime | None
    checked_at: datetime | None
    since: datetime  # last declared change (added, timing changed): a new timing starts from here
    now: datetime


@dataclass(frozen=True)
class Schedule:
    name: str
    flow: str
    cron: str | None
    every_ms: int | None
    payload: dict[str, Any]
    timezone: str
    catch_up: Literal["last", "none"]
    enabled: bool  # declared (config or add)
    paused: bool  # the operator's pause
    source: Literal["config", "runtime"]
    next_at: datetime | None
    last_tick_at: datetime | None
    last_fired_at: datetime | None
    last_job_id: int | None
    last_outcome: str | None  # the last job's status: pending, running, completed, dead, ..., gone

    @property
    def state(self) -> str:
        return "paused" if self.paused else ("active" if self.enabled else "disabled")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {"state": self.state}


def _rows(conn: Conn, cls: type[T], sql: str, params: Mapping[str, Any] | None = None) -> list[T]:
    with conn.cursor(row_factory=class_row(cls)) as cur:
        return cur.execute(sql, params).fetchall()


def _dicts(conn: Conn, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def _scalar(conn: Conn, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row is not None else None


# ---------------------------------------------------------------------------------------------
# Migrations and schema


def migrations_lock(conn: Conn, poll: float = 0.05) -> None:
    """Take the migration lock, polling outside any transaction (see queries.sql)."""
    while not _scalar(conn, Q.migrations_lock):
        time.sleep(poll)


def migrations_unlock(conn: Conn) -> None:
    conn.execute(Q.migrations_unlock)


def migrations_bootstrap(conn: Conn) -> None:
    conn.execute(Q.migrations_bootstrap)


def migrations_applied(conn: Conn) -> set[int]:
    return {row[0] for row in conn.execute(Q.migrations_applied)}


def migrations_record(conn: Conn, version: int, name: str, min_code_version: str | None = None) -> None:
    conn.execute(Q.migrations_record, {"version": version, "name": name, "min_code_version": min_code_version})


def migrations_lock_timeout(conn: Conn, seconds: float | None, *, local: bool) -> None:
    """Set lock_timeout for this transaction (`local`) or the session; None: back to no limit."""
    value = "0" if seconds is None else f"{max(1, int(seconds * 1000))}ms"
    conn.execute(Q.migrations_lock_timeout, {"value": value, "local": local})


def schema_migrations_detail(conn: Conn) -> list[tuple[int, str | None, str]]:
    """(version, min_code_version, name) of every applied migration; [] before the first."""
    if not _scalar(conn, Q.schema_migrations_exists):
        return []
    return [(int(v), m, n) for v, m, n in conn.execute(Q.schema_migrations_detail)]


def schema_version(conn: Conn) -> int:
    if not _scalar(conn, Q.schema_migrations_exists):
        return 0
    return int(_scalar(conn, Q.schema_version) or 0)


def health_ping(conn: Conn) -> None:
    conn.execute(Q.health_ping)


# ---------------------------------------------------------------------------------------------
# Enqueue


def enqueue_one(conn: Conn, flow: str, payload: str, *, priority: int, delay: float, max_attempts: int | None,
                run_id: str | None, dedupe_key: str | None) -> int | None:
    """Returns the new job's id, or None when an unfinished job holds the dedupe key."""
    job_id = _scalar(conn, Q.enqueue_one, {
        "flow": flow, "payload": payload, "priority": priority, "delay": delay, "max_attempts": max_attempts,
        "run_id": run_id, "dedupe_key": dedupe_key})
    return None if job_id is None else int(job_id)


def enqueue_many_dedupe(conn: Conn, flow: str, payloads: list[str], dedupe_keys: list[str | None], *,
                        priority: int, delay: float, max_attempts: int | None, run_id: str | None) -> int:
    """Returns how many were inserted (duplicates of an unfinished job's key are skipped)."""
    cur = conn.execute(Q.enqueue_many_dedupe, {
        "flow": flow, "payloads": payloads, "dedupe_keys": dedupe_keys, "priority": priority, "delay": delay,
        "max_attempts": max_attempts, "run_id": run_id})
    return cur.rowcount


def enqueue_many_keyed(conn: Conn, flow: str, payloads: list[str], dedupe_keys: list[str | None],
                       keys: list[str | None], *, priority: int, delay: float, max_attempts: int | None,
                       run_id: str | None) -> int:
    """enqueue_many_dedupe with a concurrency key per payload. Returns how many were inserted."""
    cur = conn.execute(Q.enqueue_many_keyed, {
        "flow": flow, "payloads": payloads, "dedupe_keys": dedupe_keys, "keys": keys, "priority": priority,
        "delay": delay, "max_attempts": max_attempts, "run_id": run_id})
    return cur.rowcount


def job_set_concurrency_key(conn: Conn, job_id: int, key: str) -> None:
    conn.execute(Q.job_set_concurrency_key, {"id": job_id, "key": key})


def _copy_escape(text: str) -> str:
    # COPY text format: backslash is the escape character. orjson never emits raw tabs or newlines.
    return text.replace("\\", "\\\\")


def enqueue_copy(conn: Conn, flow: str, payloads: list[str], *, priority: int, delay: float,
                 max_attempts: int | None, run_id: str | None) -> int:
    """COPY the payloads (JSON texts) in; the batch's run_at comes from the server clock."""
    run_at = _scalar(conn, Q.run_at_after, {"delay": delay})
    suffix = "\t{}\t{}\t{}\t{}\n".format(
        priority, run_at, "\\N" if max_attempts is None else max_attempts,
        "\\N" if run_id is None else _copy_escape(run_id),
    )
    prefix = flow + "\t"
    with conn.cursor().copy(Q.enqueue_copy) as copy:
        chunk: list[str] = []
        for text in payloads:
            chunk.append(prefix)
            chunk.append(_copy_escape(text) if "\\" in text else text)
            chunk.append(suffix)
            if len(chunk) >= 3 * 5000:
                copy.write("".join(chunk))
                chunk.clear()
        if chunk:
            copy.write("".join(chunk))
    return len(payloads)


def enqueue_receipt_claim(conn: Conn, batch_key: str, flow: str) -> bool:
    """In the batch's transaction, before its rows: False when the key is taken (the batch committed
    before, or a concurrent one with the same key just did: this waited for it)."""
    return conn.execute(Q.enqueue_receipt_claim, {"batch_key": batch_key, "flow": flow}).fetchone() is not None


def enqueue_receipt_record(conn: Conn, batch_key: str, inserted: int, skipped: int) -> None:
    conn.execute(Q.enqueue_receipt_record, {"batch_key": batch_key, "inserted": inserted, "skipped": skipped})


def enqueue_receipt_get(conn: Conn, batch_key: str) -> EnqueueReceipt | None:
    rows = _rows(conn, EnqueueReceipt, Q.enqueue_receipt_get, {"batch_key": batch_key})
    return rows[0] if rows else None


def run_add_jobs(conn: Conn, run_id: str, flow: str, count: int, sealed: bool | None = None) -> None:
    """`count` > 0 jobs join the run. `sealed`: False while more chunks follow, True for the last,
    None: a new run is sealed, an existing one keeps its state."""
    conn.execute(Q.run_add_jobs, {"run_id": run_id, "flow": flow, "count": count, "sealed": sealed})


def notify_enqueued(conn: Conn) -> None:
    conn.execute(Q.notify_enqueued)


# ---------------------------------------------------------------------------------------------
# Hot path: claim and ack (tuples)


def new_claim_token() -> int:
    return secrets.randbits(63)


def new_ack_id() -> int:
    """An id for one ack, chosen before its first try and re-presented by every retry."""
    return secrets.randbits(63)


def claim_batch(conn: Conn, flow: str, worker_id: str, limit: int, token: int,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[tuple[Any, ...]]:
    """Claim up to `limit` jobs of `flow`: rows (id, payload, attempts, max_attempts, run_id, wait_ms).
    Autocommit: one round trip. `max_attempts` is the flow's policy, for jobs enqueued without their own."""
    cur = conn.execute(Q.claim_batch, {"flow": flow, "worker": worker_id, "limit": limit, "token": token,
                                       "max_attempts": max_attempts})
    return cur.fetchall()


def _results_by_id(done_ids: Sequence[int], results: Sequence[str | None] | None) -> str | None:
    """The JSON texts of `results` as one JSON object by job id (ack_batch looks each row up in it)."""
    if results is None:
        return None
    return "{" + ",".join(f'"{i}":{r}' for i, r in zip(done_ids, results) if r is not None) + "}"


def ack_batch(
    conn: Conn,
    worker_id: str,
    token: int,
    done_ids: Sequence[int],
    results: Sequence[str | None] | None = None,
    failures: Sequence[Failure] = (),
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    *,
    ack_id: int | None = None,
    children: Children | None = None,
) -> AckResult:
    """Acknowledge a claimed batch in one statement. `results` are JSON texts parallel to done_ids;
    `max_attempts` is the flow's policy, for jobs enqueued without their own. `children`: Next(...)
    jobs to insert in the same statement, for those of their parents this ack completes (a parent
    refused by the fence, or already acked by a try whose reply was lost, gets none); they inherit
    the parent's run, whose total grows in the same statement.

    `ack_id` (new_ack_id(), chosen once per ack, before the first try) makes retries recoverable:
    the outcome is recorded with the ack, and a retry with the same id and the same arguments,
    after a try whose reply was lost, returns the first try's outcome (completed, retried, dead_ids,
    finished_runs; refused derived from them) instead of reporting everything refused. Without it,
    a retried ack that had committed reports its jobs refused. Receipts live ACK_RECEIPT_RETENTION.
    In a caller's transaction the receipt commits with it: after a lost COMMIT, ack_receipt_get
    (ack_id) on a fresh connection tells whether it landed."""
    params = ack_params(worker_id, token, done_ids, results, failures, max_attempts, ack_id=ack_id, children=children)
    row = _ack_row(conn, params, ack_id)
    completed, retried, dead_ids, finished_runs = int(row[0]), int(row[1]), list(row[2]), list(row[3])
    refused = len(done_ids) + len(failures) - completed - retried - len(dead_ids)
    return AckResult(completed, retried, dead_ids, finished_runs, refused, int(row[5]))


class AckPart(NamedTuple):
    """One flow's share of an ack across the flows of one claim_flows statement (ack_across)."""

    flow: str
    token: int
    done_ids: Sequence[int]
    results: Sequence[str | None] | None
    failures: Sequence[Failure]
    max_attempts: int


def ack_across(conn: Conn, worker_id: str, parts: Sequence[AckPart], *, ack_id: int) -> list[AckResult]:
    """ack_batch for the batches of several flows claimed by one claim_flows statement, in one statement:
    each flow's rows are fenced by the tokens of that statement (a row was claimed under one of them or
    not at all). Without Next(...) children (their batches are acked on their own). Returns one
    AckResult per part, in order, counted per flow by the statement (its receipt keeps the counts, so
    a retry after a lost reply gets the same split); the finished runs all go to the first part, whose
    hooks fire once for the whole ack (hooks are looked up by run, not by part)."""
    assert len({p.flow for p in parts}) == len(parts), "one part per flow"
    done_ids = [i for p in parts for i in p.done_ids]
    results: list[str | None] | None = None
    if any(p.results is not None for p in parts):
        results = [r for p in parts for r in (p.results if p.results is not None else [None] * len(p.done_ids))]
    failures = [f for p in parts for f in p.failures]
    params = _ack_params(worker_id, sorted({p.token for p in parts}), done_ids, results, failures,
                         [p.max_attempts for p in parts for _ in p.failures], len(parts) > 1, ack_id, None)
    row = _ack_row(conn, params, ack_id)
    dead = set(row[2])
    by_flow = row[6] if len(parts) > 1 else {parts[0].flow: [row[0], row[1]]}
    out: list[AckResult] = []
    for k, p in enumerate(parts):
        completed, retried = by_flow.get(p.flow, (0, 0))
        dead_ids = [f.job_id for f in p.failures if f.job_id in dead]
        refused = len(p.done_ids) + len(p.failures) - completed - retried - len(dead_ids)
        out.append(AckResult(int(completed), int(retried), dead_ids, list(row[3]) if k == 0 else [], refused))
    return out


def _ack_row(conn: Conn, params: dict[str, Any], ack_id: int | None) -> tuple[Any, ...]:
    """ack_batch's one row: (completed, retried, dead_ids, finished_runs, recorded, children, by_flow)."""
    row = conn.execute(Q.ack_batch, params).fetchone()
    assert row is not None
    if not row[4]:  # a concurrent try with this ack id committed first: its outcome is the ack's
        assert ack_id is not None
        recorded = conn.execute(Q.ack_receipt_get, {"ack_id": ack_id}).fetchone()
        assert recorded is not None
        row = recorded[:4] + (True,) + recorded[4:]
    return row


def ack_params(worker_id: str, token: int, done_ids: Sequence[int], results: Sequence[str | None] | None,
               failures: Sequence[Failure], max_attempts: int, *, ack_id: int | None = None,
               children: Children | None = None) -> dict[str, Any]:
    """ack_batch's statement parameters, for one flow's batch claimed under `token`."""
    return _ack_params(worker_id, [token], done_ids, results, failures, [max_attempts] * len(failures), False,
                       ack_id, children)


def _ack_params(worker_id: str, tokens: list[int], done_ids: Sequence[int], results: Sequence[str | None] | None,
                failures: Sequence[Failure], fail_max_attempts: list[int], by_flow: bool, ack_id: int | None,
                children: Children | None) -> dict[str, Any]:
    """ack_batch's parameters: `tokens` fence the rows, `fail_max_attempts` runs beside `failures`,
    `by_flow` asks for the outcome per flow (an ack across flows)."""
    params: dict[str, Any] = {
        "ack_id": ack_id,
        "errors_kept": ERRORS_KEPT,
        "worker": worker_id,
        "tokens": tokens,
        "done_ids": list(done_ids),
        "results": _results_by_id(done_ids, results),
        "fail_ids": [f.job_id for f in failures],
        "permanent": [f.permanent for f in failures],
        "error_types": [f.error_type for f in failures],
        "messages": [f.message for f in failures],
        "tracebacks": [f.traceback for f in failures],
        "delays": [float(f.delay) for f in failures],  # psycopg refuses lists mixing int and float
        "fail_max_attempts": fail_max_attempts,
        "by_flow": by_flow,
    }
    params.update(children.params() if children else NO_CHILDREN)
    return params


def ack_receipt_get(conn: Conn, ack_id: int, acked: int) -> AckResult | None:
    """The recorded outcome of ack `ack_id` (which acked `acked` jobs), None if it never committed."""
    row = conn.execute(Q.ack_receipt_get, {"ack_id": ack_id}).fetchone()
    if row is None:
        return None
    completed, retried, dead_ids, finished_runs = int(row[0]), int(row[1]), list(row[2]), list(row[3])
    return AckResult(completed, retried, dead_ids, finished_runs, acked - completed - retried - len(dead_ids),
                     int(row[4]))


def release_batch(conn: Conn, worker_id: str, token: int, ids: Sequence[int]) -> int:
    """Give back claimed jobs that were never started, without burning an attempt."""
    return int(_scalar(conn, Q.release_batch, {"ids": list(ids), "token": token, "worker": worker_id}) or 0)


def claim_release_token(conn: Conn, worker_id: str, token: int) -> int:
    """Hand back whatever a claim of unknown outcome took (after a lost connection)."""
    return int(_scalar(conn, Q.claim_release_token, {"worker": worker_id, "token": token}) or 0)


def claim_flow_lock(conn: Conn, flow: str) -> None:
    conn.execute(Q.claim_flow_lock, {"flow": flow})


def claim_running_count(conn: Conn, flow: str) -> int:
    return int(_scalar(conn, Q.claim_running_count, {"flow": flow}) or 0)


# Flow control (rate limits, per-key concurrency): only limited flows send these.


def rate_bucket_ensure(conn: Conn, flow: str, burst: float) -> None:
    """Create the flow's token bucket, full, unless it exists."""
    conn.execute(Q.rate_bucket_ensure, {"flow": flow, "burst": burst})


def claim_rated(conn: Conn, flow: str, worker_id: str, limit: int, token: int, max_attempts: int, *,
                rate: float, burst: float) -> list[tuple[Any, ...]]:
    """claim_batch for a rate-limited flow: at most the whole tokens its bucket holds, debited in the
    same statement. Rows as claim_batch's."""
    return conn.execute(Q.claim_rated, {"flow": flow, "worker": worker_id, "limit": limit, "token": token,
                                        "max_attempts": max_attempts, "rate": rate, "burst": burst}).fetchall()


def rate_bucket_wait(conn: Conn, flow: str, *, rate: float, burst: float) -> float:
    """Seconds until the flow's bucket holds a whole token (0: it does now, or it has no bucket)."""
    return float(_scalar(conn, Q.rate_bucket_wait, {"flow": flow, "rate": rate, "burst": burst}) or 0.0)


def claim_keyed(conn: Conn, flow: str, worker_id: str, limit: int, token: int, max_attempts: int, *,
                key_field: str | None, per_key: int, rate: float | None = None,
                burst: float | None = None) -> list[tuple[Any, ...]]:
    """claim_batch for a flow with a per-key limit: two statements, which must share the caller's
    transaction (the key locks the first takes are what make the second's counts exact). Rows as
    claim_batch's."""
    params = {"flow": flow, "worker": worker_id, "limit": limit, "key_field": key_field, "per_key": per_key}
    ids = [row[0] for row in conn.execute(Q.claim_keyed_pick, params).fetchall()]
    if not ids:
        return []
    params.update(ids=ids, token=token, max_attempts=max_attempts, rate=rate, burst=burst)
    return conn.execute(Q.claim_keyed, params).fetchall()


def next_run_at(conn: Conn, flows: list[str]) -> float | None:
    """Seconds until the earliest claimable scheduled job of these flows (None: nothing pending)."""
    value = _scalar(conn, Q.next_run_at, {"flows": flows})
    return None if value is None else float(value)


def flows_due(conn: Conn, flows: list[str], rates: Sequence[tuple[float, float] | None] | None = None) -> set[str]:
    """Those of `flows` with a job claimable now (one round trip, however many flows). `rates`, beside
    `flows`: (rate, burst) of a rate-limited flow, which is due only with a token in its bucket."""
    limits = rates if rates is not None else [None] * len(flows)
    return {row[0] for row in conn.execute(Q.flows_due, {
        "flows": flows, "rates": [r[0] if r else None for r in limits], "bursts": [r[1] if r else None for r in limits]})}


class FlowClaim(NamedTuple):
    """One flow's part of a claim_flows statement."""

    flow: str
    limit: int
    token: int
    max_attempts: int


def claim_flows(conn: Conn, worker_id: str, claims: Sequence[FlowClaim], total: int) -> list[list[tuple[Any, ...]]]:
    """claim_batch across `claims` in one autocommit statement, at most `total` jobs in all: per claim,
    in its order, the rows (claim_batch's columns) claimed under its token."""
    got: list[list[tuple[Any, ...]]] = [[] for _ in claims]
    if not claims:
        return got
    cur = conn.execute(Q.claim_flows, {
        "worker": worker_id, "total": total, "flows": [c.flow for c in claims], "limits": [c.limit for c in claims],
        "tokens": [c.token for c in claims], "max_attempts": [c.max_attempts for c in claims]})
    ranked: list[list[tuple[Any, ...]]] = [[] for _ in claims]
    for row in cur.fetchall():
        ranked[row[0] - 1].append(row)
    for i, rows in enumerate(ranked):
        if rows:
            rows.sort(key=lambda r: (-r[1], r[2], r[3]))  # claim_batch's order: priority, then FIFO
            got[i] = [r[3:] for r in rows]
    return got


# ---------------------------------------------------------------------------------------------
# Rescue and maintenance


def vacuum_leader(conn: Conn) -> bool:
    return bool(_scalar(conn, Q.vacuum_leader))


def jobs_dead_tuples(conn: Conn) -> int:
    return int(_scalar(conn, Q.jobs_dead_tuples) or 0)


def jobs_vacuum(conn: Conn) -> None:
    """VACUUM (SKIP_LOCKED) skiplock.jobs; `conn` must be in autocommit."""
    conn.execute(Q.jobs_vacuum)


def rescue(conn: Conn, stale_after: float) -> RescueResult:
    """Mark workers with stale heartbeats lost and put their running jobs back (in bounded slices)."""
    with conn.transaction():
        lost = [row[0] for row in conn.execute(Q.rescue_stale_workers, {"stale_after": stale_after})]
    rescued: dict[str, int] = {}
    dead: dict[str, int] = {}
    while True:
        with conn.transaction():
            rows = conn.execute(Q.rescue_jobs, {"stale_after": stale_after, "limit": RESCUE_SLICE,
                                                "errors_kept": ERRORS_KEPT}).fetchall()
        for flow, n_rescued, n_dead, _ in rows:
            rescued[flow] = rescued.get(flow, 0) + int(n_rescued)
            dead[flow] = dead.get(flow, 0) + int(n_dead)
        if sum(int(r[1]) + int(r[2]) for r in rows) < RESCUE_SLICE:
            break
    return RescueResult(lost, {k: v for k, v in rescued.items() if v}, {k: v for k, v in dead.items() if v})


def rescue_leader(conn: Conn) -> bool:
    """True when this engine may run the rescue pass, until rescue_leader_release (or the session's
    end). Session-level, so the pass's statements commit one by one."""
    return bool(_scalar(conn, Q.rescue_leader))


def rescue_leader_release(conn: Conn) -> None:
    conn.execute(Q.rescue_leader_release)


def stalled_listeners(conn: Conn, application_name: str) -> set[tuple[int, Any]]:
    """(pid, backend_start) of idle backends of `application_name` blocked writing to their client."""
    return {(int(pid), started) for pid, started in conn.execute(
        Q.stalled_listeners, {"application_name": application_name})}


def stalled_listeners_terminate(conn: Conn, backends: Iterable[tuple[int, Any]]) -> int:
    """Terminate those of `backends` still blocked; how many were."""
    chosen = list(backends)
    return int(_scalar(conn, Q.stalled_listeners_terminate, {"pids": [p for p, _ in chosen],
                                                             "starts": [s for _, s in chosen]}) or 0)


def worker_mark_lost(conn: Conn, reasons: Mapping[str, str]) -> list[str]:
    """Mark workers lost, each with what happened ("exited with signal 9 (SIGKILL)"); the rescue writes it into
    each rescued job's error."""
    return [row[0] for row in conn.execute(Q.worker_mark_lost, {"ids": list(reasons),
                                                                "reasons": list(reasons.values())})]


def cleanup_orphaned(conn: Conn, timeout: float) -> int:
    return int(_scalar(conn, Q.cleanup_orphaned, {"timeout": timeout}) or 0)


def reset_failed(conn: Conn, flow: str, max_retries: int) -> int:
    return int(_scalar(conn, Q.reset_failed, {"flow": flow, "max_retries": max_retries}) or 0)


def purge_done(conn: Conn, retention: float, limit: int) -> int:
    """One bounded slice of the retention purge; returns how many rows it deleted."""
    return conn.execute(Q.purge_done, {"retention": retention, "limit": limit}).rowcount


def purge_workers(conn: Conn, retention: float, limit: int) -> int:
    """One slice: worker rows stopped or lost more than `retention` s ago."""
    return conn.execute(Q.purge_workers, {"retention": retention, "limit": limit}).rowcount


def purge_runs(conn: Conn, retention: float, limit: int) -> int:
    """One slice: runs finished more than `retention` s ago."""
    return conn.execute(Q.purge_runs, {"retention": retention, "limit": limit}).rowcount


def purge_stats(conn: Conn, retention: float, limit: int) -> int:
    """One slice: stats_minute rows older than `retention` s."""
    return conn.execute(Q.purge_stats, {"retention": retention, "limit": limit}).rowcount


def purge_receipts(conn: Conn, limit: int) -> int:
    """One slice of each kind of receipt past its retention; returns how many rows it deleted."""
    return (conn.execute(Q.purge_ack_receipts, {"retention": ACK_RECEIPT_RETENTION, "limit": limit}).rowcount
            + conn.execute(Q.purge_enqueue_receipts, {"retention": ENQUEUE_RECEIPT_RETENTION,
                                                      "limit": limit}).rowcount)


def drain_remaining(conn: Conn, flows: list[str]) -> bool:
    """True while any job of these flows is pending (due or scheduled for later) or running."""
    return bool(_scalar(conn, Q.drain_remaining, {"flows": flows}))


def drain_due(conn: Conn, flows: list[str]) -> bool:
    """True while any job of these flows is running or due now."""
    return bool(_scalar(conn, Q.drain_due, {"flows": flows}))


def drain_scheduled(conn: Conn, flows: list[str]) -> list[Scheduled]:
    """Per flow, the pending jobs scheduled for later and the earliest of them."""
    return _rows(conn, Scheduled, Q.drain_scheduled, {"flows": flows})


# ---------------------------------------------------------------------------------------------
# Dead letters and jobs


def dlq_list(conn: Conn, where: Mapping[str, Any], limit: int) -> list[DeadLetter]:
    """`where`: DeadLetterFilter.params() (ids, flow, error_type, older_than)."""
    return _rows(conn, DeadLetter, Q.dlq_list, {**where, "limit": limit})


def dlq_retry(conn: Conn, where: Mapping[str, Any]) -> list[int]:
    return sorted(_scalar(conn, Q.dlq_retry, where) or [])


def dlq_purge(conn: Conn, where: Mapping[str, Any]) -> list[int]:
    return sorted(_scalar(conn, Q.dlq_purge, where) or [])


def dlq_analyze(conn: Conn, flow: str | None) -> list[dict[str, Any]]:
    """flow, error_type, count, first_at, last_at, sample_message per group of dead letters."""
    return _dicts(conn, Q.dlq_analyze, {"flow": flow})


def job_get(conn: Conn, job_id: int) -> Job | None:
    rows = _rows(conn, Job, Q.job_get, {"id": job_id})
    return rows[0] if rows else None


# ---------------------------------------------------------------------------------------------
# Job control: cancel, wait, the browser, known flows


def cancel_jobs(conn: Conn, *, ids: Sequence[int] | None, flow: str | None, run_id: str | None,
                pending: bool, scheduled: bool, running: bool) -> CancelResult:
    """Cancel what matches, in bounded slices, each its own transaction (autocommit connection)."""
    params = {"ids": None if ids is None else list(ids), "flow": flow, "run_id": run_id, "pending": pending,
              "scheduled": scheduled, "running": running, "limit": CANCEL_SLICE}
    cancelled: list[int] = []
    requested: list[int] = []
    runs = 0
    while True:
        with conn.transaction():
            row = conn.execute(Q.cancel_jobs, params).fetchone()
        assert row is not None
        cancelled.extend(row[0])
        requested.extend(row[1])
        runs += int(row[2])
        if len(row[0]) < CANCEL_SLICE and len(row[1]) < CANCEL_SLICE:
            return CancelResult(sorted(cancelled), sorted(requested), runs)


# The worker's side of job control (rare paths, apart from ack_batch; engine/worker/control.py)

CANCEL_CHECK_LIMIT: Final = 1000
CANCELLED_MESSAGE: Final = "cancelled while running"


@dataclass(frozen=True)
class Progress:
    progress: float
    progress_message: str | None
    progress_at: datetime


@dataclass(frozen=True)
class RunningJob:
    """One row of the console's Running view."""

    id: int
    flow: str
    claimed_by: str | None
    claimed_at: datetime | None
    attempts: int
    max_attempts: int
    run_id: str | None
    progress: float | None
    progress_message: str | None
    cancel_requested_at: datetime | None


def jobs_cancel_requested(conn: Conn, worker_id: str) -> list[tuple[int, int]]:
    """(job id, claim token) of this worker's running jobs whose cancel was requested."""
    return [(int(r[0]), int(r[1])) for r in
            conn.execute(Q.jobs_cancel_requested, {"worker": worker_id, "limit": CANCEL_CHECK_LIMIT})]


def ack_cancelled(conn: Conn, worker_id: str, token: int, ids: Sequence[int]) -> tuple[list[int], list[str]]:
    """End these running jobs `cancelled` (fenced; only jobs with a cancel request): (ids, finished runs).
    A retry after a lost reply finds nothing left to change; a run it finished has its hook fired by
    the supervisor's orphaned-hook sweep."""
    row = conn.execute(Q.ack_cancelled, {"worker": worker_id, "token": token, "ids": list(ids),
                                         "message": CANCELLED_MESSAGE, "errors_kept": ERRORS_KEPT}).fetchone()
    assert row is not None
    return list(row[0]), list(row[1])


def snooze_jobs(conn: Conn, worker_id: str, token: int, ids: Sequence[int], delays: Sequence[float]) -> list[int]:
    """Back to pending after `delays` seconds, the attempt given back (fenced): the ids snoozed."""
    return list(_scalar(conn, Q.snooze_jobs, {"worker": worker_id, "token": token, "ids": list(ids),
                                              "delays": [float(d) for d in delays],
                                              "errors_kept": ERRORS_KEPT}) or [])


def jobs_progress_set(conn: Conn, worker_id: str, news: Mapping[int, tuple[int, float, str | None]]) -> None:
    """`news`: job id -> (claim token, fraction, message), every job with a report since the last write."""
    ids = list(news)
    conn.execute(Q.jobs_progress_set, {"worker": worker_id, "ids": ids, "tokens": [news[i][0] for i in ids],
                                       "fractions": [float(news[i][1]) for i in ids],
                                       "messages": [news[i][2] for i in ids]})


def job_progress(conn: Conn, job_id: int) -> Progress | None:
    rows = _rows(conn, Progress, Q.job_progress, {"id": job_id})
    return rows[0] if rows else None


def jobs_running_now(conn: Conn, limit: int) -> list[RunningJob]:
    return _rows(conn, RunningJob, Q.jobs_running_now, {"limit": limit})


def job_states(conn: Conn, ids: Sequence[int]) -> dict[int, JobState]:
    return {row.id: row for row in _rows(conn, JobState, Q.job_states, {"ids": list(ids)})}


def job_outcome(conn: Conn, job_id: int) -> JobOutcome | None:
    rows = _rows(conn, JobOutcome, Q.job_outcome, {"id": job_id})
    return rows[0] if rows else None


def cancelled_purge(conn: Conn, ids: Sequence[int]) -> list[int]:
    return list(_scalar(conn, Q.cancelled_purge, {"ids": list(ids)}) or [])


_LIST_BY_STATUS: Final = {"pending": "jobs_list_pending", "scheduled": "jobs_list_pending",
                          "running": "jobs_list_running", "dead": "jobs_list_dead",
                          "completed": "jobs_list_done", "cancelled": "jobs_list_done"}
LIST_STATUSES: Final = tuple(_LIST_BY_STATUS)


def jobs_list(conn: Conn, status: str, *, flow: str | None, run_id: str | None, older_than: float | None,
              payload: str | None, since: float, limit: int) -> list[JobSummary]:
    """One status's jobs (see the jobs_list_* blocks for each order). `payload`: a JSON object text the
    payload must contain; `since`: how far back completed and cancelled jobs are searched (seconds)."""
    params = {"flow": flow, "run_id": run_id, "older_than": older_than, "payload": payload, "limit": limit,
              "scheduled": status == "scheduled", "status": status, "since": since}
    return _rows(conn, JobSummary, getattr(Q, _LIST_BY_STATUS[status]), params)


def flows_known(conn: Conn, flows: Sequence[str]) -> set[str]:
    return {row[0] for row in conn.execute(Q.flows_known, {"flows": list(flows)})}


def flow_names(conn: Conn, limit: int) -> list[str]:
    return [row[0] for row in conn.execute(Q.flow_names, {"limit": limit})]


@dataclass(frozen=True)
class HealthWorkers:
    live: int
    stale: int
    lost: int  # in the last 10 minutes


@dataclass(frozen=True)
class HealthFlow:
    flow: str
    served: bool  # a live worker serves it
    circuit_open: bool
    due: int  # due pending jobs, counted up to the cap
    oldest_age: float  # seconds the oldest due job has waited (0: none due)
    completed: int  # attempts in the failure-rate window (stats_minute)
    failed: int


def health_workers(conn: Conn, stale_after: float, now: datetime | None = None) -> HealthWorkers:
    rows = _rows(conn, HealthWorkers, Q.health_workers, {"stale_after": stale_after, "now": now})
    return rows[0]


def health_flows(conn: Conn, stale_after: float, window: float, cap: int,
                 now: datetime | None = None) -> list[HealthFlow]:
    return _rows(conn, HealthFlow, Q.health_flows,
                 {"stale_after": stale_after, "window": window, "cap": cap, "now": now})


def metrics_leader_claim(conn: Conn, engine_id: str, lease: float) -> bool:
    """True while this engine reads the fleet-wide gauges (its lease renewed for `lease` seconds)."""
    return bool(_scalar(conn, Q.metrics_leader_claim, {"engine": engine_id, "lease": lease}))


@dataclass(frozen=True)
class MetricsFlowGauges:
    """One flow's queue gauges; each count stops at the cap it was read with."""

    name: str
    ready: int
    scheduled: int
    pending_total: int
    retrying: int
    running: int
    dead: int


def metrics_flow_gauges(conn: Conn, cap: int) -> list[MetricsFlowGauges]:
    return _rows(conn, MetricsFlowGauges, Q.metrics_flow_gauges, {"cap": cap})


def metrics_leader_release(conn: Conn, engine_id: str) -> None:
    conn.execute(Q.metrics_leader_release, {"engine": engine_id})


# ---------------------------------------------------------------------------------------------
# Status, flows, workers


def status_live(conn: Conn, flow: str | None) -> list[LiveCounts]:
    return _rows(conn, LiveCounts, Q.status_live, {"flow": flow})


def status_done(conn: Conn, flow: str | None) -> list[DoneCounts]:
    """Completed and cancelled jobs kept in jobs_done, by flow."""
    return _rows(conn, DoneCounts, Q.status_done, {"flow": flow})


def flows_list(conn: Conn) -> list[dict[str, Any]]:
    """name, paused, circuit_state, circuit_until, policy of every recorded flow."""
    return _dicts(conn, Q.flows_list)


def flow_set_paused(conn: Conn, flow: str, paused: bool, event: str) -> None:
    """Pause or resume; `event` (an encoded flow_paused/flow_resumed) is sent in the same transaction."""
    with conn.transaction():
        conn.execute(Q.flow_set_paused, {"flow": flow, "paused": paused})
        conn.execute(Q.flow_paused_changed_notify, {"payload": event})


def flows_sync(conn: Conn, policies: Mapping[str, str]) -> None:
    """Record the policy (JSON text) this engine runs each flow with."""
    conn.execute(Q.flows_sync, {"names": list(policies), "policies": list(policies.values())})


def flows_circuit_open(conn: Conn, flows: list[str]) -> set[str]:
    """Those of `flows` whose circuit is open (cool-down running or waiting for its trial)."""
    return {row[0] for row in conn.execute(Q.flows_circuit_open, {"flows": flows})}


def circuit_open(conn: Conn, flow: str, cooldown: float) -> float | None:
    """Open the flow's circuit for `cooldown` s; returns until when (unix s), None if already open."""
    conn.execute(Q.circuit_ensure_flow, {"flow": flow})
    until = _scalar(conn, Q.circuit_open, {"flow": flow, "cooldown": cooldown})
    return None if until is None else float(until)


def circuit_close(conn: Conn, flow: str) -> bool:
    """True when this call closed it."""
    return conn.execute(Q.circuit_close, {"flow": flow}).fetchone() is not None


def worker_register(conn: Conn, worker_id: str, engine_id: str, host: str, pid: int, flows: list[str],
                    version: str) -> None:
    conn.execute(Q.worker_register, {"id": worker_id, "engine_id": engine_id, "host": host, "pid": pid,
                                     "flows": flows, "version": version})


def worker_report(conn: Conn, worker_id: str, state: str, counters: Any, pool: Any) -> bool:
    """A worker's own state, counters and pool (its liveness is the supervisor's: workers_renew).
    False when the worker was marked lost or stopped (it must stop claiming)."""
    return conn.execute(Q.worker_report, {"id": worker_id, "state": state, "counters": counters,
                                          "pool": pool}).fetchone() is not None


def workers_renew(conn: Conn, worker_ids: list[str]) -> set[str]:
    """The supervisor's heartbeat of its workers; returns the ids the database holds lost."""
    return set(_scalar(conn, Q.workers_renew, {"ids": worker_ids}) or ())


def worker_api_heartbeat(conn: Conn, worker_id: str, host: str, pid: int) -> bool:
    """Queue.heartbeat: registers or renews a custom claim loop's id; False once it is lost or stopped."""
    return conn.execute(Q.worker_api_heartbeat, {"id": worker_id, "host": host, "pid": pid}).fetchone() is not None


def worker_stopped(conn: Conn, worker_id: str) -> None:
    conn.execute(Q.worker_stopped, {"id": worker_id})


def workers_list(conn: Conn) -> list[dict[str, Any]]:
    return _dicts(conn, Q.workers_list)


def workers_stale_count(conn: Conn, stale_after: float) -> int:
    return int(_scalar(conn, Q.workers_stale_count, {"stale_after": stale_after}) or 0)


# ---------------------------------------------------------------------------------------------
# Telemetry and runs


def events_notify(conn: Conn, events: list[str]) -> None:
    """NOTIFY encoded events (engine.telemetry.encode_event) on skiplock_events."""
    if events:
        conn.execute(Q.events_notify, {"events": events})


def stats_upsert(conn: Conn, counts: Mapping[str, FlowCounts]) -> None:
    """Add per-flow counts to this minute's row of skiplock.stats_minute."""
    if not counts:
        return
    values = list(counts.values())
    conn.execute(Q.stats_upsert, {
        "flows": list(counts), "completed": [c.completed for c in values], "failed": [c.failed for c in values],
        "dead": [c.dead for c in values], "rescued": [c.rescued for c in values],
        "wait_ms": [float(c.wait_ms_sum) for c in values], "run_ms": [float(c.run_ms_sum) for c in values]})


def run_claim_hook(conn: Conn, run_id: str, claimer: str | None = None) -> RunSummary | None:
    """Exactly one claimer gets the finished run back: it fires the run's hook.

    `claimer`: a token chosen before the first try and re-presented by retries (the ack id that
    finished the run, as text, or new_hook_claimer()): a retry after a try whose reply was lost gets
    the run back. With None, such a retry gets None and the hook never fires."""
    rows = _rows(conn, RunSummary, Q.run_claim_hook, {"run_id": run_id, "claimer": claimer})
    return rows[0] if rows else None


def runs_claim_orphaned_hooks(conn: Conn, flows: list[str]) -> list[RunSummary]:
    """Finished runs of `flows` whose hook nobody claimed: claimed now, for the caller to fire."""
    return _rows(conn, RunSummary, Q.runs_claim_orphaned_hooks, {"flows": flows})


def new_hook_claimer() -> str:
    return secrets.token_hex(16)


# ---------------------------------------------------------------------------------------------
# Console reads (console/data.py gives the row classes; their fields are the column aliases)


def console_snapshot_begin(conn: Conn) -> None:
    conn.execute(Q.console_snapshot_begin)


def console_now(conn: Conn, now: datetime | None) -> tuple[datetime, str]:
    """The reference time (`now`, or the server's clock) and the server version."""
    row = conn.execute(Q.console_now, {"now": now}).fetchone()
    assert row is not None
    return row[0], str(row[1])


def console_flows(conn: Conn, cls: type[T], now: datetime | None, cap: int) -> list[T]:
    return _rows(conn, cls, Q.console_flows, {"now": now, "cap": cap})


def console_history(conn: Conn, cls: type[T], now: datetime | None, minutes: int) -> list[T]:
    return _rows(conn, cls, Q.console_history, {"now": now, "minutes": minutes})


def console_latency(conn: Conn, cls: type[T], now: datetime | None, seconds: float, sample: int) -> dict[str, T]:
    """Per flow: `cls(samples, wait_p50, wait_p95, run_p50, run_p95)`."""
    rows = _dicts(conn, Q.console_latency, {"now": now, "seconds": seconds, "sample": sample})
    return {row.pop("flow"): cls(**row) for row in rows}


def console_workers(conn: Conn, cls: type[T], now: datetime | None, limit: int) -> list[T]:
    return _rows(conn, cls, Q.console_workers, {"now": now, "limit": limit})


def console_runs(conn: Conn, cls: type[T], now: datetime | None, limit: int) -> list[T]:
    return _rows(conn, cls, Q.console_runs, {"now": now, "limit": limit})


def console_estimate(conn: Conn, flow: str, status: str) -> Any:
    """The planner's JSON plan for counting a flow's jobs in `status` (no rows read)."""
    # EXPLAIN takes no bind parameters: a client-side-binding cursor quotes the values itself.
    row = psycopg.ClientCursor(conn).execute(Q.console_estimate, {"flow": flow, "status": status}).fetchone()
    return row[0] if row else None


async def console_listen(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(Q.console_listen)


async def backend_pid_async(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(Q.backend_pid)
    row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


async def health_ping_async(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(Q.health_ping)


# ---------------------------------------------------------------------------------------------
# Schedules (engine/schedules.py decides the ticks; these send its statements)


def schedule_leader(conn: Conn) -> bool:
    """Inside a transaction: True when this engine runs the schedule pass until it ends."""
    return bool(_scalar(conn, Q.schedule_leader))


def schedules_active(conn: Conn, limit: int) -> list[ActiveSchedule]:
    return _rows(conn, ActiveSchedule, Q.schedules_active, {"limit": limit})


def schedule_fire(conn: Conn, name: str, expected: datetime | None, ticks: list[str], next_at: datetime,
                  last_tick: datetime | None) -> tuple[bool, int]:
    """(whether next_at was still `expected` and moved on, how many jobs were inserted)."""
    row = conn.execute(Q.schedule_fire, {"name": name, "expected": expected, "ticks": ticks, "next_at": next_at,
                                         "last_tick": last_tick}).fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])


def schedules_checked(conn: Conn, names: list[str]) -> None:
    if names:
        conn.execute(Q.schedules_checked, {"names": names})


def schedule_upsert_config(conn: Conn, params: Mapping[str, Any]) -> None:
    """`params`: ScheduleSpec.params() (name, flow, cron, every_ms, payload, timezone, catch_up, enabled)."""
    conn.execute(Q.schedule_upsert_config, params)


def schedule_add(conn: Conn, params: Mapping[str, Any]) -> bool:
    """False when a schedule of that name exists."""
    return conn.execute(Q.schedule_add, params).fetchone() is not None


def schedule_remove(conn: Conn, name: str) -> bool:
    return conn.execute(Q.schedule_remove, {"name": name}).fetchone() is not None


def schedule_set_paused(conn: Conn, name: str, paused: bool) -> bool:
    return conn.execute(Q.schedule_set_paused, {"name": name, "paused": paused}).fetchone() is not None


def schedule_trigger(conn: Conn, name: str) -> int | None:
    """The new job's id; None when there is no such schedule."""
    job_id = _scalar(conn, Q.schedule_trigger, {"name": name})
    return None if job_id is None else int(job_id)


def schedules_list(conn: Conn, name: str | None = None, limit: int = 1000) -> list[Schedule]:
    return _rows(conn, Schedule, Q.schedules_list, {"name": name, "limit": limit})


# ---------------------------------------------------------------------------------------------
# Roles (migration 0020, engine/roles.py)


def privileges_missing(conn: Conn, role: str, relation: str | None = None) -> list[str]:
    """What `role` may do that the current login role may not ("UPDATE on skiplock.jobs", ...)."""
    return [row[0] for row in conn.execute(Q.privileges_missing, {"role": role, "relation": relation})]


def privileges_ungranted_tables(conn: Conn) -> list[str]:
    """Tables of the skiplock schema on which no skiplock role holds any privilege."""
    return [row[0] for row in conn.execute(Q.privileges_ungranted_tables)]


# The control plane (engine/control.py): engine rows and operators' commands


@dataclass(frozen=True)
class EngineRow:
    id: str
    host: str
    pid: int
    version: str
    workers: int
    flows: list[str]
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    exit_code: int | None
    state: str  # running, draining, stopping, stopped, or gone (no heartbeat within its stale_after)
    heartbeat_age: float

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class EngineRef:
    id: str
    state: str
    heartbeat_age: float


@dataclass(frozen=True)
class EngineCommand:
    id: int
    command: str
    workers: int | None


@dataclass(frozen=True)
class CommandState:
    acked: bool
    ok: bool | None
    outcome: str | None


def engine_register(conn: Conn, engine_id: str, host: str, pid: int, version: str, workers: int,
                    stale_after: float, flows: list[str]) -> None:
    conn.execute(Q.engine_register, {"id": engine_id, "host": host, "pid": pid, "version": version,
                                     "workers": workers, "stale_after": stale_after, "flows": flows})


def engine_heartbeat(conn: Conn, engine_id: str, workers: int) -> bool:
    """Renews the engine's row; True when a command waits for it."""
    return bool(_scalar(conn, Q.engine_heartbeat, {"id": engine_id, "workers": workers}))


def engine_set_state(conn: Conn, engine_id: str, state: str) -> None:
    conn.execute(Q.engine_set_state, {"id": engine_id, "state": state})


def engine_stopped(conn: Conn, engine_id: str, code: int) -> None:
    conn.execute(Q.engine_stopped, {"id": engine_id, "code": code})


def engines_list(conn: Conn, limit: int = 1000) -> list[EngineRow]:
    return _rows(conn, EngineRow, Q.engines_list, {"limit": limit})


def engine_find(conn: Conn, ref: str) -> list[EngineRef]:
    """The engine with this id, or the engines whose id starts with it (at most two: ambiguous)."""
    return _rows(conn, EngineRef, Q.engine_find, {"ref": ref})


def engine_command_send(conn: Conn, engine_id: str, command: str, workers: int | None, *,
                        notify: bool = True) -> int | None:
    """Queue a command for a running engine and wake it; None when the engine is not running (gone,
    stopped, or already draining or stopping). notify=False leaves the wake-up out (a missed NOTIFY)."""
    sql = Q.engine_command_send if notify else Q.engine_command_insert_quiet
    command_id = _scalar(conn, sql, {"engine": engine_id, "command": command, "workers": workers})
    return None if command_id is None else int(command_id)


def engine_commands_pending(conn: Conn, engine_id: str) -> list[EngineCommand]:
    return _rows(conn, EngineCommand, Q.engine_commands_pending, {"engine": engine_id})


def engine_command_ack(conn: Conn, command_id: int, ok: bool, outcome: str, workers: int | None = None) -> None:
    """`workers`: after a scale, the engine's new worker count (its row says it from now on)."""
    conn.execute(Q.engine_command_ack, {"id": command_id, "ok": ok, "outcome": outcome, "workers": workers})


def engine_command_get(conn: Conn, command_id: int) -> CommandState | None:
    rows = _rows(conn, CommandState, Q.engine_command_get, {"id": command_id})
    return rows[0] if rows else None


def engine_command_withdraw(conn: Conn, command_id: int) -> bool:
    """True when the command was withdrawn unread; False when the engine had acknowledged it."""
    return conn.execute(Q.engine_command_withdraw, {"id": command_id}).fetchone() is not None


def purge_engines(conn: Conn, retention: float, limit: int) -> int:
    return conn.execute(Q.purge_engines, {"retention": retention, "limit": limit}).rowcount


def backend_pid(conn: Conn) -> int:
    return int(_scalar(conn, Q.backend_pid))


_LISTEN: Final = {"skiplock_enqueued": "listen_enqueued", "skiplock_control": "listen_control",
                  "skiplock_cancel": "listen_cancel"}


def listen(conn: Conn, channel: str) -> None:
    """LISTEN on one of the engine's channels (engine.db.listen checks the connection first)."""
    conn.execute(getattr(Q, _LISTEN[channel]))


# Stages, runs and pipelines (issue 15)


@dataclass(frozen=True)
class ChildJob:
    id: int
    flow: str
    status: str


@dataclass(frozen=True)
class RunSealed:
    id: str
    was_sealed: bool
    finished: bool
    total: int
    completed: int
    dead: int


@dataclass(frozen=True)
class RunInfo:
    id: str
    flow: str
    total: int
    completed: int
    dead: int
    cancelled: int
    sealed: bool
    reopened: int
    created_at: datetime
    finished_at: datetime | None
    hook_fired_at: datetime | None


@dataclass(frozen=True)
class RunStage:
    flow: str
    pending: int
    running: int
    dead: int
    completed: int
    cancelled: int


def job_children(conn: Conn, job_id: int, limit: int) -> list[ChildJob]:
    return _rows(conn, ChildJob, Q.job_children, {"id": job_id, "limit": limit})


def run_seal(conn: Conn, run_id: str) -> RunSealed | None:
    """Seal the run (its producer added the last chunk); None for an unknown run."""
    rows = _rows(conn, RunSealed, Q.run_seal, {"run_id": run_id})
    return rows[0] if rows else None


def run_get(conn: Conn, run_id: str) -> RunInfo | None:
    rows = _rows(conn, RunInfo, Q.run_get, {"run_id": run_id})
    return rows[0] if rows else None


def run_stages(conn: Conn, run_id: str) -> list[RunStage]:
    return _rows(conn, RunStage, Q.run_stages, {"run_id": run_id})


def pipeline_links(conn: Conn) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in conn.execute(Q.pipeline_links).fetchall()]


def flow_rates(conn: Conn) -> dict[str, float]:
    return {str(flow): float(rate) for flow, rate in conn.execute(Q.flow_rates).fetchall()}


# Why is this job waiting? (engine/explain.py turns these facts into reasons)


def explain_job(conn: Conn, job_id: int, *, stale_after: float, cap: int) -> dict[str, Any] | None:
    """What keeps an unfinished or dead job where it is, as one row of named facts; None: not in the
    hot table (ended: explain_done)."""
    found = _dicts(conn, Q.explain_job, {"id": job_id, "stale_after": stale_after, "cap": cap})
    return found[0] if found else None


def explain_done(conn: Conn, job_id: int) -> dict[str, Any] | None:
    found = _dicts(conn, Q.explain_done, {"id": job_id})
    return found[0] if found else None

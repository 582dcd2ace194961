"""Telemetry events: the one place that documents every event skiplock sends.

Events travel as NOTIFY payloads on channel `skiplock_events`, encoded with orjson, each an object
with `v` (format version, now 1), `kind`, `at` (unix seconds) and the fields below. They are
aggregated per worker per tick (about 1 s; none from a worker with nothing to report), never one
notification per job, and each stays under MAX_EVENT_BYTES (PostgreSQL's limit is 8000). A console
attaching late reads history from `skiplock.stats_minute` and the tables, not from missed
notifications.

| kind            | sent by     | fields |
|-----------------|-------------|--------|
| tick            | worker      | engine, worker, flows: {flow: {completed, failed, dead, rescued, wait_ms_sum, run_ms_sum}} (counts since the previous tick; flows with no activity are left out) |
| failure         | worker      | engine, worker, flow, failures: [{job, attempt, max_attempts, type, message}] (at most FAILURE_SAMPLE per tick), dropped (failures not listed) |
| dead_letter     | worker      | engine, worker, flow, jobs: [ids] (at most DEAD_SAMPLE), count |
| worker_started  | worker      | engine, worker, host, pid, flows |
| worker_stopped  | worker      | engine, worker, reason |
| worker_lost     | supervisor  | engine, worker, reason ("exited with signal 9 (SIGKILL)", "exited with code N", "killed after grace period", "heartbeat stale", ...) |
| rescued         | supervisor  | engine, flows: {flow: {rescued, dead}}, workers: [ids] |
| flow_paused     | operator    | flow (from `engine pause`, the console or the API) |
| flow_resumed    | operator    | flow |
| circuit_opened  | worker      | engine, worker, flow, failures, until (unix seconds) |
| circuit_closed  | worker      | engine, worker, flow |
| run_finished    | worker      | engine, worker, run, flow, total, completed, dead |

Each kind has a TypedDict below (`TickEvent`, ...; its fields without the header are `TickFields`);
`AnyEvent` is their union, discriminated by `kind`. A payload may carry `truncated: true` when
encode_event trimmed a list to fit.

Channel `skiplock_enqueued` carries an empty payload once per enqueue statement (a trigger) and
after operator retries and resumes; workers LISTEN on it to wake up.

Channel `skiplock_cancel` carries an empty payload once per cancel statement that asked running jobs
to stop (cancel_jobs); workers LISTEN on it and re-read their jobs' requests from the table (they
also do every second while they hold jobs, so a missed notification only delays a cancel).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NotRequired, TypedDict, Union, Unpack, overload

import orjson

EVENTS_CHANNEL: Final = "skiplock_events"
ENQUEUED_CHANNEL: Final = "skiplock_enqueued"
CANCEL_CHANNEL: Final = "skiplock_cancel"
# What the supervisor writes down a worker's relay pipe for each notification it heard (engine/control.py):
# one byte for "jobs somewhere" and for a cancel; RELAY_FLOW, the flow's name and RELAY_END for an
# enqueue wake-up naming its flow (migration 0023). A record is one write of under PIPE_BUF: atomic.
RELAY_ENQUEUED: Final = b"\0"
RELAY_CANCEL: Final = b"c"
RELAY_FLOW: Final = b"f"
RELAY_END: Final = b"\n"
RELAY_FLOW_MAX: Final = 63  # bytes of a name (a flow name's limit); a longer payload relays as RELAY_ENQUEUED


def relay_enqueued(payload: str) -> bytes:
    """The relay record of a skiplock_enqueued notification's payload ('' or a flow's name)."""
    name = payload.encode()
    if not name or len(name) > RELAY_FLOW_MAX or RELAY_END in name:
        return RELAY_ENQUEUED
    return RELAY_FLOW + name + RELAY_END


@dataclass
class RelayRead:
    """What a read of the relay pipe said: jobs anywhere, jobs of named flows, a cancel."""

    anywhere: bool = False
    flows: set[str] = field(default_factory=set)
    cancel: bool = False


def parse_relay(data: bytes, read: RelayRead) -> bytes:
    """Adds the complete records of `data` to `read`; returns an incomplete last record (its rest is
    in the next read). An unknown byte counts as a wake-up for every flow."""
    i, n = 0, len(data)
    while i < n:
        b = data[i:i + 1]
        if b == RELAY_FLOW:
            end = data.find(RELAY_END, i + 1)
            if end < 0:
                return data[i:]
            read.flows.add(data[i + 1:end].decode(errors="replace"))
            i = end + 1
            continue
        if b == RELAY_CANCEL:
            read.cancel = True
        else:
            read.anywhere = True
        i += 1
    return b""
# The console's connections (its LISTEN feed among them) carry this application_name; the rescue
# leader ends one that has stopped reading (supervisor._unpin_notify_queue).
CONSOLE_APPLICATION_NAME: Final = "skiplock-console"
EVENT_VERSION: Final = 1
MAX_EVENT_BYTES: Final = 7900
FAILURE_SAMPLE: Final = 5
DEAD_SAMPLE: Final = 50
MESSAGE_CHARS: Final = 200


# ---------------------------------------------------------------------------------------------
# Event kinds: the fields each kind carries (the table above), then the event as it travels.


class FlowTotals(TypedDict):
    completed: int
    failed: int
    dead: int
    rescued: int
    wait_ms_sum: float
    run_ms_sum: float


class FailureFields(TypedDict):
    job: int
    attempt: int
    max_attempts: int
    type: str
    message: str


class RescuedCounts(TypedDict):
    rescued: int
    dead: int


class TickFields(TypedDict):
    engine: str
    worker: str
    flows: dict[str, FlowTotals]


class FailureEventFields(TypedDict):
    engine: str
    worker: str
    flow: str
    failures: list[FailureFields]
    dropped: int


class DeadLetterFields(TypedDict):
    engine: str
    worker: str
    flow: str
    jobs: list[int]
    count: int


class WorkerStartedFields(TypedDict):
    engine: str
    worker: str
    host: str
    pid: int
    flows: list[str]


class WorkerGoneFields(TypedDict):  # worker_stopped and worker_lost
    engine: str
    worker: str
    reason: str


class RescuedFields(TypedDict):
    engine: str
    flows: dict[str, RescuedCounts]
    workers: list[str]


class FlowFields(TypedDict):  # flow_paused and flow_resumed
    flow: str


class CircuitOpenedFields(TypedDict):
    engine: str
    worker: str
    flow: str
    failures: int
    until: float


class CircuitClosedFields(TypedDict):
    engine: str
    worker: str
    flow: str


class RunFinishedFields(TypedDict):
    engine: str
    worker: str
    run: str
    flow: str
    total: int
    completed: int
    dead: int


class _Header(TypedDict):
    v: int
    at: float
    truncated: NotRequired[bool]


class TickEvent(_Header, TickFields):
    kind: Literal["tick"]


class FailureEvent(_Header, FailureEventFields):
    kind: Literal["failure"]


class DeadLetterEvent(_Header, DeadLetterFields):
    kind: Literal["dead_letter"]


class WorkerStartedEvent(_Header, WorkerStartedFields):
    kind: Literal["worker_started"]


class WorkerStoppedEvent(_Header, WorkerGoneFields):
    kind: Literal["worker_stopped"]


class WorkerLostEvent(_Header, WorkerGoneFields):
    kind: Literal["worker_lost"]


class RescuedEvent(_Header, RescuedFields):
    kind: Literal["rescued"]


class FlowPausedEvent(_Header, FlowFields):
    kind: Literal["flow_paused"]


class FlowResumedEvent(_Header, FlowFields):
    kind: Literal["flow_resumed"]


class CircuitOpenedEvent(_Header, CircuitOpenedFields):
    kind: Literal["circuit_opened"]


class CircuitClosedEvent(_Header, CircuitClosedFields):
    kind: Literal["circuit_closed"]


class RunFinishedEvent(_Header, RunFinishedFields):
    kind: Literal["run_finished"]


AnyEvent = Union[TickEvent, FailureEvent, DeadLetterEvent, WorkerStartedEvent, WorkerStoppedEvent,
                 WorkerLostEvent, RescuedEvent, FlowPausedEvent, FlowResumedEvent, CircuitOpenedEvent,
                 CircuitClosedEvent, RunFinishedEvent]
EventKind = Literal["tick", "failure", "dead_letter", "worker_started", "worker_stopped", "worker_lost",
                    "rescued", "flow_paused", "flow_resumed", "circuit_opened", "circuit_closed",
                    "run_finished"]

# kind -> the fields encode_event requires for it (checked at encode: a typo fails where it is made)
EVENT_FIELDS: Final[Mapping[EventKind, Any]] = {
    "tick": TickFields, "failure": FailureEventFields, "dead_letter": DeadLetterFields,
    "worker_started": WorkerStartedFields, "worker_stopped": WorkerGoneFields, "worker_lost": WorkerGoneFields,
    "rescued": RescuedFields, "flow_paused": FlowFields, "flow_resumed": FlowFields,
    "circuit_opened": CircuitOpenedFields, "circuit_closed": CircuitClosedFields,
    "run_finished": RunFinishedFields,
}


@overload
def encode_event(kind: Literal["tick"], **fields: Unpack[TickFields]) -> str: ...
@overload
def encode_event(kind: Literal["failure"], **fields: Unpack[FailureEventFields]) -> str: ...
@overload
def encode_event(kind: Literal["dead_letter"], **fields: Unpack[DeadLetterFields]) -> str: ...
@overload
def encode_event(kind: Literal["worker_started"], **fields: Unpack[WorkerStartedFields]) -> str: ...
@overload
def encode_event(kind: Literal["worker_stopped", "worker_lost"], **fields: Unpack[WorkerGoneFields]) -> str: ...
@overload
def encode_event(kind: Literal["rescued"], **fields: Unpack[RescuedFields]) -> str: ...
@overload
def encode_event(kind: Literal["flow_paused", "flow_resumed"], **fields: Unpack[FlowFields]) -> str: ...
@overload
def encode_event(kind: Literal["circuit_opened"], **fields: Unpack[CircuitOpenedFields]) -> str: ...
@overload
def encode_event(kind: Literal["circuit_closed"], **fields: Unpack[CircuitClosedFields]) -> str: ...
@overload
def encode_event(kind: Literal["run_finished"], **fields: Unpack[RunFinishedFields]) -> str: ...


def encode_event(kind: EventKind, **fields: Any) -> str:
    """Encode one event; fields that would push it past MAX_EVENT_BYTES are trimmed, never split."""
    expected = EVENT_FIELDS.get(kind)
    if expected is None:
        raise ValueError(f"unknown event kind {kind!r}: add it to engine/telemetry.py")
    if fields.keys() != expected.__required_keys__:
        raise ValueError(f"event {kind}: fields {sorted(fields)}, expected {sorted(expected.__required_keys__)}")
    event: dict[str, Any] = {"v": EVENT_VERSION, "kind": kind, "at": round(time.time(), 3), **fields}
    text = orjson.dumps(event).decode()
    if len(text.encode()) <= MAX_EVENT_BYTES:
        return text
    for key in ("failures", "jobs", "flows", "workers"):
        value = event.get(key)
        if isinstance(value, (list, dict)):  # a copy: the caller's list (a worker's flow names) stays whole
            value = event[key] = type(value)(value)
        while value and len(orjson.dumps(event)) > MAX_EVENT_BYTES:
            if isinstance(value, list):
                value.pop()
            elif isinstance(value, dict):
                value.pop(next(reversed(value)))
            event["truncated"] = True
    text = orjson.dumps(event).decode()
    if len(text.encode()) > MAX_EVENT_BYTES:
        raise ValueError(f"event {kind} does not fit in {MAX_EVENT_BYTES} bytes")
    return text


@dataclass
class FlowCounts:
    completed: int = 0
    failed: int = 0
    dead: int = 0
    rescued: int = 0
    wait_ms_sum: float = 0.0
    run_ms_sum: float = 0.0

    def as_dict(self) -> FlowTotals:
        return {"completed": self.completed, "failed": self.failed, "dead": self.dead, "rescued": self.rescued,
                "wait_ms_sum": round(self.wait_ms_sum, 3), "run_ms_sum": round(self.run_ms_sum, 3)}


@dataclass
class FailureSample:
    job: int
    attempt: int
    max_attempts: int
    type: str
    message: str
    run: str | None = None  # for the failure log line (engine/failure_log.py), not sent in events


@dataclass
class TickBuffer:
    """What the worker loop records per batch and the telemetry thread takes once per tick."""

    flows: dict[str, FlowCounts] = field(default_factory=dict)
    failures: dict[str, list[FailureSample]] = field(default_factory=dict)
    failures_dropped: dict[str, int] = field(default_factory=dict)
    dead: dict[str, list[int]] = field(default_factory=dict)


class Telemetry:
    """Thread-safe accumulator: the worker adds once per batch; the tick thread swaps the buffer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = TickBuffer()
        self.totals = FlowCounts()

    def record_batch(self, flow: str, completed: int, failed: int, dead_ids: list[int], wait_ms: float,
                     run_ms: float, failures: list[FailureSample]) -> None:
        with self._lock:
            counts = self._buffer.flows.get(flow)
            if counts is None:
                counts = self._buffer.flows[flow] = FlowCounts()
            counts.completed += completed
            counts.failed += failed
            counts.dead += len(dead_ids)
            counts.wait_ms_sum += wait_ms
            counts.run_ms_sum += run_ms
            self.totals.completed += completed
            self.totals.failed += failed
            self.totals.dead += len(dead_ids)
            if failures:
                sample = self._buffer.failures.setdefault(flow, [])
                room = FAILURE_SAMPLE - len(sample)
                sample.extend(failures[:max(room, 0)])
                dropped = len(failures) - max(room, 0)
                if dropped > 0:
                    self._buffer.failures_dropped[flow] = self._buffer.failures_dropped.get(flow, 0) + dropped
            if dead_ids:
                self._buffer.dead.setdefault(flow, []).extend(dead_ids)

    def take(self) -> TickBuffer:
        with self._lock:
            buffer, self._buffer = self._buffer, TickBuffer()
        return buffer


def tick_events(buffer: TickBuffer, engine_id: str, worker_id: str) -> list[str]:
    """The NOTIFY payloads for one tick: one tick event, plus failure and dead_letter samples."""
    events = [encode_event("tick", engine=engine_id, worker=worker_id,
                           flows={flow: counts.as_dict() for flow, counts in buffer.flows.items()})]
    for flow, sample in buffer.failures.items():
        events.append(encode_event(
            "failure", engine=engine_id, worker=worker_id, flow=flow,
            failures=[{"job": f.job, "attempt": f.attempt, "max_attempts": f.max_attempts, "type": f.type,
                       "message": f.message[:MESSAGE_CHARS]} for f in sample],
            dropped=buffer.failures_dropped.get(flow, 0)))
    for flow, ids in buffer.dead.items():
        events.append(encode_event("dead_letter", engine=engine_id, worker=worker_id, flow=flow,
                                   jobs=ids[:DEAD_SAMPLE], count=len(ids)))
    return events

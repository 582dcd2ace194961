"""The one definition of healthy / degraded / unhealthy.

`read_facts` reads what the verdict needs (bounded, index-backed statements of engine/sql/queries.sql
under `-- health`); `evaluate` is a pure function of those facts and the thresholds, driven by the
table `RULES`. `engine health`, `/readyz`, `Queue.health_check()` and the console header all call
these two, so they cannot disagree: the same facts give the same reasons, in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from engine import store
from engine.migrate import REQUIRED_SCHEMA_VERSION, schema_version

Status = Literal["healthy", "degraded", "unhealthy"]

UNSERVED_CAP: Final = 1000  # due jobs counted per flow; past it the reason says "1000+"
FAILURE_WINDOW: Final = 300.0  # seconds of stats_minute behind the failure rate
FAILURE_MIN_ATTEMPTS: Final = 20  # fewer attempts in the window say nothing about a rate
LOST_WINDOW_TEXT: Final = "10 min"  # health_workers counts workers lost in the last 10 minutes


@dataclass(frozen=True)
class Thresholds:
    stale_after: float = 30.0
    backlog_age: float = 300.0  # config alert_backlog_age
    failure_rate: float = 0.5  # config alert_failure_rate
    slow_ms: float = 1000.0

    @classmethod
    def from_engine(cls, engine: Any, slow_ms: float = 1000.0) -> Thresholds:
        return cls(engine.stale_after, engine.alert_backlog_age, engine.alert_failure_rate, slow_ms)


@dataclass(frozen=True)
class FlowFacts:
    name: str
    served: bool = True
    circuit_open: bool = False
    due: int = 0
    oldest_age: float = 0.0
    completed: int = 0  # attempts in the last FAILURE_WINDOW
    failed: int = 0


@dataclass(frozen=True)
class Facts:
    database_up: bool
    database_error: str = ""
    response_ms: float | None = None  # None: not measured (the console reads inside its snapshot)
    schema_version: int | None = None
    schema_required: int = REQUIRED_SCHEMA_VERSION
    live_workers: int = 0
    stale_workers: int = 0
    lost_workers: int = 0
    flows: tuple[FlowFacts, ...] = field(default=())

    def with_circuits(self, overrides: dict[str, str]) -> Facts:
        """The same facts with circuit states a live feed reported since they were read."""
        if not overrides:
            return self
        flows = tuple(FlowFacts(f.name, f.served, overrides.get(f.name, "open" if f.circuit_open else "") == "open",
                                f.due, f.oldest_age, f.completed, f.failed) for f in self.flows)
        return Facts(self.database_up, self.database_error, self.response_ms, self.schema_version,
                     self.schema_required, self.live_workers, self.stale_workers, self.lost_workers, flows)


@dataclass(frozen=True)
class Reason:
    code: str
    status: Status
    text: str


@dataclass(frozen=True)
class Verdict:
    status: Status
    reasons: tuple[Reason, ...]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.reasons]


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _count(n: int) -> str:
    return f"{n}+" if n >= UNSERVED_CAP else str(n)


def _database_down(f: Facts, t: Thresholds) -> str | None:
    return None if f.database_up else f"database unreachable: {f.database_error}"


def _schema(f: Facts, t: Thresholds) -> str | None:
    return "schema outdated: run `engine migrate`" if (f.schema_version or 0) < f.schema_required else None


def _no_workers(f: Facts, t: Thresholds) -> str | None:
    return "no live workers" if f.live_workers == 0 else None


def _unserved(f: Facts, t: Thresholds) -> str | None:
    names = [f"{x.name} ({_count(x.due)})" for x in f.flows if x.due and not x.served]
    return "pending jobs of flows no live worker serves: " + ", ".join(names) if names else None


def _stale(f: Facts, t: Thresholds) -> str | None:
    return f"{f.stale_workers} worker(s) with stale heartbeats" if f.stale_workers else None


def _lost(f: Facts, t: Thresholds) -> str | None:
    return f"{f.lost_workers} lost worker(s) in the last {LOST_WINDOW_TEXT}" if f.lost_workers else None


def _circuits(f: Facts, t: Thresholds) -> str | None:
    names = [x.name for x in f.flows if x.circuit_open]
    return "circuit open: " + ", ".join(names) if names else None


def _backlog(f: Facts, t: Thresholds) -> str | None:
    old = [f"{x.name} ({_age(x.oldest_age)})" for x in f.flows if x.due and x.oldest_age > t.backlog_age]
    return f"backlog older than {_age(t.backlog_age)}: " + ", ".join(old) if old else None


def _failure_rate(f: Facts, t: Thresholds) -> str | None:
    high = []
    for x in f.flows:
        attempts = x.completed + x.failed
        if attempts >= FAILURE_MIN_ATTEMPTS and x.failed / attempts > t.failure_rate:
            high.append(f"{x.name} ({x.failed * 100 // attempts}% of {attempts})")
    if not high:
        return None
    return (f"failure rate above {t.failure_rate:.0%} in the last {int(FAILURE_WINDOW // 60)} min: "
            + ", ".join(high))


def _slow(f: Facts, t: Thresholds) -> str | None:
    slow = f.response_ms is not None and f.response_ms > t.slow_ms
    return f"database answered in {f.response_ms} ms" if slow else None


# In order: the first unhealthy rule that fires ends the evaluation (nothing else was read).
RULES: Final[tuple[tuple[str, Status, Callable[[Facts, Thresholds], str | None]], ...]] = (
    ("database_down", "unhealthy", _database_down),
    ("schema_outdated", "unhealthy", _schema),
    ("unserved_flows", "degraded", _unserved),
    ("no_live_workers", "degraded", _no_workers),
    ("stale_workers", "degraded", _stale),
    ("lost_workers", "degraded", _lost),
    ("circuit_open", "degraded", _circuits),
    ("backlog_age", "degraded", _backlog),
    ("failure_rate", "degraded", _failure_rate),
    ("database_slow", "degraded", _slow),
)


def evaluate(facts: Facts, thresholds: Thresholds = Thresholds()) -> Verdict:
    reasons: list[Reason] = []
    for code, status, rule in RULES:
        text = rule(facts, thresholds)
        if text is None:
            continue
        reasons.append(Reason(code, status, text))
        if status == "unhealthy":
            return Verdict("unhealthy", tuple(reasons))
    return Verdict("degraded" if reasons else "healthy", tuple(reasons))


def unreachable(error: str) -> Facts:
    return Facts(database_up=False, database_error=error)


def read_facts(conn: Any, thresholds: Thresholds, *, now: datetime | None = None, ping: bool = True) -> Facts:
    """What `evaluate` judges, read on `conn` (raises the driver's error when the database fails)."""
    response_ms = None
    if ping:
        started = time.perf_counter()
        store.health_ping(conn)
        response_ms = round((time.perf_counter() - started) * 1000.0, 2)
    version = schema_version(conn)
    if version < REQUIRED_SCHEMA_VERSION:
        return Facts(True, response_ms=response_ms, schema_version=version)
    workers = store.health_workers(conn, thresholds.stale_after, now)
    flows = store.health_flows(conn, thresholds.stale_after, FAILURE_WINDOW, UNSERVED_CAP, now)
    return Facts(True, response_ms=response_ms, schema_version=version, live_workers=workers.live,
                 stale_workers=workers.stale, lost_workers=workers.lost,
                 flows=tuple(FlowFacts(x.flow, x.served, x.circuit_open, x.due, x.oldest_age, x.completed, x.failed)
                             for x in flows))

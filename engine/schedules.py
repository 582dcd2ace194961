"""Schedules: a cron expression or a period that enqueues one job per tick, fleet-wide.

Where they come from: `[schedules.NAME]` in the config (upserted when an engine starts: the declared
fields follow the file, the operator's `paused` is never overwritten) and `engine schedule add` /
`Queue.add_schedule()` at run time. Both land in `skiplock.schedules`.

Who fires them: every engine runs `run_pass()` about once a second; the one that gets the schedule
leader lock for that pass's transaction does the work. Tick times are decided on the database clock
(`now()` read from the server in the pass), never a host's, so clock skew between engines changes
nothing. Each fire is one statement that inserts the tick's job and moves `next_at` on with a
compare-and-set on its old value: whatever the number of engines, restarts or repeated passes, a
tick enqueues exactly one job. The job's payload is the schedule's payload plus `scheduled_at` (the
tick, ISO 8601 in UTC, e.g. "2026-12-01T23:00:00Z"); its dedupe key is `schedule:NAME:TICK`.

Lateness and downtime: ticks that fell due since a pass last looked at the schedule are all fired
(a leader that is a second late, or a failover to another engine, loses none). When no pass looked
at the schedule for longer than `stale_after` (every engine down, or the schedule paused), the
ticks in between were missed and `catch_up` decides: "last" enqueues the latest missed tick once,
"none" skips them all. Either way the schedule goes on from the first tick after now.

Cron: five fields (minute hour day-of-month month day-of-week) or an alias (@hourly, @daily,
@midnight, @weekly, @monthly, @yearly, @annually), evaluated in the schedule's time zone by cronsim
(Debian cron's DST rules: a time skipped by a spring-forward fires once after the gap, a time
repeated by a fall-back fires once). `every`: a period of at least 1 s, ticks aligned to the Unix
epoch (every 10s fires at :00, :10, ...), so every engine computes the same ticks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from cronsim import CronSim, CronSimError

from engine import store
from engine.errors import ValidationError
from engine.limits import NAME
from engine.payloads import encode_payload

CatchUp = Literal["last", "none"]
CATCH_UP: Final = ("last", "none")
PASS_INTERVAL: Final = 1.0  # seconds between schedule passes of each engine
MIN_EVERY_S: Final = 1.0
MAX_TICKS_PER_PASS: Final = 1000  # a pass fires at most this many ticks of one schedule (the latest)
ACTIVE_LIMIT: Final = 10_000
TICK_KEY: Final = "scheduled_at"
ALIASES: Final = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_FIELDS: Final = ("minute", "hour", "day-of-month", "month", "day-of-week")
_UTC: Final = timezone.utc
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=_UTC)


class ScheduleError(ValueError):
    """A bad schedule value; the caller prefixes where it came from (config key, CLI option)."""


# ---------------------------------------------------------------------------------------------
# Values


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ScheduleError(f"schedule name {name!r} is invalid: use 1-63 letters, digits, '_', '.', '-', "
                            "starting with a letter or digit")
    return name


def parse_cron(expression: str) -> str:
    """The five-field expression `expression` stands for (aliases expanded). Errors say which field
    is wrong and at which character position (1-based) it starts."""
    text = expression.strip()
    if text.startswith("@"):
        expanded = ALIASES.get(text.lower())
        if expanded is None:
            raise ScheduleError(f"bad cron expression {expression!r}: unknown alias {text!r} at position 1 "
                                f"(known: {', '.join(ALIASES)})")
        return expanded
    fields = [(m.start() + 1, m.group()) for m in re.finditer(r"\S+", expression)]
    if len(fields) != 5:
        raise ScheduleError(f"bad cron expression {expression!r}: expected 5 fields (minute hour day-of-month "
                            f"month day-of-week), got {len(fields)}")
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=_UTC))
    except CronSimError as exc:
        # cronsim names the field ("Bad day-of-month"): point at where that field starts.
        message = str(exc)
        for index, name in enumerate(_FIELDS):
            if message.lower().endswith(name):
                position, value = fields[index]
                raise ScheduleError(f"bad cron expression {expression!r}: bad {name} field {value!r} at "
                                    f"position {position}") from None
        raise ScheduleError(f"bad cron expression {expression!r}: {message}") from None
    return text


def check_timezone(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ScheduleError(f"time zone must be a name like UTC or Europe/Riga, got {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r} (use an IANA name like UTC or Europe/Riga)") from None
    return name


def check_every(seconds: float) -> int:
    """The period in whole milliseconds."""
    if seconds < MIN_EVERY_S:
        raise ScheduleError(f"period must be at least {MIN_EVERY_S:g}s, got {seconds:g}s")
    return int(round(seconds * 1000))


def check_payload(payload: object) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ScheduleError(f"payload must be a table (a JSON object), got {type(payload).__name__}")
    if TICK_KEY in payload:
        raise ScheduleError(f"payload must not set {TICK_KEY!r}: each job gets the tick's time there")
    try:
        encode_payload(payload, "schedule")
    except ValidationError as exc:  # the payload rules every enqueue follows
        raise ScheduleError(str(exc).removeprefix("schedule: ")) from None
    return dict(payload)


def check_catch_up(value: object) -> CatchUp:
    if value not in CATCH_UP:
        raise ScheduleError(f'catch_up must be "last" or "none", got {value!r}')
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as declared; `validated()` checks every field (errors name the field)."""

    name: str
    flow: str
    cron: str | None = None
    every: float | None = None  # seconds
    payload: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    catch_up: CatchUp = "last"
    enabled: bool = True

    def validated(self) -> "ScheduleSpec":
        check_name(self.name)
        if (self.cron is None) == (self.every is None):
            raise ScheduleError("give a cron expression or a period (every), exactly one")
        if self.cron is not None:
            parse_cron(self.cron)
        else:
            check_every(float(self.every))  # type: ignore[arg-type]
        check_payload(self.payload)
        check_timezone(self.timezone)
        check_catch_up(self.catch_up)
        return self

    def params(self) -> dict[str, Any]:
        """The row's declared columns, for the upsert and add statements."""
        return {"name": self.name, "flow": self.flow, "cron": self.cron,
                "every_ms": None if self.every is None else check_every(self.every),
                "payload": orjson.dumps(dict(self.payload)).decode(), "timezone": self.timezone,
                "catch_up": self.catch_up, "enabled": self.enabled}


# ---------------------------------------------------------------------------------------------
# Ticks: pure functions of (schedule, a time), the database's time in the engine


@dataclass(frozen=True)
class Timing:
    """What tick computation needs of a schedule row."""

    cron: str | None
    every_ms: int | None
    timezone: str = "UTC"

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment` (an aware datetime), in UTC."""
        if self.every_ms is not None:
            elapsed_ms = (moment - _EPOCH) // timedelta(milliseconds=1)
            return _EPOCH + timedelta(milliseconds=(elapsed_ms // self.every_ms + 1) * self.every_ms)
        assert self.cron is not None
        local = moment.astimezone(ZoneInfo(self.timezone))
        return next(CronSim(parse_cron(self.cron), local.replace(microsecond=0))).astimezone(_UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        """The last tick at or before `moment`, in UTC."""
        if self.every_ms is not None:
            elapsed_ms = (moment - _EPOCH) // timedelta(milliseconds=1)
            return _EPOCH + timedelta(milliseconds=(elapsed_ms // self.every_ms) * self.every_ms)
        assert self.cron is not None
        local = moment.astimezone(ZoneInfo(self.timezone))
        # cronsim in reverse counts `moment` itself when it is a tick (microseconds dropped first).
        return next(CronSim(parse_cron(self.cron), local + timedelta(microseconds=1), reverse=True)).astimezone(_UTC)

    def ticks(self, first: datetime, until: datetime, limit: int) -> list[datetime]:
        """Ticks from `first` (a tick) to `until`, inclusive; at most the latest `limit`."""
        if first > until:
            return []
        last = self.latest_at_or_before(until)
        if self.every_ms is not None:
            count = self.count(first, last)
            return [first + timedelta(milliseconds=self.every_ms * k) for k in range(max(0, count - limit), count)]
        found = [first]
        while found[-1] < last:
            found.append(self.next_after(found[-1]))
            if len(found) > limit:
                found.pop(0)
        return found

    def count(self, first: datetime, last: datetime, cap: int = 100_000) -> int:
        """How many ticks from `first` to `last` (both ticks), inclusive; a cron's count stops at `cap`."""
        if first > last:
            return 0
        if self.every_ms is not None:
            return (last - first) // timedelta(milliseconds=self.every_ms) + 1
        n, moment = 1, first
        while moment < last and n < cap:
            moment, n = self.next_after(moment), n + 1
        return n


@dataclass(frozen=True)
class Decision:
    """What one pass does with one schedule: fire `fire` (oldest first) and set next_at."""

    fire: list[datetime]
    next_at: datetime
    skipped: int = 0  # missed ticks not enqueued (downtime, catch_up)


def decide(timing: Timing, catch_up: CatchUp, next_at: datetime | None, checked_at: datetime | None,
           now: datetime, stale_after: float) -> Decision:
    """The tick logic, a pure function of the row and `now` (the database's clock in the engine, any
    clock in a test)."""
    if next_at is None:  # no tick yet: start from the next one
        return Decision([], timing.next_after(now))
    if next_at > now:
        return Decision([], next_at)
    following = timing.next_after(now)
    if checked_at is not None and (now - checked_at).total_seconds() <= stale_after:
        return Decision(timing.ticks(next_at, now, MAX_TICKS_PER_PASS), following)
    # Downtime: no pass looked at it for longer than stale_after, so the due ticks were missed.
    last = timing.latest_at_or_before(now)
    missed = timing.count(next_at, last)
    if catch_up == "last":
        return Decision([last], following, skipped=missed - 1)
    return Decision([], following, skipped=missed)


def tick_iso(moment: datetime) -> str:
    """A tick as the payload and the dedupe key carry it: ISO 8601 in UTC, milliseconds only when set."""
    utc = moment.astimezone(_UTC)
    spec = "seconds" if utc.microsecond == 0 else "milliseconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def describe(cron: str | None, every_ms: int | None) -> str:
    """`cron 0 * * * *` or `every 10s`, for listings."""
    if cron is not None:
        return f"cron {cron}"
    assert every_ms is not None
    seconds = every_ms / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"every {seconds / size:g}{unit}"
    return f"every {seconds:g}s"


# ---------------------------------------------------------------------------------------------
# The engine's side: upsert at start, the leader's pass


def sync_config(conn: store.Conn, specs: Iterable[ScheduleSpec]) -> int:
    """Upsert the config's schedules (one transaction); returns how many."""
    specs = list(specs)
    with conn.transaction():
        for spec in specs:
            store.schedule_upsert_config(conn, spec.params())
    return len(specs)


@dataclass(frozen=True)
class PassResult:
    leader: bool
    fired: dict[str, int] = field(default_factory=dict)  # schedule -> jobs enqueued
    skipped: dict[str, int] = field(default_factory=dict)  # schedule -> missed ticks not enqueued
    lost_race: int = 0  # schedules another pass had moved on (compare-and-set refused)


def run_pass(conn: store.Conn, stale_after: float, on_error: Callable[[str, Exception], None] | None = None
             ) -> PassResult:
    """One schedule pass in one transaction: nothing unless this engine gets the leader lock."""
    fired: dict[str, int] = {}
    skipped: dict[str, int] = {}
    lost = 0
    with conn.transaction():
        if not store.schedule_leader(conn):
            return PassResult(False)
        unchanged: list[str] = []
        for row in store.schedules_active(conn, ACTIVE_LIMIT):
            try:
                timing = Timing(row.cron, row.every_ms, row.timezone)
                next_at, checked_at = row.next_at, row.checked_at
                if next_at is None:  # added or retimed since the last pass: its first tick follows that moment
                    next_at, checked_at = timing.next_after(row.since), row.since
                decision = decide(timing, row.catch_up, next_at, checked_at, row.now, stale_after)
            except (ScheduleError, CronSimError, ZoneInfoNotFoundError, ValueError) as exc:
                # A row written by hand or by an older version: report it, keep firing the others.
                if on_error is not None:
                    on_error(row.name, exc)
                continue
            if not decision.fire and decision.next_at == row.next_at:
                unchanged.append(row.name)
                continue
            advanced, count = store.schedule_fire(
                conn, row.name, row.next_at, [tick_iso(t) for t in decision.fire], decision.next_at,
                decision.fire[-1] if decision.fire else None)
            if not advanced:
                lost += 1
                continue
            if count:
                fired[row.name] = count
            if decision.skipped:
                skipped[row.name] = decision.skipped
        store.schedules_checked(conn, unchanged)
    return PassResult(True, fired, skipped, lost)

"""What the console knows between snapshots: live counts from telemetry events, and the maths that
merges them with the per-minute history from the tables.

Plain Python, no Textual: the app feeds it events (`apply`) and snapshots (`set_snapshot`); the screens
read from it. Live per-second data is trusted only from `live_since` (when the feed last connected);
before that, and whenever the feed is down, rates and charts come from `skiplock.stats_minute`, so a
console that attaches late still shows the last hour.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from console.data import MinuteStats, Snapshot
from engine.telemetry import AnyEvent

# What a change touches, so a screen redraws only that: `apply` returns the live ones; the app adds
# "snapshot" after a read and "all" to redraw everything.
Change = Literal["all", "snapshot", "counts", "failures", "dead", "workers", "flows", "runs"]

WINDOWS: Final = (60, 300, 900, 3600)  # selectable chart windows, seconds
WINDOW_NAMES: Final = {60: "1 min", 300: "5 min", 900: "15 min", 3600: "1 h"}
POINTS: Final = 60  # points per chart, whatever the window
RATE_WINDOW: Final = 10  # seconds of live ticks behind a "per second" rate
KEEP_SECONDS: Final = 3700
MAX_FAILURES: Final = 1000
MAX_DEAD_IDS: Final = 5000


@dataclass
class FailureRow:
    at: float
    flow: str
    job: int
    attempt: int
    max_attempts: int
    type: str
    message: str
    worker: str = ""
    dead: bool = False
    source: str = "live"  # live (a failure event) | dead letter (read from the table at attach)

    @property
    def key(self) -> str:
        return f"{self.job}:{self.attempt}:{self.source}"

    @property
    def outcome(self) -> str:
        return "dead" if self.dead or (self.max_attempts and self.attempt >= self.max_attempts) else "retrying"


@dataclass
class LiveState:
    live_since: float | None = None  # when the feed (re)connected; None while it is down
    snapshot: Snapshot | None = None
    # second -> [completed, failed]
    seconds: dict[int, list[int]] = field(default_factory=dict)
    # flow -> second -> [completed, failed]
    flow_seconds: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    # worker -> second -> completed
    worker_seconds: dict[str, dict[int, int]] = field(default_factory=dict)
    failures: deque[FailureRow] = field(default_factory=lambda: deque(maxlen=MAX_FAILURES))
    failures_dropped: int = 0
    dead_ids: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_DEAD_IDS))
    dead_since_snapshot: dict[str, int] = field(default_factory=dict)
    paused_override: dict[str, bool] = field(default_factory=dict)
    circuit_override: dict[str, str] = field(default_factory=dict)
    events: int = 0
    last_event_at: float | None = None
    failures_version: int = 0  # bumped on every change of `failures`, so views redraw only then

    # -- input -----------------------------------------------------------------------------------

    def connected(self, at: float) -> None:
        self.live_since = at

    def disconnected(self) -> None:
        self.live_since = None

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.dead_since_snapshot.clear()
        self.paused_override.clear()
        self.circuit_override.clear()

    def add_backfill(self, rows: Iterable[FailureRow]) -> None:
        """Failures known from the tables at attach (dead letters), oldest first, before live ones."""
        known = {row.key for row in self.failures}
        fresh = [row for row in rows if row.key not in known]
        if fresh:
            merged = sorted([*fresh, *self.failures], key=lambda r: r.at)
            self.failures.clear()
            self.failures.extend(merged[-MAX_FAILURES:])
            self.failures_version += 1

    def apply(self, event: AnyEvent) -> set[Change]:
        """Take one telemetry event; returns what it changed: counts, failures, dead, workers, flows, runs.
        Fields are read defensively: the payload came over the wire (a kind not listed changes nothing)."""
        kind = event.get("kind")
        at = float(event.get("at") or 0.0)
        self.events += 1
        self.last_event_at = at or self.last_event_at
        changed: set[Change] = set()
        if kind == "tick":
            second = int(at)
            worker = str(event.get("worker", ""))
            total = self.seconds.setdefault(second, [0, 0])
            done_by_worker = 0
            for flow, counts in (event.get("flows") or {}).items():
                completed = int(counts.get("completed", 0))
                failed = int(counts.get("failed", 0))
                total[0] += completed
                total[1] += failed
                per_flow = self.flow_seconds.setdefault(flow, {}).setdefault(second, [0, 0])
                per_flow[0] += completed
                per_flow[1] += failed
                done_by_worker += completed
                dead = int(counts.get("dead", 0))
                if dead:
                    self.dead_since_snapshot[flow] = self.dead_since_snapshot.get(flow, 0) + dead
                    changed.add("dead")
            if worker:
                per_worker = self.worker_seconds.setdefault(worker, {})
                per_worker[second] = per_worker.get(second, 0) + done_by_worker
            self._trim(second)
            changed.add("counts")
        elif kind == "failure":
            flow = str(event.get("flow", "?"))
            for sample in event.get("failures") or ():
                self.failures.append(FailureRow(
                    at=at, flow=flow, job=int(sample.get("job", 0)), attempt=int(sample.get("attempt", 0)),
                    max_attempts=int(sample.get("max_attempts", 0)), type=str(sample.get("type", "?")),
                    message=str(sample.get("message", "")), worker=str(event.get("worker", ""))))
            self.failures_dropped += int(event.get("dropped") or 0)
            self.failures_version += 1
            changed.add("failures")
        elif kind == "dead_letter":
            ids = {int(i) for i in event.get("jobs") or ()}
            self.dead_ids.extend(ids)
            last: dict[int, FailureRow] = {}  # the job's final failure is the one that killed it
            for row in self.failures:
                if row.job in ids and row.source == "live" and (
                        row.job not in last or row.attempt >= last[row.job].attempt):
                    last[row.job] = row
            marked = False
            for row in last.values():
                if not row.dead:
                    row.dead = True
                    marked = True
            if marked:
                self.failures_version += 1
                changed.add("failures")
            changed.add("dead")
        elif kind in ("flow_paused", "flow_resumed"):
            self.paused_override[str(event.get("flow"))] = kind == "flow_paused"
            changed.add("flows")
        elif kind in ("circuit_opened", "circuit_closed"):
            self.circuit_override[str(event.get("flow"))] = "open" if kind == "circuit_opened" else "closed"
            changed.add("flows")
        elif kind == "rescued":
            for flow, counts in (event.get("flows") or {}).items():
                dead = int((counts or {}).get("dead", 0))
                if dead:
                    self.dead_since_snapshot[flow] = self.dead_since_snapshot.get(flow, 0) + dead
            changed.update(("dead", "workers"))
        elif kind in ("worker_started", "worker_stopped", "worker_lost"):
            changed.add("workers")
        elif kind == "run_finished":
            changed.add("runs")
        return changed

    def _trim(self, second: int) -> None:
        oldest = second - KEEP_SECONDS
        if len(self.seconds) > KEEP_SECONDS + 60:
            for key in [k for k in self.seconds if k < oldest]:
                del self.seconds[key]
            for per_flow in self.flow_seconds.values():
                for key in [k for k in per_flow if k < oldest]:
                    del per_flow[key]
        for worker, per_worker in list(self.worker_seconds.items()):
            if len(per_worker) > RATE_WINDOW * 3:
                for key in [k for k in per_worker if k < second - RATE_WINDOW * 2]:
                    del per_worker[key]
            if per_worker and max(per_worker) < oldest:
                del self.worker_seconds[worker]

    # -- derived ---------------------------------------------------------------------------------

    def live_covers(self, now: float, seconds: float) -> bool:
        return self.live_since is not None and now - self.live_since >= seconds + 1

    def dead_count(self, flow: str, from_snapshot: int) -> int:
        return from_snapshot + self.dead_since_snapshot.get(flow, 0)

    def paused(self, flow: str, from_snapshot: bool) -> bool:
        return self.paused_override.get(flow, from_snapshot)

    def flow_rates(self, now: float) -> dict[str, tuple[float, float]]:
        """flow -> (completed/s, failed/s): the last RATE_WINDOW seconds of ticks when the feed has
        been up that long, else the last minute and a bit of stats_minute."""
        if self.live_covers(now, RATE_WINDOW):
            end = int(now)
            rates: dict[str, tuple[float, float]] = {}
            for flow, per_second in self.flow_seconds.items():
                completed = failed = 0
                for second in range(end - RATE_WINDOW, end):
                    counts = per_second.get(second)
                    if counts:
                        completed += counts[0]
                        failed += counts[1]
                rates[flow] = (completed / RATE_WINDOW, failed / RATE_WINDOW)
            for flow in self._history_flows():
                rates.setdefault(flow, (0.0, 0.0))
            return rates
        return history_rates(self.snapshot.history if self.snapshot else [], now)

    def _history_flows(self) -> set[str]:
        return {m.flow for m in self.snapshot.history} if self.snapshot else set()

    def worker_rate(self, worker: str, now: float) -> float | None:
        if not self.live_covers(now, RATE_WINDOW):
            return None
        per_worker = self.worker_seconds.get(worker, {})
        end = int(now)
        return sum(per_worker.get(s, 0) for s in range(end - RATE_WINDOW, end)) / RATE_WINDOW

    def series(self, window: int, now: float, points: int = POINTS,
               flow: str | None = None) -> tuple[list[float], list[float]]:
        """(completed/s, failed/s) at `points` points covering the last `window` seconds. Each second
        comes from live ticks where the feed was up, else from its minute in stats_minute."""
        points = max(1, points)
        end = int(now)
        start = end - window
        history = self.snapshot.history if self.snapshot else []
        minute_rates = _minute_rates(history, now, flow)
        live = self.seconds if flow is None else self.flow_seconds.get(flow, {})
        live_from = math.inf if self.live_since is None else self.live_since
        completed: list[float] = []
        failed: list[float] = []
        for point in range(points):
            first = start + point * window // points
            last = max(first + 1, start + (point + 1) * window // points)
            c_sum = f_sum = 0.0
            for second in range(first, last):
                if second >= live_from:
                    counts = live.get(second)
                    if counts:
                        c_sum += counts[0]
                        f_sum += counts[1]
                else:
                    c_rate, f_rate = minute_rates.get(second - second % 60, (0.0, 0.0))
                    c_sum += c_rate
                    f_sum += f_rate
            completed.append(c_sum / (last - first))
            failed.append(f_sum / (last - first))
        return completed, failed


def _minute_rates(history: list[MinuteStats], now: float, flow: str | None) -> dict[int, tuple[float, float]]:
    """minute start -> (completed/s, failed/s); the current minute divides by the seconds elapsed."""
    current = int(now) - int(now) % 60
    totals: dict[int, list[float]] = {}
    for m in history:
        if flow is not None and m.flow != flow:
            continue
        slot = totals.setdefault(int(m.minute), [0.0, 0.0])
        slot[0] += m.completed
        slot[1] += m.failed
    rates: dict[int, tuple[float, float]] = {}
    for minute, (completed, failed) in totals.items():
        seconds = max(1.0, now - minute) if minute == current else 60.0
        rates[minute] = (completed / seconds, failed / seconds)
    return rates


def history_rates(history: list[MinuteStats], now: float) -> dict[str, tuple[float, float]]:
    """Per flow: (completed + failed) over the previous full minute and the current partial one."""
    current = int(now) - int(now) % 60
    previous = current - 60
    sums: dict[str, list[float]] = {}
    for m in history:
        slot = sums.setdefault(m.flow, [0.0, 0.0])
        if int(m.minute) in (previous, current):
            slot[0] += m.completed
            slot[1] += m.failed
    span = 60.0 + max(0.0, now - current)
    return {flow: (c / span, f / span) for flow, (c, f) in sums.items()}


def history_totals(history: list[MinuteStats], minutes: int = 60) -> dict[str, tuple[int, int, int]]:
    """Per flow: completed, failed, dead over the history the snapshot holds (the last hour)."""
    totals: dict[str, list[int]] = {}
    for m in history:
        slot = totals.setdefault(m.flow, [0, 0, 0])
        slot[0] += m.completed
        slot[1] += m.failed
        slot[2] += m.dead
    return {flow: (c, f, d) for flow, (c, f, d) in totals.items()}


def history_means(history: list[MinuteStats], now: float, minutes: int = 5) -> dict[str, tuple[float, float]]:
    """Per flow: mean wait and run time (ms) per job over the last `minutes`, from stats_minute sums."""
    since = int(now) - int(now) % 60 - (minutes - 1) * 60
    sums: dict[str, list[float]] = {}
    for m in history:
        if m.minute >= since:
            slot = sums.setdefault(m.flow, [0.0, 0.0, 0.0])
            slot[0] += m.wait_ms_sum
            slot[1] += m.run_ms_sum
            slot[2] += m.completed + m.failed
    return {flow: (w / n, r / n) for flow, (w, r, n) in sums.items() if n}


"""Why is this job waiting? Every reason a job is not running now, from what the engine already knows.

`explain(facts)` is a pure function of one explain_job row (engine/sql/queries.sql: one statement, one
snapshot), so each reason is tested on its own; Queue.explain reads the row, `engine explain` and the
console's job detail print the result. Limits come from the policy the engines recorded for the flow
(flows.policy), the same values their claims enforce.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

# Due jobs ahead of this one are counted up to this many (a bounded scan of the claim's index).
AHEAD_CAP: Final = 10_000

ReasonKind = Literal[
    "ended",              # completed, cancelled or dead: it will not run (a dead letter waits for retry)
    "running",            # a worker runs it now (worker, running for, heartbeat age, progress)
    "cancel_requested",   # running, and a cancel was asked for
    "paused",             # its flow is paused
    "circuit_open",       # its flow's circuit is open until `until`
    "circuit_half_open",  # one trial job at a time until a trial succeeds
    "backoff",            # run_at in the future: the retry after attempt `count`
    "delayed",            # run_at in the future: enqueued with a delay (or a schedule's tick)
    "fleet_concurrency",  # the flow runs `count` of `limit` jobs fleet-wide
    "rate_limited",       # the flow's token bucket is empty until `until`
    "key_limited",        # `count` of `limit` jobs of its concurrency key are running
    "no_worker",          # no live worker serves the flow
    "queued_behind",      # `count` due jobs are claimed before it (at least, when `capped`)
    "due",                # nothing holds it: the next free worker of its flow claims it
]


@dataclass(frozen=True)
class Reason:
    kind: ReasonKind
    message: str
    until: datetime | None = None
    count: int | None = None
    limit: int | None = None
    key: str | None = None
    capped: bool = False


@dataclass(frozen=True)
class RunningInfo:
    worker: str
    host: str | None
    pid: int | None
    running_s: float
    heartbeat_age_s: float | None
    # Hook: the job's progress once the worker reports one (ctx.progress, issue 14): read it in
    # explain_job and set it here. None until then.
    progress: Any = None


@dataclass(frozen=True)
class Explanation:
    job_id: int
    flow: str
    status: str  # pending, scheduled, running, completed, cancelled, dead
    reasons: tuple[Reason, ...]
    running: RunningInfo | None = None
    attempts: int = 0
    max_attempts: int | None = None
    checked_at: datetime | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items() if v is not None and v is not False}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        out = plain(asdict(self))
        out["reasons"] = [plain(asdict(r)) for r in self.reasons]  # keep every reason, even empty fields
        return out

    def lines(self) -> list[str]:
        """Human text: one line of status, then one line per reason."""
        head = f"job {self.job_id} ({self.flow}): {self.status}"
        if self.status in ("pending", "scheduled"):
            head += f", attempt {self.attempts + 1} of {self.max_attempts}"
        return [head] + [f"- {reason.message}" for reason in self.reasons]


def _seconds(delta: timedelta) -> float:
    return max(delta.total_seconds(), 0.0)


def _in(now: datetime, until: datetime) -> str:
    return f"until {until.isoformat(timespec='seconds')} (in {_seconds(until - now):.1f} s)"


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def explain_done(job_id: int, row: dict[str, Any]) -> Explanation:
    status = str(row["status"])
    when = row.get("finished_at")
    at = f" at {when.isoformat(timespec='seconds')}" if isinstance(when, datetime) else ""
    return Explanation(job_id, row["flow"], status, (
        Reason("ended", f"it has ended: {status}{at}; it will not run again"),), attempts=int(row["attempts"]))


def explain(facts: dict[str, Any]) -> Explanation:
    """Every reason the job of this explain_job row is not running now (or what runs it)."""
    now: datetime = facts["now"]
    status = facts["status"]
    job_id, flow = int(facts["id"]), str(facts["flow"])
    attempts, max_attempts = int(facts["attempts"]), _int(facts["max_attempts"])
    policy: dict[str, Any] = facts.get("policy") or {}
    if status == "dead":
        return Explanation(job_id, flow, status, (Reason(
            "ended", f"it has ended: dead letter after {attempts} attempt(s) ({facts.get('error_type')}); "
                     "it runs again only if retried (engine dlq retry)"),), attempts=attempts,
            max_attempts=max_attempts, checked_at=now)
    if status == "running":
        return _running(facts, now, job_id, flow, attempts, max_attempts)

    reasons: list[Reason] = []
    run_at: datetime = facts["run_at"]
    scheduled = run_at > now
    if facts["paused"]:
        reasons.append(Reason("paused", f"flow {flow} is paused (engine resume {flow})"))
    until = facts.get("circuit_until")
    if facts.get("circuit_state") == "open" and until is not None and until > now:
        reasons.append(Reason("circuit_open", f"the circuit of flow {flow} is open {_in(now, until)}", until=until))
    elif facts.get("circuit_state") in ("open", "half_open"):
        reasons.append(Reason("circuit_half_open", f"the circuit of flow {flow} is half-open: one trial job at a "
                                                   "time until one succeeds"))
    if scheduled and attempts:
        reasons.append(Reason("backoff", f"retry backoff after attempt {attempts} ({facts.get('error_type')}): "
                                         f"run_at is {_in(now, run_at)}", until=run_at, count=attempts))
    elif scheduled:
        reasons.append(Reason("delayed", f"delayed: run_at is {_in(now, run_at)}", until=run_at))
    concurrency = _int(policy.get("concurrency"))
    running = int(facts["flow_running"])
    if concurrency is not None and running >= concurrency:
        reasons.append(Reason("fleet_concurrency", f"fleet concurrency limit reached ({running} of {concurrency} "
                                                   f"running)", count=running, limit=concurrency))
    rate = policy.get("rate_limit")
    if rate:
        reason = _rate(facts, now, float(rate), policy)
        if reason is not None:
            reasons.append(reason)
    per_key = _int(policy.get("concurrency_per_key")) or (1 if policy.get("concurrency_key") else None)
    key = facts.get("concurrency_key")
    if per_key is not None and key is not None and int(facts["key_running"]) >= per_key:
        held = int(facts["key_running"])
        reasons.append(Reason("key_limited", f"its concurrency key {key!r} is at its limit ({held} of {per_key} "
                                             "running)", count=held, limit=per_key, key=key))
    if int(facts["live_workers"]) == 0:
        reasons.append(Reason("no_worker", f"no live worker serves flow {flow} (start one: engine run --flows "
                                           f"{flow})"))
    ahead = int(facts["ahead"])
    if ahead:
        capped = ahead >= AHEAD_CAP
        reasons.append(Reason("queued_behind", f"{'at least ' if capped else ''}{ahead} job(s) ahead of it by "
                                               "priority and age", count=ahead, capped=capped))
    if not reasons:
        reasons.append(Reason("due", "nothing holds it: the next free worker of its flow claims it"))
    return Explanation(job_id, flow, "scheduled" if scheduled else "pending", tuple(reasons), attempts=attempts,
                       max_attempts=max_attempts, checked_at=now)


def _rate(facts: dict[str, Any], now: datetime, rate: float, policy: dict[str, Any]) -> Reason | None:
    tokens, at = facts.get("bucket_tokens"), facts.get("bucket_at")
    if tokens is None or at is None:
        return None  # no claim yet: the bucket starts full
    burst = float(policy.get("rate_burst") or max(1, math.ceil(rate)))
    held = min(burst, float(tokens) + rate * _seconds(now - at))
    if held >= 1.0:
        return None
    until = now + timedelta(seconds=(1.0 - held) / rate)
    return Reason("rate_limited", f"rate limit {rate:g}/s exhausted {_in(now, until)}", until=until)


def _running(facts: dict[str, Any], now: datetime, job_id: int, flow: str, attempts: int,
             max_attempts: int | None) -> Explanation:
    claimed_at: datetime | None = facts.get("claimed_at")
    beat: datetime | None = facts.get("worker_heartbeat_at")
    info = RunningInfo(str(facts.get("claimed_by")), facts.get("worker_host"), _int(facts.get("worker_pid")),
                       _seconds(now - claimed_at) if claimed_at else 0.0,
                       _seconds(now - beat) if beat else None)
    where = f"{info.worker}" + (f" (host {info.host}, pid {info.pid})" if info.host else "")
    beat_text = f"heartbeat {info.heartbeat_age_s:.1f} s ago" if info.heartbeat_age_s is not None else \
        "no worker row (a custom claim loop?)"
    reasons = [Reason("running", f"running on {where} for {info.running_s:.1f} s, attempt {attempts} of "
                                 f"{max_attempts}; {beat_text}")]
    if facts.get("cancel_requested_at") is not None:
        reasons.append(Reason("cancel_requested", "a cancel was requested; its worker stops it"))
    return Explanation(job_id, flow, "running", tuple(reasons), running=info, attempts=attempts,
                       max_attempts=max_attempts, checked_at=now)

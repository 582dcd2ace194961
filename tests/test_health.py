"""One health definition (engine/health.py).

- The rule table, as a table: facts -> status and reason codes.
- The same database states through the three surfaces: `engine health --json` (CLI), Queue.health_check()
  (API) and the console header (a real ConsoleApp on the same database): identical status and reasons.
- The failure log's token bucket on a clock the test controls.
- health_flows' plan stays on the indexes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import psycopg
import pytest

from console.app import ConsoleApp
from engine.config import load_settings
from engine.failure_log import FailureLog
from engine.health import Facts, FlowFacts, Thresholds, evaluate
from engine.queue import Queue
from engine.sql import Q
from engine.telemetry import FailureSample
from tests.support.cli import engine
from tests.support.console_seed import wait_until

T = Thresholds(stale_after=30.0, backlog_age=300.0, failure_rate=0.5, slow_ms=1000.0)
UP = dict(database_up=True, schema_version=10_000, live_workers=2)

# (facts, status, reason codes in order)
TABLE: list[tuple[Facts, str, list[str]]] = [
    (Facts(**UP), "healthy", []),
    (Facts(database_up=False, database_error="refused"), "unhealthy", ["database_down"]),
    (Facts(database_up=True, schema_version=1, schema_required=5), "unhealthy", ["schema_outdated"]),
    (Facts(**{**UP, "live_workers": 0}), "degraded", ["no_live_workers"]),
    (Facts(**{**UP, "live_workers": 0}, flows=(FlowFacts("a", served=False, due=3),)), "degraded",
     ["unserved_flows", "no_live_workers"]),
    (Facts(**UP, flows=(FlowFacts("a", served=False, due=0),)), "healthy", []),  # nothing due: nobody needed
    (Facts(**UP, stale_workers=1), "degraded", ["stale_workers"]),
    (Facts(**UP, lost_workers=2), "degraded", ["lost_workers"]),
    (Facts(**UP, flows=(FlowFacts("a", circuit_open=True),)), "degraded", ["circuit_open"]),
    (Facts(**UP, flows=(FlowFacts("a", due=1, oldest_age=301.0),)), "degraded", ["backlog_age"]),
    (Facts(**UP, flows=(FlowFacts("a", due=1, oldest_age=299.0),)), "healthy", []),
    (Facts(**UP, flows=(FlowFacts("a", completed=10, failed=11),)), "degraded", ["failure_rate"]),
    (Facts(**UP, flows=(FlowFacts("a", completed=1, failed=10),)), "healthy", []),  # too few attempts to judge
    (Facts(**UP, flows=(FlowFacts("a", completed=10, failed=10),)), "healthy", []),  # at the bound, not above
    (Facts(**UP, response_ms=1500.0), "degraded", ["database_slow"]),
    (Facts(**UP, stale_workers=1, lost_workers=1, flows=(FlowFacts("a", circuit_open=True, due=5, oldest_age=900.0,
                                                                   completed=0, failed=40),)),
     "degraded", ["stale_workers", "lost_workers", "circuit_open", "backlog_age", "failure_rate"]),
]


@pytest.mark.parametrize(("facts", "status", "codes"), TABLE)
def test_rule_table(facts: Facts, status: str, codes: list[str]) -> None:
    verdict = evaluate(facts, T)
    assert (verdict.status, [r.code for r in verdict.reasons]) == (status, codes)
    assert all(r.text and "\n" not in r.text for r in verdict.reasons)  # one line per reason


def test_reason_texts() -> None:
    facts = Facts(**UP, flows=(FlowFacts("a", due=1000, served=False, oldest_age=7300.0, completed=5, failed=45),))
    assert evaluate(facts, T).texts == [
        "pending jobs of flows no live worker serves: a (1000+)",
        "backlog older than 5m: a (2h01m)",
        "failure rate above 50% in the last 5 min: a (90% of 50)",
    ]


# ---------------------------------------------------------------------------------------------
# The same states through the CLI, the API and the console

CONFIG = """
[global]
heartbeat_interval = "0.5s"
stale_after = "2s"
alert_backlog_age = "1m"
alert_failure_rate = 0.25
"""


def _worker(conn: psycopg.Connection, wid: str, flows: list[str], state: str = "idle", age: str = "-1 hour") -> None:
    """A worker row; the default heartbeat lies ahead, so it stays live through the test (stale_after 2s)."""
    stopped = "now()" if state in ("lost", "stopped") else "NULL"
    conn.execute(f"INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state, heartbeat_at, stopped_at) "
                 f"VALUES (%s, 'e', 'h', 1, %s, %s, now() - %s::interval, {stopped})", (wid, flows, state, age))


def _jobs(conn: psycopg.Connection, flow: str, count: int, age: str = "0s") -> None:
    conn.execute("INSERT INTO skiplock.flows (name) VALUES (%s) ON CONFLICT DO NOTHING", (flow,))
    conn.execute("INSERT INTO skiplock.jobs (flow, payload, run_at) SELECT %s, '{}', now() - %s::interval "
                 "FROM generate_series(1, %s)", (flow, age, count))


def state_empty(conn: psycopg.Connection) -> None:
    pass


def state_served(conn: psycopg.Connection) -> None:
    _worker(conn, "w1", ["emails"])
    _jobs(conn, "emails", 3)


def state_unserved(conn: psycopg.Connection) -> None:
    _jobs(conn, "emails", 3)


def state_troubled(conn: psycopg.Connection) -> None:
    _worker(conn, "w1", ["emails", "reports"])
    _worker(conn, "w2", ["emails"], age="1 hour")  # stale
    _worker(conn, "w3", ["emails"], state="lost")
    _jobs(conn, "emails", 2, age="10 minutes")  # backlog older than 1m
    _jobs(conn, "reports", 1)
    conn.execute("UPDATE skiplock.flows SET circuit_state = 'open', circuit_until = now() + interval '1 hour' "
                 "WHERE name = 'reports'")
    conn.execute("INSERT INTO skiplock.stats_minute (minute, flow, completed, failed) "
                 "VALUES (date_trunc('minute', now()), 'emails', 30, 20)")


STATES = {
    "empty": (state_empty, "degraded", ["no_live_workers"]),
    "served": (state_served, "healthy", []),
    "unserved": (state_unserved, "degraded", ["unserved_flows", "no_live_workers"]),
    "troubled": (state_troubled, "degraded", ["stale_workers", "lost_workers", "circuit_open", "backlog_age",
                                             "failure_rate"]),
}


def _console(dsn: str, thresholds: Thresholds) -> tuple[str, str]:
    app = ConsoleApp(dsn, live=False, refresh_interval=3600.0, stale_after=thresholds.stale_after,
                     thresholds=thresholds)
    out: list[tuple[str, str]] = []

    async def main() -> None:
        async with app.run_test(size=(160, 40)) as pilot:
            await wait_until(pilot, lambda: app.snapshots > 0 or app.database_down)
            out.append(app.health())

    asyncio.run(main())
    return out[0]


@pytest.mark.parametrize("name", list(STATES))
def test_same_reasons_through_cli_api_and_console(name: str, dsn: str, tmp_path: Path) -> None:
    setup, status, codes = STATES[name]
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    thresholds = Thresholds.from_engine(load_settings(config, environ={}).engine)
    assert (thresholds.stale_after, thresholds.backlog_age, thresholds.failure_rate) == (2.0, 60.0, 0.25)

    result = engine("health", "--json", "--config", str(config), dsn=dsn)
    cli = json.loads(result.stdout)
    assert result.returncode == {"healthy": 0, "degraded": 1}[status], result
    with Queue(dsn) as queue:
        api = queue.health_check(thresholds=thresholds)
    label, reasons = _console(dsn, thresholds)

    assert cli["status"] == api["status"] == label.lower() == status
    assert [p["code"] for p in cli["problems"]] == [p["code"] for p in api["problems"]] == codes
    assert cli["reasons"] == api["reasons"] == (reasons.split("; ") if reasons else [])
    text = engine("health", "--config", str(config), dsn=dsn).stdout.splitlines()
    assert [line.removeprefix("  - ") for line in text[1:]] == api["reasons"]  # one line per reason


def test_console_and_cli_agree_with_no_engine_running(dsn: str) -> None:
    """The bug this module fixes by construction: the console said degraded ("no live workers")
    while `engine health` said healthy, with no engine running."""
    result = engine("health", dsn=dsn)
    assert result.returncode == 1 and result.stdout.splitlines()[1:] == ["  - no live workers"], result.stdout
    assert _console(dsn, Thresholds()) == ("DEGRADED", "no live workers")


def test_health_flows_stays_on_the_indexes(dsn: str) -> None:
    """The pending flows come from a skip scan of the claim's index (skiplock.flows_with_status,
    inlined: a function scan would hide its plan), never a scan of the jobs table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, run_at, attempts)
                        SELECT 'h' || (i % 40), '{}', 'pending', now(), 0 FROM generate_series(1, 30000) i""")
        conn.execute("ANALYZE skiplock.jobs")
        params = {"now": None, "stale_after": 3.0, "window": 300.0, "cap": 1000}
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + Q.health_flows, params))
        conn.execute("DELETE FROM skiplock.jobs WHERE flow LIKE 'h%'")
    assert "Seq Scan on jobs" not in plan and "Function Scan" not in plan, plan
    assert "jobs_claim_idx" in plan, plan


# ---------------------------------------------------------------------------------------------
# The failure log's rate limit


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _samples(count: int, start: int = 0) -> list[FailureSample]:
    return [FailureSample(start + i, 1, 3, "ValueError", "boom password=hunter2\nmore", "r1") for i in range(count)]


def test_failure_log_token_bucket(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    log = FailureLog(logging.getLogger("skiplock.test"), burst=3, per_second=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="skiplock.test"):
        log.failed("a", _samples(5), dead_ids=[4])
        log.failed("b", _samples(1, 100), dead_ids=[])  # another flow has its own bucket
        records = list(caplog.records)
        assert [r.levelname for r in records] == ["WARNING"] * 4
        assert records[0].getMessage() == "a job 0 failed (attempt 1 of 3, run r1): ValueError: boom password=***"
        log.flush()  # no token yet: nothing
        assert len(caplog.records) == 4
        clock.now = 1.0
        log.failed("a", _samples(1, 10), dead_ids=[10])
        line = caplog.records[-1]
        assert line.levelname == "ERROR" and "dead letter" in line.getMessage()
        assert (line.suppressed, line.suppressed_dead) == (2, 1)  # type: ignore[attr-defined]
        log.failed("a", _samples(2, 20), dead_ids=[])  # bucket empty again: both counted
        clock.now = 2.0
        log.flush()
        summary = caplog.records[-1]
        assert summary.getMessage() == "a: 2 failed attempts not logged (rate limit), 0 of them dead letters"
        log.flush()
        assert caplog.records[-1] is summary  # counted once
    assert not any("hunter2" in r.getMessage() for r in caplog.records)

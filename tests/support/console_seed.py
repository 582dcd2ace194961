"""The console's fixed data and an app on it, for the console's snapshot, behaviour and e2e tests.

`seed(dsn)` inserts rows with fixed timestamps around FIXED_NOW; `make_app(dsn)` builds a ConsoleApp
whose clock is FIXED_NOW, with no live feed and no periodic refresh, so every screen is deterministic.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta, timezone

import orjson
import psycopg
from textual.pilot import Pilot

from console.app import ConsoleApp

FIXED_NOW = datetime(2025, 3, 14, 12, 0, 30, tzinfo=timezone.utc)


def _at(seconds_ago: float) -> datetime:
    return FIXED_NOW - timedelta(seconds=seconds_ago)


def seed(dsn: str) -> dict[str, list[int]]:
    """Fixed data: four flows, pending/scheduled/retrying/running/dead jobs, an hour of stats, recent
    completions, four workers on two engines, two runs. Returns the ids of interesting jobs."""
    ids: dict[str, list[int]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("""INSERT INTO skiplock.flows (name, paused, policy, circuit_state, circuit_until) VALUES
            ('noop', false, '{"max_attempts": 5}', 'closed', NULL),
            ('flaky', false, '{"max_attempts": 3}', 'closed', NULL),
            ('sleep', true, '{"max_attempts": 5}', 'closed', NULL),
            ('reports', false, '{"max_attempts": 4}', 'open', %s)""", (_at(-20),))
        # pending: ready, scheduled (future run_at), retrying (attempts > 0, backing off)
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, run_at, attempts, max_attempts, created_at)
            SELECT 100000 + i, 'noop', jsonb_build_object('n', i), 'pending', %s, 0, 5, %s FROM generate_series(1, 1200) i""",
                     (_at(5), _at(60)))
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, run_at, attempts, max_attempts, created_at)
            SELECT 110000 + i, 'noop', jsonb_build_object('n', i), 'pending', %s, 0, 5, %s FROM generate_series(1, 30) i""",
                     (_at(-600), _at(30)))
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, run_at, attempts, max_attempts, created_at,
                                                   error_type, error_message)
            SELECT 120000 + i, 'flaky', jsonb_build_object('fail', 0.3), 'pending', %s, CASE WHEN i <= 12 THEN 1 ELSE 0 END, 3, %s,
                   CASE WHEN i <= 12 THEN 'FlakyError' END, CASE WHEN i <= 12 THEN 'flaky: transient failure (demo)' END
            FROM generate_series(1, 40) i""", (_at(-4), _at(50)))
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, run_at, attempts, max_attempts, created_at)
            SELECT 130000 + i, 'sleep', jsonb_build_object('seconds', 0.02), 'pending', %s, 0, 5, %s
            FROM generate_series(1, 25) i""", (_at(40), _at(40)))
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, run_at, attempts, max_attempts, created_at,
                                                   claimed_by, claim_token, claimed_at)
            SELECT 140000 + i, 'noop', jsonb_build_object('n', i), 'running', %s, 1, 5, %s, 'ops-1:4101:a1b2c3d4:0', 7, %s
            FROM generate_series(1, 100) i""", (_at(3), _at(3), _at(1)))
        # dead letters with their error history
        dead = []
        for i in range(23):
            transient = i < 15
            error_type = "FlakyError" if transient else "ValueError"
            message = "flaky: transient failure (demo)" if transient else f"bad record {i}: missing field 'email'"
            attempts = 3 if transient else 1
            died = _at(120 + i * 3600 * 7)  # from two minutes to about a week ago
            errors = [{"attempt": a, "at": (died - timedelta(seconds=(attempts - a) * 2)).isoformat(),
                       "worker": "ops-1:4101:a1b2c3d4:0", "type": error_type, "message": message,
                       "traceback": f"Traceback (most recent call last):\n  File \"flows.py\", line 12, in flaky\n{error_type}: {message}",
                       "permanent": not transient} for a in range(1, attempts + 1)]
            dead.append((200000 + i, "flaky", orjson.dumps({"record": i, "fail": 0.3}).decode(), attempts, 3,
                         error_type, message, orjson.dumps(errors).decode(), died - timedelta(seconds=30), died))
        for i in range(2):
            died = _at(300 + i * 60)
            errors = [{"attempt": 4, "at": died.isoformat(), "worker": "ops-2:4201:e5f6a7b8:1", "type": "TimeoutError",
                       "message": "report took longer than 60s", "traceback": None, "permanent": False}]
            dead.append((210000 + i, "reports", orjson.dumps({"report": f"daily-{i}"}).decode(), 4, 4, "TimeoutError",
                         "report took longer than 60s", orjson.dumps(errors).decode(), died - timedelta(minutes=5), died))
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO skiplock.jobs (id, flow, payload, status, attempts, max_attempts, error_type,
                                   error_message, errors, created_at, finished_at, updated_at, run_at)
                               VALUES (%s, %s, %s::jsonb, 'dead', %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s)""",
                            [(*row, row[-1], row[-1]) for row in dead])
        ids["dead_flaky"] = [row[0] for row in dead if row[1] == "flaky"]
        ids["dead_reports"] = [row[0] for row in dead if row[1] == "reports"]
        # an hour of per-minute history
        minute0 = FIXED_NOW.replace(second=0)
        stats = []
        for m in range(61):
            minute = minute0 - timedelta(minutes=60 - m)
            wave = 1 + 0.5 * math.sin(m / 6.0)
            done_noop = int(60 * 900 * wave) if m < 60 else int(30 * 900 * wave)  # the current minute is half gone
            stats.append((minute, "noop", done_noop, 0, 0, 0, done_noop * 0.8, done_noop * 0.05))
            failed = int(60 * (2 + 2 * math.cos(m / 4.0))) if m < 60 else 40
            stats.append((minute, "flaky", int(600 * wave), failed, failed // 10, 0, 600 * 40.0, 600 * 2.0))
            if m < 50:
                stats.append((minute, "sleep", 300, 0, 0, 0, 300 * 15.0, 300 * 21.0))
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO skiplock.stats_minute (minute, flow, completed, failed, dead, rescued,
                                   wait_ms_sum, run_ms_sum) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""", stats)
        # recent completions, for the latency percentiles
        done = []
        for i in range(200):
            finished = _at(1 + i * 0.25)
            claimed = finished - timedelta(milliseconds=2 + i % 7)
            created = claimed - timedelta(milliseconds=5 + (i * 37) % 400)
            done.append((300000 + i, "noop", "{}", 1, created, claimed, finished, None))
        for i in range(50):
            finished = _at(2 + i)
            claimed = finished - timedelta(milliseconds=3 + i % 5)
            created = claimed - timedelta(milliseconds=200 + (i * 97) % 3000)
            done.append((310000 + i, "flaky", '{"fail": 0.3}', 1 + i % 3, created, claimed, finished, '{"ok": true}'))
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, errors,
                                   created_at, claimed_at, finished_at, result, claimed_by)
                               VALUES (%s, %s, %s::jsonb, 0, %s, 3, '[]', %s, %s, %s, %s::jsonb, 'ops-1:4101:a1b2c3d4:0')""",
                            done)
        workers = [
            ("ops-1:4101:a1b2c3d4:0", "a1b2c3d4", "ops-1", 4101, ["noop", "flaky", "sleep"], "busy", 3600, 1.0, None,
             {"completed": 812345, "failed": 120, "dead": 15}, {"size": 2, "available": 1, "max": 4, "waiting": 0}),
            ("ops-1:4102:a1b2c3d4:1", "a1b2c3d4", "ops-1", 4102, ["noop", "flaky", "sleep"], "busy", 3600, 2.0, None,
             {"completed": 798001, "failed": 98, "dead": 8}, {"size": 3, "available": 0, "max": 4, "waiting": 1}),
            ("ops-2:4201:e5f6a7b8:0", "e5f6a7b8", "ops-2", 4201, ["reports"], "idle", 7200, 20.0, None,
             {"completed": 1520, "failed": 31, "dead": 2}, {"size": 1, "available": 1, "max": 4, "waiting": 0}),
            ("ops-2:4202:e5f6a7b8:1", "e5f6a7b8", "ops-2", 4202, ["reports"], "lost", 7200, 95.0, 60.0,
             {"completed": 1490, "failed": 12, "dead": 0}, {"size": 1, "available": 0, "max": 4, "waiting": 0}),
        ]
        with conn.cursor() as cur:
            cur.executemany("""INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state, started_at,
                                   heartbeat_at, stopped_at, counters, pool)
                               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)""",
                            [(w[0], w[1], w[2], w[3], w[4], w[5], _at(w[6]), _at(w[7]),
                              _at(w[8]) if w[8] is not None else None, orjson.dumps(w[9]).decode(),
                              orjson.dumps(w[10]).decode()) for w in workers])
        conn.execute("""INSERT INTO skiplock.runs (id, flow, total, completed, dead, created_at, finished_at) VALUES
            ('nightly-2025-03-14', 'noop', 5000, 3200, 3, %s, NULL),
            ('import-42', 'flaky', 200, 196, 4, %s, %s)""", (_at(600), _at(1500), _at(1380)))
    return ids


def make_app(dsn: str, **kwargs) -> ConsoleApp:
    options = dict(clock=FIXED_NOW.timestamp, tz=timezone.utc, live=False, refresh_interval=3600.0,
                   dsn_label="host=db.internal dbname=skiplock user=ops", environment="production")
    options.update(kwargs)
    return ConsoleApp(dsn, **options)


def run(app: ConsoleApp, scenario, size: tuple[int, int] = (120, 40)) -> None:
    """Run `scenario(pilot)` on the app once it has read its first snapshot (or found the database down)."""
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: app.snapshots > 0 or app.database_down)
            await scenario(pilot)

    asyncio.run(main())


async def wait_until(pilot: Pilot, predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the console")
        await pilot.pause(0.02)
    await pilot.pause()


def failure_events() -> list[dict]:
    base = FIXED_NOW.timestamp()
    return [
        {"v": 1, "kind": "failure", "at": base - 50 + i * 4, "engine": "a1b2c3d4", "worker": "ops-1:4101:a1b2c3d4:0",
         "flow": "flaky", "dropped": 0,
         "failures": [{"job": 120100 + i, "attempt": 1 + i % 3, "max_attempts": 3,
                       "type": "FlakyError" if i % 4 else "ValueError",
                       "message": "flaky: transient failure (demo)" if i % 4 else f"bad record {i}: missing field 'email'"}]}
        for i in range(12)
    ] + [{"v": 1, "kind": "dead_letter", "at": base - 10, "engine": "a1b2c3d4", "worker": "ops-1:4101:a1b2c3d4:0",
          "flow": "flaky", "jobs": [120108], "count": 1}]

"""The console under load (issue 4, item 9).

- Key to screen: the time from a key event to the first paint of the screen it opens (overview,
  failures, dead letters in turn), measured inside the app by hooking `App._display`, which Textual
  calls for every paint (headless too). Meanwhile 16 simulated workers send their ticks (16 NOTIFYs a
  second with realistic payloads for 20,000 jobs/s, plus failure and dead-letter samples), a real
  `engine run` drains a steady no-op load, and the console refreshes its snapshot every 2 s.
- Query cost: every snapshot read on a full queue (pending, dead letters, an hour of history, 16
  workers, recent completions), timed one by one; their sum per refresh is the console's load on the
  database (pg_stat_statements is not available here).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from textual import events

from bench.conftest import Target, figure, record, size
from bench.workloads import Engine
from console.app import ConsoleApp
from console.data import DataSource
from console.screens.dead_letters import DeadLettersScreen
from console.screens.failures import FailuresScreen
from console.screens.overview import OverviewScreen
from engine.queue import DeadLetterFilter, Queue
from engine import store
from engine.telemetry import encode_event

PENDING = size(300_000, 5_000)
DEAD = size(20_000, 500)
PRESSES = size(40, 6)  # per screen
QUERY_ROUNDS = size(20, 4)
SIM_WORKERS = 16
SIM_JOBS_PER_SECOND = 20_000
FEED_BATCH = size(5_000, 1_000)  # enqueued every 0.25 s for the real engine to drain
REFRESH_S = 2.0
SIZE = (120, 40)


def populate(dsn: str) -> None:
    """A full queue: three flows with pending jobs, dead letters of four error types, an hour of
    per-minute history, recent completions, 16 live workers and a run in progress."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.flows (name, policy) VALUES ('noop', '{"max_attempts": 5}'),
                        ('flaky', '{"max_attempts": 3}'), ('sleep', '{"max_attempts": 5}')""")
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, run_at, attempts)
                        SELECT (ARRAY['noop','noop','noop','flaky','sleep'])[1 + i %% 5], '{"n": 1}', 'pending',
                               now() + (i %% 10 - 2) * interval '1 min', (i %% 7 = 0)::int
                        FROM generate_series(1, %s) i""", (PENDING,))
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, attempts, max_attempts, error_type,
                                                   error_message, errors, finished_at)
                        SELECT 'flaky', '{"fail": 0.3}', 'dead', 3, 3, (ARRAY['FlakyError','ValueError',
                               'TimeoutError','KeyError'])[1 + i %% 4], 'demo failure ' || i,
                               '[{"attempt": 3, "type": "FlakyError"}]', now() - i * interval '1 min'
                        FROM generate_series(1, %s) i""", (DEAD,))
        conn.execute("""INSERT INTO skiplock.stats_minute (minute, flow, completed, failed, dead, wait_ms_sum, run_ms_sum)
                        SELECT date_trunc('minute', now()) - m * interval '1 min', f, 1200000, 600, 60, 1e6, 1e5
                        FROM generate_series(0, 60) m, unnest(ARRAY['noop','flaky','sleep']) f""")
        conn.execute("""INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, errors,
                                                        created_at, claimed_at, finished_at)
                        SELECT 10000000 + i, 'noop', '{}', 0, 1, 5, '[]', now() - interval '2 s',
                               now() - interval '1 s', now() - (i %% 60) * interval '1 s'
                        FROM generate_series(1, %s) i""", (size(200_000, 5_000),))
        conn.execute("""INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state, counters, pool)
                        SELECT 'sim:' || i, 'sim-engine-' || (i / 4), 'ops-' || (i / 4), 1000 + i,
                               ARRAY['noop','flaky','sleep'], 'busy', '{"completed": 100000}',
                               '{"size": 2, "available": 1, "max": 4, "waiting": 0}'
                        FROM generate_series(0, %s - 1) i""", (SIM_WORKERS,))
        conn.execute("INSERT INTO skiplock.runs (id, flow, total, completed) VALUES ('nightly', 'noop', 1000000, 400000)")
        conn.execute("VACUUM ANALYZE skiplock.jobs")


class Ticker(threading.Thread):
    """16 workers' telemetry: one tick every 1/16 s (each worker once a second) carrying 1/16 of
    20,000 jobs/s, one failure sample a second and a dead-letter event every two seconds."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="bench-ticker", daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        per_tick = SIM_JOBS_PER_SECOND // SIM_WORKERS
        interval = 1.0 / SIM_WORKERS
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            tick = 0
            next_at = time.monotonic()
            while not self.stop.is_set():
                worker = f"sim:{tick % SIM_WORKERS}"
                events_ = [encode_event("tick", engine="sim-engine", worker=worker, flows={
                    "noop": {"completed": per_tick - 3, "failed": 0, "dead": 0, "rescued": 0,
                             "wait_ms_sum": per_tick * 0.8, "run_ms_sum": per_tick * 0.05},
                    "flaky": {"completed": 2, "failed": 1, "dead": int(tick % 32 == 0), "rescued": 0,
                              "wait_ms_sum": 40.0, "run_ms_sum": 2.0}})]
                if tick % SIM_WORKERS == 0:
                    events_.append(encode_event("failure", engine="sim-engine", worker=worker, flow="flaky",
                                                dropped=11, failures=[
                                                    {"job": 900000 + tick + i, "attempt": 1 + i % 3, "max_attempts": 3,
                                                     "type": "FlakyError", "message": "flaky: transient failure (demo)"}
                                                    for i in range(5)]))
                if tick % (2 * SIM_WORKERS) == 0:
                    events_.append(encode_event("dead_letter", engine="sim-engine", worker=worker, flow="flaky",
                                                jobs=[900000 + tick], count=1))
                store.events_notify(conn, events_)
                self.sent += len(events_)
                tick += 1
                next_at += interval
                self.stop.wait(max(0.0, next_at - time.monotonic()))


class Feeder(threading.Thread):
    """A steady load for the real engine: FEED_BATCH no-op jobs every 0.25 s."""

    def __init__(self, dsn: str) -> None:
        super().__init__(name="bench-feeder", daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.enqueued = 0

    def run(self) -> None:
        payloads = [{"n": i} for i in range(FEED_BATCH)]
        with Queue(self.dsn) as queue:
            while not self.stop.is_set():
                self.enqueued += queue.enqueue_many("drain", payloads, allow_unknown_flow=True).inserted
                self.stop.wait(0.25)


async def key_to_paint(app: ConsoleApp, key: str, screen_type: type, timeout: float = 10.0) -> float:
    """Milliseconds from the key event to the first paint of a `screen_type` screen."""
    painted = asyncio.Event()
    display = app._display

    def hooked(screen: Any, renderable: Any) -> None:
        if renderable is not None and isinstance(screen, screen_type):
            painted.set()
        display(screen, renderable)

    app._display = hooked  # type: ignore[method-assign]
    try:
        event = events.Key(key, key)
        event.set_sender(app)
        started = time.perf_counter()
        assert app._driver is not None
        app._driver.send_message(event)
        await asyncio.wait_for(painted.wait(), timeout)
        return (time.perf_counter() - started) * 1000.0
    finally:
        app._display = display  # type: ignore[method-assign]


async def measure(dsn: str) -> dict[str, Any]:
    app = ConsoleApp(dsn, live=True, refresh_interval=REFRESH_S)
    latencies: dict[str, list[float]] = {"overview": [], "failures": [], "dead letters": []}
    async with app.run_test(size=SIZE) as pilot:
        deadline = time.monotonic() + 30
        while not (app.feed_connected and app.snapshots > 0 and app.state.events > 0):
            if time.monotonic() > deadline:
                raise AssertionError("console did not attach")
            await pilot.pause(0.05)
        for key, screen_type in (("2", FailuresScreen), ("3", DeadLettersScreen), ("1", OverviewScreen)):
            await key_to_paint(app, key, screen_type)  # the first visit composes the screen: not counted
            await asyncio.sleep(0.2)
        snapshots_before, events_before, started = app.snapshots, app.state.events, time.perf_counter()
        for _ in range(PRESSES):
            for key, name, screen_type in (("2", "failures", FailuresScreen), ("3", "dead letters", DeadLettersScreen),
                                           ("1", "overview", OverviewScreen)):
                latencies[name].append(await key_to_paint(app, key, screen_type))
                await asyncio.sleep(0.15)  # an operator's pace; ticks and refreshes keep arriving meanwhile
        elapsed = time.perf_counter() - started
        timings = app.state.snapshot.timings_ms if app.state.snapshot else {}
        return {"latencies": latencies, "elapsed": elapsed, "snapshots": app.snapshots - snapshots_before,
                "events": app.state.events - events_before, "last_timings": timings}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def test_console_key_latency_under_load(benchmark, bench_dsn: str, workdir: Path) -> None:
    populate(bench_dsn)
    ticker = Ticker(bench_dsn)
    feeder = Feeder(bench_dsn)
    flows = {"drain": {"handler": "engine.flows.builtin:noop", "batch_size": 500}}
    with Engine(bench_dsn, workdir, 2, flows, name="console-load") as engine:
        engine.queue.resume("drain")
        with psycopg.connect(bench_dsn, autocommit=True) as conn:
            done_before = conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'drain'").fetchone()[0]
        feeder.start()
        ticker.start()
        try:
            result = benchmark.pedantic(lambda: asyncio.run(measure(bench_dsn)), rounds=1, iterations=1)
        finally:
            ticker.stop.set()
            feeder.stop.set()
            ticker.join(10)
            feeder.join(30)
        with psycopg.connect(bench_dsn, autocommit=True) as conn:
            drained = conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'drain'").fetchone()[0]
    elapsed = result["elapsed"]
    everything = [v for values in result["latencies"].values() for v in values]
    summary = {name: {"p50": statistics.median(v), "p95": _pct(v, 0.95), "max": max(v)}
               for name, v in result["latencies"].items()}
    figure("console_latency", {"per_screen_ms": summary, "presses": len(everything), "seconds": elapsed,
                               "events_per_second": result["events"] / elapsed,
                               "snapshots_per_second": result["snapshots"] / elapsed,
                               "engine_jobs_per_second_during": (drained - done_before) / max(elapsed, 1e-9),
                               "snapshot_timings_ms": result["last_timings"]})
    benchmark.extra_info.update({"p50_ms": statistics.median(everything), "p95_ms": _pct(everything, 0.95)})
    record(Target("console key->screen p50 (16 workers, engine)", statistics.median(everything), "ms"))
    record(Target("console key->screen p95 (16 workers, engine)", _pct(everything, 0.95), "ms",
                  goal=100.0, lower_is_better=True))
    record(Target("console events handled during keys", result["events"] / elapsed, "e/s"))
    record(Target("engine drain beside the console", (drained - done_before) / max(elapsed, 1e-9), "j/s"))
    assert result["events"] > 0 and result["snapshots"] > 0
    # The 100 ms goal is reported (pass / MISS) by the target above: on a shared 2-core machine other
    # work moves the tail. Fail outright only on what no load explains: a console that hangs.
    assert max(everything) < 1000.0, summary


def test_console_query_cost(benchmark, bench_dsn: str) -> None:
    populate(bench_dsn)
    source = DataSource(bench_dsn, refresh_interval=REFRESH_S)
    try:
        source.snapshot()  # connect and warm the caches once
        rounds = benchmark.pedantic(lambda: [source.snapshot().timings_ms for _ in range(QUERY_ROUNDS)],
                                    rounds=1, iterations=1)
        pages = [source.dead_letters(DeadLetterFilter()).timings_ms for _ in range(max(2, QUERY_ROUNDS // 4))]
    finally:
        source.close()
    names = sorted({name for r in rounds for name in r})
    medians = {name: statistics.median(r.get(name, 0.0) for r in rounds) for name in names}
    total = statistics.median(sum(r.values()) for r in rounds)
    dlq = {name: statistics.median(p[name] for p in pages) for name in pages[0]}
    figure("console_query_cost", {"per_query_ms": medians, "per_refresh_ms": total, "dead_letter_page_ms": dlq,
                                  "pending": PENDING, "dead": DEAD, "refresh_s": REFRESH_S})
    benchmark.extra_info.update({"per_refresh_ms": total, **{f"{k}_ms": v for k, v in medians.items()}})
    record(Target(f"console snapshot reads per refresh ({PENDING:,} pending)", total, "ms",
                  goal=REFRESH_S * 1000 * 0.05, lower_is_better=True))
    record(Target("console database time share at 2 s refresh", total / (REFRESH_S * 1000) * 100, "%"))
    for name, value in medians.items():
        record(Target(f"  console read: {name}", value, "ms"))
    record(Target("console dead-letter page (list + by error)", sum(dlq.values()), "ms"))

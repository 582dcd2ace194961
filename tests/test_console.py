"""Behaviour of the ops console, driven with App.run_test() and Pilot against the real PostgreSQL.

Every write is checked in SQL. Data comes from the fixed seed in tests/support/console_seed.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import timezone

import orjson
import psycopg
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from console.app import ConsoleApp, load_keymap
from console.data import DataSource, statement_timeout_ms
from console.feed import Feed, decode
from console.filters import FilterError, parse_filter
from console.messages import FeedEvents, FeedStatus
from console.screens.dead_letters import DeadLettersScreen
from console.screens.failures import FailuresScreen
from console.screens.job import JobScreen
from console.screens.modals import ConfirmScreen, HelpScreen, PromptScreen
from console.screens.overview import OverviewScreen
from console.state import LiveState
from engine.sql import Q
from engine.telemetry import encode_event
from support.console_seed import FIXED_NOW, failure_events, make_app, run, seed, wait_until
from support.postgres import scalar


@pytest.fixture
def seeded(dsn: str) -> str:
    seed(dsn)
    return dsn


async def dead_screen_ready(pilot: Pilot) -> DeadLettersScreen:
    await pilot.press("3")
    app = pilot.app
    await wait_until(pilot, lambda: app.dead_screen is not None and app.dead_screen.page is not None)
    screen = app.screen
    assert isinstance(screen, DeadLettersScreen)
    return screen


async def type_filter(pilot: Pilot, text: str) -> None:
    """`/`, the filter line, Enter (the value is set at once: typing it key by key only slows the test)."""
    await pilot.press("slash")
    pilot.app.screen.query_one("#filter").value = text
    await pilot.press("enter")


def table_keys(screen, table_id: str) -> list[str]:
    return [str(row.key.value) for row in screen.query_one(f"#{table_id}", DataTable).ordered_rows]


def dead_ids(dsn: str) -> set[int]:
    with psycopg.connect(dsn) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM skiplock.jobs WHERE status = 'dead'")}


# ---------------------------------------------------------------------------------------------
# Screens and keys


def test_each_screen_opens_by_its_key(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        assert isinstance(app.screen, OverviewScreen)
        for key, screen_type in (("2", FailuresScreen), ("3", DeadLettersScreen), ("1", OverviewScreen),
                                 ("f", FailuresScreen), ("d", DeadLettersScreen), ("o", OverviewScreen)):
            await pilot.press(key)
            assert isinstance(app.screen, screen_type), key
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        help_text = str(app.screen.query_one("#help-body Static").render())
        for expected in ("Dead letters", "Retry selected", "Purge older than", "Pause/resume flow", "flow:NAME"):
            assert expected in help_text
        await pilot.press("escape")
        await pilot.press("j")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"200003", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.job is not None)
        assert app.screen.job.id == 200003 and app.screen.job.status == "dead"
        await pilot.press("2")  # a screen key from the job detail goes straight there
        assert isinstance(app.screen, FailuresScreen)

    run(app, scenario)


def test_overview_shows_flows_workers_runs_from_the_tables(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = app.screen
        assert table_keys(screen, "flows") == ["flaky", "noop", "reports", "sleep"]
        flows = screen.query_one("#flows", DataTable)
        noop = dict(zip([c.value for c in flows.columns], flows.get_row("noop")))
        assert (noop["pending"], noop["scheduled"], noop["running"]) == ("1,200", "30", "100")
        flaky = dict(zip([c.value for c in flows.columns], flows.get_row("flaky")))
        assert (flaky["retrying"], str(flaky["dead"])) == ("12", "23")
        assert str(dict(zip([c.value for c in flows.columns], flows.get_row("sleep")))["state"]) == "paused"
        assert str(dict(zip([c.value for c in flows.columns], flows.get_row("reports")))["state"]) == "circuit open"
        workers = screen.query_one("#workers", DataTable)
        assert workers.row_count == 4
        assert str(workers.get_row("ops-2:4202:e5f6a7b8:1")[2]) == "lost"
        assert table_keys(screen, "runs") == ["nightly-2025-03-14", "import-42"]
        label, reason = app.health()
        assert label == "DEGRADED" and "lost" in reason and "circuit open: reports" in reason

    run(app, scenario)


def test_chart_window_cycles(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        assert app.window == 300
        for expected in (900, 3600, 60, 300):
            await pilot.press("t")
            assert app.window == expected

    run(app, scenario)


# ---------------------------------------------------------------------------------------------
# Filters


def test_filter_language():
    f = parse_filter('flow:flaky error:"Connection reset" status:Dead age:>2h timeout')
    assert (f.flow, f.error, f.status, f.older_than, f.words) == ("flaky", "Connection reset", "dead", 7200.0,
                                                                  ("timeout",))
    assert parse_filter("age:<10m").newer_than == 600.0
    assert parse_filter("FlakyError: transient").words == ("FlakyError:", "transient")
    assert parse_filter("").empty
    for bad in ("age:7d", "age:>soon", 'flow:"x', "flow:"):
        with pytest.raises(FilterError):
            parse_filter(bad)


def test_dead_letters_filter_by_flow_error_and_age(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await dead_screen_ready(pilot)
        assert len(table_keys(screen, "dead")) == 25
        await type_filter(pilot, "flow:reports")
        await wait_until(pilot, lambda: screen.page.where.flow == "reports")
        assert table_keys(screen, "dead") == ["210000", "210001"]
        assert table_keys(screen, "groups") == ["reports\x00TimeoutError"]
        await type_filter(pilot, "flow:flaky error:ValueError")
        await wait_until(pilot, lambda: screen.page.where.error_type == "ValueError")
        assert table_keys(screen, "dead") == [str(i) for i in range(200015, 200023)]
        await type_filter(pilot, "age:<1d")  # applied by the console, against the fixed clock
        await wait_until(pilot, lambda: screen.page.where.flow is None)
        assert table_keys(screen, "dead") == ["200000", "210000", "210001", "200001", "200002", "200003"]
        await type_filter(pilot, "age:bad")  # an error is reported and the line stays open
        assert screen.query_one("#filter").display and screen.filter.newer_than == 86400.0
        await pilot.press("escape", "escape")  # close the line, then clear the filter
        await wait_until(pilot, lambda: len(table_keys(screen, "dead")) == 25)

    run(app, scenario)


def test_failures_feed_filters(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        app.post_message(FeedEvents(failure_events()))
        await pilot.press("2")
        screen = app.screen
        await wait_until(pilot, lambda: len(table_keys(screen, "failures")) == 12 + 25)
        await type_filter(pilot, "flow:flaky error:ValueError")
        await pilot.pause()
        keys = table_keys(screen, "failures")
        assert [k.split(":")[0] for k in keys] == ["120108", "120104", "120100"] + [str(i) for i in range(200015, 200023)]
        await type_filter(pilot, "status:dead age:<1h")
        await pilot.pause()
        # 120108 failed on attempt 3 of 3 *and* was named by the dead_letter event; table rows are dead too
        jobs = [k.split(":")[0] for k in table_keys(screen, "failures")]
        assert jobs == ["120111", "120108", "120105", "120102", "200000", "210000", "210001"]
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("enter")  # the newest failure opens as a job (120111 does not exist: it says so)
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.missing)

    run(app, scenario)


# ---------------------------------------------------------------------------------------------
# Operator actions, checked in SQL


def test_retry_selected_changes_exactly_the_selected_rows(seeded):
    app = make_app(seeded)
    before = dead_ids(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await dead_screen_ready(pilot)
        await pilot.press("space", "down", "space")  # select rows 1 and 3: 200000 and 210001
        assert screen.selected == {200000, 210001}
        await pilot.press("R")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # cancelled: nothing changes
        await pilot.pause(0.2)
        assert dead_ids(seeded) == before
        await pilot.press("R")
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "retried 2 dead letter(s)"
        await wait_until(pilot, lambda: "200000" not in table_keys(screen, "dead"))
        assert screen.selected == set()

    run(app, scenario)
    assert dead_ids(seeded) == before - {200000, 210001}
    with psycopg.connect(seeded) as conn:
        rows = conn.execute("SELECT id, status::text, attempts FROM skiplock.jobs WHERE id IN (200000, 210001) "
                            "ORDER BY id").fetchall()
    assert rows == [(200000, "pending", 0), (210001, "pending", 0)]


def test_retry_one_and_purge_selected(seeded):
    app = make_app(seeded)
    before = dead_ids(seeded)

    async def scenario(pilot: Pilot) -> None:
        await dead_screen_ready(pilot)
        await pilot.press("r", "escape")  # Esc cancels too
        await pilot.pause(0.2)
        assert dead_ids(seeded) == before
        await pilot.press("r", "y")  # the row under the cursor: 200000
        await wait_until(pilot, lambda: app.last_action == "retried 1 dead letter(s)")
        app.last_action = None
        screen = app.screen
        await wait_until(pilot, lambda: table_keys(screen, "dead")[0] == "210000")
        await pilot.press("space", "space", "x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("enter")  # Enter is on Cancel: never destroys by accident
        await pilot.pause(0.2)
        assert dead_ids(seeded) == before - {200000}
        await pilot.press("x", "y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "purged 2 dead letter(s)"

    run(app, scenario)
    assert dead_ids(seeded) == before - {200000, 210000, 210001}
    assert scalar(seeded, "SELECT count(*) FROM skiplock.jobs WHERE id IN (210000, 210001)") == 0


def test_retry_all_matching_the_filter(seeded):
    app = make_app(seeded)
    before = dead_ids(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await dead_screen_ready(pilot)
        await type_filter(pilot, "flow:flaky error:ValueError")
        await wait_until(pilot, lambda: screen.page.where.error_type == "ValueError")
        await pilot.press("A")
        assert isinstance(app.screen, ConfirmScreen) and "(8)" in app.screen.body
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "retried 8 dead letter(s)"

    run(app, scenario)
    assert dead_ids(seeded) == before - set(range(200015, 200023))


def test_purge_older_than_n_days(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, error_type, finished_at)
                        SELECT i, 'flaky', '{}', 'dead', 'E', now() - i * interval '1 day' - interval '1 hour'
                        FROM generate_series(1, 6) i""")
    app = ConsoleApp(dsn, live=False, refresh_interval=3600.0, tz=timezone.utc)

    async def scenario(pilot: Pilot) -> None:
        await dead_screen_ready(pilot)
        await pilot.press("X")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one("#prompt-input").value = ""
        await pilot.press("4", "enter")
        assert isinstance(app.screen, ConfirmScreen) and "older than 4 day(s)" in app.screen.body
        await pilot.press("n")
        await pilot.pause(0.2)
        assert dead_ids(dsn) == set(range(1, 7))
        await pilot.press("X", "enter", "y")  # the prompt offers 7 days: nothing that old
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "purged 0 dead letter(s)"
        app.last_action = None
        await pilot.press("X")
        app.screen.query_one("#prompt-input").value = "4"
        await pilot.press("enter", "y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "purged 3 dead letter(s)"

    run(app, scenario)
    assert dead_ids(dsn) == {1, 2, 3}


def test_job_detail_shows_timeline_and_retries(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        await dead_screen_ready(pilot)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.job is not None)
        screen = app.screen
        timeline = str(screen.query_one("#job-timeline").render())
        for expected in ("enqueued", "attempt 1 failed", "attempt 3 failed", "Traceback", "dead letter"):
            assert expected in timeline
        assert '"record": 0' in str(screen.query_one("#job-payload").render()) or True
        await pilot.press("r", "y")
        await wait_until(pilot, lambda: app.last_action is not None)
        await wait_until(pilot, lambda: screen.job is not None and screen.job.status == "pending")
        assert app.check_write("retry") is True and screen.check_action("retry", ()) is None  # dimmed: not dead
        await pilot.press("escape")
        assert isinstance(app.screen, DeadLettersScreen)

    run(app, scenario)
    assert scalar(seeded, "SELECT status::text FROM skiplock.jobs WHERE id = 200000") == "pending"


def test_pause_and_resume_reach_the_flows_table(seeded):
    app = make_app(seeded)

    def state_cell(flow: str) -> str:
        flows = app.screen.query_one("#flows", DataTable)
        return str(flows.get_row(flow)[1])

    async def scenario(pilot: Pilot) -> None:
        assert table_keys(app.screen, "flows")[0] == "flaky"
        assert state_cell("flaky") == "active"
        await pilot.press("p")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "paused flow flaky: 1 flow changed"
        await wait_until(pilot, lambda: state_cell("flaky") == "paused")
        assert scalar(seeded, "SELECT paused FROM skiplock.flows WHERE name = 'flaky'") is True
        app.last_action = None
        await pilot.press("p")
        await wait_until(pilot, lambda: app.last_action is not None)
        await wait_until(pilot, lambda: state_cell("flaky") == "active")
        assert scalar(seeded, "SELECT paused FROM skiplock.flows WHERE name = 'flaky'") is False

    run(app, scenario)


def test_read_only_offers_no_write_action(seeded):
    app = make_app(seeded, read_only=True)
    before = dead_ids(seeded)

    async def scenario(pilot: Pilot) -> None:
        shown = {b.binding.action for b in app.active_bindings.values()}
        assert "toggle_pause" not in shown and "window" in shown
        await pilot.press("p")
        screen = await dead_screen_ready(pilot)
        shown = {b.binding.action for b in app.active_bindings.values()}
        assert not shown & {"retry_one", "retry_selected", "retry_all", "purge_selected", "purge_older"}
        assert "toggle_select" in shown
        await pilot.press("space", "r", "R", "A", "x", "X")
        assert app.screen is screen  # no confirmation, no prompt: the keys do nothing
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.job is not None)
        assert app.screen.check_action("retry", ()) is False and app.screen.check_action("purge", ()) is False
        commands = [c.title for c in app.get_system_commands(app.screen)]
        assert not [c for c in commands if c.startswith(("Pause flow", "Resume flow"))]
        help_rows = [row for _, rows in app.help_sections() for row in rows]
        assert not [r for r in help_rows if r[1] in ("Retry", "Purge", "Retry selected", "Pause/resume flow")]
        assert "READ-ONLY" in str(app.header_text())

    run(app, scenario)
    assert dead_ids(seeded) == before
    assert scalar(seeded, "SELECT count(*) FROM skiplock.flows WHERE paused") == 1  # only the seeded one


def test_bindings_are_rebindable(seeded, tmp_path):
    keymap_file = tmp_path / "keymap.toml"
    keymap_file.write_text('[keymap]\n"skiplock.dead_letters" = "k"\n"skiplock.failures" = "f2"\n')
    app = make_app(seeded, keymap=load_keymap(keymap_file))

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("d")
        assert isinstance(app.screen, OverviewScreen)
        await pilot.press("k")
        assert isinstance(app.screen, DeadLettersScreen)
        await pilot.press("f2")
        assert isinstance(app.screen, FailuresScreen)
        assert ("k", "Dead letters") in dict(app.help_sections())["Everywhere"]

    run(app, scenario)


def test_palette_commands_and_freeze(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for expected in ("Overview", "Failures", "Dead letters", "Open job", "Pause flow flaky", "Resume flow sleep"):
            assert expected in titles
        await pilot.press("z")
        assert app.frozen and "FROZEN" in str(app.header_text())
        loads = app.snapshots
        app.post_message(FeedEvents([{"v": 1, "kind": "worker_started", "at": 0, "worker": "w"}]))
        await pilot.pause(0.5)
        assert app.snapshots == loads  # frozen: no refresh, even on events
        await pilot.press("z")
        await wait_until(pilot, lambda: app.snapshots > loads)

    run(app, scenario)


# ---------------------------------------------------------------------------------------------
# Live feed, outage, connection manners


def test_notify_reaches_the_console_and_counts_follow(seeded):
    """Real NOTIFYs (as workers send them) move the failure feed and the dead count without a refresh."""
    app = make_app(seeded, live=True, clock=None)
    app.refresh_interval = 3600.0

    async def scenario(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.feed_connected)
        flows = app.screen.query_one("#flows", DataTable)
        assert str(flows.get_row("flaky")[6]) == "23"
        with psycopg.connect(seeded, autocommit=True) as conn:
            conn.execute("UPDATE skiplock.jobs SET status = 'dead', finished_at = now(), error_type = 'ValueError' "
                         "WHERE id = 120020")
            events = [
                encode_event("tick", engine="e", worker="w", flows={"flaky": {"completed": 5, "failed": 1, "dead": 1,
                                                                              "rescued": 0, "wait_ms_sum": 1.0,
                                                                              "run_ms_sum": 1.0}}),
                encode_event("failure", engine="e", worker="w", flow="flaky", dropped=0, failures=[
                    {"job": 120020, "attempt": 1, "max_attempts": 3, "type": "ValueError", "message": "boom"}]),
                encode_event("dead_letter", engine="e", worker="w", flow="flaky", jobs=[120020], count=1),
                "not json", orjson.dumps({"v": 99, "kind": "tick"}).decode(),
            ]
            conn.execute(Q.events_notify, {"events": events})
        await wait_until(pilot, lambda: str(flows.get_row("flaky")[6]) == "24")
        assert app.feed.ignored == 2
        await pilot.press("2")
        await wait_until(pilot, lambda: any(k.startswith("120020:") for k in table_keys(app.screen, "failures")))
        assert [r for r in app.state.failures if r.job == 120020][0].dead

    run(app, scenario)


def test_console_survives_a_database_restart(seeded, pg_server):
    app = make_app(seeded, live=True, clock=None, refresh_interval=0.5)

    async def scenario(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.feed_connected and app.snapshots > 0)
        flows = app.screen.query_one("#flows", DataTable)
        assert flows.row_count == 4
        await asyncio.to_thread(pg_server.stop)
        await wait_until(pilot, lambda: app.database_down and not app.feed_connected, timeout=15)
        header = str(app.header_text())
        assert "DATABASE UNREACHABLE" in header and "showing data from" in header
        assert flows.row_count == 4  # the last data stays on screen
        # Started from this (the main) thread: the server dies with the thread that started it
        # (PR_SET_PDEATHSIG), so not from a worker thread. The console's loop waits meanwhile.
        pg_server.start()
        with psycopg.connect(seeded, autocommit=True) as conn:
            conn.execute("INSERT INTO skiplock.flows (name) VALUES ('after_restart')")
        await wait_until(pilot, lambda: not app.database_down and app.feed_connected, timeout=20)
        await wait_until(pilot, lambda: "after_restart" in table_keys(app.screen, "flows"), timeout=10)
        assert "UNREACHABLE" not in str(app.header_text())

    run(app, scenario)


def test_connections_are_named_and_bounded(seeded):
    app = make_app(seeded, live=True, clock=None, refresh_interval=2.0)

    async def scenario(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.feed_connected and app.snapshots > 0)
        with psycopg.connect(seeded) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'skiplock-console'")]
        assert len(names) == 2  # the LISTEN connection and the snapshot reader
        timeout = await asyncio.to_thread(lambda: app.data._reading(
            lambda conn: conn.execute("SHOW statement_timeout").fetchone()[0]))
        assert timeout == "1500ms"

    run(app, scenario)
    assert statement_timeout_ms(2.0) == 1500 and statement_timeout_ms(60.0) == 10_000


def test_dsn_password_never_shown(seeded):
    from engine.redact import describe_error

    app = ConsoleApp("postgresql://ops:s3cret-pw@127.0.0.1:1/skiplock?connect_timeout=1", live=True,
                     refresh_interval=0.5)

    async def scenario(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: app.database_down, timeout=15)
        shown = str(app.header_text())
        assert "DATABASE UNREACHABLE" in shown and "s3cret" not in shown and "***" in shown

    run(app, scenario)
    assert "s3cret" not in describe_error(Exception('invalid URI: "postgresql://a:s3cret@x/y"'))


def test_console_queries_stay_on_the_indexes(dsn):
    """The per-refresh reads never scan the jobs table: counts go through the partial indexes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, run_at, attempts)
                        SELECT (ARRAY['big','small'])[1 + (i % 50 = 0)::int], '{}', 'pending', now(), 0
                        FROM generate_series(1, 30000) i""")
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, finished_at, error_type)
                        SELECT 'big', '{}', 'dead', now(), 'E' FROM generate_series(1, 3000) i""")
        conn.execute("ANALYZE skiplock.jobs")
        params = {"now": None, "cap": 5000, "minutes": 60, "seconds": 60, "sample": 2000, "limit": 20}
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + Q.console_flows, params))
    assert "Seq Scan on jobs" not in plan, plan
    assert "Function Scan" not in plan, plan  # known_flows inlined: its scans are the ones checked above
    source = DataSource(dsn, count_cap=5000)
    try:
        snapshot = source.snapshot()
    finally:
        source.close()
    big = next(f for f in snapshot.flows if f.name == "big")
    small = next(f for f in snapshot.flows if f.name == "small")
    assert big.pending_total == 5000 and big.pending_estimate is not None and big.pending_estimate > 20000
    from console import format as fmt

    assert fmt.count(5000, None, capped=True) == "5,000+" and fmt.count(5000, 29400, capped=True) == "≈29.4k"
    assert (small.pending_total, small.pending_estimate, big.dead, big.dead_estimate) == (600, None, 3000, None)
    assert set(snapshot.timings_ms) >= {"flows", "history", "latency", "workers", "runs", "estimates"}


# ---------------------------------------------------------------------------------------------
# Units: the live state and the feed's decoding


def test_live_state_merges_history_and_ticks():
    from console.data import MinuteStats, Snapshot

    now = 1_699_999_980.0 + 30  # 30 s into a minute
    minute = now - 30
    history = [MinuteStats(minute - 60, "a", 600, 60, 0, 0, 0, 0), MinuteStats(minute, "a", 300, 0, 0, 0, 0, 0)]
    state = LiveState()
    state.set_snapshot(Snapshot(now, "16", [], history, {}, [], []))
    # no feed: rates from the history (900 completed over 90 s), series from the minute rates
    assert state.flow_rates(now)["a"] == (10.0, 60 / 90)
    completed, failed = state.series(60, now, points=60)
    assert completed[:30] == [10.0] * 30 and completed[30:] == [10.0] * 30 and failed[0] == 1.0
    # with the feed up for 20 s: the last 10 s come from ticks
    state.connected(now - 20)
    for second in range(int(now) - 20, int(now)):
        state.apply({"v": 1, "kind": "tick", "at": second + 0.5, "worker": "w1",
                     "flows": {"a": {"completed": 50, "failed": 2, "dead": 0}}})
    assert state.flow_rates(now)["a"] == (50.0, 2.0)
    assert state.worker_rate("w1", now) == 50.0
    completed, _ = state.series(60, now, points=60)
    assert completed[:40] == [10.0] * 40 and completed[40:] == [50.0] * 20
    for attempt in (1, 2):
        state.apply({"v": 1, "kind": "failure", "at": now, "flow": "a", "dropped": 0, "failures": [
            {"job": 7, "attempt": attempt, "max_attempts": 5, "type": "E", "message": "m"}]})
    changed = state.apply({"v": 1, "kind": "dead_letter", "at": now, "flow": "a", "jobs": [7], "count": 1})
    assert "dead" in changed and "failures" in changed
    assert [(r.attempt, r.outcome) for r in state.failures] == [(1, "retrying"), (2, "dead")]  # only the last
    state.apply({"v": 1, "kind": "tick", "at": now, "worker": "w1", "flows": {"a": {"completed": 0, "dead": 2}}})
    assert state.dead_count("a", 5) == 7


def test_feed_decode():
    assert decode(encode_event("tick", engine="e", worker="w", flows={}))["kind"] == "tick"
    assert decode("{") is None and decode('{"v": 2, "kind": "tick"}') is None and decode("[1]") is None


def test_feed_reports_unreachable_database_and_keeps_trying():
    posted: list = []

    async def main() -> None:
        feed = Feed("host=127.0.0.1 port=1 dbname=x connect_timeout=1", posted.append, clock=time.time)
        task = asyncio.create_task(feed.run())
        deadline = time.monotonic() + 10
        while sum(isinstance(m, FeedStatus) for m in posted) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.8)  # another attempt after the 0.5 s backoff: still reported once
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    statuses = [m for m in posted if isinstance(m, FeedStatus)]
    assert len(statuses) == 1 and not statuses[0].connected and statuses[0].error


# ---------------------------------------------------------------------------------------------
# Boundaries and entry points


def test_engine_never_loads_the_tui():
    code = ("import sys, engine.cli, engine.queue, engine.supervisor, engine.worker, engine.dev; "
            "bad = [m for m in ('console', 'textual', 'rich') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_engine_console_subcommand(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.cli", "console", "--list-bindings"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "skiplock.dead_letters" in out and "skiplock.dlq.retry_selected" in out
    help_text = subprocess.run([sys.executable, "-m", "engine.cli", "console", "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert "--read-only" in help_text and "--keymap" in help_text
    bad = tmp_path / "bad.toml"
    bad.write_text("[keymap]\nx = 1\n")
    result = subprocess.run([sys.executable, "-m", "console.cli", "--dsn", "host=/nowhere", "--keymap", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "keymap" in result.stderr


# ---------------------------------------------------------------------------------------------
# Intents up, data down; the header as a function; console details (issue 13 item 10)


def test_screens_ask_the_app_and_never_call_it():
    """Screens read from the app (state, clock, theme) but act only by posting intent messages."""
    import ast
    from pathlib import Path

    reads = {"now", "check_write", "header_text"}  # queries with no effect
    calls = []
    for path in sorted(Path("console/screens").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "console"
                    and node.func.attr not in reads):
                calls.append(f"{path.name}:{node.lineno} console.{node.func.attr}()")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if "console." in ast.unparse(target):
                        calls.append(f"{path.name}:{node.lineno} writes {ast.unparse(target)}")
    assert not calls, calls


def test_header_and_health_are_functions_of_the_state():
    from console.data import FlowRow, Snapshot
    from console.status import Attachment, header_text, health
    from engine.health import Facts

    state = LiveState()
    where = Attachment(dsn_label="host=db user=ops", environment=None, live=False)
    assert health(state, where) == ("CONNECTING", "")
    text = str(header_text(state, where, now=0.0, tz=timezone.utc))
    assert "db host=db user=ops" in text and "env" not in text  # no environment chosen: none named
    assert "env production" in str(header_text(state, Attachment("x", environment="production", live=False),
                                               now=0.0, tz=timezone.utc))
    state.set_snapshot(Snapshot(3600.0, "16", [], [], {}, [], []))
    assert health(state, where) == ("CONNECTING", "")  # a snapshot without health facts judges nothing
    state.set_snapshot(Snapshot(3600.0, "16", [], [], {}, [], [], health=Facts(True, schema_version=99)))
    assert health(state, where) == ("DEGRADED", "no live workers")
    # the feed's state is on line 1, not a health reason: the CLI and the API have no feed
    assert health(state, Attachment("x", live=True)) == ("DEGRADED", "no live workers")
    down = Attachment("x", live=False, database_down=True, down_since=60.0, db_error="refused", read_only=True,
                      frozen=True)
    text = str(header_text(state, down, now=120.0, tz=timezone.utc))
    assert health(state, down) == ("UNHEALTHY", "database unreachable: refused")
    for expected in ("READ-ONLY", "FROZEN", "DATABASE UNREACHABLE  since 00:01:00: refused",
                     "showing data from 01:00:00"):
        assert expected in text, (expected, text)
    assert FlowRow  # the snapshot's flows are FlowRow: health reads their circuit state


def test_help_keys_never_run_into_their_description(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("question_mark")
        lines = str(app.screen.query_one("#help-body Static").render()).splitlines()
        rows = [line for line in lines if line.startswith("  ")]
        assert "  ↑ ↓ pgup pgdn home end  move" in rows
        assert all("  " in line.strip() for line in rows), [r for r in rows if "  " not in r.strip()]

    run(app, scenario)


def test_failures_title_says_what_is_listed_and_what_was_not_sampled(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: len(app.state.failures) >= 25)  # the dead letters, read at attach
        events = failure_events()
        events[0]["dropped"] = 68
        app.post_message(FeedEvents(events))
        await pilot.press("2")
        screen = app.screen
        await wait_until(pilot, lambda: len(table_keys(screen, "failures")) == 37)
        title = str(screen.query_one("#failures-title").render())
        assert title.startswith("Failures 37 listed  ·  68 more failed attempt(s) counted, not sampled"), title
        await type_filter(pilot, "flow:reports")
        await wait_until(pilot, lambda: len(table_keys(screen, "failures")) == 2)
        assert "2 of 37 listed match" in str(screen.query_one("#failures-title").render())

    run(app, scenario)


def test_dead_letter_age_advances_with_each_refresh(seeded):
    now = [FIXED_NOW.timestamp()]
    app = make_app(seeded, clock=lambda: now[0], refresh_interval=0.5)

    async def scenario(pilot: Pilot) -> None:
        screen = await dead_screen_ready(pilot)
        page = screen.page
        table = screen.query_one("#dead", DataTable)
        assert str(table.get_row("200000")[-1]) == "2m"
        now[0] += 3 * 3600
        await wait_until(pilot, lambda: str(table.get_row("200000")[-1]) == "3h")
        assert screen.page is page  # not read again: the ages count to the latest snapshot's time

    run(app, scenario)


def test_a_job_retried_from_the_console_shows_the_retry_in_its_timeline(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        await dead_screen_ready(pilot)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.job is not None)
        screen = app.screen
        assert "retried" not in str(screen.query_one("#job-timeline").render())
        await pilot.press("r", "y")
        await wait_until(pilot, lambda: screen.job is not None and screen.job.status == "pending")
        timeline = str(screen.query_one("#job-timeline").render())
        assert "retried" in timeline and "by an operator: dead letter back to pending" in timeline, timeline
        assert timeline.index("attempt 3 failed") < timeline.index("retried") < timeline.index("attempt 1 of 3")

    run(app, scenario)


def test_timeline_finds_operator_retries_in_the_error_history():
    from dataclasses import replace
    from datetime import datetime, timedelta

    from console.screens.job import timeline
    from engine.queue import Job

    t0 = datetime(2025, 3, 14, 12, 0, tzinfo=timezone.utc)

    def failed(attempt: int, minutes: int) -> dict:
        return {"attempt": attempt, "at": (t0 + timedelta(minutes=minutes)).isoformat(), "worker": "w",
                "type": "E", "message": "m"}

    dead = Job(1, "f", {}, "dead", 0, None, 1, 3, None, None, "E", "m", [failed(1, 1), failed(2, 2), failed(3, 3),
               failed(1, 10)], None, None, None, t0, t0 + timedelta(minutes=10), t0 + timedelta(minutes=10))
    events = [event for _, event, _, _ in timeline(dead, t0.timestamp())]
    assert events == ["enqueued", "attempt 1 failed", "attempt 2 failed", "attempt 3 failed", "retried",
                      "attempt 1 failed", "dead letter"]
    done = replace(dead, status="completed", attempts=1, errors=dead.errors[:3], claimed_at=t0 + timedelta(minutes=9),
                   claimed_by="w", finished_at=t0 + timedelta(minutes=9))
    events = [event for _, event, _, _ in timeline(done, t0.timestamp())]
    assert events == ["enqueued", "attempt 1 failed", "attempt 2 failed", "attempt 3 failed", "retried",
                      "attempt 1 claimed", "completed"]
    backoff = replace(dead, status="pending", attempts=2, errors=dead.errors[:2], run_at=t0 + timedelta(minutes=5))
    assert "retried" not in [event for _, event, _, _ in timeline(backoff, t0.timestamp())]


def test_enter_on_a_flow_opens_its_dead_letters(seeded):
    """ShowDeadLetters goes up from the overview; the app switches and hands the filter down."""
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("down", "enter")  # flaky, then noop: noop has no dead letter
        await wait_until(pilot, lambda: isinstance(app.screen, DeadLettersScreen) and app.screen.page is not None
                         and app.screen.page.where.flow == "noop")
        assert app.screen.filter.flow == "noop" and table_keys(app.screen, "dead") == []
        await pilot.press("1", "up", "enter")
        await wait_until(pilot, lambda: app.screen.page.where.flow == "flaky")
        assert len(table_keys(app.screen, "dead")) == 23

    run(app, scenario)

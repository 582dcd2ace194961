"""The console's Schedules view: Pilot behaviour (pause/resume, trigger with confirmation, read-only)
against the real PostgreSQL, and a snapshot on fixed data.

Update the SVG after a deliberate change with
`python -m pytest tests/test_console_schedules.py --snapshot-update`.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from console.screens.modals import ConfirmScreen
from console.screens.schedules import SchedulesScreen
from support.console_seed import FIXED_NOW, make_app, run, seed, wait_until
from support.postgres import scalar

SIZE = (120, 40)


def seed_schedules(dsn: str) -> None:
    """Four schedules around FIXED_NOW: active with a completed last job, paused with a dead one,
    a pending one fired a moment ago, and one never fired."""
    def ago(seconds: float):
        return FIXED_NOW - timedelta(seconds=seconds)

    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("""INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, errors, created_at,
                                                        finished_at)
                        VALUES (900001, 'reports', '{"scheduled_at": "2025-03-14T03:00:00Z"}', 0, 1, '[]', %s, %s)""",
                     (ago(32460), ago(32430)))
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, status, attempts, max_attempts, error_type,
                                                   error_message, finished_at, created_at)
                        VALUES (900002, 'flaky', '{}', 'dead', 3, 3, 'FlakyError', 'boom', %s, %s),
                               (900003, 'noop', '{}', 'pending', 0, 5, NULL, NULL, NULL, %s)""",
                     (ago(5000), ago(5430), ago(9.7)))
        rows = [
            ("nightly-report", "reports", "0 5 * * *", None, "Europe/Riga", False, "config", ago(-61170), ago(32430),
             900001),
            ("sync-crm", "flaky", "*/30 * * * *", None, "UTC", True, "config", ago(-1770), ago(5430), 900002),
            ("heartbeat", "noop", None, 10_000, "UTC", False, "runtime", ago(-10), ago(9.7), 900003),
            ("weekly-cleanup", "noop", "@weekly", None, "UTC", False, "runtime", ago(-(86400 + 43170)), None, None),
        ]
        for name, flow, cron, every_ms, tz, paused, source, next_at, fired, job in rows:
            conn.execute("""INSERT INTO skiplock.schedules (name, flow, cron, every_ms, timezone, paused, source,
                                                            next_at, checked_at, last_tick_at, last_fired_at,
                                                            last_job_id)
                            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                         (name, flow, cron, every_ms, tz, paused, source, next_at, FIXED_NOW, fired, fired, job))


@pytest.fixture
def seeded(dsn: str) -> str:
    seed(dsn)
    seed_schedules(dsn)
    return dsn


async def schedules_shown(pilot: Pilot) -> SchedulesScreen:
    await pilot.press("s")
    screen = pilot.app.screen
    assert isinstance(screen, SchedulesScreen)
    await wait_until(pilot, lambda: screen.page is not None
                     and screen.query_one("#schedules", DataTable).row_count == 4)
    return screen


def cells(screen: SchedulesScreen, name: str) -> list[str]:
    return [str(c) for c in screen.query_one("#schedules", DataTable).get_row(name)]


def test_schedules_view_shows_next_last_outcome_and_pause(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await schedules_shown(pilot)
        table = screen.query_one("#schedules", DataTable)
        assert [str(r.key.value) for r in table.ordered_rows] == ["heartbeat", "nightly-report", "sync-crm",
                                                                   "weekly-cleanup"]
        assert cells(screen, "nightly-report")[2:] == [
            "0 5 * * * (Europe/Riga)", "active", "05:00:00  in 16h59m", "03:00:00  9h ago",
            "#900001", "completed"]
        assert cells(screen, "sync-crm")[3:8] == ["paused", "–", "10:30:00  1h ago", "#900002", "dead"]
        assert cells(screen, "heartbeat")[2:8] == ["every 10s", "active", "12:00:40  in 10s", "12:00:20  9s ago",
                                                   "#900003", "pending"]
        assert cells(screen, "weekly-cleanup")[5:8] == ["–", "–", "–"]

    run(app, scenario)


def test_pause_resume_and_trigger_from_the_schedules_view(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await schedules_shown(pilot)
        await pilot.press("down")  # nightly-report
        await pilot.press("p")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "paused schedule nightly-report: 1 schedule changed"
        assert scalar(seeded, "SELECT paused FROM skiplock.schedules WHERE name = 'nightly-report'") is True
        await wait_until(pilot, lambda: cells(screen, "nightly-report")[3] == "paused")
        app.last_action = None
        await pilot.press("p")
        await wait_until(pilot, lambda: app.last_action is not None)
        await wait_until(pilot, lambda: cells(screen, "nightly-report")[3] == "active")
        assert scalar(seeded, "SELECT paused FROM skiplock.schedules WHERE name = 'nightly-report'") is False
        # Trigger asks first; "n" changes nothing.
        before = scalar(seeded, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'reports'")
        await pilot.press("t")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert scalar(seeded, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'reports'") == before
        app.last_action = None
        await pilot.press("t")
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "triggered schedule nightly-report: 1 job enqueued"
        job = scalar(seeded, "SELECT last_job_id FROM skiplock.schedules WHERE name = 'nightly-report'")
        assert scalar(seeded, "SELECT flow FROM skiplock.jobs WHERE id = %s", (job,)) == "reports"
        await wait_until(pilot, lambda: cells(screen, "nightly-report")[6:8] == [f"#{job}", "pending"])

    run(app, scenario)


def test_read_only_hides_pause_and_trigger(seeded):
    app = make_app(seeded, read_only=True)

    async def scenario(pilot: Pilot) -> None:
        screen = await schedules_shown(pilot)
        shown = {b.binding.action for b in app.active_bindings.values()}
        assert not shown & {"toggle_schedule", "trigger_schedule"}
        await pilot.press("p", "t")
        assert app.screen is screen
        rows = dict(app.help_sections())["Schedules"]
        assert rows == []

    run(app, scenario)
    assert scalar(seeded, "SELECT count(*) FROM skiplock.schedules WHERE paused") == 1


def test_schedules_snapshot(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: pilot.app.snapshots > 0)
        await schedules_shown(pilot)
        for _ in range(3):
            await pilot.pause(0.05)
            await pilot.wait_for_scheduled_animations()

    assert snap_compare(make_app(seeded), terminal_size=SIZE, run_before=run_before)

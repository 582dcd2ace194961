"""The console's Running view (5/w): jobs running now with worker, age, attempt and the progress their
handlers report; cancel from there (confirmed, hidden in read-only mode); progress in the job detail.
Pilot behaviour against the real PostgreSQL, and a snapshot on fixed data.

Update the SVG after a deliberate change with
`python -m pytest tests/test_console_running.py --snapshot-update`.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.screens.job import JobScreen
from console.screens.jobs import JobsScreen
from console.screens.modals import ConfirmScreen
from console.screens.running import RunningScreen
from support.console_seed import FIXED_NOW, make_app, run, seed, wait_until
from support.postgres import scalar

SIZE = (120, 40)


def seed_running(dsn: str) -> None:
    """Three of the seed's running jobs made distinct: a long one half way with a message, one on
    another worker just started, one whose cancel was requested."""
    def ago(seconds: float):
        return FIXED_NOW - timedelta(seconds=seconds)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE skiplock.jobs SET claimed_at = %s, run_at = %s, progress = 0.62, "
                     "progress_message = 'page 31 of 50', progress_at = %s WHERE id = 140001",
                     (ago(754), ago(760), ago(2)))
        conn.execute("UPDATE skiplock.jobs SET claimed_at = %s, run_at = %s, claimed_by = 'ops-2:4188:e5f6a7b8:1', "
                     "attempts = 2, progress = 0.1, progress_at = %s WHERE id = 140002", (ago(95), ago(100), ago(1)))
        conn.execute("UPDATE skiplock.jobs SET claimed_at = %s, run_at = %s, cancel_requested_at = %s "
                     "WHERE id = 140003", (ago(40), ago(41), ago(3)))
        # a progress report from an earlier attempt is not this attempt's
        conn.execute("UPDATE skiplock.jobs SET progress = 0.9, progress_at = claimed_at - interval '1 minute' "
                     "WHERE id = 140004")


@pytest.fixture
def seeded(dsn: str) -> str:
    seed(dsn)
    seed_running(dsn)
    return dsn


async def running_shown(pilot: Pilot, key: str = "w") -> RunningScreen:
    await pilot.press(key)
    screen = pilot.app.screen
    assert isinstance(screen, RunningScreen)
    await wait_until(pilot, lambda: screen.page is not None
                     and screen.query_one("#running", DataTable).row_count == 100)
    return screen


def cells(screen: RunningScreen, job_id: int) -> list[str]:
    return [str(c) for c in screen.query_one("#running", DataTable).get_row(str(job_id))]


def test_running_view_shows_worker_age_and_progress(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await running_shown(pilot)
        table = screen.query_one("#running", DataTable)
        assert [str(r.key.value) for r in table.ordered_rows][:3] == ["140001", "140002", "140003"]
        assert cells(screen, 140001)[1:] == ["noop", "ops-1:4101:a1b2c3d4:0", "12m34s", "1 of 5",
                                             "███████░░░░░  62%", "page 31 of 50", ""]
        assert cells(screen, 140002)[2:6] == ["ops-2:4188:e5f6a7b8:1", "1m35s", "2 of 5", "█░░░░░░░░░░░  10%"]
        assert cells(screen, 140003)[5:7] == ["–", "cancel requested"]
        assert cells(screen, 140004)[5] == "–"  # an earlier attempt's report
        assert "100 job(s) running now, 2 reporting progress" in str(screen.query_one("#running-title", Static).render())
        # 5 opens it too; Enter opens the job detail, which shows the progress
        await pilot.press("1")
        await running_shown(pilot, "5")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobScreen) and app.screen.job is not None)
        title = str(app.screen.query_one("#job-title", Static).render())
        assert "progress ██████░░░░  62%  page 31 of 50" in title, title

    run(app, scenario)


def test_cancel_a_running_job_from_the_running_view(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await running_shown(pilot)
        await pilot.press("down")  # 140002
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert scalar(seeded, "SELECT cancel_requested_at FROM skiplock.jobs WHERE id = 140002") is None
        await pilot.press("c")
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "cancel requested for 1 running job(s)"
        assert scalar(seeded, "SELECT cancel_requested_at IS NOT NULL FROM skiplock.jobs WHERE id = 140002")
        await wait_until(pilot, lambda: cells(screen, 140002)[6] == "cancel requested")
        # a job whose cancel is already requested is not asked again
        await pilot.press("down")
        app.last_action = None
        await pilot.press("c")
        assert app.screen is screen and app.last_action is None
        # the Jobs view cancels a running job the same way
        await pilot.press("4")
        jobs = app.screen
        assert isinstance(jobs, JobsScreen)
        await wait_until(pilot, lambda: jobs.page is not None)
        before = jobs.page
        await pilot.press("slash")
        jobs.query_one("#filter").value = "status:running payload.n:7"
        await pilot.press("enter")
        await wait_until(pilot, lambda: jobs.page is not before and jobs.page is not None
                         and jobs.page.where == jobs.where() and len(jobs.page.jobs) == 1)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        app.last_action = None
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None)
        assert app.last_action == "cancel requested for 1 running job(s)"
        assert scalar(seeded, "SELECT cancel_requested_at IS NOT NULL FROM skiplock.jobs WHERE id = 140007")

    run(app, scenario)


def test_read_only_hides_cancel_in_the_running_view(seeded):
    app = make_app(seeded, read_only=True)

    async def scenario(pilot: Pilot) -> None:
        screen = await running_shown(pilot)
        shown = {b.binding.action for b in app.active_bindings.values()}
        assert "cancel_running" not in shown
        await pilot.press("c")
        assert app.screen is screen
        assert dict(app.help_sections())["Running"] == []

    run(app, scenario)
    assert scalar(seeded, "SELECT count(*) FROM skiplock.jobs WHERE cancel_requested_at IS NOT NULL") == 1


def test_running_snapshot(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await wait_until(pilot, lambda: pilot.app.snapshots > 0)
        await running_shown(pilot)
        for _ in range(3):
            await pilot.pause(0.05)
            await pilot.wait_for_scheduled_animations()

    assert snap_compare(make_app(seeded), terminal_size=SIZE, run_before=run_before)

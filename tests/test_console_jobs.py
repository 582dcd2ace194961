"""The console's Jobs screen (Pilot, on the fixed seed): listing any state, `/` qualifiers that reach
SQL, opening the job detail, bulk cancel / retry / purge with confirmation, hidden in read-only mode."""

from __future__ import annotations

import psycopg
import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable

from console.screens.job import JobScreen
from console.screens.jobs import JobsScreen
from console.screens.modals import ConfirmScreen
from support.console_seed import make_app, run, seed, wait_until


@pytest.fixture
def seeded(dsn: str) -> str:
    seed(dsn)
    return dsn


async def jobs_screen(pilot: Pilot) -> JobsScreen:
    await pilot.press("4")
    screen = pilot.app.screen
    assert isinstance(screen, JobsScreen)
    await wait_until(pilot, lambda: screen.page is not None)
    return screen


async def filtered(pilot: Pilot, screen: JobsScreen, text: str) -> None:
    before = screen.page
    await pilot.press("slash")
    screen.query_one("#filter").value = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: screen.page is not before and screen.page is not None
                     and screen.page.where == screen.where())


def shown(screen: JobsScreen) -> list[int]:
    return [int(str(row.key.value)) for row in screen.query_one("#jobs", DataTable).ordered_rows]


def statuses(dsn: str, ids: list[int]) -> dict[int, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, status::text FROM skiplock.jobs WHERE id = ANY(%s)"
                            " UNION ALL SELECT id, status FROM skiplock.jobs_done WHERE id = ANY(%s)", (ids, ids))
        return dict(rows.fetchall())


def test_jobs_screen_lists_filters_and_opens_a_job(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await jobs_screen(pilot)
        assert screen.page is not None and len(screen.page.jobs) == 500  # the list limit
        assert "list limit" in str(screen.query_one("#jobs-title").render())
        await filtered(pilot, screen, "status:dead flow:flaky")
        assert shown(screen) and {j.status for j in screen.page.jobs} == {"dead"}
        assert {j.flow for j in screen.page.jobs} == {"flaky"}
        await filtered(pilot, screen, "status:running payload.n:7")
        assert [j.payload for j in screen.page.jobs] == [{"n": 7}]
        await pilot.press("slash")
        screen.query_one("#filter").value = "status:nonsense"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "not a job state" in str(screen.query_one("#jobs-title").render()))
        assert shown(screen) == []
        await filtered(pilot, screen, "status:running payload.n:7")
        await pilot.press("enter")
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == shown(screen)[0]

    run(app, scenario)


def test_bulk_cancel_retry_and_purge_confirm_first(seeded):
    app = make_app(seeded)

    async def scenario(pilot: Pilot) -> None:
        screen = await jobs_screen(pilot)
        await filtered(pilot, screen, "flow:sleep")
        waiting = shown(screen)
        assert len(waiting) == 25
        await pilot.press("C")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # nothing changes
        assert set(statuses(seeded, waiting).values()) == {"pending"}
        await pilot.press("C", "y")
        await wait_until(pilot, lambda: set(statuses(seeded, waiting).values()) == {"cancelled"})
        # the list follows: the cancelled jobs show as cancelled, and purge takes them
        await filtered(pilot, screen, "flow:sleep status:cancelled")
        assert sorted(shown(screen)) == sorted(waiting)
        await pilot.press("X", "y")
        await wait_until(pilot, lambda: statuses(seeded, waiting) == {})
        # retry the dead letters shown
        await filtered(pilot, screen, "flow:flaky status:dead")
        dead = shown(screen)
        assert dead
        await pilot.press("R", "y")
        await wait_until(pilot, lambda: set(statuses(seeded, dead).values()) == {"pending"})

    run(app, scenario)


def test_bulk_actions_are_hidden_in_read_only_mode(seeded):
    app = make_app(seeded, read_only=True)

    async def scenario(pilot: Pilot) -> None:
        screen = await jobs_screen(pilot)
        for action in ("cancel_one", "cancel_matching", "retry_dead_matching", "purge_matching"):
            assert screen.check_action(action, ()) is False
        waiting = [j.id for j in screen.page.jobs if j.status == "pending"][:5]
        await pilot.press("C", "c", "R", "X")
        assert not isinstance(app.screen, ConfirmScreen)
        assert set(statuses(seeded, waiting).values()) == {"pending"}

    run(app, scenario)

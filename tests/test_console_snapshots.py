"""Snapshot tests of every console screen on fixed data (pytest-textual-snapshot).

Deterministic (the data and the app come from tests/support/console_seed.py): the rows are inserted
with fixed timestamps around FIXED_NOW, the app gets a fixed clock (every age and window is computed
against it, in SQL too), times are shown in UTC, the DSN label is fixed, there is no live feed and no
periodic refresh, and inputs do not blink.
Update the SVGs after a deliberate change with `python -m pytest tests/test_console_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import pytest
from textual.pilot import Pilot

from console.app import ConsoleApp
from support.console_seed import failure_events, make_app, seed, wait_until

SIZE = (120, 40)


async def loaded(pilot: Pilot) -> None:
    """The first snapshot is drawn (DataTables size their columns on the next idle: let them)."""
    from textual.widgets import DataTable

    await wait_until(pilot, lambda: pilot.app.snapshots > 0)
    await wait_until(pilot, lambda: pilot.app.screen.query_one("#flows", DataTable).row_count > 0)
    await settle(pilot)


async def settle(pilot: Pilot) -> None:
    """Let the screen repaint after tables sized their columns (a modal keeps the last paint below it)."""
    for _ in range(3):
        await pilot.pause(0.05)
        await pilot.wait_for_scheduled_animations()


def shot(snap_compare, app: ConsoleApp, steps) -> bool:
    """snap_compare after `steps`, once the screen has settled."""
    async def run_before(pilot: Pilot) -> None:
        await steps(pilot)
        await settle(pilot)

    return snap_compare(app, terminal_size=SIZE, run_before=run_before)


@pytest.fixture
def seeded(dsn: str) -> str:
    seed(dsn)
    return dsn


def test_overview(snap_compare, seeded):
    assert shot(snap_compare, make_app(seeded), loaded)


def test_overview_read_only_1h_window(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("t", "t", "t")

    assert shot(snap_compare, make_app(seeded, read_only=True), run_before)


def test_failures(snap_compare, seeded):
    from console.messages import FeedEvents

    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await wait_until(pilot, lambda: len(pilot.app.state.failures) >= 25)  # the dead letters, read at attach
        pilot.app.post_message(FeedEvents(failure_events()))
        await pilot.press("2")
        await wait_until(pilot, lambda: len(pilot.app.state.failures) >= 37)

    assert shot(snap_compare, make_app(seeded), run_before)


def test_dead_letters(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("3")
        await wait_until(pilot, lambda: pilot.app.dead_screen is not None and pilot.app.dead_screen.page is not None)
        await pilot.press("space", "space")

    assert shot(snap_compare, make_app(seeded), run_before)


def test_dead_letters_filtered(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("3")
        await wait_until(pilot, lambda: pilot.app.dead_screen is not None and pilot.app.dead_screen.page is not None)
        await pilot.press("slash")
        pilot.app.screen.query_one("#filter").value = "error:ValueError"
        await pilot.press("enter")
        await wait_until(pilot, lambda: pilot.app.dead_screen.page.where.error_type == "ValueError")

    assert shot(snap_compare, make_app(seeded), run_before)


def test_confirm_modal(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("3")
        await wait_until(pilot, lambda: pilot.app.dead_screen is not None and pilot.app.dead_screen.page is not None)
        await settle(pilot)
        await pilot.press("space", "space", "space")
        await settle(pilot)
        screen = pilot.app.screen
        await pilot.press("R")
        await wait_until(pilot, lambda: pilot.app.screen is not screen)  # the confirmation is up

    assert shot(snap_compare, make_app(seeded), run_before)


def test_job_detail(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("3")
        await wait_until(pilot, lambda: pilot.app.dead_screen is not None and pilot.app.dead_screen.page is not None)
        await pilot.press("enter")
        await wait_until(pilot, lambda: getattr(pilot.app.screen, "job", None) is not None)

    assert shot(snap_compare, make_app(seeded), run_before)


def test_help(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("question_mark")

    assert shot(snap_compare, make_app(seeded), run_before)


def test_database_down(snap_compare, seeded):
    """The outage banner over the last data (the real outage is tested in test_console.py)."""
    from console.messages import SnapshotFailed

    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        pilot.app.post_message(SnapshotFailed("connection to server failed: Connection refused"))
        await wait_until(pilot, lambda: pilot.app.database_down)

    assert shot(snap_compare, make_app(seeded), run_before)


def test_help_small_terminal(snap_compare, seeded):
    """80x24: the dialog stays inside the screen, keys and descriptions stay apart."""
    async def run_before(pilot: Pilot) -> None:
        await loaded(pilot)
        await pilot.press("question_mark")
        await settle(pilot)

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=run_before)


async def jobs_loaded(pilot: Pilot) -> None:
    from textual.widgets import DataTable

    await loaded(pilot)
    await pilot.press("4")
    await wait_until(pilot, lambda: getattr(pilot.app.screen, "page", None) is not None
                     and pilot.app.screen.query_one("#jobs", DataTable).row_count > 0)


def test_jobs(snap_compare, seeded):
    assert shot(snap_compare, make_app(seeded), jobs_loaded)


def test_jobs_filtered_bulk_cancel_confirm(snap_compare, seeded):
    async def run_before(pilot: Pilot) -> None:
        await jobs_loaded(pilot)
        screen = pilot.app.screen
        before = screen.page
        await pilot.press("slash")
        screen.query_one("#filter").value = "flow:flaky status:pending,dead"
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.page is not before and screen.page.where == screen.where())
        await settle(pilot)
        await pilot.press("C")
        await wait_until(pilot, lambda: pilot.app.screen is not screen)  # the confirmation is up

    assert shot(snap_compare, make_app(seeded), run_before)

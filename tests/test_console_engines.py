"""The console's Engines view (keys 7/g): scale, drain and stop real `engine run` processes through
the control plane, each behind a confirmation; nothing of it in read-only mode."""

from __future__ import annotations

from textual.pilot import Pilot
from textual.widgets import DataTable

from console.app import ConsoleApp
from console.screens.engines import EnginesScreen
from console.screens.modals import ConfirmScreen, PromptScreen
from engine import db, store
from support.console_seed import make_app, run as run_attached, wait_until
from support.engines import BASE, rows, wait_for

SIZE = (140, 40)
CONFIG = BASE + """
[flows.slow]
handler = "support.handlers:record_slow"
"""


def live_workers(dsn: str, engine_id: str) -> int:
    return rows(dsn, "SELECT count(*) FROM skiplock.workers WHERE engine_id = %s AND state NOT IN ('stopped', "
                     "'lost')", (engine_id,))[0][0]


def run(app: ConsoleApp, scenario) -> None:
    run_attached(app, scenario, SIZE)


def start(dsn, start_engine, tmp_path, workers: int):
    proc = start_engine(dsn, CONFIG, "--workers", str(workers), env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "r")})
    engine_id = wait_for(lambda: (rows(dsn, "SELECT id FROM skiplock.engines WHERE pid = %s", (proc.process.pid,))
                                  or [[None]])[0][0], 20, message="the engine's row")
    wait_for(lambda: live_workers(dsn, engine_id) == workers, 20, message="its workers")
    return proc, engine_id


async def act(pilot: Pilot, *keys: str, confirm: bool = True) -> str:
    app = pilot.app
    app.last_action = None
    await pilot.press(*keys)
    assert isinstance(app.screen, ConfirmScreen)
    await pilot.press("y" if confirm else "n")
    if not confirm:
        return ""
    await wait_until(pilot, lambda: app.last_action is not None, timeout=30)
    return app.last_action


def test_scale_drain_and_stop_from_the_engines_view(dsn, start_engine, tmp_path):
    first, a = start(dsn, start_engine, tmp_path, 2)
    second, b = start(dsn, start_engine, tmp_path, 1)
    app = make_app(dsn, clock=None)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("g")
        screen = app.screen
        assert isinstance(screen, EnginesScreen)
        table = screen.query_one("#engines", DataTable)
        await wait_until(pilot, lambda: table.row_count == 2, timeout=30)
        assert [str(r.key.value) for r in table.ordered_rows] == [a, b]
        assert [str(c) for c in table.get_row(a)][4:8:3] == ["2", "running"]
        assert await act(pilot, "plus") == f"engine {a[:12]}: scaled from 2 to 3 worker(s)"
        assert live_workers(dsn, a) == 3
        await act(pilot, "minus", confirm=False)  # "n": nothing sent
        assert rows(dsn, "SELECT count(*) FROM skiplock.engine_commands") == [(1,)]
        # The test app reads only on an action or a resume (no live feed): the read after the scale
        # can come before the supervisor records its third worker, so ask again until it shows.
        def shows_three() -> bool:
            if str(table.get_row(a)[4]) == "3":
                return True
            if not screen.awaiting():
                screen.reload()
            return False

        await wait_until(pilot, shows_three, timeout=30)
        app.last_action = None
        await pilot.press("n")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press("1", "enter")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.last_action is not None, timeout=30)
        assert app.last_action == f"engine {a[:12]}: scaled from 3 to 1 worker(s)"
        assert live_workers(dsn, a) == 1
        assert (await act(pilot, "r")).startswith(f"engine {a[:12]}: draining: 1 worker(s)")
        await pilot.press("down")
        assert (await act(pilot, "x")).startswith(f"engine {b[:12]}: stopping: 1 worker(s) killed now")

    run(app, scenario)
    assert first.wait(30) == 0 and second.wait(30) == 0
    assert rows(dsn, "SELECT id, state FROM skiplock.engines ORDER BY started_at") == [(a, "stopped"), (b, "stopped")]


def test_read_only_offers_no_engine_action(dsn):
    with db.connect(dsn) as conn:
        store.engine_register(conn, "ab" * 16, "host-1", 4242, "0.1.0", 2, 30.0, ["slow"])
    app = make_app(dsn, clock=None, read_only=True)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("7")
        screen = app.screen
        assert isinstance(screen, EnginesScreen)
        await wait_until(pilot, lambda: screen.query_one("#engines", DataTable).row_count == 1)
        shown = {b.binding.action for b in app.active_bindings.values()}
        assert not shown & {"scale_by", "scale_to", "drain_engine", "stop_engine"}
        await pilot.press("plus", "minus", "n", "r", "x")
        assert app.screen is screen
        assert dict(app.help_sections())["Engines"] == []

    run(app, scenario)
    assert rows(dsn, "SELECT count(*) FROM skiplock.engine_commands") == [(0,)]

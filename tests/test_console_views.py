"""What every console view shares (console/screens/listing.py): the empty-state line on an empty
database, the error line when the view's statement fails (and its clearing when a read succeeds
again), and every view's keys in `?`, --list-bindings and the command palette. Pilot against the
real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.app import ConsoleApp, all_bindings
from console.screens.base import ConsoleScreen
from console.screens.job import JobScreen
from support.console_seed import make_app, run, seed, wait_until


def title(app: ConsoleApp, title_id: str) -> str:
    return str(app.screen.query_one(f"#{title_id}", Static).render())


def test_every_view_says_so_on_an_empty_database(dsn):
    app = make_app(dsn)
    empty = {  # key: (title line, what it says)
        "1": ("flows-title", "Flows none yet: an engine adds the flows it serves"),
        "2": ("failures-title", "Failures none yet: failed attempts appear here"),
        "3": ("dead-title", "Dead letters none: a job lands here when it fails its last attempt"),
        "4": ("jobs-title", "Jobs none: no job is pending, scheduled, running or dead"),
        "5": ("running-title", "Running 0 job(s) running now"),
        "6": ("schedules-title", "Schedules none yet: add one with `engine schedule add`"),
        "7": ("engines-title", "Engines none yet: an engine appears here once it starts"),
        "8": ("pipelines-title", "Pipelines none yet: flows become a pipeline"),
    }

    async def scenario(pilot: Pilot) -> None:
        for key, (title_id, says) in empty.items():
            await pilot.press(key)
            await wait_until(pilot, lambda: title(app, title_id).startswith(says))
            for table in app.screen.query(DataTable):
                assert table.row_count == 0, (key, table.id)

    run(app, scenario)


def test_a_filter_that_hides_every_row_is_not_an_empty_database(dsn):
    seed(dsn)
    app = make_app(dsn)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("3", "slash")
        app.screen.query_one("#filter").value = "nothing-matches-this"
        await pilot.press("enter")
        await wait_until(pilot, lambda: title(app, "dead-title").startswith("Dead letters 0 shown"))
        assert app.screen.query_one("#dead", DataTable).row_count == 0

    run(app, scenario)


def test_a_failed_read_is_said_on_the_title_line_until_a_read_succeeds(dsn):
    """The schedules view's statement fails (its table renamed away under the console): the title
    line says why and the rows read before stay; once the table is back, the next read clears it."""
    seed(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO skiplock.schedules (name, flow, every_ms, next_at, source)
                        VALUES ('heartbeat', 'noop', 10000, now(), 'runtime')""")
    app = make_app(dsn)

    def rename(old: str, new: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE skiplock.{old} RENAME TO {new}")

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("6")
        table = app.screen.query_one("#schedules", DataTable)
        await wait_until(pilot, lambda: table.row_count == 1)
        rename("schedules", "schedules_away")
        await pilot.press("ctrl+r")  # a snapshot: the view reads again
        await wait_until(pilot, lambda: "cannot read" in title(app, "schedules-title"))
        assert "schedules" in title(app, "schedules-title")  # the statement's own error, redacted
        assert table.row_count == 1  # the last rows read stay listed
        rename("schedules_away", "schedules")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: title(app, "schedules-title").startswith("Schedules 1 schedule(s)"))

    run(app, scenario)


def test_every_key_of_every_view_is_in_help_list_bindings_and_the_palette(dsn):
    app = make_app(dsn)
    views = [*ConsoleApp.MODES.values(), JobScreen]
    listed = {binding_id for binding_id, _, _ in all_bindings()}

    async def scenario(pilot: Pilot) -> None:
        helped = {description for _, rows in app.help_sections() for _, description in rows}
        for view in views:
            for binding in view.BINDINGS:
                assert binding.id in listed, binding.id
                assert binding.description in helped, (view.__name__, binding.description)
        palette = {command.title for command in app.get_system_commands(app.screen)}
        for binding in ConsoleApp.BINDINGS:
            if binding.action.startswith("show("):
                assert binding.description in palette, binding.description

    run(app, scenario)


def test_the_readme_names_every_view_and_key():
    """The README's console section: every view's key and every binding's keys, as `?` shows them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The console"):]
    section = section.split("\n## ")[0]
    app = make_app("host=/nowhere")  # never attached: only its key names are read
    owners = [ConsoleApp, ConsoleScreen, *ConsoleApp.MODES.values(), JobScreen]
    missing = [(owner.__name__, key) for owner in owners for binding in owner.BINDINGS
               for key in app.binding_keys(binding).split(", ") if f"`{key}`" not in section]
    assert not missing
    for view in ConsoleApp.MODES:
        shot = f"docs/img/console-{'dead-letters' if view == 'dead' else view}.svg"
        assert f"]({shot})" in section, shot
        assert (Path(__file__).resolve().parent.parent / shot).is_file(), shot


def test_a_view_reads_its_page_once_when_opened(dsn):
    """Textual resumes a new mode's screen twice: the view still asks for one read, not three."""
    seed(dsn)
    app = make_app(dsn)
    reads: list[str] = []
    read_page = app._read_page

    def counted(intent):
        reads.append(type(intent).__name__)
        return read_page(intent)

    app._read_page = counted  # the thread each Load intent runs in (ConsoleApp._on_load)

    async def scenario(pilot: Pilot) -> None:
        for key in "345678":
            await pilot.press(key)
            await wait_until(pilot, lambda: getattr(app.screen, "page", None) is not None)
            await pilot.pause(0.3)
        opened = list(reads)
        reads.clear()
        await pilot.press("7")  # shown again: a live view reads again, once
        await wait_until(pilot, lambda: reads == ["LoadEngines"])
        await pilot.pause(0.3)
        assert reads == ["LoadEngines"]
        assert opened == ["LoadDeadLetters", "LoadJobs", "LoadRunning", "LoadSchedules", "LoadEngines",
                          "LoadPipelines"]

    run(app, scenario)

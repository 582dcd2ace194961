"""The console's Pipelines view (8/l) and the job detail's parent/children links, with Pilot against
the real PostgreSQL."""

from __future__ import annotations

import io

import psycopg
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from console.screens.job import JobScreen
from console.screens.pipelines import PipelinesScreen
from support.console_seed import make_app, run, seed, wait_until


def seed_pipeline(dsn: str) -> None:
    """parse -> chunk (declared by `next`) -> embed (seen by an ack): 3 parse pending, 1 chunk
    dead, and embed job 910002 a child of chunk job 910001 (completed)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("""INSERT INTO skiplock.flows (name, policy) VALUES
            ('parse', '{"next": "chunk"}'), ('chunk', '{}'), ('embed', '{}')""")
        conn.execute("INSERT INTO skiplock.flow_links (parent_flow, child_flow) VALUES ('chunk', 'embed')")
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload) SELECT 'parse', '{}' FROM generate_series(1, 3)""")
        conn.execute("""INSERT INTO skiplock.jobs (flow, payload, status, attempts, finished_at)
                        VALUES ('chunk', '{}', 'dead', 3, now())""")
        conn.execute("""INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, errors, created_at)
                        VALUES (910001, 'chunk', '{}', 0, 1, '[]', now())""")
        conn.execute("""INSERT INTO skiplock.jobs (id, flow, payload, parent_id) VALUES (910002, 'embed', '{}', 910001)""")


def _plain(widget: Static) -> str:
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def test_pipelines_view_shows_stages_top_to_bottom(dsn):
    seed(dsn)
    seed_pipeline(dsn)
    app = make_app(dsn)

    async def scenario(pilot: Pilot) -> None:
        await pilot.press("l")
        screen = pilot.app.screen
        assert isinstance(screen, PipelinesScreen)
        table = screen.query_one("#pipelines", DataTable)
        await wait_until(pilot, lambda: table.row_count == 3)
        cells = [[str(c) for c in table.get_row_at(i)] for i in range(3)]
        assert [c[1].split()[-1] for c in cells] == ["parse", "chunk", "embed"]
        assert cells[0][:3] == ["parse", "parse", "3"] and cells[1][5] == "1" and cells[2][2] == "1"
        await pilot.press("1")
        await pilot.press("8")
        assert isinstance(pilot.app.screen, PipelinesScreen)

    run(app, scenario)


def test_job_detail_links_parent_and_children(dsn):
    seed(dsn)
    seed_pipeline(dsn)
    app = make_app(dsn)

    async def scenario(pilot: Pilot) -> None:
        pilot.app.push_screen(JobScreen(910001))
        screen = pilot.app.screen
        await wait_until(pilot, lambda: screen.job is not None)
        text = _plain(screen.query_one("#job-result", Static))
        assert "Next stage: 1 job(s)" in text and "job 910002  embed  pending" in text
        pilot.app.pop_screen()
        pilot.app.push_screen(JobScreen(910002))
        child = pilot.app.screen
        await wait_until(pilot, lambda: child.job is not None)
        assert "parent job 910001" in _plain(child.query_one("#job-title", Static))

    run(app, scenario)

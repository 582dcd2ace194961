"""The engine, the CLI and the console through a real PgBouncer in transaction-pooling mode
(tests/support/pgbouncer.py), LISTEN on a direct `listen_dsn`; a LISTEN through PgBouncer refused in
one line; a kill -9 of a worker and a PostgreSQL restart behind PgBouncer lose and repeat nothing
but the killed worker's own jobs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import pytest
from textual.widgets import DataTable

from console.screens.engines import EnginesScreen
from console.screens.modals import ConfirmScreen
from engine import db, store
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.errors import ConfigError
from engine.migrate import migrate
from engine.queue import Queue
from support.cli import engine, ok, one_line_error
from support.console_seed import make_app, wait_until
from support.engines import BASE, rows, tail, wait_for
from support.handlers import read_records
from support.pgbouncer import start_pgbouncer
from support.postgres import register_flows

CONFIG = BASE + """
[flows.slow]
handler = "support.handlers:record_slow"
batch_size = 5
"""


def bounced(pgbouncer, dsn: str) -> str:
    return pgbouncer.dsn(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def test_connections_through_pgbouncer_prepare_nothing_and_refuse_listen(pgbouncer, dsn):
    pooled = bounced(pgbouncer, dsn)
    with db.connect(dsn) as direct, db.connect(pooled) as conn:
        assert not db.through_pooler(direct, dsn) and direct.prepare_threshold == 5
        assert db.through_pooler(conn, pooled) and conn.prepare_threshold is None
        for _ in range(20):  # past psycopg's threshold: would be prepared on one server connection
            store.status_live(conn, None)
        with pytest.raises(ConfigError, match="^LISTEN skiplock_control goes through a connection pooler "
                                              r"\(PgBouncer\?\), where notifications are lost: set listen_dsn"):
            db.listen(conn, "skiplock_control")
        db.listen(direct, "skiplock_control")


def test_engine_run_refuses_listen_through_pgbouncer(pgbouncer, dsn, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(BASE + "[flows.noop]\n")
    result = engine("run", "--config", str(config), dsn=bounced(pgbouncer, dsn))
    line = one_line_error(result)
    assert line == ("engine: error: LISTEN skiplock_control goes through a connection pooler (PgBouncer?), where "
                    "notifications are lost: set listen_dsn to a direct PostgreSQL connection\n")


@pytest.fixture
def own_server():
    """A PostgreSQL of this test's own (restarted by it), with a PgBouncer in front."""
    base = make_temp_dir("skiplock-bounce-")
    server = EmbeddedPostgres(base / "data", settings={"fsync": "off", "synchronous_commit": "off",
                                                      "full_page_writes": "off"})
    server.start()
    with db.connect(server.dsn()) as conn:
        migrate(conn)  # direct: migrations hold a session advisory lock
    bouncer = start_pgbouncer(server, base / "bouncer")
    yield server, bouncer
    bouncer.stop()
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_engine_and_console_through_pgbouncer_survive_kill_9_and_a_restart(own_server, start_engine, tmp_path):
    server, bouncer = own_server
    direct, pooled = server.dsn(), bouncer.dsn("skiplock")
    record = tmp_path / "records"
    total = 240
    register_flows(direct, "slow")
    with Queue(pooled) as q:  # enqueue through PgBouncer too, in many statements
        for start in range(0, total, 20):
            q.enqueue_many("slow", [{"n": i, "sleep": 0.03} for i in range(start, start + 20)])
    proc = start_engine(pooled, CONFIG, "--workers", "2",
                        env={"SKIPLOCK_TEST_RECORD": str(record), "SKIPLOCK_LISTEN_DSN": direct})

    def done() -> int:
        return rows(direct, "SELECT count(*) FROM skiplock.jobs_done")[0][0]

    wait_for(lambda: done() >= 30, 30, message="the engine working through PgBouncer")
    victim = children(proc.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: done() >= 90, 30, message="work after the kill")
    server.stop()  # PgBouncer stays up; its server connections break
    server.start()
    wait_for(lambda: done() == total, 60, message=f"every job done (log: {tail(proc)})")

    # Every job completed exactly once; a job ran twice only if the killed worker had run it.
    assert rows(direct, "SELECT count(*), count(DISTINCT id) FROM skiplock.jobs_done WHERE status = 'completed'") == [
        (total, total)]
    assert rows(direct, "SELECT count(*) FROM skiplock.jobs") == [(0,)]
    runs: dict[int, list[int]] = defaultdict(list)
    for n, pid in read_records(str(record)):
        runs[n].append(pid)
    assert set(runs) == set(range(total))
    again = {n: pids for n, pids in runs.items() if len(pids) > 1}
    assert all(victim in pids for pids in again.values()), again
    assert max(Counter(len(p) for p in runs.values())) <= 2

    # The console through PgBouncer (its feed LISTENs on the direct DSN): snapshots again and again,
    # the Engines view, and a scale command that the engine acknowledges.
    engine_id = rows(direct, "SELECT id FROM skiplock.engines")[0][0]
    app = make_app(pooled, clock=None, live=True, listen_dsn=direct, refresh_interval=3600.0)

    async def main() -> None:
        async with app.run_test(size=(140, 40)) as pilot:
            await wait_until(pilot, lambda: app.snapshots > 0 and app.feed_connected, timeout=20)
            for count in range(2, 9):
                app.request_refresh()
                await wait_until(pilot, lambda: app.snapshots >= count)
            assert not app.database_down
            await pilot.press("g")
            screen = app.screen
            assert isinstance(screen, EnginesScreen)
            await wait_until(pilot, lambda: screen.query_one("#engines", DataTable).row_count == 1)
            await pilot.press("plus")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_until(pilot, lambda: app.last_action is not None, timeout=30)
            assert app.last_action == f"engine {engine_id[:12]}: scaled from 2 to 3 worker(s)"

    asyncio.run(main())
    out = ok(engine("engines", dsn=pooled))
    assert engine_id[:12] in out and "running" in out
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, tail(proc)

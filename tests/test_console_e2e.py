"""End to end: a real `engine run` and the console side by side.

A job that fails in the engine shows up in the console's failure feed, and the dead-letter count of
its flow changes, with the periodic refresh set to an hour: only NOTIFY can have told the console.
"""

from __future__ import annotations

import asyncio

import pytest
from textual.widgets import DataTable

from console.app import ConsoleApp
from engine.queue import Queue
from support.console_seed import wait_until

CONFIG = """
[global]
heartbeat_interval = "1s"
tick_interval = "250ms"
[flows.flaky]
handler = "engine.flows.builtin:flaky"
max_attempts = 2
backoff = { base = "100ms", cap = "200ms", jitter = 0.0 }
circuit = false
"""


@pytest.mark.slow
def test_engine_failures_reach_the_console_over_notify(dsn, start_engine):
    engine = start_engine(dsn, CONFIG, "--workers", "1", "--flows", "flaky")
    app = ConsoleApp(dsn, live=True, refresh_interval=3600.0)

    def dead_cell() -> str:
        flows = app.screen.query_one("#flows", DataTable)
        return str(flows.get_row("flaky")[6]) if "flaky" in [str(r.key.value) for r in flows.ordered_rows] else ""

    async def main() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            # the engine registers its flows and workers; the console learns of the workers over NOTIFY
            await wait_until(pilot, lambda: app.feed_connected and app.snapshots > 0, timeout=15)
            await wait_until(pilot, lambda: app.state.snapshot is not None and app.state.snapshot.live_workers,
                             timeout=20)
            await wait_until(pilot, lambda: dead_cell() == "0", timeout=10)
            with Queue(dsn) as queue:
                permanent = queue.enqueue("flaky", {"fail": 1.0, "permanent": 1.0})
                transient = queue.enqueue("flaky", {"fail": 1.0, "permanent": 0.0}, max_attempts=2)
            # the permanent failure is a dead letter at once; the transient one retries, then dies
            await wait_until(pilot, lambda: {r.job for r in app.state.failures} >= {permanent, transient},
                             timeout=20)
            await wait_until(pilot, lambda: dead_cell() == "2", timeout=20)
            failures = {(r.job, r.attempt): r for r in app.state.failures if r.source == "live"}
            assert failures[(permanent, 1)].type == "PermanentError" and failures[(permanent, 1)].dead
            assert failures[(transient, 1)].type == "FlakyError" and failures[(transient, 1)].max_attempts == 2
            await pilot.press("2")
            rows = [str(r.key.value) for r in app.screen.query_one("#failures", DataTable).ordered_rows]
            assert f"{permanent}:1:live" in rows and f"{transient}:2:live" in rows
            await pilot.press("3")
            await wait_until(pilot, lambda: app.dead_screen is not None and app.dead_screen.page is not None
                             and len(app.dead_screen.page.letters) == 2)
            assert app.state.events > 0 and app.state.seconds  # ticks arrived as well

    asyncio.run(main())
    assert engine.process.poll() is None, engine.log_path.read_text()[-3000:]


@pytest.mark.slow
def test_engine_dev_opens_the_console_and_quitting_stops_everything():
    """`engine dev` on a terminal: embedded PostgreSQL, engine, demo load, the console; when the console
    quits (here by --seconds), the engine drains and the database stops."""
    import fcntl
    import os
    import pty
    import select
    import shutil
    import struct
    import subprocess
    import sys
    import termios
    import time

    from engine.embedded import make_temp_dir

    base = make_temp_dir("skiplock-devtty-")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK_")}
    env["TERM"] = "xterm-256color"
    env.pop("COLUMNS", None)  # set by pytest-xdist workers; it would override the terminal size below
    env.pop("LINES", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "dev", "--data-dir", str(base / "pgdata"), "--seconds", "10",
         "--jobs", "200"], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(30) == 0, output[-3000:].decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    text = output.decode(errors="replace")
    assert "Dead letters" in text and "Throughput" in text  # the console drew its screens
    assert "stopping: the engine drains" in text and "TOTAL" in text  # then the status, after the console
    assert not (base / "pgdata" / "postmaster.pid").exists()  # the database stopped
    assert '"msg":"engine stopped"' in (base / "engine-dev.log").read_text()
    shutil.rmtree(base, ignore_errors=True)

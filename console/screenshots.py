"""Regenerate the README's console screenshots under live demo load.

    python -m console.screenshots            # writes docs/img/console-{overview,failures,dead-letters,jobs,running,schedules,engines,pipelines}.svg
    python -m console.screenshots --seconds 90 --out docs/img

Starts a throwaway embedded PostgreSQL (or uses --dsn), migrates, runs real `engine run`s: two with the
built-in `noop`, `flaky` and `sleep` flows, fed the `engine dev` demo load (retries and dead letters
included) for `--seconds`, a third running a few long jobs that report progress
(engine/examples/long_job.py), a fourth the document pipeline (engine/examples/pipeline: parse -> chunk
-> embed, fed a steady trickle of documents); then drives the console headless with Textual's
`run_test` and saves an SVG of each view with `App.save_screenshot`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from console.app import ConsoleApp
from console.screens.dead_letters import DeadLettersScreen
from console.screens.engines import EnginesScreen
from console.screens.jobs import JobsScreen
from console.screens.listing import PagedScreen
from console.screens.pipelines import PipelinesScreen
from console.screens.running import RunningScreen
from console.screens.schedules import SchedulesScreen
from engine import db
from engine.embedded import EmbeddedPostgres, make_temp_dir
from engine.examples.pipeline.flow import create_embeddings_table, sample_documents
from engine.migrate import migrate
from engine.queue import Queue

REPO = Path(__file__).resolve().parent.parent
SIZE = (120, 40)
DOCUMENTS_PER_TICK = 12  # every 0.5 s: about 70 chunks a second, more than embed's rate limit of 50/s lets through


def feed(dsn: str, stop: threading.Event) -> None:
    """The `engine dev` demo load, steadier: a no-op rate that swells and ebbs, `flaky` jobs that retry
    and die, a run of slow jobs still in progress when the screenshots are taken, and documents for the
    pipeline a little faster than its rate-limited embed stage takes them (one of them empty: a dead
    letter of parse)."""
    # The engines started next serve these flows; they register them only once they run.
    with Queue(dsn) as queue:
        queue.enqueue_many("sleep", [{"seconds": 0.005} for _ in range(40_000)], run_id="nightly-import",
                           allow_unknown_flow=True)
        tick = 0
        while not stop.is_set():
            noop = int(500 + 350 * math.sin(tick / 9.0))
            queue.enqueue_many("noop", [{"feed": True}] * noop, allow_unknown_flow=True)
            queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3}] * 8, max_attempts=3,
                               allow_unknown_flow=True)
            documents = [{**doc, "document": f"doc-{tick:04d}-{n}"}
                         for n, doc in enumerate(sample_documents(DOCUMENTS_PER_TICK, seed=tick))]
            if tick == 10:
                documents.append({"document": "doc-empty", "text": ""})
            queue.enqueue_many("parse", documents, run_id="documents", seal=False, allow_unknown_flow=True)
            tick += 1
            stop.wait(0.5)


async def shoot(dsn: str, out: Path, seconds: float) -> list[Path]:
    """Attach at once and watch for `seconds`, so the 1-minute chart is all live ticks."""
    app = ConsoleApp(dsn, environment="dev", dsn_label="embedded PostgreSQL (engine dev)", refresh_interval=1.0)
    saved: list[Path] = []
    async with app.run_test(size=SIZE) as pilot:
        while not (app.feed_connected and app.snapshots > 0):
            await pilot.pause(0.1)
        app.window = 60
        await asyncio.sleep(seconds)
        saved.append(Path(app.save_screenshot("console-overview.svg", str(out))))
        await pilot.press("2")
        await pilot.pause(1.0)
        saved.append(Path(app.save_screenshot("console-failures.svg", str(out))))
        await pilot.press("3")
        await shown(pilot, DeadLettersScreen)
        await pilot.press("down", "space", "down", "down", "space")  # two selected, as before a retry
        await pilot.pause(0.5)
        saved.append(Path(app.save_screenshot("console-dead-letters.svg", str(out))))
        await pilot.press("4")
        await shown(pilot, JobsScreen)
        jobs = app.screen
        first = jobs.page
        await pilot.press("slash")
        jobs.query_one("#filter").value = "flow:flaky"  # every state at once: retrying, running, dead, completed
        await pilot.press("enter")
        while jobs.page is first:
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        saved.append(Path(app.save_screenshot("console-jobs.svg", str(out))))
        await pilot.press("5")
        await shown(pilot, RunningScreen)
        await pilot.press("slash")
        app.screen.query_one("#filter").value = "flow:long_job"  # the long ones, not the blur of no-ops
        await pilot.press("enter")
        await pilot.pause(1.5)
        saved.append(Path(app.save_screenshot("console-running.svg", str(out))))
        for key, view, name in (("6", SchedulesScreen, "schedules"), ("7", EnginesScreen, "engines"),
                                ("8", PipelinesScreen, "pipelines")):
            await pilot.press(key)
            await shown(pilot, view)
            saved.append(Path(app.save_screenshot(f"console-{name}.svg", str(out))))
    return saved


async def shown(pilot: Any, view: type[PagedScreen[Any, Any]]) -> None:
    """Until `view` is on screen with its page read, and a moment for the tables to size their columns."""
    while not (isinstance(pilot.app.screen, view) and pilot.app.screen.page is not None):
        await pilot.pause(0.1)
    await pilot.pause(0.5)


# The demo flows are served only by a config that names them (or `engine dev`).
FLOWS = """
[flows.noop]
[flows.flaky]
[flows.sleep]

[flows.long_job]
handler = "engine.examples.long_job:long_job"
concurrency_per_worker = 8

[flows.parse]
handler = "engine.examples.pipeline.flow:parse"
next = "chunk"
batch_size = 20
max_attempts = 3
permanent_errors = ["EmptyDocument"]

[flows.chunk]
handler = "engine.examples.pipeline.flow:chunk"
next = "embed"
batch_size = 20

[flows.embed]
handler = "engine.examples.pipeline.flow:embed"
transactional = true
batch_size = 10
rate_limit = "50/s"
"""


def add_long_jobs(dsn: str) -> None:
    """Long jobs started at different times, each reporting progress at its own pace."""
    with Queue(dsn) as queue:
        for i, (steps, pause, what, delay) in enumerate([(600, 1.0, "page", 0), (2400, 0.25, "row batch", 5),
                                                         (900, 1.0, "chunk", 20), (1200, 0.5, "file", 35),
                                                         (300, 2.0, "report", 50)]):
            queue.enqueue("long_job", {"steps": steps, "pause": pause, "what": what, "i": i}, delay=delay,
                          run_id="nightly-export", allow_unknown_flow=True)


def add_schedules(dsn: str) -> None:
    """Schedules the engines fire during the demo, one of them paused."""
    with Queue(dsn) as queue:
        queue.add_schedule("heartbeat", "noop", every=5, payload={"ping": True}, known_flows=["noop"])
        queue.add_schedule("flaky-probe", "flaky", every=15, payload={"fail": 0.5}, known_flows=["flaky"])
        queue.add_schedule("nightly-import", "sleep", cron="0 3 * * *", timezone="Europe/Riga",
                           payload={"seconds": 0.005}, known_flows=["sleep"])
        queue.add_schedule("weekly-cleanup", "noop", cron="@weekly", known_flows=["noop"])
        queue.pause_schedule("weekly-cleanup")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m console.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this database instead of a throwaway embedded one")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--seconds", type=float, default=75.0, help="demo load before the screenshots")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = None
    server = None
    dsn = args.dsn
    if dsn is None:
        base = make_temp_dir("skiplock-shots-")
        server = EmbeddedPostgres(base / "data").start()
        dsn = server.dsn()
    engines: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    try:
        with db.connect(dsn) as conn:
            migrate(conn)
            create_embeddings_table(conn)
        add_schedules(dsn)
        add_long_jobs(dsn)
        feeder = threading.Thread(target=feed, args=(dsn, stop), daemon=True)
        feeder.start()
        log = open((base or Path("/tmp")) / "screenshots-engine.log", "wb")
        env = {**os.environ, "SKIPLOCK_DSN": dsn}
        config = (base or Path("/tmp")) / "screenshots-flows.toml"
        config.write_text(FLOWS)
        # Four engines, as a fleet would have: the slow run, the long jobs and the pipeline on their own.
        engines = [subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config), "--workers",
                                     str(workers), "--flows", flows], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO)
                   for workers, flows in ((2, "noop,flaky"), (1, "sleep"), (1, "long_job"), (1, "parse,chunk,embed"))]
        print(f"demo load for {args.seconds:.0f} s, the console attached ...", flush=True)
        for path in asyncio.run(shoot(dsn, args.out, args.seconds)):
            print(f"wrote {path}")
    finally:
        stop.set()
        for engine in engines:
            if engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
        for engine in engines:
            engine.wait(60)
        if server is not None:
            server.stop()
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

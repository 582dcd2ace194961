"""`engine dev`: a first try with nothing installed but the package.

Starts the embedded PostgreSQL (a child of this process), migrates, enqueues demo jobs for the
built-in flows (including ones that retry and ones that end as dead letters), runs an engine on
them while feeding a steady load, and opens the ops console on it (on a terminal; with --no-console,
or when stdout is not a terminal, it prints the queue status every 5 s instead). Quitting the console,
Ctrl-C or --seconds stops everything in order: the engine drains, then the database stops.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from engine import db
from engine.config import BUILTIN_FLOW_NAMES, Settings, load_settings
from engine.embedded import EmbeddedPostgres, default_data_dir, forget_dev_cluster, record_dev_cluster
from engine.migrate import migrate
from engine.queue import Queue
from engine.report import print_status
from engine.supervisor import EngineOptions, run_engine

DEMO_FEED_PER_SECOND = 200
DEMO_FLOWS = ",".join(BUILTIN_FLOW_NAMES)

# Runs the console on the terminal until it quits: (dsn, settings, quit after seconds or None).
# Given by the composition point (engine/cli.py), so this module never imports the console.
ConsoleOpener = Callable[[str, Settings, float | None], None]


@dataclass(frozen=True)
class DevOptions:
    config: Path | None = None
    env: str | None = None
    dsn: str | None = None
    data_dir: Path | None = None  # None: default_data_dir()
    jobs: int = 2000  # demo jobs to enqueue
    no_engine: bool = False
    workers: int = 2
    seconds: float | None = None  # stop after this long; None: until Ctrl-C
    no_console: bool = False
    example: str | None = None  # an example flow instead of the demo load: "survey"


def enqueue_demo(queue: Queue, jobs: int) -> None:
    # The demo's own engine serves these flows, but it registers them only once it starts.
    queue.enqueue_many("noop", [{"n": i} for i in range(jobs)], run_id=f"demo-{int(time.time())}",
                       allow_unknown_flow=True)
    queue.enqueue_many("sleep", [{"seconds": 0.02} for _ in range(max(jobs // 20, 1))], allow_unknown_flow=True)
    queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3} for _ in range(max(jobs // 10, 1))],
                       max_attempts=3, allow_unknown_flow=True)


def _engine_child(settings: Settings, options: EngineOptions, log_path: str | None) -> None:
    os.setpgrp()  # our Ctrl-C handling forwards SIGTERM; the engine must not get the terminal's SIGINT too
    if log_path is not None:  # the console owns the terminal: the engine logs to a file
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # may quote job data
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    sys.exit(run_engine(settings, options))


def start_engine_process(settings: Settings, options: EngineOptions, *, log_path: str | None = None) -> BaseProcess:
    """`engine run` in a forked child of this process (which owns the embedded database)."""
    engine = multiprocessing.get_context("fork").Process(target=_engine_child, args=(settings, options, log_path),
                                                         name="skiplock-engine")
    engine.start()
    return engine


def stop_requested_by_signals() -> dict[str, bool]:
    """Ctrl-C and SIGTERM set the returned flag instead of interrupting; the caller stops in order."""
    stop = {"requested": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def stop_engine(engine: BaseProcess) -> int:
    """SIGTERM (the engine drains), wait, and its exit code."""
    if engine.is_alive():
        os.kill(engine.pid, signal.SIGTERM)  # type: ignore[arg-type]
    engine.join()
    return 0 if engine.exitcode in (0, None) else int(engine.exitcode)


def database_for(dsn: str | None, data_dir: Path) -> tuple[EmbeddedPostgres | None, str]:
    """The configured database, or else an embedded server started in `data_dir` (the caller stops it)."""
    if dsn is not None:
        return None, dsn
    print(f"starting embedded PostgreSQL in {data_dir} ...", flush=True)
    server = EmbeddedPostgres(data_dir).start()
    record_dev_cluster(server)
    return server, server.dsn()


def stop_database(server: EmbeddedPostgres | None) -> None:
    """Stop what database_for started, and stop naming it as the running dev cluster."""
    if server is not None:
        forget_dev_cluster(server)
        server.stop()


def print_status_of(settings: Settings, flow: str | None = None) -> None:
    assert settings.dsn is not None
    with Queue(settings.dsn, application_name=f"{settings.application_name}-cli") as queue:
        print_status(queue, flow=flow)


def run_dev(options: DevOptions, open_console: ConsoleOpener | None = None) -> int:
    """`open_console`: None runs without the console (as --no-console)."""
    if options.example:  # `engine dev --example survey`: an example flow instead of the demo
        import importlib

        return int(importlib.import_module(f"engine.examples.{options.example}.dev").run_example(options, open_console))
    settings = load_settings(options.config, env=options.env, dsn=options.dsn, builtin_flows=True)
    server, dsn = database_for(settings.dsn, options.data_dir or default_data_dir())
    try:
        with db.connect(dsn) as conn:
            applied = migrate(conn)
        print(f"schema migrated ({len(applied)} migration(s) applied)", flush=True)
        with Queue(dsn) as queue:
            enqueue_demo(queue, options.jobs)
        print("enqueued demo jobs to noop, sleep and flaky", flush=True)
        settings = dataclasses.replace(settings, dsn=dsn)
        if options.no_engine:
            print_status_of(settings)
            return 0
        return _run_with_engine(settings, options, open_console)
    finally:
        stop_database(server)


def _run_with_engine(settings: Settings, options: DevOptions, open_console: ConsoleOpener | None) -> int:
    if open_console is not None and _console_wanted(options):
        return _run_with_console(settings, options, open_console)
    assert settings.dsn is not None
    dsn = settings.dsn
    # The engine's logs go to a file here too: on stdout they would interleave with the status tables.
    log_path = _log_path(options)
    engine = start_engine_process(settings, EngineOptions(workers=options.workers, flows=DEMO_FLOWS),
                                  log_path=log_path)
    stop = stop_requested_by_signals()
    deadline = time.monotonic() + options.seconds if options.seconds else None
    print(f"engine running; Ctrl-C stops (status every 5 s; the engine's log: {log_path})", flush=True)
    with Queue(dsn) as queue:
        next_status = time.monotonic() + 5.0
        while not stop["requested"] and engine.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                break
            queue.enqueue_many("noop", [{"feed": True}] * (DEMO_FEED_PER_SECOND // 2), allow_unknown_flow=True)
            queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3}] * 5, max_attempts=3,
                                       allow_unknown_flow=True)
            time.sleep(0.5)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 5.0
                print_status(queue)
                print(flush=True)
    code = stop_engine(engine)
    print_status_of(settings)
    return code


# ---------------------------------------------------------------------------------------------
# With the console


def _log_path(options: DevOptions) -> str:
    return str((options.data_dir or default_data_dir()).parent / "engine-dev.log")


def _console_wanted(options: DevOptions) -> bool:
    return not options.no_console and sys.stdin.isatty() and sys.stdout.isatty()


def _feed_demo_load(dsn: str, stop: threading.Event) -> None:
    """The steady demo load (as the loop above), from a thread while the console owns the terminal."""
    while not stop.is_set():
        try:
            with Queue(dsn) as queue:
                while not stop.is_set():
                    queue.enqueue_many("noop", [{"feed": True}] * (DEMO_FEED_PER_SECOND // 2), allow_unknown_flow=True)
                    queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3}] * 5, max_attempts=3,
                                       allow_unknown_flow=True)
                    stop.wait(0.5)
        except Exception:  # the database may be restarting: the console shows it; try again
            stop.wait(1.0)


def _run_with_console(settings: Settings, options: DevOptions, open_console: ConsoleOpener) -> int:
    assert settings.dsn is not None
    dsn = settings.dsn
    log_path = _log_path(options)
    engine = start_engine_process(settings, EngineOptions(workers=options.workers, flows=DEMO_FLOWS),
                                  log_path=log_path)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed_demo_load, args=(dsn, stop), name="skiplock-demo-feed", daemon=True)
    feeder.start()
    try:
        open_console(dsn, settings, options.seconds)
    finally:
        stop.set()
        print(f"stopping: the engine drains (its log: {log_path}), then the database stops", flush=True)
        code = stop_engine(engine)
        feeder.join(timeout=5)
    print_status_of(settings)
    return code

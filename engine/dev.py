"""`engine dev`: a first try with nothing installed but the package.

Starts the embedded PostgreSQL (a child of this process), migrates, enqueues demo jobs for the
built-in flows (including ones that retry and ones that end as dead letters), runs an engine on
them while feeding a steady load, and opens the ops console on it (on a terminal; with --no-console,
or when stdout is not a terminal, it prints the queue status every 5 s instead). Quitting the console,
Ctrl-C or --seconds stops everything in order: the engine drains, then the database stops.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from engine import db
from engine.cli import cmd_status
from engine.config import load_settings
from engine.embedded import EmbeddedPostgres, default_data_dir
from engine.migrate import migrate
from engine.queue import Queue

DEMO_FEED_PER_SECOND = 200
DEMO_FLOWS = "noop,sleep,flaky"


def enqueue_demo(queue: Queue, jobs: int) -> None:
    queue.enqueue_many("noop", [{"n": i} for i in range(jobs)], run_id=f"demo-{int(time.time())}")
    queue.enqueue_many("sleep", [{"seconds": 0.02} for _ in range(max(jobs // 20, 1))])
    queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3} for _ in range(max(jobs // 10, 1))],
                       max_attempts=3)


def _engine_child(engine_args: argparse.Namespace, log_path: str | None) -> None:
    from engine.supervisor import run_engine

    os.setpgrp()  # our Ctrl-C handling forwards SIGTERM; the engine must not get the terminal's SIGINT too
    if log_path is not None:  # the console owns the terminal: the engine logs to a file
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    sys.exit(run_engine(engine_args))


def start_engine_process(dsn: str, args: argparse.Namespace, *, flows: str, drain: bool = False,
                         config: Any = None, log_path: str | None = None) -> BaseProcess:
    """`engine run` in a forked child of this process (which owns the embedded database)."""
    engine_args = argparse.Namespace(config=config if config is not None else args.config, env=args.env, dsn=dsn,
                                     workers=args.workers, flows=flows, drain=drain)
    engine = multiprocessing.get_context("fork").Process(target=_engine_child, args=(engine_args, log_path),
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
    return server, server.dsn()


def run_dev(args: argparse.Namespace) -> int:
    if getattr(args, "example", None):  # `engine dev --example survey`: an example flow instead of the demo
        import importlib

        return int(importlib.import_module(f"engine.examples.{args.example}.dev").run_example(args))
    settings = load_settings(args.config, env=args.env, dsn=args.dsn)
    server, dsn = database_for(settings.dsn, args.data_dir or default_data_dir())
    try:
        with db.connect(dsn) as conn:
            applied = migrate(conn)
        print(f"schema migrated ({len(applied)} migration(s) applied)", flush=True)
        with Queue(dsn) as queue:
            enqueue_demo(queue, args.jobs)
        print("enqueued demo jobs to noop, sleep and flaky", flush=True)
        status_args = argparse.Namespace(config=args.config, env=args.env, dsn=dsn, flow=None, json=False)
        if args.no_engine:
            cmd_status(status_args)
            return 0
        return _run_with_engine(dsn, args, status_args)
    finally:
        if server is not None:
            server.stop()


def _run_with_engine(dsn: str, args: argparse.Namespace, status_args: argparse.Namespace) -> int:
    if _console_wanted(args):
        return _run_with_console(dsn, args, status_args)
    engine = start_engine_process(dsn, args, flows=DEMO_FLOWS)
    stop = stop_requested_by_signals()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    print("engine running; Ctrl-C stops (status every 5 s)", flush=True)
    with Queue(dsn) as queue:
        next_status = time.monotonic() + 5.0
        while not stop["requested"] and engine.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                break
            queue.enqueue_many("noop", [{"feed": True}] * (DEMO_FEED_PER_SECOND // 2))
            queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3}] * 5, max_attempts=3)
            time.sleep(0.5)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 5.0
                cmd_status(status_args)
                print(flush=True)
    code = stop_engine(engine)
    cmd_status(status_args)
    return code


# ---------------------------------------------------------------------------------------------
# With the console


def _console_wanted(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_console", False) and sys.stdin.isatty() and sys.stdout.isatty()


def _feed_demo_load(dsn: str, stop: threading.Event) -> None:
    """The steady demo load (as the loop above), from a thread while the console owns the terminal."""
    while not stop.is_set():
        try:
            with Queue(dsn) as queue:
                while not stop.is_set():
                    queue.enqueue_many("noop", [{"feed": True}] * (DEMO_FEED_PER_SECOND // 2))
                    queue.enqueue_many("flaky", [{"fail": 0.3, "permanent": 0.3}] * 5, max_attempts=3)
                    stop.wait(0.5)
        except Exception:  # the database may be restarting: the console shows it; try again
            stop.wait(1.0)


def _run_with_console(dsn: str, args: argparse.Namespace, status_args: argparse.Namespace) -> int:
    from console.app import ConsoleApp  # lazily: engine/ never imports the TUI at module level

    settings = load_settings(args.config, env=args.env, dsn=args.dsn)
    log_path = str((args.data_dir or default_data_dir()).parent / "engine-dev.log")
    engine = start_engine_process(dsn, args, flows=DEMO_FLOWS, log_path=log_path)
    stop = threading.Event()
    feeder = threading.Thread(target=_feed_demo_load, args=(dsn, stop), name="skiplock-demo-feed", daemon=True)
    feeder.start()
    app = ConsoleApp(dsn, environment=settings.env or "dev (embedded)",
                     refresh_interval=settings.console.refresh_interval, stale_after=settings.engine.stale_after,
                     quit_after=args.seconds)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: app.exit())
    try:
        app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        print(f"stopping: the engine drains (its log: {log_path}), then the database stops", flush=True)
        code = stop_engine(engine)
        feeder.join(timeout=5)
    cmd_status(status_args)
    return code

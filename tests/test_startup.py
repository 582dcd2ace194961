"""Fast start (issue 12 item 7): what `engine run --drain` loads and does before it can exit.

Timing lives in bench/test_startup.py; here the causes, which cannot flake on a loaded machine: the
empty drain imports none of the modules only workers, metrics or other commands need, and forks no
worker; a drain with work (or a schedule due at start) still runs it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from engine.cli import build_parser
from tests.support.cli import base_env, engine, ok
from tests.support.engines import rows, tail, wait_for
from tests.support.postgres import register_flows
from tests.support.proxy import TcpProxy, unix_socket_of

REPO = Path(__file__).resolve().parents[1]

# The drain path, in this process: engine.cli's main, then the supervisor's module table and the
# turns of its loop (its waits), printed where it ends the process (os._exit skips atexit). Its
# forked workers inherit the wrappers but exit without reporting.
DRAIN = """
import json, multiprocessing.connection, os, sys
supervisor, turns, real_wait, real_exit = os.getpid(), [0], multiprocessing.connection.wait, os._exit
def wait(*args, **kwargs):
    turns[0] += 1
    return real_wait(*args, **kwargs)
def report(code):
    if os.getpid() == supervisor:
        print(json.dumps({"modules": sorted(sys.modules), "turns": turns[0]}), flush=True)
    real_exit(code)
multiprocessing.connection.wait, os._exit = wait, report
from engine.cli import main
main(sys.argv[1:])
"""

# Loaded only when needed: by the workers (forked only when there is work), with a metrics port, or
# by other commands.
NOT_ON_THE_EMPTY_DRAIN = (
    "engine.worker", "engine.worker.process", "engine.worker.executors", "engine.sources", "tenacity",
    "psycopg_pool", "engine.metrics", "prometheus_client", "http.server", "engine.explain", "textual",
    "console.cli", "engine.embedded", "engine.queue", "engine.health", "engine.pipelines",
)

CONFIG = """
[global]
log_format = "json"

[flows.quick]
handler = "engine.flows.builtin:noop"
"""


def drain(dsn: str, tmp_path: Path, config: str = CONFIG, *options: str) -> tuple[set[str], list[dict], int]:
    """`engine run --drain` of `config`: the supervisor's modules, the log, the supervisor's loop turns."""
    path = tmp_path / "config.toml"
    path.write_text(config)
    result = subprocess.run([sys.executable, "-c", DRAIN, "run", "--config", str(path), "--workers", "2", "--drain",
                             *options],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=base_env(SKIPLOCK_DSN=dsn))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    report = json.loads(lines[-1])
    log = [json.loads(line) for line in result.stderr.splitlines() + lines[:-1] if line.startswith("{")]
    return set(report["modules"]), log, report["turns"]


@pytest.mark.parametrize("options", [(), ("--flows", "quick")], ids=["all-flows", "--flows"])
def test_empty_drain_loads_no_worker_metrics_or_console_module(dsn: str, tmp_path: Path,
                                                               options: tuple[str, ...]) -> None:
    register_flows(dsn, "quick")
    modules, log, _ = drain(dsn, tmp_path, CONFIG, *options)
    assert "engine.supervisor" in modules  # the drain path ran
    assert [m for m in NOT_ON_THE_EMPTY_DRAIN if m in modules] == []
    messages = [line["msg"] for line in log]
    assert "drain complete: nothing due or running, nothing scheduled for later" in messages, messages
    assert not any("worker started" in m for m in messages), messages  # nothing forked
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM skiplock.workers").fetchone() == (0,)
        assert conn.execute("SELECT state, exit_code FROM skiplock.engines").fetchall() == [("stopped", 0)]


def test_empty_drain_opens_one_connection(dsn: str, tmp_path: Path) -> None:
    """The start's checks, the drain check and the stop's record share the supervisor's kept
    connection: a connection costs the server ~3 ms of CPU and the drain about as much wall time."""
    register_flows(dsn, "quick")
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        drain(proxy.dsn(dsn), tmp_path)
        assert proxy.connections_accepted == 1
    with psycopg.connect(dsn, autocommit=True) as conn:  # and it did record the stop
        assert conn.execute("SELECT state, exit_code FROM skiplock.engines").fetchall() == [("stopped", 0)]


def test_stop_is_recorded_when_the_kept_connection_died_unnoticed(dsn: str, start_engine) -> None:
    """Every connection is cut and the proxy takes new ones again just before SIGTERM: the kept
    connection is dead before any statement noticed, and the stop is recorded on a new one."""
    register_flows(dsn, "quick")
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        engine = start_engine(proxy.dsn(dsn), CONFIG, "--workers", "1")
        wait_for(lambda: rows(dsn, "SELECT count(*) FROM skiplock.workers WHERE state <> 'stopped'") == [(1,)], 30,
                 message="the worker to register")
        proxy.cut()
        proxy.restore()
        engine.signal(signal.SIGTERM)
        assert engine.wait(30) == 0, tail(engine)
    assert rows(dsn, "SELECT state, exit_code FROM skiplock.engines") == [("stopped", 0)], tail(engine)


def test_drain_with_jobs_forks_workers_and_runs_them(dsn: str, tmp_path: Path) -> None:
    register_flows(dsn, "quick")
    ok(engine("enqueue", "quick", "--payload", "{}", "--count", "3", dsn=dsn))
    modules, _, _ = drain(dsn, tmp_path)
    assert "engine.worker.process" in modules  # imported in the supervisor before its fork
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'quick'").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM skiplock.workers").fetchone() == (2,)


def test_drain_waits_while_a_worker_is_busy(dsn: str, tmp_path: Path) -> None:
    """While a job runs, the drain's supervisor waits for the workers' reports and its timed duties:
    a deadline left in the past once made its wait return at once, a core spun for the whole drain,
    and the workers it shares the machine with drained at two thirds of their speed."""
    register_flows(dsn, "slow")
    ok(engine("enqueue", "slow", "--payload", '{"seconds": 3}', dsn=dsn))
    _, _, turns = drain(dsn, tmp_path, CONFIG + '\n[flows.slow]\nhandler = "engine.flows.builtin:sleep"\n')
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'slow'").fetchone() == (1,)
    # Its duties over 3 s: a schedule pass a second, rescue passes, a drain look every 0.5 s, the
    # worker's start and idle reports: tens of turns. The spin made hundreds of thousands.
    assert turns < 100, turns


def test_schedule_due_at_start_fires_and_its_job_runs(dsn: str, tmp_path: Path) -> None:
    """The start's schedule pass comes before the check that may skip the workers: a tick due at start
    enqueues a job, so the drain has work and runs it."""
    register_flows(dsn, "quick")
    config = CONFIG + '\n[schedules.tick]\nflow = "quick"\nevery = "1h"\n'
    drain(dsn, tmp_path, config)  # declares the schedule; its first tick is an hour away
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM skiplock.jobs_done").fetchone() == (0,)
        # its tick of this hour is due, and the last pass was just now (no downtime to catch up on)
        conn.execute("UPDATE skiplock.schedules SET next_at = date_trunc('hour', now()), "
                     "checked_at = now() - interval '1 second' WHERE name = 'tick'")
    modules, _, _ = drain(dsn, tmp_path, config)
    assert "engine.worker.process" in modules
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'quick'").fetchone() == (1,)


def _helps(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Every (sub)command's --help text, by its words ("dlq", "list")."""
    helps = {path: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helps |= _helps(sub, path + (name,))
    return helps


def test_parser_built_for_one_command_helps_as_the_full_one() -> None:
    """main builds only the typed command's arguments: its help, the others' names and the top-level
    help must read as when every command is built."""
    full = _helps(build_parser())
    for command in {path[0] for path in full if path}:
        built = _helps(build_parser([command, "--help"]))
        assert built[()] == full[()]
        assert {p: h for p, h in built.items() if p[:1] == (command,)} == \
            {p: h for p, h in full.items() if p[:1] == (command,)}, command

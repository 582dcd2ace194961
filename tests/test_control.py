"""The control plane: `engine engines|scale|drain|stop` against real `engine run` processes.

Commands are rows plus a NOTIFY wake-up; each test reads the outcome the engine wrote back, the
workers it really runs (the workers table and its process tree), and what happened to the jobs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import psycopg
import pytest

from engine import db, store
from engine.control import EngineGone, send_command
from engine.errors import ValidationError
from engine.queue import Queue
from support.cli import engine, ok, one_line_error
from support.engines import BASE, rows, wait_for
from support.handlers import read_records
from support.postgres import register_flows

SLOW = BASE + """
[flows.slow]
handler = "support.handlers:record_slow"
batch_size = 5
"""


def live_workers(dsn: str, engine_id: str) -> int:
    return rows(dsn, "SELECT count(*) FROM skiplock.workers WHERE engine_id = %s AND state NOT IN ('stopped', "
                     "'lost')", (engine_id,))[0][0]


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def started(dsn: str, proc) -> str:
    """The engine's id once its row and its workers are there."""
    engine_id = wait_for(lambda: (rows(dsn, "SELECT id FROM skiplock.engines WHERE pid = %s", (proc.process.pid,))
                                  or [[None]])[0][0], 20, message="the engine's row")
    return engine_id


def enqueue(dsn: str, count: int, sleep: float) -> None:
    register_flows(dsn, "slow")
    with Queue(dsn) as q:
        q.enqueue_many("slow", [{"n": i, "sleep": sleep} for i in range(count)])


def test_scale_2_4_1_then_drain_from_the_cli(dsn, start_engine, tmp_path):
    record = tmp_path / "records"
    enqueue(dsn, 400, 0.05)
    proc = start_engine(dsn, SLOW, "--workers", "2", env={"SKIPLOCK_TEST_RECORD": str(record)})
    engine_id = started(dsn, proc)
    wait_for(lambda: live_workers(dsn, engine_id) == 2, 20, message="2 workers")

    listed = json.loads(ok(engine("engines", "--json", dsn=dsn)))
    assert [(e["id"], e["state"], e["workers"], e["flows"]) for e in listed] == [(engine_id, "running", 2, ["slow"])]
    table = ok(engine("engines", dsn=dsn))
    assert engine_id[:12] in table and "running" in table

    out = ok(engine("scale", engine_id[:8], "--workers", "4", dsn=dsn))
    assert out == f"engine {engine_id[:12]}: scaled from 2 to 4 worker(s)\n"
    wait_for(lambda: live_workers(dsn, engine_id) == 4 and len(children(proc.process.pid)) == 4, 20,
             message="4 workers")

    out = ok(engine("scale", engine_id, "--workers", "1", dsn=dsn))
    assert out == f"engine {engine_id[:12]}: scaled from 4 to 1 worker(s)\n"
    # Acknowledged once the three have exited: no waiting here.
    assert live_workers(dsn, engine_id) == 1 and len(children(proc.process.pid)) == 1
    assert rows(dsn, "SELECT workers FROM skiplock.engines WHERE id = %s", (engine_id,))[0][0] in (1, 4)

    out = ok(engine("drain", engine_id, dsn=dsn))
    assert out.startswith(f"engine {engine_id[:12]}: draining: 1 worker(s) finish the jobs they hold")
    assert proc.wait(30) == 0
    assert rows(dsn, "SELECT state, exit_code, workers FROM skiplock.engines WHERE id = %s", (engine_id,)) == [
        ("stopped", 0, 0)]
    # Scaling down and draining lost nothing and ran nothing twice: what ran completed, the rest waits.
    assert rows(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'running'") == [(0,)]
    ran = [n for n, _ in read_records(str(record))]
    assert len(ran) == len(set(ran))
    done = rows(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE status = 'completed'")[0][0]
    pending = rows(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'pending'")[0][0]
    assert done == len(ran) and done + pending == 400
    # A stopped engine refuses, and says so in one line.
    result = engine("scale", engine_id, "--workers", "2", dsn=dsn)
    assert one_line_error(result, 4) == f"engine: error: engine {engine_id[:12]} has stopped: command refused\n"


def test_stop_kills_the_workers_and_hands_their_jobs_back(dsn, start_engine, tmp_path):
    register_flows(dsn, "slow")
    with Queue(dsn) as q:
        q.enqueue_many("slow", [{"n": i, "sleep": 60} for i in range(4)])
    proc = start_engine(dsn, SLOW, "--workers", "2", env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "r")})
    engine_id = started(dsn, proc)
    wait_for(lambda: rows(dsn, "SELECT count(*) FROM skiplock.jobs WHERE status = 'running'")[0][0] == 4, 20,
             message="the jobs running")
    began = time.monotonic()
    out = ok(engine("stop", engine_id, dsn=dsn))
    assert "stopping: 2 worker(s) killed now" in out
    assert proc.wait(20) == 0
    assert time.monotonic() - began < 10  # not the jobs' 60 s, nor the grace period
    assert rows(dsn, "SELECT status::text, count(*) FROM skiplock.jobs GROUP BY 1") == [("pending", 4)]
    assert rows(dsn, "SELECT state FROM skiplock.engines WHERE id = %s", (engine_id,)) == [("stopped",)]


def test_commands_to_an_engine_that_died_are_refused(dsn, start_engine, tmp_path):
    proc = start_engine(dsn, SLOW, "--workers", "1", env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "r")})
    engine_id = started(dsn, proc)
    wait_for(lambda: live_workers(dsn, engine_id) == 1, 20, message="the worker")
    os.kill(proc.process.pid, signal.SIGKILL)  # no row update: only the heartbeat's silence tells
    proc.wait(10)
    wait_for(lambda: json.loads(ok(engine("engines", "--json", dsn=dsn)))[0]["state"] == "gone", 20,
             interval=0.5, message="the engine shown as gone")
    for args in (("scale", engine_id, "--workers", "2"), ("drain", engine_id[:6]), ("stop", engine_id)):
        line = one_line_error(engine(*args, dsn=dsn), 4)
        assert line.startswith(f"engine: error: engine {engine_id[:12]} is gone (no heartbeat for ")
    assert rows(dsn, "SELECT count(*) FROM skiplock.engine_commands") == [(0,)]


def test_bad_input_is_one_line(dsn):
    with db.connect(dsn) as conn:
        store.engine_register(conn, "ab" * 16, "h", 1, "0", 1, 30.0, [])
        store.engine_register(conn, "ab" * 15 + "cd", "h", 2, "0", 1, 30.0, [])
        for args, kwargs, text in (
                (("ab" * 16, "scale", 0), {}, "--workers 0 must be an integer from 1 to 1024"),
                (("ab" * 16, "scale", 1025), {}, "--workers 1025 must be an integer from 1 to 1024"),
                (("ab" * 16, "drain", 2), {}, "--workers goes with scale, not drain"),
                (("cdcdcdcd", "drain"), {}, "no engine 'cdcdcdcd'"),
                (("x;DROP", "stop"), {}, "must be an engine id or a prefix of one"),
                (("ab" * 16, "scale", 2), {"timeout": 0}, "--timeout 0 must be more than 0")):
            with pytest.raises(ValidationError, match=re.escape(text)):
                send_command(conn, *args, **kwargs)
    # The same checks through the command line: one line, exit 2.
    for args, text in ((("scale", "ab" * 16, "--workers", "0"), "--workers 0 must be an integer from 1 to 1024"),
                       (("drain", "abab"), "ENGINE 'abab' is ambiguous")):
        assert text in one_line_error(engine(*args, dsn=dsn)), args
    assert ok(engine("scale", "--help")).startswith("usage: engine scale")
    assert rows(dsn, "SELECT count(*) FROM skiplock.engine_commands") == [(0,)]


def test_an_unacknowledged_command_times_out_and_is_withdrawn(dsn):
    with db.connect(dsn) as conn:  # a row that heartbeats nowhere: registered, never answering
        store.engine_register(conn, "ef" * 16, "h", 1, "0", 1, 30.0, [])
    result = engine("scale", "efef", "--workers", "3", "--timeout", "0.5s", dsn=dsn)
    assert "did not acknowledge scale within 0.5s; the command was withdrawn" in one_line_error(result, 3)
    assert rows(dsn, "SELECT ok, outcome FROM skiplock.engine_commands") == [
        (False, "withdrawn: no acknowledgement within the timeout")]


def test_a_command_whose_notify_was_missed_still_runs(dsn, start_engine, tmp_path):
    proc = start_engine(dsn, SLOW, "--workers", "1", env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "r")})
    engine_id = started(dsn, proc)
    wait_for(lambda: live_workers(dsn, engine_id) == 1, 20, message="the worker")
    with db.connect(dsn) as conn:
        result = send_command(conn, engine_id, "scale", 3, timeout=10, notify=False)  # the row, no NOTIFY
        assert result.outcome == "scaled from 1 to 3 worker(s)"
        wait_for(lambda: live_workers(dsn, engine_id) == 3, 20, message="3 workers")
        # Stopped: every later command is refused before anything is sent.
        send_command(conn, engine_id, "drain", timeout=10)
        assert proc.wait(30) == 0
        with pytest.raises(EngineGone, match="has stopped"):
            send_command(conn, engine_id, "stop")


def test_idle_engine_holds_one_connection_per_worker_and_wakes_on_enqueue(dsn, start_engine, tmp_path):
    """Workers LISTEN through the supervisor's one connection (it relays enqueue wake-ups): an idle
    engine of W workers holds W + 3 connections (each worker's pool, the supervisor's heartbeat, its
    listener and its schedule pass's), and an enqueue still wakes an idle worker at once, not after poll_interval."""
    config = SLOW.replace('poll_interval = "0.5s"', 'poll_interval = "60s"')
    proc = start_engine(dsn, config, "--workers", "3", env={"SKIPLOCK_TEST_RECORD": str(tmp_path / "r")})
    engine_id = started(dsn, proc)
    wait_for(lambda: live_workers(dsn, engine_id) == 3, 20, message="3 workers")
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]

    def held() -> dict[str, int]:
        return dict(rows(dsn, "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s "
                              "AND application_name IN ('skiplock-worker', 'skiplock-supervisor') GROUP BY 1",
                         (dbname,)))

    time.sleep(1.0)  # past start-up: the supervisor's short-lived connections are closed
    assert wait_for(lambda: held() == {"skiplock-worker": 3, "skiplock-supervisor": 3}, 10,
                    message=f"3 + 3 connections, not {held()}")
    register_flows(dsn, "slow")
    with Queue(dsn) as q:
        q.enqueue("slow", {"n": 1, "sleep": 0})
        began = time.monotonic()
    wait_for(lambda: rows(dsn, "SELECT count(*) FROM skiplock.jobs_done")[0][0] == 1, 5, message="the job")
    assert time.monotonic() - began < 3.0

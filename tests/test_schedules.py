"""Schedules: the tick logic on a clock the test controls, the SQL path against the real PostgreSQL
(with next ticks set in the table, so nothing waits for a minute), and real engines firing a schedule
every second, two at once, through a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from engine import db, schedules, store
from engine.config import load_settings
from engine.errors import ConfigError, ValidationError
from engine.queue import Queue
from engine.schedules import Decision, ScheduleError, Timing, decide, parse_cron, tick_iso
from support.engines import wait_for
from support.postgres import scalar

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def rows(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()


def scheduled_jobs(dsn: str, flow: str) -> list[tuple[str, str | None]]:
    """(scheduled_at, dedupe key or None once archived) of every job of `flow`, live or completed."""
    return rows(dsn, """SELECT payload->>'scheduled_at', dedupe_key FROM skiplock.jobs WHERE flow = %s
                        UNION ALL SELECT payload->>'scheduled_at', NULL FROM skiplock.jobs_done WHERE flow = %s
                        ORDER BY 1""", (flow, flow))


# ---------------------------------------------------------------------------------------------
# Cron parsing and tick computation: pure functions, the clock is an argument


def test_cron_errors_name_the_field_and_its_position():
    with pytest.raises(ScheduleError, match=r"bad minute field '61' at position 1"):
        parse_cron("61 * * * *")
    with pytest.raises(ScheduleError, match=r"bad hour field '25' at position 6"):
        parse_cron("*/5  25 * * *")
    with pytest.raises(ScheduleError, match=r"bad day-of-week field 'MOX' at position 9"):
        parse_cron("0 0 * * MOX")
    with pytest.raises(ScheduleError, match=r"expected 5 fields .* got 6"):
        parse_cron("0 0 0 * * *")  # cronsim would read a seconds field: five fields only
    with pytest.raises(ScheduleError, match=r"unknown alias '@often' at position 1"):
        parse_cron("@often")
    assert parse_cron("@hourly") == "0 * * * *" and parse_cron("@DAILY") == "0 0 * * *"
    assert parse_cron(" */15 9-17 * * MON-FRI ") == "*/15 9-17 * * MON-FRI"


def test_cron_fires_on_the_minute():
    minutely = Timing("* * * * *", None)
    assert minutely.next_after(at("2026-12-01T11:59:59.900")) == at("2026-12-01T12:00:00")
    assert minutely.next_after(at("2026-12-01T12:00:00")) == at("2026-12-01T12:01:00")
    assert minutely.latest_at_or_before(at("2026-12-01T12:00:00")) == at("2026-12-01T12:00:00")
    next_at, checked = at("2026-12-01T12:00:00"), at("2026-12-01T11:59:59.500")
    # Just before the minute: nothing; a moment after it: exactly that tick, and the next is a minute on.
    assert decide(minutely, "last", next_at, checked, at("2026-12-01T11:59:59.999"), 30) == Decision([], next_at)
    assert decide(minutely, "last", next_at, checked, at("2026-12-01T12:00:00.300"), 30) == \
        Decision([next_at], at("2026-12-01T12:01:00"))
    # A new schedule starts at the first tick after now, without firing.
    assert decide(minutely, "last", None, None, at("2026-12-01T12:00:00.300"), 30) == \
        Decision([], at("2026-12-01T12:01:00"))


def test_late_pass_fires_every_tick_downtime_follows_catch_up():
    every = Timing(None, 1000)
    next_at = at("2026-12-01T12:00:00")
    now = at("2026-12-01T12:00:03.500")
    # The leader was 3.5 s late but looked within stale_after: no tick is lost.
    late = decide(every, "none", next_at, now - timedelta(seconds=4), now, 5)
    assert late.fire == [next_at + timedelta(seconds=k) for k in range(4)] and late.next_at == at("2026-12-01T12:00:04")
    # Nobody looked for longer than stale_after: the ticks were missed.
    down_last = decide(every, "last", next_at, now - timedelta(seconds=60), now, 5)
    assert down_last == Decision([at("2026-12-01T12:00:03")], at("2026-12-01T12:00:04"), skipped=3)
    down_none = decide(every, "none", next_at, now - timedelta(seconds=60), now, 5)
    assert down_none == Decision([], at("2026-12-01T12:00:04"), skipped=4)
    hourly = Timing("@hourly", None)
    down = decide(hourly, "last", at("2026-12-01T08:00:00"), at("2026-12-01T07:59:00"), at("2026-12-01T12:30:00"), 30)
    assert down == Decision([at("2026-12-01T12:00:00")], at("2026-12-01T13:00:00"), skipped=4)


def test_every_is_aligned_to_the_epoch_and_cron_follows_the_time_zone():
    ten = Timing(None, 10_000)
    assert ten.next_after(at("2026-12-01T12:00:03")) == at("2026-12-01T12:00:10")
    assert ten.next_after(at("2026-12-01T12:00:10")) == at("2026-12-01T12:00:20")
    riga = Timing("30 9 * * *", None, "Europe/Riga")  # UTC+2 in winter
    assert riga.next_after(at("2026-12-01T00:00:00")) == at("2026-12-01T07:30:00")
    # Spring forward in Riga (03:00 -> 04:00 on 2026-03-29): a 03:30 job fires once, at 04:00 local.
    dst = Timing("30 3 * * *", None, "Europe/Riga")
    assert dst.next_after(at("2026-03-28T12:00:00")) == at("2026-03-29T01:00:00")
    assert dst.next_after(at("2026-03-29T01:00:00")) == at("2026-03-30T00:30:00")
    assert tick_iso(at("2026-12-01T12:00:00")) == "2026-12-01T12:00:00Z"
    assert tick_iso(at("2026-12-01T12:00:00.250")) == "2026-12-01T12:00:00.250Z"


# ---------------------------------------------------------------------------------------------
# The SQL path: real statements, next ticks set in the table


def set_row(conn: psycopg.Connection, name: str, next_at: str, checked_at: str) -> None:
    """next_at / checked_at as SQL expressions on the database clock."""
    conn.execute(f"UPDATE skiplock.schedules SET next_at = {next_at}, checked_at = {checked_at} WHERE name = %s",
                 (name,))


def test_a_due_cron_tick_enqueues_one_job_with_its_time(queue: Queue, conn):
    queue.add_schedule("minutely", "noop", cron="* * * * *", payload={"report": "sales"}, known_flows=["noop"])
    conn.execute("UPDATE skiplock.schedules SET updated_at = date_trunc('minute', now())")
    added = scalar_conn(conn, "SELECT updated_at FROM skiplock.schedules")
    first = schedules.run_pass(conn, stale_after=30)
    assert first.leader and not first.fired  # a new schedule starts at the tick after it was added
    assert scalar_conn(conn, "SELECT next_at FROM skiplock.schedules") == added + timedelta(minutes=1)
    # The minute came: the tick is set in the table instead of waited for.
    set_row(conn, "minutely", "date_trunc('minute', now())", "now()")
    tick = scalar_conn(conn, "SELECT next_at FROM skiplock.schedules")
    assert schedules.run_pass(conn, stale_after=30).fired == {"minutely": 1}
    assert schedules.run_pass(conn, stale_after=30).fired == {}  # not twice
    job = conn.execute("SELECT id, flow, payload, dedupe_key FROM skiplock.jobs").fetchall()
    assert len(job) == 1
    job_id, flow, payload, key = job[0]
    assert flow == "noop" and payload == {"report": "sales", "scheduled_at": tick_iso(tick)}
    assert key == f"schedule:minutely:{tick_iso(tick)}"
    listed = queue.schedule("minutely")
    assert listed.next_at == tick + timedelta(minutes=1) and listed.last_tick_at == tick
    assert listed.last_job_id == job_id and listed.last_outcome == "pending" and listed.state == "active"


def test_a_tick_between_add_and_the_first_pass_fires(queue: Queue, conn, dsn):
    queue.add_schedule("s", "noop", every=5, known_flows=["noop"])
    tick = scalar_conn(conn, "SELECT to_timestamp(floor(extract(epoch FROM now()) / 5) * 5)")
    conn.execute("UPDATE skiplock.schedules SET updated_at = %s", (tick - timedelta(seconds=1),))
    assert schedules.run_pass(conn, stale_after=30).fired == {"s": 1}
    assert [r[0] for r in scheduled_jobs(dsn, "noop")] == [tick_iso(tick)]


def scalar_conn(conn: psycopg.Connection, sql: str):
    return conn.execute(sql).fetchone()[0]


def test_compare_and_set_refuses_a_second_fire_of_the_same_tick(queue: Queue, dsn):
    queue.add_schedule("s", "noop", every=5, known_flows=["noop"])
    with db.connect(dsn) as a, db.connect(dsn) as b:
        set_row(a, "s", "to_timestamp(floor(extract(epoch FROM now()) / 5) * 5)", "now()")
        expected = scalar_conn(a, "SELECT next_at FROM skiplock.schedules")
        iso = [tick_iso(expected)]
        following = expected + timedelta(seconds=5)
        # Two engines that both read next_at = expected (as if the lock were not there): one wins.
        result: list = []

        def race() -> None:
            with b.transaction():
                result.append(store.schedule_fire(b, "s", expected, iso, following, expected))

        with a.transaction():
            assert store.schedule_fire(a, "s", expected, iso, following, expected) == (True, 1)
            racer = threading.Thread(target=race)
            racer.start()
            time.sleep(0.3)  # b waits on the row lock a holds
            assert racer.is_alive()
        racer.join(10)
        assert result == [(False, 0)]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 1


def test_only_one_engine_runs_a_pass_at_a_time(queue: Queue, dsn):
    with db.connect(dsn) as a, db.connect(dsn) as b, a.transaction():
        assert store.schedule_leader(a)
        assert schedules.run_pass(b, stale_after=30) == schedules.PassResult(False)


@pytest.mark.parametrize("catch_up, expected", [("last", 1), ("none", 0)])
def test_after_downtime_catch_up_decides(queue: Queue, conn, dsn, catch_up, expected):
    queue.add_schedule("hourly", "noop", cron="@hourly", catch_up=catch_up, known_flows=["noop"])
    # Last looked at three hours ago, due since then: every engine was down.
    set_row(conn, "hourly", "date_trunc('hour', now()) - interval '3 hours'", "now() - interval '3 hours'")
    result = schedules.run_pass(conn, stale_after=30)
    assert result.skipped == {"hourly": 4 - expected}
    ticks = [r[0] for r in scheduled_jobs(dsn, "noop")]
    latest = scalar_conn(conn, "SELECT date_trunc('hour', now())")
    assert ticks == ([tick_iso(latest)] if expected else [])
    assert queue.schedule("hourly").next_at == latest + timedelta(hours=1)


def test_pause_resume_trigger_remove(queue: Queue, conn, dsn):
    queue.add_schedule("s", "noop", every=1, known_flows=["noop"])
    set_row(conn, "s", "to_timestamp(floor(extract(epoch FROM now())))", "now()")
    queue.pause_schedule("s")
    assert schedules.run_pass(conn, stale_after=30).fired == {}
    assert queue.schedule("s").state == "paused"
    job_id = queue.trigger_schedule("s")  # a paused schedule can still be run by hand
    job = queue.job(job_id)
    assert job is not None and job.dedupe_key.startswith("schedule:s:trigger:")
    assert job.payload["scheduled_at"] == job.dedupe_key.removeprefix("schedule:s:trigger:")
    assert queue.schedule("s").last_job_id == job_id
    queue.resume_schedule("s")
    assert schedules.run_pass(conn, stale_after=30).fired == {"s": 1}
    queue.remove_schedule("s")
    assert queue.schedules() == []
    for call in (queue.pause_schedule, queue.resume_schedule, queue.trigger_schedule, queue.remove_schedule,
                 queue.schedule):
        with pytest.raises(ValidationError, match=r"^unknown schedule 's' \(known: none\)$"):
            call("s")


def test_add_refuses_bad_input(queue: Queue):
    with pytest.raises(ValidationError, match=r"unknown flow 'nope' \(known: noop\)"):
        queue.add_schedule("s", "nope", cron="* * * * *", known_flows=["noop"])
    with pytest.raises(ValidationError, match=r"schedule 's': bad cron expression '\* 24 \* \* \*': bad hour field "
                                              r"'24' at position 3"):
        queue.add_schedule("s", "noop", cron="* 24 * * *", known_flows=["noop"])
    with pytest.raises(ValidationError, match="exactly one"):
        queue.add_schedule("s", "noop", cron="* * * * *", every=5, known_flows=["noop"])
    with pytest.raises(ValidationError, match="unknown time zone 'Nowhere/Else'"):
        queue.add_schedule("s", "noop", cron="* * * * *", timezone="Nowhere/Else", known_flows=["noop"])
    queue.add_schedule("s", "noop", every=5, known_flows=["noop"])
    with pytest.raises(ValidationError, match="already exists"):
        queue.add_schedule("s", "noop", every=5, known_flows=["noop"])


def test_config_upsert_keeps_the_operators_pause(queue: Queue, conn, tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('[flows.noop]\n[schedules.nightly]\nflow = "noop"\ncron = "0 3 * * *"\ntimezone = "Europe/Riga"\n'
                    'payload = { kind = "full" }\n')
    specs = [s.spec() for s in load_settings(path).schedules.values()]
    schedules.sync_config(conn, specs)
    schedules.run_pass(conn, stale_after=30)
    queue.pause_schedule("nightly")
    first_next = queue.schedule("nightly").next_at
    schedules.sync_config(conn, specs)  # an engine restarts: the pause stays, the next tick too
    row = queue.schedule("nightly")
    assert row.paused and row.source == "config" and row.next_at == first_next and row.payload == {"kind": "full"}
    path.write_text('[flows.noop]\n[schedules.nightly]\nflow = "noop"\ncron = "0 4 * * *"\nenabled = false\n')
    schedules.sync_config(conn, [s.spec() for s in load_settings(path).schedules.values()])
    row = queue.schedule("nightly")
    assert row.paused and not row.enabled and row.state == "paused" and row.cron == "0 4 * * *"
    assert row.next_at is None and row.timezone == "UTC"  # new timing: starts over from the next tick


def test_config_errors_name_the_file_and_key(tmp_path: Path):
    path = tmp_path / "config.toml"
    cases = {
        'cron = "*/5 * * * 8"': r"schedules\.x\.cron: bad cron expression '\*/5 \* \* \* 8': bad day-of-week field "
                                r"'8' at position 11",
        'every = "500ms"': r"schedules\.x\.every: period must be at least 1s",
        'cron = "* * * * *"\nevery = "5s"': r"schedules\.x needs exactly one of cron and every",
        'cron = "* * * * *"\ncatch_up = "all"': r"schedules\.x\.catch_up",
        'cron = "* * * * *"\npayload = 3': r"schedules\.x\.payload must be a table",
    }
    for body, message in cases.items():
        path.write_text(f'[schedules.x]\nflow = "noop"\n{body}\n')
        with pytest.raises(ConfigError, match=f"^{path}: {message}"):
            load_settings(path)
    path.write_text('[schedules.x]\nflow = "nope"\nevery = "5s"\n')
    with pytest.raises(ConfigError, match=rf'^{path}: schedules\.x\.flow names an unknown flow "nope"'):
        load_settings(path)


# ---------------------------------------------------------------------------------------------
# Real engines


ENGINES = """
[global]
heartbeat_interval = "1s"
stale_after = "5s"
rescue_interval = "1s"
poll_interval = "0.5s"
grace_period = "3s"

[flows.noop]

[schedules.tick]
flow = "noop"
every = "1s"
"""


def consecutive(ticks: list[datetime], step: float) -> list[list[datetime]]:
    """Split sorted ticks into runs `step` seconds apart."""
    runs: list[list[datetime]] = []
    for tick in ticks:
        if runs and (tick - runs[-1][-1]).total_seconds() == step:
            runs[-1].append(tick)
        else:
            runs.append([tick])
    return runs


def parse_ticks(values: list[tuple]) -> list[datetime]:
    return [datetime.fromisoformat(v[0].replace("Z", "+00:00")) for v in values]


@pytest.mark.slow
def test_two_engines_one_job_per_tick_through_a_leader_restart(dsn, start_engine):
    """Two engines fire a schedule every second for 20 s; one of them is killed outright and started
    again mid-way. Every tick from the first to the last is enqueued exactly once."""
    first = start_engine(dsn, ENGINES, "--workers", "1")
    start_engine(dsn, ENGINES, "--workers", "1")
    wait_for(lambda: scheduled_jobs(dsn, "noop"), 20, message="the first tick")
    started = time.monotonic()
    time.sleep(7)
    first.process.send_signal(signal.SIGKILL)
    first.wait(10)
    time.sleep(3)
    start_engine(dsn, ENGINES, "--workers", "1")
    time.sleep(max(0.0, 20 - (time.monotonic() - started)))
    ticks = parse_ticks(scheduled_jobs(dsn, "noop"))
    assert len(ticks) == len(set(ticks)), "a tick was enqueued twice"
    runs = consecutive(ticks, 1.0)
    assert len(runs) == 1, f"ticks skipped: runs {[(r[0], r[-1]) for r in runs]}"
    assert len(ticks) >= 19


@pytest.mark.slow
def test_restart_loses_at_most_what_catch_up_says(dsn, start_engine):
    """One engine, stopped for longer than stale_after: "last" enqueues the latest missed tick at the
    first pass after the restart, "none" only the tick after it; nothing before the stop is lost."""
    config = """
[global]
heartbeat_interval = "0.5s"
stale_after = "2s"
grace_period = "3s"

[flows.noop]
[flows.sleep]

[schedules.last]
flow = "noop"
every = "1s"
catch_up = "last"

[schedules.none]
flow = "sleep"
every = "1s"
catch_up = "none"
"""
    engine = start_engine(dsn, config, "--workers", "1")
    wait_for(lambda: len(scheduled_jobs(dsn, "noop")) >= 3, 20, message="three ticks")
    engine.signal(signal.SIGTERM)
    assert engine.wait(20) == 0
    stopped = scalar(dsn, "SELECT now()")
    time.sleep(5)
    restart = scalar(dsn, "SELECT now()")
    engine = start_engine(dsn, config, "--workers", "1")
    wait_for(lambda: len(scheduled_jobs(dsn, "noop")) >= 8, 30, message="ticks after the restart")
    engine.signal(signal.SIGTERM)
    assert engine.wait(20) == 0
    last_runs = consecutive(parse_ticks(scheduled_jobs(dsn, "noop")), 1.0)
    none_runs = consecutive(parse_ticks(scheduled_jobs(dsn, "sleep")), 1.0)
    for runs in (last_runs, none_runs):
        ticks = [t for run in runs for t in run]
        assert len(ticks) == len(set(ticks))
        assert len(runs) == 2, [(r[0], r[-1]) for r in runs]  # before the stop, after the restart
        assert runs[0][-1] <= stopped and runs[1][0] > restart - timedelta(seconds=1)
    assert last_runs[0][-1] == none_runs[0][-1]  # both fired until the stop
    # The first pass after the restart: "last" fires the latest missed tick, "none" waits for the next.
    assert last_runs[1][0] == none_runs[1][0] - timedelta(seconds=1)


# ---------------------------------------------------------------------------------------------
# The CLI contract, through real subprocesses

REPO = Path(__file__).resolve().parent.parent


def engine_cli(dsn: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["SKIPLOCK_DSN"] = dsn
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, input="", capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def ok_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0 and result.stderr == "", (result.returncode, result.stdout, result.stderr)
    return result.stdout


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def register_demo_flows(dsn: str) -> None:
    """The flows an engine would have registered: the CLI checks schedules against them."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO skiplock.flows (name) VALUES ('flaky'), ('noop'), ('sleep')")


def test_cli_schedule_commands(dsn):
    register_demo_flows(dsn)
    assert ok_line(engine_cli(dsn, "schedule", "add", "nightly", "--flow", "noop", "--cron", "0 3 * * *",
                              "--timezone", "Europe/Riga", "--payload", '{"kind": "full"}')) == \
        "added schedule nightly: cron 0 3 * * * -> noop\n"
    assert ok_line(engine_cli(dsn, "schedule", "add", "fast", "--flow", "sleep", "--every", "10s",
                              "--catch-up", "none")) == "added schedule fast: every 10s -> sleep\n"
    assert ok_line(engine_cli(dsn, "schedule", "pause", "fast")) == "paused schedule fast\n"
    listed = json.loads(ok_line(engine_cli(dsn, "schedule", "list", "--json")))
    assert [(s["name"], s["flow"], s["when"], s["state"], s["catch_up"], s["source"]) for s in listed] == [
        ("fast", "sleep", "every 10s", "paused", "none", "runtime"),
        ("nightly", "noop", "cron 0 3 * * *", "active", "last", "runtime")]
    assert listed[1]["payload"] == {"kind": "full"} and listed[1]["timezone"] == "Europe/Riga"
    lines = ok_line(engine_cli(dsn, "schedule", "list")).splitlines()
    assert lines[0].split() == ["name", "flow", "when", "timezone", "state", "next", "(UTC)", "last", "fired",
                                "(UTC)", "last", "job", "outcome", "source"]
    assert lines[1].split()[:6] == ["fast", "sleep", "every", "10s", "UTC", "paused"]
    assert ok_line(engine_cli(dsn, "schedule", "resume", "fast")) == "resumed schedule fast\n"
    assert scalar(dsn, "SELECT paused FROM skiplock.schedules WHERE name = 'fast'") is False
    out = ok_line(engine_cli(dsn, "schedule", "trigger", "nightly"))
    job_id = int(out.removeprefix("triggered schedule nightly: job ").strip())
    assert scalar(dsn, "SELECT payload->>'kind' FROM skiplock.jobs WHERE id = %s", (job_id,)) == "full"
    lines = ok_line(engine_cli(dsn, "schedule", "list")).splitlines()
    assert lines[2].split()[-3:] == [str(job_id), "pending", "runtime"]
    assert ok_line(engine_cli(dsn, "schedule", "remove", "fast")) == "removed schedule fast\n"
    assert scalar(dsn, "SELECT array_agg(name) FROM skiplock.schedules") == ["nightly"]
    for action in ("list", "add", "remove", "pause", "resume", "trigger"):
        assert action in ok_line(engine_cli(dsn, "schedule", "--help"))


def test_cli_schedule_bad_input(dsn):
    register_demo_flows(dsn)
    assert error_line(engine_cli(dsn, "schedule", "pause", "nope")) == \
        "engine: error: unknown schedule 'nope' (known: none)\n"
    assert error_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "noop", "--cron", "0 3 * 13 *")) == \
        "engine: error: schedule 's': bad cron expression '0 3 * 13 *': bad month field '13' at position 7\n"
    assert error_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "sigup", "--every", "5s")) == \
        "engine: error: schedule 's': unknown flow 'sigup' (known: flaky, noop, sleep)\n"
    assert error_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "noop")) == \
        "engine: error: give --cron EXPR or --every DURATION, exactly one\n"
    assert error_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "noop", "--every", "0.5s")) == \
        "engine: error: schedule 's': period must be at least 1s, got 0.5s\n"
    assert "invalid JSON" in error_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "noop", "--every", "5s",
                                                   "--payload", "{nope"))
    ok_line(engine_cli(dsn, "schedule", "add", "s", "--flow", "noop", "--every", "5s"))
    for action in ("trigger", "remove", "resume"):
        assert error_line(engine_cli(dsn, "schedule", action, "t")) == "engine: error: unknown schedule 't' (known: s)\n"
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0


def test_every_schedule_key_has_help_and_is_documented():
    import dataclasses

    from engine.config import ScheduleConfig

    docs = (REPO / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(ScheduleConfig):
        if "key" in f.metadata:
            assert f.metadata["key"].help, f.name
            assert f"| `{f.name}` |" in docs, f"{f.name} is not in docs/configuration.md"


def test_ticks_due_while_paused_follow_catch_up_on_resume(queue: Queue, conn, dsn):
    queue.add_schedule("s", "noop", every=1, catch_up="none", known_flows=["noop"])
    set_row(conn, "s", "to_timestamp(floor(extract(epoch FROM now()))) - interval '5 seconds'", "now()")
    queue.pause_schedule("s")
    queue.resume_schedule("s")  # paused for a moment only: the five due ticks were still missed
    result = schedules.run_pass(conn, stale_after=30)
    assert result.fired == {} and result.skipped["s"] >= 5
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0

"""The `engine` command, driven the way users' scripts drive it: a real subprocess per call, against a
real PostgreSQL. Outputs that are the contract (exit codes, one-line errors, summary lines) are
asserted exactly; every state change is checked in SQL."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.embedded import make_temp_dir
from engine.errors import ValidationError
from engine.migrate import KNOWN_MIGRATIONS, REQUIRED_SCHEMA_VERSION, available_migrations
from engine.queue import Failure, Queue, validate_flow
from support.cli import REPO, base_env, engine, ok, one_line_error
from support.engines import wait_for
from support.postgres import register_flows_for, scalar

UNREACHABLE_SOCKET = "host=/tmp/nonexistent-skiplock port=1 dbname=x"
SECRET = "s3cretpw"
SECRET_DSNS = [
    f"postgresql://skiplock:{SECRET}@127.0.0.1:1/x",
    f"host=127.0.0.1 port=1 user=skiplock password={SECRET} dbname=x",
    f"postgresql://skiplock:{SECRET}@[::1/x",  # malformed: libpq quotes the whole URI in its error
]
SCHEMA_MESSAGE = (f"engine: error: database schema is at version 0, this skiplock needs {REQUIRED_SCHEMA_VERSION}: "
                  "run `engine migrate`\n")
STATUS_HEADER = ["flow", "pending", "scheduled", "claimed", "completed", "dead", "cancelled", "paused"]


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "a", "b", "alpha", "beta", "bulk", "emails", "later", "reports", "status")


def count(dsn: str, where: str = "true") -> int:
    return int(scalar(dsn, f"SELECT count(*) FROM skiplock.jobs WHERE {where}"))


def table(text: str) -> list[list[str]]:
    """The last status-style table in `text`: header row first, then rows split on whitespace."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:1] == ["flow"])
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def status_rows(text: str) -> dict[str, list[str]]:
    rows = table(text)
    assert rows[0] == STATUS_HEADER
    return {row[0]: row[1:] for row in rows[1:]}


def bury(queue: Queue, flow: str, error_type: str = "ValueError", message: str = "boom",
         payload: dict[str, Any] | None = None, transient_first: bool = False) -> int:
    """Enqueue one job and drive it to dead through real claims and a permanent failure."""
    job_id = queue.enqueue(flow, payload or {"flow": flow}, priority=32767)
    assert job_id is not None
    if transient_first:
        token, jobs = queue.claim(flow, "cli-test-worker", 1)
        assert [j.id for j in jobs] == [job_id]
        queue.ack("cli-test-worker", token, [], failures=[
            Failure(job_id, "TimeoutError", "first try timed out", None, False, 0.0)])
    token, jobs = queue.claim(flow, "cli-test-worker", 1)
    assert [j.id for j in jobs] == [job_id]
    failure = Failure(job_id, error_type, message, f"Traceback (most recent call last):\n  {error_type}: {message}",
                      True, 0.0)
    assert queue.ack("cli-test-worker", token, [], failures=[failure]).dead_ids == [job_id]
    return job_id


def age(dsn: str, job_id: int, interval: str = "3 days") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE skiplock.jobs SET finished_at = now() - %s::interval WHERE id = %s", (interval, job_id))


def status_of(dsn: str, job_id: int) -> str | None:
    return scalar(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job_id,))


# ---------------------------------------------------------------------------------------------
# migrate, and every other command on a database without the schema


def test_migrate_applies_then_is_up_to_date(empty_dsn: str) -> None:
    assert ok(engine("migrate", dsn=empty_dsn)) == "".join(
        f"applied {m.version:04d}_{m.name}\n" for m in available_migrations())
    assert scalar(empty_dsn, "SELECT count(*) FROM skiplock.schema_migrations") == len(KNOWN_MIGRATIONS)
    assert ok(engine("migrate", dsn=empty_dsn)) == "schema is up to date\n"
    # --dsn works as well as SKIPLOCK_DSN
    assert ok(engine("migrate", "--dsn", empty_dsn)) == "schema is up to date\n"


@pytest.mark.parametrize("command", [
    ["status"],
    ["status", "--json"],
    ["enqueue", "emails", "--payload", "{}"],
    ["pause", "emails"],
    ["resume", "emails"],
    ["dlq", "list"],
    ["dlq", "show", "1"],
    ["dlq", "retry", "--all"],
    ["dlq", "purge", "--flow", "emails"],
    ["dlq", "analyze"],
])
def test_commands_on_unmigrated_database_say_run_migrate(empty_dsn: str, command: list[str]) -> None:
    result = engine(*command, dsn=empty_dsn, input='{"a": 1}\n')
    assert one_line_error(result) == SCHEMA_MESSAGE
    assert result.stdout == ""
    assert scalar(empty_dsn, "SELECT to_regclass('skiplock.jobs')") is None  # nothing created behind our back


# ---------------------------------------------------------------------------------------------
# enqueue


def test_enqueue_json_lines_from_stdin(dsn: str) -> None:
    lines = '{"to": "a@example.com"}\n\n{"to": "b@example.com", "n": 2}\n   \n{"to": "ünïcødé 🎉"}\n'
    assert ok(engine("enqueue", "emails", dsn=dsn, input=lines)) == "enqueued 3 job(s) to emails\n"
    assert count(dsn) == 3
    payloads = [row for row in psycopg.connect(dsn).execute(
        "SELECT payload FROM skiplock.jobs ORDER BY id").fetchall()]
    assert [p[0] for p in payloads] == [{"to": "a@example.com"}, {"to": "b@example.com", "n": 2},
                                        {"to": "ünïcødé 🎉"}]
    assert scalar(dsn, "SELECT bool_and(flow = 'emails' AND status = 'pending' AND priority = 0 AND run_id IS NULL "
                       "AND max_attempts IS NULL AND run_at <= now()) FROM skiplock.jobs")


def test_enqueue_empty_stdin_enqueues_nothing(dsn: str) -> None:
    assert ok(engine("enqueue", "emails", dsn=dsn, input="")) == "enqueued 0 job(s) to emails\n"
    assert count(dsn) == 0


def test_enqueue_payload_count(dsn: str) -> None:
    assert ok(engine("enqueue", "emails", "--payload", '{"a":1}', "--count", "5", dsn=dsn)) == \
        "enqueued 5 job(s) to emails\n"
    assert count(dsn) == 5
    assert scalar(dsn, """SELECT bool_and(payload = '{"a": 1}'::jsonb) FROM skiplock.jobs""")
    assert ok(engine("enqueue", "emails", "--payload", '{"b":2}', dsn=dsn)) == "enqueued 1 job(s) to emails\n"
    assert count(dsn, """payload = '{"b": 2}'""") == 1


def test_enqueue_run_priority_and_max_attempts(dsn: str) -> None:
    lines = '{"n": 1}\n{"n": 2}\n'
    out = ok(engine("enqueue", "reports", "--run", "nightly-2024", "--priority", "7", "--max-attempts", "2",
                    dsn=dsn, input=lines))
    assert out == "enqueued 2 job(s) to reports\n"
    assert count(dsn, "run_id = 'nightly-2024' AND priority = 7 AND max_attempts = 2") == 2
    assert scalar(dsn, "SELECT total FROM skiplock.runs WHERE id = 'nightly-2024' AND flow = 'reports'") == 2
    ok(engine("enqueue", "reports", "--run", "nightly-2024", "--priority", "-3", "--payload", "{}", dsn=dsn))
    assert scalar(dsn, "SELECT total FROM skiplock.runs WHERE id = 'nightly-2024'") == 3
    assert count(dsn, "priority = -3") == 1


def test_enqueue_out_of_range_priority_is_refused(dsn: str) -> None:
    result = engine("enqueue", "reports", "--priority", "40000", "--payload", "{}", dsn=dsn)
    assert one_line_error(result) == "engine: error: priority 40000 must be an integer from -32768 to 32767\n"
    assert count(dsn) == 0


def test_enqueue_delay(dsn: str) -> None:
    assert ok(engine("enqueue", "later", "--delay", "1m", "--payload", "{}", dsn=dsn)) == \
        "enqueued 1 job(s) to later\n"
    assert scalar(dsn, "SELECT run_at > now() + interval '45 seconds' AND run_at <= now() + interval '60 seconds' "
                       "FROM skiplock.jobs")
    ok(engine("enqueue", "later", "--delay", "90", dsn=dsn, input="{}\n"))  # plain seconds
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE run_at > now() + interval '75 seconds'") == 1
    rows = status_rows(ok(engine("status", dsn=dsn)))
    assert rows["later"][:2] == ["0", "2"]  # pending (due now) 0, scheduled 2


def test_enqueue_dedupe_key(dsn: str) -> None:
    args = ("enqueue", "emails", "--payload", '{"to": "a@example.com"}', "--dedupe-key", "welcome-42")
    assert ok(engine(*args, dsn=dsn)) == "enqueued 1 job(s) to emails\n"
    assert ok(engine(*args, dsn=dsn)) == "enqueued 0 job(s) to emails, skipped 1 duplicate(s)\n"
    assert count(dsn) == 1
    assert count(dsn, "dedupe_key = 'welcome-42'") == 1
    # another key is not a duplicate
    assert ok(engine("enqueue", "emails", "--payload", "{}", "--dedupe-key", "welcome-43", dsn=dsn)) == \
        "enqueued 1 job(s) to emails\n"


def test_enqueue_dedupe_key_needs_exactly_one_job(dsn: str) -> None:
    result = engine("enqueue", "emails", "--payload", "{}", "--count", "2", "--dedupe-key", "k", dsn=dsn)
    assert one_line_error(result) == "engine: error: --dedupe-key applies to exactly one job\n"
    assert count(dsn) == 0


def test_enqueue_malformed_json_line_inserts_nothing(dsn: str) -> None:
    lines = '{"a": 1}\n{"b": 2}\n{bad json\n{"c": 3}\n'
    result = engine("enqueue", "emails", dsn=dsn, input=lines)
    assert one_line_error(result) == ("engine: error: line 3, column 2: invalid JSON: unexpected character, "
                                      "expected a string key\n")
    assert result.stdout == ""
    assert count(dsn) == 0


def test_enqueue_blank_lines_still_count_in_line_numbers(dsn: str) -> None:
    result = engine("enqueue", "emails", dsn=dsn, input='{"a": 1}\n\n\n{"b": \n')
    assert one_line_error(result) == "engine: error: line 4, column 7: invalid JSON: unexpected end of data\n"
    assert count(dsn) == 0


def test_enqueue_array_line_inserts_nothing(dsn: str) -> None:
    result = engine("enqueue", "emails", dsn=dsn, input='{"a": 1}\n[1, 2]\n{"c": 3}\n')
    assert one_line_error(result) == "engine: error: line 2: payload must be a JSON object, got list\n"
    assert count(dsn) == 0


def test_enqueue_invalid_utf8_is_a_json_error_whatever_the_locale(dsn: str) -> None:
    # With a strict stdin (as under en_US.UTF-8) a text-mode reader would raise UnicodeDecodeError.
    result = engine("enqueue", "emails", dsn=dsn, input=b'{"a": 1}\n{"b": "\xff\xfe"}\n',
                    env={"PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr.decode()
    assert result.stderr.decode().startswith("engine: error: line 2, column 1: invalid JSON: str is not valid UTF-8")
    assert result.stderr.count(b"\n") == 1
    assert count(dsn) == 0


def test_enqueue_bad_payload_option(dsn: str) -> None:
    result = engine("enqueue", "emails", "--payload", "{nope", dsn=dsn)
    assert one_line_error(result) == ("engine: error: --payload, column 2: invalid JSON: unexpected character, "
                                      "expected a string key\n")
    result = engine("enqueue", "emails", "--payload", '{"a":\n 1,,}', dsn=dsn)
    assert one_line_error(result).startswith("engine: error: --payload, line 2, column 4: invalid JSON")
    result = engine("enqueue", "emails", "--payload", "[1]", "--count", "2", dsn=dsn)
    assert one_line_error(result) == "engine: error: --payload (copy 1): payload must be a JSON object, got list\n"
    assert count(dsn) == 0


def test_enqueue_bad_flow_name(dsn: str) -> None:
    with pytest.raises(ValidationError) as expected:
        validate_flow("bad flow!")
    result = engine("enqueue", "bad flow!", dsn=dsn, input='{"a": 1}\n')
    assert one_line_error(result) == f"engine: error: {expected.value}\n"
    assert result.stderr == ("engine: error: flow name 'bad flow!' is invalid: use 1-63 letters, digits, "
                             "'_', '.', '-', starting with a letter or digit\n")
    assert count(dsn) == 0


def test_enqueue_count_without_payload(dsn: str) -> None:
    result = engine("enqueue", "emails", "--count", "3", dsn=dsn, input='{"a": 1}\n')
    assert one_line_error(result) == "engine: error: --count goes with --payload\n"
    assert count(dsn) == 0


@pytest.mark.parametrize("value", ["soon", "-5s", "1 fortnight"])
def test_enqueue_bad_delay_is_an_argparse_error(dsn: str, value: str) -> None:
    result = engine("enqueue", "emails", f"--delay={value}", "--payload", "{}", dsn=dsn)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: engine enqueue")
    assert f'engine enqueue: error: argument --delay: --delay: bad duration "{value}"' in result.stderr
    assert count(dsn) == 0


# ---------------------------------------------------------------------------------------------
# status


@pytest.fixture
def mixed(dsn: str, queue: Queue) -> str:
    """alpha: 1 pending, 1 running, 1 completed, 1 dead; beta: 2 scheduled."""
    ok(engine("enqueue", "alpha", "--payload", '{"x": 1}', "--count", "3", dsn=dsn))
    token, jobs = queue.claim("alpha", "w1", 2)
    assert len(jobs) == 2
    assert queue.ack("w1", token, [jobs[0].id]).completed == 1
    bury(queue, "alpha")
    ok(engine("enqueue", "beta", "--payload", "{}", "--count", "2", "--delay", "1h", dsn=dsn))
    return dsn


def test_status_text(mixed: str) -> None:
    out = ok(engine("status", dsn=mixed))
    lines = out.splitlines()
    assert lines[0].split() == STATUS_HEADER
    assert [line.split()[0] for line in lines] == ["flow", "alpha", "beta", "TOTAL"]
    rows = status_rows(out)
    assert rows["alpha"] == ["1", "0", "1", "1", "1", "0"]
    assert rows["beta"] == ["0", "2", "0", "0", "0", "0"]
    assert rows["TOTAL"] == ["1", "2", "1", "1", "1", "0"]
    # columns line up: every value starts where its header starts
    header = lines[0]
    for line in lines[1:]:
        for name, value in zip(STATUS_HEADER, line.split()):
            assert line[header.index(name):].startswith(value)


def test_status_json(mixed: str) -> None:
    status = json.loads(ok(engine("status", "--json", dsn=mixed)))
    assert status["total_records"] == 6
    assert status["pending_records"] == 3  # scheduled jobs are pending too
    assert status["scheduled_records"] == 2
    assert status["processing_records"] == 1
    assert status["completed_records"] == 1
    assert status["failed_records"] == 1
    assert status["by_flow"] == {
        "alpha": {"pending": 1, "scheduled": 0, "processing": 1, "completed": 1, "failed": 1, "cancelled": 0,
                  "paused": False},
        "beta": {"pending": 2, "scheduled": 2, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0,
                 "paused": False},
    }


def test_status_flow_filter(mixed: str) -> None:
    status = json.loads(ok(engine("status", "--json", "--flow", "beta", dsn=mixed)))
    assert list(status["by_flow"]) == ["beta"]
    assert status["total_records"] == 2 and status["failed_records"] == 0
    rows = status_rows(ok(engine("status", "--flow", "alpha", dsn=mixed)))
    assert list(rows) == ["alpha", "TOTAL"]
    assert rows["TOTAL"] == rows["alpha"]
    assert one_line_error(engine("status", "--flow", "no such!", dsn=mixed)).startswith(
        "engine: error: flow name 'no such!' is invalid")


def test_status_empty_queue(dsn: str) -> None:
    assert status_rows(ok(engine("status", dsn=dsn))) == {"TOTAL": ["0", "0", "0", "0", "0", "0"]}
    assert json.loads(ok(engine("status", "--json", dsn=dsn)))["by_flow"] == {}


# ---------------------------------------------------------------------------------------------
# health


def serving_worker(dsn: str, *flows: str) -> None:
    """A live worker (fresh heartbeat) that serves these flows, as a running engine registers it."""
    scalar(dsn, "INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state)"
                " VALUES ('w-live', 'e-1', 'h', 1, %s, 'idle') RETURNING 1", (list(flows),))


def test_health_healthy(dsn: str) -> None:
    serving_worker(dsn, "emails")
    ok(engine("enqueue", "emails", "--payload", "{}", "--count", "2", dsn=dsn))
    out = ok(engine("health", dsn=dsn))
    assert re.fullmatch(r"healthy: database up \([0-9.]+ ms\), 2 pending, 0 claimed, 0 dead\n", out), out
    report = json.loads(ok(engine("health", "--json", dsn=dsn)))
    for key in ("status", "databases", "queue_status", "instance_info", "timestamp"):
        assert key in report
    assert report["status"] == "healthy"
    assert report["databases"]["skiplock"]["connection"] is True
    assert report["queue_status"]["pending_records"] == 2
    assert report["instance_info"]["hostname"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["timestamp"])
    assert report["reasons"] == []


@pytest.mark.parametrize("unreachable", [UNREACHABLE_SOCKET, *SECRET_DSNS])
def test_health_unhealthy_when_unreachable(unreachable: str) -> None:
    result = engine("health", dsn=unreachable, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout.startswith("unhealthy: database down\n")
    assert "  - database unreachable: " in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    result = engine("health", "--json", "--dsn", unreachable, timeout=30)
    assert result.returncode == 2
    assert SECRET not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "unhealthy"
    assert report["databases"]["skiplock"]["connection"] is False
    assert report["queue_status"] == {}


def test_health_unhealthy_on_outdated_schema(empty_dsn: str) -> None:
    result = engine("health", dsn=empty_dsn)
    assert result.returncode == 2
    assert re.fullmatch(r"unhealthy: database up \([0-9.]+ ms\)\n  - schema outdated: run `engine migrate`\n",
                        result.stdout), result.stdout
    report = json.loads(engine("health", "--json", dsn=empty_dsn).stdout)
    assert report["status"] == "unhealthy"
    assert report["schema"] == {"version": 0, "required": REQUIRED_SCHEMA_VERSION}


def test_health_degraded_on_stale_worker(dsn: str, tmp_path: Path) -> None:
    # Heartbeat ages count from the server's start at the earliest, and the suite's server may be
    # seconds old (one per xdist worker): a short stale_after, and a server older than it.
    config = tmp_path / "config.toml"
    config.write_text('[global]\nstale_after = "3s"\nheartbeat_interval = "1s"\n')
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO skiplock.workers (id, engine_id, host, pid, state, heartbeat_at) "
                     "VALUES ('ghost:1', 'e1', 'ghost', 1, 'idle', now() - interval '1 hour')")
        uptime = conn.execute("SELECT extract(epoch FROM now() - pg_postmaster_start_time())::float8").fetchone()[0]
        time.sleep(max(0.0, 4.0 - uptime))
        # Ahead of now: live however long the `engine health` commands below take to start.
        conn.execute("INSERT INTO skiplock.workers (id, engine_id, host, pid, state, heartbeat_at) "
                     "VALUES ('alive:1', 'e1', 'alive', 2, 'busy', now() + interval '1 hour')")
    result = engine("health", "--config", str(config), dsn=dsn)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("degraded: database up")
    assert lines[1:] == ["  - 1 worker(s) with stale heartbeats"]
    result = engine("health", "--json", "--config", str(config), dsn=dsn)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["status"] == "degraded"
    assert report["workers"] == {"live": 1, "stale": 1, "lost": 0}  # each worker counted once
    # a stopped worker's old heartbeat is not a problem
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE skiplock.workers SET state = 'stopped' WHERE id = 'ghost:1'")
    assert engine("health", "--config", str(config), dsn=dsn).returncode == 0


# ---------------------------------------------------------------------------------------------
# pause / resume


def test_pause_and_resume(dsn: str) -> None:
    assert ok(engine("pause", "emails", dsn=dsn)) == "paused emails\n"
    assert scalar(dsn, "SELECT paused FROM skiplock.flows WHERE name = 'emails'") is True
    ok(engine("enqueue", "emails", "--payload", "{}", dsn=dsn))
    assert status_rows(ok(engine("status", dsn=dsn)))["emails"][-1] == "yes"
    assert json.loads(ok(engine("status", "--json", dsn=dsn)))["by_flow"]["emails"]["paused"] is True
    with Queue(dsn) as queue:
        assert queue.claim("emails", "w", 10)[1] == []  # paused: nothing is claimed
    assert ok(engine("resume", "emails", dsn=dsn)) == "resumed emails\n"
    assert scalar(dsn, "SELECT paused FROM skiplock.flows WHERE name = 'emails'") is False
    assert len(status_rows(ok(engine("status", dsn=dsn)))["emails"]) == 6  # paused column empty
    with Queue(dsn) as queue:
        assert len(queue.claim("emails", "w", 10)[1]) == 1


def test_pause_bad_flow_name(dsn: str) -> None:
    before = scalar(dsn, "SELECT count(*) FROM skiplock.flows")
    assert one_line_error(engine("pause", "no way", dsn=dsn)).startswith("engine: error: flow name 'no way' is invalid")
    assert scalar(dsn, "SELECT count(*) FROM skiplock.flows") == before


# ---------------------------------------------------------------------------------------------
# dead letters


@pytest.fixture
def graveyard(dsn: str, queue: Queue) -> dict[str, int]:
    """Four dead letters in two flows (one aged 3 days), plus a pending job that is not dead."""
    jobs = {
        "a_value": bury(queue, "a", "ValueError", "bad value", payload={"order": 1, "note": "ünï"},
                        transient_first=True),
        "a_old": bury(queue, "a", "ValueError", "old bad value"),
        "a_key": bury(queue, "a", "KeyError", "missing key"),
        "b_value": bury(queue, "b", "ValueError", "bad b"),
    }
    age(dsn, jobs["a_old"])
    pending = queue.enqueue("a", {"alive": True}, priority=-1)
    assert pending is not None
    jobs["a_pending"] = pending
    return jobs


def listed_ids(out: str) -> list[int]:
    lines = out.splitlines()
    assert lines[0].split() == ["id", "flow", "attempts", "error", "message", "died", "at"]
    return [int(line.split()[0]) for line in lines[1:]]


def test_dlq_list_text(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard
    out = ok(engine("dlq", "list", dsn=dsn))
    assert sorted(listed_ids(out)) == sorted([g["a_value"], g["a_old"], g["a_key"], g["b_value"]])
    assert listed_ids(out)[-1] == g["a_old"]  # newest first
    line = next(line for line in out.splitlines() if line.split()[0] == str(g["a_value"]))
    assert line.split()[1:6] == ["a", "2/5", "ValueError", "bad", "value"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", line)


def test_dlq_list_json_and_filters(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard

    def ids(*args: str) -> list[int]:
        return sorted(d["id"] for d in json.loads(ok(engine("dlq", "list", "--json", *args, dsn=dsn))))

    letters = json.loads(ok(engine("dlq", "list", "--json", dsn=dsn)))
    letter = next(d for d in letters if d["id"] == g["a_key"])
    assert {k: letter[k] for k in ("flow", "attempts", "max_attempts", "error_type", "error_message", "run_id")} == {
        "flow": "a", "attempts": 1, "max_attempts": 5, "error_type": "KeyError", "error_message": "missing key",
        "run_id": None}
    assert letter["finished_at"]
    assert ids("--flow", "a") == sorted([g["a_value"], g["a_old"], g["a_key"]])
    assert ids("--error", "ValueError") == sorted([g["a_value"], g["a_old"], g["b_value"]])
    assert ids("--flow", "a", "--error", "KeyError") == [g["a_key"]]
    assert ids("--older-than", "1d") == [g["a_old"]]
    assert ids("--older-than", "1d", "--flow", "b") == []
    assert ids("--flow", "nope") == []
    assert len(ids("--limit", "2")) == 2
    assert listed_ids(ok(engine("dlq", "list", "--older-than", "1d", dsn=dsn))) == [g["a_old"]]
    bad = engine("dlq", "list", "--older-than", "ages", dsn=dsn)
    assert bad.returncode == 2 and 'bad duration "ages"' in bad.stderr and "Traceback" not in bad.stderr


def test_dlq_show(dsn: str, graveyard: dict[str, int]) -> None:
    job_id = graveyard["a_value"]
    out = ok(engine("dlq", "show", str(job_id), dsn=dsn))
    lines = out.splitlines()
    assert lines[0] == f"job {job_id}  flow a  status dead  attempt 2 of 5"
    assert lines[1] == "payload:"
    payload_end = lines.index("}")
    assert json.loads("\n".join(lines[2:payload_end + 1])) == {"order": 1, "note": "ünï"}
    history = [line for line in lines if line.startswith("attempt ")]
    assert len(history) == 2
    assert re.fullmatch(r"attempt 1 at \S.* on cli-test-worker: TimeoutError: first try timed out", history[0])
    assert re.fullmatch(r"attempt 2 at \S.* on cli-test-worker: ValueError: bad value", history[1])
    assert "    Traceback (most recent call last):" in lines
    assert "      ValueError: bad value" in lines  # traceback lines are indented under their attempt

    shown = json.loads(ok(engine("dlq", "show", "--json", str(job_id), dsn=dsn)))
    assert shown["id"] == job_id and shown["status"] == "dead" and shown["flow"] == "a"
    assert shown["payload"] == {"order": 1, "note": "ünï"}
    assert [e["type"] for e in shown["errors"]] == ["TimeoutError", "ValueError"]
    assert shown["error_type"] == "ValueError" and shown["error_message"] == "bad value"


def test_dlq_show_unknown_id(dsn: str) -> None:
    assert one_line_error(engine("dlq", "show", "987654", dsn=dsn)) == "engine: error: job 987654 not found\n"
    bad = engine("dlq", "show", "abc", dsn=dsn)
    assert bad.returncode == 2 and "invalid int value: 'abc'" in bad.stderr


def test_dlq_retry_by_id(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard
    assert ok(engine("dlq", "retry", str(g["a_key"]), dsn=dsn)) == f"retried 1 job(s): {g['a_key']}\n"
    assert status_of(dsn, g["a_key"]) == "pending"
    assert scalar(dsn, "SELECT run_at <= now() FROM skiplock.jobs WHERE id = %s", (g["a_key"],))
    assert [status_of(dsn, g[k]) for k in ("a_value", "a_old", "b_value")] == ["dead"] * 3
    # a job that is no longer dead is left alone
    assert ok(engine("dlq", "retry", str(g["a_key"]), str(g["a_pending"]), dsn=dsn)) == "retried 0 job(s)\n"


def test_dlq_retry_by_filter(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard
    out = ok(engine("dlq", "retry", "--flow", "a", "--error", "ValueError", dsn=dsn))
    assert out == f"retried 2 job(s): {' '.join(map(str, sorted([g['a_value'], g['a_old']])))}\n"
    assert count(dsn, "status = 'dead'") == 2
    assert ok(engine("dlq", "retry", "--older-than", "1d", dsn=dsn)) == "retried 0 job(s)\n"


def test_dlq_retry_needs_a_selector(dsn: str, graveyard: dict[str, int]) -> None:
    result = engine("dlq", "retry", dsn=dsn)
    assert one_line_error(result) == (
        "engine: error: say which dead letters to retry: job ids, --flow, --error, --older-than, or --all\n")
    assert count(dsn, "status = 'dead'") == 4


def test_dlq_retry_all(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard
    dead = sorted([g["a_value"], g["a_old"], g["a_key"], g["b_value"]])
    assert ok(engine("dlq", "retry", "--all", dsn=dsn)) == f"retried 4 job(s): {' '.join(map(str, dead))}\n"
    assert count(dsn, "status = 'dead'") == 0
    assert count(dsn, "status = 'pending'") == 5
    assert ok(engine("dlq", "retry", "--all", dsn=dsn)) == "retried 0 job(s)\n"


def test_dlq_purge(dsn: str, graveyard: dict[str, int]) -> None:
    g = graveyard
    assert ok(engine("dlq", "purge", str(g["b_value"]), dsn=dsn)) == "purged 1 job(s)\n"
    assert count(dsn, f"id = {g['b_value']}") == 0
    assert ok(engine("dlq", "purge", "--older-than", "1d", dsn=dsn)) == "purged 1 job(s)\n"
    assert count(dsn, f"id = {g['a_old']}") == 0
    assert sorted(scalar(dsn, "SELECT array_agg(id) FROM skiplock.jobs")) == sorted(
        [g["a_value"], g["a_key"], g["a_pending"]])
    # purge never touches a job that is not dead
    assert ok(engine("dlq", "purge", str(g["a_pending"]), dsn=dsn)) == "purged 0 job(s)\n"
    assert status_of(dsn, g["a_pending"]) == "pending"
    result = engine("dlq", "purge", dsn=dsn)
    assert one_line_error(result) == (
        "engine: error: say which dead letters to purge: job ids, --flow, --error or --older-than\n")
    assert count(dsn) == 3


def test_dlq_analyze(dsn: str, graveyard: dict[str, int]) -> None:
    groups = json.loads(ok(engine("dlq", "analyze", "--json", dsn=dsn)))
    assert {(g["flow"], g["error_type"]): g["count"] for g in groups} == {
        ("a", "ValueError"): 2, ("a", "KeyError"): 1, ("b", "ValueError"): 1}
    assert groups[0]["flow"] == "a" and groups[0]["error_type"] == "ValueError"  # biggest group first
    assert groups[0]["sample_message"] == "bad value"  # the newest one's message
    out = ok(engine("dlq", "analyze", dsn=dsn))
    lines = out.splitlines()
    assert lines[0].split() == ["flow", "error", "count", "last", "at", "sample"]
    assert [line.split()[:3] for line in lines[1:]] == [["a", "ValueError", "2"], ["a", "KeyError", "1"],
                                                        ["b", "ValueError", "1"]]
    only_b = json.loads(ok(engine("dlq", "analyze", "--json", "--flow", "b", dsn=dsn)))
    assert [(g["flow"], g["error_type"], g["count"]) for g in only_b] == [("b", "ValueError", 1)]


def test_dlq_on_empty_queue(dsn: str) -> None:
    assert ok(engine("dlq", "list", dsn=dsn)).splitlines() == ["id  flow  attempts  error  message  died at"]
    assert json.loads(ok(engine("dlq", "list", "--json", dsn=dsn))) == []
    assert json.loads(ok(engine("dlq", "analyze", "--json", dsn=dsn))) == []
    assert ok(engine("dlq", "retry", "--all", dsn=dsn)) == "retried 0 job(s)\n"


# ---------------------------------------------------------------------------------------------
# unreachable database: one line, exit 2, no traceback, password redacted


@pytest.mark.parametrize("command", [
    ["migrate"],
    ["status"],
    ["enqueue", "emails", "--payload", "{}"],
    ["enqueue", "emails"],
    ["pause", "emails"],
    ["dlq", "list"],
    ["dlq", "retry", "--all"],
    ["dlq", "analyze"],
])
@pytest.mark.parametrize("unreachable", [UNREACHABLE_SOCKET, *SECRET_DSNS])
@pytest.mark.parametrize("via", ["env", "flag"])
def test_unreachable_database(command: list[str], unreachable: str, via: str) -> None:
    if via == "env":
        result = engine(*command, dsn=unreachable, input='{"a": 1}\n', timeout=30)
    else:
        result = engine(*command, "--dsn", unreachable, input='{"a": 1}\n', timeout=30)
    one_line_error(result)
    assert result.stdout == ""
    assert SECRET not in result.stderr
    if SECRET in unreachable and unreachable.startswith("postgresql://"):
        assert "connection failed" in result.stderr or "***" in result.stderr


# ---------------------------------------------------------------------------------------------
# --help everywhere


SUBCOMMANDS = ["migrate", "run", "enqueue", "status", "health", "pause", "resume", "dlq", "dev"]


@pytest.mark.parametrize("command", [
    [], *([name] for name in SUBCOMMANDS),
    ["dlq", "list"], ["dlq", "show"], ["dlq", "retry"], ["dlq", "purge"], ["dlq", "analyze"],
])
def test_help(command: list[str]) -> None:
    result = engine(*command, "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: engine {' '.join(command)}".rstrip())
    if not command:
        for name in SUBCOMMANDS:
            assert name in result.stdout
    elif command[0] != "dlq" or len(command) > 1:
        assert "--dsn" in result.stdout and "--config" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = engine(timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: engine") and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# engine dev: embedded PostgreSQL end to end


@pytest.fixture
def dev_dir() -> Iterator[Path]:
    base = make_temp_dir("skiplock-dev-")
    yield base
    leftover = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout.split()
    for pid in leftover:  # only servers of this test's own data directory
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(base, ignore_errors=True)


def no_server_left(base: Path) -> None:
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(base)], capture_output=True).returncode == 1,
             timeout=10, message=f"no process running on {base}")


def test_dev_no_engine(dev_dir: Path) -> None:
    data = dev_dir / "data"
    result = engine("dev", "--no-engine", "--jobs", "50", "--data-dir", str(data), timeout=120)
    out = ok(result)
    lines = out.splitlines()
    assert lines[:3] == [f"starting embedded PostgreSQL in {data} ...", f"schema migrated ({len(KNOWN_MIGRATIONS)} migration(s) applied)",
                         "enqueued demo jobs to noop, sleep and flaky"]
    rows = status_rows(out)
    assert rows["noop"][:2] == ["50", "0"]
    assert rows["sleep"][0] == "2" and rows["flaky"][0] == "5"
    assert rows["TOTAL"][0] == "57"
    assert (data / "PG_VERSION").exists()
    assert not (data / "postmaster.pid").exists()  # stopped cleanly
    no_server_left(dev_dir)

    # a second run reuses the cluster: nothing to migrate, the earlier jobs are still there
    out = ok(engine("dev", "--no-engine", "--jobs", "50", "--data-dir", str(data), timeout=120))
    assert "schema migrated (0 migration(s) applied)" in out.splitlines()
    assert status_rows(out)["noop"][0] == "100"
    no_server_left(dev_dir)


def test_dev_runs_the_engine_briefly(dev_dir: Path) -> None:
    data = dev_dir / "data"
    result = engine("dev", "--seconds", "3", "--jobs", "200", "--data-dir", str(data), timeout=180)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "Traceback" not in result.stdout + result.stderr
    assert "engine running; Ctrl-C stops" in result.stdout
    # off a terminal too, the engine's JSON logs go to engine-dev.log, not between the status tables
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")], result.stdout[-3000:]
    assert '"engine starting"' in (dev_dir / "engine-dev.log").read_text()
    rows = status_rows(result.stdout)  # the final status table
    assert int(rows["noop"][3]) >= 200
    assert int(rows["TOTAL"][3]) >= 200
    assert rows["noop"][2] == "0" and rows["TOTAL"][2] == "0"  # nothing left running after the drain
    assert not (data / "postmaster.pid").exists()
    no_server_left(dev_dir)


# ---------------------------------------------------------------------------------------------
# passwords the redaction used to miss: libpq's own echoes, percent-encoded keys, spaces


HIDDEN_DSNS = [
    "host=127.0.0.1 port=1 password=Hunter2 Secret dbname=x",
    "host=127.0.0.1 port=1 password=Hunter2 Secret=1",
    "postgresql://u:Hunter2 Secret@127.0.0.1:1/x",
    "postgresql://u@127.0.0.1:1/x?pass%77ord=Hunter2Secret",
    "postgresql://u@127.0.0.1:1/x?password=Hunter2Secret%zz",
]


@pytest.mark.parametrize("command", [["status"], ["health"], ["migrate"]])
@pytest.mark.parametrize("dsn", HIDDEN_DSNS)
@pytest.mark.parametrize("via", ["env", "flag"])
def test_no_password_form_reaches_stderr(command: list[str], dsn: str, via: str) -> None:
    result = engine(*command, dsn=dsn, timeout=30) if via == "env" else engine(*command, "--dsn", dsn, timeout=30)
    output = result.stdout + result.stderr
    assert "Hunter2" not in output and "Secret" not in output, output
    if command == ["health"]:
        assert result.returncode == 2 and "unhealthy" in result.stdout
    else:
        one_line_error(result)


# ---------------------------------------------------------------------------------------------
# hostile input: one line naming the culprit, exit 2, nothing changed (issue 11 items 4-6)


def test_flow_name_with_a_trailing_newline_is_refused(dsn: str) -> None:
    for command in (["pause", "noop\n"], ["enqueue", "noop\n", "--payload", "{}"], ["status", "--flow", "noop\n"]):
        line = one_line_error(engine(*command, dsn=dsn))
        assert "flow name 'noop\\n' is invalid" in line, line
    assert count(dsn) == 0
    assert scalar(dsn, "SELECT count(*) FROM skiplock.flows WHERE name <> btrim(name, E'\\n') OR paused") == 0


def _raw_engine(*args: bytes, dsn: bytes | None = None) -> subprocess.CompletedProcess:
    """`engine` with raw bytes in argv or SKIPLOCK_DSN (the way a shell passes $'\\xff')."""
    env = {k.encode(): v.encode() for k, v in base_env().items()}
    if dsn is not None:
        env[b"SKIPLOCK_DSN"] = dsn
    return subprocess.run([sys.executable.encode(), b"-m", b"engine.cli", *args], env=env, input=b"",
                          capture_output=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(("args", "option"), [
    ([b"enqueue", b"emails", b"--payload", b"{}", b"--run", b"night\xff"], "--run"),
    ([b"enqueue", b"emails", b"--payload", b"{}", b"--dedupe-key", b"k\xfe1"], "--dedupe-key"),
    ([b"dlq", b"list", b"--error", b"Value\xffError"], "--error"),
    ([b"dlq", b"purge", b"--error=\xc3("], "--error"),
    ([b"status", b"--dsn", b"host=/tmp/x\xff port=1"], "--dsn"),
])
def test_non_utf8_arguments(dsn: str, args: list[bytes], option: str) -> None:
    result = _raw_engine(*args, dsn=dsn.encode())
    result.stderr = result.stderr.decode(errors="replace")
    result.stdout = result.stdout.decode(errors="replace")
    line = one_line_error(result)
    assert line.startswith(f"engine: error: {option}: not valid UTF-8 (byte 0x"), line
    assert count(dsn) == 0


def test_non_utf8_dsn_from_the_environment() -> None:
    result = _raw_engine(b"status", dsn=b"host=/tmp/x\xff port=1")
    result.stderr, result.stdout = result.stderr.decode(errors="replace"), result.stdout.decode(errors="replace")
    assert "is not valid UTF-8 (byte 0xff at position 11)" in one_line_error(result)


def test_huge_count_streams() -> None:
    """--count 10**12 used to build every copy before connecting (a MemoryError traceback)."""
    result = engine("enqueue", "emails", "--payload", "{}", "--count", "1000000000000", dsn=UNREACHABLE_SOCKET,
                    timeout=60)
    assert "connection" in one_line_error(result) or "database" in result.stderr


def test_count_spanning_chunks_is_one_transaction(dsn: str) -> None:
    from engine.cli import ENQUEUE_CHUNK

    total = ENQUEUE_CHUNK * 2 + 5
    assert ok(engine("enqueue", "bulk", "--payload", '{"a": 1}', "--count", str(total), "--run", "r1",
                     dsn=dsn, timeout=120)) == f"enqueued {total} job(s) to bulk\n"
    assert count(dsn, "flow = 'bulk'") == total
    assert scalar(dsn, "SELECT total FROM skiplock.runs WHERE id = 'r1'") == total


@pytest.mark.parametrize(("args", "message"), [
    (["enqueue", "emails", "--payload", "{}", "--max-attempts", "2147483648"],
     "engine: error: --max-attempts 2147483648 must be an integer from 1 to 2147483647\n"),
    (["dlq", "list", "--limit", "-1"], "engine: error: --limit -1 must be an integer from 0 to 2147483647\n"),
    (["dlq", "retry", "99999999999999999999"],
     "engine: error: job id 99999999999999999999 must be an integer from 1 to 9223372036854775807\n"),
    (["dlq", "show", "99999999999999999999"],
     "engine: error: job id 99999999999999999999 must be an integer from 1 to 9223372036854775807\n"),
    (["dlq", "retry", "1", "--all"],
     "engine: error: --all retries every dead letter: give it alone, or job ids and filters without it\n"),
    (["dlq", "retry", "--flow", "x", "--all"],
     "engine: error: --all retries every dead letter: give it alone, or job ids and filters without it\n"),
])
def test_out_of_range_options_name_the_option(dsn: str, args: list[str], message: str) -> None:
    assert one_line_error(engine(*args, dsn=dsn)) == message
    assert count(dsn) == 0


def test_huge_delay_is_refused_naming_the_option(dsn: str) -> None:
    result = engine("enqueue", "emails", "--payload", "{}", "--delay", "99999999999d", dsn=dsn)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert 'argument --delay: --delay: duration must be at most 36500d (100 years), got "99999999999d"' in result.stderr
    assert count(dsn) == 0


def test_dlq_retry_all_with_ids_changes_nothing(dsn: str, queue: Queue) -> None:
    first, second = bury(queue, "a"), bury(queue, "a")
    one_line_error(engine("dlq", "retry", str(first), "--all", dsn=dsn))
    assert count(dsn, f"status = 'dead' AND id IN ({first}, {second})") == 2


def test_config_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    for path, message in ((fifo, "not a regular file, cannot be a config file"),
                          ("/dev/zero", "not a regular file, cannot be a config file")):
        line = one_line_error(engine("status", "--config", str(path), dsn=UNREACHABLE_SOCKET, timeout=30))
        assert line == f"engine: error: {path}: {message}\n"
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert one_line_error(engine("status", "--config", str(big), dsn=UNREACHABLE_SOCKET)) == \
        f"engine: error: {big}: config file is larger than 1024 KiB\n"
    deep = tmp_path / "deep.toml"
    deep.write_text("[global]\nworkers = " + "[" * 5000 + "]" * 5000 + "\n")
    assert one_line_error(engine("status", "--config", str(deep), dsn=UNREACHABLE_SOCKET)) == \
        f"engine: error: {deep}: TOML nested too deeply\n"


def test_handler_calling_sys_exit_at_import(dsn: str, tmp_path: Path) -> None:
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(7)\n")
    config = tmp_path / "config.toml"
    config.write_text('[flows.quitter]\nhandler = "exits_at_import:run"\n')
    result = engine("run", "--config", str(config), "--flows", "quitter", "--drain", dsn=dsn, timeout=60,
                    env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert one_line_error(result) == ("engine: error: flow quitter: handler 'exits_at_import:run': "
                                      "importing 'exits_at_import' called sys.exit(7)\n")


def test_no_password_in_ps_for_the_engine_and_its_workers(dsn: str, tmp_path: Path) -> None:
    secret_dsn = f"{dsn} password=Pw9ZqSecret"  # the test server trusts local users: the password is unused
    config = tmp_path / "config.toml"
    config.write_text("[global]\nworkers = 2\n[flows.noop]\n")  # the built-in noop flow, named
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(config), "--dsn", secret_dsn],
                               env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state <> 'stopped'") == 2, 60,
                 message="two workers")
        pids = [process.pid, *(int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children")
                                .read_text().split())]
        assert len(pids) == 3
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"Pw9Zq" not in cmdline and b"--dsn" in cmdline and b"password=***********" in cmdline, cmdline
    finally:
        process.terminate()
        process.wait(60)


@pytest.mark.parametrize(("args", "message"), [
    (["console", "--refresh", "nan", "--list-bindings"], 'argument --refresh: --refresh: bad duration "nan"'),
    (["console", "--refresh", "0", "--list-bindings"], "argument --refresh: --refresh must be greater than 0"),
    (["dev", "--seconds", "inf", "--no-engine"], 'argument --seconds: --seconds: bad duration "inf"'),
    (["run", "--workers", "5000"], "engine: error: --workers must be at least 1 and at most 1024, got 5000"),
])
def test_console_and_dev_numbers_are_checked(dsn: str, args: list[str], message: str) -> None:
    result = engine(*args, dsn=dsn, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr

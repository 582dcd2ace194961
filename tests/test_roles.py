"""Least-privilege roles (issue 16 item 5, migration 0020_roles): real login roles, each a member of one
skiplock role, run exactly their commands through the real CLI and console, and are refused the rest
with one line naming what they lack and the role to grant."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from console.app import ConsoleApp
from console.messages import RetryJobs
from engine import db, roles, store
from engine.cli import main
from engine.errors import PrivilegeMissing
from engine.queue import Queue
from engine.embedded import EmbeddedPostgres
from engine.migrate import migrate, migrations_dir
from support.cli import engine, ok, one_line_error
from support.console_seed import wait_until
from support.postgres import register_flows, scalar

SUFFIX = f"{os.getpid()}"
LOGINS = {"engine": f"sl_engine_{SUFFIX}", "operator": f"sl_operator_{SUFFIX}", "viewer": f"sl_viewer_{SUFFIX}",
          "none": f"sl_none_{SUFFIX}"}


@pytest.fixture(scope="module")
def logins(pg_server: EmbeddedPostgres) -> Iterator[dict[str, str]]:
    """Login roles (cluster-wide): one member of each skiplock role, and one of none."""
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        for kind, name in LOGINS.items():
            conn.execute(f'CREATE ROLE "{name}" LOGIN')
            if kind != "none":
                conn.execute(f'GRANT skiplock_{kind} TO "{name}"')
    yield LOGINS
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        for name in LOGINS.values():
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def as_login(dsn: str, login: str) -> str:
    """The same database as `login` (the test server trusts its Unix socket; TCP would need a password)."""
    return psycopg.conninfo.make_conninfo(dsn, user=login)


def dead_letter(dsn: str, flow: str = "emails") -> int:
    return int(scalar(dsn, "INSERT INTO skiplock.jobs (flow, payload, status, attempts, error_type, error_message, "
                           "finished_at) VALUES (%s, '{}', 'dead', 1, 'ValueError', 'bad', now()) RETURNING id",
                      (flow,)))


def cli(capsys: pytest.CaptureFixture[str], *args: str, dsn: str) -> tuple[int, str, str]:
    """`engine *args` in this process (the CLI's own main: parsing, commands, error lines), to keep the
    many calls below fast; the subprocess tests cover the real command line of each role once."""
    capsys.readouterr()
    code = main([*args, "--dsn", dsn])
    out, err = capsys.readouterr()
    return code, out, err


def cli_ok(capsys: pytest.CaptureFixture[str], *args: str, dsn: str) -> str:
    code, out, err = cli(capsys, *args, dsn=dsn)
    assert code == 0 and err == "", (args, code, out, err)
    return out


def cli_refused(capsys: pytest.CaptureFixture[str], *args: str, dsn: str) -> str:
    code, out, err = cli(capsys, *args, dsn=dsn)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (args, code, out, err)
    return err


def denied(command: str, login: str, role: str) -> str:
    """The start of the one line a refused command prints."""
    return f'engine: error: {command}: permission denied: login role "{login}" lacks '


# ---------------------------------------------------------------------------------------------
# The migration


def test_every_table_has_a_grant_decision(conn: psycopg.Connection) -> None:
    """A later migration that adds a table without deciding who may touch it fails here."""
    assert store.privileges_ungranted_tables(conn) == []
    conn.execute("CREATE TABLE skiplock.forgotten (id int)")
    assert store.privileges_ungranted_tables(conn) == ["forgotten"]
    conn.rollback()


def test_roles_are_nologin_and_the_migration_runs_again(dsn: str, empty_dsn: str) -> None:
    rows = scalar(dsn, "SELECT jsonb_object_agg(rolname, rolcanlogin) FROM pg_roles WHERE rolname = ANY(%s)",
                  (list(roles.ROLES),))
    assert rows == {"skiplock_engine": False, "skiplock_operator": False, "skiplock_viewer": False}
    with db.connect(empty_dsn) as conn:  # a second database of the cluster: the roles exist already
        migrate(conn)
    text = (migrations_dir() / "0020_roles.sql").read_text()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(text)  # idempotent as a whole
    assert scalar(empty_dsn, "SELECT has_table_privilege('skiplock_viewer', 'skiplock.jobs', 'SELECT')") is True


# ---------------------------------------------------------------------------------------------
# Each role runs exactly its commands


def test_engine_role_runs_the_engine_and_others_are_refused(dsn: str, logins: dict[str, str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[global]\nworkers = 1\n[flows.noop]\n")  # the built-in noop flow, named
    register_flows(dsn, "noop")
    with Queue(dsn) as queue:
        queue.enqueue_many("noop", [{}] * 3)
    ok(engine("run", "--config", str(config), "--drain", dsn=as_login(dsn, logins["engine"]), timeout=120))
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 3
    line = one_line_error(engine("run", "--config", str(config), "--drain", dsn=as_login(dsn, logins["operator"])))
    assert line.startswith(denied("run", logins["operator"], roles.ENGINE)), line
    assert "SELECT, INSERT, UPDATE, DELETE on skiplock.ack_receipts; " in line, line
    assert line.endswith(f'GRANT skiplock_engine TO "{logins["operator"]}";\n'), line
    with db.connect(as_login(dsn, logins["viewer"])) as conn:  # the same check, for the viewer
        with pytest.raises(PrivilegeMissing) as refused:
            roles.require(conn, "run")
    assert str(refused.value).startswith(f'run: permission denied: login role "{logins["viewer"]}" lacks ')
    assert scalar(dsn, "SELECT count(*) FROM skiplock.workers WHERE state <> 'stopped'") == 0
    # no skiplock role migrates: that stays with the schema's owner
    line = cli_refused(capsys, "migrate", dsn=as_login(dsn, logins["engine"]))
    assert line.startswith("engine: error: migrate: permission denied (permission denied for database "), line
    assert "run it as the owner of the skiplock schema" in line, line


def test_operator_role_runs_the_operator_commands(dsn: str, logins: dict[str, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    register_flows(dsn, "emails")
    operator = as_login(dsn, logins["operator"])
    retried, purged = dead_letter(dsn), dead_letter(dsn)
    assert "retried 1" in ok(engine("dlq", "retry", str(retried), dsn=operator))  # the real command line once
    assert "purged 1" in cli_ok(capsys, "dlq", "purge", str(purged), dsn=operator)
    cli_ok(capsys, "cancel", str(retried), dsn=operator)
    cli_ok(capsys, "pause", "emails", dsn=operator)
    cli_ok(capsys, "resume", "emails", dsn=operator)
    cli_ok(capsys, "enqueue", "emails", "--payload", "{}", dsn=operator)
    cli_ok(capsys, "schedule", "add", "tick", "--flow", "emails", "--every", "1h", dsn=operator)
    cli_ok(capsys, "schedule", "trigger", "tick", dsn=operator)
    cli_ok(capsys, "schedule", "remove", "tick", dsn=operator)
    cli_ok(capsys, "status", dsn=operator)
    assert scalar(dsn, "SELECT status::text FROM skiplock.jobs_done WHERE id = %s", (retried,)) == "cancelled"


def test_viewer_role_reads_and_is_refused_every_change(dsn: str, logins: dict[str, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    register_flows(dsn, "emails")
    viewer, login = as_login(dsn, logins["viewer"]), logins["viewer"]
    job = dead_letter(dsn)
    ok(engine("status", dsn=viewer))
    cli_ok(capsys, "dlq", "list", dsn=viewer)
    cli_ok(capsys, "dlq", "show", str(job), dsn=viewer)
    cli_ok(capsys, "jobs", "list", dsn=viewer)
    cli_ok(capsys, "schedule", "list", dsn=viewer)
    assert cli(capsys, "health", dsn=viewer)[0] in (0, 1)  # degraded (no live worker), not refused
    line = one_line_error(engine("dlq", "retry", str(job), dsn=viewer))  # the real command line once
    assert line.startswith(denied("dlq retry", login, roles.OPERATOR)), line
    refused = {
        ("dlq", "retry", str(job)): "lacks INSERT, UPDATE, DELETE on skiplock.jobs;",
        ("dlq", "purge", str(job)): "lacks INSERT, UPDATE, DELETE on skiplock.jobs;",
        ("cancel", str(job)): "on skiplock.",
        ("pause", "emails"): "lacks INSERT, UPDATE on skiplock.flows;",
        ("enqueue", "emails", "--payload", "{}"): "on skiplock.",
        ("schedule", "add", "tick", "--flow", "emails", "--every", "1h"): "lacks INSERT, UPDATE, DELETE on skiplock.schedules;",
    }
    for args, lacks in refused.items():
        command = " ".join(a for a in args[:2] if not a.isdigit() and a != "emails")
        line = cli_refused(capsys, *args, dsn=viewer)
        assert line.startswith(denied(command, login, roles.OPERATOR)), line
        assert lacks in line and line.endswith(f'it needs role skiplock_operator: GRANT skiplock_operator TO "{login}";\n'), line
    assert scalar(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job,)) == "dead"
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 1
    assert scalar(dsn, "SELECT paused FROM skiplock.flows WHERE name = 'emails'") is False


def test_a_login_with_no_skiplock_role_is_told_which_to_grant(dsn: str, logins: dict[str, str]) -> None:
    login = logins["none"]
    line = one_line_error(engine("status", dsn=as_login(dsn, login)))
    assert line.startswith(denied("status", login, roles.VIEWER)), line
    assert "USAGE on schema skiplock" in line and line.endswith(f'GRANT skiplock_viewer TO "{login}";\n'), line


# ---------------------------------------------------------------------------------------------
# The console


def test_console_read_only_as_viewer_and_actions_refused_with_the_role_named(dsn: str, logins: dict[str, str]) -> None:
    register_flows(dsn, "emails")
    job = dead_letter(dsn)
    viewer = as_login(dsn, logins["viewer"])

    async def main() -> None:
        app = ConsoleApp(viewer, read_only=True, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.snapshots > 0 or app.database_down)
            assert app.snapshots > 0 and not app.database_down
        app = ConsoleApp(viewer, live=False)  # actions offered: the database refuses them, the console says why
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.snapshots > 0)
            app.post_message(RetryJobs([job]))
            await wait_until(pilot, lambda: app.last_action is not None)
            assert app.last_action.startswith(
                f'retried failed: console actions: permission denied: login role "{logins["viewer"]}" lacks '
                "INSERT, UPDATE, DELETE on skiplock.jobs;"), app.last_action
            assert app.last_action.endswith(f'GRANT skiplock_operator TO "{logins["viewer"]}";')

    asyncio.run(main())
    assert scalar(dsn, "SELECT status::text FROM skiplock.jobs WHERE id = %s", (job,)) == "dead"

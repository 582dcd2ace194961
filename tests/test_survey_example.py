"""The survey example end to end through real `engine run` processes: the embedded PostgreSQL as the
queue and results database, and a real ODBC source (a second database on the same server read through
psqlODBC, or a SQLite file through SQLite ODBC). Also: a source outage is retried until the job
completes, a missing survey is a permanent dead letter, and an engine without sources runs where pyodbc
cannot be imported while a flow that needs a source fails with a message naming the package.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from engine.embedded import EmbeddedPostgres
from engine.examples.survey.flow import ANSWERS_SQL, create_results_table, score
from engine.examples.survey.producer import EXAMPLE_CONFIG, enqueue_surveys, submitted_survey_ids
from engine.examples.survey.sample_data import create_source_data, sqlite_connection_string
from engine.queue import Queue
from engine.sources import Source, SourceConfig
from support.engines import SUPPORT_DIR, wait_for
from support.postgres import register_flows_for, scalar

ROOT = Path(__file__).resolve().parent.parent
MISSING = 999_999
_names = itertools.count()

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    """The flows these tests enqueue to, registered as an engine would (enqueue refuses unknown flows)."""
    register_flows_for(request, "survey", "rec")


@pytest.fixture
def surveyhub(pg_server: EmbeddedPostgres) -> Iterator[tuple[str, str]]:
    """(database name, ODBC connection string) of a fresh SurveyHub on the test PostgreSQL."""
    name = f"surveyhub_{os.getpid()}_{next(_names)}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name, (f"Driver={{PostgreSQL Unicode}};Servername={pg_server.socket_dir};Port={pg_server.port};"
                 f"Database={name};UID=skiplock")
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _prepare(dsn: str, connection_string: str, surveys: int) -> list[int]:
    submitted = create_source_data(connection_string, surveys)
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_results_table(conn)
    return submitted


def test_survey_flow_end_to_end(dsn, surveyhub, start_engine):
    _, odbc = surveyhub
    submitted = _prepare(dsn, odbc, 60)
    source = Source(SourceConfig("surveyhub", odbc))
    assert submitted_survey_ids(source) == submitted  # the producer reads them over ODBC
    expected = {i: score(source.query(ANSWERS_SQL, i)) for i in submitted[:5]}
    source.close()
    with Queue(dsn) as queue:
        enqueue_surveys(queue, [*submitted, MISSING], run_id="nightly")
        queue.enqueue("survey", {"survey_id": submitted[0]})  # a duplicate: the upsert keeps one row
    engine = start_engine(dsn, EXAMPLE_CONFIG.read_text(), "--workers", "2", "--drain",
                          env={"SURVEYHUB_ODBC": odbc})
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT survey_id, score, band, answers, times_processed FROM survey_results").fetchall()}
        assert sorted(rows) == submitted
        for survey_id, want in expected.items():
            assert rows[survey_id][:3] == (want.score, want.band, want.answers)
        assert rows[submitted[0]][3] == 2 and all(r[3] == 1 for i, r in rows.items() if i != submitted[0])
        assert all(Decimal(0) <= r[0] <= Decimal(100) for r in rows.values())
        # The missing survey: dead after one attempt, as a permanent error.
        dead = conn.execute("SELECT payload, attempts, error_type, error_message, errors->0->>'permanent' "
                            "FROM skiplock.jobs WHERE status = 'dead'").fetchall()
        assert dead == [({"survey_id": MISSING}, 1, "SurveyNotFound",
                         f"survey {MISSING} does not exist in surveyhub", "true")]
        # transactional = true in the example: each result was written in its job's batch transaction,
        # stamped with now() (the transaction's start, after the claim); the ack, the transaction's last
        # statement, stamps finished_at with its own clock (clock_timestamp), so never before it.
        together = conn.execute("SELECT count(*) FILTER (WHERE d.claimed_at <= r.processed_at"
                                " AND r.processed_at <= d.finished_at), count(*) "
                                "FROM survey_results r JOIN skiplock.jobs_done d ON d.id = r.job_id").fetchone()
        assert together == (len(submitted), len(submitted))
        assert conn.execute("SELECT completed, dead, finished_at IS NOT NULL FROM skiplock.runs "
                            "WHERE id = 'nightly'").fetchone() == (len(submitted), 1, True)


OUTAGE_CONFIG = """
[global]
heartbeat_interval = "1s"
stale_after = "5s"
poll_interval = "200ms"
[flows.survey]
handler = "engine.examples.survey.flow:process_survey"
sources = ["surveyhub"]
transactional = true
batch_size = 5
backoff = { base = "300ms", cap = "600ms", jitter = 0 }
[sources.surveyhub]
connection_string = "${SURVEYHUB_ODBC}"
timeout = "2s"
retries = 1
"""


def test_source_outage_is_retried_until_the_job_completes(dsn, pg_server, surveyhub, start_engine):
    name, odbc = surveyhub
    submitted = _prepare(dsn, odbc, 12)
    first, later = submitted[:4], submitted[4:8]
    engine = start_engine(dsn, OUTAGE_CONFIG, "--workers", "1", env={"SURVEYHUB_ODBC": odbc})
    with Queue(dsn) as queue:
        enqueue_surveys(queue, first, max_attempts=50)
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM survey_results") == 4, 30, message="first surveys")
        # The source goes away: new connections are refused and the worker's open one is cut.
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        enqueue_surveys(queue, later, max_attempts=50)
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM skiplock.jobs WHERE flow = 'survey' "
                                     "AND jsonb_array_length(errors) >= 2") >= 1, 30, message="failed attempts")
        assert scalar(dsn, "SELECT count(*) FROM survey_results") == 4
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        wait_for(lambda: scalar(dsn, "SELECT count(*) FROM survey_results") == 8, 30, message="recovery")
    engine.signal(signal.SIGTERM)
    assert engine.wait(30) == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        history = conn.execute("SELECT attempts, errors FROM skiplock.jobs_done WHERE payload->>'survey_id' = ANY(%s)",
                               ([str(i) for i in later],)).fetchall()
    assert len(history) == 4
    retried = [errors for attempts, errors in history if attempts > 1]
    assert retried, history
    messages = [e["message"] for errors in retried for e in errors]
    # The errors carry the SQLSTATE: refused connections (08001), or the cut one (57P01/08S01, or
    # HY000 with libpq's "terminating connection" when psqlODBC finds it cut while idle).
    assert all(any(s in m for s in ("08001", "57P01", "08S01", "terminating connection")) for m in messages), messages
    assert any("08001" in m and "not currently accepting connections" in m for m in messages), messages
    assert all(not e["permanent"] for errors in retried for e in errors)
    log = engine.log_path.read_text()
    assert "retrying in" in log and "source surveyhub reconnected" in log


def _shim(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with a pyodbc module that fails like a wheel without libodbc.so.2, and the file in
    which it records each import attempt."""
    shim = tmp_path / "no_unixodbc"
    shim.mkdir()
    attempts = tmp_path / "pyodbc-imports.txt"
    (shim / "pyodbc.py").write_text(
        "import os\n"
        f"with open({str(attempts)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "raise ImportError('libodbc.so.2: cannot open shared object file: No such file or directory')\n")
    return shim, attempts


def test_engine_without_sources_runs_where_pyodbc_cannot_load(dsn, start_engine, tmp_path):
    shim, attempts = _shim(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(shim), str(SUPPORT_DIR.parent), str(ROOT)]),
           "SKIPLOCK_TEST_RECORD": str(tmp_path / "record.txt")}
    plain = '[flows.rec]\nhandler = "support.handlers:record"\n'
    with Queue(dsn) as queue:
        queue.enqueue_many("rec", [{"n": i} for i in range(20)])
    engine = start_engine(dsn, plain, "--workers", "1", "--drain", env=env)
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done WHERE flow = 'rec'") == 20
    assert not attempts.exists(), "an engine without sources must not import pyodbc"

    # Same machine, a flow that needs a source: its job fails with the message naming the package.
    sqlite_file = tmp_path / "surveyhub.sqlite"
    create_source_data(sqlite_connection_string(sqlite_file), 3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_results_table(conn)
    with Queue(dsn) as queue:
        queue.enqueue("survey", {"survey_id": 1}, max_attempts=1)
    engine = start_engine(dsn, EXAMPLE_CONFIG.read_text(), "--workers", "1", "--drain",
                          env={**env, "SURVEYHUB_ODBC": sqlite_connection_string(sqlite_file)})
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]
    assert attempts.exists()
    row = psycopg.connect(dsn, autocommit=True).execute(
        "SELECT status::text, error_type, error_message FROM skiplock.jobs WHERE flow = 'survey'").fetchone()
    assert row[0] == "dead" and row[1] == "SourceDriverMissing", row
    assert "source 'surveyhub': cannot import pyodbc (libodbc.so.2" in row[2]
    assert "install the Debian package unixodbc" in row[2]
    # the notice is logged once, not per job (the job's own failure line, with error_type, is apart)
    notices = [line for line in engine.log_path.read_text().splitlines()
               if "cannot import pyodbc" in line and '"error_type"' not in line]
    assert len(notices) == 1, notices


def test_engine_dev_runs_the_survey_example(dsn, tmp_path):
    env = {**os.environ, "SKIPLOCK_DSN": dsn}
    env.pop("SURVEYHUB_ODBC", None)
    env.pop("SKIPLOCK_ENV", None)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "dev", "--example", "survey", "--workers", "1",
                             "--data-dir", str(tmp_path / "data"), "--seconds", "60"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "surveyhub.sqlite").exists()
    assert "dead letters: 1" in result.stdout and "SurveyNotFound" in result.stdout
    submitted = int(result.stdout.split(" submitted)")[0].rsplit("(", 1)[1].split()[-1])
    assert scalar(dsn, "SELECT count(*) FROM survey_results") == submitted > 100


# ---------------------------------------------------------------------------------------------
# the handler tested as users test theirs: engine.testing


def test_survey_handler_with_engine_testing(dsn, tmp_path, monkeypatch):
    from engine.examples.survey.flow import SurveyNotFound, process_survey
    from engine.testing import make_context, run_pending

    odbc = sqlite_connection_string(tmp_path / "surveyhub.sqlite")
    submitted = create_source_data(odbc, 6)
    source = Source(SourceConfig("surveyhub", odbc))
    with psycopg.connect(dsn) as conn:  # the test owns this connection and its transaction
        create_results_table(conn)
        ctx = make_context("survey", job_id=41, pg=conn, sources={"surveyhub": source})
        want = score(source.query(ANSWERS_SQL, submitted[0]))
        assert process_survey({"survey_id": submitted[0]}, ctx) == {"score": str(want.score), "band": want.band}
        assert conn.execute("SELECT score, job_id FROM survey_results").fetchall() == [(want.score, 41)]
        with pytest.raises(SurveyNotFound):
            process_survey({"survey_id": MISSING}, make_context("survey", pg=conn, sources={"surveyhub": source}))
        conn.commit()
    source.close()

    # The example's flow as the engine runs it, in-process: its config, its source, its dead letter.
    monkeypatch.setenv("SURVEYHUB_ODBC", odbc)
    with Queue(dsn) as queue:
        enqueue_surveys(queue, [*submitted, MISSING])
    outcomes = run_pending("survey", dsn=dsn, config=EXAMPLE_CONFIG)
    assert sorted(o.payload["survey_id"] for o in outcomes if o.status == "completed") == submitted
    [dead] = [o for o in outcomes if o.status == "dead"]
    assert dead.payload == {"survey_id": MISSING} and isinstance(dead.error, SurveyNotFound)
    assert scalar(dsn, "SELECT count(*) FROM survey_results") == len(submitted)

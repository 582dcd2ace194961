"""Source databases over ODBC, against real drivers and real databases.

One driver-agnostic conformance suite, parametrized over ODBC connection strings:
- psqlODBC's Unicode driver ("PostgreSQL Unicode", Debian odbc-postgresql) against the test PostgreSQL,
  through its Unix socket directory (psqlODBC takes a directory as Servername, like libpq's host);
- SQLite ODBC ("SQLite3", libsqliteodbc) on a temporary file;
- a real SQL Server when MSSQL_ODBC_CONNSTR is set (e.g. Driver={ODBC Driver 18 for SQL Server};...).
Then the measured driver quirks, a FreeTDS (tdsodbc) smoke test, error classification, and the
messages for a missing pyodbc, unixODBC or driver. .ci/run installs the drivers and fails if they are
missing, so nothing here skips for want of a driver.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import psycopg
import pyodbc
import pytest

from engine.embedded import EmbeddedPostgres
from engine.sources import (Source, SourceConfig, SourceDriverMissing, SourceRegistry, UnknownSource, driver_name,
                            driver_package, is_transient, needs_reconnect, sqlstate)

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count()


@dataclass
class Backend:
    id: str
    connection_string: str
    decimal_as_text: bool = False  # SQLite ODBC returns DECIMAL columns as str
    fast_decimal_ok: bool = True  # SQLite ODBC fails Decimal parameters under fast_executemany
    slow_sql: str | None = None  # runs ~3 s: for the query timeout
    kill: Callable[[Source], None] | None = None  # drops the source's connection from the server side
    unreachable: str | None = None  # a connection string whose server is not there


def _pg_kill(admin_dsn: str) -> Callable[[Source], None]:
    def kill(source: Source) -> None:
        pid = source.query_value("SELECT pg_backend_pid()")
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        time.sleep(0.05)
    return kill


def _mssql_kill(connection_string: str) -> Callable[[Source], None]:
    def kill(source: Source) -> None:
        spid = int(source.query_value("SELECT @@SPID"))
        admin = pyodbc.connect(connection_string, autocommit=True)
        try:
            admin.execute(f"KILL {spid}")
        finally:
            admin.close()
    return kill


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def source_db(pg_server: EmbeddedPostgres) -> str:
    """A database of its own on the test PostgreSQL, used as an ODBC source."""
    name = "odbc_conformance"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return name


def psqlodbc_string(server: EmbeddedPostgres, database: str, driver: str = "PostgreSQL Unicode") -> str:
    return f"Driver={{{driver}}};Servername={server.socket_dir};Port={server.port};Database={database};UID=skiplock"


@pytest.fixture(params=["postgresql", "sqlite", "mssql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgresql":
        server: EmbeddedPostgres = request.getfixturevalue("pg_server")
        database = request.getfixturevalue("source_db")
        return Backend("postgresql", psqlodbc_string(server, database), slow_sql="SELECT pg_sleep(3)",
                       kill=_pg_kill(server.dsn("postgres")),
                       unreachable=psqlodbc_string(server, database).replace(f"Port={server.port}",
                                                                             f"Port={free_port()}"))
    if request.param == "sqlite":
        return Backend("sqlite", f"Driver={{SQLite3}};Database={tmp_path / 'source.sqlite'}",
                       decimal_as_text=True, fast_decimal_ok=False)
    connection_string = os.environ.get("MSSQL_ODBC_CONNSTR")
    if not connection_string:
        pytest.skip("MSSQL_ODBC_CONNSTR is not set: no SQL Server to run the conformance suite against")
    return Backend("mssql", connection_string, slow_sql="WAITFOR DELAY '00:00:03'",
                   kill=_mssql_kill(connection_string))


@pytest.fixture
def source(backend: Backend) -> Iterator[Source]:
    src = Source(SourceConfig("conformance", backend.connection_string, timeout=10, retries=2))
    yield src
    src.close()


@pytest.fixture
def table(source: Source) -> Iterator[str]:
    name = f"conf_{os.getpid()}_{next(_names)}"
    source.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, name VARCHAR(50), amount DECIMAL(10, 2), "
                   "day DATE)")
    yield name
    source.execute(f"DROP TABLE {name}")


# --- the conformance suite -----------------------------------------------------------------------


def test_parameters_and_types_round_trip(backend: Backend, source: Source, table: str) -> None:
    day = dt.date(2024, 2, 29)
    assert source.execute(f"INSERT INTO {table} (id, name, amount, day) VALUES (?, ?, ?, ?)",
                          1, "Zoë", Decimal("12.34"), day) == 1
    source.execute(f"INSERT INTO {table} (id, name, amount, day) VALUES (?, ?, ?, ?)", 2, None, None, None)
    row = source.query_one(f"SELECT id, name, amount, day FROM {table} WHERE id = ?", 1)
    assert (row.id, row.name, row.day) == (1, "Zoë", day)
    assert isinstance(row.amount, str if backend.decimal_as_text else Decimal)
    assert Decimal(str(row.amount)) == Decimal("12.34")
    assert tuple(source.query_one(f"SELECT id, name, amount, day FROM {table} WHERE id = ?", 2)) == (2, None, None, None)
    assert source.query_one(f"SELECT id FROM {table} WHERE id = ?", 3) is None
    assert source.query_value(f"SELECT name FROM {table} WHERE name = ?", "Zoë") == "Zoë"
    assert source.query_value(f"SELECT count(*) FROM {table} WHERE id > ?", 0) == 2


def test_executemany_and_rowcounts(source: Source, table: str) -> None:
    source.executemany(f"INSERT INTO {table} (id, name) VALUES (?, ?)", [(i, f"n{i}") for i in range(100)])
    assert [tuple(r) for r in source.query(f"SELECT id, name FROM {table} WHERE id < ? ORDER BY id", 3)] == [
        (0, "n0"), (1, "n1"), (2, "n2")]
    assert source.execute(f"UPDATE {table} SET name = ? WHERE id >= ?", "big", 90) == 10
    assert source.execute(f"DELETE FROM {table} WHERE id < ?", 50) == 50
    assert source.query_value(f"SELECT count(*) FROM {table}") == 50


def test_fast_executemany_with_decimals(backend: Backend, source: Source, table: str) -> None:
    rows = [(i, f"n{i}", Decimal("1.25") * i, None) for i in range(20)]
    sql = f"INSERT INTO {table} (id, name, amount, day) VALUES (?, ?, ?, ?)"
    if backend.fast_decimal_ok:
        source.executemany(sql, rows, fast=True)
        assert source.query_value(f"SELECT count(*) FROM {table}") == 20
    else:  # measured quirk: SQLite ODBC + fast_executemany + Decimal
        with pytest.raises(pyodbc.Error, match="Converting decimal loses precision"):
            source.executemany(sql, rows, fast=True)
        source.executemany(sql, rows)  # plain executemany takes them
        assert source.query_value(f"SELECT count(*) FROM {table}") == 20


def test_transaction_commits_or_rolls_back(source: Source, table: str) -> None:
    with source.transaction() as cursor:
        cursor.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", 1, "kept")
    with pytest.raises(RuntimeError, match="undo"):
        with source.transaction() as cursor:
            cursor.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", 2, "undone")
            raise RuntimeError("undo")
    assert [tuple(r) for r in source.query(f"SELECT id, name FROM {table}")] == [(1, "kept")]
    assert source.connection.autocommit is True


def test_connection_is_opened_once_and_reused(source: Source) -> None:
    assert source.connects == 0  # lazily: nothing is opened before the first statement
    first = source.connection
    for _ in range(5):
        assert source.query_value("SELECT 1") == 1
    assert source.connection is first and source.connects == 1 and source.retries == 0


def test_reconnects_after_the_server_drops_the_connection(backend: Backend, source: Source) -> None:
    if backend.kill is None:
        pytest.skip(f"{backend.id}: no server that could drop the connection")
    assert source.query_value("SELECT 1") == 1
    backend.kill(source)
    assert source.query_value("SELECT 2") == 2  # transparently: reconnect and retry
    assert source.connects == 2 and source.retries == 1


def test_query_timeout_interrupts_a_slow_statement(backend: Backend) -> None:
    if backend.slow_sql is None:
        pytest.skip(f"{backend.id}: the driver accepts a query timeout but does not interrupt a running statement")
    source = Source(SourceConfig("slow", backend.connection_string, timeout=1, retries=0))
    try:
        started = time.monotonic()
        with pytest.raises(pyodbc.Error) as caught:
            source.query(backend.slow_sql)
        assert time.monotonic() - started < 2.5
        assert sqlstate(caught.value) in ("HYT00", "57014") and is_transient(caught.value)
        assert source.query_value("SELECT 1") == 1  # the source is usable afterwards
    finally:
        source.close()


def test_unreachable_server_is_transient_and_retried(backend: Backend) -> None:
    if backend.unreachable is None:
        pytest.skip(f"{backend.id}: no unreachable variant of this connection string")
    source = Source(SourceConfig("down", backend.unreachable, timeout=2, retries=2))
    started = time.monotonic()
    with pytest.raises(pyodbc.Error) as caught:
        source.query_value("SELECT 1")
    assert sqlstate(caught.value) == "08001" and is_transient(caught.value) and needs_reconnect(caught.value)
    assert source.retries == 2 and source.connects == 0
    assert time.monotonic() - started < 5


# --- measured quirks and drivers ---------------------------------------------------------------------


def test_psqlodbc_ansi_driver_rejects_string_parameters(pg_server: EmbeddedPostgres, source_db: str) -> None:
    """Why the docs say to use "PostgreSQL Unicode": the ANSI driver cannot bind a str parameter."""
    ansi = Source(SourceConfig("ansi", psqlodbc_string(pg_server, source_db, "PostgreSQL ANSI"), retries=0))
    unicode = Source(SourceConfig("unicode", psqlodbc_string(pg_server, source_db), retries=0))
    try:
        assert ansi.query_value("SELECT ?::int", 5) == 5
        with pytest.raises(pyodbc.Error) as caught:
            ansi.query_value("SELECT ?::text", "x")
        assert sqlstate(caught.value) == "HYC00" and not is_transient(caught.value)
        assert unicode.query_value("SELECT ?::text", "x") == "x"
    finally:
        ansi.close()
        unicode.close()


def test_sqlite_missing_file_with_nocreat_is_not_transient(tmp_path: Path) -> None:
    source = Source(SourceConfig("gone", f"Driver={{SQLite3}};Database={tmp_path / 'missing.sqlite'};NoCreat=1",
                                 retries=3))
    with pytest.raises(pyodbc.Error) as caught:
        source.query_value("SELECT 1")
    assert sqlstate(caught.value) == "HY000" and not is_transient(caught.value)
    assert source.retries == 0 and not (tmp_path / "missing.sqlite").exists()


def test_freetds_driver_loads_and_its_connection_errors_are_transient() -> None:
    assert "FreeTDS" in pyodbc.drivers()
    port = free_port()  # nothing listens there
    source = Source(SourceConfig("tds", f"Driver={{FreeTDS}};Server=127.0.0.1;Port={port};Database=x;UID=sa;"
                                        "PWD=not-a-secret;TDS_Version=7.4", timeout=2, retries=1))
    with pytest.raises(pyodbc.Error) as caught:
        source.query_value("SELECT 1")
    # The error comes from FreeTDS itself, so the driver library loaded; 08S01 is a link failure.
    assert "[FreeTDS]" in str(caught.value)
    assert sqlstate(caught.value) == "08S01" and is_transient(caught.value)
    assert source.retries == 1


# --- classification, drivers, registry (no database) ---------------------------------------------


@pytest.mark.parametrize(("state", "transient", "reconnect"), [
    ("08001", True, True), ("08S01", True, True), ("08003", True, True), ("08004", True, True),
    ("HYT00", True, True), ("HYT01", True, True), ("57P01", True, True), ("57P03", True, True),
    ("40001", True, False), ("40P01", True, False), ("57014", True, False),
    ("42S02", False, False), ("42P01", False, False), ("23000", False, False), ("28000", False, False),
    ("HY000", False, False), ("IM002", False, False),
])
def test_sqlstate_classification(state: str, transient: bool, reconnect: bool) -> None:
    exc = pyodbc.OperationalError(state, f"[{state}] something")
    assert sqlstate(exc) == state
    assert is_transient(exc) is transient and needs_reconnect(exc) is reconnect
    assert not is_transient(RuntimeError(state, "not an ODBC error"))


def test_psqlodbc_lost_connection_reported_as_general_error_is_transient() -> None:
    # Measured: a backend terminated while idle surfaces on the next statement as HY000.
    lost = pyodbc.Error("HY000", "[HY000] FATAL:  terminating connection due to administrator command\n"
                                 "server closed the connection unexpectedly (SQLExecDirectW)")
    assert is_transient(lost) and needs_reconnect(lost)
    assert not is_transient(pyodbc.Error("HY000", "[HY000] [SQLite]connect failed (14) (SQLDriverConnect)"))


def test_sqlstate_of_errors_pyodbc_raises_itself() -> None:
    assert sqlstate(pyodbc.Error("Converting decimal loses precision", "HY000")) == "HY000"
    assert sqlstate(pyodbc.ProgrammingError("Attempt to use a closed connection.")) is None


def test_driver_names_and_packages() -> None:
    assert driver_name("Driver={ODBC Driver 18 for SQL Server};Server=x") == "ODBC Driver 18 for SQL Server"
    assert driver_name("server=x; DRIVER = FreeTDS ;uid=a") == "FreeTDS"
    assert driver_name("DSN=surveyhub;UID=a") is None
    assert driver_package("PostgreSQL Unicode") == "odbc-postgresql"
    assert driver_package("sqlite3") == "libsqliteodbc"
    assert driver_package("FreeTDS") == "tdsodbc"
    assert driver_package("ODBC Driver 18 for SQL Server").startswith("msodbcsql18")


def test_unknown_driver_is_named_with_the_installed_ones() -> None:
    source = Source(SourceConfig("x", "Driver={No Such Driver};Server=h;UID=u;PWD=hunter2"))
    with pytest.raises(SourceDriverMissing) as caught:
        source.query_value("SELECT 1")
    message = str(caught.value)
    assert "ODBC driver 'No Such Driver' is not installed" in message
    assert "PostgreSQL Unicode" in message and "hunter2" not in message
    assert "hunter2" not in repr(source.config) and "PWD=***" in repr(source.config)


def _run_isolated(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=60)


def test_missing_and_broken_drivers_name_their_debian_package(tmp_path: Path) -> None:
    # An odbcinst.ini of our own: "SQLite3" registered with a library that is not there, and no
    # "PostgreSQL Unicode" at all.
    (tmp_path / "odbcinst.ini").write_text("[SQLite3]\nDriver=/nonexistent/libsqlite3odbc.so\n")
    result = _run_isolated("""
        from engine.sources import Source, SourceConfig, SourceDriverMissing
        for conn in ("Driver={PostgreSQL Unicode};Servername=/tmp;Database=x", "Driver={SQLite3};Database=/tmp/x"):
            try:
                Source(SourceConfig("s", conn)).query_value("SELECT 1")
            except SourceDriverMissing as exc:
                print(exc)
    """, {"ODBCSYSINI": str(tmp_path), "ODBCINSTINI": "odbcinst.ini"})
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert "ODBC driver 'PostgreSQL Unicode' is not installed" in lines[0]
    assert "apt-get install odbc-postgresql" in lines[0]
    assert "'SQLite3' is registered in odbcinst.ini but its library cannot be loaded" in lines[1]
    assert "reinstall the Debian package libsqliteodbc" in lines[1]


def test_engine_imports_no_pyodbc_until_a_source_is_used() -> None:
    result = _run_isolated("""
        import sys
        import engine.cli, engine.supervisor, engine.worker, engine.sources, engine.examples.survey.flow
        from engine.sources import SourceRegistry
        registry = SourceRegistry({"s": {"connection_string": "Driver={SQLite3};Database=:memory:"}})
        source = registry.for_flow("f", ["s"])["s"]
        assert "pyodbc" not in sys.modules, "imported too early"
        assert source.query_value("SELECT 1") == 1
        assert "pyodbc" in sys.modules
        print("ok")
    """, {})
    assert result.stdout.strip() == "ok", result.stdout + result.stderr


def test_missing_unixodbc_names_the_package(tmp_path: Path) -> None:
    shim = tmp_path / "pyodbc.py"
    shim.write_text('raise ImportError("libodbc.so.2: cannot open shared object file: No such file or directory")\n')
    result = _run_isolated("""
        from engine.sources import Source, SourceConfig, SourceDriverMissing
        try:
            Source(SourceConfig("surveyhub", "Driver={SQLite3};Database=/tmp/x")).query_value("SELECT 1")
        except SourceDriverMissing as exc:
            print(exc)
    """, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert "source 'surveyhub': cannot import pyodbc (libodbc.so.2" in result.stdout, result.stdout + result.stderr
    assert "install the Debian package unixodbc" in result.stdout


def test_flow_sources_refuse_undeclared_names() -> None:
    registry = SourceRegistry({"a": {"connection_string": "Driver={SQLite3};Database=:memory:"},
                               "b": {"connection_string": "Driver={SQLite3};Database=:memory:"}})
    sources = registry.for_flow("survey", ["a"])
    assert list(sources) == ["a"] and len(sources) == 1 and "b" not in sources
    assert sources["a"] is registry.get("a")  # one Source per process, shared by the flows that use it
    with pytest.raises(UnknownSource, match=r"flow 'survey' does not declare source 'b' \(its sources: a\)"):
        sources["b"]
    with pytest.raises(UnknownSource, match=r"source 'c' is not configured \(declared: a, b\)"):
        registry.get("c")


def test_source_config_from_settings() -> None:
    config = SourceConfig.from_settings("s", {"connection_string": "DSN=x", "timeout": 2.5, "retries": 0})
    assert (config.timeout, config.retries) == (2.5, 0)
    config = SourceConfig.from_settings("s", {"connection_string": "DSN=x"})
    assert (config.timeout, config.retries) == (None, 3)

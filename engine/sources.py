"""Source databases over ODBC: the systems a flow reads from (SQL Server "SurveyHub" in the seeds).

A worker process opens each source it needs lazily, on the first statement a handler runs against it,
and keeps that one connection for the life of the process. pyodbc is imported at that moment, not
before: an engine whose flows use no source never loads pyodbc, so it runs on a machine without
unixODBC. When pyodbc, unixODBC or the ODBC driver is missing, `SourceDriverMissing` says which one
and which Debian package provides it.

Statements are retried with tenacity when they fail with a transient error, classified by SQLSTATE
(the first element of a pyodbc error's args), reconnecting first when the error says the connection is
gone:

| SQLSTATE | meaning | reconnect |
| --- | --- | --- |
| `08xxx` | connection exception: 08001 cannot connect, 08S01 communication link failure, 08003 connection not open, 08004 rejected, 08007 failure during transaction | yes |
| `HYT00` | timeout expired (query timeout; the Microsoft driver's login timeout) | yes |
| `HYT01` | connection timeout expired | yes |
| `57P01` `57P02` `57P03` | PostgreSQL (via psqlODBC): backend terminated, server crashed, server starting up | yes |
| `53300` | PostgreSQL: too many connections | yes |
| `40001` | serialization failure; SQL Server reports its deadlock victim (error 1205) this way | no |
| `40P01` | PostgreSQL deadlock detected | no |
| `57014` | PostgreSQL: statement cancelled (how psqlODBC reports our query timeout) | no |
| `HY000` with libpq's words for a lost connection | psqlODBC reports a connection the server ended while it was idle as a general error ("server closed the connection unexpectedly", "terminating connection ...") | yes |

Everything else (syntax errors, missing tables, constraint violations, bad credentials reported as
28000) is raised at once. After `retries` retries the last error is raised to the handler; the job then
fails like any other transient error and the queue retries it after its flow's backoff.

Inside `Source.transaction()` statements are not retried one by one (a retry cannot replay the
statements before it); a transient error there drops the connection and is raised.

Query timeout: `timeout` sets pyodbc's `Connection.timeout` (SQL_ATTR_QUERY_TIMEOUT on every
statement) and the login timeout. psqlODBC refuses that attribute, so on PostgreSQL sources the
session's `statement_timeout` is set instead. SQLite's ODBC driver accepts it but does not interrupt a
running statement.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from engine.errors import ConfigError
from engine.redact import describe_error, redact_dsn

__all__ = [
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_RETRIES",
    "FlowSources",
    "Source",
    "SourceConfig",
    "SourceDriverMissing",
    "SourceRegistry",
    "UnknownSource",
    "driver_name",
    "driver_package",
    "is_transient",
    "load_pyodbc",
    "needs_reconnect",
    "sqlstate",
]

log = logging.getLogger("skiplock.sources")

DEFAULT_RETRIES: Final = 3
DEFAULT_LOGIN_TIMEOUT: Final = 15.0  # seconds, when the source sets no `timeout`
RETRY_WAIT_BASE: Final = 0.2  # seconds; doubles per retry
RETRY_WAIT_CAP: Final = 5.0
RETRY_JITTER: Final = 0.1

# SQLSTATE (or class prefix) -> reconnect before retrying. See the table in the module docstring.
_TRANSIENT_CLASSES: Final[dict[str, bool]] = {"08": True}
_TRANSIENT_STATES: Final[dict[str, bool]] = {
    "HYT00": True,
    "HYT01": True,
    "57P01": True,
    "57P02": True,
    "57P03": True,
    "53300": True,
    "40001": False,
    "40P01": False,
    "57014": False,
}
_SQLSTATE_RE: Final = re.compile(r"[0-9A-Z]{5}")
# HY000 is "general error"; psqlODBC uses it, with libpq's text, for a connection lost while idle.
_LOST_CONNECTION_TEXT: Final = (
    "server closed the connection unexpectedly",
    "terminating connection",
    "no connection to the server",
    "could not send data to server",
    "could not receive data from server",
    "connection has been lost",
)

# Driver names as registered by the Debian packages (odbcinst.ini) -> the package that provides them.
_DRIVER_PACKAGES: Final[dict[str, str]] = {
    "postgresql unicode": "odbc-postgresql",
    "postgresql ansi": "odbc-postgresql",
    "sqlite3": "libsqliteodbc",
    "sqlite": "libsqliteodbc",
    "freetds": "tdsodbc",
    "odbc driver 18 for sql server": "msodbcsql18 (from Microsoft's package repository, packages.microsoft.com)",
    "odbc driver 17 for sql server": "msodbcsql17 (from Microsoft's package repository, packages.microsoft.com)",
    "mariadb unicode": "odbc-mariadb",
    "mariadb": "odbc-mariadb",
}
_DRIVER_RE: Final = re.compile(r"(?i)(?:^|;)\s*driver\s*=\s*(\{(?:[^}]|\}\})*\}|[^;]*)")
_UNIXODBC_HINT: Final = ("pyodbc needs the unixODBC library: install the Debian package unixodbc "
                         "(apt-get install unixodbc; on Fedora/RHEL: dnf install unixODBC)")


class SourceDriverMissing(ConfigError):
    """pyodbc, the unixODBC library or a source's ODBC driver is not installed. The message names the
    missing piece and the package that provides it."""


class UnknownSource(KeyError):
    """A handler asked for a source its flow does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown source"


# --- classification --------------------------------------------------------------------------------


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a pyodbc error: args are (sqlstate, message), or (message, sqlstate) for a few
    errors pyodbc raises itself."""
    for arg in exc.args[:2]:
        if isinstance(arg, str) and _SQLSTATE_RE.fullmatch(arg):
            return arg
    return None


def _transient_rule(exc: BaseException) -> bool | None:
    """None: not transient; else whether to reconnect first."""
    if type(exc).__module__ != "pyodbc":
        return None
    state = sqlstate(exc)
    if state is None:
        return None
    if state in _TRANSIENT_STATES:
        return _TRANSIENT_STATES[state]
    if state == "HY000":
        text = str(exc)
        return True if any(words in text for words in _LOST_CONNECTION_TEXT) else None
    return _TRANSIENT_CLASSES.get(state[:2])


def is_transient(exc: BaseException) -> bool:
    """True for ODBC errors worth retrying: lost or refused connections, timeouts, deadlocks."""
    return _transient_rule(exc) is not None


def needs_reconnect(exc: BaseException) -> bool:
    return bool(_transient_rule(exc))


# --- drivers ---------------------------------------------------------------------------------------


def driver_name(connection_string: str) -> str | None:
    """The Driver= value of an ODBC connection string, without braces (None for DSN= strings)."""
    match = _DRIVER_RE.search(connection_string)
    if match is None:
        return None
    value = match.group(1).strip()
    if value.startswith("{") and value.endswith("}"):
        value = value[1:-1].replace("}}", "}")
    return value or None


def driver_package(driver: str) -> str | None:
    """The Debian package that provides an ODBC driver, for the names its odbcinst.ini registers."""
    return _DRIVER_PACKAGES.get(driver.strip().lower())


def load_pyodbc(source: str) -> Any:
    """Import pyodbc now (it loads libodbc.so.2); a missing library becomes a SourceDriverMissing."""
    try:
        import pyodbc  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise SourceDriverMissing(f"source {source!r}: cannot import pyodbc ({exc}); {_UNIXODBC_HINT}, "
                                  "and pip install pyodbc") from None
    return pyodbc


def _missing_driver(source: str, driver: str | None, exc: BaseException, installed: Sequence[str]) -> str:
    message = str(exc.args[1] if len(exc.args) > 1 else exc)
    if driver is None:
        return (f"source {source!r}: the ODBC driver manager cannot find the data source ({message}); "
                "name a driver with Driver={...} or define the DSN in odbc.ini")
    package = driver_package(driver)
    install = (f"install the Debian package {package} (apt-get install {package.split(' ')[0]})" if package
               else "install its package and check that odbcinst -q -d lists it")
    if driver in installed:
        return (f"source {source!r}: ODBC driver {driver!r} is registered in odbcinst.ini but its library "
                f"cannot be loaded ({message}); re{install}")
    listed = ", ".join(installed) if installed else "none"
    return f"source {source!r}: ODBC driver {driver!r} is not installed (installed drivers: {listed}); {install}"


def _is_missing_driver_error(exc: BaseException) -> bool:
    state = sqlstate(exc)
    text = str(exc)
    return state == "IM002" or (state in ("01000", "HY000") and "Can't open lib" in text)


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    name: str
    connection_string: str
    timeout: float | None = None  # seconds: query timeout and login timeout
    retries: int = DEFAULT_RETRIES

    @classmethod
    def from_settings(cls, name: str, table: Mapping[str, object]) -> "SourceConfig":
        """From one entry of `Settings.sources`."""
        timeout = table.get("timeout")
        retries = table.get("retries")
        return cls(name=name, connection_string=str(table["connection_string"]),
                   timeout=float(timeout) if isinstance(timeout, (int, float)) else None,
                   retries=int(retries) if isinstance(retries, int) else DEFAULT_RETRIES)

    def __repr__(self) -> str:  # the connection string may carry a password
        return (f"SourceConfig(name={self.name!r}, connection_string={redact_dsn(self.connection_string)!r}, "
                f"timeout={self.timeout!r}, retries={self.retries!r})")

    @property
    def driver(self) -> str | None:
        return driver_name(self.connection_string)


# --- one source ------------------------------------------------------------------------------------


class Source:
    """One ODBC connection to a source database, opened on first use and reused; autocommit.

    Parameters use the ODBC placeholder `?` whatever the database:
    `source.query("SELECT id FROM surveys WHERE status = ?", "submitted")`.
    """

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.connects = 0  # connections opened so far (1 as long as none was lost)
        self.retries = 0  # statements retried after a transient error
        self._conn: Any = None
        self._in_transaction = False
        self._missing_logged = False

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<Source {self.name} driver={self.config.driver!r} {state}>"

    # connection

    @property
    def connection(self) -> Any:
        """The pyodbc connection, opened (with retries) if needed. Statements run on it directly are not
        retried; prefer query/execute."""
        if self._conn is None:
            for attempt in self._retrying("connect"):
                with attempt:
                    self._open()
        return self._conn

    def _open(self) -> None:
        config = self.config
        pyodbc = self._pyodbc()
        login_timeout = math.ceil(config.timeout) if config.timeout else math.ceil(DEFAULT_LOGIN_TIMEOUT)
        try:
            conn = pyodbc.connect(config.connection_string, autocommit=True, timeout=login_timeout)
        except Exception as exc:
            if not _is_missing_driver_error(exc):
                raise
            try:
                installed = list(pyodbc.drivers())
            except Exception:  # pragma: no cover - the driver manager itself is broken
                installed = []
            raise self._missing(_missing_driver(self.name, config.driver, exc, installed)) from None
        try:
            if config.timeout:
                self._set_query_timeout(conn, math.ceil(config.timeout))
        except BaseException:
            _close_quietly(conn)
            raise
        self._conn = conn
        self.connects += 1
        if self.connects > 1:
            log.info("source %s reconnected", self.name, extra={"source": self.name, "connects": self.connects})

    def _pyodbc(self) -> Any:
        try:
            return load_pyodbc(self.name)
        except SourceDriverMissing as exc:
            raise self._missing(str(exc)) from None

    def _missing(self, message: str) -> SourceDriverMissing:
        """The error for a missing library or driver, logged once per process (every job then fails
        with it, so the log would repeat it per job otherwise)."""
        if not self._missing_logged:
            self._missing_logged = True
            log.error(message, extra={"source": self.name})
        return SourceDriverMissing(message)

    def _set_query_timeout(self, conn: Any, seconds: int) -> None:
        try:
            conn.timeout = seconds
            return
        except Exception as exc:
            if sqlstate(exc) not in ("HY000", "HYC00", "HY092"):  # "unsupported attribute"
                raise
        dbms = str(conn.getinfo(_pyodbc_const("SQL_DBMS_NAME")) or "")
        if dbms.lower().startswith("postgres"):
            conn.execute(f"SET statement_timeout = {seconds * 1000}")
        else:
            log.warning("source %s: the %s driver has no query timeout; statements run unbounded",
                        self.name, dbms or "ODBC", extra={"source": self.name})

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def close(self) -> None:
        self._drop()

    # retries

    def _retrying(self, what: str) -> Retrying:
        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception()
            self.retries += 1
            log.warning("source %s: %s failed with SQLSTATE %s, retrying in %.1fs (retry %d of %d): %s",
                        self.name, what, sqlstate(exc), state.upcoming_sleep, state.attempt_number,
                        self.config.retries, describe_error(exc), extra={"source": self.name})

        return Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.config.retries + 1),
            wait=wait_exponential(multiplier=RETRY_WAIT_BASE, max=RETRY_WAIT_CAP) + wait_random(0, RETRY_JITTER),
            before_sleep=before_sleep,
            reraise=True,
        )

    def _run(self, what: str, action: Callable[[Any], Any]) -> Any:
        if self._in_transaction:
            return action(self._conn)
        for attempt in self._retrying(what):
            with attempt:
                if self._conn is None:
                    self._open()  # one try per attempt: this loop is the retry
                conn = self._conn
                try:
                    return action(conn)
                except Exception as exc:
                    if needs_reconnect(exc):
                        self._drop()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - Retrying re-raises

    # statements

    def query(self, sql: str, *params: Any) -> list[Any]:
        """All rows (pyodbc.Row: index or attribute access)."""
        return self._run("query", lambda conn: conn.execute(sql, *params).fetchall())

    def query_one(self, sql: str, *params: Any) -> Any:
        """The first row, or None."""
        return self._run("query", lambda conn: conn.execute(sql, *params).fetchone())

    def query_value(self, sql: str, *params: Any) -> Any:
        """The first column of the first row, or None when there is no row."""
        row = self.query_one(sql, *params)
        return None if row is None else row[0]

    def execute(self, sql: str, *params: Any) -> int:
        """Run a statement; returns its row count (-1 when the driver does not know)."""
        return int(self._run("execute", lambda conn: conn.execute(sql, *params).rowcount))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], *, fast: bool = False) -> None:
        """One statement, many parameter rows. `fast` sets pyodbc's fast_executemany (parameter arrays):
        much faster on SQL Server; SQLite's driver rejects Decimal parameters with it."""
        data = list(rows)

        def run(conn: Any) -> None:
            cursor = conn.cursor()
            try:
                cursor.fast_executemany = fast
                cursor.executemany(sql, data)
            finally:
                cursor.close()

        if data:
            self._run("executemany", run)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A pyodbc cursor in one source transaction: committed when the block ends, rolled back when it
        raises. Statements inside are not retried one by one."""
        if self._in_transaction:
            raise RuntimeError(f"source {self.name}: transactions do not nest")
        conn = self.connection
        cursor = None
        conn.autocommit = False
        self._in_transaction = True
        try:
            cursor = conn.cursor()
            yield cursor
            conn.commit()
        except BaseException as exc:
            try:
                conn.rollback()
            except Exception:
                self._drop()
            if isinstance(exc, Exception) and needs_reconnect(exc):
                self._drop()
            raise
        finally:
            self._in_transaction = False
            if cursor is not None:
                _close_quietly(cursor)
            if self._conn is not None:
                try:
                    self._conn.autocommit = True
                except Exception:
                    self._drop()


def _pyodbc_const(name: str) -> Any:
    import pyodbc  # type: ignore[import-not-found,unused-ignore]

    return getattr(pyodbc, name)


def _close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:
        pass




# --- all sources of one worker process ---------------------------------------------------------------


class SourceRegistry:
    """The sources of one worker process, each opened once, on first use. Never create connections
    before a fork: the registry is built in the worker, and builds nothing until a handler asks."""

    def __init__(self, tables: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self._configs = {name: SourceConfig.from_settings(name, table) for name, table in (tables or {}).items()}
        self._sources: dict[str, Source] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._configs

    def get(self, name: str) -> Source:
        source = self._sources.get(name)
        if source is None:
            config = self._configs.get(name)
            if config is None:
                declared = ", ".join(self._configs) or "none"
                raise UnknownSource(f"source {name!r} is not configured (declared: {declared})")
            source = self._sources[name] = Source(config)
        return source

    def for_flow(self, flow: str, names: Sequence[str]) -> "FlowSources":
        return FlowSources(self, flow, tuple(names))

    def close(self) -> None:
        for source in self._sources.values():
            source.close()


class FlowSources(Mapping[str, Source]):
    """`ctx.sources`: the sources a flow declares (`sources = [...]`), by name."""

    __slots__ = ("_registry", "_flow", "_names")

    def __init__(self, registry: SourceRegistry, flow: str, names: tuple[str, ...]) -> None:
        self._registry = registry
        self._flow = flow
        self._names = names

    def __getitem__(self, name: str) -> Source:
        if name not in self._names:
            declared = ", ".join(self._names) or "none"
            raise UnknownSource(f"flow {self._flow!r} does not declare source {name!r} (its sources: {declared}); "
                                f"add it to sources = [...] in [flows.{self._flow}]")
        return self._registry.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

"""Connections: one place that opens them, so every connection gets the same settings."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import psycopg.types.json

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

# jsonb arrives decoded by orjson: several times faster than json.loads on the claim path.
psycopg.types.json.set_json_loads(orjson.loads)

CONNECT_TIMEOUT_S = 5
RECONNECT_FIRST_S = 0.1
RECONNECT_CAP_S = 0.5


@functools.cache
def _bound_pool_backoff() -> None:
    """psycopg_pool waits 1, 2, 4, 8 s... between reconnect tries, so after an outage a worker
    would lag the database's return by up to that. Ours: 0.1 s, then at most every 0.5 s. Done at
    the first pool: the supervisor opens none, so `engine run` loads psycopg_pool in workers only."""
    import psycopg_pool.pool
    from psycopg_pool.base import AttemptWithBackoff

    class _BoundedBackoff(AttemptWithBackoff):
        INITIAL_DELAY = RECONNECT_FIRST_S

        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, RECONNECT_CAP_S)

    # psycopg_pool offers no parameter for its backoff: its module-level name is the one hook there is.
    psycopg_pool.pool.AttemptWithBackoff = _BoundedBackoff  # type: ignore[misc]


def _options(application_name: str, statement_timeout_ms: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"application_name": application_name, "connect_timeout": CONNECT_TIMEOUT_S}
    if statement_timeout_ms is not None:
        options["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return options


def connect(
    dsn: str,
    *,
    application_name: str = "skiplock",
    autocommit: bool = True,
    statement_timeout_ms: int | None = None,
) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=autocommit, **_options(application_name, statement_timeout_ms))
    try:
        fit_to_pooler(conn, dsn)
    except BaseException:
        conn.close()
        raise
    return conn


# -- PgBouncer in transaction mode ------------------------------------------------------------------
# Each transaction may run on a different server connection, so (1) a statement psycopg prepared on
# one may not exist on the next: connections through a pooler get prepare_threshold=None (PgBouncer
# 1.21's max_prepared_statements would keep them, but Debian 12 ships 1.18, and direct connections
# keep psycopg's preparation on the hot path either way); (2) LISTEN would hear nothing once its
# transaction ends, so `listen()` refuses a pooled connection. A pooler is recognised because it
# answers the startup with a cancel key of its own: the backend pid the client was told is not the
# server's pg_backend_pid(). Known per DSN, found out once per process.
_POOLED: dict[str, bool] = {}


def through_pooler(conn: psycopg.Connection[Any], dsn: str) -> bool:
    if dsn not in _POOLED:
        from engine import store  # the store imports nothing of ours that imports this module back

        _POOLED[dsn] = store.backend_pid(conn) != conn.info.backend_pid
    return _POOLED[dsn]


def known_pooled(dsn: str) -> bool:
    """Whether a connection of this process to `dsn` went through a pooler (False: none seen yet)."""
    return _POOLED.get(dsn, False)


def fit_to_pooler(conn: psycopg.Connection[Any], dsn: str) -> None:
    if through_pooler(conn, dsn):
        conn.prepare_threshold = None


def listen(conn: psycopg.Connection[Any], channel: str, key: str = "listen_dsn") -> None:
    """LISTEN on a direct connection; one clear line when it goes through a pooler."""
    from engine import store
    from engine.errors import ConfigError

    if store.backend_pid(conn) != conn.info.backend_pid:
        raise ConfigError(f"LISTEN {channel} goes through a connection pooler (PgBouncer?), where "
                          f"notifications are lost: set {key} to a direct PostgreSQL connection")
    store.listen(conn, channel)


def open_pool(
    dsn: str,
    *,
    application_name: str = "skiplock",
    min_size: int = 1,
    max_size: int = 4,
    name: str | None = None,
) -> ConnectionPool:
    """Open a pool in the calling process. Never create one before a fork: the children would share
    its sockets ("5 pools, 4 of which with broken connections")."""
    from psycopg_pool import ConnectionPool

    _bound_pool_backoff()
    pool = ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True, **_options(application_name, None)},
        configure=lambda conn: fit_to_pooler(conn, dsn),
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool

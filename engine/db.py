"""Connections: one place that opens them, so every connection gets the same settings."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import psycopg.types.json
import psycopg_pool.pool
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

# jsonb arrives decoded by orjson: several times faster than json.loads on the claim path.
psycopg.types.json.set_json_loads(orjson.loads)

CONNECT_TIMEOUT_S = 5
RECONNECT_FIRST_S = 0.1
RECONNECT_CAP_S = 0.5


class _BoundedBackoff(AttemptWithBackoff):
    """psycopg_pool waits 1, 2, 4, 8 s... between reconnect tries, so after an outage a worker
    would lag the database's return by up to that. Ours: 0.1 s, then at most every 0.5 s."""

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
    return psycopg.connect(dsn, autocommit=autocommit, **_options(application_name, statement_timeout_ms))


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
    pool = ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True, **_options(application_name, None)},
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool

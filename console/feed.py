"""The live feed: one dedicated async connection that LISTENs and turns notifications into messages.

It listens on `skiplock_events` (every telemetry event, see engine/telemetry.py, including pause and
resume from `engine pause`, the API or another console). Notifications that arrive
together are posted as one `FeedEvents` message, so 16 workers ticking every second cost the app
a few messages a second, whatever the job rate. A notification is a hint that something changed:
counts that must be exact are re-read from the tables.

The connection is autocommit, named `skiplock-console`, with a statement_timeout shorter than the
refresh interval. When it breaks (server restart, network) the feed says so (`FeedStatus`) and
reconnects by itself with a capped backoff; while idle it pings the server so a dead connection is
noticed within `keepalive` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
import psycopg
from textual.message import Message

from console.data import APPLICATION_NAME, statement_timeout_ms
from console.messages import FeedEvents, FeedStatus
from engine import store
from engine.errors import SkiplockError
from engine.db import CONNECT_TIMEOUT_S
from engine.redact import describe_error
from engine.telemetry import ENQUEUED_CHANNEL, EVENT_VERSION, AnyEvent

KEEPALIVE_S: Final = 5.0
BATCH_WINDOW_S: Final = 0.02  # after the first notification, wait this long for the rest of a burst
BATCH_MAX: Final = 500
BACKOFF_S: Final = (0.5, 1.0, 2.0, 4.0, 5.0)

def decode(payload: str) -> AnyEvent | None:
    """One event, or None for a payload that is not a version-1 event (ignored, never fatal).
    Only `v` and `kind` are checked here; LiveState.apply reads the other fields defensively."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("v") != EVENT_VERSION or not isinstance(event.get("kind"), str):
        return None
    return event  # type: ignore[return-value]


class Feed:
    """Run `await feed.run()` in a Textual worker; it posts to `post` until cancelled."""

    def __init__(self, dsn: str, post: Callable[[Message], Any], *, refresh_interval: float = 2.0,
                 clock: Callable[[], float] = time.time, keepalive: float = KEEPALIVE_S) -> None:
        self.dsn = dsn
        self.post = post
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.keepalive = keepalive
        self.connected = False
        self.ignored = 0

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, application_name=APPLICATION_NAME, connect_timeout=CONNECT_TIMEOUT_S,
            options=f"-c statement_timeout={statement_timeout_ms(self.refresh_interval)}")
        if await store.backend_pid_async(conn) != conn.info.backend_pid:  # engine/db.py: a pooler's cancel key
            await conn.close()
            raise SkiplockError("LISTEN goes through a connection pooler (PgBouncer?), where notifications are "
                                "lost: set listen_dsn to a direct PostgreSQL connection")
        await store.console_listen(conn)  # LISTEN on telemetry.EVENTS_CHANNEL
        return conn

    async def run(self) -> None:
        failures = 0
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self.connect()
                failures = 0
                self.connected = True
                self.post(FeedStatus(True, at=self.clock()))
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke the connection (or a bug), report and reconnect
                if self.connected or failures == 0:
                    self.post(FeedStatus(False, describe_error(exc), at=self.clock()))
                self.connected = False
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    try:
                        await conn.close()
                    except Exception:  # a broken connection may fail to close; it is gone either way
                        pass

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            batch: list[psycopg.Notify] = []
            # stop_after ends the generator itself (a `break` would leave it holding the connection's lock)
            async for notify in conn.notifies(timeout=self.keepalive, stop_after=1):
                batch.append(notify)
            if not batch:
                # Nothing for `keepalive` seconds: make sure the server is still there.
                await asyncio.wait_for(store.health_ping_async(conn), timeout=CONNECT_TIMEOUT_S)
                continue
            async for notify in conn.notifies(timeout=BATCH_WINDOW_S, stop_after=BATCH_MAX):
                batch.append(notify)
            events = []
            for notify in batch:
                if notify.channel == ENQUEUED_CHANNEL:
                    continue
                event = decode(notify.payload)
                if event is None:
                    self.ignored += 1
                else:
                    events.append(event)
            if events:
                self.post(FeedEvents(events))

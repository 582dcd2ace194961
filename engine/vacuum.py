"""Keeps the hot table small between autovacuum's visits.

Every completed job leaves two dead row versions in skiplock.jobs (the claim's UPDATE, the ack's
DELETE). Autovacuum looks at a table once per `autovacuum_naptime` (server-wide, 1 min by default),
so a queue moving 50,000 jobs/s piles up millions of dead tuples in between and the table grows to
hold them (1.35 GB in 5 minutes in the soak of issue 17). One engine of the fleet (an advisory lock)
reads the dead-tuple count every `vacuum_check_interval` and runs `VACUUM (SKIP_LOCKED)` on the
table past `vacuum_dead_tuples`, so the space is reused instead of added to. A thread of the
supervisor with its own connection: a long VACUUM never delays reaping, rescue or the drain check.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

import psycopg

from engine import db, store

log = logging.getLogger("skiplock.engine")

FOLLOWER_BACKOFF: Final = 15  # intervals an engine that is not the vacuum leader waits before asking again


class VacuumThread:
    def __init__(self, dsn: str, application_name: str, threshold: int, interval: float) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.threshold = threshold
        self.interval = interval
        self.vacuums = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.threshold <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="vacuum", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        leader = False
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                if conn is None or conn.closed:
                    conn, leader = db.connect(self.dsn, application_name=self.application_name), False
                if not leader:
                    leader = store.vacuum_leader(conn)
                if not leader:  # another engine vacuums: hold no connection, ask again much later
                    conn.close()
                    conn, wait = None, self.interval * FOLLOWER_BACKOFF
                    continue
                wait = self.interval
                if store.jobs_dead_tuples(conn) >= self.threshold:
                    started = time.monotonic()
                    store.jobs_vacuum(conn)
                    self.vacuums += 1
                    log.debug("vacuumed skiplock.jobs", extra={"seconds": round(time.monotonic() - started, 3)})
            except psycopg.Error as exc:  # an outage or a lost connection: try again next interval
                log.debug("vacuum pass failed: %s", exc)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

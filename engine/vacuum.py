"""Keeps the hot table small between autovacuum's visits.

Every completed job leaves two dead row versions in skiplock.jobs (the claim's UPDATE, the ack's
DELETE). Autovacuum looks at a table once per `autovacuum_naptime` (server-wide, 1 min by default),
so a queue moving 50,000 jobs/s piles up millions of dead tuples in between and the table grows to
hold them (1.35 GB in 5 minutes in the soak of issue 17). One engine of the fleet (an advisory lock)
reads the dead-tuple count and runs `VACUUM (SKIP_LOCKED)` on the table once it expects
`vacuum_dead_tuples`, so the space is reused instead of added to. It looks again when the rate the
dead tuples pile up at says they reach the threshold, at most `vacuum_check_interval` later: with a
fixed 2 s wait and counts up to 1 s behind, a queue leaving 90,000 dead tuples a second met the
100,000 threshold with 200,000 piled up, and the table grew to hold them (issue 17). A thread of
the supervisor with its own connection: a long VACUUM never delays reaping, rescue or the drain check.
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
SOONEST: Final = 8  # the leader looks again no sooner than interval / SOONEST
STATS_LAG: Final = 1.0  # seconds a busy backend may hold its counts before it reports them (PGSTAT_MIN_INTERVAL)


def pace(reading: int, over: float, rate: float, threshold: int, interval: float) -> tuple[bool, float, float]:
    """One look of the vacuum pass: `reading` dead tuples counted `over` seconds after the last
    VACUUM (or the start), at an earlier estimate of `rate` per second. Returns whether to VACUUM
    now, the new rate, and the seconds until the next look. The count is up to STATS_LAG behind, so
    that much of the rate is added to it; the next look is when the rate reaches the threshold,
    between interval / SOONEST and interval."""
    if reading > 0 and over > 0:
        rate = reading / over
    elif over >= STATS_LAG:  # nothing counted in a whole reporting interval: an idle queue
        rate = 0.0
    expected = reading + rate * min(STATS_LAG, over)
    vacuum = expected >= threshold
    if rate <= 0:
        return vacuum, rate, interval
    left = 0.0 if vacuum else expected
    return vacuum, rate, min(interval, max(interval / SOONEST, (threshold - left) / rate))


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
        since = time.monotonic()  # when the dead tuples were last near 0: start or the last VACUUM's end
        rate = 0.0  # dead tuples per second, as last estimated
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
                looked = time.monotonic()
                vacuum, rate, wait = pace(store.jobs_dead_tuples(conn), looked - since, rate, self.threshold,
                                          self.interval)
                if vacuum:
                    store.jobs_vacuum(conn)
                    self.vacuums += 1
                    since = time.monotonic()
                    log.debug("vacuumed skiplock.jobs", extra={"seconds": round(since - looked, 3)})
            except psycopg.Error as exc:  # an outage or a lost connection: try again next interval
                log.debug("vacuum pass failed: %s", exc)
                wait = self.interval  # not the paced wait, which may be an eighth of it
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

-- VACUUM ends by truncating a table's empty tail, under an ACCESS EXCLUSIVE lock: every claim, ack and
-- enqueue waits for it. A queue table empties its tail all the time, so the vacuum pass and autovacuum
-- stalled the whole queue for 0.3 s and more at steady state (bench/README.md, issue 17). The tail is
-- reused by the next inserts instead.
ALTER TABLE skiplock.jobs SET (vacuum_truncate = false);

-- skiplock schema, version 2: why a worker was lost.
-- The supervisor records what it saw ("exited with code -9", "killed after grace period") when it
-- marks a worker lost; the rescue writes it into each rescued job's error. NULL: the heartbeat went
-- stale.
ALTER TABLE skiplock.workers ADD COLUMN lost_reason text;

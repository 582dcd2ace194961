-- Job control (issue 14): cancelling jobs, and what the job browser reads.

-- Cancelled jobs leave the hot table like completed ones and are kept as long (the retention purge
-- takes both), so the claim's partial index never holds them and a dedupe key is free again.
ALTER TABLE skiplock.jobs_done
    ADD COLUMN status text NOT NULL DEFAULT 'completed' CHECK (status IN ('completed', 'cancelled'));

-- Cancelling a running job is a request: the worker that runs it reads this column (and a control
-- wake-up), stops the job, and acks it cancelled. Until then the job stays running.
ALTER TABLE skiplock.jobs ADD COLUMN cancel_requested_at timestamptz;

-- A cancelled job ends its part of its run: it moves from `total` to `cancelled`, so the ack's
-- last-man check (completed + dead >= total) stays as it is and a run still finishes once.
ALTER TABLE skiplock.runs ADD COLUMN cancelled bigint NOT NULL DEFAULT 0;

-- Job control, the worker's side (issue 14): progress of running jobs, and the cancel check.

-- What a handler last reported with ctx.progress (coalesced by its worker, one write per job per ~1 s).
-- Kept on the row: a retry's progress_at older than its claimed_at is a previous attempt's.
ALTER TABLE skiplock.jobs ADD COLUMN progress real CHECK (progress >= 0 AND progress <= 1);
ALTER TABLE skiplock.jobs ADD COLUMN progress_message text;
ALTER TABLE skiplock.jobs ADD COLUMN progress_at timestamptz;

-- A worker's ~1 s "which of my jobs has a cancel request" check (jobs_cancel_requested). Almost always
-- empty; the ack cannot use it (its WHERE does not imply the predicate, see jobs_running_idx).
CREATE INDEX jobs_cancel_requested_idx ON skiplock.jobs (claimed_by)
    WHERE status = 'running' AND cancel_requested_at IS NOT NULL;

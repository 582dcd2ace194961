-- skiplock: no-transaction
-- The metrics leader's gauges (issue 16): `skiplock_queue_jobs{state="retrying"}` counts pending jobs
-- with attempts > 0 through this index, so the read never visits the heap rows of a flow's backlog
-- (ready and scheduled come from jobs_claim_idx alone). Partial: a fresh job (attempts 0) and a claim
-- (status running) never enter it; only a failed attempt going back to pending does.
-- Outside a transaction so it builds CONCURRENTLY (a plain build would block every claim and ack).
DROP INDEX CONCURRENTLY IF EXISTS skiplock.jobs_retrying_idx;
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_retrying_idx ON skiplock.jobs (flow)
    WHERE status = 'pending' AND attempts > 0;

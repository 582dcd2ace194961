-- Flow control (issue 15 items 4-6): fleet-wide rate limits and per-key concurrency.
-- Adds only: older engines keep working on it (no min-code-version marker).

-- One token bucket per rate-limited flow, refilled and debited by the claim statement itself under
-- the row's lock (claim_rated, claim_keyed), so every engine and worker shares it without a race.
-- Rate and burst are not stored: the claimer passes its flow's policy (engines of a fleet share it).
CREATE TABLE skiplock.rate_buckets (
    flow            text PRIMARY KEY,
    tokens          double precision NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A job's concurrency key: given at enqueue (`key=`), else copied from the payload's top-level
-- `concurrency_key` field by the claim. Running jobs of keyed flows always carry it, so the running
-- count of one key is a probe of the partial index below; rows without a key (every job of a flow
-- without per-key limits) are not in it, and a release, rescue, ack or cancel that ends the running
-- state frees the slot with no counter to keep.
-- "Running" is spelled `status BETWEEN 'running' AND 'running'` here and in the probes, not
-- `status = 'running'`: with the latter, jobs_running_idx (flow, claimed_at) also serves a probe, and
-- when the statistics say few jobs run (they were gathered while the queue was idle) a generic plan
-- picks it and filters every running job of the flow per candidate (measured: 300 ms per claim with
-- 1,000 jobs running). The planner cannot prove `= 'running'` from the range, so only this index fits.
ALTER TABLE skiplock.jobs ADD COLUMN concurrency_key text;
CREATE INDEX jobs_key_running_idx ON skiplock.jobs (flow, concurrency_key)
    WHERE status BETWEEN 'running' AND 'running' AND concurrency_key IS NOT NULL;

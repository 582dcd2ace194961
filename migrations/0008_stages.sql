-- skiplock: no-transaction
-- Stages (issue 15): a job's parent, runs that may still grow (sealing), the stage links seen.
-- Outside a transaction so the parent indexes build CONCURRENTLY (jobs_done may hold millions of
-- rows; a plain CREATE INDEX would block every ack for the build). Each statement is idempotent, so
-- a file interrupted part way is simply run again.

-- The job whose ack created this one (Next(...)); NULL for enqueued jobs.
ALTER TABLE skiplock.jobs ADD COLUMN IF NOT EXISTS parent_id bigint;
ALTER TABLE skiplock.jobs_done ADD COLUMN IF NOT EXISTS parent_id bigint;
-- A parent's children (`engine jobs show`): partial, so plain jobs pay nothing per insert. Dropped
-- first: an interrupted CREATE INDEX CONCURRENTLY leaves an invalid index that IF NOT EXISTS keeps.
DROP INDEX CONCURRENTLY IF EXISTS skiplock.jobs_parent_idx;
DROP INDEX CONCURRENTLY IF EXISTS skiplock.jobs_done_parent_idx;
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_parent_idx ON skiplock.jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_done_parent_idx ON skiplock.jobs_done (parent_id)
    WHERE parent_id IS NOT NULL;

-- A run finishes only once sealed: a producer enqueueing in chunks says seal=False until its last
-- chunk (or Queue.seal_run). sealed_at: when the seal itself finished it (no ack will claim the
-- hook, so the rescue pass fires it at once). reopened: how often a retry or a late enqueue
-- reopened it after it had finished.
ALTER TABLE skiplock.runs ADD COLUMN IF NOT EXISTS sealed boolean NOT NULL DEFAULT true;
ALTER TABLE skiplock.runs ADD COLUMN IF NOT EXISTS sealed_at timestamptz;
ALTER TABLE skiplock.runs ADD COLUMN IF NOT EXISTS reopened integer NOT NULL DEFAULT 0;

-- How many children an ack inserted, for its retries (as the rest of its outcome).
ALTER TABLE skiplock.ack_receipts ADD COLUMN IF NOT EXISTS children integer NOT NULL DEFAULT 0;

-- parent flow -> child flow, as acks saw them: the pipeline view (with the flows' `next` policy).
CREATE TABLE IF NOT EXISTS skiplock.flow_links (
    parent_flow     text NOT NULL,
    child_flow      text NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (parent_flow, child_flow)
);

-- The two functions hold `$$` bodies in a no-transaction file: every ';' inside them is followed by
-- a comment, so the statement splitter (a ';' at the end of a line) never cuts a body.
-- The children of one ack (already fenced: ack_batch passes only parents its DELETE took). Called by
-- ack_batch only when there are children, so the plain ack never runs an INSERT into jobs (whose
-- statement trigger would NOTIFY on every ack). Returns the inserted children and their runs; a
-- child whose dedupe key an unfinished job holds is skipped (and not counted into its run).
CREATE OR REPLACE FUNCTION skiplock.insert_children(
    parents bigint[], parent_flows text[], runs text[], flows text[], payloads jsonb[], priorities smallint[],
    delays float8[], max_attempts integer[], dedupe_keys text[]
) RETURNS TABLE (child_id bigint, child_run text)
LANGUAGE sql VOLATILE AS $$
    INSERT INTO skiplock.flow_links (parent_flow, child_flow)
    SELECT DISTINCT p, c FROM unnest(parent_flows, flows) AS l(p, c) ORDER BY 1, 2
    ON CONFLICT DO NOTHING;  -- (a comment after each inner ';': the file is split at lines ending in ';')
    INSERT INTO skiplock.jobs AS j (flow, payload, priority, run_at, max_attempts, run_id, dedupe_key, parent_id)
    SELECT c.flow, c.payload, c.priority, clock_timestamp() + make_interval(secs => c.delay), c.max_attempts,
           c.run_id, c.dedupe_key, c.parent
    FROM unnest(parents, runs, flows, payloads, priorities, delays, max_attempts, dedupe_keys)
         WITH ORDINALITY AS c(parent, run_id, flow, payload, priority, delay, max_attempts, dedupe_key, n)
    ORDER BY c.n
    ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
    DO NOTHING
    RETURNING j.id, j.run_id;  -- the children
$$;

-- Whether a reopened run's flow fires on_complete again when the run finishes again
-- (on_complete_repeat in the flow's recorded policy; default: once per run).
CREATE OR REPLACE FUNCTION skiplock.run_hook_repeats(run_flow text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT (f.policy ->> 'on_complete_repeat')::boolean FROM skiplock.flows f
                     WHERE f.name = run_flow), false)
$$;

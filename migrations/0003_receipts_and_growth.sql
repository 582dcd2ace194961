-- skiplock schema, version 3: receipts that make retried statements recoverable, a capped error
-- history, and the indexes retention and the console's worker reads need.
-- Adds only: engines built for schema 1 keep working on it (no min-code-version marker).

-- An ack's outcome, by the ack id its sender chose. A retry of an ack whose first try committed
-- (the connection dropped before the reply) finds its receipt and returns the first outcome instead
-- of "0 completed, N refused". One row per ack (never per job); the retention pass deletes old ones.
CREATE TABLE skiplock.ack_receipts (
    id              bigint PRIMARY KEY,
    completed       integer NOT NULL,
    retried         integer NOT NULL,
    dead_ids        bigint[] NOT NULL,
    finished_runs   text[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ack_receipts_created_brin ON skiplock.ack_receipts USING brin (created_at);
-- Churns like jobs: vacuum by dead-tuple count.
ALTER TABLE skiplock.ack_receipts SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);

-- An enqueue_many batch, by its batch key: written in the batch's transaction, so the batch's rows
-- exist exactly when its receipt does, and a retry with the same key inserts nothing twice.
CREATE TABLE skiplock.enqueue_receipts (
    batch_key       text PRIMARY KEY,
    flow            text NOT NULL,
    inserted        integer NOT NULL DEFAULT 0,
    skipped         integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX enqueue_receipts_created_brin ON skiplock.enqueue_receipts USING brin (created_at);

-- The run hook's claimer: a retried claim that re-presents the same token gets the run back.
ALTER TABLE skiplock.runs ADD COLUMN hook_claimed_by text;
-- Retention of finished runs, and the console's "finished in the last hour".
CREATE INDEX runs_finished_idx ON skiplock.runs (finished_at) WHERE finished_at IS NOT NULL;

-- The console's and `engine status`'s recently stopped workers, and the retention of old ones.
-- (Live workers: workers_live_idx.)
CREATE INDEX workers_stopped_idx ON skiplock.workers (stopped_at) WHERE state IN ('stopped', 'lost');

-- A job's error history keeps its first attempt and its last `keep_last` (the new entry included):
-- a job retried for days no longer rewrites an ever-growing array on every failure. Entries carry
-- their attempt number, so the gap shows.
CREATE FUNCTION skiplock.errors_append(history jsonb, entry jsonb, keep_last integer) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_array_length(history) <= keep_last THEN history || jsonb_build_array(entry)
        ELSE jsonb_build_array(history -> 0)
             || coalesce((SELECT jsonb_agg(e ORDER BY i)
                          FROM jsonb_array_elements(history) WITH ORDINALITY AS t(e, i)
                          WHERE i > jsonb_array_length(history) - keep_last + 1), '[]'::jsonb)
             || jsonb_build_array(entry)
    END
$$;

-- Least-privilege roles (README "Running in containers" > Roles). NOLOGIN: grant them to login roles
-- (GRANT skiplock_engine TO app_engine). Every table of the skiplock schema gets a decision here or in
-- the migration that creates it (tests/test_roles.py fails on a table no skiplock role may touch):
--   skiplock_engine    what `engine run` needs: read and write the queue, its workers, runs, stats, receipts
--   skiplock_operator  console actions, dlq retry/purge, cancel, pause/resume, schedules, enqueue
--   skiplock_viewer    read-only: status, health, jobs/dlq list and show, the read-only console, metrics
-- `engine migrate` stays with the schema's owner. Roles are cluster-wide and the grants per database:
-- the roles are created once, if missing, by whichever database migrates first.

DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['skiplock_engine', 'skiplock_operator', 'skiplock_viewer'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database of this cluster migrated at the same moment
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % does not exist and this login role may not create it: have an administrator run CREATE ROLE % NOLOGIN, then migrate again', role_name, role_name;
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA skiplock TO skiplock_engine, skiplock_operator, skiplock_viewer;
GRANT EXECUTE ON FUNCTION skiplock.max_attempts_for(text, integer), skiplock.errors_append(jsonb, jsonb, integer)
    TO skiplock_engine, skiplock_operator, skiplock_viewer;

-- Everyone reads the queue (every command checks the schema version first).
GRANT SELECT ON skiplock.schema_migrations, skiplock.flows, skiplock.jobs, skiplock.jobs_done, skiplock.workers,
    skiplock.runs, skiplock.stats_minute, skiplock.schedules
    TO skiplock_engine, skiplock_operator, skiplock_viewer;

-- The engine: claims, acks (with receipts), moves finished jobs, registers and heartbeats workers,
-- writes stats, fires schedules, finishes runs, keeps retention, records its flows.
GRANT INSERT, UPDATE, DELETE ON skiplock.flows, skiplock.jobs, skiplock.jobs_done, skiplock.workers, skiplock.runs,
    skiplock.stats_minute, skiplock.schedules TO skiplock_engine;
GRANT SELECT, INSERT, UPDATE, DELETE ON skiplock.ack_receipts, skiplock.enqueue_receipts TO skiplock_engine;
GRANT USAGE, SELECT ON SEQUENCE skiplock.jobs_id_seq TO skiplock_engine, skiplock_operator;

-- The operator: retry (dead -> pending) and purge dead letters, cancel (pending -> jobs_done, running
-- on request), pause/resume flows (an upsert of the flow's row), schedules, enqueue (runs count it,
-- enqueue_many records its batch receipt). Not: workers, stats, ack receipts (only engines write them).
GRANT INSERT, UPDATE, DELETE ON skiplock.jobs, skiplock.schedules TO skiplock_operator;
GRANT INSERT, DELETE ON skiplock.jobs_done TO skiplock_operator;
GRANT INSERT, UPDATE ON skiplock.flows, skiplock.runs TO skiplock_operator;
GRANT SELECT, INSERT, UPDATE ON skiplock.enqueue_receipts TO skiplock_operator;

-- Tables of migrations 0007-0019 (later migrations grant their own tables).
-- The control plane (0011): engines register and heartbeat and answer commands; operators send them
-- (`engine scale|drain|stop`, the console's Engines view); everyone lists engines.
GRANT SELECT ON skiplock.engines, skiplock.engine_commands TO skiplock_engine, skiplock_operator, skiplock_viewer;
GRANT INSERT, UPDATE, DELETE ON skiplock.engines TO skiplock_engine;
GRANT UPDATE, DELETE ON skiplock.engine_commands TO skiplock_engine;
GRANT INSERT, UPDATE ON skiplock.engine_commands TO skiplock_operator;
-- Metrics (0010): the lease of the engine that reads the fleet-wide gauges.
GRANT SELECT, INSERT, UPDATE, DELETE ON skiplock.metrics_leader TO skiplock_engine;
-- Stages (0008): the parent -> child flow links the children insert records, read by the pipeline
-- views; an operator's enqueue or retry inserts no children.
GRANT SELECT ON skiplock.flow_links TO skiplock_engine, skiplock_operator, skiplock_viewer;
GRANT INSERT, UPDATE ON skiplock.flow_links TO skiplock_engine;
-- Flow control (0009): the claim refills and debits the rate-limited flows' token buckets; `engine
-- explain` reads them.
GRANT SELECT ON skiplock.rate_buckets TO skiplock_engine, skiplock_operator, skiplock_viewer;
GRANT INSERT, UPDATE ON skiplock.rate_buckets TO skiplock_engine;

-- Every statement skiplock sends, one block per name, each sent by one named function of engine/store.py.
-- Parameters are psycopg named placeholders. Optional filters are written in SQL
-- (`%(flow)s::text IS NULL OR flow = %(flow)s`), never assembled from strings.
-- Every state change is guarded in its WHERE clause by the status it expects.
--
-- Clocks: now() is the time the transaction began. A statement sent alone in autocommit is its own
-- transaction, so there now() is the statement's time and stays (cheaper, and one value for every row).
-- Statements that may run late in a longer transaction use clock_timestamp() for the times that
-- matter: ack_batch (a transactional flow's ack is the last statement of a batch transaction that
-- began before its handlers ran: finished_at, run_ms, the backoff's run_at, the error's `at`),
-- claim_batch (a fleet-wide concurrency claim waits for claim_flow_lock inside its transaction:
-- claimed_at, wait_ms), the enqueue statements (a producer may enqueue inside its own transaction, or
-- a handler through ctx.pg: a delay counts from the enqueue), run_claim_hook, and rescue_jobs' stamps
-- (its slices run inside the supervisor's rescue pass). Every other now() stays, checked one by one:
-- it is in a statement sent alone in autocommit (worker_*, circuit_*, flows_*, stats_upsert's minute,
-- release_batch, claim_release_token, console reads with their fixed reference time), in a short
-- transaction of its own (Queue's dlq_retry, reset_failed, flow_set_paused), or it is a cut-off
-- (stale heartbeats, retention purges, "due", runs_claim_orphaned_hooks): there now() is at worst a little
-- conservative, and one value per statement keeps a statement's rows consistent.

-- name: migrations_bootstrap
CREATE SCHEMA IF NOT EXISTS skiplock;
CREATE TABLE IF NOT EXISTS skiplock.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
-- The oldest skiplock release that may run on a schema with this migration (NULL: any).
ALTER TABLE skiplock.schema_migrations ADD COLUMN IF NOT EXISTS min_code_version text;

-- name: migrations_lock
-- Session-level: held across the per-file transactions, so two engines cannot race. Tried, not
-- waited for (the caller polls): a session blocked in pg_advisory_lock holds a snapshot, and the
-- holder's CREATE INDEX CONCURRENTLY (a no-transaction migration) waits for every older snapshot,
-- which would deadlock the two.
SELECT pg_try_advisory_lock(hashtext('skiplock.migrate'));

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtext('skiplock.migrate'));

-- name: migrations_applied
SELECT version FROM skiplock.schema_migrations ORDER BY version;

-- name: migrations_record
INSERT INTO skiplock.schema_migrations (version, name, min_code_version)
VALUES (%(version)s, %(name)s, %(min_code_version)s);

-- name: migrations_lock_timeout
-- A migration waiting for a lock blocks every statement queued behind it (a claim behind an ALTER
-- waiting on an open batch transaction): give up after `value`, and retry. `local`: for this
-- transaction only; else for the session (files that run outside a transaction).
SELECT set_config('lock_timeout', %(value)s, %(local)s);

-- name: schema_migrations_detail
-- Read through to_jsonb so a schema_migrations table from before min_code_version still answers.
SELECT m.version, to_jsonb(m) ->> 'min_code_version', m.name FROM skiplock.schema_migrations m ORDER BY m.version;

-- name: schema_migrations_exists
SELECT to_regclass('skiplock.schema_migrations') IS NOT NULL;

-- name: schema_version
-- Only sent once schema_migrations_exists said yes: PostgreSQL resolves table names at parse time.
SELECT coalesce(max(version), 0) FROM skiplock.schema_migrations;

-- name: enqueue_one
WITH inserted AS (
    INSERT INTO skiplock.jobs (flow, payload, priority, run_at, max_attempts, run_id, dedupe_key)
    VALUES (%(flow)s, %(payload)s::jsonb, %(priority)s, clock_timestamp() + make_interval(secs => %(delay)s),
            %(max_attempts)s, %(run_id)s, %(dedupe_key)s)
    ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
    DO NOTHING
    RETURNING id
)
SELECT id FROM inserted;

-- name: run_at_after
-- COPY cannot call now(): the batch's run_at comes from the server clock, not the client's.
SELECT (clock_timestamp() + make_interval(secs => %(delay)s))::text;

-- name: notify_enqueued
-- Wakes idle workers after a change that is not an INSERT (operator retry, resume).
SELECT pg_notify('skiplock_enqueued', '');

-- name: enqueue_copy
COPY skiplock.jobs (flow, payload, priority, run_at, max_attempts, run_id) FROM STDIN;

-- name: enqueue_many_dedupe
-- With dedupe keys COPY cannot skip duplicates, so the batch goes through unnest and ON CONFLICT.
INSERT INTO skiplock.jobs (flow, payload, priority, run_at, max_attempts, run_id, dedupe_key)
SELECT %(flow)s, p.payload, %(priority)s, clock_timestamp() + make_interval(secs => %(delay)s), %(max_attempts)s,
       %(run_id)s, p.dedupe_key
FROM unnest(%(payloads)s::jsonb[], %(dedupe_keys)s::text[]) AS p(payload, dedupe_key)
ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
DO NOTHING;

-- name: enqueue_many_keyed
-- enqueue_many with concurrency keys (per item, NULL: from the payload at claim): unnest, like the
-- dedupe path, so the plain COPY keeps its columns.
INSERT INTO skiplock.jobs (flow, payload, priority, run_at, max_attempts, run_id, dedupe_key, concurrency_key)
SELECT %(flow)s, p.payload, %(priority)s, clock_timestamp() + make_interval(secs => %(delay)s), %(max_attempts)s,
       %(run_id)s, p.dedupe_key, p.concurrency_key
FROM unnest(%(payloads)s::jsonb[], %(dedupe_keys)s::text[], %(keys)s::text[]) AS p(payload, dedupe_key, concurrency_key)
ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
DO NOTHING;

-- name: job_set_concurrency_key
-- Queue.enqueue(key=...): in the enqueue's transaction, so no claim sees the job without its key.
UPDATE skiplock.jobs SET concurrency_key = %(key)s WHERE id = %(id)s AND status = 'pending';

-- name: enqueue_receipt_claim
-- First statement of a keyed enqueue_many transaction. No row back: the key is taken (a batch that
-- already committed, or one committing now: this waits for it), and enqueue_receipt_get tells what
-- it inserted.
INSERT INTO skiplock.enqueue_receipts (batch_key, flow) VALUES (%(batch_key)s, %(flow)s)
ON CONFLICT (batch_key) DO NOTHING
RETURNING batch_key;

-- name: enqueue_receipt_record
UPDATE skiplock.enqueue_receipts SET inserted = %(inserted)s, skipped = %(skipped)s
WHERE batch_key = %(batch_key)s;

-- name: enqueue_receipt_get
SELECT flow, inserted, skipped FROM skiplock.enqueue_receipts WHERE batch_key = %(batch_key)s;

-- name: run_add_jobs
-- `sealed`: false while the producer has more chunks to add (the run cannot finish before the
-- chunk that seals it, or Queue.seal_run); NULL: a new run is sealed, an existing one keeps its
-- state (a handler adding a discovered job must not seal a producer's run). Jobs added to a run that had finished reopen it: it
-- finishes again after them, and its hook fires again only if its flow says so
-- (on_complete_repeat).
INSERT INTO skiplock.runs AS r (id, flow, total, sealed)
VALUES (%(run_id)s, %(flow)s, %(count)s, coalesce(%(sealed)s::boolean, true))
ON CONFLICT (id) DO UPDATE
SET total = r.total + EXCLUDED.total, sealed = coalesce(%(sealed)s::boolean, r.sealed), finished_at = NULL,
    reopened = r.reopened + (r.finished_at IS NOT NULL)::int,
    hook_fired_at = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                         ELSE r.hook_fired_at END,
    hook_claimed_by = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                           ELSE r.hook_claimed_by END;

-- name: run_seal
-- The producer has added its last chunk. A run whose jobs have all ended finishes here; sealed_at =
-- finished_at tells the rescue pass that no ack will claim its hook (runs_claim_orphaned_hooks).
-- Returns nothing for an unknown run.
WITH r0 AS (
    SELECT id, sealed, clock_timestamp() AS now FROM skiplock.runs WHERE id = %(run_id)s FOR UPDATE
), sealed AS (
    UPDATE skiplock.runs r
    SET sealed = true,
        sealed_at = CASE WHEN NOT r0.sealed THEN r0.now ELSE r.sealed_at END,
        finished_at = CASE WHEN r.finished_at IS NULL AND NOT r0.sealed AND r.completed + r.dead >= r.total
                           THEN r0.now ELSE r.finished_at END
    FROM r0 WHERE r.id = r0.id
    RETURNING r.id, r0.sealed AS was_sealed, r.finished_at IS NOT NULL AS finished, r.total, r.completed, r.dead
)
SELECT id, was_sealed, finished, total, completed, dead FROM sealed;

-- name: claim_batch
-- One flow at a time, priority (higher first) then FIFO by run_at. The paused/circuit check is not
-- correlated, so PostgreSQL evaluates it once and claims nothing when the flow is held.
WITH picked AS (
    SELECT id, crashes FROM skiplock.jobs
    WHERE flow = %(flow)s AND status = 'pending' AND run_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM skiplock.flows f
          WHERE f.name = %(flow)s
            AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())))
      -- A worker marked lost has had its claims rescued: it may not claim again under that id.
      AND NOT EXISTS (SELECT 1 FROM skiplock.workers w WHERE w.id = %(worker)s AND w.state = 'lost')
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE skiplock.jobs j
SET status = 'running', claimed_by = %(worker)s, claim_token = %(token)s, claimed_at = clock_timestamp(),
    attempts = j.attempts + 1, updated_at = now()
-- `= ANY(ARRAY(...))`, not a join: a join on `picked` lets the planner hash-join a Seq Scan of
-- jobs when the table is small (B=100 on a few thousand rows); this form always takes the pkey.
-- A job that was held by a worker that died (crashes > 0, migration 0014) goes out alone: a batch
-- of one, so if it kills this worker too no healthy job dies with it. The rest of `picked` stays
-- pending (its row locks end with this statement).
WHERE j.id = ANY(CASE WHEN EXISTS (SELECT 1 FROM picked WHERE crashes > 0)
                      THEN ARRAY(SELECT id FROM picked WHERE crashes > 0 LIMIT 1)
                      ELSE ARRAY(SELECT id FROM picked) END)
RETURNING j.id, j.payload, j.attempts, coalesce(j.max_attempts, %(max_attempts)s), j.run_id,
          extract(epoch FROM j.claimed_at - j.run_at)::float8 * 1000.0 AS wait_ms;

-- name: ack_batch
-- The whole batch in one round trip. Fenced: only rows still running under this worker's claim
-- token change, so a worker whose jobs were rescued and re-claimed changes nothing. `tokens` holds
-- one token, or those of one claim_flows statement (an ack across its flows): a row was claimed under
-- one of them or not at all, so the set fences as each flow's own token does. Across flows the
-- outcome is also counted per flow when asked (`by_flow`: {flow: [completed, retried]}; else NULL,
-- a one-time filter). Each failure carries its flow's max_attempts.
-- Completed jobs leave the hot table for jobs_done. Failures go back to pending after their
-- backoff, or to dead when permanent or out of attempts. Runs advance; the ack that ends a run
-- stamps finished_at with its own `ts`, which makes it the last man standing.
-- `ts` is clock_timestamp(), not now(): in a transactional flow this is the last statement of a
-- batch transaction that began before the handlers ran, and finished_at (run_ms) and the backoff
-- count from here. One value for the whole ack.
-- With an ack id, the outcome is recorded in ack_receipts in the same transaction; a retry with
-- the same id (the first try committed, its reply was lost) changes nothing, being fenced, and
-- returns the recorded outcome. `recorded` is false only when a concurrent first try committed
-- the receipt while this one ran: the caller reads it with ack_receipt_get.
-- Rows are found by `id = ANY(...)` on the primary key, and "running" is spelled BETWEEN (as in
-- migration 0009) so no partial index of running jobs fits: with `= 'running'` and a join on
-- unnest(), statistics saying few jobs run made the planner scan every running job and rescan the
-- unnest per row, quadratic in the batch (measured: 45 us per job at batch 500, against 6 now).
-- `results` is one JSON object by job id (absent: no result), looked up per row, so no join either.
-- The failure branch runs only when there are failures (a one-time filter).
-- Stages: the child_* arrays are the Next(...) jobs of the acked parents (engine/stages.py); only
-- those of parents `done` took are inserted (skiplock.insert_children, migration 0008), into the
-- parent's run, whose total grows here. A run finishes only once sealed.
WITH ts AS MATERIALIZED (
    SELECT clock_timestamp() AS now
), prior AS (
    SELECT completed, retried, dead_ids, finished_runs, children, by_flow FROM skiplock.ack_receipts
    WHERE id = %(ack_id)s
), done AS (
    DELETE FROM skiplock.jobs j
    WHERE j.id = ANY(%(done_ids)s::bigint[]) AND j.status BETWEEN 'running' AND 'running'
      AND j.claim_token = ANY(%(tokens)s::bigint[]) AND j.claimed_by = %(worker)s
    RETURNING j.id, j.flow, j.payload, j.priority, j.attempts, j.max_attempts, j.claimed_by,
              j.errors, %(results)s::jsonb -> j.id::text AS result, j.run_id, j.created_at, j.claimed_at,
              j.parent_id
), archived AS (
    INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, claimed_by,
                                    errors, result, run_id, created_at, claimed_at, finished_at, parent_id)
    SELECT id, flow, payload, priority, attempts, max_attempts, claimed_by, errors, result, run_id,
           created_at, claimed_at, ts.now, parent_id
    FROM done, ts
    RETURNING run_id, flow
), staged AS (
    -- Next(...) children, one array element each, of parents this ack completed: joined to `done`,
    -- so a refused parent (rescued, re-claimed) or a retry of a committed ack creates none. They
    -- inherit the parent's run. The cardinality test is a one-time filter: nothing to do on the
    -- plain path.
    SELECT c.parent, d.flow AS parent_flow, d.run_id, c.flow, c.payload, c.priority, c.delay, c.max_attempts,
           c.dedupe_key, c.n
    FROM unnest(%(child_parents)s::bigint[], %(child_flows)s::text[], %(child_payloads)s::jsonb[],
                %(child_priorities)s::smallint[], %(child_delays)s::float8[], %(child_max_attempts)s::integer[],
                %(child_dedupe_keys)s::text[])
         WITH ORDINALITY AS c(parent, flow, payload, priority, delay, max_attempts, dedupe_key, n)
    JOIN done d ON d.id = c.parent
    WHERE cardinality(%(child_parents)s::bigint[]) > 0
), children AS (
    -- skiplock.insert_children runs only when `staged` has rows (no INSERT, so no NOTIFY, otherwise).
    SELECT k.child_id, k.child_run
    FROM (SELECT array_agg(parent ORDER BY n) AS parents, array_agg(parent_flow ORDER BY n) AS parent_flows,
                 array_agg(run_id ORDER BY n) AS runs, array_agg(flow ORDER BY n) AS flows,
                 array_agg(payload ORDER BY n) AS payloads, array_agg(priority ORDER BY n) AS priorities,
                 array_agg(delay ORDER BY n) AS delays, array_agg(max_attempts ORDER BY n) AS max_attempts,
                 array_agg(dedupe_key ORDER BY n) AS dedupe_keys
          FROM staged HAVING count(*) > 0) a
    CROSS JOIN LATERAL skiplock.insert_children(a.parents, a.parent_flows, a.runs, a.flows, a.payloads,
                                                a.priorities, a.delays, a.max_attempts, a.dedupe_keys) k
), failed AS (
    UPDATE skiplock.jobs j
    SET status = CASE WHEN f.permanent OR j.attempts >= coalesce(j.max_attempts, f.max_attempts)
                      THEN 'dead' ELSE 'pending' END::skiplock.job_status,
        run_at = CASE WHEN f.permanent OR j.attempts >= coalesce(j.max_attempts, f.max_attempts)
                      THEN j.run_at ELSE ts.now + make_interval(secs => f.delay) END,
        finished_at = CASE WHEN f.permanent OR j.attempts >= coalesce(j.max_attempts, f.max_attempts)
                           THEN ts.now END,
        claimed_by = NULL, claim_token = NULL,
        error_type = f.error_type, error_message = f.message,
        errors = skiplock.errors_append(j.errors, jsonb_build_object(
            'attempt', j.attempts, 'at', ts.now, 'worker', j.claimed_by, 'type', f.error_type,
            'message', f.message, 'traceback', f.traceback, 'permanent', f.permanent), %(errors_kept)s),
        updated_at = ts.now
    FROM unnest(%(fail_ids)s::bigint[], %(permanent)s::boolean[], %(error_types)s::text[],
                %(messages)s::text[], %(tracebacks)s::text[], %(delays)s::float8[], %(fail_max_attempts)s::integer[])
         AS f(id, permanent, error_type, message, traceback, delay, max_attempts), ts
    WHERE j.id = f.id AND j.status BETWEEN 'running' AND 'running'
      AND j.claim_token = ANY(%(tokens)s::bigint[]) AND j.claimed_by = %(worker)s
      AND cardinality(%(fail_ids)s::bigint[]) > 0
    RETURNING j.id, j.status, j.run_id, j.flow
), run_delta AS (
    -- kind: 0 completed, 1 dead, 2 a child added to the run (its total grows in this statement, so
    -- the run cannot finish between the parent's ack and its children's insert).
    SELECT run_id, count(*) FILTER (WHERE kind = 0) AS completed, count(*) FILTER (WHERE kind = 1) AS dead,
           count(*) FILTER (WHERE kind = 2) AS added
    FROM (SELECT run_id, 0 AS kind FROM archived WHERE run_id IS NOT NULL
          UNION ALL
          SELECT run_id, 1 FROM failed WHERE run_id IS NOT NULL AND status = 'dead'
          UNION ALL
          SELECT child_run, 2 FROM children WHERE child_run IS NOT NULL) AS ended
    GROUP BY run_id
), run_progress AS (
    -- A run finishes once sealed (a producer that enqueues in chunks seals it after the last one).
    UPDATE skiplock.runs r
    SET completed = r.completed + d.completed, dead = r.dead + d.dead, total = r.total + d.added,
        finished_at = CASE WHEN r.finished_at IS NULL AND r.sealed
                                AND r.completed + d.completed + r.dead + d.dead >= r.total + d.added
                           THEN ts.now ELSE r.finished_at END
    FROM run_delta d, ts
    WHERE r.id = d.run_id
    RETURNING r.id, r.finished_at = ts.now AS finished_now
), outcome AS (
    SELECT (SELECT count(*) FROM archived)::int AS completed,
           (SELECT count(*) FROM failed WHERE status = 'pending')::int AS retried,
           (SELECT coalesce(array_agg(id), '{}') FROM failed WHERE status = 'dead') AS dead_ids,
           (SELECT coalesce(array_agg(id), '{}') FROM run_progress WHERE finished_now) AS finished_runs,
           (SELECT count(*) FROM children)::int AS children,
           (SELECT jsonb_object_agg(flow, jsonb_build_array(completed, retried))
            FROM (SELECT flow, count(*) FILTER (WHERE kind = 0) AS completed,
                         count(*) FILTER (WHERE kind = 1) AS retried
                  FROM (SELECT flow, 0 AS kind FROM archived
                        UNION ALL
                        SELECT flow, 1 FROM failed WHERE status = 'pending') AS ended
                  GROUP BY flow) AS counts
            WHERE %(by_flow)s::boolean) AS by_flow
), receipt AS (
    INSERT INTO skiplock.ack_receipts (id, completed, retried, dead_ids, finished_runs, children, by_flow, created_at)
    SELECT %(ack_id)s, o.completed, o.retried, o.dead_ids, o.finished_runs, o.children, o.by_flow, ts.now
    FROM outcome o, ts
    WHERE %(ack_id)s::bigint IS NOT NULL AND NOT EXISTS (SELECT 1 FROM prior)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
SELECT coalesce(p.completed, o.completed), coalesce(p.retried, o.retried), coalesce(p.dead_ids, o.dead_ids),
       coalesce(p.finished_runs, o.finished_runs),
       %(ack_id)s::bigint IS NULL OR p.completed IS NOT NULL OR EXISTS (SELECT 1 FROM receipt) AS recorded,
       coalesce(p.children, o.children),
       CASE WHEN p.completed IS NOT NULL THEN p.by_flow ELSE o.by_flow END
FROM outcome o LEFT JOIN prior p ON true;

-- name: ack_receipt_get
SELECT completed, retried, dead_ids, finished_runs, children, by_flow FROM skiplock.ack_receipts WHERE id = %(ack_id)s;

-- name: release_batch
-- Graceful shutdown: give back claimed jobs that were never started, without burning an attempt.
WITH released AS (
    UPDATE skiplock.jobs
    SET status = 'pending', attempts = greatest(attempts - 1, 0), claimed_by = NULL,
        claim_token = NULL, claimed_at = NULL, updated_at = now()
    WHERE id = ANY(%(ids)s::bigint[]) AND status = 'running'
      AND claim_token = %(token)s AND claimed_by = %(worker)s
    RETURNING id
)
SELECT count(*), (SELECT pg_notify('skiplock_enqueued', '') WHERE EXISTS (SELECT 1 FROM released))
FROM released;

-- name: rescue_stale_workers
-- Workers whose heartbeat is older than stale_after are lost; their running jobs are rescued below.
-- Age counts from the server's start at the earliest: time the database was down is not the
-- workers' silence (they could not heartbeat), so after a restart nobody is stale for stale_after.
UPDATE skiplock.workers
SET state = 'lost', stopped_at = now()
WHERE state NOT IN ('stopped', 'lost')
  AND greatest(heartbeat_at, pg_postmaster_start_time()) < now() - make_interval(secs => %(stale_after)s)
RETURNING id, engine_id, host, pid;

-- name: rescue_jobs
-- Running jobs whose holder is lost or stopped, or unknown and silent for stale_after, go back to
-- pending; the attempt they used stays counted, so a job that kills its worker every time ends dead.
-- A holder the supervisor saw die (lost_reason set) counts a crash on each of its jobs, which the
-- claim then hands out alone; a job that dies again while held alone (crashes > 0: it was claimed
-- solo) is the one killing its workers, and its error says so (WorkerCrashed).
WITH orphaned AS (
    -- reason: what the supervisor saw (worker_mark_lost), else the stale heartbeat.
    SELECT j.id, coalesce(w.lost_reason, 'stopped heartbeating') AS reason, w.lost_reason IS NOT NULL AS died,
           j.crashes > 0 AS solo
    FROM skiplock.jobs j
    LEFT JOIN skiplock.workers w ON w.id = j.claimed_by
    WHERE j.status = 'running'
      AND (w.state IN ('lost', 'stopped')
           OR (w.id IS NULL AND j.claimed_at < now() - make_interval(secs => %(stale_after)s)))
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
), kind AS (
    SELECT id, reason, died,
           CASE WHEN died AND solo THEN 'WorkerCrashed' ELSE 'WorkerLost' END AS error_type
    FROM orphaned
), rescued AS (
    UPDATE skiplock.jobs j
    SET status = CASE WHEN j.attempts >= skiplock.max_attempts_for(j.flow, j.max_attempts)
                      THEN 'dead' ELSE 'pending' END::skiplock.job_status,
        finished_at = CASE WHEN j.attempts >= skiplock.max_attempts_for(j.flow, j.max_attempts)
                           THEN clock_timestamp() END,
        crashes = j.crashes + CASE WHEN k.died THEN 1 ELSE 0 END,
        error_type = k.error_type,
        error_message = CASE WHEN k.error_type = 'WorkerCrashed' THEN 'worker ' || k.reason || ' while running this job'
                             ELSE 'worker ' || coalesce(j.claimed_by, '?') || ' ' || k.reason || ' while running this job' END,
        errors = skiplock.errors_append(j.errors, jsonb_build_object(
            'attempt', j.attempts, 'at', clock_timestamp(), 'worker', j.claimed_by, 'type', k.error_type,
            'message', CASE WHEN k.error_type = 'WorkerCrashed' THEN 'worker ' || k.reason || ' while running this job'
                            ELSE 'rescued: worker ' || k.reason END,
            'traceback', NULL, 'permanent', false),
            %(errors_kept)s),
        claimed_by = NULL, claim_token = NULL, updated_at = now()
    FROM kind k
    WHERE j.id = k.id
    RETURNING j.id, j.flow, j.status, j.run_id
), run_progress AS (
    -- A job that dies here ends, like one that dies at ack: its run may be finished now (the
    -- supervisor fires the hook of finished runs through runs_claim_orphaned_hooks).
    UPDATE skiplock.runs r
    SET dead = r.dead + d.dead,
        finished_at = CASE WHEN r.finished_at IS NULL AND r.sealed AND r.completed + r.dead + d.dead >= r.total
                           THEN clock_timestamp() ELSE r.finished_at END
    FROM (SELECT run_id, count(*) AS dead FROM rescued WHERE status = 'dead' AND run_id IS NOT NULL
          GROUP BY run_id) AS d
    WHERE r.id = d.run_id
)
SELECT flow, count(*) FILTER (WHERE status = 'pending') AS rescued,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       (SELECT pg_notify('skiplock_enqueued', ''))
FROM rescued GROUP BY flow;

-- name: cleanup_orphaned
-- The seeds' time-based cleanup: running jobs claimed more than timeout ago go back to pending.
WITH reset AS (
    UPDATE skiplock.jobs
    SET status = 'pending', claimed_by = NULL, claim_token = NULL, claimed_at = NULL, updated_at = now()
    WHERE status = 'running' AND claimed_at < now() - make_interval(secs => %(timeout)s)
    RETURNING id
)
SELECT count(*) FROM reset;

-- name: reset_failed
-- The seeds' reset_failed_records: dead jobs of a flow that used fewer than max_retries attempts.
-- Like dlq_retry: leaves a job whose dedupe key is taken, and takes it out of its run's dead count.
WITH reset AS (
    UPDATE skiplock.jobs j
    SET status = 'pending', run_at = now(), finished_at = NULL, updated_at = now()
    WHERE j.status = 'dead' AND j.flow = %(flow)s AND j.attempts < %(max_retries)s
      AND j.attempts < skiplock.max_attempts_for(j.flow, j.max_attempts)
      AND (j.dedupe_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM skiplock.jobs o
          WHERE o.flow = j.flow AND o.dedupe_key = j.dedupe_key
            AND (o.status IN ('pending', 'running') OR (o.status = 'dead' AND o.id > j.id))))
    RETURNING j.id, j.run_id
), runs_reopened AS (
    -- As dlq_retry: a finished run reopens.
    UPDATE skiplock.runs r SET dead = r.dead - c.n, finished_at = NULL,
        reopened = r.reopened + (r.finished_at IS NOT NULL)::int,
        hook_fired_at = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                             ELSE r.hook_fired_at END,
        hook_claimed_by = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                               ELSE r.hook_claimed_by END
    FROM (SELECT run_id, count(*) AS n FROM reset WHERE run_id IS NOT NULL GROUP BY run_id) c
    WHERE r.id = c.run_id
)
SELECT count(*), (SELECT pg_notify('skiplock_enqueued', '') WHERE EXISTS (SELECT 1 FROM reset))
FROM reset;

-- name: dlq_list
SELECT id, flow, attempts, skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts, error_type,
       error_message, finished_at, run_id
FROM skiplock.jobs j
WHERE status = 'dead'
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(flow)s::text IS NULL OR flow = %(flow)s)
  AND (%(error_type)s::text IS NULL OR error_type = %(error_type)s)
  AND (%(older_than)s::float8 IS NULL OR finished_at < now() - make_interval(secs => %(older_than)s))
ORDER BY finished_at DESC, id DESC
LIMIT %(limit)s;

-- name: job_get
SELECT id, flow, payload, status::text AS status, priority, run_at, attempts,
       skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts,
       claimed_by,
       claimed_at, error_type, error_message, errors, NULL::jsonb AS result, run_id, dedupe_key,
       created_at, updated_at, finished_at, cancel_requested_at, parent_id
FROM skiplock.jobs j WHERE id = %(id)s
UNION ALL
SELECT id, flow, payload, status, priority, NULL, attempts, skiplock.max_attempts_for(j.flow, j.max_attempts),
       claimed_by,
       claimed_at, NULL, NULL, errors, result, run_id, NULL, created_at, finished_at, finished_at, NULL, parent_id
FROM skiplock.jobs_done j WHERE id = %(id)s
LIMIT 1;

-- name: job_children
-- The jobs a job's ack created (Next(...)), in any state: each table by its parent index.
SELECT id, flow, status FROM (
    SELECT id, flow, status::text AS status FROM skiplock.jobs WHERE parent_id = %(id)s
    UNION ALL
    SELECT id, flow, status FROM skiplock.jobs_done WHERE parent_id = %(id)s
) c
ORDER BY id
LIMIT %(limit)s;

-- name: dlq_retry
-- Guarded by status: a job that is no longer dead is left alone. Skips a job whose dedupe key is
-- taken again by an unfinished job; of several dead jobs sharing a key only the newest comes back
-- (retrying them all would break the key's uniqueness). Attempts restart; the error history is kept.
WITH retried AS (
    UPDATE skiplock.jobs j
    SET status = 'pending', attempts = 0, run_at = now(), finished_at = NULL, updated_at = now()
    WHERE j.status = 'dead'
      AND (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
      AND (%(flow)s::text IS NULL OR j.flow = %(flow)s)
      AND (%(error_type)s::text IS NULL OR j.error_type = %(error_type)s)
      AND (%(older_than)s::float8 IS NULL OR j.finished_at < now() - make_interval(secs => %(older_than)s))
      AND (j.dedupe_key IS NULL OR NOT EXISTS (
          SELECT 1 FROM skiplock.jobs o
          WHERE o.flow = j.flow AND o.dedupe_key = j.dedupe_key
            AND (o.status IN ('pending', 'running') OR (o.status = 'dead' AND o.id > j.id))))
    RETURNING j.id, j.run_id
), runs_reopened AS (
    -- The retried jobs' runs are unfinished again: a finished run reopens (finished_at cleared,
    -- `reopened` counted) and finishes again after them. Its hook fires again only if its flow has
    -- on_complete_repeat = true; else hook_fired_at stays and the next finish claims nothing.
    UPDATE skiplock.runs r SET dead = r.dead - c.n, finished_at = NULL,
        reopened = r.reopened + (r.finished_at IS NOT NULL)::int,
        hook_fired_at = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                             ELSE r.hook_fired_at END,
        hook_claimed_by = CASE WHEN r.finished_at IS NOT NULL AND skiplock.run_hook_repeats(r.flow) THEN NULL
                               ELSE r.hook_claimed_by END
    FROM (SELECT run_id, count(*) AS n FROM retried WHERE run_id IS NOT NULL GROUP BY run_id) c
    WHERE r.id = c.run_id
    RETURNING r.id
)
SELECT coalesce(array_agg(id), '{}'),
       (SELECT count(*) FROM runs_reopened),
       (SELECT pg_notify('skiplock_enqueued', '') WHERE EXISTS (SELECT 1 FROM retried))
FROM retried;

-- name: dlq_purge
WITH purged AS (
    DELETE FROM skiplock.jobs
    WHERE status = 'dead'
      AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(flow)s::text IS NULL OR flow = %(flow)s)
      AND (%(error_type)s::text IS NULL OR error_type = %(error_type)s)
      AND (%(older_than)s::float8 IS NULL OR finished_at < now() - make_interval(secs => %(older_than)s))
    RETURNING id
)
SELECT coalesce(array_agg(id), '{}') FROM purged;

-- name: dlq_analyze
SELECT flow, coalesce(error_type, '?') AS error_type, count(*) AS count,
       min(finished_at) AS first_at, max(finished_at) AS last_at,
       (array_agg(error_message ORDER BY finished_at DESC))[1] AS sample_message
FROM skiplock.jobs
WHERE status = 'dead' AND (%(flow)s::text IS NULL OR flow = %(flow)s)
GROUP BY flow, error_type
ORDER BY count(*) DESC, flow, error_type;

-- name: purge_done
-- Retention of completed jobs, in bounded slices so a large purge never holds a long lock.
WITH old AS (
    SELECT ctid FROM skiplock.jobs_done
    WHERE finished_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
)
DELETE FROM skiplock.jobs_done d USING old WHERE d.ctid = old.ctid;

-- name: purge_workers
-- Retention of worker rows (one per spawn): stopped or lost longer than `retention` ago, in bounded
-- slices. A lost worker's row must outlive its jobs' rescue; `retention` is far longer than that.
WITH old AS (
    SELECT id FROM skiplock.workers
    WHERE state IN ('stopped', 'lost') AND stopped_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
)
DELETE FROM skiplock.workers w USING old WHERE w.id = old.id;

-- name: purge_runs
-- Retention of finished runs, in bounded slices. A run's jobs are all finished; an unfired hook
-- that old is given up (runs_claim_orphaned_hooks looks at the last minutes' finishes in practice).
WITH old AS (
    SELECT id FROM skiplock.runs
    WHERE finished_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
)
DELETE FROM skiplock.runs r USING old WHERE r.id = old.id;

-- name: purge_stats
-- Retention of per-minute history, by the primary key's leading column, in bounded slices.
WITH old AS (
    SELECT minute, flow FROM skiplock.stats_minute
    WHERE minute < now() - make_interval(secs => %(retention)s)
    ORDER BY minute
    LIMIT %(limit)s
)
DELETE FROM skiplock.stats_minute s USING old WHERE s.minute = old.minute AND s.flow = old.flow;

-- name: purge_ack_receipts
-- An ack receipt only serves the retries of its own ack (seconds to a minute).
WITH old AS (
    SELECT ctid FROM skiplock.ack_receipts
    WHERE created_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
)
DELETE FROM skiplock.ack_receipts a USING old WHERE a.ctid = old.ctid;

-- name: purge_enqueue_receipts
WITH old AS (
    SELECT ctid FROM skiplock.enqueue_receipts
    WHERE created_at < now() - make_interval(secs => %(retention)s)
    LIMIT %(limit)s
)
DELETE FROM skiplock.enqueue_receipts e USING old WHERE e.ctid = old.ctid;

-- name: status_live
-- The hot table holds only unfinished jobs and dead letters, so this scan stays small.
SELECT flow,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS pending,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'dead') AS dead
FROM skiplock.jobs
WHERE %(flow)s::text IS NULL OR flow = %(flow)s
GROUP BY flow;

-- name: status_done
SELECT flow, count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
FROM skiplock.jobs_done
WHERE %(flow)s::text IS NULL OR flow = %(flow)s
GROUP BY flow;

-- name: flows_list
SELECT name, paused, circuit_state, circuit_until, policy FROM skiplock.flows ORDER BY name;

-- name: flow_set_paused
INSERT INTO skiplock.flows (name, paused) VALUES (%(flow)s, %(paused)s)
ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now();

-- name: flow_paused_changed_notify
SELECT pg_notify('skiplock_events', %(payload)s);

-- name: worker_register
INSERT INTO skiplock.workers (id, engine_id, host, pid, flows, state, version)
VALUES (%(id)s, %(engine_id)s, %(host)s, %(pid)s, %(flows)s, 'starting', %(version)s)
ON CONFLICT (id) DO UPDATE SET state = 'starting', heartbeat_at = now(), stopped_at = NULL, version = EXCLUDED.version;

-- name: worker_report
-- The worker's own tick: what it is doing. Its liveness (heartbeat_at) belongs to the supervisor
-- (workers_renew). A worker marked lost stays lost: its jobs may already be someone else's.
UPDATE skiplock.workers
SET state = %(state)s, counters = %(counters)s, pool = %(pool)s
WHERE id = %(id)s AND state NOT IN ('lost', 'stopped')
RETURNING id;

-- name: workers_renew
-- The supervisor's heartbeat of its live workers, one statement per interval. Returns the ids the
-- database holds lost: the supervisor kills those at once. (An id without a row, a worker still
-- registering, is neither.)
WITH renewed AS (
    UPDATE skiplock.workers SET heartbeat_at = now()
    WHERE id = ANY(%(ids)s::text[]) AND state NOT IN ('lost', 'stopped')
    RETURNING id
)
SELECT coalesce(array_agg(id), '{}') FROM skiplock.workers
WHERE id = ANY(%(ids)s::text[]) AND state = 'lost';

-- name: worker_api_heartbeat
-- Queue.heartbeat() for custom claim loops: registers the id on first use, renews it after; no row
-- back once the id is lost (its jobs were rescued) or stopped.
INSERT INTO skiplock.workers AS w (id, engine_id, host, pid, state)
VALUES (%(id)s, 'api', %(host)s, %(pid)s, 'busy')
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
WHERE w.state NOT IN ('lost', 'stopped')
RETURNING id;

-- name: worker_stopped
UPDATE skiplock.workers SET state = 'stopped', stopped_at = now(), heartbeat_at = now()
WHERE id = %(id)s AND state <> 'lost';

-- name: workers_list
-- Live workers and those stopped or lost in the last hour. Two arms, each on its partial index
-- (workers_live_idx, workers_stopped_idx): an OR of the two lets the planner scan every row ever
-- spawned.
SELECT id, engine_id, host, pid, flows, state, version, started_at, heartbeat_at, stopped_at, counters, pool,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age
FROM (SELECT * FROM skiplock.workers WHERE state NOT IN ('stopped', 'lost')
      UNION ALL
      SELECT * FROM skiplock.workers
      WHERE state IN ('stopped', 'lost') AND stopped_at > now() - interval '1 hour') AS w
ORDER BY started_at;

-- name: workers_stale_count
-- Stale as rescue_stale_workers counts it.
SELECT count(*) FROM skiplock.workers
WHERE state NOT IN ('stopped', 'lost')
  AND greatest(heartbeat_at, pg_postmaster_start_time()) < now() - make_interval(secs => %(stale_after)s);

-- name: health_ping
SELECT 1;

-- name: stalled_listeners
-- Idle console backends blocked sending to their client (a console that stopped reading: Ctrl-Z,
-- SIGSTOP, a hung UI loop). A LISTENing backend in ClientWrite cannot advance its NOTIFY queue
-- position, which pins pg_notification_queue_usage() for every channel until the queue is full and
-- every NOTIFY (enqueue, rescue, ticks) fails. (pid, backend_start) names a backend across pid reuse.
SELECT pid, backend_start FROM pg_stat_activity
WHERE application_name = %(application_name)s AND state = 'idle' AND wait_event = 'ClientWrite';

-- name: stalled_listeners_terminate
-- Only backends still blocked as they were seen on the previous pass. The console reconnects by
-- itself when it reads again and re-reads what it missed from the tables.
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid))
FROM pg_stat_activity a
JOIN unnest(%(pids)s::int[], %(starts)s::timestamptz[]) AS t(pid, started)
  ON a.pid = t.pid AND a.backend_start = t.started
WHERE a.state = 'idle' AND a.wait_event = 'ClientWrite';

-- ---------------------------------------------------------------------------------------------
-- The engine: worker loop, telemetry, supervisor

-- name: claim_release_token
-- After a lost connection during a claim we cannot know whether it committed: hand back whatever
-- that claim took, without burning attempts.
WITH released AS (
    UPDATE skiplock.jobs
    SET status = 'pending', attempts = greatest(attempts - 1, 0), claimed_by = NULL,
        claim_token = NULL, claimed_at = NULL, updated_at = now()
    WHERE claimed_by = %(worker)s AND status = 'running' AND claim_token = %(token)s
    RETURNING id
)
SELECT count(*) FROM released;

-- name: claim_flow_lock
-- Fleet-wide concurrency limit: the advisory lock serialises the claimers of one flow for the
-- length of their claim transaction, so the count and the claim agree. The count is a statement of
-- its own: a statement's snapshot is taken before it waits for the lock, so a count in the same
-- statement would miss the claim the previous holder committed while we waited.
SELECT pg_advisory_xact_lock(hashtext('skiplock.flow.' || %(flow)s));

-- name: claim_running_count
SELECT count(*) FROM skiplock.jobs WHERE flow = %(flow)s AND status = 'running';

-- ---------------------------------------------------------------------------------------------
-- Flow control: rate limits and per-key concurrency (issue 15 items 4-5). Only flows with a
-- rate_limit or a per-key limit send these; every other flow keeps claim_batch as it is.

-- name: rate_bucket_ensure
-- A new bucket starts full (one burst). Sent once per worker per limited flow, at its first claim.
INSERT INTO skiplock.rate_buckets (flow, tokens) VALUES (%(flow)s, %(burst)s)
ON CONFLICT (flow) DO NOTHING;

-- name: claim_rated
-- claim_batch for a rate-limited flow: the bucket row is locked (FOR UPDATE waits for the claimer
-- before us and reads its committed debit), refilled by `rate` tokens per second since its last
-- claim up to `burst`, and debited by exactly the number of jobs this statement claims, so claimers
-- on every engine take turns on one row and never take more than it holds. A missing bucket holds
-- nothing (rate_bucket_ensure creates it).
WITH bucket AS MATERIALIZED (
    SELECT b.flow, clock_timestamp() AS ts,
           skiplock.bucket_level(b.tokens, b.updated_at, %(rate)s::float8, %(burst)s::float8,
                                 clock_timestamp()) AS avail
    FROM skiplock.rate_buckets b WHERE b.flow = %(flow)s
    FOR UPDATE
), picked AS (
    SELECT id FROM skiplock.jobs
    WHERE flow = %(flow)s AND status = 'pending' AND run_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM skiplock.flows f
          WHERE f.name = %(flow)s
            AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())))
      AND NOT EXISTS (SELECT 1 FROM skiplock.workers w WHERE w.id = %(worker)s AND w.state = 'lost')
    ORDER BY priority DESC, run_at, id
    LIMIT least(%(limit)s::int, coalesce((SELECT floor(avail)::int FROM bucket), 0))
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE skiplock.jobs j
    SET status = 'running', claimed_by = %(worker)s, claim_token = %(token)s, claimed_at = clock_timestamp(),
        attempts = j.attempts + 1, updated_at = now()
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.id, j.payload, j.attempts, coalesce(j.max_attempts, %(max_attempts)s), j.run_id,
              extract(epoch FROM j.claimed_at - j.run_at)::float8 * 1000.0 AS wait_ms
), debit AS (
    UPDATE skiplock.rate_buckets r
    SET tokens = b.avail - (SELECT count(*) FROM claimed), updated_at = b.ts
    FROM bucket b WHERE r.flow = b.flow
)
SELECT * FROM claimed;

-- name: rate_bucket_wait
-- After a rate-limited claim came back empty: seconds until the bucket holds one whole token
-- (0: it holds one now, so the flow had nothing due). The worker sleeps that long, not a poll.
SELECT greatest((1.0 - skiplock.bucket_level(b.tokens, b.updated_at, %(rate)s::float8, %(burst)s::float8,
                                             clock_timestamp())) / %(rate)s::float8, 0)
FROM skiplock.rate_buckets b WHERE b.flow = %(flow)s;

-- name: claim_keyed_pick
-- First statement of a per-key claim transaction: up to `limit` due jobs whose key has room in this
-- statement's snapshot, taking a transaction-level advisory lock per key as it goes (skipping a key
-- another claimer holds now). Rows are not locked here. The scan walks the claim's index and probes
-- jobs_key_running_idx once per candidate (at most `per_key` entries), so its cost grows with the
-- candidates it examines (the batch, plus jobs of blocked keys ahead of them), not with the number
-- of keys. Jobs without a key are not limited.
SELECT j.id FROM skiplock.jobs j
WHERE j.flow = %(flow)s AND j.status = 'pending' AND j.run_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM skiplock.flows f
      WHERE f.name = %(flow)s
        AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())))
  AND NOT EXISTS (SELECT 1 FROM skiplock.workers w WHERE w.id = %(worker)s AND w.state = 'lost')
  AND (coalesce(j.concurrency_key, j.payload ->> %(key_field)s::text) IS NULL
       OR ((SELECT count(*) FROM (
                -- running, spelled as jobs_key_running_idx's predicate (see migration 0009)
                SELECT 1 FROM skiplock.jobs r
                WHERE r.status BETWEEN 'running' AND 'running' AND r.concurrency_key IS NOT NULL
                  AND r.flow = %(flow)s
                  AND r.concurrency_key = coalesce(j.concurrency_key, j.payload ->> %(key_field)s::text)
                LIMIT %(per_key)s) AS held) < %(per_key)s
           AND pg_try_advisory_xact_lock(hashtext('skiplock.key.' || %(flow)s),
                                         hashtext(coalesce(j.concurrency_key, j.payload ->> %(key_field)s::text)))))
ORDER BY j.priority DESC, j.run_at, j.id
LIMIT %(limit)s;

-- name: claim_keyed
-- Second statement: claims the picked jobs whose key still has room. Its snapshot is taken after
-- the key locks were granted, so it sees every claim of those keys that committed before (a count
-- in the pick statement could miss the claim of the lock's previous holder). Within the batch, a
-- key gets at most its remaining room, in claim order. The claim stamps each job's key, so running
-- jobs are found by jobs_key_running_idx. With `rate` (a rate-limited keyed flow) the bucket is
-- refilled and debited as in claim_rated; without it the bucket CTE reads nothing.
-- Repeats claim_rated's CTEs: a function holding an UPDATE is never inlined (planned apart, hidden from EXPLAIN).
WITH bucket AS MATERIALIZED (
    SELECT b.flow, clock_timestamp() AS ts,
           skiplock.bucket_level(b.tokens, b.updated_at, %(rate)s::float8, %(burst)s::float8,
                                 clock_timestamp()) AS avail
    FROM skiplock.rate_buckets b WHERE b.flow = %(flow)s AND %(rate)s::float8 IS NOT NULL
    FOR UPDATE
), locked AS (
    SELECT j.id, j.priority, j.run_at, coalesce(j.concurrency_key, j.payload ->> %(key_field)s::text) AS k
    FROM skiplock.jobs j
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.flow = %(flow)s AND j.status = 'pending'
    FOR UPDATE SKIP LOCKED
), ranked AS (
    SELECT l.id, l.priority, l.run_at, l.k,
           row_number() OVER (PARTITION BY l.k ORDER BY l.priority DESC, l.run_at, l.id) AS nth
    FROM locked l
), allowed AS (
    SELECT r.id FROM ranked r
    WHERE r.k IS NULL
       OR r.nth <= %(per_key)s - (SELECT count(*) FROM (
              SELECT 1 FROM skiplock.jobs x
              WHERE x.status BETWEEN 'running' AND 'running' AND x.concurrency_key IS NOT NULL
                AND x.flow = %(flow)s AND x.concurrency_key = r.k
              LIMIT %(per_key)s) AS held)
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT CASE WHEN %(rate)s::float8 IS NULL THEN %(limit)s::int
               ELSE least(%(limit)s::int, coalesce((SELECT floor(avail)::int FROM bucket), 0)) END
), claimed AS (
    UPDATE skiplock.jobs j
    SET status = 'running', claimed_by = %(worker)s, claim_token = %(token)s, claimed_at = clock_timestamp(),
        attempts = j.attempts + 1, updated_at = now(),
        concurrency_key = coalesce(j.concurrency_key, j.payload ->> %(key_field)s::text)
    WHERE j.id = ANY(ARRAY(SELECT id FROM allowed))
    RETURNING j.id, j.payload, j.attempts, coalesce(j.max_attempts, %(max_attempts)s), j.run_id,
              extract(epoch FROM j.claimed_at - j.run_at)::float8 * 1000.0 AS wait_ms
), debit AS (
    UPDATE skiplock.rate_buckets r
    SET tokens = b.avail - (SELECT count(*) FROM claimed), updated_at = b.ts
    FROM bucket b WHERE r.flow = b.flow
)
SELECT * FROM claimed;

-- name: next_run_at
-- How long an idle worker may sleep: the earliest scheduled job of its highest priority. Flows that
-- are paused, whose circuit is open or that run at their concurrency limit are left out: their due
-- jobs cannot be claimed now, and counting them would make an idle worker spin (a resume sends a
-- wakeup; a cool-down's end or a free slot is seen within a poll).
SELECT extract(epoch FROM run_at - now())::float8 FROM skiplock.jobs
WHERE flow = ANY(ARRAY(
          SELECT u.name FROM unnest(%(flows)s::text[]) AS u(name)
          WHERE NOT EXISTS (SELECT 1 FROM skiplock.flows f
                            WHERE f.name = u.name
                              AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())
                                   OR (f.policy->>'concurrency')::int <= (
                                       SELECT count(*) FROM skiplock.jobs r
                                       WHERE r.flow = u.name AND r.status = 'running')))))
  AND status = 'pending'
ORDER BY priority DESC, run_at
LIMIT 1;

-- name: flows_due
-- Which of these flows have a job claimable now (not paused, circuit not open, below their fleet-wide
-- concurrency: the gates of next_run_at; with a rate, a token in its bucket), in one round trip: one
-- probe of jobs_claim_idx per flow. A worker serving many flows claims only where there is work
-- instead of one empty claim per flow. `rates` and `bursts` run beside `flows` (NULL: no rate limit):
-- the bucket is refilled as claim_rated would, and a flow without a bucket row yet starts full.
SELECT u.name FROM unnest(%(flows)s::text[], %(rates)s::float8[], %(bursts)s::float8[]) AS u(name, rate, burst)
WHERE EXISTS (SELECT 1 FROM skiplock.jobs j
              WHERE j.flow = u.name AND j.status = 'pending' AND j.run_at <= now())
  AND NOT EXISTS (SELECT 1 FROM skiplock.flows f
                  WHERE f.name = u.name
                    AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())
                         OR (f.policy->>'concurrency')::int <= (
                             SELECT count(*) FROM skiplock.jobs r
                             WHERE r.flow = u.name AND r.status = 'running')))
  AND NOT EXISTS (SELECT 1 FROM skiplock.rate_buckets b
                  WHERE u.rate IS NOT NULL AND b.flow = u.name
                    AND skiplock.bucket_level(b.tokens, b.updated_at, u.rate, u.burst, clock_timestamp()) < 1.0);

-- name: claim_flows
-- claim_batch across many flows in one statement: up to `limits[i]` jobs of `flows[i]` under
-- `tokens[i]` (each flow keeps a claim token of its own, so its acks are fenced as claim_batch's),
-- at most `total` in all, flows taken in the order given. Within a flow: priority, then FIFO. The
-- flow gates are claim_batch's (paused, open circuit, a lost worker); flows with a fleet-wide
-- concurrency, a rate or a per-key limit are not sent here (claim_rated, claim_keyed). A crashed
-- job (crashes > 0) goes out alone, as in claim_batch. Rows: the flow's index in `flows` (1-based),
-- priority and run_at (the caller orders each flow's rows), then claim_batch's columns.
WITH picked AS MATERIALIZED (
    SELECT p.id, p.crashes, u.token, u.max_attempts, u.ord
    FROM unnest(%(flows)s::text[], %(limits)s::int[], %(tokens)s::bigint[], %(max_attempts)s::int[])
         WITH ORDINALITY AS u(flow, lim, token, max_attempts, ord)
    -- The gates inside the lateral, not as a join: a join (a hash anti join) would reorder the flows.
    -- They name no column of jobs, so each is checked once per flow, before its index scan.
    CROSS JOIN LATERAL (
        SELECT j.id, j.crashes FROM skiplock.jobs j
        WHERE j.flow = u.flow AND j.status = 'pending' AND j.run_at <= now()
          AND NOT EXISTS (SELECT 1 FROM skiplock.flows f
                          WHERE f.name = u.flow
                            AND (f.paused OR (f.circuit_state = 'open' AND f.circuit_until > now())))
          AND NOT EXISTS (SELECT 1 FROM skiplock.workers w WHERE w.id = %(worker)s AND w.state = 'lost')
        ORDER BY j.priority DESC, j.run_at, j.id
        LIMIT u.lim
        FOR UPDATE SKIP LOCKED) AS p
    LIMIT %(total)s
), chosen AS MATERIALIZED (
    SELECT id, token, max_attempts, ord FROM picked WHERE NOT EXISTS (SELECT 1 FROM picked WHERE crashes > 0)
    UNION ALL
    (SELECT id, token, max_attempts, ord FROM picked WHERE crashes > 0 LIMIT 1)
)
UPDATE skiplock.jobs j
SET status = 'running', claimed_by = %(worker)s, claim_token = c.token, claimed_at = clock_timestamp(),
    attempts = j.attempts + 1, updated_at = now()
FROM chosen c
-- `= ANY(ARRAY(...))` beside the join, as in claim_batch: the scan of jobs takes the pkey.
WHERE j.id = ANY(ARRAY(SELECT id FROM chosen)) AND j.id = c.id
RETURNING c.ord, j.priority, j.run_at, j.id, j.payload, j.attempts, coalesce(j.max_attempts, c.max_attempts), j.run_id,
          extract(epoch FROM j.claimed_at - j.run_at)::float8 * 1000.0 AS wait_ms;

-- name: events_notify
SELECT pg_notify('skiplock_events', e) FROM unnest(%(events)s::text[]) AS e;

-- name: stats_upsert
INSERT INTO skiplock.stats_minute AS s (minute, flow, completed, failed, dead, rescued, wait_ms_sum, run_ms_sum)
SELECT date_trunc('minute', now()), t.flow, t.completed, t.failed, t.dead, t.rescued, t.wait_ms, t.run_ms
FROM unnest(%(flows)s::text[], %(completed)s::bigint[], %(failed)s::bigint[], %(dead)s::bigint[],
            %(rescued)s::bigint[], %(wait_ms)s::float8[], %(run_ms)s::float8[])
     AS t(flow, completed, failed, dead, rescued, wait_ms, run_ms)
ORDER BY t.flow
ON CONFLICT (minute, flow) DO UPDATE
SET completed = s.completed + EXCLUDED.completed, failed = s.failed + EXCLUDED.failed,
    dead = s.dead + EXCLUDED.dead, rescued = s.rescued + EXCLUDED.rescued,
    wait_ms_sum = s.wait_ms_sum + EXCLUDED.wait_ms_sum, run_ms_sum = s.run_ms_sum + EXCLUDED.run_ms_sum;

-- name: flows_sync
-- The engine records the policy it runs each flow with, for the console and other engines.
INSERT INTO skiplock.flows (name, policy) SELECT * FROM unnest(%(names)s::text[], %(policies)s::jsonb[])
ON CONFLICT (name) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now();

-- name: flows_circuit_open
-- The tick's circuit refresh: only the names whose circuit is open (a worker of 1,000 flows reads a
-- few names per tick, not 1,000 rows).
SELECT name FROM skiplock.flows WHERE name = ANY(%(flows)s::text[]) AND circuit_state = 'open';

-- name: circuit_open
UPDATE skiplock.flows SET circuit_state = 'open', circuit_until = now() + make_interval(secs => %(cooldown)s),
       updated_at = now()
WHERE name = %(flow)s AND (circuit_state <> 'open' OR circuit_until <= now())
RETURNING extract(epoch FROM circuit_until)::float8;

-- name: circuit_close
UPDATE skiplock.flows SET circuit_state = 'closed', circuit_until = NULL, updated_at = now()
WHERE name = %(flow)s AND circuit_state <> 'closed'
RETURNING name;

-- name: circuit_ensure_flow
INSERT INTO skiplock.flows (name) VALUES (%(flow)s) ON CONFLICT (name) DO NOTHING;

-- name: runs_claim_orphaned_hooks
-- Runs of the flows this engine serves that finished but whose hook was never claimed (the acking
-- worker died in between): claimed here, each by one engine, which fires it.
UPDATE skiplock.runs SET hook_fired_at = now()
WHERE id IN (SELECT id FROM skiplock.runs
             WHERE finished_at IS NOT NULL AND hook_fired_at IS NULL
               -- finished by its seal (run_seal): no ack will claim it, so no need to wait
               AND (finished_at < now() - interval '10 seconds' OR finished_at = sealed_at)
               AND flow = ANY(%(flows)s::text[])
             LIMIT 100
             FOR UPDATE SKIP LOCKED)
  AND hook_fired_at IS NULL
RETURNING id AS run, flow, total, completed, dead;

-- name: run_claim_hook
-- Exactly one claimer gets the row back: it fires the run's on-complete hook. The claimer's token is
-- recorded, so a retry that re-presents it (the first try committed, its reply was lost) gets the
-- run back again instead of nothing. A NULL claimer can claim only an unclaimed run.
UPDATE skiplock.runs
SET hook_fired_at = coalesce(hook_fired_at, clock_timestamp()), hook_claimed_by = %(claimer)s
WHERE id = %(run_id)s AND finished_at IS NOT NULL
  AND (hook_fired_at IS NULL OR (%(claimer)s::text IS NOT NULL AND hook_claimed_by = %(claimer)s))
RETURNING id AS run, flow, total, completed, dead;


-- name: rescue_leader
-- One engine at a time runs the rescue pass. Session-level, so the pass's own statements commit one
-- by one (the rescue first, telemetry after it); released by rescue_leader_release or the
-- connection's end.
SELECT pg_try_advisory_lock(hashtext('skiplock.rescue'));

-- name: rescue_leader_release
SELECT pg_advisory_unlock(hashtext('skiplock.rescue'));

-- name: vacuum_leader
-- One engine at a time watches the hot table's dead tuples (engine/vacuum.py). Session-level: held
-- for the life of that engine's vacuum connection.
SELECT pg_try_advisory_lock(hashtext('skiplock.vacuum'));

-- name: jobs_dead_tuples
-- Dead row versions in skiplock.jobs (each completed job leaves two: the claim's and the ack's), from
-- the statistics (up to about a second behind).
SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'skiplock.jobs'::regclass;

-- name: jobs_vacuum
-- Frees the dead tuples for reuse between autovacuum's visits (its naptime is server-wide, 1 min by
-- default, while a busy queue leaves millions of dead tuples a minute). SKIP_LOCKED: if autovacuum
-- or another VACUUM holds the table, skip this round rather than wait. TRUNCATE false: as the table's
-- vacuum_truncate (migration 0028), never the ACCESS EXCLUSIVE lock that stops the queue. Autocommit only.
VACUUM (SKIP_LOCKED, TRUNCATE false) skiplock.jobs;

-- name: worker_mark_lost
-- The supervisor saw this worker's process die (or killed it): its jobs can be rescued now, not
-- after stale_after; the reason ("exited with code -9", "killed after grace period") goes into
-- each rescued job's error.
UPDATE skiplock.workers w SET state = 'lost', stopped_at = now(), lost_reason = m.reason
FROM unnest(%(ids)s::text[], %(reasons)s::text[]) AS m(id, reason)
WHERE w.id = m.id AND w.state <> 'stopped'
RETURNING w.id;

-- name: drain_remaining
-- `engine run --drain --wait-scheduled`: anything pending (due or later) or running.
SELECT count(*) FROM (
    SELECT 1 FROM skiplock.jobs
    WHERE flow = ANY(%(flows)s::text[]) AND status IN ('pending', 'running')
    LIMIT 1
) AS any_left;

-- name: drain_due
-- `engine run --drain`: anything running or due now; jobs scheduled for later do not hold a drain.
SELECT count(*) FROM (
    SELECT 1 FROM skiplock.jobs
    WHERE flow = ANY(%(flows)s::text[])
      AND (status = 'running' OR (status = 'pending' AND run_at <= now()))
    LIMIT 1
) AS any_due;

-- name: drain_scheduled
-- What a drain leaves behind, read once when it ends.
SELECT flow, count(*) AS jobs, min(run_at) AS next_run_at
FROM skiplock.jobs
WHERE flow = ANY(%(flows)s::text[]) AND status = 'pending' AND run_at > now()
GROUP BY flow
ORDER BY flow;

-- ---------------------------------------------------------------------------------------------
-- Job control: cancel, wait, the job browser, known flows (issue 14)

-- name: cancel_jobs
-- One bounded slice of a cancel (the caller repeats it until a slice comes back short). Pending and
-- scheduled jobs end cancelled at once: they move to jobs_done, their run counts them (out of `total`,
-- into `cancelled`: the ack's last-man check is unchanged, and whichever statement ends the run sets
-- finished_at, once). Running jobs get cancel_requested_at, for their worker, and a wake-up on
-- skiplock_cancel. Rows another transaction holds (a claim or an ack in flight) are skipped rather
-- than waited for: they are changing state, and waiting could deadlock with an ack's row locks.
WITH waiting AS (
    SELECT j.id FROM skiplock.jobs j
    WHERE j.status = 'pending'
      AND ((%(pending)s AND j.run_at <= now()) OR (%(scheduled)s AND j.run_at > now()))
      AND (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
      AND (%(flow)s::text IS NULL OR j.flow = %(flow)s)
      AND (%(run_id)s::text IS NULL OR j.run_id = %(run_id)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), running AS (
    SELECT j.id FROM skiplock.jobs j
    WHERE j.status = 'running' AND %(running)s AND j.cancel_requested_at IS NULL
      AND (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
      AND (%(flow)s::text IS NULL OR j.flow = %(flow)s)
      AND (%(run_id)s::text IS NULL OR j.run_id = %(run_id)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), removed AS (
    -- `= ANY(ARRAY(...))`, not a join: always the primary key (as in claim_batch).
    DELETE FROM skiplock.jobs j
    WHERE j.id = ANY(ARRAY(SELECT id FROM waiting)) AND j.status = 'pending'
    RETURNING j.id, j.flow, j.payload, j.priority, j.attempts, j.max_attempts, j.claimed_by, j.errors,
              j.run_id, j.created_at, j.claimed_at
), archived AS (
    INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, claimed_by,
                                    errors, result, run_id, created_at, claimed_at, status)
    SELECT id, flow, payload, priority, attempts, max_attempts, claimed_by, errors, NULL, run_id,
           created_at, claimed_at, 'cancelled'
    FROM removed
    RETURNING id, run_id
), requested AS (
    UPDATE skiplock.jobs j SET cancel_requested_at = now(), updated_at = now()
    WHERE j.id = ANY(ARRAY(SELECT id FROM running)) AND j.status = 'running' AND j.cancel_requested_at IS NULL
    RETURNING j.id
), run_progress AS (
    UPDATE skiplock.runs r
    SET total = r.total - d.n, cancelled = r.cancelled + d.n,
        finished_at = CASE WHEN r.finished_at IS NULL AND r.sealed AND r.completed + r.dead >= r.total - d.n
                           THEN now() ELSE r.finished_at END
    FROM (SELECT run_id, count(*) AS n FROM archived WHERE run_id IS NOT NULL GROUP BY run_id) AS d
    WHERE r.id = d.run_id
    RETURNING r.id
)
SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM archived) AS cancelled,
       (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM requested) AS requested,
       (SELECT count(*) FROM run_progress) AS runs,
       (SELECT pg_notify('skiplock_cancel', '') WHERE EXISTS (SELECT 1 FROM requested));

-- name: jobs_cancel_requested
-- The worker's cancel check (on a skiplock_cancel wake-up and every ~1 s while it holds jobs): its
-- running jobs with a cancel request, on jobs_cancel_requested_idx. Bounded; nearly always empty.
SELECT id, claim_token FROM skiplock.jobs
WHERE claimed_by = %(worker)s AND status = 'running' AND cancel_requested_at IS NOT NULL
LIMIT %(limit)s;

-- name: ack_cancelled
-- A running job whose cancel was requested ends cancelled (rare path, apart from ack_batch): fenced
-- by claim token like every ack, and only for jobs with a request. It leaves for jobs_done with an
-- entry in its history; its run counts it as cancel_jobs does (out of `total`, into `cancelled`), so
-- the last-man check is unchanged and the statement that ends a run stamps finished_at, once.
WITH ts AS MATERIALIZED (
    SELECT clock_timestamp() AS now
), removed AS (
    DELETE FROM skiplock.jobs j
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.status = 'running' AND j.cancel_requested_at IS NOT NULL
      AND j.claim_token = %(token)s AND j.claimed_by = %(worker)s
    RETURNING j.id, j.flow, j.payload, j.priority, j.attempts, j.max_attempts, j.claimed_by, j.errors,
              j.run_id, j.created_at, j.claimed_at
), archived AS (
    INSERT INTO skiplock.jobs_done (id, flow, payload, priority, attempts, max_attempts, claimed_by,
                                    errors, result, run_id, created_at, claimed_at, finished_at, status)
    SELECT r.id, r.flow, r.payload, r.priority, r.attempts, r.max_attempts, r.claimed_by,
           skiplock.errors_append(r.errors, jsonb_build_object(
               'attempt', r.attempts, 'at', ts.now, 'worker', r.claimed_by, 'type', 'JobCancelled',
               'message', %(message)s::text, 'traceback', NULL, 'permanent', true, 'cancelled', true),
               %(errors_kept)s),
           NULL, r.run_id, r.created_at, r.claimed_at, ts.now, 'cancelled'
    FROM removed r, ts
    RETURNING id, run_id
), run_progress AS (
    UPDATE skiplock.runs r
    SET total = r.total - d.n, cancelled = r.cancelled + d.n,
        finished_at = CASE WHEN r.finished_at IS NULL AND r.completed + r.dead >= r.total - d.n
                           THEN ts.now ELSE r.finished_at END
    FROM (SELECT run_id, count(*) AS n FROM archived WHERE run_id IS NOT NULL GROUP BY run_id) AS d, ts
    WHERE r.id = d.run_id
    RETURNING r.id, r.finished_at = ts.now AS finished_now
)
SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM archived) AS cancelled,
       (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM run_progress WHERE finished_now) AS finished_runs;

-- name: snooze_jobs
-- A handler raised Snooze(delay) (rare path, apart from ack_batch): back to pending at now + delay,
-- fenced by claim token; the attempt is given back (a snooze is not a failure) and the history gets
-- an entry marked snoozed. error_type/error_message (the last failure) stay as they were.
WITH ts AS MATERIALIZED (
    SELECT clock_timestamp() AS now
), snoozed AS (
    UPDATE skiplock.jobs j
    SET status = 'pending', run_at = ts.now + make_interval(secs => s.delay),
        attempts = greatest(j.attempts - 1, 0), claimed_by = NULL, claim_token = NULL, updated_at = ts.now,
        errors = skiplock.errors_append(j.errors, jsonb_build_object(
            'attempt', j.attempts, 'at', ts.now, 'worker', j.claimed_by, 'type', 'Snooze',
            'message', 'snoozed for ' || s.delay::text || 's', 'traceback', NULL, 'permanent', false,
            'snoozed', true, 'delay', s.delay), %(errors_kept)s)
    FROM unnest(%(ids)s::bigint[], %(delays)s::float8[]) AS s(id, delay), ts
    WHERE j.id = s.id AND j.status = 'running' AND j.claim_token = %(token)s AND j.claimed_by = %(worker)s
    RETURNING j.id, s.delay
)
SELECT coalesce(array_agg(id ORDER BY id), '{}'),
       (SELECT pg_notify('skiplock_enqueued', '') WHERE EXISTS (SELECT 1 FROM snoozed WHERE delay <= 0))
FROM snoozed;

-- name: jobs_progress_set
-- The worker's coalesced progress reports, one statement for every job with news (~1/s at most),
-- fenced by claim token: a report from an attempt that lost its job changes nothing.
UPDATE skiplock.jobs j
SET progress = p.fraction, progress_message = p.message, progress_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(fractions)s::float8[], %(messages)s::text[])
     AS p(id, token, fraction, message)
WHERE j.id = p.id AND j.status = 'running' AND j.claim_token = p.token AND j.claimed_by = %(worker)s;

-- name: job_progress
-- `jobs show` and the console's job detail: the progress of the job's current (or last) attempt.
SELECT progress, progress_message, progress_at FROM skiplock.jobs
WHERE id = %(id)s AND progress_at IS NOT NULL AND progress_at >= claimed_at;

-- name: jobs_running_now
-- The console's Running view: running jobs, longest running first, with their progress. Running
-- jobs are bounded by workers x concurrency: a scan of jobs_running_idx and a top-N sort.
SELECT j.id, j.flow, j.claimed_by, j.claimed_at, j.attempts,
       skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts, j.run_id,
       CASE WHEN j.progress_at >= j.claimed_at THEN j.progress END AS progress,
       CASE WHEN j.progress_at >= j.claimed_at THEN j.progress_message END AS progress_message,
       j.cancel_requested_at
FROM skiplock.jobs j
WHERE j.status = 'running'
ORDER BY j.claimed_at, j.id
LIMIT %(limit)s;

-- name: job_states
-- Where each of these jobs is now (the report of a cancel by id). jobs_done is found by its id BRIN.
SELECT id, status::text AS status, cancel_requested_at IS NOT NULL AS cancel_requested
FROM skiplock.jobs WHERE id = ANY(%(ids)s::bigint[])
UNION ALL
SELECT id, status, false FROM skiplock.jobs_done WHERE id = ANY(%(ids)s::bigint[]);

-- name: job_outcome
-- What `wait` polls: one job by primary key, else by the id BRIN of jobs_done. One statement, one
-- snapshot, so a job acked between the two lookups is still seen once.
SELECT status::text AS status, NULL::jsonb AS result, error_type, error_message
FROM skiplock.jobs WHERE id = %(id)s
UNION ALL
SELECT status, result, NULL, NULL FROM skiplock.jobs_done WHERE id = %(id)s
LIMIT 1;

-- name: cancelled_purge
-- Purge cancelled jobs by id (the browser's bulk action); guarded by status, found by the id BRIN.
WITH purged AS (
    DELETE FROM skiplock.jobs_done WHERE status = 'cancelled' AND id = ANY(%(ids)s::bigint[])
    RETURNING id
)
SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM purged;

-- name: jobs_list_pending
-- The browser, pending (due) or scheduled jobs, next to run first. Per flow on the claim's index, in
-- its order; without a flow the flows come from a skip scan of that index (one descent per flow;
-- coalesce does not evaluate the scan when a flow is given).
-- Each flow gives at most `limit` rows, and so does the whole.
WITH RECURSIVE names(flow) AS (
    SELECT coalesce(%(flow)s::text, (SELECT flow FROM skiplock.jobs WHERE status = 'pending' ORDER BY flow LIMIT 1))
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = 'pending' AND j.flow > n.flow
            ORDER BY j.flow LIMIT 1)
    FROM names n WHERE n.flow IS NOT NULL AND %(flow)s::text IS NULL
)
SELECT x.* FROM names n CROSS JOIN LATERAL (
    SELECT j.id, j.flow, CASE WHEN j.run_at > now() THEN 'scheduled' ELSE 'pending' END AS status,
           j.priority, j.attempts, skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts,
           j.run_id, j.payload, j.created_at, j.run_at, j.claimed_by, j.claimed_at, j.finished_at,
           j.error_type, j.error_message, j.cancel_requested_at
    FROM skiplock.jobs j
    WHERE j.flow = n.flow AND j.status = 'pending' AND (j.run_at > now()) = %(scheduled)s
      AND (%(run_id)s::text IS NULL OR j.run_id = %(run_id)s)
      AND (%(older_than)s::float8 IS NULL OR j.created_at < now() - make_interval(secs => %(older_than)s))
      AND (%(payload)s::jsonb IS NULL OR j.payload @> %(payload)s::jsonb)
    ORDER BY j.priority DESC, j.run_at, j.id
    LIMIT %(limit)s
) x
WHERE n.flow IS NOT NULL
ORDER BY x.priority DESC, x.run_at, x.id
LIMIT %(limit)s;

-- name: jobs_list_running
-- The browser, running jobs, longest running first, per flow on jobs_running_idx (flow, claimed_at).
WITH RECURSIVE names(flow) AS (
    SELECT coalesce(%(flow)s::text, (SELECT flow FROM skiplock.jobs WHERE status = 'running' ORDER BY flow LIMIT 1))
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = 'running' AND j.flow > n.flow
            ORDER BY j.flow LIMIT 1)
    FROM names n WHERE n.flow IS NOT NULL AND %(flow)s::text IS NULL
)
SELECT x.* FROM names n CROSS JOIN LATERAL (
    SELECT j.id, j.flow, 'running' AS status,
           j.priority, j.attempts, skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts,
           j.run_id, j.payload, j.created_at, j.run_at, j.claimed_by, j.claimed_at, j.finished_at,
           j.error_type, j.error_message, j.cancel_requested_at
    FROM skiplock.jobs j
    WHERE j.flow = n.flow AND j.status = 'running'
      AND (%(run_id)s::text IS NULL OR j.run_id = %(run_id)s)
      AND (%(older_than)s::float8 IS NULL OR j.claimed_at < now() - make_interval(secs => %(older_than)s))
      AND (%(payload)s::jsonb IS NULL OR j.payload @> %(payload)s::jsonb)
    ORDER BY j.claimed_at, j.id
    LIMIT %(limit)s
) x
WHERE n.flow IS NOT NULL
ORDER BY x.claimed_at, x.id
LIMIT %(limit)s;

-- name: jobs_list_dead
-- The browser, dead letters, most recent first, per flow on jobs_dead_idx (flow, finished_at).
WITH RECURSIVE names(flow) AS (
    SELECT coalesce(%(flow)s::text, (SELECT flow FROM skiplock.jobs WHERE status = 'dead' ORDER BY flow LIMIT 1))
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = 'dead' AND j.flow > n.flow
            ORDER BY j.flow LIMIT 1)
    FROM names n WHERE n.flow IS NOT NULL AND %(flow)s::text IS NULL
)
SELECT x.* FROM names n CROSS JOIN LATERAL (
    SELECT j.id, j.flow, 'dead' AS status,
           j.priority, j.attempts, skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts,
           j.run_id, j.payload, j.created_at, j.run_at, j.claimed_by, j.claimed_at, j.finished_at,
           j.error_type, j.error_message, j.cancel_requested_at
    FROM skiplock.jobs j
    WHERE j.flow = n.flow AND j.status = 'dead'
      AND (%(run_id)s::text IS NULL OR j.run_id = %(run_id)s)
      AND (%(older_than)s::float8 IS NULL OR j.finished_at < now() - make_interval(secs => %(older_than)s))
      AND (%(payload)s::jsonb IS NULL OR j.payload @> %(payload)s::jsonb)
    ORDER BY j.finished_at DESC, j.id DESC
    LIMIT %(limit)s
) x
WHERE n.flow IS NOT NULL
ORDER BY x.finished_at DESC, x.id DESC
LIMIT %(limit)s;

-- name: jobs_list_done
-- The browser, completed or cancelled jobs, most recent first. Always bounded in time (`since`
-- seconds back): the finished_at BRIN finds that window's pages, never the whole history.
SELECT d.id, d.flow, d.status, d.priority, d.attempts,
       skiplock.max_attempts_for(d.flow, d.max_attempts) AS max_attempts,
       d.run_id, d.payload, d.created_at, NULL::timestamptz AS run_at, d.claimed_by, d.claimed_at,
       d.finished_at, NULL::text AS error_type, NULL::text AS error_message,
       NULL::timestamptz AS cancel_requested_at
FROM skiplock.jobs_done d
WHERE d.finished_at >= now() - make_interval(secs => %(since)s)
  AND d.status = %(status)s
  AND (%(flow)s::text IS NULL OR d.flow = %(flow)s)
  AND (%(run_id)s::text IS NULL OR d.run_id = %(run_id)s)
  AND (%(older_than)s::float8 IS NULL OR d.finished_at < now() - make_interval(secs => %(older_than)s))
  AND (%(payload)s::jsonb IS NULL OR d.payload @> %(payload)s::jsonb)
ORDER BY d.finished_at DESC, d.id DESC
LIMIT %(limit)s;

-- name: flows_known
-- Which of these flows an engine has registered (enqueue refuses the others unless told).
SELECT name FROM skiplock.flows WHERE name = ANY(%(flows)s::text[]);

-- name: flow_names
SELECT name FROM skiplock.flows ORDER BY name LIMIT %(limit)s;

-- health (engine/health.py): the facts that engine health, /readyz, Queue.health_check and the
-- console header judge with one function. Each takes `now` (NULL: the server's clock; the console's
-- fixed reference time in tests).

-- name: health_workers
-- Live and stale as rescue_stale_workers counts them (a heartbeat is not stale before the server has
-- been up stale_after); lost: in the last 10 minutes. Both arms on their partial indexes.
WITH ref AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now
)
SELECT count(w.id) FILTER (WHERE greatest(w.heartbeat_at, pg_postmaster_start_time())
                              >= ref.now - make_interval(secs => %(stale_after)s)) AS live,
       count(w.id) FILTER (WHERE greatest(w.heartbeat_at, pg_postmaster_start_time())
                              < ref.now - make_interval(secs => %(stale_after)s)) AS stale,
       (SELECT count(*) FROM skiplock.workers x
        WHERE x.state IN ('stopped', 'lost') AND x.stopped_at > ref.now - interval '10 minutes'
          AND x.state = 'lost') AS lost  -- the IN: workers_stopped_idx's predicate
FROM ref LEFT JOIN skiplock.workers w ON w.state NOT IN ('stopped', 'lost')
GROUP BY ref.now;

-- name: health_flows
-- Per flow (declared, or with pending jobs: skiplock.flows_with_status, a skip scan of the claim's
-- index): served by a live worker, circuit open, due pending jobs (counted up to `cap`), the oldest
-- due job's age (the first row of each priority in the claim's index: a skip scan over priorities, at
-- most 64 of them), and completed/failed attempts in the last `window` seconds from stats_minute (by
-- its primary key).
WITH RECURSIVE ref AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now
), names AS (
    SELECT name AS flow FROM skiplock.flows
    UNION SELECT flow FROM skiplock.flows_with_status('pending')  -- migration 0027
), served AS (
    SELECT DISTINCT unnest(w.flows) AS flow FROM skiplock.workers w, ref
    WHERE w.state NOT IN ('stopped', 'lost') AND w.heartbeat_at >= ref.now - make_interval(secs => %(stale_after)s)
)
SELECT n.flow,
       EXISTS (SELECT 1 FROM served s WHERE s.flow = n.flow) AS served,
       coalesce(f.circuit_state = 'open' AND (f.circuit_until IS NULL OR f.circuit_until > ref.now), false)
           AS circuit_open,
       d.due,
       coalesce(extract(epoch FROM ref.now - o.oldest)::float8, 0.0) AS oldest_age,
       coalesce(st.completed, 0)::bigint AS completed,
       coalesce(st.failed, 0)::bigint AS failed
FROM names n
CROSS JOIN ref
LEFT JOIN skiplock.flows f ON f.name = n.flow
CROSS JOIN LATERAL (
    SELECT count(*) AS due FROM (SELECT 1 FROM skiplock.jobs j
                                 WHERE j.flow = n.flow AND j.status = 'pending' AND j.run_at <= ref.now
                                 LIMIT %(cap)s) s
) d
CROSS JOIN LATERAL (
    WITH RECURSIVE heads(priority, run_at, depth) AS (
        (SELECT j.priority, j.run_at, 1 FROM skiplock.jobs j
         WHERE j.flow = n.flow AND j.status = 'pending' ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1)
        UNION ALL
        SELECT x.priority, x.run_at, h.depth + 1
        FROM heads h CROSS JOIN LATERAL (
            SELECT j.priority, j.run_at FROM skiplock.jobs j
            WHERE j.flow = n.flow AND j.status = 'pending' AND j.priority < h.priority
            ORDER BY j.priority DESC, j.run_at, j.id LIMIT 1) x
        WHERE h.depth < 64
    )
    SELECT min(run_at) AS oldest FROM heads WHERE run_at <= ref.now
) o
LEFT JOIN LATERAL (
    SELECT sum(m.completed) AS completed, sum(m.failed) AS failed FROM skiplock.stats_minute m
    WHERE m.flow = n.flow AND m.minute >= date_trunc('minute', ref.now - make_interval(secs => %(window)s))
) st ON true
ORDER BY n.flow
LIMIT 200;

-- metrics (engine/metrics.py) --------------------------------------------------------------------

-- name: metrics_leader_claim
-- One engine at a time reads the fleet-wide gauges: the holder renews its lease, another takes it
-- once it has run out. A row back: this engine leads until `lease` seconds from now. While another
-- engine's lease runs, the NOT EXISTS leaves nothing to insert: no row lock, no transaction id, no
-- WAL for the other engines' tries every interval (ON CONFLICT alone would lock the row each time).
INSERT INTO skiplock.metrics_leader AS m (id, engine_id, until)
SELECT 1, %(engine)s::text, now() + make_interval(secs => %(lease)s)
WHERE NOT EXISTS (SELECT FROM skiplock.metrics_leader h
                  WHERE h.id = 1 AND h.engine_id <> %(engine)s::text AND h.until >= now())
ON CONFLICT (id) DO UPDATE SET engine_id = excluded.engine_id, until = excluded.until
WHERE m.engine_id = excluded.engine_id OR m.until < now()
RETURNING true;

-- name: metrics_flow_gauges
-- The leader's fleet-wide queue gauges, each count stopping at `cap` (engine/metrics.py estimates
-- ready and dead past it). Flows as console_flows finds them (skiplock.known_flows). Index-only: ready and scheduled from the
-- first `cap` entries of jobs_claim_idx (a backlog's heap rows are never read), retrying from
-- jobs_retrying_idx, running and dead from their partial indexes.
WITH ref AS (
    SELECT now() AS now
), names AS (
    SELECT k.name FROM ref, skiplock.known_flows(ref.now) k  -- migration 0025
)
SELECT n.name, p.ready, p.scheduled, p.total AS pending_total, t.retrying, r.running, d.dead
FROM names n
CROSS JOIN ref
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.run_at <= ref.now) AS ready,
           count(*) FILTER (WHERE s.run_at > ref.now) AS scheduled,
           count(*) AS total
    FROM (SELECT j.run_at FROM skiplock.jobs j
          WHERE j.flow = n.name AND j.status = 'pending'
          ORDER BY j.priority DESC, j.run_at, j.id LIMIT %(cap)s) s
) p
CROSS JOIN LATERAL (
    SELECT count(*) AS retrying FROM (SELECT 1 FROM skiplock.jobs j
                                      WHERE j.flow = n.name AND j.status = 'pending' AND j.attempts > 0
                                      LIMIT %(cap)s) s
) t
CROSS JOIN LATERAL (
    SELECT count(*) AS running FROM (SELECT 1 FROM skiplock.jobs j
                                     WHERE j.status = 'running' AND j.flow = n.name LIMIT %(cap)s) s
) r
CROSS JOIN LATERAL (
    SELECT count(*) AS dead FROM (SELECT 1 FROM skiplock.jobs j
                                  WHERE j.flow = n.name AND j.status = 'dead' LIMIT %(cap)s) s
) d
ORDER BY n.name
LIMIT 200;

-- name: metrics_leader_release
-- At shutdown, so another engine takes over at its next read instead of after the lease.
DELETE FROM skiplock.metrics_leader WHERE id = 1 AND engine_id = %(engine)s;

-- ---------------------------------------------------------------------------------------------
-- console
-- The ops console's snapshot reads (console/data.py). Each takes `now` (NULL: the server's clock;
-- a fixed time in tests) so ages and windows are computed against one reference. Every read is
-- bounded: counts stop at `cap` rows per flow and state through the partial indexes, history comes
-- from stats_minute by its primary key, latency from a LIMITed sample of recent jobs_done.

-- name: console_now
SELECT coalesce(%(now)s::timestamptz, now()), current_setting('server_version');

-- name: console_flows
-- Flows: declared ones, those with recent history, and those with pending or dead jobs
-- (skiplock.known_flows, migration 0025: a skip scan over the partial indexes).
WITH ref AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now
), names AS (
    SELECT k.name FROM ref, skiplock.known_flows(ref.now) k  -- migration 0025
)
SELECT n.name, coalesce(f.paused, false) AS paused, coalesce(f.circuit_state, 'closed') AS circuit_state,
       extract(epoch FROM f.circuit_until - ref.now)::float8 AS circuit_open_for,
       (f.policy ->> 'max_attempts')::int AS max_attempts,
       p.ready, p.scheduled, p.retrying, p.total AS pending_total, r.running, d.dead
FROM names n
CROSS JOIN ref
LEFT JOIN skiplock.flows f ON f.name = n.name
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE s.run_at <= ref.now) AS ready,
           count(*) FILTER (WHERE s.run_at > ref.now) AS scheduled,
           count(*) FILTER (WHERE s.attempts > 0) AS retrying,
           count(*) AS total
    FROM (SELECT j.run_at, j.attempts FROM skiplock.jobs j
          WHERE j.flow = n.name AND j.status = 'pending'
          ORDER BY j.priority DESC, j.run_at, j.id LIMIT %(cap)s) s
) p
CROSS JOIN LATERAL (
    SELECT count(*) AS running FROM (SELECT 1 FROM skiplock.jobs j
                                     WHERE j.status = 'running' AND j.flow = n.name LIMIT %(cap)s) s
) r
CROSS JOIN LATERAL (
    SELECT count(*) AS dead FROM (SELECT 1 FROM skiplock.jobs j
                                  WHERE j.flow = n.name AND j.status = 'dead'
                                  ORDER BY j.finished_at LIMIT %(cap)s) s
) d
ORDER BY n.name
LIMIT 200;

-- name: console_history
-- Per-minute counts for the charts and rates, by the primary key (minute, flow).
SELECT extract(epoch FROM minute)::float8 AS minute, flow, completed, failed, dead, rescued, wait_ms_sum, run_ms_sum
FROM skiplock.stats_minute
WHERE minute >= date_trunc('minute', coalesce(%(now)s::timestamptz, now())) - make_interval(mins => %(minutes)s)
  AND minute <= coalesce(%(now)s::timestamptz, now())
ORDER BY minute, flow;

-- name: console_latency
-- Wait (enqueue to last claim) and run (last claim to ack) percentiles per flow over a bounded sample
-- of the jobs acknowledged in the last `seconds`; the BRIN index on finished_at finds the recent pages.
SELECT flow, count(*) AS samples,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_ms) AS wait_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY wait_ms) AS wait_p95,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY run_ms) AS run_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY run_ms) AS run_p95
FROM (
    SELECT d.flow,
           extract(epoch FROM d.claimed_at - d.created_at)::float8 * 1000.0 AS wait_ms,
           extract(epoch FROM d.finished_at - d.claimed_at)::float8 * 1000.0 AS run_ms
    FROM skiplock.jobs_done d
    WHERE d.finished_at >= coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(seconds)s)
      AND d.finished_at <= coalesce(%(now)s::timestamptz, now())
      AND d.claimed_at IS NOT NULL
    LIMIT %(sample)s
) s
GROUP BY flow;

-- name: console_workers
-- Live workers, and those that stopped or were lost in the last 10 minutes: two arms, each on its
-- partial index (workers_live_idx, workers_stopped_idx), as in workers_list.
WITH ref AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now
)
SELECT w.id, w.engine_id, w.host, w.pid, w.state, w.flows,
       extract(epoch FROM ref.now - w.started_at)::float8 AS uptime,
       extract(epoch FROM ref.now - w.heartbeat_at)::float8 AS heartbeat_age,
       w.counters, w.pool
FROM (SELECT * FROM skiplock.workers WHERE state NOT IN ('stopped', 'lost')
      UNION ALL
      SELECT x.* FROM skiplock.workers x, ref
      WHERE x.state IN ('stopped', 'lost') AND x.stopped_at > ref.now - interval '10 minutes') AS w, ref
ORDER BY w.state IN ('stopped', 'lost'), w.host, w.pid, w.id
LIMIT %(limit)s;

-- name: console_runs
-- Unfinished runs first, then those that finished in the last hour.
SELECT r.id, r.flow, r.total, r.completed, r.dead,
       extract(epoch FROM ref.now - r.created_at)::float8 AS age,
       extract(epoch FROM r.finished_at - r.created_at)::float8 AS took
FROM skiplock.runs r, (SELECT coalesce(%(now)s::timestamptz, now()) AS now) ref
WHERE r.finished_at IS NULL OR r.finished_at > ref.now - interval '1 hour'
ORDER BY r.finished_at IS NOT NULL, r.created_at DESC, r.id
LIMIT %(limit)s;

-- name: console_snapshot_begin
-- One consistent view per snapshot; the console never writes while reading.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- name: console_estimate
-- Past the exact-count cap: the planner's row estimate (from the statistics, no rows read).
-- EXPLAIN takes no bind parameters, so this runs on a client-side-binding cursor.
EXPLAIN (FORMAT JSON) SELECT 1 FROM skiplock.jobs WHERE flow = %(flow)s AND status = %(status)s::skiplock.job_status;

-- name: console_listen
-- The console's live feed: telemetry events, pause/resume from any operator included.
LISTEN skiplock_events;

-- schedules (engine/schedules.py) ----------------------------------------------------------------

-- name: schedule_leader
-- One engine at a time runs the schedule pass: the lock lasts for the pass's transaction. Its own
-- lock, not rescue's, so a schedule pass never makes another engine skip its rescue pass.
SELECT pg_try_advisory_xact_lock(hashtext('skiplock.schedules'));

-- name: schedules_active
-- What the leader's pass looks at, with the database clock that decides every tick.
SELECT s.name, s.cron, s.every_ms, s.timezone, s.catch_up, s.next_at, s.checked_at, s.updated_at AS since,
       now() AS now
FROM skiplock.schedules s
WHERE s.enabled AND NOT s.paused
ORDER BY s.name
LIMIT %(limit)s;

-- name: schedule_fire
-- Fires `ticks` (ISO texts) and moves next_at on, only if next_at is still what the pass read
-- (compare-and-set): a second engine, a restart or a repeated pass cannot fire a tick twice. The
-- dedupe key schedule:NAME:TICK also refuses a twin while the first job is unfinished.
WITH due AS (
    SELECT s.name, s.flow, s.payload FROM skiplock.schedules s
    WHERE s.name = %(name)s AND s.next_at IS NOT DISTINCT FROM %(expected)s::timestamptz
      AND s.enabled AND NOT s.paused
    FOR UPDATE
), fired AS (
    INSERT INTO skiplock.jobs (flow, payload, dedupe_key)
    SELECT due.flow, due.payload || jsonb_build_object('scheduled_at', t.tick),
           'schedule:' || due.name || ':' || t.tick
    FROM due, unnest(%(ticks)s::text[]) WITH ORDINALITY AS t(tick, n)
    ORDER BY t.n
    ON CONFLICT (flow, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'running')
    DO NOTHING
    RETURNING id
), advanced AS (
    UPDATE skiplock.schedules s
    SET next_at = %(next_at)s::timestamptz, checked_at = now(),
        last_tick_at = coalesce(%(last_tick)s::timestamptz, s.last_tick_at),
        last_fired_at = CASE WHEN EXISTS (SELECT 1 FROM fired) THEN now() ELSE s.last_fired_at END,
        last_job_id = coalesce((SELECT max(id) FROM fired), s.last_job_id)
    FROM due
    WHERE s.name = due.name
    RETURNING s.name
)
SELECT (SELECT count(*) FROM advanced)::int AS advanced, (SELECT count(*) FROM fired)::int AS fired;

-- name: schedules_checked
-- Schedules with nothing due: the pass saw them (a later gap is then downtime, not lateness).
UPDATE skiplock.schedules SET checked_at = now()
WHERE name = ANY(%(names)s::text[]) AND enabled AND NOT paused;

-- name: schedule_upsert_config
-- At engine start. The declared fields follow the config; `paused` (the operator's) is left as it
-- is; a changed cron, period or time zone starts over from the next tick after now.
INSERT INTO skiplock.schedules AS s (name, flow, cron, every_ms, payload, timezone, catch_up, enabled, source)
VALUES (%(name)s, %(flow)s, %(cron)s, %(every_ms)s, %(payload)s::jsonb, %(timezone)s, %(catch_up)s,
        %(enabled)s, 'config')
ON CONFLICT (name) DO UPDATE
SET flow = EXCLUDED.flow, cron = EXCLUDED.cron, every_ms = EXCLUDED.every_ms, payload = EXCLUDED.payload,
    timezone = EXCLUDED.timezone, catch_up = EXCLUDED.catch_up, enabled = EXCLUDED.enabled, source = 'config',
    checked_at = CASE WHEN EXCLUDED.enabled THEN s.checked_at END,  -- disabled: its ticks are missed
    next_at = CASE WHEN (s.cron, s.every_ms, s.timezone) IS NOT DISTINCT FROM
                        (EXCLUDED.cron, EXCLUDED.every_ms, EXCLUDED.timezone)
                   THEN s.next_at END,
    updated_at = CASE WHEN (s.flow, s.cron, s.every_ms, s.payload, s.timezone, s.catch_up, s.enabled, s.source)
                           IS NOT DISTINCT FROM
                           (EXCLUDED.flow, EXCLUDED.cron, EXCLUDED.every_ms, EXCLUDED.payload, EXCLUDED.timezone,
                            EXCLUDED.catch_up, EXCLUDED.enabled, 'config')
                      THEN s.updated_at ELSE now() END;

-- name: schedule_add
INSERT INTO skiplock.schedules (name, flow, cron, every_ms, payload, timezone, catch_up, enabled, source)
VALUES (%(name)s, %(flow)s, %(cron)s, %(every_ms)s, %(payload)s::jsonb, %(timezone)s, %(catch_up)s,
        %(enabled)s, 'runtime')
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- name: schedule_remove
DELETE FROM skiplock.schedules WHERE name = %(name)s RETURNING name;

-- name: schedule_set_paused
-- Pausing forgets when a pass last looked: ticks due while paused are then missed, and catch_up
-- decides on resume (rather than every one being fired late).
UPDATE skiplock.schedules
SET paused = %(paused)s, checked_at = CASE WHEN %(paused)s THEN NULL ELSE checked_at END, updated_at = now()
WHERE name = %(name)s
RETURNING name;

-- name: schedule_trigger
-- One job now, with its own key (schedule:NAME:trigger:NOW): the ticks are left as they are.
WITH s AS (
    SELECT name, flow, payload, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at
    FROM skiplock.schedules WHERE name = %(name)s
    FOR UPDATE
), fired AS (
    INSERT INTO skiplock.jobs (flow, payload, dedupe_key)
    SELECT s.flow, s.payload || jsonb_build_object('scheduled_at', s.at), 'schedule:' || s.name || ':trigger:' || s.at
    FROM s
    RETURNING id
), marked AS (
    UPDATE skiplock.schedules t SET last_fired_at = now(), last_job_id = (SELECT id FROM fired)
    FROM s WHERE t.name = s.name
    RETURNING t.name
)
SELECT id FROM fired;

-- name: schedules_list
-- The last job's outcome: its status while it is in the hot table, completed once archived, gone
-- once purged (retention) or deleted.
SELECT s.name, s.flow, s.cron, s.every_ms, s.payload, s.timezone, s.catch_up, s.enabled, s.paused, s.source,
       s.next_at, s.last_tick_at, s.last_fired_at, s.last_job_id,
       CASE WHEN s.last_job_id IS NULL THEN NULL
            ELSE coalesce((SELECT j.status::text FROM skiplock.jobs j WHERE j.id = s.last_job_id),
                          (SELECT 'completed' FROM skiplock.jobs_done d WHERE d.id = s.last_job_id LIMIT 1),
                          'gone')
       END AS last_outcome
FROM skiplock.schedules s
WHERE %(name)s::text IS NULL OR s.name = %(name)s
ORDER BY s.name
LIMIT %(limit)s;

-- name: privileges_missing
-- Roles (migration 0020): what `role` may do on the skiplock schema, its tables and sequences that the
-- current login role may not (counting privileges held through role membership), one "PRIV on OBJECT"
-- per row. `relation` NULL: every table and sequence; else only that one (the one an error named).
SELECT 'USAGE on schema skiplock' AS missing
WHERE %(relation)s::text IS NULL
  AND has_schema_privilege(%(role)s, 'skiplock', 'USAGE') AND NOT has_schema_privilege('skiplock', 'USAGE')
UNION ALL
SELECT missing FROM (
    SELECT p.privilege || ' on skiplock.' || c.relname AS missing, c.relname, p.ord
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'skiplock'
    CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) WITH ORDINALITY AS p(privilege, ord)
    WHERE (%(relation)s::text IS NULL OR c.relname = %(relation)s)
      AND CASE WHEN c.relkind IN ('r', 'p')  -- CASE: the privilege functions see only these relations
               THEN has_table_privilege(%(role)s, c.oid, p.privilege) AND NOT has_table_privilege(c.oid, p.privilege)
               ELSE false END
    UNION ALL
    SELECT 'USAGE on sequence skiplock.' || c.relname, c.relname, 0
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'skiplock'
    WHERE (%(relation)s::text IS NULL OR c.relname = %(relation)s)
      AND CASE WHEN c.relkind = 'S'
               THEN has_sequence_privilege(%(role)s, c.oid, 'USAGE') AND NOT has_sequence_privilege(c.oid, 'USAGE')
               ELSE false END
    ORDER BY relname, ord
) t;

-- name: privileges_ungranted_tables
-- Tables of the skiplock schema on which none of the three roles holds any privilege: a migration
-- that forgot to decide (tests/test_roles.py).
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'skiplock'
WHERE c.relkind IN ('r', 'p')
  AND NOT EXISTS (
      SELECT FROM unnest(ARRAY['skiplock_engine', 'skiplock_operator', 'skiplock_viewer']) AS r(role_name)
      CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p(privilege)
      WHERE has_table_privilege(r.role_name, c.oid, p.privilege))
ORDER BY c.relname;
-- ---------------------------------------------------------------------------------------------
-- The control plane (migration 0011): engines register and heartbeat; operators' commands are rows
-- plus a wake-up on skiplock_control (payload: the engine id), so a missed NOTIFY is re-read when the
-- heartbeat reports pending commands.

-- name: engine_register
INSERT INTO skiplock.engines (id, host, pid, version, workers, stale_after, flows, state)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(workers)s, %(stale_after)s, %(flows)s, 'running')
ON CONFLICT (id) DO UPDATE SET state = 'running', heartbeat_at = now(), stopped_at = NULL, exit_code = NULL,
    workers = EXCLUDED.workers;

-- name: engine_heartbeat
-- The supervisor's heartbeat thread, once per interval: renews the row and says whether a command
-- waits (the timer that catches a missed wake-up).
WITH beat AS (
    UPDATE skiplock.engines SET heartbeat_at = now(), workers = %(workers)s
    WHERE id = %(id)s AND state <> 'stopped'
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM skiplock.engine_commands WHERE engine_id = %(id)s AND acked_at IS NULL);

-- name: engine_set_state
UPDATE skiplock.engines SET state = %(state)s, heartbeat_at = now() WHERE id = %(id)s AND state <> 'stopped';

-- name: engine_stopped
-- The engine's last write. Commands it never read are answered here, so no CLI waits for them.
WITH stopped AS (
    UPDATE skiplock.engines SET state = 'stopped', stopped_at = now(), heartbeat_at = now(), exit_code = %(code)s,
        workers = 0
    WHERE id = %(id)s
    RETURNING id
)
UPDATE skiplock.engine_commands SET acked_at = now(), ok = false,
    outcome = 'refused: the engine stopped before it read the command'
WHERE engine_id IN (SELECT id FROM stopped) AND acked_at IS NULL;

-- name: engines_list
-- Engines alive, and those stopped or gone (no heartbeat within their own stale_after) in the last
-- hour. Two arms on the two partial indexes, as workers_list.
SELECT id, host, pid, version, workers, flows, started_at, heartbeat_at, stopped_at, exit_code,
       CASE WHEN state <> 'stopped' AND heartbeat_at < now() - make_interval(secs => stale_after) THEN 'gone'
            ELSE state END AS state,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age
FROM (SELECT * FROM skiplock.engines WHERE state <> 'stopped' AND heartbeat_at > now() - interval '1 hour'
        - make_interval(secs => stale_after)
      UNION ALL
      SELECT * FROM skiplock.engines WHERE state = 'stopped' AND stopped_at > now() - interval '1 hour') AS e
ORDER BY started_at, id
LIMIT %(limit)s;

-- name: engine_find
-- By id or a unique prefix of it (the CLI shows 12 characters). Two rows back: ambiguous.
SELECT id, CASE WHEN state <> 'stopped' AND heartbeat_at < now() - make_interval(secs => stale_after) THEN 'gone'
                ELSE state END AS state,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age
FROM skiplock.engines
WHERE id = %(ref)s OR starts_with(id, %(ref)s)
ORDER BY id = %(ref)s DESC, id
LIMIT 2;

-- name: engine_command_send
-- Only to an engine that is running and not gone; the wake-up is sent in the same statement.
WITH target AS (
    SELECT id FROM skiplock.engines
    WHERE id = %(engine)s AND state = 'running' AND heartbeat_at > now() - make_interval(secs => stale_after)
), cmd AS (
    INSERT INTO skiplock.engine_commands (engine_id, command, workers)
    SELECT id, %(command)s, %(workers)s FROM target
    RETURNING id, engine_id
)
SELECT c.id FROM cmd AS c, LATERAL (SELECT pg_notify('skiplock_control', c.engine_id)) AS wake;

-- name: engine_command_insert_quiet
-- As engine_command_send without the wake-up: what an engine sees when the NOTIFY was missed (tests).
INSERT INTO skiplock.engine_commands (engine_id, command, workers)
SELECT id, %(command)s, %(workers)s FROM skiplock.engines WHERE id = %(engine)s AND state = 'running'
RETURNING id;

-- name: engine_commands_pending
SELECT id, command, workers FROM skiplock.engine_commands
WHERE engine_id = %(engine)s AND acked_at IS NULL
ORDER BY id
LIMIT 100;

-- name: engine_command_ack
-- `workers` (a scale): the engine's worker count once the command took effect, written with the
-- acknowledgement, so `engine engines` says what `engine scale` said before the next heartbeat. NULL
-- leaves the row alone.
WITH acked AS (
    UPDATE skiplock.engine_commands SET acked_at = now(), ok = %(ok)s, outcome = %(outcome)s
    WHERE id = %(id)s AND acked_at IS NULL
    RETURNING engine_id
)
UPDATE skiplock.engines e SET workers = %(workers)s::int
FROM acked
WHERE e.id = acked.engine_id AND %(workers)s::int IS NOT NULL AND e.state <> 'stopped';

-- name: engine_command_get
SELECT acked_at IS NOT NULL AS acked, ok, outcome FROM skiplock.engine_commands WHERE id = %(id)s;

-- name: engine_command_withdraw
-- The sender gave up waiting: the command must not run later, unseen. No row back: it was acked first.
UPDATE skiplock.engine_commands SET acked_at = now(), ok = false,
    outcome = 'withdrawn: no acknowledgement within the timeout'
WHERE id = %(id)s AND acked_at IS NULL
RETURNING id;

-- name: purge_engines
-- Retention of engine rows (their commands go with them): stopped, or silent, longer than `retention`.
WITH old AS (
    SELECT id FROM skiplock.engines
    WHERE (state = 'stopped' AND stopped_at < now() - make_interval(secs => %(retention)s))
       OR (state <> 'stopped' AND heartbeat_at < now() - make_interval(secs => %(retention)s))
    LIMIT %(limit)s
)
DELETE FROM skiplock.engines e USING old WHERE e.id = old.id;

-- name: backend_pid
-- Compared with the pid the server announced at startup: they differ behind PgBouncer (engine/db.py).
SELECT pg_backend_pid();

-- name: listen_enqueued
LISTEN skiplock_enqueued;

-- name: listen_control
LISTEN skiplock_control;

-- name: listen_cancel
LISTEN skiplock_cancel;
-- ---------------------------------------------------------------------------------------------
-- Stages, runs and pipelines (issue 15)

-- name: run_get
SELECT id, flow, total, completed, dead, cancelled, sealed, reopened, created_at, finished_at, hook_fired_at
FROM skiplock.runs WHERE id = %(run_id)s;

-- name: run_stages
-- A run's jobs per flow and state: unfinished and dead ones by jobs_run_idx; completed and
-- cancelled ones from jobs_done, whose finished_at BRIN bounds the scan to the run's lifetime.
WITH r AS (
    SELECT id, created_at FROM skiplock.runs WHERE id = %(run_id)s
)
SELECT flow, sum(pending)::bigint AS pending, sum(running)::bigint AS running, sum(dead)::bigint AS dead,
       sum(completed)::bigint AS completed, sum(cancelled)::bigint AS cancelled
FROM (
    SELECT j.flow, count(*) FILTER (WHERE j.status = 'pending') AS pending,
           count(*) FILTER (WHERE j.status = 'running') AS running,
           count(*) FILTER (WHERE j.status = 'dead') AS dead, 0 AS completed, 0 AS cancelled
    FROM skiplock.jobs j, r WHERE j.run_id = r.id
    GROUP BY j.flow
    UNION ALL
    SELECT d.flow, 0, 0, 0, count(*) FILTER (WHERE d.status = 'completed'), count(*) FILTER (WHERE d.status = 'cancelled')
    FROM skiplock.jobs_done d, r WHERE d.run_id = r.id AND d.finished_at >= r.created_at
    GROUP BY d.flow
) s
GROUP BY flow
ORDER BY flow;

-- name: pipeline_links
-- Stage links: what acks saw (flow_links) and what flows declare (`next` in their recorded policy).
SELECT parent_flow, child_flow FROM skiplock.flow_links
UNION
SELECT name, policy ->> 'next' FROM skiplock.flows WHERE policy ->> 'next' IS NOT NULL
ORDER BY 1, 2
LIMIT 1000;

-- name: flow_rates
-- Completed jobs per second per flow over the last full minute and the current one so far, from
-- stats_minute by its primary key.
SELECT flow, sum(completed)::float8
             / greatest(extract(epoch FROM now() - (date_trunc('minute', now()) - interval '1 minute')), 1.0)
             AS done_per_s
FROM skiplock.stats_minute
WHERE minute >= date_trunc('minute', now()) - interval '1 minute'
GROUP BY flow;
-- ---------------------------------------------------------------------------------------------
-- Why is this job waiting? (issue 15 item 6): `engine explain`, Queue.explain, the console's job detail

-- name: explain_job
-- Everything the engine knows that keeps one job from running, in one statement (one snapshot), for
-- engine/explain.py to turn into reasons. A job not in the hot table has ended (explain_done).
-- `ahead`: due jobs the claim takes first (higher priority, or same priority and older), counted up
-- to `cap` on the claim's index. The key is the one the claim would use (given, or the payload field).
WITH job AS (
    SELECT j.id, j.flow, j.status::text AS status, j.priority, j.run_at, j.attempts,
           skiplock.max_attempts_for(j.flow, j.max_attempts) AS max_attempts, j.claimed_by, j.claimed_at,
           j.created_at, j.finished_at, j.error_type, j.cancel_requested_at,
           coalesce(j.concurrency_key, j.payload ->> (f.policy ->> 'concurrency_key')) AS concurrency_key,
           f.name IS NOT NULL AS flow_known, coalesce(f.paused, false) AS paused, f.circuit_state, f.circuit_until,
           coalesce(f.policy, '{}'::jsonb) AS policy
    FROM skiplock.jobs j LEFT JOIN skiplock.flows f ON f.name = j.flow
    WHERE j.id = %(id)s
)
SELECT job.*, now() AS now,
       (SELECT count(*) FROM skiplock.jobs r WHERE r.flow = job.flow AND r.status = 'running') AS flow_running,
       (SELECT count(*) FROM skiplock.jobs r
        WHERE r.status BETWEEN 'running' AND 'running' AND r.concurrency_key IS NOT NULL
          AND r.flow = job.flow AND r.concurrency_key = job.concurrency_key) AS key_running,
       b.tokens AS bucket_tokens, b.updated_at AS bucket_at,
       (SELECT count(*) FROM skiplock.workers w
        WHERE w.state NOT IN ('stopped', 'lost') AND job.flow = ANY(w.flows)
          AND greatest(w.heartbeat_at, pg_postmaster_start_time()) >= now() - make_interval(secs => %(stale_after)s))
           AS live_workers,
       (SELECT count(*) FROM (
            SELECT 1 FROM skiplock.jobs a
            WHERE a.flow = job.flow AND a.status = 'pending' AND a.run_at <= now() AND a.id <> job.id
              AND (a.priority > job.priority
                   OR (a.priority = job.priority AND (a.run_at, a.id) < (job.run_at, job.id)))
            LIMIT %(cap)s) AS before) AS ahead,
       w.host AS worker_host, w.pid AS worker_pid, w.state AS worker_state, w.heartbeat_at AS worker_heartbeat_at
FROM job
LEFT JOIN skiplock.rate_buckets b ON b.flow = job.flow
LEFT JOIN skiplock.workers w ON w.id = job.claimed_by;

-- name: explain_done
-- A job that left the hot table: completed or cancelled, found by the id BRIN of jobs_done.
SELECT id, flow, status, attempts, claimed_by, finished_at FROM skiplock.jobs_done WHERE id = %(id)s
ORDER BY finished_at DESC LIMIT 1;

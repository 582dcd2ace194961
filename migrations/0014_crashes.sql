-- skiplock schema, version 14: jobs held by a worker that died.
-- The rescue of a worker the supervisor saw exit (or killed) counts one crash on each job it held;
-- the claim hands a job with crashes > 0 out alone (a batch of one), so a job that keeps killing its
-- worker is retried without healthy neighbours and ends dead after max_attempts as WorkerCrashed.
-- A constant default: no table rewrite.
ALTER TABLE skiplock.jobs ADD COLUMN crashes integer NOT NULL DEFAULT 0;

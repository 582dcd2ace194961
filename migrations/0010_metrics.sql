-- Metrics (engine/metrics.py): the fleet-wide gauges (queue depth, oldest pending age, workers) are
-- read by one engine at a time, the holder of this lease, so twenty engines do not read twenty times.
-- A row, not an advisory lock: a session lock needs a dedicated connection, which PgBouncer's
-- transaction pooling cannot hold.
CREATE TABLE skiplock.metrics_leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    engine_id   text NOT NULL,
    until       timestamptz NOT NULL
);

-- Schedules: a cron expression or a period that enqueues one job per tick, fleet-wide.
-- Fired by the engine that holds the schedule leader lock; exactly once per tick because every fire
-- advances `next_at` with a compare-and-set on its old value, in the statement that inserts the job.

CREATE TABLE skiplock.schedules (
    name            text PRIMARY KEY,
    flow            text NOT NULL,
    cron            text,               -- five fields, or an @alias, as declared
    every_ms        bigint CHECK (every_ms >= 1000),  -- a period; ticks aligned to the Unix epoch
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    timezone        text NOT NULL DEFAULT 'UTC',
    catch_up        text NOT NULL DEFAULT 'last' CHECK (catch_up IN ('last', 'none')),
    enabled         boolean NOT NULL DEFAULT true,   -- from the config (or `add`): the declared state
    paused          boolean NOT NULL DEFAULT false,  -- the operator's (`engine schedule pause`): never set by config
    source          text NOT NULL CHECK (source IN ('config', 'runtime')),
    next_at         timestamptz,        -- the next tick to fire; NULL: the first tick after updated_at
    checked_at      timestamptz,        -- the last pass that looked at it (a gap longer than stale_after is downtime)
    last_tick_at    timestamptz,        -- the last tick fired
    last_fired_at   timestamptz,        -- when a job was last enqueued for it (tick or trigger)
    last_job_id     bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_ms IS NULL))
);

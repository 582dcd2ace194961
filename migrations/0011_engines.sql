-- The control plane: one row per engine (an `engine run` process tree), renewed by its supervisor's
-- heartbeat thread, and the commands operators send it (scale, drain, stop). A command is a row, so
-- an engine that missed the NOTIFY wake-up still finds it on its next heartbeat; the engine writes
-- the outcome back into the row, which is what `engine scale|drain|stop` waits for.
CREATE TABLE skiplock.engines (
    id              text PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    version         text NOT NULL,
    workers         integer NOT NULL,
    stale_after     float8 NOT NULL,  -- its own setting: past it without a heartbeat the engine is gone
    flows           text[] NOT NULL DEFAULT '{}',
    state           text NOT NULL CHECK (state IN ('running', 'draining', 'stopping', 'stopped')),
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    stopped_at      timestamptz,
    exit_code       integer
);
CREATE INDEX engines_live_idx ON skiplock.engines (heartbeat_at) WHERE state <> 'stopped';
CREATE INDEX engines_stopped_idx ON skiplock.engines (stopped_at) WHERE state = 'stopped';

CREATE TABLE skiplock.engine_commands (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    engine_id       text NOT NULL REFERENCES skiplock.engines (id) ON DELETE CASCADE,
    command         text NOT NULL CHECK (command IN ('scale', 'drain', 'stop')),
    workers         integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    acked_at        timestamptz,
    ok              boolean,
    outcome         text
);
CREATE INDEX engine_commands_pending_idx ON skiplock.engine_commands (engine_id, id) WHERE acked_at IS NULL;

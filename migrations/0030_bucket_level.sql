-- A rate bucket's level at `at`: `tokens` when it was last debited (`updated_at`), refilled by `rate`
-- per second since, up to `burst`. One definition for claim_rated, claim_keyed, rate_bucket_wait and
-- flows_due. Plain SQL, IMMUTABLE, one expression (the caller passes the clock): the planner inlines it.
CREATE OR REPLACE FUNCTION skiplock.bucket_level(tokens float8, updated_at timestamptz, rate float8, burst float8,
                                                 at timestamptz) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT least(burst, tokens + rate * greatest(extract(epoch FROM at - updated_at)::float8, 0))
$$;

GRANT EXECUTE ON FUNCTION skiplock.bucket_level(float8, timestamptz, float8, float8, timestamptz)
    TO skiplock_engine, skiplock_operator, skiplock_viewer;

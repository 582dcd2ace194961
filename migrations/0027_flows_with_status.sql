-- The distinct flows with jobs in one status, by a skip scan over that status's partial index (one
-- index descent per distinct flow, not a scan of the table). One definition for known_flows (its
-- pending and dead flows) and the health_flows statement (its pending flows). Plain SQL, STABLE, one
-- SELECT: the planner inlines it with the status as a constant, so the partial index still applies.
CREATE FUNCTION skiplock.flows_with_status(wanted skiplock.job_status) RETURNS TABLE (flow text)
LANGUAGE sql STABLE AS $$
WITH RECURSIVE found(flow) AS (
    (SELECT j.flow FROM skiplock.jobs j WHERE j.status = wanted ORDER BY j.flow LIMIT 1)
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = wanted AND j.flow > f.flow
            ORDER BY j.flow LIMIT 1)
    FROM found f WHERE f.flow IS NOT NULL
)
SELECT flow FROM found WHERE flow IS NOT NULL
$$;

-- As 0025 defined it, its two skip scans now the function above.
CREATE OR REPLACE FUNCTION skiplock.known_flows(ref timestamptz) RETURNS TABLE (name text)
LANGUAGE sql STABLE AS $$
SELECT name FROM skiplock.flows
UNION SELECT flow FROM skiplock.flows_with_status('pending')
UNION SELECT flow FROM skiplock.flows_with_status('dead')
UNION SELECT DISTINCT flow FROM skiplock.stats_minute WHERE minute >= date_trunc('minute', ref) - interval '1 hour'
$$;

GRANT EXECUTE ON FUNCTION skiplock.flows_with_status(skiplock.job_status)
    TO skiplock_engine, skiplock_operator, skiplock_viewer;

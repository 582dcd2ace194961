-- The flows the console and the metrics leader list: declared ones, those with history in the last
-- hour, and those with pending or dead jobs, found by a skip scan over the partial indexes (one index
-- descent per distinct flow, not a scan of the table). One definition for both readers.
CREATE FUNCTION skiplock.known_flows(ref timestamptz) RETURNS TABLE (name text)
LANGUAGE sql STABLE AS $$
WITH RECURSIVE pending_flows(flow) AS (
    (SELECT flow FROM skiplock.jobs WHERE status = 'pending' ORDER BY flow LIMIT 1)
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = 'pending' AND j.flow > p.flow
            ORDER BY j.flow LIMIT 1)
    FROM pending_flows p WHERE p.flow IS NOT NULL
), dead_flows(flow) AS (
    (SELECT flow FROM skiplock.jobs WHERE status = 'dead' ORDER BY flow LIMIT 1)
    UNION ALL
    SELECT (SELECT j.flow FROM skiplock.jobs j WHERE j.status = 'dead' AND j.flow > d.flow
            ORDER BY j.flow LIMIT 1)
    FROM dead_flows d WHERE d.flow IS NOT NULL
)
SELECT name FROM skiplock.flows
UNION SELECT flow FROM pending_flows WHERE flow IS NOT NULL
UNION SELECT flow FROM dead_flows WHERE flow IS NOT NULL
UNION SELECT DISTINCT flow FROM skiplock.stats_minute WHERE minute >= date_trunc('minute', ref) - interval '1 hour'
$$;

GRANT EXECUTE ON FUNCTION skiplock.known_flows(timestamptz) TO skiplock_engine, skiplock_operator, skiplock_viewer;

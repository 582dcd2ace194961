-- The enqueue wake-up names its flow (issue 17 item 3): a worker serving 1,000 flows claims that one
-- at once instead of probing them all. Payload: the flow's name when the statement inserted due jobs
-- of one flow; '' (look at every flow) for several flows, a delayed job, a name over 63 bytes, or
-- past 32 named wake-ups in one transaction. PostgreSQL folds identical notifications of a
-- transaction into one, so a transaction sends at most 33 however many enqueues it makes, each
-- payload at most 63 bytes.
DROP TRIGGER jobs_enqueued ON skiplock.jobs;

CREATE OR REPLACE FUNCTION skiplock.notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    one_flow text;
    several boolean;
    all_due boolean;
    named integer;
BEGIN
    SELECT min(flow), min(flow) <> max(flow), bool_and(run_at <= clock_timestamp())
    INTO one_flow, several, all_due FROM new_rows;
    IF one_flow IS NULL THEN
        RETURN NULL;  -- nothing inserted (every dedupe key taken)
    END IF;
    named := coalesce(nullif(current_setting('skiplock.named_wakeups', true), ''), '0')::integer;
    IF several OR NOT all_due OR octet_length(one_flow) > 63 OR named >= 32 THEN
        PERFORM pg_notify('skiplock_enqueued', '');
    ELSE
        PERFORM set_config('skiplock.named_wakeups', (named + 1)::text, true);
        PERFORM pg_notify('skiplock_enqueued', one_flow);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_enqueued AFTER INSERT ON skiplock.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION skiplock.notify_enqueued();

-- An ack across the flows of one claim_flows statement (one ack statement for several claim tokens)
-- records its outcome per flow, so a retry after a lost reply can tell each flow's counts again.
-- Adds only: engines built for schema 28 keep working on it (their acks leave it NULL).
ALTER TABLE skiplock.ack_receipts ADD COLUMN IF NOT EXISTS by_flow jsonb;

-- skiplock schema, version 21: steady-state cost of a job (issue 17).
-- Adds only: older engines keep working on it (no min-code-version marker).

-- Half of each page stays free at insert, so the claim's UPDATE (pending -> running) puts the new
-- version on the page of the old one. PostgreSQL then logs only the changed middle of the tuple
-- (prefix and suffix compression, same page only), not the payload again; with full pages every
-- claim wrote its whole row to another page. The ack's delete and page pruning free the space for
-- the next rows. Existing pages keep their rows; new inserts follow the setting.
ALTER TABLE skiplock.jobs SET (fillfactor = 50);

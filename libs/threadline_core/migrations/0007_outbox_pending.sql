-- Outbox queue: one tiny row per event still to publish, written in the event's transaction and deleted
-- by the relay after Kafka acknowledged it. Publishing no longer rewrites the (large) events row, whose
-- non-HOT update re-indexed it in every index, nor re-serialises the envelope with jsonb_set.
CREATE TABLE IF NOT EXISTS outbox_pending (seq bigint PRIMARY KEY)
    WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
INSERT INTO outbox_pending (seq) SELECT seq FROM events WHERE published_at IS NULL ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS events_unpublished_idx;
ALTER TABLE events DROP COLUMN IF EXISTS published_at;

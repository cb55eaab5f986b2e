-- Outbox queue: one tiny row per event still to publish, queued by a trigger in the event's own
-- transaction and deleted by the relay after Kafka acknowledged it. Publishing no longer rewrites the
-- (large) events row, whose non-HOT update re-indexed it in every index, nor re-serialises the envelope.
CREATE TABLE IF NOT EXISTS outbox_pending (seq bigint PRIMARY KEY)
    WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
CREATE OR REPLACE FUNCTION outbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_pending (seq) VALUES (NEW.seq);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS events_outbox_enqueue ON events;
CREATE TRIGGER events_outbox_enqueue AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION outbox_enqueue();
-- Rolling upgrade: what is unpublished moves to the queue. `published_at` is no longer written; it defaults
-- to now(), so a relay of the previous version still running finds nothing to publish (its partial index
-- stays empty) while the trigger queues the rows that version's writers still add.
INSERT INTO outbox_pending (seq) SELECT seq FROM events WHERE published_at IS NULL ON CONFLICT DO NOTHING;
ALTER TABLE events ALTER COLUMN published_at SET DEFAULT now();
UPDATE events SET published_at = now() WHERE published_at IS NULL;

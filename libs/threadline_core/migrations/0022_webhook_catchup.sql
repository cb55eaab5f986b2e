-- The notifier's catch-up from the event log: webhook deliveries of events the live path (Kafka) never saw,
-- e.g. records a broker lost after acknowledging them. One row: how far in the log (`seq`) it has checked.
-- It starts at the log's end: an upgrade does not send the history again.
CREATE TABLE IF NOT EXISTS webhook_catchup (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),   -- a single row
    checked_seq bigint NOT NULL,                      -- every event up to here has its deliveries
    settled_seq bigint NOT NULL,                      -- events up to here are past the grace period
    horizon_seq bigint,                               -- the log's last seq when horizon_at was taken: once
    horizon_at timestamptz,                           -- horizon_at is a grace period old, it is settled
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO webhook_catchup (checked_seq, settled_seq)
SELECT coalesce(max(seq), 0), coalesce(max(seq), 0) FROM events
ON CONFLICT (id) DO NOTHING;

-- When an endpoint was last enabled again: events that occurred while it was disabled are not its (the live
-- path's rule, which a catch-up running later must keep too). NULL: enabled since it was created.
ALTER TABLE webhook_endpoints ADD COLUMN IF NOT EXISTS enabled_ts timestamptz;
CREATE OR REPLACE FUNCTION threadline_webhook_endpoint_enabled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.enabled_ts := clock_timestamp();
    RETURN NEW;
END;
$$;
DROP TRIGGER IF EXISTS webhook_endpoint_enabled ON webhook_endpoints;
CREATE TRIGGER webhook_endpoint_enabled
    BEFORE UPDATE OF status ON webhook_endpoints
    FOR EACH ROW WHEN (NEW.status = 'enabled' AND OLD.status IS DISTINCT FROM 'enabled')
    EXECUTE FUNCTION threadline_webhook_endpoint_enabled();

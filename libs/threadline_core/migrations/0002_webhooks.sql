-- Webhook endpoints (registered through the gateway), their deliveries (one per endpoint and event,
-- the retry state persisted here so it survives notifier restarts) and the log of every attempt.

CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    url text NOT NULL,
    name text NOT NULL,
    event_types text[] NOT NULL,
    secret text NOT NULL,
    previous_secret text,
    previous_secret_expires_at timestamptz,
    status text NOT NULL DEFAULT 'enabled',           -- enabled | disabled
    disabled_reason text,
    failing_since timestamptz,                        -- first failed attempt since the last success
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    created_ts timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_project_idx ON webhook_endpoints (project_id, id);

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id text COLLATE "C" PRIMARY KEY,
    endpoint_id text COLLATE "C" NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    project_id text NOT NULL,
    event_id text NOT NULL,                           -- also the webhook-id header of every attempt
    event_type text NOT NULL,
    ordering_key text NOT NULL,                       -- thread_id / vector_store_id: order kept per key
    seq bigint NOT NULL,                              -- outbox seq of the event
    body text NOT NULL,                               -- exact JSON sent on every attempt
    status text NOT NULL DEFAULT 'pending',           -- pending | succeeded | failed
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_owner text,
    lease_expires_at timestamptz,
    last_status_code integer,
    last_error text,
    event_created_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at timestamptz,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_order_idx ON webhook_deliveries (endpoint_id, ordering_key, seq)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_failed_idx ON webhook_deliveries (endpoint_id, event_created_at)
    WHERE status = 'failed';
CREATE INDEX IF NOT EXISTS webhook_deliveries_finished_idx ON webhook_deliveries (completed_at)
    WHERE status <> 'pending';

CREATE TABLE IF NOT EXISTS webhook_attempts (
    id text COLLATE "C" PRIMARY KEY,
    delivery_id text COLLATE "C" NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    endpoint_id text COLLATE "C" NOT NULL,
    event_id text NOT NULL,
    attempt integer NOT NULL,
    status_code integer,
    success boolean NOT NULL,
    latency_ms double precision NOT NULL,
    error text,
    response_body text,
    instance_id text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS webhook_attempts_endpoint_idx ON webhook_attempts (endpoint_id, id);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);

-- Core objects of the Assistants API. `doc` holds the API object exactly as returned (validated
-- against the openai SDK models); the other columns are what we filter, order and lock on.

CREATE TABLE IF NOT EXISTS assistants (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS assistants_project_idx ON assistants (project_id, id);

CREATE TABLE IF NOT EXISTS threads (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    thread_id text COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    run_id text COLLATE "C",
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_thread_idx ON messages (thread_id, id);

CREATE TABLE IF NOT EXISTS runs (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    thread_id text COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    assistant_id text COLLATE "C" NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint,
    lease_owner text,
    lease_expires_at timestamptz,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_thread_idx ON runs (thread_id, id);
CREATE INDEX IF NOT EXISTS runs_active_idx ON runs (status)
    WHERE status IN ('queued', 'in_progress', 'requires_action', 'cancelling');
-- At most one active run per thread, enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS runs_one_active_per_thread ON runs (thread_id)
    WHERE status IN ('queued', 'in_progress', 'requires_action', 'cancelling');

CREATE TABLE IF NOT EXISTS run_steps (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    thread_id text COLLATE "C" NOT NULL,
    run_id text COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    status text NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS run_steps_run_idx ON run_steps (run_id, id);

-- Transactional outbox and event log: written in the same transaction as the state change,
-- published to Kafka by the relay, kept for SSE replay (Last-Event-ID = seq).
CREATE TABLE IF NOT EXISTS events (
    seq bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    topic text NOT NULL,
    key text NOT NULL,
    type text NOT NULL,
    project_id text NOT NULL,
    thread_id text,
    run_id text,
    occurred_at timestamptz NOT NULL,
    envelope jsonb NOT NULL,
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS events_unpublished_idx ON events (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS events_run_idx ON events (run_id, seq);
CREATE INDEX IF NOT EXISTS events_project_idx ON events (project_id, seq);

-- Idempotent consumers: an event id is applied once per consumer, in the transaction that applies it.
CREATE TABLE IF NOT EXISTS processed_events (
    consumer text NOT NULL,
    event_id text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

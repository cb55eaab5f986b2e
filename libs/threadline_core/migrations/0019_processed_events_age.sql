-- Retention (threadline_core.retention) forgets idempotency claims by age.
CREATE INDEX IF NOT EXISTS processed_events_processed_at_idx ON processed_events (processed_at);

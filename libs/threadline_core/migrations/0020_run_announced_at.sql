-- When a queued run's command was last sent: the sweep sends it again for a run nobody claimed for
-- THREADLINE_UNCLAIMED_RUN_SECONDS (its command lost with a broker that lost acknowledged records).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS announced_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS runs_queued_idx ON runs (announced_at) WHERE status = 'queued';

-- When the ingestion request in force of a vector store file was last sent, and when ingestion started it: the
-- ingestion sweep sends again a request not started THREADLINE_UNCLAIMED_INGESTION_SECONDS after it was sent (lost
-- with a broker that lost acknowledged records). `claimed_by` / `claim_expires_at`: the instance indexing it, so
-- that a second delivery of the request (a rebalance, a re-send) waits instead of indexing it at the same time.
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS announced_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS started_at timestamptz;
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS claimed_by text;
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS claim_expires_at timestamptz;
CREATE INDEX IF NOT EXISTS vector_store_files_unstarted_idx ON vector_store_files (announced_at)
    WHERE status = 'in_progress' AND started_at IS NULL;

-- The batch whose ingestion request is in force for a vector store file (NULL: a single attach). Cancelling a
-- batch cancels only its own requests: a file of its list re-attached since, alone or by another batch, goes on.
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS request_batch_id text COLLATE "C";
-- Requests in force before this column: their batch is in the request's own event (the outbox keeps it).
UPDATE vector_store_files f SET request_batch_id = e.envelope->'data'->>'batch_id'
    FROM events e WHERE e.event_id = f.request_id AND f.status = 'in_progress';

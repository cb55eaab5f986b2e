-- Vector store files list in attach order, as hosted (by the vector store file's created_at), not by file id
-- (the file's own creation). created_at is whole seconds: `attached_seq` orders the files attached within one
-- second, and a re-attach (a new ingestion request) takes a new one with its new created_at.
CREATE SEQUENCE IF NOT EXISTS vector_store_files_attached_seq AS bigint;
ALTER TABLE vector_store_files ADD COLUMN IF NOT EXISTS attached_seq bigint;
-- The column kept the first attach's time while the object took a re-attach's: the object's is the one shown.
UPDATE vector_store_files SET created_at = (doc->>'created_at')::bigint
    WHERE created_at IS DISTINCT FROM (doc->>'created_at')::bigint;
-- Existing rows: by created_at, then by file id (the order they listed in within a second until now).
UPDATE vector_store_files f SET attached_seq = o.n
    FROM (SELECT vector_store_id, file_id, row_number() OVER (ORDER BY created_at, file_id) AS n
          FROM vector_store_files) o
    WHERE f.vector_store_id = o.vector_store_id AND f.file_id = o.file_id;
SELECT setval('vector_store_files_attached_seq', coalesce(max(attached_seq), 0) + 1, false) FROM vector_store_files;
ALTER TABLE vector_store_files
    ALTER COLUMN attached_seq SET DEFAULT nextval('vector_store_files_attached_seq'),
    ALTER COLUMN attached_seq SET NOT NULL;
ALTER SEQUENCE vector_store_files_attached_seq OWNED BY vector_store_files.attached_seq;
CREATE INDEX IF NOT EXISTS vector_store_files_order_idx
    ON vector_store_files (vector_store_id, created_at, attached_seq);

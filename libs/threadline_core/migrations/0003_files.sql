-- Files, vector stores, vector store files and file batches. `doc` is the API object as returned
-- (openai.types.FileObject, VectorStore, vector_stores.VectorStoreFile, VectorStoreFileBatch).

CREATE TABLE IF NOT EXISTS files (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    purpose text NOT NULL,
    filename text NOT NULL,
    bytes bigint NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS files_project_idx ON files (project_id, id);

-- File bytes live in the database so that every service on every machine can read them.
CREATE TABLE IF NOT EXISTS file_contents (
    file_id text COLLATE "C" PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
    content bytea NOT NULL
);
-- Uploads are mostly compressed formats (PDF, DOCX): store them out of line without trying to compress.
ALTER TABLE file_contents ALTER COLUMN content SET STORAGE EXTERNAL;

CREATE TABLE IF NOT EXISTS vector_stores (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS vector_stores_project_idx ON vector_stores (project_id, id);

-- One row per file attached to a store. `request_id` is the event id of the ingestion request in force:
-- the ingestion service applies only that request, so stale or duplicated deliveries change nothing.
CREATE TABLE IF NOT EXISTS vector_store_files (
    vector_store_id text COLLATE "C" NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    file_id text COLLATE "C" NOT NULL,
    project_id text NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    usage_bytes bigint NOT NULL DEFAULT 0,
    request_id text,
    doc jsonb NOT NULL,
    PRIMARY KEY (vector_store_id, file_id)
);
CREATE INDEX IF NOT EXISTS vector_store_files_file_idx ON vector_store_files (file_id);

CREATE TABLE IF NOT EXISTS vector_store_file_batches (
    id text COLLATE "C" PRIMARY KEY,
    vector_store_id text COLLATE "C" NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    project_id text NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS vector_store_file_batches_store_idx ON vector_store_file_batches (vector_store_id, id);

CREATE TABLE IF NOT EXISTS vector_store_file_batch_files (
    batch_id text COLLATE "C" NOT NULL REFERENCES vector_store_file_batches (id) ON DELETE CASCADE,
    vector_store_id text COLLATE "C" NOT NULL,
    file_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (batch_id, file_id)
);
CREATE INDEX IF NOT EXISTS vector_store_file_batch_files_file_idx
    ON vector_store_file_batch_files (vector_store_id, file_id);

-- Where the gateway reaches the internal search endpoint of the ingestion service (its ops server), when
-- THREADLINE_SEARCH_URL is not set: each ingestion instance registers its URL at start-up.
CREATE TABLE IF NOT EXISTS search_endpoints (
    instance_id text PRIMARY KEY,
    url text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Uploads API: a large file sent in parts, assembled into a File (files + file_contents) on completion.
-- `doc` is the openai.types.Upload as returned while pending (`file` null); `status` is what requests lock and
-- check (pending, completed, cancelled, expired); `expires_at` is when a pending upload stops taking parts.

CREATE TABLE IF NOT EXISTS uploads (
    id text COLLATE "C" PRIMARY KEY,
    project_id text NOT NULL,
    status text NOT NULL,
    bytes bigint NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    file_expires_after bigint,
    file_id text COLLATE "C",
    doc jsonb NOT NULL
);
-- Pending uploads past their expiry are swept (marked expired, their parts deleted) by every gateway's sweeper.
CREATE INDEX IF NOT EXISTS uploads_pending_expiry_idx ON uploads (expires_at) WHERE status = 'pending';

-- The bytes of each part until the upload is completed or cancelled (then the rows are deleted).
CREATE TABLE IF NOT EXISTS upload_parts (
    id text COLLATE "C" PRIMARY KEY,
    upload_id text COLLATE "C" NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    created_at bigint NOT NULL,
    bytes bigint NOT NULL,
    content bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_parts_upload_idx ON upload_parts (upload_id, id);
-- Parts are slices of arbitrary files: store them out of line without trying to compress.
ALTER TABLE upload_parts ALTER COLUMN content SET STORAGE EXTERNAL;

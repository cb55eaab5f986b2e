-- Files past their expires_at are deleted by the gateway's sweeper, as `files.delete` does (out of every vector
-- store first): this index finds them without reading every file.
CREATE INDEX IF NOT EXISTS files_expires_at_idx ON files (((doc->>'expires_at')::bigint))
    WHERE doc->>'expires_at' IS NOT NULL;

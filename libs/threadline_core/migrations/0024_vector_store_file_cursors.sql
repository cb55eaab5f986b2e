-- A file detached from a store keeps its place in the store's list, as a cursor: the SDK's auto-pagination names the
-- last file of a page as the next page's `after`, and a loop that detaches each file it lists has detached that one
-- by then. Re-attached, the file takes a new place (its vector_store_files row wins); gone with its store.
CREATE TABLE IF NOT EXISTS vector_store_file_cursors (
    vector_store_id text COLLATE "C" NOT NULL REFERENCES vector_stores (id) ON DELETE CASCADE,
    file_id text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    attached_seq bigint NOT NULL,
    PRIMARY KEY (vector_store_id, file_id)
);

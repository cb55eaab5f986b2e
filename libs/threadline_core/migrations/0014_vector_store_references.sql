-- Deleting a vector store removes its id from the tool_resources of the assistants and threads that name it
-- (as hosted); these indexes find them without reading every assistant and thread.
CREATE INDEX IF NOT EXISTS assistants_vector_store_ids_idx
    ON assistants USING gin ((doc -> 'tool_resources' -> 'file_search' -> 'vector_store_ids'));
CREATE INDEX IF NOT EXISTS threads_vector_store_ids_idx
    ON threads USING gin ((doc -> 'tool_resources' -> 'file_search' -> 'vector_store_ids'));

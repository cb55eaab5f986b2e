-- Deleting a file removes its id from the code_interpreter tool_resources of the assistants and threads that name
-- it (as hosted, and as deleting a vector store does for file_search: 0014); these indexes find them without
-- reading every assistant and thread.
CREATE INDEX IF NOT EXISTS assistants_code_interpreter_file_ids_idx
    ON assistants USING gin ((doc -> 'tool_resources' -> 'code_interpreter' -> 'file_ids'));
CREATE INDEX IF NOT EXISTS threads_code_interpreter_file_ids_idx
    ON threads USING gin ((doc -> 'tool_resources' -> 'code_interpreter' -> 'file_ids'));

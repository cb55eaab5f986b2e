-- code_interpreter sessions (tool executor): the cells a thread's session ran, replayed before its next cell so
-- that variables and /mnt/data files carry over, as in the hosted API's stateful session. A session ends after
-- THREADLINE_CODE_SESSION_IDLE_SECONDS without a call (or at THREADLINE_CODE_SESSION_MAX_CELLS); its cells go
-- with the thread.
CREATE TABLE IF NOT EXISTS code_session_cells (
    seq bigserial PRIMARY KEY,
    thread_id text COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    session_id text NOT NULL,
    tool_call_id text NOT NULL,
    code text NOT NULL,
    cpu_seconds double precision NOT NULL,
    executed_at bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS code_session_cells_thread_idx ON code_session_cells (thread_id, seq);

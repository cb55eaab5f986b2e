-- Run orchestrator: per-step tool-call bookkeeping that is not part of the API object (the model's
-- own function names and arguments, which server-side calls are done, dispatch attempts, the turn's
-- usage until the step completes), so a run can be continued from the database alone.
ALTER TABLE run_steps ADD COLUMN IF NOT EXISTS tool_state jsonb;
-- Sweeper: runs whose driver's lease ran out.
CREATE INDEX IF NOT EXISTS runs_lease_idx ON runs (lease_expires_at) WHERE status IN ('in_progress', 'cancelling');

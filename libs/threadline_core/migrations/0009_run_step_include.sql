-- What create run's `include[]` asked for (file_search result contents in step events): kept with the run, so
-- a later submit_tool_outputs stream of the same run shapes its step events as the run's first stream did.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS step_include text[] NOT NULL DEFAULT '{}';

-- How many times a run's driver was lost (its lease ran out while an orchestrator held it: a crash, a kill):
-- the sweep fails a run at THREADLINE_MAX_DRIVER_LOSSES instead of re-queueing it for good (a run that crashes
-- its driver each time would call the model again and again until the run expired).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS driver_losses integer NOT NULL DEFAULT 0;

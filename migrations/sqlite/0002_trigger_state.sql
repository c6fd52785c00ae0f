-- What the trigger-manager remembers per pipeline between cycles and restarts.
CREATE TABLE pipeline_trigger_state (
    pipeline_id       INTEGER PRIMARY KEY REFERENCES pipeline (id) ON DELETE CASCADE,
    -- The newest cron tick this pipeline was evaluated for (CRON pipelines).
    last_cron_tick    TEXT,
    last_evaluated_at TEXT
);

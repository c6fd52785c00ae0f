-- This deployment's identity: a random id made once, when the schema is created. Every
-- job tag and label carries it, so a database re-created under the same name never takes
-- another incarnation's jobs for its own.
CREATE TABLE wfm_deployment (
    singleton     INTEGER PRIMARY KEY DEFAULT 1 CHECK (singleton = 1),
    deployment_id TEXT NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
INSERT INTO wfm_deployment (deployment_id) VALUES (lower(hex(randomblob(16))));

-- Hand-offs belong to the processing location whose managers recorded them.
ALTER TABLE celery_outbox ADD COLUMN processing_location_id INTEGER;
CREATE INDEX ix_celery_outbox_location_unpublished ON celery_outbox (processing_location_id, id)
    WHERE published_at IS NULL;

-- A run of a final step that leaves no product fails (the software ran but its contract,
-- products in output/, was not met), unless the step says an empty output is a result.
ALTER TABLE reduction_step ADD COLUMN allow_empty_output BOOLEAN NOT NULL DEFAULT FALSE;

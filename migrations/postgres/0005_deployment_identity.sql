-- This deployment's identity: a random id made once, when the schema is created. Every
-- job tag and label carries it, so a database re-created under the same name, or a second
-- deployment on the same ops-db server, never takes another incarnation's jobs for its own.
CREATE TABLE wfm_deployment (
    singleton     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    deployment_id TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO wfm_deployment (deployment_id) VALUES (replace(gen_random_uuid()::text, '-', ''));

-- Hand-offs belong to the processing location whose managers recorded them: two
-- deployments on one ops-db publish (and their workers run) only their own.
ALTER TABLE celery_outbox ADD COLUMN processing_location_id BIGINT;
CREATE INDEX ix_celery_outbox_location_unpublished ON celery_outbox (processing_location_id, id)
    WHERE published_at IS NULL;

-- A run of a final step that leaves no product fails (the software ran but its contract,
-- products in output/, was not met), unless the step says an empty output is a result.
ALTER TABLE reduction_step ADD COLUMN allow_empty_output BOOLEAN NOT NULL DEFAULT FALSE;

-- Hand-offs to the Celery workers, recorded in the same transaction as the state change
-- that needs them and published afterwards; a publish that fails is retried by later
-- cycles, so a hand-off is never lost (the transactional-outbox pattern).
CREATE TABLE celery_outbox (
    id           BIGSERIAL PRIMARY KEY,
    -- The Celery task id, fixed when recorded: a re-publish carries the same id.
    task_id      TEXT NOT NULL UNIQUE,
    task_name    TEXT NOT NULL,
    queue        TEXT NOT NULL,
    priority     INTEGER NOT NULL DEFAULT 0,
    args         JSONB NOT NULL DEFAULT '[]'::jsonb,
    kwargs       JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX ix_celery_outbox_unpublished ON celery_outbox (id) WHERE published_at IS NULL;

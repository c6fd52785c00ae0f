-- Initial schema of the CCAT Workflow Manager (PostgreSQL).
--
-- Table and column names follow ops-db (model ReductionStep <-> table reduction_step).
-- Enumerated columns hold the upper-case member name, as SQLAlchemy enum columns do;
-- they are TEXT with a CHECK here so that both databases share one binding code path.
-- In production ops-db owns the schema; these migrations serve standalone use and tests.

-- Observation side (read by the filter engine) --------------------------------------

CREATE TABLE instrument (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT ''
);

CREATE TABLE instrument_module (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL,
    instrument_id BIGINT NOT NULL REFERENCES instrument (id),
    UNIQUE (instrument_id, name)
);

CREATE TABLE source (
    id      BIGSERIAL PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    ra_deg  DOUBLE PRECISION,
    dec_deg DOUBLE PRECISION
);

CREATE TABLE line (
    id                  BIGSERIAL PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    rest_frequency_ghz  DOUBLE PRECISION
);

CREATE TABLE obs_unit (
    id        BIGSERIAL PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    source_id BIGINT NOT NULL REFERENCES source (id),
    line_id   BIGINT REFERENCES line (id)
);
CREATE INDEX ix_obs_unit_source_id ON obs_unit (source_id);

CREATE TABLE executed_obs_unit (
    id          BIGSERIAL PRIMARY KEY,
    obs_unit_id BIGINT NOT NULL REFERENCES obs_unit (id),
    start_time  TIMESTAMPTZ NOT NULL,
    end_time    TIMESTAMPTZ
);
CREATE INDEX ix_executed_obs_unit_obs_unit_id ON executed_obs_unit (obs_unit_id);

CREATE TABLE raw_data_package (
    id                   BIGSERIAL PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    executed_obs_unit_id BIGINT NOT NULL REFERENCES executed_obs_unit (id),
    instrument_module_id BIGINT NOT NULL REFERENCES instrument_module (id),
    state                TEXT NOT NULL DEFAULT 'WAITING'
        CHECK (state IN ('WAITING', 'TRANSFERRING', 'ARCHIVED', 'FAILED')),
    relative_path        TEXT NOT NULL DEFAULT '',
    size_bytes           BIGINT NOT NULL DEFAULT 0,
    checksum             TEXT,
    metadata             JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_raw_data_package_executed_obs_unit_id ON raw_data_package (executed_obs_unit_id);
CREATE INDEX ix_raw_data_package_instrument_module_id ON raw_data_package (instrument_module_id);
CREATE INDEX ix_raw_data_package_state ON raw_data_package (state);

CREATE TABLE data_location (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    location_type TEXT NOT NULL
        CHECK (location_type IN ('SOURCE', 'BUFFER', 'LONG_TERM_ARCHIVE', 'PROCESSING')),
    base_path     TEXT NOT NULL DEFAULT '',
    active        BOOLEAN NOT NULL DEFAULT TRUE
);

-- Pipeline definitions ----------------------------------------------------------------

CREATE TABLE data_grouping (
    id                   BIGSERIAL PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    description          TEXT NOT NULL DEFAULT '',
    filter_rules         JSONB NOT NULL DEFAULT '[]'::jsonb,
    instrument_module_id BIGINT REFERENCES instrument_module (id),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE pipeline (
    id                     BIGSERIAL PRIMARY KEY,
    name                   TEXT NOT NULL UNIQUE,
    description            TEXT NOT NULL DEFAULT '',
    data_grouping_id       BIGINT NOT NULL REFERENCES data_grouping (id),
    processing_location_id BIGINT NOT NULL REFERENCES data_location (id),
    trigger_type           TEXT NOT NULL DEFAULT 'CONTINUOUS'
        CHECK (trigger_type IN ('CONTINUOUS', 'CRON', 'MANUAL')),
    trigger_config         JSONB NOT NULL DEFAULT '{}'::jsonb,
    enabled                BOOLEAN NOT NULL DEFAULT TRUE,
    priority               INTEGER NOT NULL DEFAULT 0,
    max_active_runs        INTEGER,
    created_by_user_id     BIGINT,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_pipeline_location_enabled ON pipeline (processing_location_id, enabled, priority DESC);

CREATE TABLE reduction_software (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    description    TEXT NOT NULL DEFAULT '',
    repository_url TEXT NOT NULL DEFAULT ''
);

CREATE TABLE reduction_software_version (
    id                    BIGSERIAL PRIMARY KEY,
    reduction_software_id BIGINT NOT NULL REFERENCES reduction_software (id),
    version               TEXT NOT NULL,
    image_ref             TEXT NOT NULL,
    image_digest          TEXT,
    -- The argument vector run inside the container, as a JSON list of strings.
    command               JSONB NOT NULL DEFAULT '[]'::jsonb,
    default_cpu           INTEGER NOT NULL DEFAULT 1,
    default_memory_gb     DOUBLE PRECISION NOT NULL DEFAULT 4,
    default_time_hours    DOUBLE PRECISION NOT NULL DEFAULT 1,
    deprecated            BOOLEAN NOT NULL DEFAULT FALSE,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (reduction_software_id, version)
);

CREATE TABLE reduction_step (
    id                            BIGSERIAL PRIMARY KEY,
    pipeline_id                   BIGINT NOT NULL REFERENCES pipeline (id) ON DELETE CASCADE,
    name                          TEXT NOT NULL,
    step_order                    INTEGER NOT NULL DEFAULT 0,
    reduction_software_id         BIGINT NOT NULL REFERENCES reduction_software (id),
    -- The pinned version: the one run under EXACT, the major version under COMPATIBLE.
    reduction_software_version_id BIGINT REFERENCES reduction_software_version (id),
    version_policy                TEXT NOT NULL DEFAULT 'EXACT'
        CHECK (version_policy IN ('EXACT', 'COMPATIBLE', 'LATEST')),
    group_by                      JSONB NOT NULL DEFAULT '[]'::jsonb,
    cooldown_seconds              INTEGER NOT NULL DEFAULT 60,
    max_retries                   INTEGER NOT NULL DEFAULT 3,
    cpu                           INTEGER,
    memory_gb                     DOUBLE PRECISION,
    time_hours                    DOUBLE PRECISION,
    created_at                    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (pipeline_id, name)
);

CREATE TABLE reduction_step_dependency (
    reduction_step_id  BIGINT NOT NULL REFERENCES reduction_step (id) ON DELETE CASCADE,
    depends_on_step_id BIGINT NOT NULL REFERENCES reduction_step (id) ON DELETE CASCADE,
    PRIMARY KEY (reduction_step_id, depends_on_step_id),
    CHECK (reduction_step_id <> depends_on_step_id)
);

CREATE TABLE reduction_step_config (
    id                BIGSERIAL PRIMARY KEY,
    reduction_step_id BIGINT NOT NULL UNIQUE REFERENCES reduction_step (id) ON DELETE CASCADE,
    parameters        JSONB NOT NULL DEFAULT '{}'::jsonb,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Runs, products, staging -------------------------------------------------------------

CREATE TABLE executed_reduction_step (
    id                            BIGSERIAL PRIMARY KEY,
    reduction_step_id             BIGINT NOT NULL REFERENCES reduction_step (id),
    sub_group_key                 TEXT NOT NULL,
    -- The dimension values of the sub-group, e.g. {"source": "NGC253"}.
    sub_group                     JSONB NOT NULL DEFAULT '{}'::jsonb,
    fingerprint                   TEXT NOT NULL,
    status                        TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'STAGING_DATA', 'SUBMITTED', 'RUNNING',
                          'COLLECTING_RESULTS', 'COMPLETED', 'FAILED', 'CANCELLED')),
    reduction_software_version_id BIGINT NOT NULL REFERENCES reduction_software_version (id),
    -- The step configuration the fingerprint was computed over.
    config_snapshot               JSONB NOT NULL DEFAULT '{}'::jsonb,
    -- Upstream sub-groups left out because they failed for good (named in the manifest).
    excluded_upstream             JSONB NOT NULL DEFAULT '[]'::jsonb,
    hpc_backend                   TEXT,
    hpc_job_id                    TEXT,
    retry_count                   INTEGER NOT NULL DEFAULT 0,
    max_retries                   INTEGER NOT NULL DEFAULT 3,
    next_attempt_at               TIMESTAMPTZ,
    lease_owner                   TEXT,
    lease_expires_at              TIMESTAMPTZ,
    exit_code                     INTEGER,
    wall_time_seconds             DOUBLE PRECISION,
    cpu_hours                     DOUBLE PRECISION,
    peak_memory_gb                DOUBLE PRECISION,
    error_message                 TEXT,
    log_tail                      TEXT,
    created_at                    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                    TIMESTAMPTZ NOT NULL DEFAULT now(),
    submitted_at                  TIMESTAMPTZ,
    started_at                    TIMESTAMPTZ,
    finished_at                   TIMESTAMPTZ,
    -- Run creation is idempotent: one run per (step, sub-group, fingerprint).
    UNIQUE (reduction_step_id, sub_group_key, fingerprint)
);
CREATE INDEX ix_executed_reduction_step_status ON executed_reduction_step (status, next_attempt_at);
CREATE INDEX ix_executed_reduction_step_step_sub_group
    ON executed_reduction_step (reduction_step_id, sub_group_key, created_at DESC);

-- Inputs of a run: raw data packages (first steps) ...
CREATE TABLE executed_reduction_step_raw_input (
    executed_reduction_step_id BIGINT NOT NULL REFERENCES executed_reduction_step (id) ON DELETE CASCADE,
    raw_data_package_id        BIGINT NOT NULL REFERENCES raw_data_package (id),
    PRIMARY KEY (executed_reduction_step_id, raw_data_package_id)
);
CREATE INDEX ix_raw_input_raw_data_package_id ON executed_reduction_step_raw_input (raw_data_package_id);

CREATE TABLE data_product (
    id                         BIGSERIAL PRIMARY KEY,
    executed_reduction_step_id BIGINT NOT NULL REFERENCES executed_reduction_step (id),
    name                       TEXT NOT NULL,
    product_type               TEXT NOT NULL
        CHECK (product_type IN ('SCIENCE', 'QA_METRIC', 'PLOT', 'STATISTICS', 'LOG', 'INTERMEDIATE')),
    relative_path              TEXT NOT NULL,
    size_bytes                 BIGINT NOT NULL,
    checksum                   TEXT NOT NULL,
    checksum_algorithm         TEXT NOT NULL DEFAULT 'sha256',
    quality_metrics            JSONB,
    created_at                 TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A retried collection never registers the same file twice.
    UNIQUE (executed_reduction_step_id, relative_path)
);

-- ... and upstream data products (steps with depends_on).
CREATE TABLE executed_reduction_step_product_input (
    executed_reduction_step_id BIGINT NOT NULL REFERENCES executed_reduction_step (id) ON DELETE CASCADE,
    data_product_id            BIGINT NOT NULL REFERENCES data_product (id),
    PRIMARY KEY (executed_reduction_step_id, data_product_id)
);
CREATE INDEX ix_product_input_data_product_id ON executed_reduction_step_product_input (data_product_id);

-- One object present at one location: a raw data package or a data product.
CREATE TABLE physical_copy (
    id                  BIGSERIAL PRIMARY KEY,
    data_location_id    BIGINT NOT NULL REFERENCES data_location (id),
    raw_data_package_id BIGINT REFERENCES raw_data_package (id),
    data_product_id     BIGINT REFERENCES data_product (id),
    full_path           TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'PRESENT'
        CHECK (status IN ('PRESENT', 'STAGED', 'DELETION_SCHEDULED', 'DELETION_IN_PROGRESS',
                          'DELETION_POSSIBLE', 'DELETED', 'DELETION_FAILED')),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((raw_data_package_id IS NULL) <> (data_product_id IS NULL))
);
CREATE INDEX ix_physical_copy_raw_data_package ON physical_copy (raw_data_package_id, data_location_id);
CREATE INDEX ix_physical_copy_data_product ON physical_copy (data_product_id);

-- data-transfer's request to bring archived packages to a processing location.
CREATE TABLE staging_job (
    id                             BIGSERIAL PRIMARY KEY,
    destination_data_location_id   BIGINT NOT NULL REFERENCES data_location (id),
    executed_reduction_step_id     BIGINT REFERENCES executed_reduction_step (id),
    status                         TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'IN_PROGRESS', 'COMPLETED', 'FAILED')),
    failure_error_message          TEXT,
    created_at                     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_staging_job_status ON staging_job (status);

CREATE TABLE staging_job_raw_data_package (
    staging_job_id      BIGINT NOT NULL REFERENCES staging_job (id) ON DELETE CASCADE,
    raw_data_package_id BIGINT NOT NULL REFERENCES raw_data_package (id),
    PRIMARY KEY (staging_job_id, raw_data_package_id)
);

-- Operator requests to evaluate a (MANUAL) pipeline now.
CREATE TABLE trigger_request (
    id                BIGSERIAL PRIMARY KEY,
    pipeline_id       BIGINT NOT NULL REFERENCES pipeline (id) ON DELETE CASCADE,
    reduction_step_id BIGINT REFERENCES reduction_step (id) ON DELETE CASCADE,
    sub_group_key     TEXT,
    force             BOOLEAN NOT NULL DEFAULT FALSE,
    requested_by      TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'PROCESSED', 'FAILED')),
    message           TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at      TIMESTAMPTZ
);
CREATE INDEX ix_trigger_request_status ON trigger_request (status, created_at);

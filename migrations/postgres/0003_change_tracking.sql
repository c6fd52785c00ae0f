-- Change tracking for incremental trigger evaluation.
--
-- Every row of a table the trigger-manager reads carries change_mark: the id of the
-- transaction that last wrote it (pg_current_xact_id). A reader takes the horizon
-- pg_snapshot_xmin(pg_current_snapshot()) before it reads; every transaction below it has
-- ended, so everything it wrote is visible to that read. The next cycle asks for
-- change_mark >= horizon: nothing committed late is missed, whatever the commit order.
-- Deletions leave a tombstone. The marks are set by triggers, so writers that know
-- nothing of this (ops-db, data-transfer, operators' SQL) are tracked all the same.
-- Tables the evaluation reads row by row get an index on the mark; the small definition
-- tables are only asked whether anything changed.

CREATE FUNCTION ccat_set_change_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_mark := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END
$$;

CREATE TABLE change_tombstone (
    table_name  TEXT NOT NULL,
    -- The deleted row's id (0 for tables without one).
    row_id      BIGINT NOT NULL,
    change_mark BIGINT NOT NULL,
    deleted_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_change_tombstone_change_mark ON change_tombstone (change_mark);

CREATE FUNCTION ccat_record_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES (TG_TABLE_NAME, CASE WHEN TG_ARGV[0] = 'id' THEN (to_jsonb(OLD) ->> 'id')::bigint ELSE 0 END,
            pg_current_xact_id()::text::bigint);
    RETURN OLD;
END
$$;

DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['instrument', 'instrument_module', 'source', 'line', 'obs_unit', 'executed_obs_unit', 'raw_data_package', 'executed_reduction_step']
    LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN change_mark BIGINT NOT NULL DEFAULT 0', t);
        EXECUTE format('CREATE INDEX ix_%s_change_mark ON %I (change_mark)', t, t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['data_grouping', 'pipeline', 'reduction_step', 'reduction_step_config', 'reduction_step_dependency', 'reduction_software_version', 'trigger_request', 'pipeline_trigger_state']
    LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN change_mark BIGINT NOT NULL DEFAULT 0', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['instrument', 'instrument_module', 'source', 'line', 'obs_unit', 'executed_obs_unit', 'raw_data_package', 'executed_reduction_step', 'data_grouping', 'pipeline', 'reduction_step', 'reduction_step_config', 'reduction_step_dependency', 'reduction_software_version', 'trigger_request', 'pipeline_trigger_state']
    LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION ccat_set_change_mark()', t || '_change_mark', t);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION ccat_record_delete(%L)', t || '_tombstone', t,
                       CASE WHEN t IN ('reduction_step_dependency', 'pipeline_trigger_state')
                            THEN 'none' ELSE 'id' END);
    END LOOP;
END
$$;

-- A deleted run's tombstone names its step and sub-group, so that the trigger-manager
-- re-evaluates just that sub-group (and what depends on it) instead of starting afresh.
ALTER TABLE change_tombstone ADD COLUMN reduction_step_id BIGINT;
ALTER TABLE change_tombstone ADD COLUMN sub_group_key TEXT;

CREATE FUNCTION ccat_record_run_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO change_tombstone (table_name, row_id, change_mark, reduction_step_id, sub_group_key)
    VALUES (TG_TABLE_NAME, OLD.id, pg_current_xact_id()::text::bigint,
            OLD.reduction_step_id, OLD.sub_group_key);
    RETURN OLD;
END
$$;

DROP TRIGGER executed_reduction_step_tombstone ON executed_reduction_step;
CREATE TRIGGER executed_reduction_step_tombstone AFTER DELETE ON executed_reduction_step
    FOR EACH ROW EXECUTE FUNCTION ccat_record_run_delete();

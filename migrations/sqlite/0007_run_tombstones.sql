-- A deleted run's tombstone names its step and sub-group (see the PostgreSQL migration).
ALTER TABLE change_tombstone ADD COLUMN reduction_step_id INTEGER;
ALTER TABLE change_tombstone ADD COLUMN sub_group_key TEXT;

DROP TRIGGER executed_reduction_step_tombstone;
CREATE TRIGGER executed_reduction_step_tombstone AFTER DELETE ON executed_reduction_step
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark, reduction_step_id, sub_group_key)
    VALUES ('executed_reduction_step', OLD.id, (SELECT value FROM change_clock),
            OLD.reduction_step_id, OLD.sub_group_key);
END;

-- Change tracking for incremental trigger evaluation (see the PostgreSQL migration).
--
-- SQLite runs one writer at a time, so a counter is enough: every insert or update of a
-- tracked row takes the next value of change_clock as its change_mark, and a reader's
-- horizon is the clock's value + 1 read before it reads. Deletions leave a tombstone.

CREATE TABLE change_clock (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO change_clock (id, value) VALUES (1, 0);

CREATE TABLE change_tombstone (
    table_name  TEXT NOT NULL,
    row_id      INTEGER NOT NULL,
    change_mark INTEGER NOT NULL,
    deleted_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE INDEX ix_change_tombstone_change_mark ON change_tombstone (change_mark);

ALTER TABLE instrument ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_instrument_change_mark ON instrument (change_mark);
CREATE TRIGGER instrument_change_mark_insert AFTER INSERT ON instrument
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE instrument SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER instrument_change_mark_update AFTER UPDATE ON instrument
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE instrument SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER instrument_tombstone AFTER DELETE ON instrument
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('instrument', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE instrument_module ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_instrument_module_change_mark ON instrument_module (change_mark);
CREATE TRIGGER instrument_module_change_mark_insert AFTER INSERT ON instrument_module
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE instrument_module SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER instrument_module_change_mark_update AFTER UPDATE ON instrument_module
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE instrument_module SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER instrument_module_tombstone AFTER DELETE ON instrument_module
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('instrument_module', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE source ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_source_change_mark ON source (change_mark);
CREATE TRIGGER source_change_mark_insert AFTER INSERT ON source
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE source SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER source_change_mark_update AFTER UPDATE ON source
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE source SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER source_tombstone AFTER DELETE ON source
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('source', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE line ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_line_change_mark ON line (change_mark);
CREATE TRIGGER line_change_mark_insert AFTER INSERT ON line
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE line SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER line_change_mark_update AFTER UPDATE ON line
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE line SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER line_tombstone AFTER DELETE ON line
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('line', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE obs_unit ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_obs_unit_change_mark ON obs_unit (change_mark);
CREATE TRIGGER obs_unit_change_mark_insert AFTER INSERT ON obs_unit
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE obs_unit SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER obs_unit_change_mark_update AFTER UPDATE ON obs_unit
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE obs_unit SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER obs_unit_tombstone AFTER DELETE ON obs_unit
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('obs_unit', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE executed_obs_unit ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_executed_obs_unit_change_mark ON executed_obs_unit (change_mark);
CREATE TRIGGER executed_obs_unit_change_mark_insert AFTER INSERT ON executed_obs_unit
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE executed_obs_unit SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER executed_obs_unit_change_mark_update AFTER UPDATE ON executed_obs_unit
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE executed_obs_unit SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER executed_obs_unit_tombstone AFTER DELETE ON executed_obs_unit
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('executed_obs_unit', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE raw_data_package ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_raw_data_package_change_mark ON raw_data_package (change_mark);
CREATE TRIGGER raw_data_package_change_mark_insert AFTER INSERT ON raw_data_package
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE raw_data_package SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER raw_data_package_change_mark_update AFTER UPDATE ON raw_data_package
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE raw_data_package SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER raw_data_package_tombstone AFTER DELETE ON raw_data_package
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('raw_data_package', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE executed_reduction_step ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_executed_reduction_step_change_mark ON executed_reduction_step (change_mark);
CREATE TRIGGER executed_reduction_step_change_mark_insert AFTER INSERT ON executed_reduction_step
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE executed_reduction_step SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER executed_reduction_step_change_mark_update AFTER UPDATE ON executed_reduction_step
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE executed_reduction_step SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER executed_reduction_step_tombstone AFTER DELETE ON executed_reduction_step
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('executed_reduction_step', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE data_grouping ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER data_grouping_change_mark_insert AFTER INSERT ON data_grouping
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE data_grouping SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER data_grouping_change_mark_update AFTER UPDATE ON data_grouping
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE data_grouping SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER data_grouping_tombstone AFTER DELETE ON data_grouping
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('data_grouping', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE pipeline ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER pipeline_change_mark_insert AFTER INSERT ON pipeline
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE pipeline SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER pipeline_change_mark_update AFTER UPDATE ON pipeline
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE pipeline SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER pipeline_tombstone AFTER DELETE ON pipeline
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('pipeline', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE reduction_step ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER reduction_step_change_mark_insert AFTER INSERT ON reduction_step
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_change_mark_update AFTER UPDATE ON reduction_step
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_tombstone AFTER DELETE ON reduction_step
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('reduction_step', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE reduction_step_config ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER reduction_step_config_change_mark_insert AFTER INSERT ON reduction_step_config
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step_config SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_config_change_mark_update AFTER UPDATE ON reduction_step_config
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step_config SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_config_tombstone AFTER DELETE ON reduction_step_config
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('reduction_step_config', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE reduction_step_dependency ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER reduction_step_dependency_change_mark_insert AFTER INSERT ON reduction_step_dependency
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step_dependency SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_dependency_change_mark_update AFTER UPDATE ON reduction_step_dependency
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_step_dependency SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_step_dependency_tombstone AFTER DELETE ON reduction_step_dependency
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('reduction_step_dependency', 0, (SELECT value FROM change_clock));
END;

ALTER TABLE reduction_software_version ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER reduction_software_version_change_mark_insert AFTER INSERT ON reduction_software_version
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_software_version SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_software_version_change_mark_update AFTER UPDATE ON reduction_software_version
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE reduction_software_version SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER reduction_software_version_tombstone AFTER DELETE ON reduction_software_version
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('reduction_software_version', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE trigger_request ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER trigger_request_change_mark_insert AFTER INSERT ON trigger_request
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE trigger_request SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER trigger_request_change_mark_update AFTER UPDATE ON trigger_request
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE trigger_request SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER trigger_request_tombstone AFTER DELETE ON trigger_request
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('trigger_request', OLD.id, (SELECT value FROM change_clock));
END;

ALTER TABLE pipeline_trigger_state ADD COLUMN change_mark INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER pipeline_trigger_state_change_mark_insert AFTER INSERT ON pipeline_trigger_state
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE pipeline_trigger_state SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER pipeline_trigger_state_change_mark_update AFTER UPDATE ON pipeline_trigger_state
WHEN NEW.change_mark IS OLD.change_mark
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE pipeline_trigger_state SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER pipeline_trigger_state_tombstone AFTER DELETE ON pipeline_trigger_state
BEGIN
    UPDATE change_clock SET value = value + 1;
    INSERT INTO change_tombstone (table_name, row_id, change_mark)
    VALUES ('pipeline_trigger_state', 0, (SELECT value FROM change_clock));
END;

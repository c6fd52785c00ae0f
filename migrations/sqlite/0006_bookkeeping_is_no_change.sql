-- The managers' own bookkeeping is no change to the trigger-manager (see the PostgreSQL
-- migration): a run's mark moves when a column the evaluation reads changes, a pipeline's
-- trigger state only when its cron tick does.

DROP TRIGGER executed_reduction_step_change_mark_update;
CREATE TRIGGER executed_reduction_step_change_mark_update AFTER UPDATE ON executed_reduction_step
WHEN NEW.change_mark IS OLD.change_mark
 AND (NEW.status IS NOT OLD.status OR NEW.fingerprint IS NOT OLD.fingerprint
      OR NEW.sub_group_key IS NOT OLD.sub_group_key
      OR NEW.reduction_step_id IS NOT OLD.reduction_step_id
      OR NEW.retry_count IS NOT OLD.retry_count OR NEW.max_retries IS NOT OLD.max_retries)
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE executed_reduction_step SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;

DROP TRIGGER pipeline_trigger_state_change_mark_update;
CREATE TRIGGER pipeline_trigger_state_change_mark_update AFTER UPDATE ON pipeline_trigger_state
WHEN NEW.change_mark IS OLD.change_mark AND NEW.last_cron_tick IS NOT OLD.last_cron_tick
BEGIN
    UPDATE change_clock SET value = value + 1;
    UPDATE pipeline_trigger_state SET change_mark = (SELECT value FROM change_clock) WHERE rowid = NEW.rowid;
END;

-- The managers' own bookkeeping is no change to the trigger-manager. A workflow-manager
-- renews the lease of every run it holds each cycle, a worker marks a long collection
-- alive, and the trigger-manager notes when it evaluated a pipeline: none of that alters
-- what the trigger-manager decides from, so none of it moves a change mark. A run's mark
-- moves when a column the evaluation reads changes (status, fingerprint, sub-group, step,
-- retries); a pipeline's trigger state only when its cron tick does.

DROP TRIGGER executed_reduction_step_change_mark ON executed_reduction_step;
CREATE TRIGGER executed_reduction_step_change_mark BEFORE INSERT ON executed_reduction_step
    FOR EACH ROW EXECUTE FUNCTION ccat_set_change_mark();
CREATE TRIGGER executed_reduction_step_change_mark_update BEFORE UPDATE ON executed_reduction_step
    FOR EACH ROW
    WHEN ((OLD.status, OLD.fingerprint, OLD.sub_group_key, OLD.reduction_step_id,
           OLD.retry_count, OLD.max_retries)
          IS DISTINCT FROM
          (NEW.status, NEW.fingerprint, NEW.sub_group_key, NEW.reduction_step_id,
           NEW.retry_count, NEW.max_retries))
    EXECUTE FUNCTION ccat_set_change_mark();

DROP TRIGGER pipeline_trigger_state_change_mark ON pipeline_trigger_state;
CREATE TRIGGER pipeline_trigger_state_change_mark BEFORE INSERT ON pipeline_trigger_state
    FOR EACH ROW EXECUTE FUNCTION ccat_set_change_mark();
CREATE TRIGGER pipeline_trigger_state_change_mark_update BEFORE UPDATE ON pipeline_trigger_state
    FOR EACH ROW WHEN (OLD.last_cron_tick IS DISTINCT FROM NEW.last_cron_tick)
    EXECUTE FUNCTION ccat_set_change_mark();

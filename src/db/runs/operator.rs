//! What an operator does to runs and pipelines (`ccat-wfm cancel`, `retry`, `enable`).

use chrono::Utc;

use super::super::{Database, DbError, on_pool};

impl Database {
    /// An operator's cancellation: any not-yet-finished run → CANCELLED.
    pub async fn cancel_run(&self, run_id: i64, reason: &str) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET status = 'CANCELLED', error_message = $2, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 \
                 WHERE id = $1 AND status IN ('PENDING', 'STAGING_DATA', 'SUBMITTED', 'RUNNING')",
            )
            .bind(run_id)
            .bind(reason)
            .bind(Utc::now())
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("cancelling a run"))
    }

    /// An operator's retry: a FAILED or CANCELLED run goes back to PENDING for one more
    /// attempt now, whatever its retries so far.
    pub async fn retry_run(&self, run_id: i64) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET status = 'PENDING', \
                 retry_count = retry_count + 1, \
                 max_retries = CASE WHEN max_retries < retry_count + 1 THEN retry_count + 1 \
                                    ELSE max_retries END, \
                 next_attempt_at = NULL, hpc_job_id = NULL, submitted_at = NULL, \
                 started_at = NULL, finished_at = NULL, error_message = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = $2 \
                 WHERE id = $1 AND status IN ('FAILED', 'CANCELLED')",
            )
            .bind(run_id)
            .bind(Utc::now())
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("retrying a run"))
    }

    /// Enables or disables a pipeline by name; false when there is no such pipeline.
    pub async fn set_pipeline_enabled(&self, name: &str, enabled: bool) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE pipeline SET enabled = $2, updated_at = $3 WHERE name = $1")
                .bind(name)
                .bind(enabled)
                .bind(Utc::now())
                .execute(pool)
                .await
                .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("enabling or disabling a pipeline"))
    }

    /// A run's status (None: no such run).
    pub async fn run_status(&self, run_id: i64) -> Result<Option<String>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar("SELECT status FROM executed_reduction_step WHERE id = $1")
                .bind(run_id)
                .fetch_optional(pool)
                .await
        })
        .map_err(DbError::query("reading a run's status"))
    }
}

//! The status transitions of a run's job (SPEC §3): submission, start, success, failure
//! with retries, cancellation handled, each one statement guarded by the status it
//! expects.

use chrono::{DateTime, Utc};

use super::super::outbox::{Handoff, insert_handoff};
use super::super::{Database, DbError, Dialect, on_pool};
use super::{ActiveJob, RunMetrics, retry_backoff, without_nul};

/// A run whose job is followed (a constant: only it is spliced in). The job id is empty
/// for a run with only a submission intent.
const ACTIVE_JOB: &str = "\
    SELECT r.id, r.status, COALESCE(r.hpc_job_id, '') AS hpc_job_id, \
           p.name AS pipeline_name, r.sub_group_key, s.name AS step_name, r.retry_count, \
           r.submitted_at, \
           NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                       WHERE d.depends_on_step_id = s.id) AS is_final \
    FROM executed_reduction_step r \
    JOIN reduction_step s ON s.id = r.reduction_step_id \
    JOIN pipeline p ON p.id = s.pipeline_id";

impl Database {
    /// Records the intent to submit, before the backend is called: from here on a
    /// restart looks for the job by its tag instead of submitting again.
    ///
    /// This is the submission's fence: it succeeds only while `owner` holds the run
    /// under a lease that has not expired by either clock, the database's or the
    /// caller's (`now`), and it extends the lease by `window` from then, so that no
    /// other instance takes the run over while the backend is called.
    pub async fn record_submit_intent(
        &self,
        run_id: i64,
        owner: &str,
        window: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let sql = match self.dialect() {
            Dialect::Postgres => {
                "UPDATE executed_reduction_step SET submitted_at = $3, updated_at = $3, \
                 lease_expires_at = GREATEST(now(), $3) + $4 * INTERVAL '1 millisecond' \
                 WHERE id = $1 AND status = 'STAGING_DATA' AND lease_owner = $2 \
                   AND lease_expires_at > GREATEST(now(), $3)"
            }
            // One host, one clock: the caller's.
            Dialect::Sqlite => {
                "UPDATE executed_reduction_step SET submitted_at = $3, updated_at = $3, \
                 lease_expires_at = $5 \
                 WHERE id = $1 AND status = 'STAGING_DATA' AND lease_owner = $2 \
                   AND lease_expires_at > $3"
            }
        };
        on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(run_id)
                .bind(owner)
                .bind(now)
                .bind(window.num_milliseconds() as f64)
                .bind(now + window)
                .execute(pool)
                .await
                .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("recording a submission"))
    }

    /// The job id a run records, if any.
    pub async fn run_job_id(&self, run_id: i64) -> Result<Option<String>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar("SELECT hpc_job_id FROM executed_reduction_step WHERE id = $1")
                .bind(run_id)
                .fetch_optional(pool)
                .await
        })
        .map(Option::flatten)
        .map_err(DbError::query("reading a run's job id"))
    }

    /// STAGING_DATA → SUBMITTED with the backend's job id; the lease ends.
    pub async fn record_submitted(
        &self,
        run_id: i64,
        owner: &str,
        job_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET status = 'SUBMITTED', hpc_job_id = $3, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = $4 \
                 WHERE id = $1 AND status = 'STAGING_DATA' AND lease_owner = $2",
            )
            .bind(run_id)
            .bind(owner)
            .bind(job_id)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("recording a submitted job"))
    }

    /// `expected` → FAILED with the reason (and metrics and log tail when a job ran);
    /// then, while retries are left, straight on to PENDING with the retry counted and
    /// the next attempt delayed by [`retry_backoff`] (SPEC §3). Returns the new status,
    /// or None when the run was no longer in `expected` (or, with `holder`, no longer
    /// held by it: an instance whose lease was taken over fails nothing).
    #[allow(clippy::too_many_arguments)]
    pub async fn fail_run(
        &self,
        run_id: i64,
        expected: &str,
        holder: Option<&str>,
        reason: &str,
        metrics: &RunMetrics,
        log_tail: Option<&str>,
        backoff_base: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, DbError> {
        let (retry_count, max_retries): (i32, i32) = match on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT retry_count, max_retries FROM executed_reduction_step WHERE id = $1",
            )
            .bind(run_id)
            .fetch_optional(pool)
            .await
        })
        .map_err(DbError::query("reading a run's retries"))?
        {
            Some(row) => row,
            None => return Ok(None),
        };
        let retry = retry_count < max_retries;
        let next_attempt = now + retry_backoff(backoff_base, retry_count);
        let status = if retry { "PENDING" } else { "FAILED" };
        let done = on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET status = $3, error_message = $4, \
                 log_tail = COALESCE($5, log_tail), exit_code = $6, wall_time_seconds = $7, \
                 cpu_hours = $8, peak_memory_gb = $9, finished_at = $10, updated_at = $10, \
                 lease_owner = NULL, lease_expires_at = NULL, \
                 retry_count = CASE WHEN $11 THEN retry_count + 1 ELSE retry_count END, \
                 next_attempt_at = CASE WHEN $11 THEN $12 ELSE next_attempt_at END, \
                 hpc_job_id = CASE WHEN $11 THEN NULL ELSE hpc_job_id END, \
                 submitted_at = CASE WHEN $11 THEN NULL ELSE submitted_at END \
                 WHERE id = $1 AND status = $2 \
                   AND (CAST($13 AS TEXT) IS NULL OR lease_owner = $13)",
            )
            .bind(run_id)
            .bind(expected)
            .bind(status)
            .bind(without_nul(reason))
            .bind(log_tail.map(without_nul))
            .bind(metrics.exit_code)
            .bind(metrics.wall_time_seconds)
            .bind(metrics.cpu_hours)
            .bind(metrics.peak_memory_gb)
            .bind(now)
            .bind(retry)
            .bind(next_attempt)
            .bind(holder)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("failing a run"))?;
        Ok(done.then(|| status.to_owned()))
    }

    /// Runs of a backend and processing location whose job is followed: SUBMITTED or
    /// RUNNING with a job id. Another location's jobs are another deployment's to follow.
    pub async fn active_jobs(
        &self,
        backend: &str,
        location: i64,
    ) -> Result<Vec<ActiveJob>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "{ACTIVE_JOB} WHERE r.hpc_backend = $1 AND r.status IN ('SUBMITTED', 'RUNNING') \
                     AND r.hpc_job_id IS NOT NULL AND p.processing_location_id = $2 ORDER BY r.id"
                )),
            )
            .bind(backend)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading active jobs"))
    }

    /// SUBMITTED → RUNNING.
    pub async fn mark_running(&self, run_id: i64, now: DateTime<Utc>) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET status = 'RUNNING', started_at = $2, \
                 updated_at = $2 WHERE id = $1 AND status = 'SUBMITTED'",
            )
            .bind(run_id)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("marking a run running"))
    }

    /// SUBMITTED/RUNNING → COLLECTING_RESULTS with the job's metrics, and, in the same
    /// transaction, the hand-off of its collection to a worker when one is given.
    pub async fn mark_job_succeeded(
        &self,
        run_id: i64,
        metrics: &RunMetrics,
        handoff: Option<&Handoff>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                let moved = sqlx::query(
                    "UPDATE executed_reduction_step SET status = 'COLLECTING_RESULTS', \
                     exit_code = $2, wall_time_seconds = $3, cpu_hours = $4, peak_memory_gb = $5, \
                     started_at = COALESCE(started_at, $6), updated_at = $6 \
                     WHERE id = $1 AND status IN ('SUBMITTED', 'RUNNING')",
                )
                .bind(run_id)
                .bind(metrics.exit_code)
                .bind(metrics.wall_time_seconds)
                .bind(metrics.cpu_hours)
                .bind(metrics.peak_memory_gb)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if moved && let Some(handoff) = handoff {
                    insert_handoff!(&mut *tx, handoff, now).await?;
                }
                tx.commit().await?;
                Ok(moved)
            }
            .await
        })
        .map_err(DbError::query("marking a job succeeded"))
    }

    /// Hands off again, with a new task, every collection at `location` that was handed
    /// to the workers before `cutoff` and is still not done: a message lost with Redis,
    /// or a worker killed while collecting, must not leave its run waiting for ever.
    /// Collection is idempotent, so a slow worker that finishes after all costs nothing.
    pub async fn redispatch_stale_collections(
        &self,
        location: i64,
        cutoff: DateTime<Utc>,
        now: DateTime<Utc>,
        handoff: impl Fn(i64) -> Handoff,
    ) -> Result<Vec<i64>, DbError> {
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                let stale: Vec<i64> = sqlx::query_scalar(
                    "UPDATE executed_reduction_step SET updated_at = $3 \
                     WHERE status = 'COLLECTING_RESULTS' AND updated_at < $2 \
                       AND reduction_step_id IN (SELECT s.id FROM reduction_step s \
                           JOIN pipeline p ON p.id = s.pipeline_id \
                           WHERE p.processing_location_id = $1) \
                     RETURNING id",
                )
                .bind(location)
                .bind(cutoff)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                for run_id in &stale {
                    insert_handoff!(&mut *tx, handoff(*run_id), now).await?;
                }
                tx.commit().await?;
                Ok(stale)
            }
            .await
        })
        .map_err(DbError::query("handing stale collections off again"))
    }

    /// Cancelled runs whose job may still run, not yet handled: CANCELLED with a job id,
    /// or with only a submission intent (the job id is then empty: a job submitted just
    /// before its submitter died is looked up by its tag).
    pub async fn cancelled_jobs(
        &self,
        backend: &str,
        location: i64,
    ) -> Result<Vec<ActiveJob>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "{ACTIVE_JOB} WHERE r.hpc_backend = $1 AND r.status = 'CANCELLED' \
                     AND (r.hpc_job_id IS NOT NULL OR r.submitted_at IS NOT NULL) \
                     AND r.finished_at IS NULL AND p.processing_location_id = $2 ORDER BY r.id"
                )),
            )
            .bind(backend)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading cancelled jobs"))
    }

    /// Records that a cancelled run's job was stopped (or found gone).
    pub async fn mark_cancel_done(&self, run_id: i64, now: DateTime<Utc>) -> Result<(), DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET finished_at = $2, updated_at = $2 \
                 WHERE id = $1 AND status = 'CANCELLED'",
            )
            .bind(run_id)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(DbError::query("recording a cancelled job"))
    }

    /// Run ids by status, for reports and tests.
    pub async fn run_statuses(&self) -> Result<Vec<(i64, String)>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as("SELECT id, status FROM executed_reduction_step ORDER BY id")
                .fetch_all(pool)
                .await
        })
        .map_err(DbError::query("reading run statuses"))
    }
}

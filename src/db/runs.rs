//! Runs after their creation: claiming with leases, staging, submission, job tracking
//! and the status transitions of SPEC §3. Every transition is one statement guarded by
//! the expected current status (and, while a workflow-manager holds the run, by its
//! lease), so two processes never both move the same run.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::outbox::{Handoff, insert_handoff};
use super::{Database, DbError, Dialect, on_pool};

/// Lease holder of a run handed to a Celery worker for submission, before its task id.
pub const DISPATCHED: &str = "celery:";

/// Statuses in which a run counts against its pipeline's `max_active_runs`.
const ACTIVE: &str = "('STAGING_DATA', 'SUBMITTED', 'RUNNING', 'COLLECTING_RESULTS')";

/// Query text with `{ids}` replaced by the dialect's expansion of the JSON list of ids
/// bound at `$1`. Only this constant fragment is spliced in, never a value.
pub(crate) fn with_ids(dialect: Dialect, text: &str) -> sqlx::AssertSqlSafe<String> {
    let ids = match dialect {
        Dialect::Postgres => {
            "(SELECT CAST(value AS BIGINT) FROM jsonb_array_elements_text($1::jsonb))"
        }
        Dialect::Sqlite => "(SELECT value FROM json_each($1))",
    };
    sqlx::AssertSqlSafe(text.replace("{ids}", ids).replace("{active}", ACTIVE))
}

/// Text from a job (its log, a reason quoting it) as PostgreSQL's TEXT takes it: NUL
/// bytes, which it refuses, become U+FFFD rather than costing the whole update.
fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

fn ids_json(ids: &[i64]) -> String {
    serde_json::to_string(ids).expect("ids serialise")
}

/// A registered copy of an earlier run's product (see `earlier_product_copies`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EarlierCopy {
    pub copy_id: i64,
    pub run_id: i64,
    pub relative_path: String,
    pub full_path: String,
}

/// What limits a claim.
#[derive(Debug, Clone)]
pub struct ClaimLimits<'a> {
    pub processing_location_id: i64,
    pub backend: &'a str,
    /// Most runs claimed in one call.
    pub batch: i64,
    /// Most runs of this backend in STAGING_DATA, SUBMITTED or RUNNING at once.
    pub max_active_jobs: i64,
}

/// A run in a workflow-manager's hands, with everything needed to stage and submit it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunWork {
    pub id: i64,
    pub reduction_step_id: i64,
    pub step_name: String,
    pub pipeline_id: i64,
    pub pipeline_name: String,
    pub processing_location_id: i64,
    pub sub_group_key: String,
    pub sub_group: Json<Value>,
    pub config_snapshot: Json<Value>,
    pub excluded_upstream: Json<Value>,
    pub retry_count: i32,
    pub max_retries: i32,
    /// Set when a submission was attempted (the intent); the job id follows.
    pub submitted_at: Option<DateTime<Utc>>,
    pub software_name: String,
    pub software_version: String,
    pub image_ref: String,
    pub image_digest: Option<String>,
    /// The software version's command as stored (a JSON list of strings when sound).
    pub command: super::pipelines::JsonText,
    pub cpu: i64,
    pub memory_gb: f64,
    pub time_hours: f64,
    /// No other step of the pipeline depends on this one: it writes to `output/`.
    pub is_final: bool,
}

impl RunWork {
    /// Attempts are numbered from 1; a retry is the next attempt.
    pub fn attempt(&self) -> i32 {
        self.retry_count + 1
    }
}

/// A raw data package a run reads, with the copy of it to use.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RawInput {
    pub raw_data_package_id: i64,
    pub name: String,
    pub size_bytes: i64,
    pub checksum: Option<String>,
    pub data_location_id: Option<i64>,
    pub full_path: Option<String>,
    /// The base path of the copy's data location, when it has one.
    pub location_base_path: Option<String>,
}

/// An upstream data product a run reads, with its copy at the processing location.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProductInput {
    pub data_product_id: i64,
    pub run_id: i64,
    pub name: String,
    pub product_type: String,
    pub relative_path: String,
    pub size_bytes: i64,
    pub checksum: String,
    pub full_path: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StagingJobRow {
    pub id: i64,
    pub status: String,
    pub failure_error_message: Option<String>,
}

/// A run whose job a manager follows.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveJob {
    pub id: i64,
    pub status: String,
    pub hpc_job_id: String,
    pub pipeline_name: String,
    pub sub_group_key: String,
    pub step_name: String,
    pub retry_count: i32,
    pub submitted_at: Option<DateTime<Utc>>,
    /// Whether the step is its pipeline's last (it writes to `output/`).
    pub is_final: bool,
}

/// How a job ended, as recorded on its run.
#[derive(Debug, Clone, Default)]
pub struct RunMetrics {
    pub exit_code: Option<i32>,
    pub wall_time_seconds: Option<f64>,
    pub cpu_hours: Option<f64>,
    pub peak_memory_gb: Option<f64>,
}

const RUN_WORK: &str = "\
    SELECT r.id, r.reduction_step_id, s.name AS step_name, p.id AS pipeline_id, \
           p.name AS pipeline_name, p.processing_location_id, r.sub_group_key, r.sub_group, \
           r.config_snapshot, r.excluded_upstream, r.retry_count, r.max_retries, r.submitted_at, \
           sw.name AS software_name, v.version AS software_version, v.image_ref, v.image_digest, \
           CAST(v.command AS TEXT) AS command, CAST(COALESCE(s.cpu, v.default_cpu) AS BIGINT) AS cpu, \
           CAST(COALESCE(s.memory_gb, v.default_memory_gb) AS DOUBLE PRECISION) AS memory_gb, \
           CAST(COALESCE(s.time_hours, v.default_time_hours) AS DOUBLE PRECISION) AS time_hours, \
           NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                       WHERE d.depends_on_step_id = s.id) AS is_final \
    FROM executed_reduction_step r \
    JOIN reduction_step s ON s.id = r.reduction_step_id \
    JOIN pipeline p ON p.id = s.pipeline_id \
    JOIN reduction_software_version v ON v.id = r.reduction_software_version_id \
    JOIN reduction_software sw ON sw.id = v.reduction_software_id";

impl Database {
    /// Claims PENDING runs that are due, highest pipeline priority first, within each
    /// pipeline's `max_active_runs` and the backend's active-job limit: moves them to
    /// STAGING_DATA under a lease of `owner`. Returns the ids claimed.
    ///
    /// On PostgreSQL the claim is one transaction serialised by an advisory lock (so
    /// concurrent managers never exceed a limit together), and rows another transaction
    /// holds are skipped (`FOR UPDATE SKIP LOCKED`), never waited for. SQLite has one
    /// writer at a time; the status guard keeps a run from being claimed twice.
    pub async fn claim_runs(
        &self,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
        limits: &ClaimLimits<'_>,
    ) -> Result<Vec<i64>, DbError> {
        const CANDIDATES: &str = "\
            WITH active AS ( \
                SELECT s.pipeline_id, COUNT(*) AS n FROM executed_reduction_step r \
                JOIN reduction_step s ON s.id = r.reduction_step_id \
                WHERE r.status IN {active} GROUP BY s.pipeline_id \
            ), candidates AS ( \
                SELECT r.id, p.priority, r.created_at, p.max_active_runs, \
                       COALESCE(a.n, 0) AS n_active, \
                       ROW_NUMBER() OVER (PARTITION BY p.id ORDER BY r.created_at, r.id) AS rank \
                FROM executed_reduction_step r \
                JOIN reduction_step s ON s.id = r.reduction_step_id \
                JOIN pipeline p ON p.id = s.pipeline_id \
                LEFT JOIN active a ON a.pipeline_id = p.id \
                WHERE r.status = 'PENDING' AND p.enabled AND p.processing_location_id = $1 \
                  AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= $2) \
                  AND NOT EXISTS (SELECT 1 FROM executed_reduction_step o \
                      WHERE o.reduction_step_id = r.reduction_step_id \
                        AND o.sub_group_key = r.sub_group_key AND o.id <> r.id \
                        AND (o.status IN {active} OR (o.status = 'PENDING' AND o.id < r.id))) \
            ) \
            SELECT id FROM candidates \
            WHERE max_active_runs IS NULL OR rank <= max_active_runs - n_active \
            ORDER BY priority DESC, created_at, id LIMIT $3";
        const BACKEND_ACTIVE: &str = "SELECT COUNT(*) FROM executed_reduction_step \
            WHERE hpc_backend = $1 AND status IN ('STAGING_DATA', 'SUBMITTED', 'RUNNING')";
        const CLAIM_PG: &str = "\
            UPDATE executed_reduction_step \
            SET status = 'STAGING_DATA', lease_owner = $2, lease_expires_at = $3, \
                hpc_backend = $4, hpc_job_id = NULL, submitted_at = NULL, updated_at = $5 \
            WHERE id IN (SELECT id FROM executed_reduction_step \
                         WHERE id IN {ids} AND status = 'PENDING' FOR UPDATE SKIP LOCKED) \
            RETURNING id";
        const CLAIM_SQLITE: &str = "\
            UPDATE executed_reduction_step \
            SET status = 'STAGING_DATA', lease_owner = $2, lease_expires_at = $3, \
                hpc_backend = $4, hpc_job_id = NULL, submitted_at = NULL, updated_at = $5 \
            WHERE id IN {ids} AND status = 'PENDING' \
            RETURNING id";
        let what = DbError::query("claiming pending runs");
        macro_rules! claim {
            ($conn:expr, $claim_sql:expr) => {{
                let active: i64 = sqlx::query_scalar(BACKEND_ACTIVE)
                    .bind(limits.backend)
                    .fetch_one(&mut *$conn)
                    .await?;
                let room = (limits.max_active_jobs - active).min(limits.batch);
                if room <= 0 {
                    Ok(Vec::new())
                } else {
                    let ids: Vec<i64> = sqlx::query_scalar(with_ids(self.dialect(), CANDIDATES))
                        .bind(limits.processing_location_id)
                        .bind(now)
                        .bind(room)
                        .fetch_all(&mut *$conn)
                        .await?;
                    if ids.is_empty() {
                        Ok(Vec::new())
                    } else {
                        let mut claimed: Vec<i64> =
                            sqlx::query_scalar(with_ids(self.dialect(), $claim_sql))
                                .bind(ids_json(&ids))
                                .bind(owner)
                                .bind(lease_until)
                                .bind(limits.backend)
                                .bind(now)
                                .fetch_all(&mut *$conn)
                                .await?;
                        claimed.sort_unstable();
                        Ok(claimed)
                    }
                }
            }};
        }
        match self {
            Database::Postgres(pool) => {
                let result: Result<Vec<i64>, sqlx::Error> = async {
                    let mut tx = pool.begin().await?;
                    // One claimer at a time, so the limits hold across managers.
                    sqlx::query("SELECT pg_advisory_xact_lock(7419283)")
                        .execute(&mut *tx)
                        .await?;
                    let claimed: Result<Vec<i64>, sqlx::Error> = claim!(tx, CLAIM_PG);
                    let claimed = claimed?;
                    tx.commit().await?;
                    Ok(claimed)
                }
                .await;
                result.map_err(what)
            }
            Database::Sqlite(pool) => {
                let result: Result<Vec<i64>, sqlx::Error> = async {
                    let mut conn = pool.acquire().await?;
                    claim!(conn, CLAIM_SQLITE)
                }
                .await;
                result.map_err(what)
            }
        }
    }

    /// Owners of leases on runs in STAGING_DATA other than `owner` (to find dead ones).
    pub async fn lease_owners(&self, owner: &str) -> Result<Vec<String>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT DISTINCT lease_owner FROM executed_reduction_step \
                 WHERE status = 'STAGING_DATA' AND lease_owner IS NOT NULL AND lease_owner <> $1",
            )
            .bind(owner)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading lease owners"))
    }

    /// Renews `owner`'s leases and takes over those that expired or whose owner is
    /// known dead. Returns the runs `owner` now holds, oldest first.
    pub async fn hold_staging_runs(
        &self,
        owner: &str,
        dead_owners: &[String],
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Vec<RunWork>, DbError> {
        let dead = serde_json::to_string(dead_owners).expect("names serialise");
        let renew = match self.dialect() {
            Dialect::Postgres => {
                "UPDATE executed_reduction_step SET lease_owner = $1, lease_expires_at = $2 \
                 WHERE status = 'STAGING_DATA' AND (lease_owner = $1 OR lease_owner IS NULL \
                   OR lease_expires_at < $3 \
                   OR lease_owner IN (SELECT value FROM jsonb_array_elements_text($4::jsonb)))"
            }
            Dialect::Sqlite => {
                "UPDATE executed_reduction_step SET lease_owner = $1, lease_expires_at = $2 \
                 WHERE status = 'STAGING_DATA' AND (lease_owner = $1 OR lease_owner IS NULL \
                   OR lease_expires_at < $3 \
                   OR lease_owner IN (SELECT value FROM json_each($4)))"
            }
        };
        let select = sqlx::AssertSqlSafe(format!(
            "{RUN_WORK} WHERE r.status = 'STAGING_DATA' AND r.lease_owner = $1 ORDER BY r.id"
        ));
        on_pool!(self, pool => {
            sqlx::query(renew)
                .bind(owner)
                .bind(lease_until)
                .bind(now)
                .bind(&dead)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(DbError::query("renewing leases"))?;
        on_pool!(self, pool => {
            sqlx::query_as(select).bind(owner).fetch_all(pool).await
        })
        .map_err(DbError::query("holding runs in staging"))
    }

    /// One run with everything needed to plan its job, whatever its status.
    pub async fn run_work(&self, run_id: i64) -> Result<Option<RunWork>, DbError> {
        let select = sqlx::AssertSqlSafe(format!("{RUN_WORK} WHERE r.id = $1"));
        on_pool!(self, pool => {
            sqlx::query_as(select).bind(run_id).fetch_optional(pool).await
        })
        .map_err(DbError::query("reading a run"))
    }

    /// The raw inputs of a run with, for each, its copy at `location` when there is
    /// one, else any present copy (lowest location id first).
    pub async fn run_raw_input_copies(
        &self,
        run_id: i64,
        location: i64,
    ) -> Result<Vec<RawInput>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT p.id AS raw_data_package_id, p.name, p.size_bytes, p.checksum, \
                        c.data_location_id, c.full_path, l.base_path AS location_base_path \
                 FROM executed_reduction_step_raw_input i \
                 JOIN raw_data_package p ON p.id = i.raw_data_package_id \
                 LEFT JOIN physical_copy c ON c.id = ( \
                     SELECT c2.id FROM physical_copy c2 \
                     WHERE c2.raw_data_package_id = p.id AND c2.status IN ('PRESENT', 'STAGED') \
                     ORDER BY CASE WHEN c2.data_location_id = $2 THEN 0 ELSE 1 END, \
                              c2.data_location_id, c2.id LIMIT 1) \
                 LEFT JOIN data_location l ON l.id = c.data_location_id \
                 WHERE i.executed_reduction_step_id = $1 ORDER BY p.id",
            )
            .bind(run_id)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading a run's input copies"))
    }

    /// The upstream products a run reads, with their copies at `location`.
    pub async fn run_product_input_copies(
        &self,
        run_id: i64,
        location: i64,
    ) -> Result<Vec<ProductInput>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT d.id AS data_product_id, d.executed_reduction_step_id AS run_id, d.name, \
                        d.product_type, d.relative_path, d.size_bytes, d.checksum, c.full_path \
                 FROM executed_reduction_step_product_input i \
                 JOIN data_product d ON d.id = i.data_product_id \
                 LEFT JOIN physical_copy c ON c.id = ( \
                     SELECT c2.id FROM physical_copy c2 \
                     WHERE c2.data_product_id = d.id AND c2.data_location_id = $2 \
                       AND c2.status IN ('PRESENT', 'STAGED') ORDER BY c2.id LIMIT 1) \
                 WHERE i.executed_reduction_step_id = $1 ORDER BY d.id",
            )
            .bind(run_id)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading a run's upstream products"))
    }

    /// The copies at `location` of the products of the other runs of a run's step and
    /// sub-group: what may sit in the output directory the run is about to write to.
    pub async fn earlier_product_copies(
        &self,
        run_id: i64,
        location: i64,
    ) -> Result<Vec<EarlierCopy>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT c.id AS copy_id, d.executed_reduction_step_id AS run_id, \
                        d.relative_path, c.full_path \
                 FROM executed_reduction_step r \
                 JOIN executed_reduction_step o ON o.reduction_step_id = r.reduction_step_id \
                      AND o.sub_group_key = r.sub_group_key AND o.id <> r.id \
                 JOIN data_product d ON d.executed_reduction_step_id = o.id \
                 JOIN physical_copy c ON c.data_product_id = d.id AND c.data_location_id = $2 \
                 WHERE r.id = $1 ORDER BY c.id",
            )
            .bind(run_id)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query(
            "reading the products of a sub-group's earlier runs",
        ))
    }

    /// Points a product's copy at the place its file was moved to.
    pub async fn move_product_copy(&self, copy_id: i64, full_path: &str) -> Result<(), DbError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE physical_copy SET full_path = $2 WHERE id = $1")
                .bind(copy_id)
                .bind(full_path)
                .execute(pool)
                .await
                .map(|_| ())
        })
        .map_err(DbError::query("recording a product's new place"))
    }

    /// The newest staging job of a run.
    pub async fn staging_job_of_run(&self, run_id: i64) -> Result<Option<StagingJobRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, status, failure_error_message FROM staging_job \
                 WHERE executed_reduction_step_id = $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(run_id)
            .fetch_optional(pool)
            .await
        })
        .map_err(DbError::query("reading a run's staging job"))
    }

    /// Asks data-transfer to bring `packages` to `location` for a run: one StagingJob
    /// with its packages, in one transaction.
    pub async fn create_staging_job(
        &self,
        run_id: i64,
        location: i64,
        packages: &[i64],
    ) -> Result<i64, DbError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO staging_job (destination_data_location_id, \
                     executed_reduction_step_id, status, created_at, updated_at) \
                     VALUES ($1, $2, 'PENDING', $3, $3) RETURNING id",
                )
                .bind(location)
                .bind(run_id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                for package in packages {
                    sqlx::query(
                        "INSERT INTO staging_job_raw_data_package \
                         (staging_job_id, raw_data_package_id) VALUES ($1, $2)",
                    )
                    .bind(id)
                    .bind(package)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(id)
            }
            .await
        })
        .map_err(DbError::query("creating a staging job"))
    }

    /// Records the intent to submit, before the backend is called: from here on a
    /// restart looks for the job by its tag instead of submitting again.
    pub async fn record_submit_intent(
        &self,
        run_id: i64,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET submitted_at = $3, updated_at = $3 \
                 WHERE id = $1 AND status = 'STAGING_DATA' AND lease_owner = $2",
            )
            .bind(run_id)
            .bind(owner)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("recording a submission"))
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
    /// or None when the run was no longer in `expected`.
    #[allow(clippy::too_many_arguments)]
    pub async fn fail_run(
        &self,
        run_id: i64,
        expected: &str,
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
                 WHERE id = $1 AND status = $2",
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
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("failing a run"))?;
        Ok(done.then(|| status.to_owned()))
    }

    /// Runs of a backend whose job is followed: SUBMITTED or RUNNING with a job id.
    pub async fn active_jobs(&self, backend: &str) -> Result<Vec<ActiveJob>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, r.status, r.hpc_job_id, p.name AS pipeline_name, r.sub_group_key, \
                        s.name AS step_name, r.retry_count, r.submitted_at, \
                        NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                                    WHERE d.depends_on_step_id = s.id) AS is_final \
                 FROM executed_reduction_step r \
                 JOIN reduction_step s ON s.id = r.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 WHERE r.hpc_backend = $1 AND r.status IN ('SUBMITTED', 'RUNNING') \
                   AND r.hpc_job_id IS NOT NULL ORDER BY r.id",
            )
            .bind(backend)
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

    /// Hands a run whose inputs are ready to a worker for submission: its lease passes
    /// from `owner` to the hand-off (`celery:<task id>`, until `lease_until`) and the
    /// hand-off is recorded, in one transaction. Should the message never be worked, the
    /// lease expires and a workflow-manager takes the run back.
    pub async fn dispatch_submission(
        &self,
        run_id: i64,
        owner: &str,
        handoff: &Handoff,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let holder = format!("{DISPATCHED}{}", handoff.task_id);
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                let moved = sqlx::query(
                    "UPDATE executed_reduction_step SET lease_owner = $3, lease_expires_at = $4, \
                     updated_at = $5 WHERE id = $1 AND status = 'STAGING_DATA' AND lease_owner = $2",
                )
                .bind(run_id)
                .bind(owner)
                .bind(&holder)
                .bind(lease_until)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if moved {
                    insert_handoff!(&mut *tx, handoff, now).await?;
                }
                tx.commit().await?;
                Ok(moved)
            }
            .await
        })
        .map_err(DbError::query("handing a submission to a worker"))
    }

    /// A worker takes a run handed to it (or whose lease expired) under its own lease.
    pub async fn take_dispatched_run(
        &self,
        run_id: i64,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let dispatched = format!("{DISPATCHED}%");
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET lease_owner = $2, lease_expires_at = $3 \
                 WHERE id = $1 AND status = 'STAGING_DATA' \
                   AND (lease_owner LIKE $5 OR lease_owner = $2 OR lease_expires_at < $4)",
            )
            .bind(run_id)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(&dispatched)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("taking a handed-off run"))
    }

    /// Cancelled runs whose job may still run: CANCELLED, a job id, not yet handled.
    pub async fn cancelled_jobs(&self, backend: &str) -> Result<Vec<ActiveJob>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, r.status, r.hpc_job_id, p.name AS pipeline_name, r.sub_group_key, \
                        s.name AS step_name, r.retry_count, r.submitted_at, \
                        NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                                    WHERE d.depends_on_step_id = s.id) AS is_final \
                 FROM executed_reduction_step r \
                 JOIN reduction_step s ON s.id = r.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 WHERE r.hpc_backend = $1 AND r.status = 'CANCELLED' \
                   AND r.hpc_job_id IS NOT NULL AND r.finished_at IS NULL ORDER BY r.id",
            )
            .bind(backend)
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

/// Delay before retry number `retry_count + 1`: `base`, doubling with each retry, at
/// most an hour (or `base` when that is longer).
pub fn retry_backoff(base: chrono::Duration, retry_count: i32) -> chrono::Duration {
    let factor = 1i32 << retry_count.clamp(0, 10);
    (base * factor).min(chrono::Duration::hours(1).max(base))
}

/// A run waiting for collection.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CollectRun {
    pub id: i64,
    pub pipeline_name: String,
    pub sub_group_key: String,
    pub step_name: String,
    pub retry_count: i32,
    pub processing_location_id: i64,
    pub is_final: bool,
}

/// A product to register.
#[derive(Debug, Clone)]
pub struct NewProduct<'a> {
    pub name: &'a str,
    pub product_type: &'a str,
    pub relative_path: &'a str,
    pub full_path: &'a str,
    pub size_bytes: i64,
    pub checksum: &'a str,
    pub quality_metrics: Option<&'a Value>,
}

impl Database {
    /// Runs whose job succeeded and whose outputs wait to be collected, at `location`.
    pub async fn collecting_runs(&self, location: i64) -> Result<Vec<CollectRun>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, p.name AS pipeline_name, r.sub_group_key, s.name AS step_name, \
                        r.retry_count, p.processing_location_id, \
                        NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                                    WHERE d.depends_on_step_id = s.id) AS is_final \
                 FROM executed_reduction_step r \
                 JOIN reduction_step s ON s.id = r.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 WHERE r.status = 'COLLECTING_RESULTS' AND p.processing_location_id = $1 \
                 ORDER BY r.id",
            )
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading runs to collect"))
    }

    /// One run waiting for collection, by id (a worker's hand-off).
    pub async fn collecting_run(&self, run_id: i64) -> Result<Option<CollectRun>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, p.name AS pipeline_name, r.sub_group_key, s.name AS step_name, \
                        r.retry_count, p.processing_location_id, \
                        NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                                    WHERE d.depends_on_step_id = s.id) AS is_final \
                 FROM executed_reduction_step r \
                 JOIN reduction_step s ON s.id = r.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 WHERE r.status = 'COLLECTING_RESULTS' AND r.id = $1",
            )
            .bind(run_id)
            .fetch_optional(pool)
            .await
        })
        .map_err(DbError::query("reading a run to collect"))
    }

    /// Registers a run's products and their copies at `location` and completes the run,
    /// in one transaction: a crash leaves nothing half-registered, and a run another
    /// collector completed first is left alone (false).
    pub async fn register_outputs(
        &self,
        run_id: i64,
        location: i64,
        products: &[NewProduct<'_>],
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                let completed = sqlx::query(
                    "UPDATE executed_reduction_step SET status = 'COMPLETED', finished_at = $2, \
                     updated_at = $2, error_message = $3 \
                     WHERE id = $1 AND status = 'COLLECTING_RESULTS'",
                )
                .bind(run_id)
                .bind(now)
                .bind(note)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if completed != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                for product in products {
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO data_product (executed_reduction_step_id, name, product_type, \
                         relative_path, size_bytes, checksum, quality_metrics, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    )
                    .bind(run_id)
                    .bind(product.name)
                    .bind(product.product_type)
                    .bind(product.relative_path)
                    .bind(product.size_bytes)
                    .bind(product.checksum)
                    .bind(product.quality_metrics.map(Json))
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO physical_copy (data_location_id, data_product_id, full_path, \
                         status, created_at) VALUES ($1, $2, $3, 'PRESENT', $4)",
                    )
                    .bind(location)
                    .bind(id)
                    .bind(product.full_path)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(true)
            }
            .await
        })
        .map_err(DbError::query("registering a run's outputs"))
    }
}

/// Runs of one pipeline in one status.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StatusCount {
    pub pipeline: String,
    pub enabled: bool,
    pub status: Option<String>,
    pub runs: i64,
}

/// Runs of one step in one status.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StepCount {
    pub step: String,
    pub status: Option<String>,
    pub runs: i64,
}

/// A run in flight, or one that failed, as `ccat-wfm status` lists it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct RunSummary {
    pub id: i64,
    pub pipeline: String,
    pub step: String,
    pub sub_group_key: String,
    pub status: String,
    pub hpc_backend: Option<String>,
    pub hpc_job_id: Option<String>,
    pub retry_count: i32,
    pub updated_at: DateTime<Utc>,
    pub error_message: Option<String>,
}

const RUN_SUMMARY: &str = "\
    SELECT r.id, p.name AS pipeline, s.name AS step, r.sub_group_key, r.status, \
           r.hpc_backend, r.hpc_job_id, r.retry_count, r.updated_at, r.error_message \
    FROM executed_reduction_step r \
    JOIN reduction_step s ON s.id = r.reduction_step_id \
    JOIN pipeline p ON p.id = s.pipeline_id";

impl Database {
    /// Run counts per pipeline and status (every pipeline, even without runs).
    pub async fn status_counts(&self) -> Result<Vec<StatusCount>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT p.name AS pipeline, p.enabled, r.status, COUNT(r.id) AS runs \
                 FROM pipeline p \
                 LEFT JOIN reduction_step s ON s.pipeline_id = p.id \
                 LEFT JOIN executed_reduction_step r ON r.reduction_step_id = s.id \
                 GROUP BY p.name, p.enabled, r.status ORDER BY p.name, r.status",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("counting runs per pipeline"))
    }

    /// Run counts per step (in step order) and status of one pipeline, every step even
    /// without runs.
    pub async fn step_status_counts(&self, pipeline: &str) -> Result<Vec<StepCount>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.name AS step, r.status, COUNT(r.id) AS runs \
                 FROM pipeline p JOIN reduction_step s ON s.pipeline_id = p.id \
                 LEFT JOIN executed_reduction_step r ON r.reduction_step_id = s.id \
                 WHERE p.name = $1 GROUP BY s.id, s.name, r.status ORDER BY s.id, r.status",
            )
            .bind(pipeline)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("counting runs per step"))
    }

    /// Runs in flight (staging, submitted, running, collecting), oldest change first.
    pub async fn active_runs(&self, limit: i64) -> Result<Vec<RunSummary>, DbError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{RUN_SUMMARY} WHERE r.status IN ('STAGING_DATA', 'SUBMITTED', 'RUNNING', \
             'COLLECTING_RESULTS') ORDER BY r.updated_at, r.id LIMIT $1"
        ));
        on_pool!(self, pool => {
            sqlx::query_as(sql).bind(limit).fetch_all(pool).await
        })
        .map_err(DbError::query("listing active runs"))
    }

    /// The most recent failures (FAILED for good), newest first.
    pub async fn recent_failures(&self, limit: i64) -> Result<Vec<RunSummary>, DbError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{RUN_SUMMARY} WHERE r.status = 'FAILED' ORDER BY r.updated_at DESC, r.id DESC LIMIT $1"
        ));
        on_pool!(self, pool => {
            sqlx::query_as(sql).bind(limit).fetch_all(pool).await
        })
        .map_err(DbError::query("listing failed runs"))
    }
}

/// Everything about one run, as `ccat-wfm runs show` prints it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct RunDetail {
    pub id: i64,
    pub pipeline: String,
    pub step: String,
    pub sub_group_key: String,
    pub sub_group: Json<Value>,
    pub fingerprint: String,
    pub status: String,
    pub software: String,
    pub software_version: String,
    pub image_ref: String,
    pub config_snapshot: Json<Value>,
    pub excluded_upstream: Json<Value>,
    pub hpc_backend: Option<String>,
    pub hpc_job_id: Option<String>,
    pub retry_count: i32,
    pub max_retries: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub wall_time_seconds: Option<f64>,
    pub cpu_hours: Option<f64>,
    pub peak_memory_gb: Option<f64>,
    pub error_message: Option<String>,
    pub log_tail: Option<String>,
    pub created_at: DateTime<Utc>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Database {
    pub async fn run_detail(&self, run_id: i64) -> Result<Option<RunDetail>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, p.name AS pipeline, s.name AS step, r.sub_group_key, r.sub_group, \
                        r.fingerprint, r.status, sw.name AS software, v.version AS software_version, \
                        v.image_ref, r.config_snapshot, r.excluded_upstream, r.hpc_backend, \
                        r.hpc_job_id, r.retry_count, r.max_retries, r.next_attempt_at, r.exit_code, \
                        r.wall_time_seconds, r.cpu_hours, r.peak_memory_gb, r.error_message, \
                        r.log_tail, r.created_at, r.submitted_at, r.started_at, r.finished_at \
                 FROM executed_reduction_step r \
                 JOIN reduction_step s ON s.id = r.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 JOIN reduction_software_version v ON v.id = r.reduction_software_version_id \
                 JOIN reduction_software sw ON sw.id = v.reduction_software_id \
                 WHERE r.id = $1",
            )
            .bind(run_id)
            .fetch_optional(pool)
            .await
        })
        .map_err(DbError::query("reading a run"))
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
}

impl Database {
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
}

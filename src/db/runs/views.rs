//! Runs as `ccat-wfm status` and `runs show` present them.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::super::{Database, DbError, on_pool};

/// Runs of one pipeline in one status.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StatusCount {
    pub pipeline: String,
    pub enabled: bool,
    pub status: Option<String>,
    pub runs: i64,
}

/// Runs of one step in one status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
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
}

//! Runs after their creation: claiming with leases, staging, submission, job tracking
//! and the status transitions of SPEC §3. Every transition is one statement guarded by
//! the expected current status (and, while a workflow-manager holds the run, by its
//! lease), so two processes never both move the same run.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

mod lease;
mod operator;
mod products;
mod staging;
mod transitions;
mod views;

pub use products::{CollectRun, NewProduct};
pub use views::{RunDetail, RunSummary, StatusCount, StepCount};

/// Lease holder of a run handed to a Celery worker for submission, before its task id.
pub const DISPATCHED: &str = "celery:";

pub(crate) use super::with_ids;

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

/// Delay before retry number `retry_count + 1`: `base`, doubling with each retry, at
/// most an hour (or `base` when that is longer).
pub fn retry_backoff(base: chrono::Duration, retry_count: i32) -> chrono::Duration {
    let factor = 1i32 << retry_count.clamp(0, 10);
    (base * factor).min(chrono::Duration::hours(1).max(base))
}

//! Collection: the runs whose job succeeded, and their outputs registered as data
//! products with their copies, atomically with completing the run.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::super::{Database, DbError, on_pool};

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
    pub allow_empty_output: bool,
    /// What the job's backend measured (kept when the collection fails the run).
    pub exit_code: Option<i32>,
    pub wall_time_seconds: Option<f64>,
    pub cpu_hours: Option<f64>,
    pub peak_memory_gb: Option<f64>,
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

/// A run to collect, with what its collection needs (a constant: only it is spliced in).
const COLLECT_RUN: &str = "\
    SELECT r.id, p.name AS pipeline_name, r.sub_group_key, s.name AS step_name, \
           r.retry_count, p.processing_location_id, s.allow_empty_output, \
           r.exit_code, r.wall_time_seconds, r.cpu_hours, r.peak_memory_gb, \
           NOT EXISTS (SELECT 1 FROM reduction_step_dependency d \
                       WHERE d.depends_on_step_id = s.id) AS is_final \
    FROM executed_reduction_step r \
    JOIN reduction_step s ON s.id = r.reduction_step_id \
    JOIN pipeline p ON p.id = s.pipeline_id";

impl Database {
    /// Runs whose job succeeded and whose outputs wait to be collected, at `location`.
    pub async fn collecting_runs(&self, location: i64) -> Result<Vec<CollectRun>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "{COLLECT_RUN} WHERE r.status = 'COLLECTING_RESULTS' \
                     AND p.processing_location_id = $1 ORDER BY r.id"
                )),
            )
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading runs to collect"))
    }

    /// One run of `location` waiting for collection, by id (a worker's hand-off; a run of
    /// another location is another deployment's to collect).
    pub async fn collecting_run(
        &self,
        run_id: i64,
        location: i64,
    ) -> Result<Option<CollectRun>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                sqlx::AssertSqlSafe(format!(
                    "{COLLECT_RUN} WHERE r.status = 'COLLECTING_RESULTS' AND r.id = $1 \
                     AND p.processing_location_id = $2"
                )),
            )
            .bind(run_id)
            .bind(location)
            .fetch_optional(pool)
            .await
        })
        .map_err(DbError::query("reading a run to collect"))
    }

    /// Marks a collection in progress alive (its hand-off is not stale).
    pub async fn renew_collection(&self, run_id: i64, now: DateTime<Utc>) -> Result<(), DbError> {
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET updated_at = $2 \
                 WHERE id = $1 AND status = 'COLLECTING_RESULTS'",
            )
            .bind(run_id)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        })
        .map_err(DbError::query("renewing a collection"))
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

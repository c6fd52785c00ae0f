//! What a held run needs before its job can start: its rows, its inputs' copies, the
//! earlier products in its output directory, and data-transfer's staging jobs.

use chrono::Utc;

use super::super::{Database, DbError, on_pool};
use super::{EarlierCopy, ProductInput, RUN_WORK, RawInput, RunWork, StagingJobRow};

impl Database {
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
}

//! What changed since a reader last looked: the change marks and tombstones that
//! `migrations/*/0003_change_tracking.sql` keeps (see there for why they are exact).

use chrono::{DateTime, Utc};

use super::{Database, DbError, on_pool};

/// What was written at or after a horizon, for the trigger-manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Packages written, or joined to a filterable row written, since the horizon, sorted.
    pub packages: Vec<i64>,
    /// Packages deleted since the horizon.
    pub deleted_packages: Vec<i64>,
    /// `(step, sub-group key)` of runs written since the horizon.
    pub runs: Vec<(i64, String)>,
    /// A run was deleted: the reader cannot tell which sub-groups that touched.
    pub runs_deleted: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
            && self.deleted_packages.is_empty()
            && self.runs.is_empty()
            && !self.runs_deleted
    }
}

impl Database {
    /// The horizon to take before reading: every write below it is visible to the reads
    /// that follow; writes at or above it are reported again by [`Database::changes_since`].
    pub async fn change_horizon(&self) -> Result<i64, DbError> {
        match self {
            Database::Postgres(pool) => {
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                    .fetch_one(pool)
                    .await
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar("SELECT value + 1 FROM change_clock WHERE id = 1")
                    .fetch_one(pool)
                    .await
            }
        }
        .map_err(DbError::query("reading the change horizon"))
    }

    /// Everything written at or after `horizon`.
    pub async fn changes_since(&self, horizon: i64) -> Result<Changes, DbError> {
        let packages = self.changed_packages(horizon).await?;
        let (deleted_packages, runs_deleted, runs) = on_pool!(self, pool => {
            let tombstones: Vec<(String, i64)> = sqlx::query_as(
                "SELECT table_name, row_id FROM change_tombstone \
                 WHERE change_mark >= $1 AND table_name IN ('raw_data_package', 'executed_reduction_step')",
            )
            .bind(horizon)
            .fetch_all(pool)
            .await
            .map_err(DbError::query("reading deletions"))?;
            let runs: Vec<(i64, String)> = sqlx::query_as(
                "SELECT reduction_step_id, sub_group_key FROM executed_reduction_step \
                 WHERE change_mark >= $1",
            )
            .bind(horizon)
            .fetch_all(pool)
            .await
            .map_err(DbError::query("finding changed runs"))?;
            let deleted: Vec<i64> = tombstones
                .iter()
                .filter(|(t, _)| t == "raw_data_package")
                .map(|(_, id)| *id)
                .collect();
            let runs_deleted = tombstones.iter().any(|(t, _)| t == "executed_reduction_step");
            Ok::<_, DbError>((deleted, runs_deleted, runs))
        })?;
        Ok(Changes {
            packages,
            deleted_packages,
            runs,
            runs_deleted,
        })
    }

    /// Forgets deletions older than `before`; a reader that slept longer starts afresh.
    pub async fn prune_tombstones(&self, before: DateTime<Utc>) -> Result<u64, DbError> {
        on_pool!(self, pool => {
            sqlx::query("DELETE FROM change_tombstone WHERE deleted_at < $1")
                .bind(before)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        })
        .map_err(DbError::query("pruning deletions"))
    }
}

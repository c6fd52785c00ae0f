//! What changed since a reader last looked: the change marks and tombstones that
//! `migrations/*/0003_change_tracking.sql` keeps (see there for why they are exact).

use chrono::{DateTime, Utc};

use sqlx::Row;

use super::filter_sql::FILTER_TABLES;
use super::{Database, DbError, Dialect, on_pool};

/// What was written at or after a horizon, for the trigger-manager.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Packages written, or joined to a filterable row written, since the horizon, sorted.
    pub packages: Vec<i64>,
    /// Packages deleted since the horizon.
    pub deleted_packages: Vec<i64>,
    /// `(step, sub-group key)` of runs written since the horizon.
    pub runs: Vec<(i64, String)>,
    /// A run was deleted whose tombstone does not say which sub-group it belonged to
    /// (one written before migration 0007): the reader must start afresh. Tombstones
    /// that say so add their `(step, sub-group)` to [`Self::runs`].
    pub runs_deleted: bool,
}

/// The newest change marks, read in one query together with a new horizon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeMarks {
    /// The horizon to keep for the next cycle: every write below it is visible to the
    /// reads that follow; writes at or above it are reported again next cycle.
    pub horizon: i64,
    /// Newest mark of the packages and of each table their selection joins, in the
    /// order of [`FILTER_TABLES`].
    pub filter_tables: [Option<i64>; 7],
    pub runs: Option<i64>,
    /// Newest mark of the pipeline definitions and trigger requests and state.
    pub definitions: Option<i64>,
    pub tombstones: Option<i64>,
}

impl ChangeMarks {
    fn at_or_after(mark: Option<i64>, horizon: i64) -> bool {
        mark.is_some_and(|m| m >= horizon)
    }
    /// Whether packages, runs or deletions may have changed since `horizon`.
    pub fn data_changed_since(&self, horizon: i64) -> bool {
        !self.filter_tables_changed_since(horizon).is_empty()
            || Self::at_or_after(self.runs, horizon)
            || Self::at_or_after(self.tombstones, horizon)
    }
    /// The filter tables written since `horizon`.
    pub fn filter_tables_changed_since(&self, horizon: i64) -> Vec<&'static str> {
        FILTER_TABLES
            .iter()
            .zip(self.filter_tables)
            .filter(|(_, mark)| Self::at_or_after(*mark, horizon))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Whether definitions (or anything deleted) may have changed since `horizon`.
    pub fn definitions_changed_since(&self, horizon: i64) -> bool {
        Self::at_or_after(self.definitions, horizon) || Self::at_or_after(self.tombstones, horizon)
    }
}

/// One statement, no parameters (so its plan is made once per connection): the horizon
/// and the newest mark of each tracked table, each an index lookup or a tiny table's scan.
const MARKS: &str = "SELECT {horizon}, \
    (SELECT MAX(change_mark) FROM raw_data_package), \
    (SELECT MAX(change_mark) FROM executed_obs_unit), \
    (SELECT MAX(change_mark) FROM obs_unit), \
    (SELECT MAX(change_mark) FROM source), \
    (SELECT MAX(change_mark) FROM line), \
    (SELECT MAX(change_mark) FROM instrument_module), \
    (SELECT MAX(change_mark) FROM instrument), \
    (SELECT MAX(change_mark) FROM executed_reduction_step), \
    (SELECT MAX(m) FROM ( \
       SELECT MAX(change_mark) AS m FROM data_grouping UNION ALL \
       SELECT MAX(change_mark) FROM pipeline UNION ALL \
       SELECT MAX(change_mark) FROM reduction_step UNION ALL \
       SELECT MAX(change_mark) FROM reduction_step_config UNION ALL \
       SELECT MAX(change_mark) FROM reduction_step_dependency UNION ALL \
       SELECT MAX(change_mark) FROM reduction_software_version UNION ALL \
       SELECT MAX(change_mark) FROM trigger_request UNION ALL \
       SELECT MAX(change_mark) FROM pipeline_trigger_state) d), \
    (SELECT MAX(change_mark) FROM change_tombstone)";

/// The oldest transaction of the server that holds back the horizon.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenTransaction {
    pub pid: i32,
    pub database: Option<String>,
    pub age_seconds: f64,
    pub query_start: Option<DateTime<Utc>>,
    pub state: Option<String>,
    pub query: Option<String>,
}

impl std::fmt::Display for OpenTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend pid {} (database {}, {}) in a transaction for {:.0} s; its last query{}: {}",
            self.pid,
            self.database.as_deref().unwrap_or("?"),
            self.state.as_deref().unwrap_or("?"),
            self.age_seconds,
            self.query_start
                .map(|t| format!(" started {}", t.to_rfc3339()))
                .unwrap_or_default(),
            self.query.as_deref().unwrap_or("?")
        )
    }
}

impl Database {
    /// The server's oldest open transaction other than ours (PostgreSQL; None on SQLite,
    /// whose one writer at a time cannot pin the horizon).
    pub async fn oldest_open_transaction(&self) -> Result<Option<OpenTransaction>, DbError> {
        match self {
            Database::Postgres(pool) => sqlx::query_as(
                "SELECT pid, datname::text AS database, \
                        EXTRACT(EPOCH FROM now() - xact_start)::float8 AS age_seconds, \
                        query_start, state, left(query, 200) AS query \
                 FROM pg_stat_activity \
                 WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
                   AND pid <> pg_backend_pid() \
                   AND xact_start IS NOT NULL \
                 ORDER BY age(COALESCE(backend_xid, backend_xmin)) DESC LIMIT 1",
            )
            .fetch_optional(pool)
            .await
            .map_err(DbError::query("finding the oldest open transaction")),
            Database::Sqlite(_) => Ok(None),
        }
    }

    /// A new horizon and the newest change marks, in one round trip.
    pub async fn change_marks(&self) -> Result<ChangeMarks, DbError> {
        let horizon = match self.dialect() {
            Dialect::Postgres => "pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            Dialect::Sqlite => "(SELECT value + 1 FROM change_clock WHERE id = 1)",
        };
        // A fixed statement.
        let sql = sqlx::AssertSqlSafe(MARKS.replace("{horizon}", horizon));
        let marks: Vec<Option<i64>> = on_pool!(self, pool => {
            match sqlx::query(sql).fetch_one(pool).await {
                Ok(row) => (0..11)
                    .map(|i| row.try_get::<Option<i64>, _>(i))
                    .collect::<Result<Vec<_>, _>>(),
                Err(e) => Err(e),
            }
        })
        .map_err(DbError::query("reading change marks"))?;
        let mut filter_tables = [None; 7];
        filter_tables.copy_from_slice(&marks[1..8]);
        Ok(ChangeMarks {
            horizon: marks[0].unwrap_or_default(),
            filter_tables,
            runs: marks[8],
            definitions: marks[9],
            tombstones: marks[10],
        })
    }

    /// Everything written at or after `horizon`, looking only where `marks` (read since)
    /// say something was.
    pub async fn changes_since(
        &self,
        horizon: i64,
        marks: &ChangeMarks,
    ) -> Result<Changes, DbError> {
        let packages = self
            .changed_packages(horizon, &marks.filter_tables_changed_since(horizon))
            .await?;
        if !ChangeMarks::at_or_after(marks.runs, horizon)
            && !ChangeMarks::at_or_after(marks.tombstones, horizon)
        {
            return Ok(Changes {
                packages,
                ..Default::default()
            });
        }
        let (deleted_packages, runs_deleted, runs) = on_pool!(self, pool => {
            let tombstones: Vec<(String, i64, Option<i64>, Option<String>)> = sqlx::query_as(
                "SELECT table_name, row_id, reduction_step_id, sub_group_key FROM change_tombstone \
                 WHERE change_mark >= $1 AND table_name IN ('raw_data_package', 'executed_reduction_step')",
            )
            .bind(horizon)
            .fetch_all(pool)
            .await
            .map_err(DbError::query("reading deletions"))?;
            let mut runs: Vec<(i64, String)> = sqlx::query_as(
                "SELECT reduction_step_id, sub_group_key FROM executed_reduction_step \
                 WHERE change_mark >= $1",
            )
            .bind(horizon)
            .fetch_all(pool)
            .await
            .map_err(DbError::query("finding changed runs"))?;
            let deleted: Vec<i64> = tombstones
                .iter()
                .filter(|(t, ..)| t == "raw_data_package")
                .map(|(_, id, ..)| *id)
                .collect();
            let mut runs_deleted = false;
            for (table, _, step, key) in tombstones {
                if table == "executed_reduction_step" {
                    match (step, key) {
                        // The deleted run's sub-group is looked at again, like a changed run.
                        (Some(step), Some(key)) => runs.push((step, key)),
                        _ => runs_deleted = true,
                    }
                }
            }
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

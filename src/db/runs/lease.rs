//! Claiming PENDING runs and the leases under which a workflow-manager (or a Celery
//! worker it handed a submission to) holds a run in STAGING_DATA.

use chrono::{DateTime, Utc};

use super::super::outbox::{Handoff, insert_handoff};
use super::super::{Database, DbError, Dialect, on_pool};
use super::{ClaimLimits, DISPATCHED, RUN_WORK, RunWork, ids_json, with_ids};

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

    /// A worker takes a run of its processing location handed to it (or whose lease
    /// expired) under its own lease; a run of another location is never its to submit.
    pub async fn take_dispatched_run(
        &self,
        run_id: i64,
        location: i64,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbError> {
        let dispatched = format!("{DISPATCHED}%");
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE executed_reduction_step SET lease_owner = $2, lease_expires_at = $3 \
                 WHERE id = $1 AND status = 'STAGING_DATA' \
                   AND (lease_owner LIKE $5 OR lease_owner = $2 OR lease_expires_at < $4) \
                   AND reduction_step_id IN (SELECT s.id FROM reduction_step s \
                       JOIN pipeline p ON p.id = s.pipeline_id \
                       WHERE p.processing_location_id = $6)",
            )
            .bind(run_id)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(&dispatched)
            .bind(location)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
        })
        .map_err(DbError::query("taking a handed-off run"))
    }
}

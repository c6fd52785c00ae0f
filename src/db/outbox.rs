//! The Celery outbox: hand-offs recorded in the database, in the same transaction as the
//! state change that needs them, then published ([`crate::dispatch`]). A publish that
//! fails leaves them here for the next cycle, so none is ever lost.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::{Database, DbError, on_pool};

/// One hand-off to a Celery worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    /// The processing location whose managers and workers it is for (None: any).
    pub processing_location_id: Option<i64>,
    /// Fixed when recorded, so a re-published message carries the same id.
    pub task_id: String,
    pub task_name: String,
    pub queue: String,
    pub priority: i32,
    pub args: Value,
    pub kwargs: Value,
}

/// A recorded hand-off.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub task_id: String,
    pub task_name: String,
    pub queue: String,
    pub priority: i32,
    pub args: Json<Value>,
    pub kwargs: Json<Value>,
    pub attempts: i32,
}

/// The statement recording one hand-off, run inside the caller's transaction.
pub(crate) const INSERT: &str = "INSERT INTO celery_outbox \
    (task_id, task_name, queue, priority, args, kwargs, created_at, processing_location_id) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Binds a hand-off to [`INSERT`] and executes it on `$conn`.
macro_rules! insert_handoff {
    ($conn:expr, $handoff:expr, $now:expr) => {
        sqlx::query($crate::db::outbox::INSERT)
            .bind(&$handoff.task_id)
            .bind(&$handoff.task_name)
            .bind(&$handoff.queue)
            .bind($handoff.priority)
            .bind(sqlx::types::Json(&$handoff.args))
            .bind(sqlx::types::Json(&$handoff.kwargs))
            .bind($now)
            .bind($handoff.processing_location_id)
            .execute($conn)
    };
}
pub(crate) use insert_handoff;

impl Database {
    /// Records hand-offs on their own (one transaction).
    pub async fn record_handoffs(&self, handoffs: &[Handoff]) -> Result<(), DbError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                for handoff in handoffs {
                    insert_handoff!(&mut *tx, handoff, now).await?;
                }
                tx.commit().await
            }
            .await
        })
        .map_err(DbError::query("recording hand-offs"))
    }

    /// Hand-offs not yet published, oldest first: those of `location` and those recorded
    /// without one (every hand-off when `location` is None).
    pub async fn unpublished_handoffs(
        &self,
        limit: i64,
        location: Option<i64>,
    ) -> Result<Vec<OutboxRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, task_id, task_name, queue, priority, args, kwargs, attempts \
                 FROM celery_outbox WHERE published_at IS NULL \
                   AND (CAST($2 AS BIGINT) IS NULL OR processing_location_id IS NULL \
                        OR processing_location_id = $2) \
                 ORDER BY id LIMIT $1",
            )
            .bind(limit)
            .bind(location)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading unpublished hand-offs"))
    }

    /// Marks hand-offs published (`error` None) or counts a failed attempt.
    pub async fn finish_publish(
        &self,
        ids: &[i64],
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), DbError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = serde_json::to_string(ids).expect("ids serialise");
        // By id, never by range: a transaction may commit a lower id after a batch was read.
        let published = super::with_ids(
            self.dialect(),
            "UPDATE celery_outbox SET published_at = $2, attempts = attempts + 1, \
             last_error = NULL WHERE id IN {ids} AND published_at IS NULL",
        );
        let failed = super::with_ids(
            self.dialect(),
            "UPDATE celery_outbox SET attempts = attempts + 1, last_error = $2 \
             WHERE id IN {ids} AND published_at IS NULL",
        );
        on_pool!(self, pool => {
            match error {
                None => sqlx::query(published)
                    .bind(&ids)
                    .bind(now)
                    .execute(pool)
                    .await
                    .map(|_| ()),
                Some(error) => sqlx::query(failed)
                    .bind(&ids)
                    .bind(error)
                    .execute(pool)
                    .await
                    .map(|_| ()),
            }
        })
        .map_err(DbError::query("recording a publish"))
    }

    /// How many hand-offs (of `location`, as in [`Self::unpublished_handoffs`]) wait to
    /// be published: the dispatch backlog.
    pub async fn handoff_backlog(&self, location: Option<i64>) -> Result<i64, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM celery_outbox WHERE published_at IS NULL \
                   AND (CAST($1 AS BIGINT) IS NULL OR processing_location_id IS NULL \
                        OR processing_location_id = $1)",
            )
            .bind(location)
                .fetch_one(pool)
                .await
        })
        .map_err(DbError::query("counting unpublished hand-offs"))
    }
}

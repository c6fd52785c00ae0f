//! Pipeline definitions as the trigger-manager reads them, trigger state and requests,
//! and run creation.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::{Database, DbError, Dialect, on_pool};

/// An enabled pipeline with its data grouping.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PipelineRow {
    pub id: i64,
    pub name: String,
    pub priority: i32,
    pub trigger_type: String,
    pub trigger_config: JsonText,
    pub data_grouping_id: i64,
    pub data_grouping_name: String,
    pub filter_rules: JsonText,
    pub instrument_module_id: Option<i64>,
    pub last_cron_tick: Option<DateTime<Utc>>,
}

/// A step with its configuration.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    pub id: i64,
    pub pipeline_id: i64,
    pub name: String,
    pub step_order: i32,
    pub reduction_software_id: i64,
    pub reduction_software_version_id: Option<i64>,
    pub version_policy: String,
    pub group_by: JsonText,
    pub cooldown_seconds: i32,
    pub max_retries: i32,
    pub parameters: Option<JsonText>,
}

/// A JSON column read as its text. SQLite keeps JSON as TEXT and checks nothing, so a
/// row written by another tool may hold anything: decoding it here, per row, makes a
/// malformed value an error of that row's pipeline instead of a failed query for all.
#[derive(Debug, Clone, PartialEq, sqlx::Type)]
#[sqlx(transparent)]
pub struct JsonText(pub String);

impl JsonText {
    /// The value; the error names `what` the column holds.
    pub fn value(&self, what: &str) -> Result<Value, String> {
        serde_json::from_str(&self.0).map_err(|e| format!("{what} is not valid JSON ({e})"))
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SoftwareVersionRow {
    pub id: i64,
    pub reduction_software_id: i64,
    pub version: String,
    pub image_ref: String,
    pub image_digest: Option<String>,
    pub deprecated: bool,
}

/// What the trigger-manager needs to know of one existing run of a step.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunStamp {
    pub id: i64,
    pub sub_group_key: String,
    pub fingerprint: String,
    pub status: String,
    pub retry_count: i32,
    pub max_retries: i32,
    pub created_at: DateTime<Utc>,
}

/// A run stamp with its step, as one query over several steps returns it.
#[derive(Debug, sqlx::FromRow)]
struct StepRunStamp {
    reduction_step_id: i64,
    #[sqlx(flatten)]
    stamp: RunStamp,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TriggerRequestRow {
    pub id: i64,
    pub pipeline_id: i64,
    pub reduction_step_id: Option<i64>,
    pub sub_group_key: Option<String>,
    pub force: bool,
}

/// A run to create: PENDING, with its raw-data-package inputs.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub reduction_step_id: i64,
    pub sub_group_key: String,
    pub sub_group: Value,
    pub fingerprint: String,
    pub reduction_software_version_id: i64,
    pub config_snapshot: Value,
    pub max_retries: i32,
    pub raw_inputs: Vec<i64>,
    /// Upstream data products (steps with `depends_on`).
    pub product_inputs: Vec<i64>,
    /// Upstream sub-groups left out because they failed for good.
    pub excluded_upstream: Value,
}

/// Rows per multi-row INSERT, well under SQLite's bound-parameter limit.
const INSERT_CHUNK: usize = 1000;
/// Runs per multi-row INSERT (eleven parameters each).
const RUN_CHUNK: usize = 200;
/// Sub-group keys per lookup.
const KEY_CHUNK: usize = 5000;

/// The runs of whole steps, on PostgreSQL (`$1`: an array of step ids). Public for the
/// test that checks its plan uses the index.
pub const RUNS_OF_STEPS_PG: &str = "SELECT reduction_step_id, id, sub_group_key, fingerprint, \
    status, retry_count, max_retries, created_at FROM executed_reduction_step \
    WHERE reduction_step_id = ANY($1)";

/// The products of runs that feed downstream steps, on PostgreSQL (`$1`: an array of run
/// ids).
pub const PRODUCTS_OF_RUNS_PG: &str = "SELECT executed_reduction_step_id, id FROM data_product \
    WHERE product_type <> 'LOG' AND executed_reduction_step_id = ANY($1) ORDER BY id";

impl Database {
    /// Enabled pipelines served by a processing location, highest priority first.
    pub async fn enabled_pipelines(
        &self,
        processing_location_id: i64,
    ) -> Result<Vec<PipelineRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT p.id, p.name, p.priority, p.trigger_type, \
                        CAST(p.trigger_config AS TEXT) AS trigger_config, p.data_grouping_id, \
                        g.name AS data_grouping_name, CAST(g.filter_rules AS TEXT) AS filter_rules, \
                        g.instrument_module_id, \
                        s.last_cron_tick \
                 FROM pipeline p \
                 JOIN data_grouping g ON g.id = p.data_grouping_id \
                 LEFT JOIN pipeline_trigger_state s ON s.pipeline_id = p.id \
                 WHERE p.enabled AND p.processing_location_id = $1 \
                 ORDER BY p.priority DESC, p.id",
            )
            .bind(processing_location_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading enabled pipelines"))
    }

    /// Whether `id` is a data location of type PROCESSING.
    pub async fn is_processing_location(&self, id: i64) -> Result<bool, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM data_location WHERE id = $1 AND location_type = 'PROCESSING'",
            )
            .bind(id)
            .fetch_one(pool)
            .await
        })
        .map(|n| n > 0)
        .map_err(DbError::query("reading the processing location"))
    }

    /// The steps of every enabled pipeline of a location, by pipeline, in execution order.
    pub async fn enabled_steps(
        &self,
        processing_location_id: i64,
    ) -> Result<Vec<StepRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.id, s.pipeline_id, s.name, s.step_order, s.reduction_software_id, \
                        s.reduction_software_version_id, s.version_policy, \
                        CAST(s.group_by AS TEXT) AS group_by, s.cooldown_seconds, s.max_retries, \
                        CAST(c.parameters AS TEXT) AS parameters \
                 FROM reduction_step s \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 LEFT JOIN reduction_step_config c ON c.reduction_step_id = s.id \
                 WHERE p.enabled AND p.processing_location_id = $1 \
                 ORDER BY s.pipeline_id, s.step_order, s.id",
            )
            .bind(processing_location_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading pipeline steps"))
    }

    /// `(step, upstream step)` pairs of the steps of every enabled pipeline of a location.
    pub async fn enabled_step_dependencies(
        &self,
        processing_location_id: i64,
    ) -> Result<Vec<(i64, i64)>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT d.reduction_step_id, d.depends_on_step_id \
                 FROM reduction_step_dependency d \
                 JOIN reduction_step s ON s.id = d.reduction_step_id \
                 JOIN pipeline p ON p.id = s.pipeline_id \
                 WHERE p.enabled AND p.processing_location_id = $1 \
                 ORDER BY d.reduction_step_id, d.depends_on_step_id",
            )
            .bind(processing_location_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading step dependencies"))
    }

    /// The versions of every software the enabled pipelines of a location use.
    pub async fn enabled_software_versions(
        &self,
        processing_location_id: i64,
    ) -> Result<Vec<SoftwareVersionRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT v.id, v.reduction_software_id, v.version, v.image_ref, v.image_digest, v.deprecated \
                 FROM reduction_software_version v \
                 WHERE v.reduction_software_id IN ( \
                     SELECT s.reduction_software_id FROM reduction_step s \
                     JOIN pipeline p ON p.id = s.pipeline_id \
                     WHERE p.enabled AND p.processing_location_id = $1) \
                 ORDER BY v.reduction_software_id, v.id",
            )
            .bind(processing_location_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading software versions"))
    }

    /// Every run of several steps, and the runs of some sub-groups of other steps, in
    /// at most two queries: `(step, sub-group key)` pairs are looked up by the unique key.
    pub async fn run_stamps(
        &self,
        whole_steps: &[i64],
        sub_groups: &[(i64, &str)],
    ) -> Result<Vec<(i64, RunStamp)>, DbError> {
        let mut stamps = Vec::new();
        if !whole_steps.is_empty() {
            let rows: Vec<StepRunStamp> = match self {
                // An array parameter, which the planner sees through (an index scan per
                // step), where a set-returning function over a JSON list reads every run.
                Database::Postgres(pool) => {
                    sqlx::query_as(RUNS_OF_STEPS_PG)
                        .bind(whole_steps)
                        .fetch_all(pool)
                        .await
                }
                Database::Sqlite(pool) => {
                    sqlx::query_as(
                        "SELECT reduction_step_id, id, sub_group_key, fingerprint, status, \
                            retry_count, max_retries, created_at FROM executed_reduction_step \
                         WHERE reduction_step_id IN (SELECT value FROM json_each($1))",
                    )
                    .bind(serde_json::to_string(whole_steps).expect("ids serialise"))
                    .fetch_all(pool)
                    .await
                }
            }
            .map_err(DbError::query("reading steps' runs"))?;
            stamps.extend(rows.into_iter().map(|r| (r.reduction_step_id, r.stamp)));
        }
        for chunk in sub_groups.chunks(KEY_CHUNK) {
            let pairs = serde_json::to_string(chunk).expect("keys serialise");
            let sql = match self.dialect() {
                Dialect::Postgres => {
                    "SELECT e.reduction_step_id, e.id, e.sub_group_key, e.fingerprint, e.status, \
                        e.retry_count, e.max_retries, e.created_at \
                     FROM executed_reduction_step e \
                     JOIN (SELECT (x ->> 0)::bigint AS step, x ->> 1 AS sub_group_key \
                           FROM jsonb_array_elements($1::jsonb) x) w \
                       ON e.reduction_step_id = w.step AND e.sub_group_key = w.sub_group_key"
                }
                Dialect::Sqlite => {
                    "SELECT e.reduction_step_id, e.id, e.sub_group_key, e.fingerprint, e.status, \
                        e.retry_count, e.max_retries, e.created_at \
                     FROM executed_reduction_step e \
                     JOIN (SELECT json_extract(value, '$[0]') AS step, json_extract(value, '$[1]') AS sub_group_key \
                           FROM json_each($1)) w \
                       ON e.reduction_step_id = w.step AND e.sub_group_key = w.sub_group_key"
                }
            };
            stamps.extend(self.stamp_rows(sql, pairs).await?);
        }
        Ok(stamps)
    }

    async fn stamp_rows(
        &self,
        sql: &'static str,
        list: String,
    ) -> Result<Vec<(i64, RunStamp)>, DbError> {
        let rows: Vec<StepRunStamp> = on_pool!(self, pool => {
            sqlx::query_as(sql).bind(list).fetch_all(pool).await
        })
        .map_err(DbError::query("reading steps' runs"))?;
        Ok(rows
            .into_iter()
            .map(|r| (r.reduction_step_id, r.stamp))
            .collect())
    }

    /// Pending manual trigger requests of every enabled pipeline of a location, oldest first.
    pub async fn enabled_trigger_requests(
        &self,
        processing_location_id: i64,
    ) -> Result<Vec<TriggerRequestRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, r.pipeline_id, r.reduction_step_id, r.sub_group_key, r.force \
                 FROM trigger_request r JOIN pipeline p ON p.id = r.pipeline_id \
                 WHERE p.enabled AND p.processing_location_id = $1 AND r.status = 'PENDING' \
                 ORDER BY r.created_at, r.id",
            )
            .bind(processing_location_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading trigger requests"))
    }

    /// Pending manual trigger requests of a pipeline, oldest first.
    pub async fn pending_trigger_requests(
        &self,
        pipeline_id: i64,
    ) -> Result<Vec<TriggerRequestRow>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT id, pipeline_id, reduction_step_id, sub_group_key, force FROM trigger_request \
                 WHERE pipeline_id = $1 AND status = 'PENDING' ORDER BY created_at, id",
            )
            .bind(pipeline_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading trigger requests"))
    }

    /// Records a manual trigger request; returns its id.
    pub async fn request_trigger(
        &self,
        pipeline_id: i64,
        reduction_step_id: Option<i64>,
        sub_group_key: Option<&str>,
        force: bool,
        requested_by: &str,
    ) -> Result<i64, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "INSERT INTO trigger_request (pipeline_id, reduction_step_id, sub_group_key, force, requested_by, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(pipeline_id)
            .bind(reduction_step_id)
            .bind(sub_group_key)
            .bind(force)
            .bind(requested_by)
            .bind(Utc::now())
            .fetch_one(pool)
            .await
        })
        .map_err(DbError::query("recording a trigger request"))
    }

    /// Marks a trigger request handled (`PROCESSED` or `FAILED`) with a message.
    pub async fn finish_trigger_request(
        &self,
        id: i64,
        failed: bool,
        message: &str,
    ) -> Result<(), DbError> {
        let status = if failed { "FAILED" } else { "PROCESSED" };
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE trigger_request SET status = $2, message = $3, processed_at = $4 \
                 WHERE id = $1 AND status = 'PENDING'",
            )
            .bind(id)
            .bind(status)
            .bind(message)
            .bind(Utc::now())
            .execute(pool)
            .await
            .map(drop)
        })
        .map_err(DbError::query("finishing a trigger request"))
    }

    /// Remembers which pipelines were evaluated at `at` (and for which cron tick), in one
    /// statement. Rows go in pipeline order so two trigger-managers lock them alike.
    pub async fn record_evaluations(
        &self,
        evaluated: &[(i64, Option<DateTime<Utc>>)],
        at: DateTime<Utc>,
    ) -> Result<(), DbError> {
        if evaluated.is_empty() {
            return Ok(());
        }
        let mut rows = evaluated.to_vec();
        rows.sort_by_key(|(id, _)| *id);
        rows.dedup_by_key(|(id, _)| *id);
        on_pool!(self, pool => {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO pipeline_trigger_state (pipeline_id, last_cron_tick, last_evaluated_at) ",
            );
            insert.push_values(&rows, |mut row, (id, tick)| {
                row.push_bind(*id).push_bind(*tick).push_bind(at);
            });
            insert.push(
                " ON CONFLICT (pipeline_id) DO UPDATE SET \
                   last_cron_tick = COALESCE(excluded.last_cron_tick, pipeline_trigger_state.last_cron_tick), \
                   last_evaluated_at = excluded.last_evaluated_at",
            );
            insert.build().execute(pool).await.map(drop)
        })
        .map_err(DbError::query("recording pipeline evaluations"))
    }

    /// Creates PENDING runs with their inputs in one transaction. A run whose (step,
    /// sub-group, fingerprint) exists already is skipped (`None` in its place): creation is
    /// idempotent, also between trigger-managers racing each other.
    pub async fn create_runs(
        &self,
        runs: &[NewRun],
        now: DateTime<Utc>,
    ) -> Result<Vec<Option<i64>>, DbError> {
        let mut ids = vec![None; runs.len()];
        if runs.is_empty() {
            return Ok(ids);
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin().await.map_err(DbError::query("creating runs"))?;
            let mut raw_links = Vec::new();
            let mut product_links = Vec::new();
            for (chunk_index, chunk) in runs.chunks(RUN_CHUNK).enumerate() {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO executed_reduction_step \
                       (reduction_step_id, sub_group_key, sub_group, fingerprint, status, \
                        reduction_software_version_id, config_snapshot, excluded_upstream, max_retries, \
                        created_at, updated_at) ",
                );
                insert.push_values(chunk, |mut row, run| {
                    row.push_bind(run.reduction_step_id)
                        .push_bind(&run.sub_group_key)
                        .push_bind(Json(&run.sub_group))
                        .push_bind(&run.fingerprint)
                        .push_bind("PENDING")
                        .push_bind(run.reduction_software_version_id)
                        .push_bind(Json(&run.config_snapshot))
                        .push_bind(Json(&run.excluded_upstream))
                        .push_bind(run.max_retries)
                        .push_bind(now)
                        .push_bind(now);
                });
                insert.push(
                    " ON CONFLICT (reduction_step_id, sub_group_key, fingerprint) DO NOTHING \
                      RETURNING id, reduction_step_id, sub_group_key, fingerprint",
                );
                let created: Vec<(i64, i64, String, String)> = insert
                    .build_query_as()
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(DbError::query("creating runs"))?;
                for (id, step, key, fingerprint) in created {
                    let offset = chunk
                        .iter()
                        .position(|r| {
                            r.reduction_step_id == step
                                && r.sub_group_key == key
                                && r.fingerprint == fingerprint
                        })
                        .expect("a created run is one of those inserted");
                    let run = &chunk[offset];
                    ids[chunk_index * RUN_CHUNK + offset] = Some(id);
                    raw_links.extend(run.raw_inputs.iter().map(|p| (id, *p)));
                    product_links.extend(run.product_inputs.iter().map(|p| (id, *p)));
                }
            }
            for chunk in raw_links.chunks(INSERT_CHUNK) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO executed_reduction_step_raw_input (executed_reduction_step_id, raw_data_package_id) ",
                );
                insert.push_values(chunk, |mut row, (run, package)| {
                    row.push_bind(*run).push_bind(*package);
                });
                insert
                    .build()
                    .execute(&mut *tx)
                    .await
                    .map_err(DbError::query("recording runs' inputs"))?;
            }
            for chunk in product_links.chunks(INSERT_CHUNK) {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO executed_reduction_step_product_input (executed_reduction_step_id, data_product_id) ",
                );
                insert.push_values(chunk, |mut row, (run, product)| {
                    row.push_bind(*run).push_bind(*product);
                });
                insert
                    .build()
                    .execute(&mut *tx)
                    .await
                    .map_err(DbError::query("recording runs' upstream products"))?;
            }
            tx.commit().await.map_err(DbError::query("committing new runs"))?;
            Ok(ids)
        })
    }

    pub async fn pipeline_id_by_name(&self, name: &str) -> Result<Option<i64>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar("SELECT id FROM pipeline WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await
        })
        .map_err(DbError::query("looking up a pipeline"))
    }

    pub async fn step_id_by_name(
        &self,
        pipeline_id: i64,
        name: &str,
    ) -> Result<Option<i64>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar("SELECT id FROM reduction_step WHERE pipeline_id = $1 AND name = $2")
                .bind(pipeline_id)
                .bind(name)
                .fetch_optional(pool)
                .await
        })
        .map_err(DbError::query("looking up a step"))
    }

    /// `(run, product)` pairs of the given runs' products that feed downstream steps
    /// (every type but LOG), ordered by product id.
    pub async fn products_of_runs(&self, run_ids: &[i64]) -> Result<Vec<(i64, i64)>, DbError> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One bound JSON list rather than one placeholder per id.
        let ids = serde_json::to_string(run_ids).expect("ids serialise");
        let what = DbError::query("reading upstream products");
        match self {
            Database::Postgres(pool) => sqlx::query_as(PRODUCTS_OF_RUNS_PG)
            .bind(run_ids)
            .fetch_all(pool)
            .await
            .map_err(what),
            Database::Sqlite(pool) => sqlx::query_as(
                "SELECT executed_reduction_step_id, id FROM data_product \
                 WHERE product_type <> 'LOG' AND executed_reduction_step_id IN (SELECT value FROM json_each($1)) \
                 ORDER BY id",
            )
            .bind(ids)
            .fetch_all(pool)
            .await
            .map_err(what),
        }
    }

    /// Every product that can feed a downstream step (every type but LOG) as `(run,
    /// product)`, sorted: one plain scan for a cycle that evaluates many pipelines in
    /// full. Not joined with the runs: the run history, read anyway, says which runs
    /// completed, and a join over millions of runs costs more than the products it
    /// leaves out. Products are registered with their run's completion in one
    /// transaction, so a run has all of its products here or none.
    pub async fn products_by_run(&self) -> Result<Vec<(i64, i64)>, DbError> {
        let mut rows: Vec<(i64, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT executed_reduction_step_id, id FROM data_product \
                 WHERE product_type <> 'LOG'",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading the products of runs"))?;
        // Sorted here: in the database, a sort of this size spills to disk.
        rows.sort_unstable();
        Ok(rows)
    }

    /// The upstream data-product inputs of a run.
    pub async fn run_product_inputs(&self, run_id: i64) -> Result<Vec<i64>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT data_product_id FROM executed_reduction_step_product_input \
                 WHERE executed_reduction_step_id = $1 ORDER BY data_product_id",
            )
            .bind(run_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading a run's upstream products"))
    }

    /// The raw-data-package inputs of a run.
    pub async fn run_raw_inputs(&self, run_id: i64) -> Result<Vec<i64>, DbError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT raw_data_package_id FROM executed_reduction_step_raw_input \
                 WHERE executed_reduction_step_id = $1 ORDER BY raw_data_package_id",
            )
            .bind(run_id)
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading a run's inputs"))
    }
}

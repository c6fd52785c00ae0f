//! Reading and writing pipeline definitions as a whole (`ccat-wfm export`, `apply`):
//! software and versions, data groupings, pipelines, steps, their configuration and
//! dependencies, matched by name.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::types::Json;

use super::{Database, DbError, on_pool};
use crate::definitions::{Definitions, Grouping, Known, Pipeline, Software, SoftwareVersion, Step};

#[derive(sqlx::FromRow)]
struct SoftwareRow {
    id: i64,
    name: String,
    description: String,
    repository_url: String,
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    reduction_software_id: i64,
    version: String,
    image_ref: String,
    image_digest: Option<String>,
    command: Json<Vec<String>>,
    default_cpu: i32,
    default_memory_gb: f64,
    default_time_hours: f64,
    deprecated: bool,
}

#[derive(sqlx::FromRow)]
struct GroupingRow {
    name: String,
    description: String,
    instrument_module_id: Option<i64>,
    filter_rules: Json<Vec<Value>>,
}

#[derive(sqlx::FromRow)]
struct PipelineRow {
    id: i64,
    name: String,
    description: String,
    grouping: String,
    location: String,
    trigger_type: String,
    trigger_config: Json<Value>,
    enabled: bool,
    priority: i32,
    max_active_runs: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct StepRow {
    id: i64,
    pipeline_id: i64,
    name: String,
    software: String,
    version: Option<String>,
    version_policy: String,
    group_by: Json<Vec<String>>,
    cooldown_seconds: i32,
    max_retries: i32,
    cpu: Option<i32>,
    memory_gb: Option<f64>,
    time_hours: Option<f64>,
    allow_empty_output: bool,
    parameters: Option<Json<BTreeMap<String, Value>>>,
}

impl Database {
    /// Names a definitions file may refer to without declaring them.
    pub async fn known_definitions(&self) -> Result<Known, DbError> {
        let versions: Vec<(String, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.name, v.version FROM reduction_software_version v \
                 JOIN reduction_software s ON s.id = v.reduction_software_id",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading software versions"))?;
        let groupings: Vec<String> = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT name FROM data_grouping").fetch_all(pool).await
        })
        .map_err(DbError::query("reading groupings"))?;
        let locations: Vec<String> = on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT name FROM data_location WHERE location_type = 'PROCESSING' ORDER BY name",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading processing locations"))?;
        let mut software_versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (software, version) in versions {
            software_versions
                .entry(software)
                .or_default()
                .insert(version);
        }
        Ok(Known {
            software_versions,
            groupings: groupings.into_iter().collect(),
            processing_locations: locations.into_iter().collect(),
        })
    }

    /// Every definition in the database, as a definitions file has them.
    pub async fn export_definitions(&self) -> Result<Definitions, DbError> {
        let what = DbError::query("reading definitions");
        let software: Vec<SoftwareRow> = on_pool!(self, pool => {
            sqlx::query_as("SELECT id, name, description, repository_url FROM reduction_software ORDER BY name")
                .fetch_all(pool)
                .await
        })
        .map_err(what)?;
        let versions: Vec<VersionRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT reduction_software_id, version, image_ref, image_digest, command, \
                 default_cpu, default_memory_gb, default_time_hours, deprecated \
                 FROM reduction_software_version ORDER BY id",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading software versions"))?;
        let groupings: Vec<GroupingRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT name, description, instrument_module_id, filter_rules FROM data_grouping ORDER BY name",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading groupings"))?;
        let pipelines: Vec<PipelineRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT p.id, p.name, p.description, g.name AS grouping, l.name AS location, \
                 p.trigger_type, p.trigger_config, p.enabled, p.priority, p.max_active_runs \
                 FROM pipeline p JOIN data_grouping g ON g.id = p.data_grouping_id \
                 JOIN data_location l ON l.id = p.processing_location_id ORDER BY p.name",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading pipelines"))?;
        let steps: Vec<StepRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT s.id, s.pipeline_id, s.name, sw.name AS software, v.version, s.version_policy, \
                 s.group_by, s.cooldown_seconds, s.max_retries, s.cpu, s.memory_gb, s.time_hours, \
                 s.allow_empty_output, c.parameters \
                 FROM reduction_step s JOIN reduction_software sw ON sw.id = s.reduction_software_id \
                 LEFT JOIN reduction_software_version v ON v.id = s.reduction_software_version_id \
                 LEFT JOIN reduction_step_config c ON c.reduction_step_id = s.id \
                 ORDER BY s.pipeline_id, s.step_order, s.id",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading steps"))?;
        let dependencies: Vec<(i64, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT d.reduction_step_id, u.name FROM reduction_step_dependency d \
                 JOIN reduction_step u ON u.id = d.depends_on_step_id ORDER BY u.step_order, u.name",
            )
            .fetch_all(pool)
            .await
        })
        .map_err(DbError::query("reading step dependencies"))?;

        let mut depends: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (step, upstream) in dependencies {
            depends.entry(step).or_default().push(upstream);
        }
        Ok(Definitions {
            software: software
                .iter()
                .map(|s| Software {
                    name: s.name.clone(),
                    description: s.description.clone(),
                    repository_url: s.repository_url.clone(),
                    versions: versions
                        .iter()
                        .filter(|v| v.reduction_software_id == s.id)
                        .map(|v| SoftwareVersion {
                            version: v.version.clone(),
                            image_ref: v.image_ref.clone(),
                            image_digest: v.image_digest.clone(),
                            command: v.command.0.clone(),
                            cpu: v.default_cpu,
                            memory_gb: v.default_memory_gb,
                            time_hours: v.default_time_hours,
                            deprecated: v.deprecated,
                        })
                        .collect(),
                })
                .collect(),
            groupings: groupings
                .into_iter()
                .map(|g| Grouping {
                    name: g.name,
                    description: g.description,
                    instrument_module_id: g.instrument_module_id,
                    filter_rules: g.filter_rules.0,
                })
                .collect(),
            pipelines: pipelines
                .into_iter()
                .map(|p| Pipeline {
                    steps: steps
                        .iter()
                        .filter(|s| s.pipeline_id == p.id)
                        .map(|s| Step {
                            name: s.name.clone(),
                            software: s.software.clone(),
                            version: s.version.clone().unwrap_or_default(),
                            version_policy: s.version_policy.to_lowercase(),
                            group_by: s.group_by.0.clone(),
                            cooldown_seconds: s.cooldown_seconds,
                            max_retries: s.max_retries,
                            cpu: s.cpu,
                            memory_gb: s.memory_gb,
                            time_hours: s.time_hours,
                            depends_on: depends.remove(&s.id).unwrap_or_default(),
                            allow_empty_output: s.allow_empty_output,
                            config: s.parameters.clone().map(|p| p.0).unwrap_or_default(),
                        })
                        .collect(),
                    name: p.name,
                    description: p.description,
                    grouping: p.grouping,
                    processing_location: p.location,
                    trigger: p.trigger_type.to_lowercase(),
                    cron: p
                        .trigger_config
                        .0
                        .get("cron")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    // Enabled is the default, written only when it is not so.
                    enabled: (!p.enabled).then_some(false),
                    priority: p.priority,
                    max_active_runs: p.max_active_runs,
                })
                .collect(),
        })
    }

    /// Writes every entry of a validated file, creating or updating by name, in one
    /// transaction. Entries the file does not mention are left alone.
    pub async fn apply_definitions(&self, defs: &Definitions) -> Result<(), DbError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            async {
                let mut tx = pool.begin().await?;
                for s in &defs.software {
                    let software_id: i64 = sqlx::query_scalar(
                        "INSERT INTO reduction_software (name, description, repository_url) \
                         VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET \
                         description = excluded.description, repository_url = excluded.repository_url \
                         RETURNING id",
                    )
                    .bind(&s.name)
                    .bind(&s.description)
                    .bind(&s.repository_url)
                    .fetch_one(&mut *tx)
                    .await?;
                    for v in &s.versions {
                        sqlx::query(
                            "INSERT INTO reduction_software_version (reduction_software_id, version, \
                             image_ref, image_digest, command, default_cpu, default_memory_gb, \
                             default_time_hours, deprecated, created_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                             ON CONFLICT (reduction_software_id, version) DO UPDATE SET \
                             image_ref = excluded.image_ref, image_digest = excluded.image_digest, \
                             command = excluded.command, default_cpu = excluded.default_cpu, \
                             default_memory_gb = excluded.default_memory_gb, \
                             default_time_hours = excluded.default_time_hours, \
                             deprecated = excluded.deprecated",
                        )
                        .bind(software_id)
                        .bind(&v.version)
                        .bind(&v.image_ref)
                        .bind(&v.image_digest)
                        .bind(Json(&v.command))
                        .bind(v.cpu)
                        .bind(v.memory_gb)
                        .bind(v.time_hours)
                        .bind(v.deprecated)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                for g in &defs.groupings {
                    sqlx::query(
                        "INSERT INTO data_grouping (name, description, filter_rules, instrument_module_id, \
                         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
                         ON CONFLICT (name) DO UPDATE SET description = excluded.description, \
                         filter_rules = excluded.filter_rules, \
                         instrument_module_id = excluded.instrument_module_id, updated_at = $5",
                    )
                    .bind(&g.name)
                    .bind(&g.description)
                    .bind(Json(&g.filter_rules))
                    .bind(g.instrument_module_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                for p in &defs.pipelines {
                    let trigger_config = match &p.cron {
                        Some(cron) => json!({ "cron": cron }),
                        None => json!({}),
                    };
                    let pipeline_id: i64 = sqlx::query_scalar(
                        "INSERT INTO pipeline (name, description, data_grouping_id, processing_location_id, \
                         trigger_type, trigger_config, enabled, priority, max_active_runs, created_at, updated_at) \
                         VALUES ($1, $2, (SELECT id FROM data_grouping WHERE name = $3), \
                         (SELECT id FROM data_location WHERE name = $4 AND location_type = 'PROCESSING'), \
                         $5, $6, COALESCE($7, TRUE), $8, $9, $10, $10) \
                         ON CONFLICT (name) DO UPDATE SET description = excluded.description, \
                         data_grouping_id = excluded.data_grouping_id, \
                         processing_location_id = excluded.processing_location_id, \
                         trigger_type = excluded.trigger_type, trigger_config = excluded.trigger_config, \
                         enabled = COALESCE($7, pipeline.enabled), priority = excluded.priority, \
                         max_active_runs = excluded.max_active_runs, updated_at = $10 \
                         RETURNING id",
                    )
                    .bind(&p.name)
                    .bind(&p.description)
                    .bind(&p.grouping)
                    .bind(&p.processing_location)
                    .bind(p.trigger.to_uppercase())
                    .bind(Json(&trigger_config))
                    .bind(p.enabled)
                    .bind(p.priority)
                    .bind(p.max_active_runs)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                    let mut ids: BTreeMap<&str, i64> = BTreeMap::new();
                    for (order, s) in crate::definitions::step_order(&p.steps).into_iter().enumerate() {
                        let step_id: i64 = sqlx::query_scalar(
                            "INSERT INTO reduction_step (pipeline_id, name, step_order, reduction_software_id, \
                             reduction_software_version_id, version_policy, group_by, cooldown_seconds, \
                             max_retries, cpu, memory_gb, time_hours, created_at, updated_at, \
                             allow_empty_output) \
                             VALUES ($1, $2, $3, (SELECT id FROM reduction_software WHERE name = $4), \
                             (SELECT v.id FROM reduction_software_version v JOIN reduction_software s \
                              ON s.id = v.reduction_software_id WHERE s.name = $4 AND v.version = $5), \
                             $6, $7, $8, $9, $10, $11, $12, $13, $13, $14) \
                             ON CONFLICT (pipeline_id, name) DO UPDATE SET step_order = excluded.step_order, \
                             reduction_software_id = excluded.reduction_software_id, \
                             reduction_software_version_id = excluded.reduction_software_version_id, \
                             version_policy = excluded.version_policy, group_by = excluded.group_by, \
                             cooldown_seconds = excluded.cooldown_seconds, max_retries = excluded.max_retries, \
                             cpu = excluded.cpu, memory_gb = excluded.memory_gb, \
                             time_hours = excluded.time_hours, \
                             allow_empty_output = excluded.allow_empty_output, updated_at = $13 \
                             RETURNING id",
                        )
                        .bind(pipeline_id)
                        .bind(&s.name)
                        .bind(order as i32)
                        .bind(&s.software)
                        .bind(&s.version)
                        .bind(s.version_policy.to_uppercase())
                        .bind(Json(&s.group_by))
                        .bind(s.cooldown_seconds)
                        .bind(s.max_retries)
                        .bind(s.cpu)
                        .bind(s.memory_gb)
                        .bind(s.time_hours)
                        .bind(now)
                        .bind(s.allow_empty_output)
                        .fetch_one(&mut *tx)
                        .await?;
                        ids.insert(&s.name, step_id);
                        sqlx::query(
                            "INSERT INTO reduction_step_config (reduction_step_id, parameters, updated_at) \
                             VALUES ($1, $2, $3) ON CONFLICT (reduction_step_id) DO UPDATE SET \
                             parameters = excluded.parameters, updated_at = $3",
                        )
                        .bind(step_id)
                        .bind(Json(&s.config))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        sqlx::query("DELETE FROM reduction_step_dependency WHERE reduction_step_id = $1")
                            .bind(step_id)
                            .execute(&mut *tx)
                            .await?;
                        for upstream in &s.depends_on {
                            sqlx::query(
                                "INSERT INTO reduction_step_dependency (reduction_step_id, depends_on_step_id) \
                                 VALUES ($1, $2)",
                            )
                            .bind(step_id)
                            .bind(ids[upstream.as_str()])
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
                tx.commit().await
            }
            .await
        })
        .map_err(DbError::query("applying definitions"))
    }
}

//! A pipeline whose "software" is `tests/software/step.sh`, an archive whose packages
//! are real files, and helpers to drive runs through their lifecycle on any backend.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ccat_workflow_manager::backend::Backend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::{ResultManager, ResultOptions};
use ccat_workflow_manager::trigger::{self, TriggerOptions};
use ccat_workflow_manager::workflow::WorkflowOptions;
use ccat_workflow_manager::workflow::command::ContainerRuntime;
use chrono::Utc;

use super::{ARCHIVE, exec};

pub fn step_script() -> String {
    format!("{}/tests/software/step.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Locations 1 (processing) and 2 (archive), the test software with `command` (a JSON
/// list), and pipeline `calib` (id 1): one step `calibrate` per scan, `max_retries`,
/// a time limit of `time_hours`, on every CHAI package.
pub fn pipeline_sql(command: &str, time_hours: f64, max_retries: i32) -> String {
    format!(
        r#"
INSERT INTO data_location (id, name, location_type) VALUES (1, 'proc', 'PROCESSING'), (2, 'lta', 'LONG_TERM_ARCHIVE');
INSERT INTO data_grouping (id, name, filter_rules) VALUES
  (1, 'chai', '[{{"table": "Instrument", "column": "name", "operator": "eq", "value": "CHAI"}}]');
INSERT INTO reduction_software (id, name) VALUES (1, 'test-step');
INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref, command,
                                        default_cpu, default_memory_gb) VALUES
  (1, 1, '1.0.0', 'registry.example/test-step:1.0.0', '{command}', 1, 0.1);
INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type, priority) VALUES
  (1, 'calib', 1, 1, 'CONTINUOUS', 10);
INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id,
                            version_policy, group_by, cooldown_seconds, max_retries, time_hours) VALUES
  (1, 1, 'calibrate', 1, 1, 'EXACT', '["executed_obs_unit"]', 0, {max_retries}, {time_hours});
INSERT INTO reduction_step_config (reduction_step_id, parameters) VALUES (1, '{{"calibration_mode": "hot_cold"}}');
"#
    )
}

/// The command JSON for `step.sh MODE ARGS…`.
pub fn command_json(args: &[&str]) -> String {
    let mut argv = vec!["/bin/sh".to_owned(), step_script()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    serde_json::to_string(&argv).unwrap().replace('\'', "''")
}

/// A temporary tree with the archive's packages as files (copies at location 2) and a
/// pipeline base directory.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn base(&self) -> PathBuf {
        self.dir.path().join("pipelines")
    }
    pub fn archive(&self) -> PathBuf {
        self.dir.path().join("archive")
    }
    pub fn options(&self, staging: StagingMode) -> WorkflowOptions {
        WorkflowOptions {
            processing_location_id: 1,
            pipeline_base_dir: self.base(),
            sif_cache_dir: self.dir.path().join("sif"),
            runtime: ContainerRuntime::None,
            apptainer: "apptainer".into(),
            staging_mode: staging,
            claim_batch_size: 100,
            max_active_jobs: 10_000,
            lease: chrono::Duration::seconds(300),
            retry_backoff: chrono::Duration::seconds(60),
        }
    }
    pub fn result_options(&self) -> ResultOptions {
        ResultOptions {
            processing_location_id: 1,
            pipeline_base_dir: self.base(),
            retry_backoff: chrono::Duration::seconds(60),
            vanish_grace: chrono::Duration::seconds(30),
            handoff_timeout: chrono::Duration::seconds(300),
        }
    }
}

/// The archive, the pipeline, the packages' files with their copies at location 2.
/// `dir` must be readable by whoever runs the jobs (SLURM runs them as this user).
pub async fn setup_site(db: &Database, pipeline: &str, dir: Option<&Path>) -> Site {
    let dir = match dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let site = Site { dir };
    load_site(db, &site, pipeline).await;
    site
}

/// The archive, the pipeline and the packages' files of `site` into `db` (a database
/// re-created for a site that exists).
pub async fn load_site(db: &Database, site: &Site, pipeline: &str) {
    exec(db, ARCHIVE).await.unwrap();
    exec(db, pipeline).await.unwrap();
    std::fs::create_dir_all(site.archive()).unwrap();
    let mut sql = String::new();
    for id in 1..=6 {
        let path = site.archive().join(format!("p{id}.tar"));
        std::fs::write(&path, format!("package {id}")).unwrap();
        sql.push_str(&format!(
            "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path, status) \
             VALUES (2, {id}, '{}', 'PRESENT');\n",
            path.display()
        ));
    }
    exec(db, &sql).await.unwrap();
}

/// One trigger cycle creating the runs of every gap; returns the number created.
pub async fn create_runs(db: &Database) -> usize {
    let options = TriggerOptions {
        processing_location_id: 1,
        max_new_runs_per_pipeline: 10_000,
        dry_run: false,
        only_pipeline: None,
        list_gaps: false,
    };
    let report = trigger::run_cycle(db, &options, Utc::now()).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    report.created()
}

/// Result cycles until every run is in one of `states` (or `timeout` passes).
pub async fn settle<B: Backend>(
    db: &Database,
    results: &ResultManager<B>,
    states: &[&str],
    timeout: Duration,
) -> Vec<(i64, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let report = results.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let runs = db.run_statuses().await.unwrap();
        if runs.iter().all(|(_, s)| states.contains(&s.as_str())) || Instant::now() > deadline {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One row of a run, as the tests look at it.
#[derive(Debug, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub status: String,
    pub hpc_job_id: Option<String>,
    pub exit_code: Option<i32>,
    pub wall_time_seconds: Option<f64>,
    pub error_message: Option<String>,
    pub log_tail: Option<String>,
    pub retry_count: i32,
}

pub async fn runs(db: &Database) -> Vec<RunRow> {
    const SQL: &str = "SELECT id, status, hpc_job_id, exit_code, wall_time_seconds, \
        error_message, log_tail, retry_count FROM executed_reduction_step ORDER BY id";
    match db {
        Database::Postgres(p) => sqlx::query_as(SQL).fetch_all(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_as(SQL).fetch_all(p).await.unwrap(),
    }
}

/// A registered product with its copy, as the tests look at it.
#[derive(Debug, sqlx::FromRow)]
pub struct ProductRow {
    pub run_id: i64,
    pub name: String,
    pub product_type: String,
    pub relative_path: String,
    pub size_bytes: i64,
    pub checksum: String,
    /// Compact JSON text.
    pub quality_metrics: Option<String>,
    pub full_path: String,
}

pub async fn products(db: &Database) -> Vec<ProductRow> {
    match db {
        Database::Postgres(p) => sqlx::query_as(
            "SELECT d.executed_reduction_step_id AS run_id, d.name, d.product_type, d.relative_path, \
             d.size_bytes, d.checksum, \
             CASE WHEN d.quality_metrics IS NULL THEN NULL ELSE replace(d.quality_metrics::text, ' ', '') END \
               AS quality_metrics, c.full_path \
             FROM data_product d JOIN physical_copy c ON c.data_product_id = d.id ORDER BY d.id",
        )
        .fetch_all(p)
        .await
        .unwrap(),
        Database::Sqlite(p) => sqlx::query_as(
            "SELECT d.executed_reduction_step_id AS run_id, d.name, d.product_type, d.relative_path, \
             d.size_bytes, d.checksum, json(d.quality_metrics) AS quality_metrics, c.full_path \
             FROM data_product d JOIN physical_copy c ON c.data_product_id = d.id ORDER BY d.id",
        )
        .fetch_all(p)
        .await
        .unwrap(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Steps 2 (`baseline`, per scan, after `calibrate`) and 3 (`map`, per source, after
/// `baseline`) for pipeline 1 of [`pipeline_sql`].
pub const MORE_STEPS: &str = r#"
INSERT INTO reduction_step (id, pipeline_id, name, step_order, reduction_software_id,
                            reduction_software_version_id, version_policy, group_by, cooldown_seconds, max_retries)
VALUES (2, 1, 'baseline', 1, 1, 1, 'EXACT', '["executed_obs_unit"]', 0, 0),
       (3, 1, 'map', 2, 1, 1, 'EXACT', '["source"]', 0, 0);
INSERT INTO reduction_step_dependency (reduction_step_id, depends_on_step_id) VALUES (2, 1), (3, 2);
"#;

/// Trigger, workflow and result cycles until every run is COMPLETED and a trigger cycle
/// after that creates nothing (or `timeout` passes). The check runs after the runs
/// completed: a step whose upstream completed during a cycle gets its runs only from the
/// next trigger cycle.
pub async fn drive<B: Backend>(
    db: &Database,
    wm: &ccat_workflow_manager::workflow::WorkflowManager<B>,
    rm: &ResultManager<B>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let all = runs(db).await;
        let settled = !all.is_empty() && all.iter().all(|r| r.status == "COMPLETED");
        let created = create_runs(db).await;
        if settled && created == 0 || Instant::now() > deadline {
            return;
        }
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let report = rm.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `{root}/config/{step}/run-{id}/attempt-{n}` (manifest and the backend's files) of the
/// one run of `step` under `root`.
pub fn attempt_dir(root: &Path, step: &str, attempt: i32) -> std::path::PathBuf {
    let runs: Vec<_> = std::fs::read_dir(root.join("config").join(step))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].join(format!("attempt-{attempt}"))
}

//! The workflow-manager and job tracking with the `local` backend, on SQLite and
//! PostgreSQL: submission to completion, failure with reason and log, retries, time
//! limits, cancellation, data-transfer staging, leases of dead instances, concurrent
//! claiming, and configuration strings that reach the job verbatim.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::ResultManager;
use ccat_workflow_manager::workflow::WorkflowManager;
use chrono::Utc;
use common::lifecycle::{self, Site, command_json, pipeline_sql, runs, settle};
use common::{TestDatabase, exec};

fn local() -> LocalBackend {
    LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()])
}

async fn scalar(db: &Database, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

async fn site(db: &Database, command: &[&str], time_hours: f64, max_retries: i32) -> Site {
    lifecycle::setup_site(
        db,
        &pipeline_sql(&command_json(command), time_hours, max_retries),
        None,
    )
    .await
}

#[tokio::test]
async fn runs_are_staged_laid_out_submitted_and_succeed() {
    for t in TestDatabase::both_migrated("wf_ok").await {
        let db = &t.db;
        let site = site(db, &["ok"], 1.0, 0).await;
        assert_eq!(lifecycle::create_runs(db).await, 3);
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(
            (report.claimed, report.submitted),
            (3, 3),
            "{report:?} {}",
            t.url
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // Nothing left to do: a second cycle claims and submits nothing.
        let again = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!((again.claimed, again.submitted), (0, 0));

        // The layout of SPEC §6, owner and group only, and the manifest.
        let root = site.base().join("calib/executed_obs_unit=1");
        for dir in [
            root.join("workspace/calibrate"),
            lifecycle::attempt_dir(&root, "calibrate", 1),
            root.join("logs"),
        ] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o750, "{}", dir.display());
        }
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(lifecycle::attempt_dir(&root, "calibrate", 1).join("manifest.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["manifest_version"], 1);
        assert_eq!(manifest["pipeline"]["name"], "calib");
        assert_eq!(manifest["step"]["name"], "calibrate");
        assert_eq!(manifest["step"]["is_final"], true);
        assert_eq!(manifest["sub_group"]["key"], "executed_obs_unit=1");
        assert_eq!(manifest["configuration"]["calibration_mode"], "hot_cold");
        assert_eq!(manifest["software"]["version"], "1.0.0");
        let inputs = manifest["inputs"].as_array().unwrap();
        assert_eq!(inputs.len(), 2, "packages 1 and 2 of scan 1");
        for input in inputs {
            // The link in input/ reads the package's file.
            let text = std::fs::read_to_string(input["path"].as_str().unwrap()).unwrap();
            assert!(text.starts_with("package "), "{text}");
        }
        assert_eq!(
            manifest["directories"]["output"],
            root.join("output").display().to_string()
        );

        let results = ResultManager::new(db.clone(), local(), site.result_options());
        let states = settle(db, &results, &["COMPLETED"], Duration::from_secs(30)).await;
        assert!(
            states.iter().all(|(_, s)| s == "COMPLETED"),
            "{states:?} {}",
            t.url
        );
        for run in runs(db).await {
            assert_eq!(run.exit_code, Some(0));
            assert!(run.wall_time_seconds.is_some());
        }
        // The products the software wrote, registered with checksum, size, metrics and
        // a copy at the processing location.
        let map = root.join("output/science/map.fits");
        let products = lifecycle::products(db).await;
        assert_eq!(products.len(), 6, "{products:?}");
        let registered = products
            .iter()
            .find(|p| p.full_path == map.display().to_string())
            .expect("the map of scan 1 is registered");
        assert_eq!(registered.product_type, "SCIENCE");
        assert_eq!(registered.relative_path, "output/science/map.fits");
        let content = std::fs::read(&map).unwrap();
        assert_eq!(registered.size_bytes, content.len() as i64);
        assert_eq!(registered.checksum, lifecycle::sha256_hex(&content));
        assert_eq!(
            registered.quality_metrics.as_deref(),
            Some(r#"{"rms_mk":12.5}"#)
        );
        assert!(products.iter().any(|p| p.product_type == "QA_METRIC"));
        let log =
            std::fs::read_to_string(lifecycle::attempt_dir(&root, "calibrate", 1).join("job.log"))
                .unwrap();
        assert!(log.contains("of step calibrate"), "{log}");
    }
}

#[tokio::test]
async fn a_failing_job_is_retried_then_fails_with_its_reason_and_log() {
    for t in TestDatabase::both_migrated("wf_fail").await {
        let db = &t.db;
        let site = site(db, &["fail"], 1.0, 1).await;
        assert_eq!(lifecycle::create_runs(db).await, 3);
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let results = ResultManager::new(db.clone(), local(), site.result_options());

        assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 3);
        // First attempt fails: back to PENDING, retry counted, next attempt delayed.
        let states = settle(db, &results, &["PENDING"], Duration::from_secs(30)).await;
        assert!(states.iter().all(|(_, s)| s == "PENDING"), "{states:?}");
        for run in runs(db).await {
            assert_eq!(run.retry_count, 1);
            assert_eq!(run.exit_code, Some(3));
            assert_eq!(run.error_message.as_deref(), Some("exit code 3"));
        }
        // Not claimed before the back-off has passed.
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().claimed, 0);
        let later = Utc::now() + chrono::Duration::minutes(2);
        assert_eq!(wm.cycle(later).await.unwrap().submitted, 3);
        // Second attempt, in its own directory, fails for good.
        let states = settle(db, &results, &["FAILED"], Duration::from_secs(30)).await;
        assert!(
            states.iter().all(|(_, s)| s == "FAILED"),
            "{states:?} {}",
            t.url
        );
        for run in runs(db).await {
            assert_eq!(run.retry_count, 1);
            let tail = run.log_tail.unwrap_or_default();
            assert!(tail.contains("step failing on purpose"), "{tail}");
        }
        let root = site.base().join("calib/executed_obs_unit=1");
        assert!(
            lifecycle::attempt_dir(&root, "calibrate", 2)
                .join("exit.json")
                .is_file()
        );
        // Failed for good: the trigger-manager does not recreate them.
        assert_eq!(lifecycle::create_runs(db).await, 0);
    }
}

#[tokio::test]
async fn a_job_over_its_time_limit_is_killed_and_failed() {
    for t in TestDatabase::both_migrated("wf_timeout").await {
        let db = &t.db;
        // One second.
        let site = site(db, &["sleep", "60"], 1.0 / 3600.0, 0).await;
        lifecycle::create_runs(db).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let results = ResultManager::new(db.clone(), local(), site.result_options());
        wm.cycle(Utc::now()).await.unwrap();
        let states = settle(db, &results, &["FAILED"], Duration::from_secs(30)).await;
        assert!(
            states.iter().all(|(_, s)| s == "FAILED"),
            "{states:?} {}",
            t.url
        );
        for run in runs(db).await {
            let reason = run.error_message.unwrap_or_default();
            assert!(reason.starts_with("time limit exceeded"), "{reason}");
            assert!(run.wall_time_seconds.unwrap() < 30.0);
        }
    }
}

#[test]
fn the_time_limit_also_ends_what_a_job_started_in_the_background() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("background.pid");
    let script = format!("sleep 600 & echo $! > '{}'; wait", pid_file.display());
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ccat-wfm"))
        .args(["job-wrapper", "--dir"])
        .arg(dir.path())
        .args(["--time-limit", "1", "--", "/bin/sh", "-c", &script])
        // As the local backend starts it: a process group of its own.
        .process_group(0)
        .status()
        .unwrap();
    assert!(!status.success());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("exit.json")).unwrap())
            .unwrap();
    assert_eq!(record["timed_out"], true, "{record}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Gone, or a zombie waiting to be reaped by init: not running either way.
    let alive = || {
        std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim().starts_with('Z'))
            })
            .is_some_and(|zombie| !zombie)
    };
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !alive(),
        "the background sleep {} outlived the time limit",
        pid.trim()
    );
}

#[tokio::test]
async fn cancelling_a_run_stops_its_job_and_it_is_never_collected() {
    for t in TestDatabase::both_migrated("wf_cancel").await {
        let db = &t.db;
        let site = site(db, &["sleep", "600"], 1.0, 0).await;
        lifecycle::create_runs(db).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let results = ResultManager::new(db.clone(), local(), site.result_options());
        wm.cycle(Utc::now()).await.unwrap();
        let states = settle(db, &results, &["RUNNING"], Duration::from_secs(30)).await;
        assert!(states.iter().all(|(_, s)| s == "RUNNING"), "{states:?}");
        let all = runs(db).await;
        let victim = &all[0];
        assert!(db.cancel_run(victim.id, "not needed").await.unwrap());
        let report = results.cycle(Utc::now()).await.unwrap();
        assert_eq!(report.cancelled, 1, "{report:?} {}", t.url);
        let pid: i32 = victim.hpc_job_id.as_deref().unwrap().parse().unwrap();
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            // The wrapper is reaped by whoever is its parent; a zombie counts as gone.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        });
        assert!(gone, "the cancelled job's process {pid} still runs");
        // Handled once; the others keep running; the cancelled run stays cancelled.
        let report = results.cycle(Utc::now()).await.unwrap();
        assert_eq!(report.cancelled, 0);
        let after = runs(db).await;
        assert_eq!(after[0].status, "CANCELLED");
        assert!(after[1..].iter().all(|r| r.status == "RUNNING"));
        for run in &after[1..] {
            db.cancel_run(run.id, "test over").await.unwrap();
        }
        results.cycle(Utc::now()).await.unwrap();
    }
}

#[tokio::test]
async fn data_transfer_staging_waits_then_submits_and_a_failed_staging_fails_the_run() {
    for t in TestDatabase::both_migrated("wf_staging").await {
        let db = &t.db;
        let site = site(db, &["ok"], 1.0, 0).await;
        lifecycle::create_runs(db).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::DataTransfer));
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(report.staging_requested, 3, "{report:?} {}", t.url);
        assert_eq!(scalar(db, "SELECT COUNT(*) FROM staging_job").await, 3);
        assert_eq!(
            scalar(db, "SELECT COUNT(*) FROM staging_job_raw_data_package").await,
            4,
            "packages 1-4, each once"
        );
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(report.waiting_for_staging, 3);

        // data-transfer's part: scan 1's packages arrive; scan 2's staging fails.
        let staged = site.dir.path().join("staged");
        std::fs::create_dir_all(&staged).unwrap();
        let mut sql = String::new();
        for id in [1, 2] {
            let path = staged.join(format!("p{id}.tar"));
            std::fs::write(&path, format!("package {id}")).unwrap();
            sql.push_str(&format!(
                "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path, status) \
                 VALUES (1, {id}, '{}', 'STAGED');",
                path.display()
            ));
        }
        sql.push_str(
            "UPDATE staging_job SET status = 'COMPLETED' WHERE executed_reduction_step_id = \
               (SELECT id FROM executed_reduction_step WHERE sub_group_key = 'executed_obs_unit=1');
             UPDATE staging_job SET status = 'FAILED', failure_error_message = 'tape library offline' \
             WHERE executed_reduction_step_id = \
               (SELECT id FROM executed_reduction_step WHERE sub_group_key = 'executed_obs_unit=2');",
        );
        exec(db, &sql).await.unwrap();
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(
            (report.submitted, report.failed, report.waiting_for_staging),
            (1, 1, 1),
            "{report:?}"
        );
        let all = runs(db).await;
        assert_eq!(all[0].status, "SUBMITTED");
        assert_eq!(
            all[1].error_message.as_deref(),
            Some(
                format!(
                    "staging job {} failed: tape library offline",
                    scalar(
                        db,
                        "SELECT MAX(id) FROM staging_job WHERE status = 'FAILED'"
                    )
                    .await
                )
                .as_str()
            )
        );
        // The staged copies are the ones linked.
        let manifest = std::fs::read_to_string(
            lifecycle::attempt_dir(
                &site.base().join("calib/executed_obs_unit=1"),
                "calibrate",
                1,
            )
            .join("manifest.json"),
        )
        .unwrap();
        let link = site
            .base()
            .join("calib/executed_obs_unit=1/input/calibrate/1_p1.tar");
        assert!(manifest.contains(&link.display().to_string()));
        assert_eq!(std::fs::read_link(&link).unwrap(), staged.join("p1.tar"));
        let results = ResultManager::new(db.clone(), local(), site.result_options());
        settle(
            db,
            &results,
            &["COMPLETED", "FAILED", "STAGING_DATA"],
            Duration::from_secs(30),
        )
        .await;
    }
}

#[tokio::test]
async fn runs_of_a_dead_instance_are_taken_over_and_live_leases_respected() {
    for t in TestDatabase::both_migrated("wf_lease").await {
        let db = &t.db;
        let site = site(db, &["ok"], 1.0, 0).await;
        lifecycle::create_runs(db).await;
        let options = site.options(StagingMode::DataTransfer);
        let first = WorkflowManager::new(db.clone(), local(), options.clone());
        assert_eq!(first.cycle(Utc::now()).await.unwrap().held, 3);
        // Make the holder of run 1 a dead process on this host (in this PID namespace),
        // and of run 2 an instance in a container with the same host name but its own PID
        // namespace, whose pid means nothing here; run 3 stays with `first`.
        let mut parts = first.owner().split(':');
        let (host, namespace) = (parts.next().unwrap(), parts.next().unwrap());
        exec(
            db,
            &format!(
                "UPDATE executed_reduction_step SET lease_owner = '{host}:{namespace}:999999999:dead' \
                 WHERE sub_group_key = 'executed_obs_unit=1';
                 UPDATE executed_reduction_step SET lease_owner = '{host}:99999999999:999999999:pod' \
                 WHERE sub_group_key = 'executed_obs_unit=2';"
            ),
        )
        .await
        .unwrap();
        let second = WorkflowManager::new(db.clone(), local(), options.clone());
        let report = second.cycle(Utc::now()).await.unwrap();
        assert_eq!(
            report.held, 1,
            "only the dead instance's run: {report:?} {}",
            t.url
        );
        // Once the other container's lease expires, it is taken over too.
        let later = Utc::now() + chrono::Duration::minutes(10);
        assert_eq!(second.cycle(later).await.unwrap().held, 3);
        assert_eq!(first.cycle(Utc::now()).await.unwrap().held, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_claim_a_thousand_runs_and_none_twice() {
    for t in TestDatabase::both_migrated("wf_claim").await {
        let db = &t.db;
        let site = site(db, &["ok"], 1.0, 0).await;
        // 1,000 runs, each reading package 1, which is not at the processing location:
        // every claimed run asks data-transfer for it once and waits.
        exec(
            db,
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
             INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
               reduction_software_version_id) SELECT 1, 'k' || i, 'f', 1 FROM n; \
             INSERT INTO executed_reduction_step_raw_input (executed_reduction_step_id, raw_data_package_id) \
             SELECT id, 1 FROM executed_reduction_step;",
        )
        .await
        .unwrap();
        let mut options = site.options(StagingMode::DataTransfer);
        options.claim_batch_size = 50;
        let a = std::sync::Arc::new(WorkflowManager::new(db.clone(), local(), options.clone()));
        let b = std::sync::Arc::new(WorkflowManager::new(db.clone(), local(), options));
        let ta = tokio::spawn(claim_all(a, db.clone()));
        let tb = tokio::spawn(claim_all(b, db.clone()));
        let (ca, cb) = (ta.await.unwrap(), tb.await.unwrap());
        assert_eq!(ca + cb, 1000, "{ca} + {cb} {}", t.url);
        assert!(ca > 0 && cb > 0, "both managers claimed: {ca} + {cb}");
        assert_eq!(
            scalar(
                db,
                "SELECT COUNT(DISTINCT executed_reduction_step_id) FROM staging_job"
            )
            .await,
            1000
        );
        assert_eq!(scalar(db, "SELECT COUNT(*) FROM staging_job").await, 1000);
        assert_eq!(
            scalar(
                db,
                "SELECT COUNT(*) FROM executed_reduction_step WHERE status = 'STAGING_DATA'"
            )
            .await,
            1000
        );
    }
}

/// Cycles until no run is left PENDING; returns how many runs this manager claimed.
async fn claim_all(m: std::sync::Arc<WorkflowManager<LocalBackend>>, db: Database) -> usize {
    let mut claimed = 0;
    loop {
        claimed += m.cycle(Utc::now()).await.unwrap().claimed;
        let pending = scalar(
            &db,
            "SELECT COUNT(*) FROM executed_reduction_step WHERE status = 'PENDING'",
        )
        .await;
        if pending == 0 {
            return claimed;
        }
    }
}

#[tokio::test]
async fn per_pipeline_and_per_backend_limits_hold() {
    for t in TestDatabase::both_migrated("wf_limits").await {
        let db = &t.db;
        let site = site(db, &["ok"], 1.0, 0).await;
        lifecycle::create_runs(db).await;
        exec(db, "UPDATE pipeline SET max_active_runs = 2")
            .await
            .unwrap();
        let mut options = site.options(StagingMode::DataTransfer);
        let wm = WorkflowManager::new(db.clone(), local(), options.clone());
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().claimed, 2, "{}", t.url);
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().claimed, 0);
        exec(db, "UPDATE pipeline SET max_active_runs = NULL")
            .await
            .unwrap();
        options.max_active_jobs = 2;
        let wm = WorkflowManager::new(db.clone(), local(), options);
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().claimed, 0);
    }
}

#[tokio::test]
async fn strings_from_the_database_reach_the_job_verbatim() {
    const NASTY: &[&str] = &[
        "$(touch /tmp/ccat-pwned)",
        "`id`",
        "a b\tc",
        "it's \"quoted\"",
        "semi;colon && pipe | amp &",
        "*",
        "~root",
        "back\\slash",
    ];
    for t in TestDatabase::both_migrated("wf_quote").await {
        let db = &t.db;
        let mut args = vec!["echo-args"];
        args.extend_from_slice(NASTY);
        let site = site(db, &args, 1.0, 0).await;
        // Names of the pipeline and step with metacharacters and a newline too.
        exec(
            db,
            "UPDATE pipeline SET name = 'calib $(x) ''q''\nnl'; \
             UPDATE reduction_step SET name = 'cal;rm -rf /'",
        )
        .await
        .unwrap();
        lifecycle::create_runs(db).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        assert_eq!(
            wm.cycle(Utc::now()).await.unwrap().submitted,
            3,
            "{}",
            t.url
        );
        let results = ResultManager::new(db.clone(), local(), site.result_options());
        let states = settle(db, &results, &["COMPLETED"], Duration::from_secs(30)).await;
        assert!(states.iter().all(|(_, s)| s == "COMPLETED"), "{states:?}");
        let root = site
            .base()
            .join("calib~20~24~28x~29~20~27q~27~0Anl/executed_obs_unit=1");
        let written = std::fs::read_to_string(root.join("output/args.txt")).unwrap();
        assert_eq!(written, format!("{}\n", NASTY.join("\n")));
        assert!(!std::path::Path::new("/tmp/ccat-pwned").exists());
    }
}

#[tokio::test]
async fn an_escaping_link_and_corrupt_metrics_lose_only_themselves() {
    for t in TestDatabase::both_migrated("wf_hostile").await {
        let db = &t.db;
        let site = site(db, &["hostile"], 1.0, 0).await;
        lifecycle::create_runs(db).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        wm.cycle(Utc::now()).await.unwrap();
        let results = ResultManager::new(db.clone(), local(), site.result_options());
        let states = settle(db, &results, &["COMPLETED"], Duration::from_secs(30)).await;
        assert!(
            states.iter().all(|(_, s)| s == "COMPLETED"),
            "{states:?} {}",
            t.url
        );
        let products = lifecycle::products(db).await;
        // Per run: the map (with its metrics) and the summary (without: they were corrupt).
        assert_eq!(products.len(), 6, "{products:?}");
        assert!(products.iter().all(|p| !p.relative_path.contains("escape")));
        assert!(
            products
                .iter()
                .filter(|p| p.name == "summary.txt")
                .all(|p| p.quality_metrics.is_none())
        );
        assert!(
            products
                .iter()
                .filter(|p| p.name == "map.fits")
                .all(|p| p.quality_metrics.is_some())
        );
        for run in runs(db).await {
            let note = run.error_message.unwrap_or_default();
            assert!(
                note.contains("output/science/escape.fits: refused: a symbolic link")
                    && note.contains("summary.txt.metrics.json: metrics ignored"),
                "{note}"
            );
        }
    }
}

/// `ccat-wfm result-manager --once` on `db_url`, with the site's directories.
fn result_manager_process(site: &Site, db_url: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(["result-manager", "--once", "--database-url", db_url])
        .current_dir(site.dir.path())
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("CCAT_OPS_DB_") {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR",
        site.base().display().to_string(),
    );
    cmd
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_result_manager_killed_mid_collection_registers_everything_once_on_restart() {
    for t in TestDatabase::both_migrated("wf_collect_crash").await {
        let db = &t.db;
        let site = site(db, &["big", "256"], 1.0, 0).await;
        // One run: scan 3.
        exec(
            db,
            r#"UPDATE data_grouping SET filter_rules = '[{"table": "RawDataPackage", "column": "id", "operator": "eq", "value": 4}]'"#,
        )
        .await
        .unwrap();
        assert_eq!(lifecycle::create_runs(db).await, 1);
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 1);
        let root = site.base().join("calib/executed_obs_unit=3");
        let exit = root.join("config/calibrate/run-1/attempt-1/exit.json");
        for _ in 0..300 {
            if exit.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(exit.exists(), "the job did not finish");

        // Killed while it reads the 256 MiB product.
        let cube = root.join("output/science/cube.fits");
        let mut child = result_manager_process(&site, &t.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut caught = false;
        for _ in 0..2000 {
            if has_open(child.id(), &cube) {
                child.kill().unwrap();
                caught = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.wait().unwrap();
        assert!(
            caught,
            "the collector was not seen reading the product {}",
            t.url
        );
        assert_eq!(runs(db).await[0].status, "COLLECTING_RESULTS");
        assert!(
            lifecycle::products(db).await.is_empty(),
            "nothing half-registered"
        );

        let out = result_manager_process(&site, &t.url).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(runs(db).await[0].status, "COMPLETED");
        let products = lifecycle::products(db).await;
        let mut paths: Vec<&str> = products.iter().map(|p| p.relative_path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "output/qa/summary.txt",
                "output/science/cube.fits",
                "output/science/map.fits"
            ]
        );
        let cube_row = products.iter().find(|p| p.name == "cube.fits").unwrap();
        assert_eq!(cube_row.size_bytes, 256 << 20);
        // A second restart finds nothing more to do.
        let out = result_manager_process(&site, &t.url).output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["completed"], 0);
        assert_eq!(lifecycle::products(db).await.len(), 3);
    }
}

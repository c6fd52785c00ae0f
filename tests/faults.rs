//! Submission, tracking and collection under races and faults: each case of issue 15,
//! reproduced deterministically (a gated or killing `sbatch`, a controller that forgot
//! finished jobs, a database re-created under the same name, a second processing
//! location on the same database). Each test fails without the guarantee it names.
//!
//! SLURM cases run on the test cluster (`common::slurm`) and PostgreSQL; the others on
//! both databases with the local backend.

mod common;

use std::time::Duration;

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::backend::slurm::SlurmBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::{ResultManager, while_renewing};
use ccat_workflow_manager::workflow::{WorkflowManager, deployment_tag_prefix, job_tag};
use chrono::Utc;
use common::lifecycle::{self, command_json, pipeline_sql, runs, settle};
use common::slurm::{
    self, Controller, Sbatch, insert_runs, job_state, jobs_named, scancel, take_calls,
    while_sbatch_waits, workflow_manager_once, wrappers, wrappers_for,
};
use common::{TestDatabase, exec};

fn local() -> LocalBackend {
    LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()])
}

fn slurm_backend(site: &lifecycle::Site, sbatch: Sbatch, controller: Controller) -> SlurmBackend {
    SlurmBackend {
        bin_dir: wrappers_for(site.dir.path(), sbatch, controller),
        ..Default::default()
    }
}

async fn tag_of(db: &Database, run_id: i64, attempt: i32) -> String {
    job_tag(&deployment_tag_prefix(db).await.unwrap(), run_id, attempt)
}

async fn scalar(db: &Database, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

// ---- 1. A job from another incarnation is never adopted ------------------------------

#[tokio::test]
async fn case1_a_recreated_database_never_adopts_the_previous_incarnations_slurm_job() {
    let (mut t, site) = slurm::setup("f1_slurm", &["sleep", "600"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let options = site.options(StagingMode::Local);
    let honest = || slurm_backend(&site, Sbatch::Honest, Controller::Honest);
    let first = WorkflowManager::new(t.db.clone(), honest(), options.clone());
    assert_eq!(first.cycle(Utc::now()).await.unwrap().submitted, 1);
    let old_job = runs(&t.db).await[0].hpc_job_id.clone().unwrap();

    // ops-db re-created under the same name, the same pipeline base directory: run 1
    // attempt 1 again, with the previous incarnation's job still running.
    t.recreate().await;
    t.db.migrate().await.unwrap();
    lifecycle::load_site(
        &t.db,
        &site,
        &pipeline_sql(&command_json(&["sleep", "600"]), 1.0, 0),
    )
    .await;
    insert_runs(&t.db, 1).await;
    let second = WorkflowManager::new(t.db.clone(), honest(), options);
    let report = second.cycle(Utc::now()).await.unwrap();
    let run = &runs(&t.db).await[0];
    let new_job = run.hpc_job_id.clone().unwrap_or_default();
    scancel(&site, &[old_job.clone(), new_job.clone()]);
    assert_eq!((report.adopted, report.submitted), (0, 1), "{report:?}");
    assert_ne!(
        new_job, old_job,
        "the previous incarnation's job was adopted"
    );
    assert_eq!(
        jobs_named(&site, &tag_of(&t.db, run.id, 1).await),
        [new_job]
    );
    // The old attempt's records were set aside, not read as this attempt's.
    let run_dir = site.base().join("calib/k1/config/calibrate/run-1");
    let aside: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("attempt-1.foreign-"))
        .collect();
    assert_eq!(aside.len(), 1, "{run_dir:?}");
}

#[tokio::test]
async fn case1_a_recreated_database_never_reads_the_previous_incarnations_local_records() {
    for mut t in TestDatabase::both_migrated("f1_local").await {
        let pipeline = pipeline_sql(&command_json(&["ok"]), 1.0, 0);
        let site = lifecycle::setup_site(&t.db, &pipeline, None).await;
        insert_runs(&t.db, 1).await;
        let options = site.options(StagingMode::Local);
        let wm = WorkflowManager::new(t.db.clone(), local(), options.clone());
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 1);
        let rm = ResultManager::new(t.db.clone(), local(), site.result_options());
        settle(&t.db, &rm, &["COMPLETED"], Duration::from_secs(30)).await;

        t.recreate().await;
        t.db.migrate().await.unwrap();
        lifecycle::load_site(&t.db, &site, &pipeline).await;
        insert_runs(&t.db, 1).await;
        let wm = WorkflowManager::new(t.db.clone(), local(), options);
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(
            (report.adopted, report.submitted),
            (0, 1),
            "the previous incarnation's finished job was adopted: {report:?} {}",
            t.url
        );
        let rm = ResultManager::new(t.db.clone(), local(), site.result_options());
        settle(&t.db, &rm, &["COMPLETED"], Duration::from_secs(30)).await;
        assert_eq!(lifecycle::products(&t.db).await.len(), 2, "{}", t.url);
    }
}

// ---- 2. No orphan job after a cancel -----------------------------------------------

#[tokio::test]
async fn case2_a_cancel_during_sbatch_cancels_the_new_job_at_once() {
    let (t, site) = slurm::setup("f2_cancel", &["sleep", "600"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let wm = WorkflowManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Gated, Controller::Honest),
        site.options(StagingMode::Local),
    );
    let cycle = tokio::spawn(async move { wm.cycle(Utc::now()).await.unwrap() });
    let db = t.db.clone();
    while_sbatch_waits(site.dir.path(), async move {
        assert!(db.cancel_run(1, "not needed after all").await.unwrap());
    })
    .await;
    let report = cycle.await.unwrap();
    let jobs = jobs_named(&site, &tag_of(&t.db, 1, 1).await);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let state = job_state(&site, &jobs[0], "CANCELLED").await;
    scancel(&site, &jobs);
    assert_eq!(report.fenced, 1, "{report:?}");
    assert_eq!(
        state, "CANCELLED",
        "the job submitted for a cancelled run runs on"
    );
    assert_eq!(runs(&t.db).await[0].status, "CANCELLED");
}

#[tokio::test]
async fn case2_a_run_cancelled_after_its_submitter_died_mid_submission_has_its_job_cancelled() {
    let (t, site) = slurm::setup("f2_crash", &["sleep", "600"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let crashed = workflow_manager_once(&t.url, &site, &wrappers(site.dir.path(), true));
    assert_eq!(crashed.status.code(), None, "killed: {crashed:?}");
    let jobs = jobs_named(&site, &tag_of(&t.db, 1, 1).await);
    assert_eq!(jobs.len(), 1, "submitted before the crash: {jobs:?}");
    assert!(t.db.cancel_run(1, "operator").await.unwrap());
    let rm = ResultManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::Honest),
        site.result_options(),
    );
    let report = rm.cycle(Utc::now()).await.unwrap();
    let state = job_state(&site, &jobs[0], "CANCELLED").await;
    scancel(&site, &jobs);
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert_eq!(state, "CANCELLED", "an orphan job runs on");
}

// ---- 3. No double submission when a lease expires mid-cycle -------------------------

#[tokio::test]
async fn case3_a_lease_that_expired_before_the_submission_submits_nothing() {
    for t in TestDatabase::both_migrated("f3_expired").await {
        let site =
            lifecycle::setup_site(&t.db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        insert_runs(&t.db, 1).await;
        // A cycle slower than the lease: by the time this run's turn comes, its lease
        // (renewed at the cycle's start) has expired and another instance may take it.
        let mut options = site.options(StagingMode::Local);
        options.lease = chrono::Duration::zero();
        let wm = WorkflowManager::new(t.db.clone(), local(), options);
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert_eq!(
            report.submitted, 0,
            "submitted under an expired lease: {report:?}"
        );
        assert!(
            report.errors[0].contains("lease lost"),
            "{report:?} {}",
            t.url
        );
        let run = &runs(&t.db).await[0];
        assert_eq!(
            (run.status.as_str(), run.hpc_job_id.as_deref()),
            ("STAGING_DATA", None)
        );
    }
}

#[tokio::test]
async fn case3_no_instance_takes_a_run_over_while_its_holder_is_in_sbatch() {
    let (t, site) = slurm::setup("f3_takeover", &["sleep", "600"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let mut options = site.options(StagingMode::Local);
    options.lease = chrono::Duration::seconds(1);
    let a = WorkflowManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Gated, Controller::Honest),
        options.clone(),
    );
    let b = WorkflowManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::Honest),
        options,
    );
    let first = tokio::spawn(async move { a.cycle(Utc::now()).await.unwrap() });
    while_sbatch_waits(site.dir.path(), async {
        // A's one-second lease (from the start of its cycle) is long over.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let report = tokio::time::timeout(Duration::from_secs(20), b.cycle(Utc::now()))
            .await
            .expect("B's cycle hung")
            .unwrap();
        assert_eq!(
            (report.held, report.submitted),
            (0, 0),
            "B took the run over while A was submitting it: {report:?}"
        );
    })
    .await;
    let report = first.await.unwrap();
    let jobs = jobs_named(&site, &tag_of(&t.db, 1, 1).await);
    scancel(&site, &jobs);
    assert_eq!(report.submitted, 1, "{report:?}");
    assert_eq!(jobs.len(), 1, "one job, never two: {jobs:?}");
    assert_eq!(
        runs(&t.db).await[0].hpc_job_id.as_deref(),
        Some(jobs[0].as_str())
    );
}

// ---- 4. Two processing locations (two deployments) on one ops-db --------------------

/// Location 3 with pipeline 2 (`calib-b`, step 4): another deployment's.
const SECOND_LOCATION: &str = r#"
INSERT INTO data_location (id, name, location_type) VALUES (3, 'proc-b', 'PROCESSING');
INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type, priority)
  VALUES (2, 'calib-b', 1, 3, 'CONTINUOUS', 10);
INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id,
                            version_policy, group_by, cooldown_seconds, max_retries, time_hours)
  VALUES (4, 2, 'calibrate', 1, 1, 'EXACT', '["executed_obs_unit"]', 0, 0, 1);
"#;

#[tokio::test]
async fn case4_a_result_manager_follows_and_cancels_only_its_locations_jobs() {
    let (t, site) = slurm::setup("f4_track", &["sleep", "600"], 1.0, 0).await;
    let db = &t.db;
    exec(db, SECOND_LOCATION).await.unwrap();
    insert_runs(db, 1).await;
    // Location 3's jobs run on its own cluster: these ids mean nothing here (or, worse,
    // another user's job).
    exec(
        db,
        "INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
           reduction_software_version_id, status, hpc_backend, hpc_job_id, submitted_at) VALUES \
           (4, 'b1', 'f', 1, 'RUNNING', 'slurm', '99999991', '2026-01-01T00:00:00+00:00'), \
           (4, 'b2', 'f', 1, 'CANCELLED', 'slurm', '99999992', '2026-01-01T00:00:00+00:00')",
    )
    .await
    .unwrap();
    let wm = WorkflowManager::new(
        db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::Honest),
        site.options(StagingMode::Local),
    );
    assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 1);
    let mut options = site.result_options();
    options.vanish_grace = chrono::Duration::zero();
    let rm = ResultManager::new(
        db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::Honest),
        options,
    );
    take_calls(site.dir.path());
    let report = rm.cycle(Utc::now()).await.unwrap();
    let calls = take_calls(site.dir.path());
    let ours = runs(db).await[0].hpc_job_id.clone().unwrap();
    scancel(&site, std::slice::from_ref(&ours));
    assert_eq!(report.polled, 1, "{report:?}");
    assert_eq!((report.failed, report.cancelled), (0, 0), "{report:?}");
    assert_eq!(calls.get("scancel"), None, "{calls:?}");
    let all = runs(db).await;
    assert_eq!(
        all[1].status, "RUNNING",
        "location 3's job failed as vanished"
    );
}

#[tokio::test]
async fn case4_hand_offs_and_worker_tasks_stay_with_their_location() {
    for t in TestDatabase::both_migrated("f4_handoff").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        exec(db, SECOND_LOCATION).await.unwrap();
        exec(
            db,
            "INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
               reduction_software_version_id, status, lease_owner, lease_expires_at) VALUES \
               (4, 'b1', 'f', 1, 'STAGING_DATA', 'celery:t1', '2026-01-01T00:00:00+00:00'); \
             INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
               reduction_software_version_id, status) VALUES (4, 'b2', 'f', 1, 'COLLECTING_RESULTS');",
        )
        .await
        .unwrap();
        db.record_handoffs(&[
            ccat_workflow_manager::dispatch::submit_run(1, 3),
            ccat_workflow_manager::dispatch::collect_run(2, 3),
        ])
        .await
        .unwrap();
        // Location 1's publisher sees none of location 3's hand-offs.
        assert!(
            db.unpublished_handoffs(100, Some(1))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            db.unpublished_handoffs(100, Some(3)).await.unwrap().len(),
            2
        );
        assert_eq!(db.handoff_backlog(Some(1)).await.unwrap(), 0);
        // A location-1 worker given location 3's runs leaves them alone.
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let report = wm.submit_handed_off(1, Utc::now()).await.unwrap();
        assert_eq!(report.held, 0, "{report:?} {}", t.url);
        let rm = ResultManager::new(db.clone(), local(), site.result_options());
        let report = rm.collect_handed_off(2).await.unwrap();
        assert_eq!(report.completed, 0, "{report:?}");
        let all = runs(db).await;
        assert_eq!(
            (all[0].status.as_str(), all[1].status.as_str()),
            ("STAGING_DATA", "COLLECTING_RESULTS"),
            "{}",
            t.url
        );
    }
}

// ---- 5. A controller that forgot finished jobs (no accounting) ----------------------

#[tokio::test]
async fn case5_a_job_the_controller_forgot_ends_by_its_own_record() {
    let (t, site) = slurm::setup("f5_record", &["ok"], 1.0, 0).await;
    insert_runs(&t.db, 2).await;
    // Run 2's software fails.
    exec(
        &t.db,
        &format!(
            "INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref, command) \
             VALUES (2, 1, '2.0.0', 'x', '{}'); \
             UPDATE executed_reduction_step SET reduction_software_version_id = 2 WHERE id = 2",
            command_json(&["fail"])
        ),
    )
    .await
    .unwrap();
    let wm = WorkflowManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::Honest),
        site.options(StagingMode::Local),
    );
    assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 2);
    for run in runs(&t.db).await {
        let id = run.hpc_job_id.unwrap();
        let state = job_state(&site, &id, if run.id == 1 { "COMPLETED" } else { "FAILED" }).await;
        assert!(state == "COMPLETED" || state == "FAILED", "{state}");
    }
    // The result-manager was down past MinJobAge: the controller no longer knows them.
    let mut options = site.result_options();
    options.vanish_grace = chrono::Duration::zero();
    let rm = ResultManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::ForgetsFinishedJobs),
        options,
    );
    settle(
        &t.db,
        &rm,
        &["COMPLETED", "FAILED"],
        Duration::from_secs(30),
    )
    .await;
    let all = runs(&t.db).await;
    assert_eq!(all[0].status, "COMPLETED", "{:?}", all[0].error_message);
    assert_eq!(all[0].exit_code, Some(0));
    assert_eq!(all[1].status, "FAILED");
    assert_eq!(all[1].error_message.as_deref(), Some("exit code 3"));
    assert_eq!(
        lifecycle::products(&t.db).await.len(),
        2,
        "map.fits and summary.txt"
    );
}

#[tokio::test]
async fn case5_a_takeover_adopts_a_finished_job_the_controller_forgot() {
    let (t, site) = slurm::setup("f5_adopt", &["ok"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let crashed = workflow_manager_once(&t.url, &site, &wrappers(site.dir.path(), true));
    assert_eq!(crashed.status.code(), None, "killed: {crashed:?}");
    let jobs = jobs_named(&site, &tag_of(&t.db, 1, 1).await);
    assert_eq!(jobs.len(), 1);
    let state = job_state(&site, &jobs[0], "COMPLETED").await;
    let attempt = site
        .base()
        .join("calib/k1/config/calibrate/run-1/attempt-1");
    assert_eq!(
        state,
        "COMPLETED",
        "{:?}",
        std::fs::read_to_string(attempt.join("job.log"))
    );
    take_calls(site.dir.path());
    let wm = WorkflowManager::new(
        t.db.clone(),
        slurm_backend(&site, Sbatch::Honest, Controller::ForgetsFinishedJobs),
        site.options(StagingMode::Local),
    );
    let report = wm.cycle(Utc::now()).await.unwrap();
    assert_eq!((report.adopted, report.submitted), (1, 0), "{report:?}");
    assert_eq!(
        take_calls(site.dir.path()).get("sbatch"),
        None,
        "submitted twice"
    );
    assert_eq!(
        runs(&t.db).await[0].hpc_job_id.as_deref(),
        Some(jobs[0].as_str())
    );
}

// ---- 7. A long collection is not handed off again ----------------------------------

#[tokio::test]
async fn case7_a_collection_in_progress_renews_itself_and_is_not_handed_off_again() {
    for t in TestDatabase::both_migrated("f7_renew").await {
        let db = &t.db;
        lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        exec(
            db,
            "INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
               reduction_software_version_id, status, updated_at) \
             VALUES (1, 'k1', 'f', 1, 'COLLECTING_RESULTS', '2026-01-01T00:00:00+00:00')",
        )
        .await
        .unwrap();
        let started = Utc::now();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let worker = {
            let db = db.clone();
            // A checksum of many terabytes: done only when the test says so.
            tokio::spawn(async move {
                while_renewing(&db, 1, Duration::from_millis(50), async {
                    held.await.ok();
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The manager looks for collections handed off before `started` and not done.
        let again = db
            .redispatch_stale_collections(1, started, Utc::now(), |id| {
                ccat_workflow_manager::dispatch::collect_run(id, 1)
            })
            .await
            .unwrap();
        release.send(()).unwrap();
        worker.await.unwrap();
        assert!(
            again.is_empty(),
            "handed off again mid-collection: {again:?} {}",
            t.url
        );
    }
}

// ---- 8. A final step that produced nothing fails ------------------------------------

#[tokio::test]
async fn case8_a_final_step_that_leaves_no_product_fails_unless_it_may() {
    for t in TestDatabase::both_migrated("f8_empty").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["empty"]), 1.0, 0), None).await;
        insert_runs(db, 1).await;
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let rm = ResultManager::new(db.clone(), local(), site.result_options());
        assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 1);
        settle(db, &rm, &["COMPLETED", "FAILED"], Duration::from_secs(30)).await;
        let run = &runs(db).await[0];
        assert_eq!(run.status, "FAILED", "{}", t.url);
        assert!(
            run.error_message
                .as_deref()
                .unwrap_or("")
                .contains("registered no product"),
            "{:?}",
            run.error_message
        );
        assert_eq!(run.exit_code, Some(0), "the job's own outcome is kept");
        assert!(
            run.log_tail
                .as_deref()
                .unwrap_or("")
                .contains("writing nothing")
        );
        // A step whose empty output is a result.
        exec(
            db,
            "UPDATE reduction_step SET allow_empty_output = TRUE WHERE id = 1",
        )
        .await
        .unwrap();
        assert!(db.retry_run(run.id).await.unwrap());
        let later = Utc::now();
        assert_eq!(wm.cycle(later).await.unwrap().submitted, 1);
        settle(db, &rm, &["COMPLETED", "FAILED"], Duration::from_secs(30)).await;
        assert_eq!(runs(db).await[0].status, "COMPLETED", "{}", t.url);
        assert_eq!(
            scalar(db, "SELECT COUNT(*) FROM data_product").await,
            0,
            "{}",
            t.url
        );
    }
}

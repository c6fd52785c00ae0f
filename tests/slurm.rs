//! The SLURM backend against a real one-node cluster (`common::slurm`), on PostgreSQL.
//! The fault cases of submission and tracking (crashes, cancels, a forgetful controller)
//! are in `tests/faults.rs`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ccat_workflow_manager::backend::slurm::SlurmBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::ResultManager;
use ccat_workflow_manager::workflow::WorkflowManager;
use chrono::Utc;
use common::exec;
use common::lifecycle::{self, MORE_STEPS, command_json, drive, runs, settle};
use common::slurm::{
    Sbatch, backend, insert_runs, jobs_named, setup, take_calls, workflow_manager_once, wrappers,
    wrappers_with,
};

#[tokio::test]
async fn jobs_complete_and_fail_on_slurm_with_words_passed_verbatim() {
    const NASTY: &[&str] = &[
        "$(touch /tmp/ccat-slurm-pwned)",
        "it's \"q\"",
        "a\nb",
        "x;y|z &",
        "*",
    ];
    let mut args = vec!["echo-args"];
    args.extend_from_slice(NASTY);
    let (t, site) = setup("slurm_ok", &args, 1.0, 0).await;
    let db = &t.db;
    // A second software version that fails, for the run of scan 3.
    exec(
        db,
        &format!(
            "INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref, command) \
             VALUES (2, 1, '2.0.0', 'x', '{}')",
            command_json(&["fail"])
        ),
    )
    .await
    .unwrap();
    assert_eq!(lifecycle::create_runs(db).await, 3);
    exec(
        db,
        "UPDATE executed_reduction_step SET reduction_software_version_id = 2 \
         WHERE sub_group_key = 'executed_obs_unit=3'",
    )
    .await
    .unwrap();
    let wm = WorkflowManager::new(db.clone(), backend(&site), site.options(StagingMode::Local));
    let report = wm.cycle(Utc::now()).await.unwrap();
    assert_eq!(report.submitted, 3, "{report:?}");
    assert_eq!(take_calls(site.dir.path()).get("sbatch"), Some(&3));
    // The job carries its run in its name.
    let run = &runs(db).await[0];
    assert_eq!(
        jobs_named(&site, &wm.job_tag(run.id, 1).await.unwrap()),
        vec![run.hpc_job_id.clone().unwrap()]
    );

    let results = ResultManager::new(db.clone(), backend(&site), site.result_options());
    let states = settle(
        db,
        &results,
        &["COMPLETED", "FAILED"],
        Duration::from_secs(60),
    )
    .await;
    let all = runs(db).await;
    assert_eq!(all[0].status, "COMPLETED", "{states:?}");
    assert_eq!(all[1].status, "COMPLETED");
    assert_eq!(all[0].exit_code, Some(0));
    assert_eq!(all[2].status, "FAILED");
    assert_eq!(all[2].error_message.as_deref(), Some("exit code 3"));
    assert!(
        all[2]
            .log_tail
            .as_deref()
            .unwrap_or("")
            .contains("step failing on purpose")
    );
    let written = std::fs::read_to_string(
        site.base()
            .join("calib/executed_obs_unit=1/output/args.txt"),
    )
    .unwrap();
    assert_eq!(written, format!("{}\n", NASTY.join("\n")));
    assert!(!Path::new("/tmp/ccat-slurm-pwned").exists());
    assert!(
        site.base()
            .join("calib/executed_obs_unit=1/output/science/map.fits")
            .is_file()
    );
}

#[tokio::test]
async fn a_job_over_its_time_limit_ends_as_failed_by_timeout() {
    // SLURM rounds limits up to whole minutes and checks them every 30 s: ~1-1.5 min.
    let (t, site) = setup("slurm_timeout", &["sleep", "600"], 1.0 / 3600.0, 0).await;
    let db = &t.db;
    exec(db, "UPDATE data_grouping SET filter_rules = '[{\"table\": \"RawDataPackage\", \"column\": \"id\", \"operator\": \"eq\", \"value\": 4}]'").await.unwrap();
    assert_eq!(lifecycle::create_runs(db).await, 1);
    let wm = WorkflowManager::new(db.clone(), backend(&site), site.options(StagingMode::Local));
    assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 1);
    let results = ResultManager::new(db.clone(), backend(&site), site.result_options());
    settle(db, &results, &["FAILED"], Duration::from_secs(180)).await;
    let run = &runs(db).await[0];
    assert_eq!(run.status, "FAILED");
    assert!(
        run.error_message
            .as_deref()
            .unwrap_or("")
            .contains("time limit"),
        "{:?}",
        run.error_message
    );
}

#[tokio::test]
async fn cancelling_a_run_cancels_its_slurm_job() {
    let (t, site) = setup("slurm_cancel", &["sleep", "600"], 1.0, 0).await;
    let db = &t.db;
    assert_eq!(lifecycle::create_runs(db).await, 3);
    let wm = WorkflowManager::new(db.clone(), backend(&site), site.options(StagingMode::Local));
    assert_eq!(wm.cycle(Utc::now()).await.unwrap().submitted, 3);
    let results = ResultManager::new(db.clone(), backend(&site), site.result_options());
    let states = settle(db, &results, &["RUNNING"], Duration::from_secs(60)).await;
    assert!(states.iter().all(|(_, s)| s == "RUNNING"), "{states:?}");
    for run in runs(db).await {
        assert!(db.cancel_run(run.id, "not needed").await.unwrap());
    }
    take_calls(site.dir.path());
    assert_eq!(results.cycle(Utc::now()).await.unwrap().cancelled, 3);
    assert_eq!(take_calls(site.dir.path()).get("scancel"), Some(&3));
    for run in runs(db).await {
        assert_eq!(run.status, "CANCELLED");
        let id = run.hpc_job_id.unwrap();
        let mut state = String::new();
        for _ in 0..50 {
            let out = Command::new(wrappers(site.dir.path(), false).join("squeue"))
                .args(["--noheader", "--states=all", "--jobs", &id, "--format=%T"])
                .output()
                .unwrap();
            state = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            if state == "CANCELLED" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(state, "CANCELLED", "job {id}");
    }
}

#[tokio::test]
async fn two_hundred_jobs_cost_one_squeue_a_cycle_and_nothing_else() {
    let (t, site) = setup("slurm_poll", &["ok"], 1.0, 0).await;
    let db = &t.db;
    insert_runs(db, 200).await;
    let wm = WorkflowManager::new(db.clone(), backend(&site), site.options(StagingMode::Local));
    let mut submitted = 0;
    while submitted < 200 {
        submitted += wm.cycle(Utc::now()).await.unwrap().submitted;
    }
    assert_eq!(take_calls(site.dir.path()).get("sbatch"), Some(&200));
    let results = ResultManager::new(db.clone(), backend(&site), site.result_options());
    let mut cycles = 0;
    loop {
        let report = results.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        cycles += 1;
        let calls = take_calls(site.dir.path());
        if report.polled > 0 {
            // One squeue about our jobs, finished ones included; never a command that
            // reads every job of the cluster (`scontrol show job`).
            assert_eq!(calls.get("squeue"), Some(&1), "cycle {cycles}: {calls:?}");
            assert_eq!(calls.len(), 1, "{calls:?}");
        } else {
            assert!(
                calls.is_empty(),
                "nothing to poll, nothing asked: {calls:?}"
            );
            break;
        }
        assert!(cycles < 1500, "jobs did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = runs(db).await;
    assert!(
        all.iter().all(|r| r.status == "COMPLETED"),
        "{:?}",
        all.iter().map(|r| &r.status).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_manager_killed_after_sbatch_adopts_the_job_on_restart() {
    let (t, site) = setup("slurm_crash", &["sleep", "30"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let run_manager = |bin: &Path| workflow_manager_once(&t.url, &site, bin);
    let crashed = run_manager(&wrappers(site.dir.path(), true));
    assert_eq!(
        crashed.status.code(),
        None,
        "killed by a signal: {crashed:?}"
    );
    let run = &runs(&t.db).await[0];
    assert_eq!(run.status, "STAGING_DATA");
    assert_eq!(run.hpc_job_id, None, "the id was never recorded");
    let tag = ccat_workflow_manager::workflow::job_tag(
        &ccat_workflow_manager::workflow::deployment_tag_prefix(&t.db)
            .await
            .unwrap(),
        run.id,
        1,
    );
    assert_eq!(
        jobs_named(&site, &tag).len(),
        1,
        "submitted before the crash"
    );
    take_calls(site.dir.path());

    let restarted = run_manager(&wrappers(site.dir.path(), false));
    assert!(restarted.status.success(), "{restarted:?}");
    let report: serde_json::Value = serde_json::from_slice(&restarted.stdout).unwrap();
    assert_eq!(report["adopted"], 1, "{report}");
    assert_eq!(report["submitted"], 0, "{report}");
    assert_eq!(
        take_calls(site.dir.path()).get("sbatch"),
        None,
        "never submitted again"
    );
    let jobs = jobs_named(&site, &tag);
    assert_eq!(jobs.len(), 1, "exactly one SLURM job: {jobs:?}");
    let run = &runs(&t.db).await[0];
    assert_eq!(run.status, "SUBMITTED");
    assert_eq!(run.hpc_job_id.as_deref(), Some(jobs[0].as_str()));
    Command::new(wrappers(site.dir.path(), false).join("scancel"))
        .arg(&jobs[0])
        .status()
        .unwrap();
}

#[tokio::test]
async fn a_three_step_pipeline_runs_on_slurm_with_products_and_lineage() {
    let (t, site) = setup("slurm_e2e", &["ok"], 1.0, 0).await;
    let db = &t.db;
    exec(db, MORE_STEPS).await.unwrap();
    let wm = WorkflowManager::new(db.clone(), backend(&site), site.options(StagingMode::Local));
    let rm = ResultManager::new(db.clone(), backend(&site), site.result_options());
    drive(db, &wm, &rm, Duration::from_secs(180)).await;
    let all = runs(db).await;
    assert_eq!(all.len(), 8, "{all:?}");
    assert!(all.iter().all(|r| r.status == "COMPLETED"), "{all:?}");
    let products = lifecycle::products(db).await;
    for p in &products {
        let content = std::fs::read(&p.full_path).unwrap();
        assert_eq!(p.checksum, lifecycle::sha256_hex(&content));
    }
    let maps: Vec<&lifecycle::ProductRow> = products
        .iter()
        .filter(|p| p.product_type == "SCIENCE")
        .collect();
    assert_eq!(maps.len(), 2);
    let mut packages = Vec::new();
    for map in maps {
        let id: i64 = match db {
            Database::Postgres(p) => {
                sqlx::query_scalar("SELECT data_product_id FROM physical_copy WHERE full_path = $1")
                    .bind(&map.full_path)
                    .fetch_one(p)
                    .await
                    .unwrap()
            }
            Database::Sqlite(_) => unreachable!("the SLURM tests run on PostgreSQL"),
        };
        let lineage = db.product_lineage(id).await.unwrap().unwrap();
        packages.extend(lineage.raw_data_packages.iter().map(|p| p.id));
    }
    packages.sort();
    assert_eq!(packages, [1, 2, 3, 4], "every CHAI package reaches a map");
}

#[tokio::test]
async fn an_unreadable_sbatch_answer_is_settled_by_the_tag_not_by_a_second_job() {
    let (t, site) = setup("slurm_garble", &["sleep", "30"], 1.0, 0).await;
    insert_runs(&t.db, 1).await;
    let garbling = SlurmBackend {
        bin_dir: wrappers_with(site.dir.path(), Sbatch::Garbles),
        ..Default::default()
    };
    // One lease owner for both instances below, as for two cycles of one manager.
    let wm = WorkflowManager::for_process(t.db.clone(), garbling, site.options(StagingMode::Local));
    let report = wm.cycle(Utc::now()).await.unwrap();
    assert_eq!((report.submitted, report.failed), (0, 0), "{report:?}");
    assert!(report.errors[0].contains("no job id"), "{report:?}");
    let run = &runs(&t.db).await[0];
    assert_eq!(
        (run.status.as_str(), run.hpc_job_id.as_deref()),
        ("STAGING_DATA", None)
    );
    // The next cycle looks the job up by its tag and records it: one job, never two.
    let wm = WorkflowManager::for_process(
        t.db.clone(),
        backend(&site),
        site.options(StagingMode::Local),
    );
    take_calls(site.dir.path());
    let report = wm.cycle(Utc::now()).await.unwrap();
    assert_eq!((report.adopted, report.submitted), (1, 0), "{report:?}");
    assert_eq!(take_calls(site.dir.path()).get("sbatch"), None);
    let tag = wm.job_tag(run.id, 1).await.unwrap();
    let jobs = jobs_named(&site, &tag);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        runs(&t.db).await[0].hpc_job_id.as_deref(),
        Some(jobs[0].as_str())
    );
    Command::new(wrappers(site.dir.path(), false).join("scancel"))
        .arg(&jobs[0])
        .status()
        .unwrap();
}

//! The hostile-input corpus: definitions written straight into the database by other
//! tools (not through `apply`, which validates), run against real SQLite and PostgreSQL.
//! Each entry must end as a clear error on its own pipeline while the others go on.
//! What jobs leave in run directories (links, vanished directories, names that are not
//! UTF-8, huge and sparse files, corrupt or NUL-bearing metrics) is covered next to the
//! collector (`src/results/collect.rs`), corrupt exit records below.

mod common;

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::backend::{Backend, JobRef, JobState};
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::trigger::{self, CycleReport, TriggerOptions};
use chrono::{TimeZone, Utc};
use common::lifecycle::{command_json, pipeline_sql};
use common::{ARCHIVE, TestDatabase, exec};

/// One hostile definition: a pipeline of its own with the given grouping rules, trigger
/// and step, and the text its error must contain (None: no error, it just selects what
/// its rules select).
struct Entry {
    label: &'static str,
    rules: String,
    trigger: (&'static str, &'static str),
    group_by: &'static str,
    /// (software id, pinned version id, policy)
    software: (i64, i64, &'static str),
    /// Malformed JSON cannot even be stored in PostgreSQL's JSONB: SQLite only.
    sqlite_only: bool,
    error: Option<&'static str>,
}

fn entry(label: &'static str, rules: &str, error: Option<&'static str>) -> Entry {
    Entry {
        label,
        rules: rules.to_owned(),
        trigger: ("CONTINUOUS", "{}"),
        group_by: r#"["executed_obs_unit"]"#,
        software: (1, 1, "EXACT"),
        sqlite_only: false,
        error,
    }
}

const CHAI: &str =
    r#"[{"table": "Instrument", "column": "name", "operator": "eq", "value": "CHAI"}]"#;

fn corpus() -> Vec<Entry> {
    let huge: Vec<i64> = (0..100_001).collect();
    let many: Vec<i64> = (0..10_000).collect();
    vec![
        // Filter rules.
        entry(
            "sql-in-a-value",
            r#"[{"table": "Source", "column": "name", "operator": "eq", "value": "x'); DROP TABLE source; --"}]"#,
            None,
        ),
        entry(
            "sql-in-a-json-path",
            r#"[{"table": "RawDataPackage", "column": "metadata", "json_path": "a') OR 1=1; --", "operator": "eq", "value": 1}]"#,
            Some("json_path"),
        ),
        entry(
            "unknown-table",
            r#"[{"table": "pg_shadow", "column": "passwd", "operator": "eq", "value": "x"}]"#,
            Some("unknown table"),
        ),
        entry(
            "unknown-column",
            r#"[{"table": "Source", "column": "name; DROP TABLE source", "operator": "eq", "value": "x"}]"#,
            Some("allowed: id, name"),
        ),
        entry(
            "huge-in-list",
            &format!(
                r#"[{{"table": "Source", "column": "id", "operator": "in", "value": {huge:?}}}]"#
            ),
            Some("at most 10000"),
        ),
        // The largest list allowed is one bound parameter, far from any bind limit.
        entry(
            "largest-in-list",
            &format!(
                r#"[{{"table": "Source", "column": "id", "operator": "in", "value": {many:?}}}]"#
            ),
            None,
        ),
        entry(
            "wrong-type",
            r#"[{"table": "Source", "column": "id", "operator": "eq", "value": "1 OR 1=1"}]"#,
            Some("value"),
        ),
        entry(
            "object-as-value",
            r#"[{"table": "Source", "column": "name", "operator": "eq", "value": {"$ne": ""}}]"#,
            Some("value"),
        ),
        entry(
            "rules-not-a-list",
            r#"{"table": "Source"}"#,
            Some("must be a JSON list"),
        ),
        Entry {
            sqlite_only: true,
            ..entry(
                "rules-not-json",
                "DROP TABLE source",
                Some("filter_rules is not valid JSON"),
            )
        },
        // Triggers.
        Entry {
            trigger: ("CRON", r#"{"cron": "every day"}"#),
            ..entry("cron-invalid", CHAI, Some("5 fields"))
        },
        Entry {
            trigger: ("CRON", r#"{"cron": "0 0 31 2 *"}"#),
            ..entry("cron-never-fires", CHAI, Some("never fires"))
        },
        Entry {
            trigger: ("CRON", r#"{"cron": 5}"#),
            ..entry("cron-not-text", CHAI, Some("needs a \"cron\" expression"))
        },
        Entry {
            trigger: ("CRON", "{cron"),
            sqlite_only: true,
            ..entry(
                "trigger-config-not-json",
                CHAI,
                Some("trigger_config is not valid JSON"),
            )
        },
        // Steps.
        Entry {
            group_by: r#"["planet"]"#,
            ..entry("unknown-dimension", CHAI, Some("unknown dimension"))
        },
        Entry {
            group_by: "source,",
            sqlite_only: true,
            ..entry(
                "group-by-not-json",
                CHAI,
                Some("group_by is not valid JSON"),
            )
        },
        // Software versions.
        Entry {
            software: (1, 2, "EXACT"),
            ..entry("version-of-other-software", CHAI, Some("does not belong"))
        },
        Entry {
            software: (3, 3, "LATEST"),
            ..entry(
                "only-deprecated-versions",
                CHAI,
                Some("no non-deprecated release"),
            )
        },
    ]
}

fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn entry_sql(id: i64, e: &Entry) -> String {
    let (software, version, policy) = e.software;
    format!(
        "INSERT INTO data_grouping (id, name, filter_rules) VALUES ({id}, 'g-{label}', {rules});
         INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type, trigger_config)
           VALUES ({id}, 'hostile-{label}', {id}, 1, '{trigger}', {config});
         INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id,
                                     version_policy, group_by, cooldown_seconds)
           VALUES ({id}, {id}, 'step', {software}, {version}, '{policy}', {group_by}, 0);",
        label = e.label,
        rules = quoted(&e.rules),
        trigger = e.trigger.0,
        config = quoted(e.trigger.1),
        group_by = quoted(e.group_by),
    )
}

const MORE_SOFTWARE: &str = "
INSERT INTO reduction_software (id, name) VALUES (2, 'other'), (3, 'retired');
INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref, deprecated) VALUES
  (2, 2, '1.0.0', 'other:1', FALSE), (3, 3, '1.0.0', 'retired:1', TRUE);";

fn options(location: i64) -> TriggerOptions {
    TriggerOptions {
        processing_location_id: location,
        max_new_runs_per_pipeline: 100,
        dry_run: false,
        only_pipeline: None,
        list_gaps: true,
    }
}

async fn cycle(db: &Database, location: i64) -> CycleReport {
    let now = Utc.with_ymd_and_hms(2026, 11, 28, 4, 0, 0).unwrap();
    trigger::run_cycle(db, &options(location), now)
        .await
        .expect("hostile definitions are errors of their pipelines, not of the cycle")
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    match db {
        Database::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

#[tokio::test]
async fn every_hostile_definition_is_an_error_of_its_own_pipeline() {
    for t in TestDatabase::both_migrated("hostile_defs").await {
        let db = &t.db;
        let sqlite = t.url.starts_with("sqlite");
        exec(db, ARCHIVE).await.unwrap();
        exec(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0))
            .await
            .unwrap();
        exec(db, MORE_SOFTWARE).await.unwrap();
        let corpus: Vec<Entry> = corpus()
            .into_iter()
            .filter(|e| sqlite || !e.sqlite_only)
            .collect();
        for (i, e) in corpus.iter().enumerate() {
            exec(db, &entry_sql(10 + i as i64, e))
                .await
                .unwrap_or_else(|err| panic!("{}: {err}", e.label));
        }

        let report = cycle(db, 1).await;
        for e in &corpus {
            let name = format!("hostile-{}", e.label);
            let errors: Vec<&String> = report
                .errors
                .iter()
                .filter(|m| m.contains(&format!("pipeline {name}:")))
                .collect();
            match e.error {
                Some(text) => {
                    assert_eq!(errors.len(), 1, "{}: {name}: {:?}", t.url, report.errors);
                    assert!(errors[0].contains(text), "{}: {name}: {}", t.url, errors[0]);
                }
                None => assert!(errors.is_empty(), "{}: {name}: {errors:?}", t.url),
            }
        }
        let expected = corpus.iter().filter(|e| e.error.is_some()).count();
        assert_eq!(
            report.errors.len(),
            expected,
            "{}: {:?}",
            t.url,
            report.errors
        );
        // The sound pipeline goes on: its three scans become runs.
        let calib = report
            .pipelines
            .iter()
            .find(|p| p.pipeline == "calib")
            .unwrap();
        assert_eq!(calib.created, 3, "{}", t.url);
        // SQL in a value selected nothing and dropped nothing.
        assert!(count(db, "SELECT COUNT(*) FROM source").await > 0);
        let sql_in_value = report
            .pipelines
            .iter()
            .find(|p| p.pipeline == "hostile-sql-in-a-value")
            .unwrap();
        assert_eq!(sql_in_value.created, 0, "{}", t.url);
        // The largest `in` list allowed works (sources 1..3 of the archive are in it).
        let largest = report
            .pipelines
            .iter()
            .find(|p| p.pipeline == "hostile-largest-in-list")
            .unwrap();
        assert!(largest.created > 0, "{}", t.url);
        // The same errors next cycle, nothing created twice.
        let again = cycle(db, 1).await;
        assert_eq!(again.errors.len(), expected, "{}", t.url);
        assert_eq!(again.created(), 0, "{}", t.url);
    }
}

#[tokio::test]
async fn a_processing_location_that_does_not_exist_is_reported_every_cycle() {
    for t in TestDatabase::both_migrated("hostile_location").await {
        let db = &t.db;
        exec(db, ARCHIVE).await.unwrap();
        exec(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0))
            .await
            .unwrap();
        for location in [99, 2] {
            // 99 does not exist; 2 is the long-term archive, not a processing location.
            for _ in 0..2 {
                let report = cycle(db, location).await;
                assert_eq!(report.errors.len(), 1, "{}", t.url);
                assert!(
                    report.errors[0].contains(&format!("processing location {location}")),
                    "{}: {:?}",
                    t.url,
                    report.errors
                );
                assert_eq!(report.created(), 0);
            }
        }
        assert_eq!(cycle(db, 1).await.created(), 3, "{}", t.url);
    }
}

#[tokio::test]
async fn corrupt_exit_records_fail_the_run_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let backend = LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()]);
    let cases: [(&str, &[u8]); 3] = [
        ("garbage", b"{\"exit_code\": "),
        ("not-utf8", b"\xff\xfe{}"),
        ("wrong-shape", b"[1, 2, 3]"),
    ];
    let mut jobs = Vec::new();
    for (name, content) in cases {
        let attempt = dir.path().join(name);
        std::fs::create_dir_all(&attempt).unwrap();
        std::fs::write(attempt.join("exit.json"), content).unwrap();
        jobs.push(JobRef {
            // No such process: only the record can say how the job ended.
            job_id: "999999999".into(),
            attempt_dir: attempt,
        });
    }
    // Unreadable records fail the run with the reason; one that is not even text reads
    // as no record at all, and the job as vanished (failed after the grace period).
    for job in &jobs {
        let state = backend.status(std::slice::from_ref(job)).await.unwrap();
        let state = &state["999999999"];
        let name = job.attempt_dir.file_name().unwrap().to_str().unwrap();
        match (name, state) {
            ("not-utf8", JobState::Vanished) => {}
            (_, JobState::Failed { reason, .. }) if name != "not-utf8" => {
                assert!(reason.contains("unreadable exit.json"), "{name}: {reason}");
            }
            _ => panic!("{name}: {state:?}"),
        }
    }
}

#[tokio::test]
async fn sub_group_values_with_path_characters_stay_one_directory() {
    use ccat_workflow_manager::config::StagingMode;
    use ccat_workflow_manager::results::ResultManager;
    use ccat_workflow_manager::workflow::WorkflowManager;
    use common::lifecycle;
    use std::time::Duration;

    let long = format!("../{}", "x/".repeat(200));
    for t in TestDatabase::both_migrated("hostile_paths").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        exec(
            db,
            &format!(
                "UPDATE source SET name = {} WHERE id = 1;
                 UPDATE source SET name = {} WHERE id = 2;
                 UPDATE reduction_step SET group_by = '[\"source\"]';",
                quoted("../../etc\n"),
                quoted(&long),
            ),
        )
        .await
        .unwrap();
        let local = || LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()]);
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let rm = ResultManager::new(db.clone(), local(), site.result_options());
        lifecycle::drive(db, &wm, &rm, Duration::from_secs(90)).await;
        let runs = lifecycle::runs(db).await;
        assert_eq!(runs.len(), 2, "{}: {runs:?}", t.url);
        assert!(runs.iter().all(|r| r.status == "COMPLETED"), "{runs:?}");
        // One directory per sub-group, right under the pipeline's, whatever the names.
        let sub_groups: Vec<_> = std::fs::read_dir(site.base().join("calib"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(sub_groups.len(), 2, "{sub_groups:?}");
        for dir in &sub_groups {
            let name = dir.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("source="), "{name}");
            assert!(name.len() <= 255, "{} bytes", name.len());
            assert!(!name.contains('/') && !name.contains('\n'));
        }
        let base = site.base().canonicalize().unwrap();
        for p in lifecycle::products(db).await {
            let path = std::path::Path::new(&p.full_path).canonicalize().unwrap();
            assert!(path.starts_with(&base), "{}", p.full_path);
        }
    }
}

#[tokio::test]
async fn a_software_command_that_is_not_a_list_fails_only_its_runs() {
    use common::lifecycle;

    for t in TestDatabase::both_migrated("hostile_command").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        // A second pipeline on the same data whose software's command is an object.
        exec(
            db,
            r#"INSERT INTO reduction_software (id, name) VALUES (2, 'broken');
               INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref, command)
                 VALUES (2, 2, '1.0.0', 'broken:1', '{"not": "a list"}');
               INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id) VALUES (2, 'broken', 1, 1);
               INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id,
                                           version_policy, group_by, cooldown_seconds, max_retries)
                 VALUES (2, 2, 'step', 2, 2, 'EXACT', '["executed_obs_unit"]', 0, 0);"#,
        )
        .await
        .unwrap();
        assert_eq!(lifecycle::create_runs(db).await, 6);
        let runs = run_to_the_end(db, &site).await;
        // The two pipelines create their runs at once: ids do not say whose a run is,
        // the outcome does. The good pipeline's three complete, the broken one's fail.
        let (completed, failed): (Vec<_>, Vec<_>) =
            runs.iter().partition(|r| r.status == "COMPLETED");
        assert_eq!(completed.len(), 3, "{}: {runs:?}", t.url);
        assert_eq!(failed.len(), 3, "{}: {runs:?}", t.url);
        for r in failed {
            assert_eq!(r.status, "FAILED", "{}: {r:?}", t.url);
            let reason = r.error_message.as_deref().unwrap_or_default();
            assert!(reason.contains("not a JSON list of strings"), "{reason}");
            assert!(
                reason.starts_with("broken 1.0.0"),
                "the broken software's: {reason}"
            );
        }
    }
}

#[tokio::test]
async fn an_input_copy_outside_its_locations_base_path_fails_only_its_run() {
    use common::lifecycle;

    for t in TestDatabase::both_migrated("hostile_confined").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        // Package 1's copy names a file of the host outside the archive.
        exec(
            db,
            &format!(
                "UPDATE data_location SET base_path = {} WHERE id = 2;
                 UPDATE physical_copy SET full_path = '/etc/hostname' WHERE raw_data_package_id = 1;",
                quoted(&site.archive().display().to_string())
            ),
        )
        .await
        .unwrap();
        assert_eq!(lifecycle::create_runs(db).await, 3);
        let runs = run_to_the_end(db, &site).await;
        let failed: Vec<_> = runs.iter().filter(|r| r.status == "FAILED").collect();
        assert_eq!(failed.len(), 1, "{}: {runs:?}", t.url);
        let reason = failed[0].error_message.as_deref().unwrap_or_default();
        assert!(
            reason.contains("lies outside its location's base path"),
            "{reason}"
        );
        assert_eq!(runs.iter().filter(|r| r.status == "COMPLETED").count(), 2);
    }
}

/// Workflow and result cycles on the local backend until every run has COMPLETED or
/// FAILED (at most a minute); the runs then.
async fn run_to_the_end(
    db: &Database,
    site: &common::lifecycle::Site,
) -> Vec<common::lifecycle::RunRow> {
    use ccat_workflow_manager::config::StagingMode;
    use ccat_workflow_manager::results::ResultManager;
    use ccat_workflow_manager::workflow::WorkflowManager;
    use std::time::{Duration, Instant};

    let local = || LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()]);
    let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
    let rm = ResultManager::new(db.clone(), local(), site.result_options());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = wm.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        rm.cycle(Utc::now()).await.unwrap();
        let runs = common::lifecycle::runs(db).await;
        let ended = runs
            .iter()
            .all(|r| r.status == "COMPLETED" || r.status == "FAILED");
        if ended || Instant::now() > deadline {
            return runs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The trigger-manager on SQLite and PostgreSQL: gaps, reprocessing on change, version
//! policies, cooldown, CRON and MANUAL triggers, the per-cycle bound, concurrent
//! trigger-managers, and broken pipelines that do not stop the others.

mod common;

use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::trigger::{self, CycleReport, GapReason, TriggerOptions};
use chrono::{DateTime, Duration, TimeZone, Utc};
use common::TestDatabase;

/// One processing location, CHAI calibration software 1.0.0, 1.1.0 and 2.0.0, and a
/// CONTINUOUS pipeline `calib` with one per-scan step pinned at 1.0.0 (COMPATIBLE).
const PIPELINE: &str = r#"
INSERT INTO data_location (id, name, location_type) VALUES (1, 'proc', 'PROCESSING');
INSERT INTO data_grouping (id, name, filter_rules) VALUES
  (1, 'chai', '[{"table": "Instrument", "column": "name", "operator": "eq", "value": "CHAI"}]');
INSERT INTO reduction_software (id, name) VALUES (1, 'chai-calibration');
INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref) VALUES
  (1, 1, '1.0.0', 'calib:1.0.0'), (2, 1, '1.1.0', 'calib:1.1.0'), (3, 1, '2.0.0', 'calib:2.0.0');
INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type, priority) VALUES
  (1, 'calib', 1, 1, 'CONTINUOUS', 10);
INSERT INTO reduction_step (id, pipeline_id, name, reduction_software_id, reduction_software_version_id,
                            version_policy, group_by, cooldown_seconds) VALUES
  (1, 1, 'calibrate', 1, 1, 'COMPATIBLE', '["executed_obs_unit"]', 0);
INSERT INTO reduction_step_config (reduction_step_id, parameters) VALUES (1, '{"calibration_mode": "hot_cold"}');
"#;

async fn setup(label: &str) -> Vec<TestDatabase> {
    let dbs = TestDatabase::both_migrated(label).await;
    for t in &dbs {
        common::exec(&t.db, common::ARCHIVE).await.unwrap();
        common::exec(&t.db, PIPELINE).await.unwrap();
    }
    dbs
}

fn options() -> TriggerOptions {
    TriggerOptions {
        processing_location_id: 1,
        max_new_runs_per_pipeline: 100,
        dry_run: false,
        only_pipeline: None,
        list_gaps: true,
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 4, 0, 0).unwrap()
}

async fn cycle(db: &Database, now: DateTime<Utc>) -> CycleReport {
    let report = trigger::run_cycle(db, &options(), now).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    report
}

fn created_keys(report: &CycleReport) -> Vec<String> {
    let mut keys: Vec<String> = report
        .pipelines
        .iter()
        .flat_map(|p| &p.gaps)
        .filter(|g| g.run_id.is_some())
        .map(|g| g.sub_group_key.clone())
        .collect();
    keys.sort();
    keys
}

/// A second step `map`, per source, depending on `calibrate`.
async fn add_map_step(db: &Database) {
    common::exec(
        db,
        r#"INSERT INTO reduction_step (id, pipeline_id, name, step_order, reduction_software_id,
                                       reduction_software_version_id, group_by, cooldown_seconds)
             VALUES (2, 1, 'map', 1, 1, 1, '["source"]', 0);
           INSERT INTO reduction_step_dependency (reduction_step_id, depends_on_step_id) VALUES (2, 1);"#,
    )
    .await
    .unwrap();
}

/// A new archived CHAI package (id 7) of scan 3.
async fn add_package_to_scan_3(db: &Database) {
    common::exec(
        db,
        "INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state) \
         VALUES (7, 'p7', 3, 1, 'ARCHIVED')",
    )
    .await
    .unwrap();
}

async fn run_count(db: &Database) -> i64 {
    scalar(db, "SELECT COUNT(*) FROM executed_reduction_step").await
}

async fn scalar(db: &Database, sql: &'static str) -> i64 {
    match db {
        Database::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
    }
}

#[tokio::test]
async fn gaps_become_runs_once_and_new_data_reopens_only_its_sub_group() {
    for t in setup("gaps").await {
        let db = &t.db;
        // Preview first: nothing is created.
        let mut preview = options();
        preview.dry_run = true;
        let report = trigger::run_cycle(db, &preview, t0()).await.unwrap();
        assert_eq!(report.pipelines[0].gaps.len(), 3, "{}", t.url);
        assert_eq!(run_count(db).await, 0, "{}", t.url);

        let report = cycle(db, t0()).await;
        assert_eq!(
            created_keys(&report),
            vec![
                "executed_obs_unit=1",
                "executed_obs_unit=2",
                "executed_obs_unit=3"
            ],
            "{}",
            t.url
        );
        assert!(
            report.pipelines[0]
                .gaps
                .iter()
                .all(|g| g.reason == GapReason::New && g.software_version == "1.1.0")
        );
        let first = report.pipelines[0].gaps[0].run_id.unwrap();
        assert_eq!(
            db.run_raw_inputs(first).await.unwrap(),
            vec![1, 2],
            "{}",
            t.url
        );

        // Nothing changed: no gap.
        let report = cycle(db, t0() + Duration::minutes(1)).await;
        assert!(
            report.pipelines[0].gaps.is_empty(),
            "{}: {:?}",
            t.url,
            report.pipelines[0].gaps
        );

        // A new package of scan 3 arrives: only that sub-group is redone.
        add_package_to_scan_3(db).await;
        let report = cycle(db, t0() + Duration::minutes(2)).await;
        assert_eq!(
            created_keys(&report),
            vec!["executed_obs_unit=3"],
            "{}",
            t.url
        );
        assert_eq!(report.pipelines[0].gaps[0].reason, GapReason::Changed);
        assert_eq!(run_count(db).await, 4, "{}", t.url);
    }
}

#[tokio::test]
async fn software_and_configuration_changes_reopen_gaps_per_policy() {
    for t in setup("reprocess").await {
        let db = &t.db;
        cycle(db, t0()).await;
        // 1.2.0 is compatible with the pinned 1.0.0: everything is redone with it.
        common::exec(
            db,
            "INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref) \
             VALUES (4, 1, '1.2.0', 'calib:1.2.0')",
        )
        .await
        .unwrap();
        let report = cycle(db, t0() + Duration::minutes(1)).await;
        assert_eq!(created_keys(&report).len(), 3, "{}", t.url);
        assert!(
            report.pipelines[0]
                .gaps
                .iter()
                .all(|g| g.software_version == "1.2.0")
        );
        // Deprecating it falls back to 1.1.0, which already ran: no gap.
        common::exec(
            db,
            "UPDATE reduction_software_version SET deprecated = TRUE WHERE id = 4",
        )
        .await
        .unwrap();
        assert!(
            cycle(db, t0() + Duration::minutes(2)).await.pipelines[0]
                .gaps
                .is_empty()
        );
        // EXACT pins 1.0.0: new gaps with that version.
        common::exec(db, "UPDATE reduction_step SET version_policy = 'EXACT'")
            .await
            .unwrap();
        let report = cycle(db, t0() + Duration::minutes(3)).await;
        assert!(
            report.pipelines[0]
                .gaps
                .iter()
                .all(|g| g.software_version == "1.0.0")
        );
        assert_eq!(created_keys(&report).len(), 3, "{}", t.url);
        // LATEST picks 2.0.0.
        common::exec(db, "UPDATE reduction_step SET version_policy = 'LATEST'")
            .await
            .unwrap();
        let report = cycle(db, t0() + Duration::minutes(4)).await;
        assert!(
            report.pipelines[0]
                .gaps
                .iter()
                .all(|g| g.software_version == "2.0.0")
        );
        // A configuration change.
        common::exec(
            db,
            "UPDATE reduction_step_config SET parameters = '{\"calibration_mode\": \"sky\"}'",
        )
        .await
        .unwrap();
        assert_eq!(
            created_keys(&cycle(db, t0() + Duration::minutes(5)).await).len(),
            3,
            "{}",
            t.url
        );
        assert_eq!(run_count(db).await, 15, "{}", t.url);
    }
}

#[tokio::test]
async fn cooldown_holds_a_new_run_back() {
    for t in setup("cooldown").await {
        let db = &t.db;
        common::exec(db, "UPDATE reduction_step SET cooldown_seconds = 3600")
            .await
            .unwrap();
        cycle(db, t0()).await;
        add_package_to_scan_3(db).await;
        let report = cycle(db, t0() + Duration::minutes(10)).await;
        let gap = &report.pipelines[0].gaps[0];
        assert_eq!(
            gap.cooldown_until,
            Some(t0() + Duration::hours(1)),
            "{}",
            t.url
        );
        assert!(gap.run_id.is_none());
        let report = cycle(db, t0() + Duration::minutes(61)).await;
        assert_eq!(
            created_keys(&report),
            vec!["executed_obs_unit=3"],
            "{}",
            t.url
        );
    }
}

#[tokio::test]
async fn cron_pipelines_fire_once_per_tick_across_restarts() {
    for t in setup("cron").await {
        let db = &t.db;
        common::exec(
            db,
            "UPDATE pipeline SET trigger_type = 'CRON', trigger_config = '{\"cron\": \"0 3 * * *\"}'",
        )
        .await
        .unwrap();
        let report = cycle(db, t0()).await;
        assert!(report.pipelines[0].evaluated, "{}", t.url);
        assert_eq!(created_keys(&report).len(), 3);
        // New data before the next tick waits; a "restarted" manager (a fresh cycle call)
        // does not evaluate the same tick again.
        add_package_to_scan_3(db).await;
        let report = cycle(db, t0() + Duration::hours(5)).await;
        assert!(!report.pipelines[0].evaluated, "{}", t.url);
        // The next day's 03:00 tick evaluates it.
        let report = cycle(db, t0() + Duration::hours(23)).await;
        assert!(report.pipelines[0].evaluated, "{}", t.url);
        assert_eq!(
            created_keys(&report),
            vec!["executed_obs_unit=3"],
            "{}",
            t.url
        );
    }
}

#[tokio::test]
async fn manual_pipelines_run_on_request_and_force_makes_new_runs() {
    for t in setup("manual").await {
        let db = &t.db;
        common::exec(db, "UPDATE pipeline SET trigger_type = 'MANUAL'")
            .await
            .unwrap();
        assert!(!cycle(db, t0()).await.pipelines[0].evaluated, "{}", t.url);
        db.request_trigger(1, None, None, false, "test")
            .await
            .unwrap();
        let report = cycle(db, t0()).await;
        assert_eq!(created_keys(&report).len(), 3, "{}", t.url);
        assert!(db.pending_trigger_requests(1).await.unwrap().is_empty());
        // Asked again without force: nothing to do.
        db.request_trigger(1, None, None, false, "test")
            .await
            .unwrap();
        assert!(created_keys(&cycle(db, t0()).await).is_empty());
        // Forced for one sub-group of one step: exactly one new run, twice.
        for _ in 0..2 {
            db.request_trigger(1, Some(1), Some("executed_obs_unit=2"), true, "test")
                .await
                .unwrap();
            let report = cycle(db, t0()).await;
            assert_eq!(
                created_keys(&report),
                vec!["executed_obs_unit=2"],
                "{}",
                t.url
            );
            assert_eq!(report.pipelines[0].gaps[0].reason, GapReason::Forced);
        }
        assert_eq!(run_count(db).await, 5, "{}", t.url);
    }
}

#[tokio::test]
async fn the_per_cycle_bound_defers_the_rest() {
    for t in setup("bound").await {
        let db = &t.db;
        let mut bounded = options();
        bounded.max_new_runs_per_pipeline = 2;
        let report = trigger::run_cycle(db, &bounded, t0()).await.unwrap();
        assert_eq!(
            (report.pipelines[0].created, report.pipelines[0].deferred),
            (2, 1),
            "{}",
            t.url
        );
        let report = trigger::run_cycle(db, &bounded, t0()).await.unwrap();
        assert_eq!(report.pipelines[0].created, 1, "{}", t.url);
    }
}

#[tokio::test]
async fn concurrent_trigger_managers_create_no_duplicates() {
    for t in setup("concurrent").await {
        let db = &t.db;
        // Separate pools, as separate processes would have.
        let other = Database::connect_url(&t.url).await.unwrap();
        let third = Database::connect_url(&t.url).await.unwrap();
        let o = options();
        let (a, b, c) = tokio::join!(
            trigger::run_cycle(db, &o, t0()),
            trigger::run_cycle(&other, &o, t0()),
            trigger::run_cycle(&third, &o, t0()),
        );
        let created: usize = [a, b, c].into_iter().map(|r| r.unwrap().created()).sum();
        assert_eq!(created, 3, "{}", t.url);
        assert_eq!(run_count(db).await, 3, "{}", t.url);
        assert_eq!(
            scalar(db, "SELECT COUNT(*) FROM executed_reduction_step_raw_input").await,
            4,
            "{}",
            t.url
        );
    }
}

#[tokio::test]
async fn a_broken_pipeline_is_reported_and_the_others_still_run() {
    for t in setup("broken").await {
        let db = &t.db;
        common::exec(
            db,
            r#"INSERT INTO data_grouping (id, name, filter_rules) VALUES
                 (2, 'broken', '[{"table": "Planet", "column": "name", "operator": "eq", "value": "x"}]');
               INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, priority) VALUES
                 (2, 'broken-rules', 2, 1, 99);
               INSERT INTO pipeline (id, name, data_grouping_id, processing_location_id, trigger_type, trigger_config)
                 VALUES (3, 'broken-cron', 1, 1, 'CRON', '{"cron": "every day"}');"#,
        )
        .await
        .unwrap();
        db.request_trigger(2, None, None, false, "test")
            .await
            .unwrap();
        let report = trigger::run_cycle(db, &options(), t0()).await.unwrap();
        assert_eq!(report.errors.len(), 2, "{}: {:?}", t.url, report.errors);
        assert!(
            db.pending_trigger_requests(2).await.unwrap().is_empty(),
            "{}",
            t.url
        );
        let status: i64 = scalar(db, "SELECT COUNT(*) FROM trigger_request WHERE status = 'FAILED' AND message LIKE '%Planet%'").await;
        assert_eq!(status, 1, "{}", t.url);
        assert!(report.errors[0].contains("broken-rules") && report.errors[0].contains("Planet"));
        assert!(report.errors[1].contains("broken-cron") && report.errors[1].contains("5 fields"));
        assert_eq!(report.created(), 3, "{}", t.url);
    }
}

#[tokio::test]
async fn downstream_steps_wait_for_upstream_and_leave_out_what_failed_for_good() {
    for t in setup("dag").await {
        let db = &t.db;
        add_map_step(db).await;
        // Calibration runs are created; the maps wait for them.
        let report = cycle(db, t0()).await;
        assert_eq!(report.created(), 3, "{}", t.url);
        assert!(
            report.pipelines[0]
                .gaps
                .iter()
                .all(|g| g.step == "calibrate")
        );

        // Scan 1 (NGC253) completes with products, scan 2 (NGC253) fails for good, scan 3
        // (M82) fails with a retry left.
        common::exec(
            db,
            r#"UPDATE executed_reduction_step SET status = 'COMPLETED' WHERE sub_group_key = 'executed_obs_unit=1';
               UPDATE executed_reduction_step SET status = 'FAILED', retry_count = 3, max_retries = 3 WHERE sub_group_key = 'executed_obs_unit=2';
               UPDATE executed_reduction_step SET status = 'FAILED', retry_count = 0, max_retries = 2 WHERE sub_group_key = 'executed_obs_unit=3';"#,
        )
        .await
        .unwrap();
        complete_with_products(db, "executed_obs_unit=1").await;
        let report = cycle(db, t0() + Duration::minutes(1)).await;
        let maps: Vec<_> = report.pipelines[0]
            .gaps
            .iter()
            .filter(|g| g.step == "map")
            .collect();
        assert_eq!(maps.len(), 1, "{}: {maps:?}", t.url);
        assert_eq!(maps[0].sub_group_key, "source=NGC253");
        let map_run = maps[0].run_id.unwrap();
        let first_products = db.run_product_inputs(map_run).await.unwrap();
        assert_eq!(first_products.len(), 1, "{}: logs are not inputs", t.url);
        let excluded = excluded_upstream(db, map_run).await;
        assert_eq!(
            excluded,
            serde_json::json!([{"step": "calibrate", "sub_group_key": "executed_obs_unit=2"}]),
            "{}",
            t.url
        );

        // M82's calibration fails for good: its map is never made (no input is left).
        common::exec(db, "UPDATE executed_reduction_step SET retry_count = 2 WHERE sub_group_key = 'executed_obs_unit=3'")
            .await
            .unwrap();
        let report = cycle(db, t0() + Duration::minutes(2)).await;
        assert!(
            report.pipelines[0].gaps.is_empty(),
            "{}: {:?}",
            t.url,
            report.pipelines[0].gaps
        );

        // A new NGC253 scan: the map waits for its calibration, then is rebuilt with it.
        common::exec(
            db,
            "INSERT INTO executed_obs_unit (id, obs_unit_id, start_time) VALUES (5, 1, '2026-01-14T00:00:00+00:00');
             INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state)
               VALUES (8, 'p8', 5, 1, 'ARCHIVED');",
        )
        .await
        .unwrap();
        let report = cycle(db, t0() + Duration::minutes(3)).await;
        assert_eq!(
            created_keys(&report),
            vec!["executed_obs_unit=5"],
            "{}: the map waits",
            t.url
        );
        common::exec(db, "UPDATE executed_reduction_step SET status = 'COMPLETED' WHERE sub_group_key = 'executed_obs_unit=5'")
            .await
            .unwrap();
        complete_with_products(db, "executed_obs_unit=5").await;
        let report = cycle(db, t0() + Duration::minutes(4)).await;
        assert_eq!(created_keys(&report), vec!["source=NGC253"], "{}", t.url);
        assert_eq!(report.pipelines[0].gaps[0].reason, GapReason::Changed);
        let new_map = report.pipelines[0].gaps[0].run_id.unwrap();
        assert_eq!(
            db.run_product_inputs(new_map).await.unwrap().len(),
            2,
            "{}",
            t.url
        );
    }
}

/// Registers an intermediate product and a log for the completed run of a sub-group.
async fn complete_with_products(db: &Database, key: &str) {
    let sql = format!(
        "INSERT INTO data_product (executed_reduction_step_id, name, product_type, relative_path, size_bytes, checksum)
           SELECT id, 'cal.fits', 'INTERMEDIATE', 'cal.fits', 1, 'x' FROM executed_reduction_step WHERE sub_group_key = '{key}';
         INSERT INTO data_product (executed_reduction_step_id, name, product_type, relative_path, size_bytes, checksum)
           SELECT id, 'job.log', 'LOG', 'job.log', 1, 'x' FROM executed_reduction_step WHERE sub_group_key = '{key}';"
    );
    common::exec(db, &sql).await.unwrap();
}

async fn excluded_upstream(db: &Database, run: i64) -> serde_json::Value {
    let text: String = match db {
        Database::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT excluded_upstream::text FROM executed_reduction_step WHERE id = $1",
            )
            .bind(run)
            .fetch_one(p)
            .await
        }
        Database::Sqlite(p) => {
            sqlx::query_scalar(
                "SELECT excluded_upstream FROM executed_reduction_step WHERE id = $1",
            )
            .bind(run)
            .fetch_one(p)
            .await
        }
    }
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_dependency_on_a_later_step_is_a_definition_error() {
    for t in setup("dag_order").await {
        let db = &t.db;
        common::exec(
            db,
            r#"INSERT INTO reduction_step (id, pipeline_id, name, step_order, reduction_software_id,
                                           reduction_software_version_id, group_by)
                 VALUES (2, 1, 'early', -1, 1, 1, '[]');
               INSERT INTO reduction_step_dependency (reduction_step_id, depends_on_step_id) VALUES (2, 1);"#,
        )
        .await
        .unwrap();
        let report = trigger::run_cycle(db, &options(), t0()).await.unwrap();
        assert_eq!(report.errors.len(), 1, "{}", t.url);
        assert!(report.errors[0].contains("early"), "{}", report.errors[0]);
    }
}

/// The (step, sub-group) pairs a cold, full evaluation would create runs for now.
async fn expected_gaps(db: &Database, now: DateTime<Utc>) -> Vec<(String, String)> {
    let mut preview = options();
    preview.dry_run = true;
    let report = trigger::run_cycle(db, &preview, now).await.unwrap();
    gap_pairs(&report, |g| g.cooldown_until.is_none())
}

fn created_pairs(report: &CycleReport) -> Vec<(String, String)> {
    gap_pairs(report, |g| g.run_id.is_some())
}

/// The sorted (step, sub-group) pairs of a report's gaps that `keep` keeps.
fn gap_pairs(report: &CycleReport, keep: impl Fn(&trigger::Gap) -> bool) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = report
        .pipelines
        .iter()
        .flat_map(|p| &p.gaps)
        .filter(|g| keep(g))
        .map(|g| (g.step.clone(), g.sub_group_key.clone()))
        .collect();
    pairs.sort();
    pairs
}

/// Runs one cycle of a long-lived evaluator after a change and checks it created exactly
/// what a cold full evaluation says is missing, and that nothing is missing afterwards.
async fn incremental_cycle(
    evaluator: &mut trigger::Evaluator,
    db: &Database,
    now: DateTime<Utc>,
    what: &str,
) -> CycleReport {
    let expected = expected_gaps(db, now).await;
    let report = evaluator.cycle(db, &options(), now).await.unwrap();
    assert!(report.errors.is_empty(), "{what}: {:?}", report.errors);
    assert_eq!(created_pairs(&report), expected, "{what}");
    assert!(expected_gaps(db, now).await.is_empty(), "{what}: gaps left");
    report
}

#[tokio::test]
async fn incremental_cycles_create_what_a_full_evaluation_would_and_look_only_at_changes() {
    for t in setup("incremental").await {
        let db = &t.db;
        let url = &t.url;
        add_map_step(db).await;
        let mut evaluator = trigger::Evaluator::default();
        // PostgreSQL reports a change again while any older transaction anywhere in the
        // cluster (another test's) is still open: correct, but the counts of what was
        // looked at are then exact on SQLite only.
        let exact = matches!(db, Database::Sqlite(_));
        let mut now = t0();
        let mut step = |what: &'static str| {
            now += Duration::minutes(1);
            (what, now)
        };

        let (what, at) = step("first cycle");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert_eq!(report.pipelines[0].mode, trigger::Mode::Full, "{url}");
        assert_eq!(report.created(), 3, "{url}");

        // The runs it created are changes of their own: looked at once, then quiet.
        let (what, at) = step("after own runs");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert_eq!(
            report.pipelines[0].mode,
            trigger::Mode::Incremental,
            "{url}"
        );
        assert!(report.changed_runs >= 3, "{url}");
        if exact {
            assert_eq!(report.changed_runs, 3, "{url}");
        }
        let (what, at) = step("nothing changed");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        if exact {
            assert_eq!(
                (
                    report.changed_packages,
                    report.changed_runs,
                    report.pipelines[0].sub_groups_evaluated
                ),
                (0, 0, 0),
                "{url}"
            );
        }

        // Scans 1 and 2 (NGC253) complete: the NGC253 map is created, M82's still waits.
        common::exec(
            db,
            "UPDATE executed_reduction_step SET status = 'COMPLETED' WHERE reduction_step_id = 1 \
             AND sub_group_key IN ('executed_obs_unit=1', 'executed_obs_unit=2')",
        )
        .await
        .unwrap();
        complete_with_products(db, "executed_obs_unit=1").await;
        complete_with_products(db, "executed_obs_unit=2").await;
        let (what, at) = step("upstream completed");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert_eq!(
            created_pairs(&report),
            vec![("map".to_owned(), "source=NGC253".to_owned())],
            "{url}"
        );

        let (what, at) = step("settle");
        incremental_cycle(&mut evaluator, db, at, what).await;

        // A package of scan 3 finishes its transfer: calibrate of scan 3 is redone, and
        // only the sub-groups it touches are looked at (scan 3 and the M82 map).
        common::exec(
            db,
            "UPDATE raw_data_package SET state = 'ARCHIVED' WHERE id = 6",
        )
        .await
        .unwrap();
        let (what, at) = step("package archived");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert!(report.changed_packages >= 1, "{url}");
        if exact {
            assert_eq!(report.changed_packages, 1, "{url}");
            assert_eq!(report.pipelines[0].sub_groups_evaluated, 2, "{url}");
        }

        // A package leaves the selection: its scan's calibration is redone without it.
        common::exec(
            db,
            "UPDATE raw_data_package SET state = 'FAILED' WHERE id = 2",
        )
        .await
        .unwrap();
        let (what, at) = step("package failed");
        incremental_cycle(&mut evaluator, db, at, what).await;

        // A joined row changes: the source is renamed, so its map sub-group is new.
        common::exec(db, "UPDATE source SET name = 'NGC 253' WHERE id = 1")
            .await
            .unwrap();
        // Packages 1-3 join to it (2 is no longer selected, but is looked at).
        let (what, at) = step("source renamed");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert!(report.changed_packages >= 3, "{url}");
        if exact {
            assert_eq!(report.changed_packages, 3, "{url}");
        }

        // A brand-new scan with a package, written by someone else in one go.
        common::exec(
            db,
            "INSERT INTO executed_obs_unit (id, obs_unit_id, start_time) VALUES (5, 2, '2026-01-14T10:00:00+00:00');
             INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state)
               VALUES (8, 'p8', 5, 2, 'ARCHIVED');",
        )
        .await
        .unwrap();
        let (what, at) = step("new scan");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert!(
            created_pairs(&report)
                .contains(&("calibrate".to_owned(), "executed_obs_unit=5".to_owned())),
            "{url}"
        );

        // A new compatible software version changes the definition: evaluated in full.
        common::exec(
            db,
            "INSERT INTO reduction_software_version (id, reduction_software_id, version, image_ref) \
             VALUES (4, 1, '1.2.0', 'calib:1.2.0')",
        )
        .await
        .unwrap();
        let (what, at) = step("new version");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert_eq!(report.pipelines[0].mode, trigger::Mode::Full, "{url}");

        // A quiet cycle first: the new version's full evaluation is behind us.
        let (what, at) = step("after the new version");
        incremental_cycle(&mut evaluator, db, at, what).await;
        // A run is deleted by hand: its tombstone names its sub-group, which alone is
        // looked at again (incrementally), and the run is recreated as a cold
        // evaluation would.
        common::exec(
            db,
            "DELETE FROM executed_reduction_step WHERE id = (SELECT MAX(id) FROM executed_reduction_step)",
        )
        .await
        .unwrap();
        let (what, at) = step("run deleted");
        let report = incremental_cycle(&mut evaluator, db, at, what).await;
        assert_eq!(report.created(), 1, "{url}");
        assert_eq!(
            report.pipelines[0].mode,
            trigger::Mode::Incremental,
            "a deleted run is no reason to start afresh: {url}"
        );
        if exact {
            assert!(
                report.pipelines[0].sub_groups_evaluated <= 3,
                "only the deleted run's sub-group and what depends on it: {:?} {url}",
                report.pipelines[0]
            );
        }
    }
}

#[tokio::test]
async fn held_back_gaps_are_created_in_later_cycles_without_any_change() {
    for t in setup("held-back").await {
        let db = &t.db;
        let mut evaluator = trigger::Evaluator::default();
        let mut bounded = options();
        bounded.max_new_runs_per_pipeline = 1;
        let mut total = 0;
        for minute in 0..4 {
            let report = evaluator
                .cycle(db, &bounded, t0() + Duration::minutes(minute))
                .await
                .unwrap();
            total += report.created();
        }
        assert_eq!(total, 3, "{}", t.url);
        assert_eq!(run_count(db).await, 3, "{}", t.url);
    }
}

#[cfg(feature = "bench")]
#[tokio::test]
async fn a_synthetic_archive_is_evaluated_alike_on_both_databases() {
    use ccat_workflow_manager::db::synthetic::ArchiveShape;
    let shape = ArchiveShape {
        packages: 1000,
        ..Default::default()
    };
    let mut found = Vec::new();
    for t in TestDatabase::both_migrated("synthetic").await {
        let db = &t.db;
        db.generate_archive(&shape).await.unwrap();
        db.install_synthetic_pipelines(2).await.unwrap();
        let selected = db.read_floor().await.unwrap();
        // Every 100th package is still in transfer, every 20th failed its quality check.
        assert_eq!(selected, 950, "{}", t.url);
        let mut preview = options();
        preview.dry_run = true;
        let report = trigger::run_cycle(db, &preview, t0()).await.unwrap();
        assert!(report.errors.is_empty(), "{}: {:?}", t.url, report.errors);
        assert_eq!(report.pipelines.len(), 10, "{}", t.url);
        for p in &report.pipelines {
            // 20 scans to calibrate; baseline and map wait for them.
            assert_eq!(p.gaps_found, 20, "{}: {}", t.url, p.pipeline);
        }
        let mut gaps: Vec<(String, String, String, usize)> = report
            .pipelines
            .iter()
            .flat_map(|p| &p.gaps)
            .map(|g| {
                (
                    g.pipeline.clone(),
                    g.sub_group_key.clone(),
                    g.fingerprint.clone(),
                    g.inputs,
                )
            })
            .collect();
        gaps.sort();
        found.push(gaps);
    }
    assert_eq!(found[0], found[1], "SQLite and PostgreSQL disagree");
}

/// A transaction left open anywhere on the server pins PostgreSQL's horizon: every cycle
/// then reads the same changes again. After `HORIZON_STUCK_CYCLES` such cycles the
/// evaluator names the transaction that holds it.
#[tokio::test]
async fn a_pinned_horizon_is_reported_with_the_transaction_that_holds_it() {
    use sqlx::Connection;
    let t = TestDatabase::postgres("horizon").await;
    t.db.migrate().await.unwrap();
    common::exec(&t.db, common::ARCHIVE).await.unwrap();
    common::exec(&t.db, PIPELINE).await.unwrap();
    let mut evaluator = trigger::Evaluator::default();
    let mut now = t0();
    evaluator.cycle(&t.db, &options(), now).await.unwrap();
    // Another client opens a transaction, takes a transaction id and goes idle.
    let mut blocker = sqlx::PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut blocker)
        .await
        .unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut blocker)
        .await
        .unwrap();
    // Something is written after it: from now on every cycle sees it again.
    common::exec(&t.db, "UPDATE source SET name = 'NGC 253' WHERE id = 1")
        .await
        .unwrap();
    // Until the transactions of tests running beside this one that began before the
    // blocker have ended, the horizon still moves (up to the blocker's): the count of
    // stuck cycles starts again each time. Once they are gone it stays put.
    let mut reported = None;
    for _ in 0..(trigger::HORIZON_STUCK_CYCLES * 20) {
        now += Duration::minutes(1);
        let report = evaluator.cycle(&t.db, &options(), now).await.unwrap();
        if let Some(blocker) = report.horizon_blocked_by {
            reported = Some(blocker);
            break;
        }
    }
    let reported = reported.expect("the pinned horizon was never reported");
    assert!(reported.contains(&format!("pid {pid}")), "{reported}");
    assert!(reported.contains("pg_current_xact_id"), "{reported}");
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
}

//! End to end with the local backend, on SQLite and PostgreSQL: a three-step pipeline
//! (per-scan calibrate → per-scan baseline → per-source map) from new packages to
//! COMPLETED runs, typed products with correct checksums, and lineage both ways.

mod common;

use std::time::{Duration, Instant};

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::ResultManager;
use ccat_workflow_manager::workflow::WorkflowManager;
use chrono::Utc;
use common::lifecycle::{self, command_json, pipeline_sql, runs};
use common::{TestDatabase, exec};

fn local() -> LocalBackend {
    LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()])
}

const MORE_STEPS: &str = r#"
INSERT INTO reduction_step (id, pipeline_id, name, step_order, reduction_software_id,
                            reduction_software_version_id, version_policy, group_by, cooldown_seconds, max_retries)
VALUES (2, 1, 'baseline', 1, 1, 1, 'EXACT', '["executed_obs_unit"]', 0, 0),
       (3, 1, 'map', 2, 1, 1, 'EXACT', '["source"]', 0, 0);
INSERT INTO reduction_step_dependency (reduction_step_id, depends_on_step_id) VALUES (2, 1), (3, 2);
"#;

/// Trigger, workflow and result cycles until every run is COMPLETED and no new run
/// appears (or the time is up).
async fn drive(
    db: &Database,
    wm: &WorkflowManager<LocalBackend>,
    rm: &ResultManager<LocalBackend>,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let created = lifecycle::create_runs(db).await;
        wm.cycle(Utc::now()).await.unwrap();
        let report = rm.cycle(Utc::now()).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let all = runs(db).await;
        if created == 0 && all.iter().all(|r| r.status == "COMPLETED") || Instant::now() > deadline
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn three_steps_from_packages_to_products_with_lineage_both_ways() {
    for t in TestDatabase::both_migrated("e2e").await {
        let db = &t.db;
        let site =
            lifecycle::setup_site(db, &pipeline_sql(&command_json(&["ok"]), 1.0, 0), None).await;
        exec(db, MORE_STEPS).await.unwrap();
        let wm = WorkflowManager::new(db.clone(), local(), site.options(StagingMode::Local));
        let rm = ResultManager::new(db.clone(), local(), site.result_options());
        drive(db, &wm, &rm).await;

        let all = runs(db).await;
        // CHAI scans 1 and 2 observe NGC253, scan 3 M82: 3 calibrate, 3 baseline, 2 maps.
        assert_eq!(all.len(), 8, "{all:?} {}", t.url);
        assert!(all.iter().all(|r| r.status == "COMPLETED"), "{all:?}");

        let products = lifecycle::products(db).await;
        let intermediates = products
            .iter()
            .filter(|p| p.product_type == "INTERMEDIATE")
            .count();
        assert_eq!(
            intermediates, 6,
            "one result.dat per calibrate and baseline run"
        );
        for p in &products {
            let content = std::fs::read(&p.full_path).unwrap();
            assert_eq!(
                p.checksum,
                lifecycle::sha256_hex(&content),
                "{}",
                p.full_path
            );
            assert_eq!(p.size_bytes, content.len() as i64);
        }
        let ngc_map = products
            .iter()
            .find(|p| p.product_type == "SCIENCE" && p.full_path.contains("source=NGC253"))
            .expect("a map of NGC253");

        // Down: the map → its run → baseline runs → calibrate runs → packages 1, 2, 3.
        let map_id = product_id(db, &ngc_map.full_path).await;
        let lineage = db.product_lineage(map_id).await.unwrap().unwrap();
        let steps: Vec<&str> = lineage.runs.iter().map(|r| r.run.step.as_str()).collect();
        assert_eq!(
            steps,
            ["map", "baseline", "baseline", "calibrate", "calibrate"],
            "{}",
            t.url
        );
        let packages: Vec<i64> = lineage.raw_data_packages.iter().map(|p| p.id).collect();
        assert_eq!(packages, [1, 2, 3]);
        assert_eq!(
            lineage.runs[0].product_inputs.len(),
            2,
            "the two baseline results"
        );
        assert!(
            lineage
                .runs
                .iter()
                .filter(|r| r.run.step == "calibrate")
                .all(|r| !r.raw_inputs.is_empty())
        );

        // Up: package 3 (scan 2) → its calibrate and baseline results and the NGC253 map.
        let derived = db.derived_products(3).await.unwrap();
        let mut steps: Vec<&str> = derived.iter().map(|p| p.step.as_str()).collect();
        steps.sort();
        steps.dedup();
        assert_eq!(steps, ["baseline", "calibrate", "map"]);
        assert!(derived.iter().any(|p| p.id == map_id));
        assert!(derived.iter().all(|p| !p.sub_group_key.contains("M82")));
        // Package 4 (scan 3, M82) never reaches the NGC253 map.
        assert!(
            db.derived_products(4)
                .await
                .unwrap()
                .iter()
                .all(|p| p.id != map_id)
        );
        assert!(db.product_lineage(999_999).await.unwrap().is_none());
    }
}

async fn product_id(db: &Database, full_path: &str) -> i64 {
    const SQL: &str = "SELECT data_product_id FROM physical_copy WHERE full_path = $1";
    match db {
        Database::Postgres(p) => sqlx::query_scalar(SQL)
            .bind(full_path)
            .fetch_one(p)
            .await
            .unwrap(),
        Database::Sqlite(p) => sqlx::query_scalar(SQL)
            .bind(full_path)
            .fetch_one(p)
            .await
            .unwrap(),
    }
}

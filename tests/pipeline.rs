//! End to end with the local backend, on SQLite and PostgreSQL: a three-step pipeline
//! (per-scan calibrate → per-scan baseline → per-source map) from new packages to
//! COMPLETED runs, typed products with correct checksums, and lineage both ways.

mod common;

use std::time::Duration;

use ccat_workflow_manager::backend::local::LocalBackend;
use ccat_workflow_manager::config::StagingMode;
use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::results::ResultManager;
use ccat_workflow_manager::workflow::WorkflowManager;
use common::lifecycle::{self, MORE_STEPS, command_json, drive, pipeline_sql, runs};
use common::{TestDatabase, exec};

fn local() -> LocalBackend {
    LocalBackend::new(vec![env!("CARGO_BIN_EXE_ccat-wfm").to_owned()])
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
        drive(db, &wm, &rm, Duration::from_secs(90)).await;

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

        // New data after the map: package 7 of scan 3 (M82) reprocesses scan 3 and
        // makes a new M82 map; NGC253 is untouched.
        exec(
            db,
            "INSERT INTO raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, state) \
             VALUES (7, 'p7', 3, 1, 'ARCHIVED')",
        )
        .await
        .unwrap();
        let path = site.archive().join("p7.tar");
        std::fs::write(&path, "package 7").unwrap();
        exec(
            db,
            &format!(
                "INSERT INTO physical_copy (data_location_id, raw_data_package_id, full_path) \
                 VALUES (2, 7, '{}')",
                path.display()
            ),
        )
        .await
        .unwrap();
        drive(db, &wm, &rm, Duration::from_secs(90)).await;
        let all = runs(db).await;
        assert_eq!(
            all.len(),
            11,
            "a new calibrate, baseline and M82 map: {all:?}"
        );
        assert!(all.iter().all(|r| r.status == "COMPLETED"), "{all:?}");
        let derived = db.derived_products(7).await.unwrap();
        let new_map = derived
            .iter()
            .find(|p| p.step == "map")
            .expect("a map made from package 7");
        assert_eq!(new_map.sub_group_key, "source=M82");
        let lineage = db.product_lineage(new_map.id).await.unwrap().unwrap();
        let packages: Vec<i64> = lineage.raw_data_packages.iter().map(|p| p.id).collect();
        assert_eq!(packages, [4, 7]);

        // The rerun wrote where the first runs of scan 3 and M82 had: their products were
        // set aside first, so every product registered is still there with its checksum,
        // no two share a file, and the replaced ones are under superseded/run-{id}/.
        let products = lifecycle::products(db).await;
        let mut paths = std::collections::HashSet::new();
        for p in &products {
            let content = std::fs::read(&p.full_path).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert_eq!(lifecycle::sha256_hex(&content), p.checksum, "{p:?}");
            assert!(
                paths.insert(p.full_path.clone()),
                "two products at {}",
                p.full_path
            );
        }
        let superseded: Vec<&str> = products
            .iter()
            .filter(|p| p.full_path.contains("/superseded/"))
            .map(|p| p.full_path.as_str())
            .collect();
        assert_eq!(superseded.len(), 4, "{superseded:?}"); // calibrate, baseline, map and its QA
        assert!(
            superseded
                .iter()
                .any(|p| p.contains("/source=M82/superseded/run-")
                    && p.ends_with("/output/science/map.fits")),
            "{superseded:?}"
        );
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

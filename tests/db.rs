//! The schema and the database layer, on SQLite and PostgreSQL alike.

mod common;

use ccat_workflow_manager::db::{Database, schema};
use common::TestDatabase;

#[tokio::test]
async fn migrate_is_idempotent_and_check_passes() {
    for t in TestDatabase::both("migrate").await {
        let first = t.db.migrate().await.unwrap();
        assert_eq!(first, vec![1, 2, 3, 4, 5], "{}", t.url);
        let second = t.db.migrate().await.unwrap();
        assert!(second.is_empty(), "{}: {second:?}", t.url);
        let report = t.db.check().await.unwrap();
        assert!(report.is_complete(), "{}: {report:?}", t.url);
    }
}

#[tokio::test]
async fn each_database_gets_its_own_deployment_id_once() {
    let mut ids = Vec::new();
    for label in ["deploy_a", "deploy_b"] {
        for t in TestDatabase::both_migrated(label).await {
            let id = t.db.deployment_id().await.unwrap();
            assert_eq!(id.len(), 32, "{}: {id}", t.url);
            t.db.migrate().await.unwrap();
            assert_eq!(t.db.deployment_id().await.unwrap(), id, "stable: {}", t.url);
            ids.push(id);
        }
    }
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}

#[tokio::test]
async fn an_unmigrated_database_has_no_deployment_id_and_says_what_to_do() {
    for t in TestDatabase::both("deploy_none").await {
        let err = t.db.deployment_id().await.unwrap_err().to_string();
        assert!(err.contains("ccat-wfm db migrate"), "{}: {err}", t.url);
    }
}

#[tokio::test]
async fn catalogue_matches_the_migrations_exactly() {
    for t in TestDatabase::both_migrated("catalogue").await {
        let mut present = t.db.columns().await.unwrap();
        present.remove("_sqlx_migrations");
        let catalogue: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            schema::tables(t.db.dialect())
                .iter()
                .map(|t| {
                    (
                        t.name.to_owned(),
                        t.columns.iter().map(|c| (*c).to_owned()).collect(),
                    )
                })
                .collect();
        assert_eq!(present, catalogue, "{}", t.url);
    }
}

#[tokio::test]
async fn check_names_missing_tables_and_columns() {
    for t in TestDatabase::both_migrated("check").await {
        exec(&t.db, "ALTER TABLE raw_data_package DROP COLUMN metadata").await;
        exec(&t.db, "DROP TABLE trigger_request").await;
        let report = t.db.check().await.unwrap();
        assert_eq!(report.missing_tables, vec!["trigger_request"], "{}", t.url);
        assert_eq!(
            report.missing_columns,
            vec![("raw_data_package".to_owned(), "metadata".to_owned())],
            "{}",
            t.url
        );
    }
}

#[tokio::test]
async fn an_empty_database_lacks_every_table() {
    for t in TestDatabase::both("empty").await {
        let report = t.db.check().await.unwrap();
        assert_eq!(
            report.missing_tables.len(),
            schema::tables(t.db.dialect()).len(),
            "{}",
            t.url
        );
    }
}

#[tokio::test]
async fn schema_enforces_enum_values_and_run_uniqueness() {
    for t in TestDatabase::both_migrated("constraints").await {
        let bad_state = common::exec(
            &t.db,
            "INSERT INTO data_location (name, location_type) VALUES ('l', 'processing')",
        )
        .await;
        assert!(
            bad_state.is_err(),
            "{}: lower-case enum value accepted",
            t.url
        );
        seed_run_prerequisites(&t.db).await;
        let insert_run = "INSERT INTO executed_reduction_step \
            (reduction_step_id, sub_group_key, fingerprint, reduction_software_version_id) \
            SELECT (SELECT id FROM reduction_step), 'all', 'f1', (SELECT id FROM reduction_software_version)";
        common::exec(&t.db, insert_run).await.unwrap();
        assert!(
            common::exec(&t.db, insert_run).await.is_err(),
            "{}: duplicate run accepted",
            t.url
        );
    }
}

async fn seed_run_prerequisites(db: &Database) {
    for sql in [
        "INSERT INTO data_location (name, location_type) VALUES ('proc', 'PROCESSING')",
        "INSERT INTO data_grouping (name) VALUES ('g')",
        "INSERT INTO pipeline (name, data_grouping_id, processing_location_id) \
         SELECT 'p', (SELECT id FROM data_grouping), (SELECT id FROM data_location WHERE name = 'proc')",
        "INSERT INTO reduction_software (name) VALUES ('chai-calibration')",
        "INSERT INTO reduction_software_version (reduction_software_id, version, image_ref) \
         SELECT id, '1.0.0', 'img' FROM reduction_software",
        "INSERT INTO reduction_step (pipeline_id, name, reduction_software_id) \
         SELECT (SELECT id FROM pipeline), 'calibrate', (SELECT id FROM reduction_software)",
    ] {
        exec(db, sql).await;
    }
}

async fn exec(db: &Database, sql: &str) {
    common::exec(db, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

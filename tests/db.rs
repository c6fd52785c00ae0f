//! The schema and the database layer, on SQLite and PostgreSQL alike.

mod common;

use ccat_workflow_manager::db::{Database, Dialect, schema};
use common::TestDatabase;

#[tokio::test]
async fn migrate_is_idempotent_and_check_passes() {
    for t in TestDatabase::both("migrate").await {
        let first = t.db.migrate().await.unwrap();
        assert_eq!(first, vec![1, 2, 3, 4, 5, 6, 7], "{}", t.url);
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
async fn check_names_a_missing_change_tracking_trigger() {
    for t in TestDatabase::both_migrated("check_triggers").await {
        let (drop, name) = match t.db.dialect() {
            Dialect::Postgres => (
                "DROP TRIGGER raw_data_package_change_mark ON raw_data_package",
                "raw_data_package_change_mark",
            ),
            Dialect::Sqlite => (
                "DROP TRIGGER raw_data_package_change_mark_insert",
                "raw_data_package_change_mark_insert",
            ),
        };
        exec(&t.db, drop).await;
        let report = t.db.check().await.unwrap();
        assert!(!report.is_complete(), "{}", t.url);
        assert_eq!(report.missing_triggers, vec![name], "{}", t.url);
        assert!(report.missing_tables.is_empty() && report.missing_columns.is_empty());
    }
}

/// An ops-db whose own migrations made the tables but not the change tracking: the DDL
/// `db change-tracking-sql` prints makes it complete.
#[tokio::test]
async fn the_printed_change_tracking_sql_completes_a_schema_without_it() {
    let t = TestDatabase::postgres("tracking_sql").await;
    t.db.migrate().await.unwrap();
    let mut strip = String::from(
        "DROP FUNCTION ccat_set_change_mark() CASCADE; DROP FUNCTION ccat_record_delete() CASCADE; \
         DROP FUNCTION ccat_record_run_delete() CASCADE; DROP TABLE change_tombstone;",
    );
    for table in schema::TRACKED_TABLES {
        strip.push_str(&format!("ALTER TABLE {table} DROP COLUMN change_mark;"));
    }
    exec(&t.db, &strip).await;
    let report = t.db.check().await.unwrap();
    assert_eq!(
        report.missing_functions.len(),
        schema::CHANGE_TRACKING_FUNCTIONS.len(),
        "{report:?}"
    );
    assert_eq!(
        report.missing_triggers.len(),
        schema::change_tracking_triggers(Dialect::Postgres).len()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ccat-wfm"))
        .args(["db", "change-tracking-sql"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    exec(&t.db, &String::from_utf8(out.stdout).unwrap()).await;
    let report = t.db.check().await.unwrap();
    assert!(report.is_complete(), "{report:?}");
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

/// The trigger-manager's reads of a mature archive's run history and upstream products
/// go through the indexes: PostgreSQL reads the runs of the steps asked for, never all.
#[tokio::test]
async fn run_history_and_upstream_product_reads_use_the_indexes() {
    use ccat_workflow_manager::db::pipelines::{PRODUCTS_OF_RUNS_PG, RUNS_OF_STEPS_PG};
    let t = TestDatabase::postgres("plans").await;
    t.db.migrate().await.unwrap();
    seed_run_prerequisites(&t.db).await;
    exec(
        &t.db,
        "INSERT INTO reduction_step (pipeline_id, name, reduction_software_id) \
         SELECT (SELECT id FROM pipeline), 'step' || i, (SELECT id FROM reduction_software) \
         FROM generate_series(1, 49) AS i; \
         INSERT INTO executed_reduction_step (reduction_step_id, sub_group_key, fingerprint, \
           reduction_software_version_id, status) \
         SELECT s.id, 'k' || i, 'f', (SELECT id FROM reduction_software_version), 'COMPLETED' \
         FROM reduction_step s, generate_series(1, 2000) AS i; \
         INSERT INTO data_product (executed_reduction_step_id, name, product_type, relative_path, \
           size_bytes, checksum) \
         SELECT id, 'map', 'SCIENCE', 'output/science/map.fits', 1, 'c' FROM executed_reduction_step; \
         ANALYZE;",
    )
    .await;
    let Database::Postgres(pool) = &t.db else {
        unreachable!()
    };
    let plan = |sql: &'static str, ids: Vec<i64>| async move {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(ids)
            .fetch_all(pool)
            .await
            .unwrap();
        rows.join("\n")
    };
    let steps: Vec<i64> = sqlx::query_scalar("SELECT id FROM reduction_step ORDER BY id LIMIT 2")
        .fetch_all(pool)
        .await
        .unwrap();
    let runs = plan(RUNS_OF_STEPS_PG, steps).await;
    assert!(
        runs.contains("Index") && !runs.contains("Seq Scan on executed_reduction_step"),
        "{runs}"
    );
    let run_ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM executed_reduction_step ORDER BY id LIMIT 500")
            .fetch_all(pool)
            .await
            .unwrap();
    let products = plan(PRODUCTS_OF_RUNS_PG, run_ids).await;
    assert!(
        products.contains("Index") && !products.contains("Seq Scan on data_product"),
        "{products}"
    );
}

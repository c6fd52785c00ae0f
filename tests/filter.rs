//! The filter engine's SQL on SQLite and PostgreSQL: every operator, JSON paths, the
//! instrument-module scope, every dimension, and identical sub-group keys on both.

mod common;

use ccat_workflow_manager::db::Database;
use ccat_workflow_manager::db::filter_sql::Selection;
use ccat_workflow_manager::filter::{Dimension, parse_rules, sub_group_key};
use common::TestDatabase;
use serde_json::{Value, json};

async fn archive(label: &str) -> Vec<TestDatabase> {
    let dbs = TestDatabase::both_migrated(label).await;
    for t in &dbs {
        common::exec(&t.db, common::ARCHIVE).await.unwrap();
    }
    dbs
}

async fn ids(db: &Database, rules: Value) -> Vec<i64> {
    let rules = parse_rules(&rules).unwrap();
    let sel = Selection {
        rules: &rules,
        only_archived: true,
        ..Default::default()
    };
    db.select_packages(&sel)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect()
}

fn rule(table: &str, column: &str, op: &str, value: Value) -> Value {
    json!([{"table": table, "column": column, "operator": op, "value": value}])
}

fn meta(path: &str, op: &str, value: Value) -> Value {
    json!([{"table": "RawDataPackage", "column": "metadata", "json_path": path, "operator": op, "value": value}])
}

#[tokio::test]
async fn every_operator_on_plain_columns() {
    for t in archive("operators").await {
        let db = &t.db;
        let cases: Vec<(Value, Vec<i64>)> = vec![
            (rule("Source", "name", "eq", json!("NGC253")), vec![1, 2, 3]),
            (rule("Source", "name", "neq", json!("NGC253")), vec![4, 5]),
            (
                rule("Source", "name", "in", json!(["NGC253", "M82"])),
                vec![1, 2, 3, 4],
            ),
            (
                rule("Source", "name", "not_in", json!(["NGC253"])),
                vec![4, 5],
            ),
            (
                rule("RawDataPackage", "size_bytes", "gt", json!(30)),
                vec![4, 5],
            ),
            (
                rule("RawDataPackage", "size_bytes", "gte", json!(30)),
                vec![3, 4, 5],
            ),
            (
                rule("RawDataPackage", "size_bytes", "lt", json!(30)),
                vec![1, 2],
            ),
            (
                rule("RawDataPackage", "size_bytes", "lte", json!(30)),
                vec![1, 2, 3],
            ),
            (
                rule("RawDataPackage", "size_bytes", "in", json!([10, 50])),
                vec![1, 5],
            ),
            (rule("Source", "name", "like", json!("NGC%")), vec![1, 2, 3]),
            (rule("Source", "name", "like", json!("ngc%")), vec![]),
            (rule("Instrument", "name", "eq", json!("PrimeCam")), vec![5]),
            (rule("Line", "name", "eq", json!("CII")), vec![4]),
            (
                rule("InstrumentModule", "name", "eq", json!("HFA")),
                vec![2],
            ),
            (rule("ObsUnit", "name", "eq", json!("ou-orion")), vec![5]),
            (
                rule(
                    "ExecutedObsUnit",
                    "start_time",
                    "lt",
                    json!("2026-01-11T00:00:00Z"),
                ),
                vec![1, 2, 3],
            ),
            (
                rule(
                    "ExecutedObsUnit",
                    "start_time",
                    "gte",
                    json!("2026-01-11T01:30:00+01:00"),
                ),
                vec![4, 5],
            ),
            (
                rule(
                    "ExecutedObsUnit",
                    "start_time",
                    "in",
                    json!(["2026-01-10T23:30:00Z"]),
                ),
                vec![1, 2, 3],
            ),
        ];
        for (rules, expected) in cases {
            assert_eq!(ids(db, rules.clone()).await, expected, "{}: {rules}", t.url);
        }
        // Rules are AND-ed.
        let both = json!([
            {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
            {"table": "InstrumentModule", "column": "name", "operator": "eq", "value": "LFA"}
        ]);
        assert_eq!(ids(db, both).await, vec![1, 3], "{}", t.url);
    }
}

#[tokio::test]
async fn json_paths_compare_by_json_type_on_both_databases() {
    for t in archive("json").await {
        let db = &t.db;
        let cases: Vec<(Value, Vec<i64>)> = vec![
            (meta("observation.mode", "eq", json!("otf")), vec![1, 2]),
            (meta("observation.mode", "neq", json!("otf")), vec![3]),
            (
                meta("observation.frequency_ghz", "gte", json!(300)),
                vec![2],
            ),
            (
                meta("observation.frequency_ghz", "lt", json!(300)),
                vec![1, 3],
            ),
            (
                meta("observation.frequency_ghz", "eq", json!(230.5)),
                vec![1, 3],
            ),
            (
                meta("observation.frequency_ghz", "eq", json!("unknown")),
                vec![4],
            ),
            (meta("observation.mode", "like", json!("p%")), vec![3]),
            (
                meta("observation.frequency_ghz", "in", json!([230.5, 460])),
                vec![1, 2, 3],
            ),
            (meta("observation.mode", "not_in", json!(["otf"])), vec![3]),
            (meta("quality.ok", "eq", json!(true)), vec![1]),
            (meta("quality.ok", "eq", json!(false)), vec![3]),
            (meta("no.such-key", "eq", json!(1)), vec![]),
        ];
        for (rules, expected) in cases {
            assert_eq!(ids(db, rules.clone()).await, expected, "{}: {rules}", t.url);
        }
    }
}

#[tokio::test]
async fn scope_state_and_hostile_values() {
    for t in archive("scope").await {
        let db = &t.db;
        let no_rules = [];
        let scoped = Selection {
            rules: &no_rules,
            instrument_module_id: Some(1),
            only_archived: true,
            ..Default::default()
        };
        let got: Vec<i64> = db
            .select_packages(&scoped)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(got, vec![1, 3, 4], "{}", t.url);
        let all = Selection::default();
        assert_eq!(
            db.select_packages(&all).await.unwrap().len(),
            6,
            "{}",
            t.url
        );
        // SQL in a value is just a value.
        let hostile = rule("Source", "name", "eq", json!("x' OR '1'='1"));
        assert_eq!(ids(db, hostile).await, Vec::<i64>::new(), "{}", t.url);
        let hostile = rule("Source", "name", "in", json!(["') OR 1=1 --", "NGC253"]));
        assert_eq!(ids(db, hostile).await, vec![1, 2, 3], "{}", t.url);
    }
}

#[tokio::test]
async fn every_dimension_groups_the_same_on_both_databases() {
    let mut keys_per_db = Vec::new();
    for t in archive("dimensions").await {
        let db = &t.db;
        let mut keys = Vec::new();
        for dim in Dimension::ALL {
            let sel = Selection {
                group_by: std::slice::from_ref(dim),
                only_archived: true,
                ..Default::default()
            };
            let rows = db.select_packages(&sel).await.unwrap();
            let values: Vec<&str> = rows.iter().map(|r| r.dimensions[0].as_str()).collect();
            let expected: &[&str] = match dim {
                Dimension::ExecutedObsUnit => &["1", "1", "2", "3", "4"],
                Dimension::ObsUnit => &["ou-ngc", "ou-ngc", "ou-ngc", "ou-m82", "ou-orion"],
                Dimension::Source => &["NGC253", "NGC253", "NGC253", "M82", "Orion/../KL"],
                Dimension::Line => &["CO43", "CO43", "CO43", "CII", ""],
                Dimension::InstrumentModule => &[
                    "CHAI-LFA",
                    "CHAI-HFA",
                    "CHAI-LFA",
                    "CHAI-LFA",
                    "PrimeCam-280GHz",
                ],
                Dimension::Instrument => &["CHAI", "CHAI", "CHAI", "CHAI", "PrimeCam"],
                // Scan 2 starts 01:30 at +02:00, which is still the 10th in UTC.
                Dimension::Night => &[
                    "2026-01-10",
                    "2026-01-10",
                    "2026-01-10",
                    "2026-01-12",
                    "2026-01-13",
                ],
            };
            assert_eq!(values, expected, "{}: {dim}", t.url);
            keys.extend(
                rows.iter()
                    .map(|r| sub_group_key(&[(*dim, r.dimensions[0].clone())])),
            );
        }
        let sel = Selection {
            group_by: &[Dimension::Source, Dimension::Night],
            only_archived: true,
            ..Default::default()
        };
        for r in db.select_packages(&sel).await.unwrap() {
            keys.push(sub_group_key(&[
                (Dimension::Source, r.dimensions[0].clone()),
                (Dimension::Night, r.dimensions[1].clone()),
            ]));
        }
        keys_per_db.push(keys);
    }
    assert_eq!(keys_per_db[0], keys_per_db[1]);
    assert!(keys_per_db[0].contains(&"source=Orion~2F~2E~2E~2FKL+night=2026-01-13".to_owned()));
}

//! Tests of `db/filter_sql.rs`.

use super::*;
use crate::filter::parse_rules;
use serde_json::json;

#[test]
fn joins_each_table_once_with_its_path() {
    let rules = parse_rules(&json!([
        {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
        {"table": "ObsUnit", "column": "name", "operator": "like", "value": "scan%"},
    ]))
    .unwrap();
    let spec = SelectionSpec {
        rules: &rules,
        instrument_module_id: None,
    };
    let q = render_shared(
        &[spec],
        &[Dimension::Night, Dimension::Source],
        None,
        true,
        Dialect::Postgres,
    )
    .query;
    assert_eq!(
        q.sql.matches("JOIN executed_obs_unit").count(),
        1,
        "{}",
        q.sql
    );
    assert_eq!(q.sql.matches("JOIN obs_unit").count(), 1, "{}", q.sql);
    assert_eq!(q.sql.matches("JOIN source").count(), 1, "{}", q.sql);
    assert!(!q.sql.contains("instrument"), "{}", q.sql);
    assert_eq!(
        q.binds,
        vec![Bind::Text("NGC253".into()), Bind::Text("scan%".into())]
    );
}

#[test]
fn values_never_reach_the_sql_text() {
    let hostile = "x'; DROP TABLE raw_data_package; --";
    let rules = parse_rules(&json!([
            {"table": "Source", "column": "name", "operator": "eq", "value": hostile},
            {"table": "Source", "column": "name", "operator": "in", "value": [hostile]},
            {"table": "RawDataPackage", "column": "metadata", "json_path": "a.b", "operator": "eq", "value": hostile},
        ]))
        .unwrap();
    for dialect in [Dialect::Postgres, Dialect::Sqlite] {
        let spec = SelectionSpec {
            rules: &rules,
            instrument_module_id: None,
        };
        let q = render_shared(&[spec], &[], None, true, dialect).query;
        assert!(!q.sql.contains("DROP"), "{}", q.sql);
    }
}

#[test]
fn a_shared_query_evaluates_each_distinct_condition_once() {
    let good = parse_rules(&json!([
            {"table": "RawDataPackage", "column": "metadata", "json_path": "quality.ok", "operator": "eq", "value": true},
            {"table": "InstrumentModule", "column": "name", "operator": "eq", "value": "LFA"},
        ]))
        .unwrap();
    let other = parse_rules(&json!([
            {"table": "RawDataPackage", "column": "metadata", "json_path": "quality.ok", "operator": "eq", "value": true},
            {"table": "InstrumentModule", "column": "name", "operator": "eq", "value": "HFA"},
        ]))
        .unwrap();
    let specs = [
        SelectionSpec {
            rules: &good,
            instrument_module_id: None,
        },
        SelectionSpec {
            rules: &other,
            instrument_module_id: Some(2),
        },
        SelectionSpec {
            rules: &[],
            instrument_module_id: None,
        },
    ];
    for dialect in [Dialect::Postgres, Dialect::Sqlite] {
        let q = render_shared(&specs, &[Dimension::Source], Some(&[1, 2]), true, dialect);
        assert_eq!(q.conditions, 4, "{}", q.query.sql);
        assert_eq!(
            q.selection_conditions,
            vec![vec![0, 1], vec![2, 0, 3], vec![]]
        );
        // Every placeholder has its value, in order, and no value is inlined.
        let placeholders = (1..=q.query.binds.len())
            .filter(|n| q.query.sql.contains(&format!("${n}")))
            .count();
        assert_eq!(placeholders, q.query.binds.len(), "{}", q.query.sql);
        assert!(!q.query.sql.contains("LFA"), "{}", q.query.sql);
        assert_eq!(q.query.sql.matches("JOIN instrument_module").count(), 1);
        assert!(q.query.sql.contains("AS m0"), "{}", q.query.sql);
    }
}

//! The filter engine's domain side: data-grouping rules and `group_by` dimensions,
//! parsed and validated against a registry, with no I/O (SPEC §4).
//!
//! A rule names a table by its model name (`Source`) or table name (`source`), a column,
//! an operator and a value, optionally a `json_path` into a JSON column. Everything a rule
//! may name is in [`TABLES`]; anything else is a [`FilterError`] naming the rule. The SQL
//! for validated rules is rendered by `db::filter_sql`, which owns the join paths.

mod subgroup;

use std::fmt;

use serde_json::Value;

pub use subgroup::{SubGroup, sub_group_key};

/// The most values an `in` / `not_in` rule may list.
pub const MAX_IN_VALUES: usize = 10_000;
/// The deepest `json_path` accepted.
const MAX_JSON_PATH_SEGMENTS: usize = 16;

/// A table a rule can filter on. The query root is always [`FilterTable::RawDataPackage`];
/// `db::filter_sql` knows how each one is joined to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterTable {
    RawDataPackage,
    ExecutedObsUnit,
    ObsUnit,
    Source,
    Line,
    InstrumentModule,
    Instrument,
}

/// The kind of a filterable column, which decides the values and operators it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Integer,
    Float,
    /// RFC 3339 date-time text in rules.
    Timestamp,
    /// Reached only through `json_path`.
    Json,
}

pub struct TableSpec {
    pub table: FilterTable,
    pub model: &'static str,
    pub sql_name: &'static str,
    pub columns: &'static [(&'static str, ColumnKind)],
}

use ColumnKind::{Float, Integer, Json, Text, Timestamp};

/// Every table and column a filter rule may name.
pub const TABLES: &[TableSpec] = &[
    TableSpec {
        table: FilterTable::RawDataPackage,
        model: "RawDataPackage",
        sql_name: "raw_data_package",
        columns: &[
            ("id", Integer),
            ("name", Text),
            ("state", Text),
            ("size_bytes", Integer),
            ("executed_obs_unit_id", Integer),
            ("instrument_module_id", Integer),
            ("created_at", Timestamp),
            ("metadata", Json),
        ],
    },
    TableSpec {
        table: FilterTable::ExecutedObsUnit,
        model: "ExecutedObsUnit",
        sql_name: "executed_obs_unit",
        columns: &[
            ("id", Integer),
            ("obs_unit_id", Integer),
            ("start_time", Timestamp),
            ("end_time", Timestamp),
        ],
    },
    TableSpec {
        table: FilterTable::ObsUnit,
        model: "ObsUnit",
        sql_name: "obs_unit",
        columns: &[
            ("id", Integer),
            ("name", Text),
            ("source_id", Integer),
            ("line_id", Integer),
        ],
    },
    TableSpec {
        table: FilterTable::Source,
        model: "Source",
        sql_name: "source",
        columns: &[
            ("id", Integer),
            ("name", Text),
            ("ra_deg", Float),
            ("dec_deg", Float),
        ],
    },
    TableSpec {
        table: FilterTable::Line,
        model: "Line",
        sql_name: "line",
        columns: &[
            ("id", Integer),
            ("name", Text),
            ("rest_frequency_ghz", Float),
        ],
    },
    TableSpec {
        table: FilterTable::InstrumentModule,
        model: "InstrumentModule",
        sql_name: "instrument_module",
        columns: &[("id", Integer), ("name", Text), ("instrument_id", Integer)],
    },
    TableSpec {
        table: FilterTable::Instrument,
        model: "Instrument",
        sql_name: "instrument",
        columns: &[("id", Integer), ("name", Text)],
    },
];

impl FilterTable {
    pub fn spec(self) -> &'static TableSpec {
        TABLES
            .iter()
            .find(|s| s.table == self)
            .expect("every table has a spec")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    In,
    NotIn,
    Gt,
    Gte,
    Lt,
    Lte,
    Like,
}

impl Operator {
    const ALL: &'static [(&'static str, Operator)] = &[
        ("eq", Operator::Eq),
        ("neq", Operator::Neq),
        ("in", Operator::In),
        ("not_in", Operator::NotIn),
        ("gt", Operator::Gt),
        ("gte", Operator::Gte),
        ("lt", Operator::Lt),
        ("lte", Operator::Lte),
        ("like", Operator::Like),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, o)| *o == self)
            .expect("listed")
            .0
    }

    fn is_list(self) -> bool {
        matches!(self, Operator::In | Operator::NotIn)
    }
}

/// A value bound into a query. Rules never put text into SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Timestamp(chrono::DateTime<chrono::Utc>),
    /// A JSON scalar compared with a value inside a JSON column.
    Json(Value),
}

/// What a rule compares with: one value, or the list of `in` / `not_in`.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    One(FilterValue),
    List(Vec<FilterValue>),
}

/// A rule that passed validation: every identifier comes from [`TABLES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub table: FilterTable,
    pub column: &'static str,
    pub kind: ColumnKind,
    /// Keys into the JSON column, each `[A-Za-z0-9_-]+`.
    pub json_path: Vec<String>,
    pub operator: Operator,
    pub operand: Operand,
}

/// A rule that failed validation: which one (its position, from 1), which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter rule {index} ({rule}): {field}: {message}")]
pub struct FilterError {
    pub index: usize,
    /// The rule as written, shortened.
    pub rule: String,
    pub field: &'static str,
    pub message: String,
}

/// Parses and validates a data grouping's `filter_rules` (a JSON list of rule objects).
pub fn parse_rules(rules: &Value) -> Result<Vec<Rule>, FilterError> {
    let Value::Array(items) = rules else {
        return Err(FilterError {
            index: 0,
            rule: shorten(rules),
            field: "filter_rules",
            message: "must be a JSON list of rule objects".into(),
        });
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            parse_rule(item).map_err(|(field, message)| FilterError {
                index: i + 1,
                rule: shorten(item),
                field,
                message,
            })
        })
        .collect()
}

type FieldError = (&'static str, String);

fn parse_rule(item: &Value) -> Result<Rule, FieldError> {
    let Value::Object(obj) = item else {
        return Err((
            "rule",
            "must be an object with table, column, operator and value".into(),
        ));
    };
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "table" | "column" | "operator" | "value" | "json_path"
        ) {
            return Err((
                "rule",
                format!(
                    "unknown field {key:?}; allowed: table, column, operator, value, json_path"
                ),
            ));
        }
    }
    let text = |field: &'static str| -> Result<&str, FieldError> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err((field, format!("must be a string, got {}", shorten(other)))),
            None => Err((field, "is missing".into())),
        }
    };

    let table_name = text("table")?;
    let spec = TABLES
        .iter()
        .find(|s| s.model == table_name || s.sql_name == table_name)
        .ok_or_else(|| {
            let allowed: Vec<&str> = TABLES.iter().map(|s| s.model).collect();
            (
                "table",
                format!(
                    "unknown table {table_name:?}; allowed: {}",
                    allowed.join(", ")
                ),
            )
        })?;
    let column_name = text("column")?;
    let (column, kind) = spec
        .columns
        .iter()
        .find(|(c, _)| *c == column_name)
        .copied()
        .ok_or_else(|| {
            let allowed: Vec<&str> = spec.columns.iter().map(|(c, _)| *c).collect();
            (
                "column",
                format!(
                    "{} has no column {column_name:?}; allowed: {}",
                    spec.model,
                    allowed.join(", ")
                ),
            )
        })?;
    let operator_name = text("operator")?;
    let operator = Operator::ALL
        .iter()
        .find(|(n, _)| *n == operator_name)
        .map(|(_, o)| *o)
        .ok_or_else(|| {
            let allowed: Vec<&str> = Operator::ALL.iter().map(|(n, _)| *n).collect();
            (
                "operator",
                format!(
                    "unknown operator {operator_name:?}; allowed: {}",
                    allowed.join(" ")
                ),
            )
        })?;

    let json_path = match obj.get("json_path") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(path)) => parse_json_path(path)?,
        Some(other) => {
            return Err((
                "json_path",
                format!("must be a string, got {}", shorten(other)),
            ));
        }
    };
    // The effective kind: a JSON column is only reachable through a path.
    let kind = match (kind, json_path.is_empty()) {
        (Json, true) => {
            return Err((
                "json_path",
                format!("{column} is a JSON column: give a json_path into it"),
            ));
        }
        (Json, false) => Json,
        (_, false) => return Err(("json_path", format!("{column} is not a JSON column"))),
        (kind, true) => kind,
    };
    if operator == Operator::Like && !matches!(kind, Text | Json) {
        return Err((
            "operator",
            format!("like needs a text column; {column} is not one"),
        ));
    }

    let value = obj.get("value").ok_or(("value", "is missing".to_owned()))?;
    let operand = if operator.is_list() {
        let Value::Array(values) = value else {
            return Err((
                "value",
                format!("{} needs a list, got {}", operator.name(), shorten(value)),
            ));
        };
        if values.is_empty() {
            return Err((
                "value",
                format!("{} needs at least one value", operator.name()),
            ));
        }
        if values.len() > MAX_IN_VALUES {
            return Err((
                "value",
                format!(
                    "{} lists {} values; at most {MAX_IN_VALUES} are allowed",
                    operator.name(),
                    values.len()
                ),
            ));
        }
        Operand::List(
            values
                .iter()
                .map(|v| typed_value(kind, operator, v))
                .collect::<Result<_, _>>()?,
        )
    } else {
        Operand::One(typed_value(kind, operator, value)?)
    };
    Ok(Rule {
        table: spec.table,
        column,
        kind,
        json_path,
        operator,
        operand,
    })
}

fn parse_json_path(path: &str) -> Result<Vec<String>, FieldError> {
    let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
    if segments.len() > MAX_JSON_PATH_SEGMENTS {
        return Err((
            "json_path",
            format!("has more than {MAX_JSON_PATH_SEGMENTS} segments"),
        ));
    }
    for segment in &segments {
        let valid = !segment.is_empty()
            && segment.len() <= 128
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err((
                "json_path",
                format!(
                    "{:?} is not a dotted list of keys made of letters, digits, '_' and '-'",
                    path.chars().take(80).collect::<String>()
                ),
            ));
        }
    }
    Ok(segments)
}

/// Checks a rule value against the column kind and turns it into a bind value.
fn typed_value(
    kind: ColumnKind,
    operator: Operator,
    value: &Value,
) -> Result<FilterValue, FieldError> {
    let wrong = |expected: &str| {
        (
            "value",
            format!("expected {expected}, got {}", shorten(value)),
        )
    };
    if operator == Operator::Like {
        return match value {
            Value::String(s) => Ok(FilterValue::Text(s.clone())),
            _ => Err(wrong("a text pattern")),
        };
    }
    match kind {
        Text => match value {
            Value::String(s) => Ok(FilterValue::Text(s.clone())),
            _ => Err(wrong("text")),
        },
        Integer => value
            .as_i64()
            .map(FilterValue::Integer)
            .ok_or_else(|| wrong("an integer")),
        Float => value
            .as_f64()
            .map(FilterValue::Float)
            .ok_or_else(|| wrong("a number")),
        Timestamp => value
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| FilterValue::Timestamp(t.with_timezone(&chrono::Utc)))
            .ok_or_else(|| wrong("an RFC 3339 date-time such as 2026-01-31T00:00:00Z")),
        Json => match value {
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                Ok(FilterValue::Json(value.clone()))
            }
            _ => Err(wrong("a string, number or boolean")),
        },
    }
}

fn shorten(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 120 {
        format!("{}…", text.chars().take(120).collect::<String>())
    } else {
        text
    }
}

/// A `group_by` dimension (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    ExecutedObsUnit,
    ObsUnit,
    Source,
    Line,
    InstrumentModule,
    Instrument,
    /// The UTC date of the scan start.
    Night,
}

impl Dimension {
    pub const ALL: &'static [Dimension] = &[
        Dimension::ExecutedObsUnit,
        Dimension::ObsUnit,
        Dimension::Source,
        Dimension::Line,
        Dimension::InstrumentModule,
        Dimension::Instrument,
        Dimension::Night,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dimension::ExecutedObsUnit => "executed_obs_unit",
            Dimension::ObsUnit => "obs_unit",
            Dimension::Source => "source",
            Dimension::Line => "line",
            Dimension::InstrumentModule => "instrument_module",
            Dimension::Instrument => "instrument",
            Dimension::Night => "night",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a step's `group_by` (a JSON list of dimension names; `[]` = one sub-group).
pub fn parse_group_by(value: &Value) -> Result<Vec<Dimension>, String> {
    let allowed = || {
        Dimension::ALL
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Value::Array(items) = value else {
        return Err(format!(
            "group_by must be a list of dimensions ({})",
            allowed()
        ));
    };
    let mut dims = Vec::with_capacity(items.len());
    for item in items {
        let name = item.as_str().unwrap_or_default();
        let dim = Dimension::ALL
            .iter()
            .find(|d| d.name() == name)
            .copied()
            .ok_or_else(|| format!("group_by: unknown dimension {item}; allowed: {}", allowed()))?;
        if dims.contains(&dim) {
            return Err(format!("group_by: dimension {name} is listed twice"));
        }
        dims.push(dim);
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(rule: Value) -> Result<Rule, FilterError> {
        parse_rules(&json!([rule])).map(|mut r| r.remove(0))
    }

    #[test]
    fn accepts_every_operator() {
        for (op, value) in [
            ("eq", json!("NGC253")),
            ("neq", json!("NGC253")),
            ("in", json!(["a", "b"])),
            ("not_in", json!(["a"])),
            ("gt", json!("M")),
            ("gte", json!("M")),
            ("lt", json!("M")),
            ("lte", json!("M")),
            ("like", json!("NGC%")),
        ] {
            let rule =
                one(json!({"table": "Source", "column": "name", "operator": op, "value": value}))
                    .unwrap();
            assert_eq!(rule.operator.name(), op);
        }
    }

    #[test]
    fn json_paths_and_typed_values() {
        let rule = one(json!({"table": "RawDataPackage", "column": "metadata",
            "json_path": "observation.frequency_ghz", "operator": "gte", "value": 230.5}))
        .unwrap();
        assert_eq!(rule.json_path, vec!["observation", "frequency_ghz"]);
        assert_eq!(rule.operand, Operand::One(FilterValue::Json(json!(230.5))));
        let rule = one(
            json!({"table": "executed_obs_unit", "column": "start_time", "operator": "lt",
            "value": "2026-01-02T03:00:00+01:00"}),
        )
        .unwrap();
        let Operand::One(FilterValue::Timestamp(t)) = rule.operand else {
            panic!()
        };
        assert_eq!(t.to_rfc3339(), "2026-01-02T02:00:00+00:00");
    }

    fn error(rule: Value) -> FilterError {
        one(rule).unwrap_err()
    }

    #[test]
    fn errors_name_the_rule_the_field_and_what_is_allowed() {
        let e = error(json!({"table": "Users", "column": "name", "operator": "eq", "value": "x"}));
        assert_eq!((e.index, e.field), (1, "table"));
        assert!(
            e.to_string().contains("RawDataPackage, ExecutedObsUnit"),
            "{e}"
        );
        let e = error(
            json!({"table": "Source", "column": "name; DROP TABLE source", "operator": "eq", "value": "x"}),
        );
        assert_eq!(e.field, "column");
        assert!(
            e.message.contains("allowed: id, name, ra_deg, dec_deg"),
            "{e}"
        );
        let e =
            error(json!({"table": "Source", "column": "name", "operator": "regex", "value": "x"}));
        assert!(
            e.message.contains("eq neq in not_in gt gte lt lte like"),
            "{e}"
        );
        let e = error(
            json!({"table": "Source", "column": "id", "operator": "eq", "value": "1 OR 1=1"}),
        );
        assert_eq!(e.field, "value");
        let e = error(json!({"table": "Source", "column": "name", "operator": "in", "value": "a"}));
        assert!(e.message.contains("needs a list"), "{e}");
        let e = error(json!({"table": "Source", "column": "name", "operator": "in", "value": []}));
        assert!(e.message.contains("at least one"), "{e}");
        let huge: Vec<i64> = (0..=MAX_IN_VALUES as i64).collect();
        let e = error(json!({"table": "Source", "column": "id", "operator": "in", "value": huge}));
        assert!(e.message.contains("at most"), "{e}");
        let e = error(json!({"table": "RawDataPackage", "column": "metadata",
            "json_path": "a') OR ('1", "operator": "eq", "value": 1}));
        assert_eq!(e.field, "json_path");
        let e = error(
            json!({"table": "RawDataPackage", "column": "metadata", "operator": "eq", "value": 1}),
        );
        assert_eq!(e.field, "json_path");
        let e = error(
            json!({"table": "Source", "column": "ra_deg", "operator": "like", "value": "1%"}),
        );
        assert_eq!(e.field, "operator");
        let e = error(
            json!({"table": "Source", "column": "name", "operator": "eq", "value": "x", "colour": 1}),
        );
        assert!(e.message.contains("unknown field"), "{e}");
        let e = parse_rules(
            &json!([{"table": "Source", "column": "name", "operator": "eq", "value": "x"}, 5]),
        )
        .unwrap_err();
        assert_eq!(e.index, 2);
        assert!(parse_rules(&json!({"table": "Source"})).is_err());
    }

    #[test]
    fn group_by_names_dimensions() {
        assert_eq!(parse_group_by(&json!([])).unwrap(), vec![]);
        assert_eq!(
            parse_group_by(&json!(["source", "night"])).unwrap(),
            vec![Dimension::Source, Dimension::Night]
        );
        let e = parse_group_by(&json!(["planet"])).unwrap_err();
        assert!(
            e.contains("planet") && e.contains("executed_obs_unit"),
            "{e}"
        );
        assert!(parse_group_by(&json!(["night", "night"])).is_err());
        assert!(parse_group_by(&json!("source")).is_err());
    }
}

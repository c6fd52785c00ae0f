//! SQL for the filter engine: validated rules and `group_by` dimensions rendered into one
//! query rooted at `raw_data_package`, for PostgreSQL or SQLite.
//!
//! The join registry below is the only place that knows how a filterable table reaches
//! the root; a rule or dimension that needs a table adds its join path, each join once.
//! Identifiers come from the registries only; every rule value is a bound parameter.

use super::{Database, DbError, Dialect};
use crate::filter::{ColumnKind, Dimension, FilterTable, FilterValue, Operand, Operator, Rule};

/// How a table joins towards the root: its alias, the table it hangs off, the join text.
struct Join {
    table: FilterTable,
    /// The table's name in the database.
    name: &'static str,
    alias: &'static str,
    parent: Option<FilterTable>,
    clause: &'static str,
}

/// The join paths from `raw_data_package` (alias `rdp`) to every filterable table.
const JOINS: &[Join] = &[
    Join {
        table: FilterTable::RawDataPackage,
        name: "raw_data_package",
        alias: "rdp",
        parent: None,
        clause: "",
    },
    Join {
        table: FilterTable::ExecutedObsUnit,
        name: "executed_obs_unit",
        alias: "eou",
        parent: Some(FilterTable::RawDataPackage),
        clause: "JOIN executed_obs_unit eou ON eou.id = rdp.executed_obs_unit_id",
    },
    Join {
        table: FilterTable::ObsUnit,
        name: "obs_unit",
        alias: "ou",
        parent: Some(FilterTable::ExecutedObsUnit),
        clause: "JOIN obs_unit ou ON ou.id = eou.obs_unit_id",
    },
    Join {
        table: FilterTable::Source,
        name: "source",
        alias: "src",
        parent: Some(FilterTable::ObsUnit),
        clause: "JOIN source src ON src.id = ou.source_id",
    },
    Join {
        table: FilterTable::Line,
        name: "line",
        alias: "ln",
        parent: Some(FilterTable::ObsUnit),
        // An obs unit need not have a line.
        clause: "LEFT JOIN line ln ON ln.id = ou.line_id",
    },
    Join {
        table: FilterTable::InstrumentModule,
        name: "instrument_module",
        alias: "im",
        parent: Some(FilterTable::RawDataPackage),
        clause: "JOIN instrument_module im ON im.id = rdp.instrument_module_id",
    },
    Join {
        table: FilterTable::Instrument,
        name: "instrument",
        alias: "ins",
        parent: Some(FilterTable::InstrumentModule),
        clause: "JOIN instrument ins ON ins.id = im.instrument_id",
    },
];

fn join(table: FilterTable) -> &'static Join {
    JOINS
        .iter()
        .find(|j| j.table == table)
        .expect("every table has a join path")
}

/// The tables a dimension needs and its value as SQL text.
fn dimension_sql(dim: Dimension, dialect: Dialect) -> (FilterTable, &'static str) {
    match (dim, dialect) {
        (Dimension::ExecutedObsUnit, _) => (
            FilterTable::RawDataPackage,
            "CAST(rdp.executed_obs_unit_id AS TEXT)",
        ),
        (Dimension::ObsUnit, _) => (FilterTable::ObsUnit, "ou.name"),
        (Dimension::Source, _) => (FilterTable::Source, "src.name"),
        (Dimension::Line, _) => (FilterTable::Line, "COALESCE(ln.name, '')"),
        // Module names are unique per instrument only.
        (Dimension::InstrumentModule, _) => (FilterTable::Instrument, "ins.name || '-' || im.name"),
        (Dimension::Instrument, _) => (FilterTable::Instrument, "ins.name"),
        (Dimension::Night, Dialect::Postgres) => (
            FilterTable::ExecutedObsUnit,
            "to_char(eou.start_time AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        ),
        (Dimension::Night, Dialect::Sqlite) => (
            FilterTable::ExecutedObsUnit,
            "strftime('%Y-%m-%d', eou.start_time)",
        ),
    }
}

/// What to select: the rules of a data grouping, its optional instrument-module scope,
/// and the dimensions of a step.
#[derive(Debug, Clone, Default)]
pub struct Selection<'a> {
    pub rules: &'a [Rule],
    pub instrument_module_id: Option<i64>,
    pub group_by: &'a [Dimension],
    /// Only packages in state ARCHIVED (what processing can use).
    pub only_archived: bool,
}

/// One matching package with its dimension values in `group_by` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRow {
    pub id: i64,
    pub dimensions: Vec<String>,
}

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Float(f64),
    TextArray(Vec<String>),
    Timestamp(chrono::DateTime<chrono::Utc>),
    IntArray(Vec<i64>),
}

/// A rendered query and its parameters, in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedQuery {
    pub sql: String,
    pub binds: Vec<Bind>,
}

struct Renderer {
    dialect: Dialect,
    binds: Vec<Bind>,
}

impl Renderer {
    fn bind(&mut self, value: Bind) -> String {
        self.binds.push(value);
        format!("${}", self.binds.len())
    }

    /// `column` is one of `ids`: an array parameter on PostgreSQL, a JSON list on SQLite.
    fn id_list(&mut self, column: &str, ids: &[i64]) -> String {
        match self.dialect {
            Dialect::Postgres => {
                let p = self.bind(Bind::IntArray(ids.to_vec()));
                format!("{column} = ANY({p})")
            }
            Dialect::Sqlite => {
                let p = self.bind(Bind::Text(
                    serde_json::to_string(ids).expect("integers serialise"),
                ));
                format!("{column} IN (SELECT value FROM json_each({p}))")
            }
        }
    }

    fn rule(&mut self, rule: &Rule) -> String {
        let column = format!("{}.{}", join(rule.table).alias, rule.column);
        if rule.kind == ColumnKind::Json {
            return self.json_rule(&column, rule);
        }
        let sql_op = comparison(rule.operator);
        match (&rule.operand, self.dialect) {
            (Operand::One(value), dialect) => {
                let placeholder = self.bind(plain_bind(value));
                match (rule.kind, dialect) {
                    // SQLite stores timestamps as text: compare them as instants.
                    (ColumnKind::Timestamp, Dialect::Sqlite) => {
                        format!("julianday({column}) {sql_op} julianday({placeholder})")
                    }
                    _ => format!("{column} {sql_op} {placeholder}"),
                }
            }
            (Operand::List(values), Dialect::Postgres) => {
                let list = self.bind(Bind::Text(json_list(values)));
                let cast = match rule.kind {
                    ColumnKind::Text => "text",
                    ColumnKind::Integer => "bigint",
                    ColumnKind::Float => "double precision",
                    ColumnKind::Timestamp => "timestamptz",
                    ColumnKind::Json => unreachable!("handled above"),
                };
                format!(
                    "{column} {sql_op} (SELECT CAST(value AS {cast}) FROM jsonb_array_elements_text({list}::jsonb))"
                )
            }
            (Operand::List(values), Dialect::Sqlite) => {
                let list = self.bind(Bind::Text(json_list(values)));
                if rule.kind == ColumnKind::Timestamp {
                    format!(
                        "julianday({column}) {sql_op} (SELECT julianday(value) FROM json_each({list}))"
                    )
                } else {
                    format!("{column} {sql_op} (SELECT value FROM json_each({list}))")
                }
            }
        }
    }

    /// A comparison with a value inside a JSON column. Only values of the rule value's
    /// JSON type match, so that both databases agree (they order mixed types differently).
    fn json_rule(&mut self, column: &str, rule: &Rule) -> String {
        let sql_op = comparison(rule.operator);
        match self.dialect {
            Dialect::Postgres => {
                let path = self.bind(Bind::TextArray(rule.json_path.clone()));
                match &rule.operand {
                    Operand::One(FilterValue::Text(pattern)) if rule.operator == Operator::Like => {
                        let pattern = self.bind(Bind::Text(pattern.clone()));
                        format!("({column} #>> {path}::text[]) LIKE {pattern}")
                    }
                    // jsonb equality holds only between values of one type: no type test.
                    Operand::One(value) if rule.operator == Operator::Eq => {
                        let value = self.bind(Bind::Text(json_value(value).to_string()));
                        format!("({column} #> {path}::text[]) = {value}::jsonb")
                    }
                    Operand::One(value) => {
                        let json = json_value(value);
                        let kind = pg_json_type(&json);
                        let value = self.bind(Bind::Text(json.to_string()));
                        format!(
                            "(jsonb_typeof({column} #> {path}::text[]) = '{kind}' \
                             AND ({column} #> {path}::text[]) {sql_op} {value}::jsonb)"
                        )
                    }
                    Operand::List(values) => {
                        let list = self.bind(Bind::Text(json_list(values)));
                        format!(
                            "({column} #> {path}::text[]) {sql_op} (SELECT value FROM jsonb_array_elements({list}::jsonb))"
                        )
                    }
                }
            }
            Dialect::Sqlite => {
                let quoted: Vec<String> =
                    rule.json_path.iter().map(|s| format!("\"{s}\"")).collect();
                let path = self.bind(Bind::Text(format!("$.{}", quoted.join("."))));
                let extract = format!("json_extract({column}, {path})");
                match &rule.operand {
                    Operand::One(FilterValue::Text(pattern)) if rule.operator == Operator::Like => {
                        let pattern = self.bind(Bind::Text(pattern.clone()));
                        format!(
                            "(json_type({column}, {path}) = 'text' AND {extract} LIKE {pattern})"
                        )
                    }
                    Operand::One(value) => {
                        let json = json_value(value);
                        let types = sqlite_json_types(&json);
                        let bind = match &json {
                            serde_json::Value::Bool(b) => Bind::Int(i64::from(*b)),
                            serde_json::Value::Number(n) => match n.as_i64() {
                                Some(i) => Bind::Int(i),
                                None => Bind::Float(n.as_f64().unwrap_or(f64::NAN)),
                            },
                            other => Bind::Text(other.as_str().unwrap_or_default().to_owned()),
                        };
                        let value = self.bind(bind);
                        format!(
                            "(json_type({column}, {path}) IN ({types}) AND {extract} {sql_op} {value})"
                        )
                    }
                    Operand::List(values) => {
                        let list = self.bind(Bind::Text(json_list(values)));
                        format!("{extract} {sql_op} (SELECT value FROM json_each({list}))")
                    }
                }
            }
        }
    }
}

fn comparison(op: Operator) -> &'static str {
    match op {
        Operator::Eq => "=",
        Operator::Neq => "<>",
        Operator::In => "IN",
        Operator::NotIn => "NOT IN",
        Operator::Gt => ">",
        Operator::Gte => ">=",
        Operator::Lt => "<",
        Operator::Lte => "<=",
        Operator::Like => "LIKE",
    }
}

fn plain_bind(value: &FilterValue) -> Bind {
    match value {
        FilterValue::Text(s) => Bind::Text(s.clone()),
        FilterValue::Integer(i) => Bind::Int(*i),
        FilterValue::Float(f) => Bind::Float(*f),
        FilterValue::Timestamp(t) => Bind::Timestamp(*t),
        FilterValue::Json(v) => Bind::Text(v.to_string()),
    }
}

fn json_value(value: &FilterValue) -> serde_json::Value {
    match value {
        FilterValue::Text(s) => s.clone().into(),
        FilterValue::Integer(i) => (*i).into(),
        FilterValue::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        FilterValue::Timestamp(t) => t.to_rfc3339().into(),
        FilterValue::Json(v) => v.clone(),
    }
}

fn json_list(values: &[FilterValue]) -> String {
    serde_json::Value::Array(values.iter().map(json_value).collect()).to_string()
}

fn pg_json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        _ => "string",
    }
}

fn sqlite_json_types(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Bool(_) => "'true', 'false'",
        serde_json::Value::Number(_) => "'integer', 'real'",
        _ => "'text'",
    }
}

/// One selection among several read together (see [`render_shared`]).
#[derive(Debug, Clone, Copy)]
pub struct SelectionSpec<'a> {
    pub rules: &'a [Rule],
    pub instrument_module_id: Option<i64>,
}

/// Condition outcomes per mask column (bits of a non-negative BIGINT).
const MASK_BITS: usize = 62;

/// A query over several selections at once (see [`render_shared`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedQuery {
    pub query: RenderedQuery,
    /// Per selection, the conditions (bit `i % 62` of mask column `i / 62`, after the
    /// dimensions) that must all hold for it to hold a package; empty when it has none.
    pub selection_conditions: Vec<Vec<usize>>,
    pub conditions: usize,
}

/// Renders one query that reads the archived packages of several selections in a single
/// pass: `SELECT id, <dimension values…>, <1 or 0 per distinct condition…>`. Each distinct
/// rule is evaluated once per package, however many selections share it, and one scan
/// serves every pipeline.
pub fn render_shared(
    selections: &[SelectionSpec<'_>],
    group_by: &[Dimension],
    only_packages: Option<&[i64]>,
    only_archived: bool,
    dialect: Dialect,
) -> SharedQuery {
    let mut r = Renderer {
        dialect,
        binds: Vec::new(),
    };
    let mut needed: Vec<FilterTable> = Vec::new();
    let mut columns = vec!["rdp.id".to_owned()];
    for dim in group_by {
        let (table, expr) = dimension_sql(*dim, dialect);
        needed.push(table);
        columns.push(expr.to_owned());
    }
    // Distinct conditions, keyed by what they test.
    let mut keys: Vec<String> = Vec::new();
    let mut conditions: Vec<String> = Vec::new();
    let mut selection_conditions = Vec::new();
    for spec in selections {
        let mut mine: Vec<usize> = Vec::new();
        let mut wanted: Vec<(String, Condition<'_>)> = Vec::new();
        if let Some(id) = spec.instrument_module_id {
            wanted.push((format!("scope {id}"), Condition::Scope(id)));
        }
        for rule in spec.rules {
            needed.push(rule.table);
            wanted.push((format!("{rule:?}"), Condition::Rule(rule)));
        }
        for (key, condition) in wanted {
            let index = match keys.iter().position(|k| *k == key) {
                Some(i) => i,
                None => {
                    keys.push(key);
                    conditions.push(match condition {
                        Condition::Scope(id) => {
                            let p = r.bind(Bind::Int(id));
                            format!("rdp.instrument_module_id = {p}")
                        }
                        Condition::Rule(rule) => r.rule(rule),
                    });
                    conditions.len() - 1
                }
            };
            if !mine.contains(&index) {
                mine.push(index);
            }
        }
        selection_conditions.push(mine);
    }
    // The conditions' outcomes as bits of a few integer columns: cheaper to send and
    // decode than a column each.
    for (chunk_index, chunk) in conditions.chunks(MASK_BITS).enumerate() {
        let bits: Vec<String> = chunk
            .iter()
            .enumerate()
            .map(|(bit, c)| format!("CASE WHEN {c} THEN {} ELSE 0 END", 1i64 << bit))
            .collect();
        columns.push(format!(
            "CAST({} AS BIGINT) AS m{chunk_index}",
            bits.join(" + ")
        ));
    }
    let mut inner = format!("SELECT {} FROM raw_data_package rdp", columns.join(", "));
    for clause in joins_for(needed) {
        inner.push(' ');
        inner.push_str(clause);
    }
    // Conditions are not repeated in a WHERE clause: each is evaluated once per archived
    // package, in the select list, and the caller skips packages that match no selection.
    // This keeps one plain scan (which PostgreSQL may run in parallel) for any number of
    // selections, at the price of streaming archived packages no pipeline reads.
    let mut filters = Vec::new();
    if only_archived {
        filters.push("rdp.state = 'ARCHIVED'".to_owned());
    }
    if let Some(ids) = only_packages {
        filters.push(r.id_list("rdp.id", ids));
    }
    let mut sql = inner;
    if !filters.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&filters.join(" AND "));
    }
    SharedQuery {
        conditions: conditions.len(),
        query: RenderedQuery {
            sql,
            binds: r.binds,
        },
        selection_conditions,
    }
}

enum Condition<'a> {
    Scope(i64),
    Rule(&'a Rule),
}

/// The joins that bring `tables` (with their whole paths) to the root, each once, in
/// registry order (parents come before children there).
fn joins_for(tables: Vec<FilterTable>) -> Vec<&'static str> {
    let mut with_parents = Vec::new();
    for table in tables {
        let mut current = Some(table);
        while let Some(t) = current {
            with_parents.push(t);
            current = join(t).parent;
        }
    }
    JOINS
        .iter()
        .filter(|j| j.parent.is_some() && with_parents.contains(&j.table))
        .map(|j| j.clause)
        .collect()
}

/// The tables a package's selection reads, by their names in the database.
pub const FILTER_TABLES: [&str; 7] = [
    "raw_data_package",
    "executed_obs_unit",
    "obs_unit",
    "source",
    "line",
    "instrument_module",
    "instrument",
];

/// One branch per filterable table, each an index probe on that table's `change_mark`
/// followed by its join path down to the packages; a UNION, not an OR, so that every
/// branch can use its index.
fn changed_packages_sql(tables: &[&str]) -> String {
    JOINS
        .iter()
        .filter(|j| tables.contains(&j.name))
        .map(|j| {
            let mut path = Vec::new();
            let mut current = Some(j.table);
            while let Some(t) = current {
                let step = join(t);
                if step.parent.is_some() {
                    // Only rows that exist on both sides matter here.
                    path.push(step.clause.trim_start_matches("LEFT "));
                }
                current = step.parent;
            }
            path.reverse();
            let mut sql = String::from("SELECT rdp.id FROM raw_data_package rdp");
            for clause in path {
                sql.push(' ');
                sql.push_str(clause);
            }
            sql.push_str(&format!(" WHERE {}.change_mark >= $1", j.alias));
            sql
        })
        .collect::<Vec<_>>()
        .join(" UNION ")
}

mod queries;
#[cfg(test)]
mod tests;

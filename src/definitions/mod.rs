//! Pipelines as code: software versions, data groupings, pipelines and their steps
//! declared in a TOML file (`ccat-wfm apply`, `ccat-wfm export`; `examples/`).
//!
//! This module is the file format and its validation, free of I/O: entries are matched
//! to the database by name, every reference is checked, and errors name the file, the
//! entry and the field. [`crate::db::definitions`] reads and writes the tables.

pub mod cron;
pub mod version;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A whole definitions file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definitions {
    #[serde(default, rename = "software", skip_serializing_if = "Vec::is_empty")]
    pub software: Vec<Software>,
    #[serde(default, rename = "grouping", skip_serializing_if = "Vec::is_empty")]
    pub groupings: Vec<Grouping>,
    #[serde(default, rename = "pipeline", skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<Pipeline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Software {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub repository_url: String,
    #[serde(default, rename = "version")]
    pub versions: Vec<SoftwareVersion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftwareVersion {
    pub version: String,
    pub image_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The argument vector run inside the container.
    pub command: Vec<String>,
    #[serde(default = "one")]
    pub cpu: i32,
    #[serde(default = "four")]
    pub memory_gb: f64,
    #[serde(default = "one_f")]
    pub time_hours: f64,
    #[serde(default)]
    pub deprecated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grouping {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instrument_module_id: Option<i64>,
    /// Filter rules (SPEC §4), validated before anything is written.
    #[serde(default)]
    pub filter_rules: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The data grouping's name.
    pub grouping: String,
    /// The name of the processing location (a `data_location` of type PROCESSING).
    pub processing_location: String,
    /// `continuous`, `cron` or `manual`.
    #[serde(default = "continuous")]
    pub trigger: String,
    /// The cron expression of a `cron` pipeline (5 fields, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Absent: a new pipeline is enabled and an existing one keeps its state, so that
    /// re-applying a file does not undo `ccat-wfm disable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active_runs: Option<i32>,
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    /// The software's name and the pinned version.
    pub software: String,
    pub version: String,
    /// `exact`, `compatible` or `latest`.
    #[serde(default = "exact")]
    pub version_policy: String,
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default = "sixty")]
    pub cooldown_seconds: i32,
    #[serde(default = "three")]
    pub max_retries: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_gb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_hours: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// A final step's run that registers no product fails, unless this is set: for
    /// software whose empty output is a result in itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty_output: bool,
    /// The step configuration (`ReductionStepConfig.parameters`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
}

fn one() -> i32 {
    1
}
fn four() -> f64 {
    4.0
}
fn one_f() -> f64 {
    1.0
}
fn continuous() -> String {
    "continuous".into()
}
fn exact() -> String {
    "exact".into()
}
fn sixty() -> i32 {
    60
}
fn three() -> i32 {
    3
}

/// A problem in a definitions file, naming where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {entry}: {message}")]
pub struct DefinitionError {
    pub file: String,
    /// e.g. `pipeline "chai-maps", step "map", field depends_on`.
    pub entry: String,
    pub message: String,
}

/// What the database already holds that a file may refer to without declaring.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Software name → its versions.
    pub software_versions: BTreeMap<String, BTreeSet<String>>,
    pub groupings: BTreeSet<String>,
    pub processing_locations: BTreeSet<String>,
}

impl Definitions {
    /// Parses a file's text; syntax errors and unknown fields name line and field.
    pub fn parse(file: &str, text: &str) -> Result<Definitions, DefinitionError> {
        toml::from_str(text).map_err(|e| DefinitionError {
            file: file.to_owned(),
            entry: "file".into(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// The file's text (`export`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("definitions serialise")
    }

    /// Every problem in the file, checked against what it declares and what `known` has.
    pub fn validate(&self, file: &str, known: &Known) -> Vec<DefinitionError> {
        let mut errors = Vec::new();
        let mut err = |entry: String, message: String| {
            errors.push(DefinitionError {
                file: file.to_owned(),
                entry,
                message,
            })
        };
        // A NUL anywhere: PostgreSQL's text cannot hold it.
        let mut nul = Vec::new();
        find_nul(
            &serde_json::to_value(self).expect("definitions serialise"),
            "",
            &mut nul,
        );
        for path in nul {
            err(format!("field {path}"), "contains a NUL character".into());
        }
        let mut versions = known.software_versions.clone();
        let mut seen = BTreeSet::new();
        for s in &self.software {
            let entry = format!("software {}", label(&s.name));
            if let Err(e) = check_name(&s.name) {
                err(format!("{entry}, field name"), e);
            }
            if !seen.insert(&s.name) {
                err(entry.clone(), "declared twice".into());
            }
            let mut seen_versions = BTreeSet::new();
            for v in &s.versions {
                let entry = format!("{entry}, version {}", label(&v.version));
                if let Err(e) = check_name(&v.version) {
                    err(format!("{entry}, field version"), e);
                }
                if !seen_versions.insert(&v.version) {
                    err(entry.clone(), "declared twice".into());
                }
                if v.command.is_empty() {
                    err(
                        format!("{entry}, field command"),
                        "must not be empty".into(),
                    );
                }
                if v.image_ref.trim().is_empty() {
                    err(
                        format!("{entry}, field image_ref"),
                        "must not be empty".into(),
                    );
                }
                let positive = |x: f64| x.is_finite() && x > 0.0;
                if v.cpu < 1 || !positive(v.memory_gb) || !positive(v.time_hours) {
                    err(
                        entry.clone(),
                        "cpu, memory_gb and time_hours must be positive".into(),
                    );
                }
                versions
                    .entry(s.name.clone())
                    .or_default()
                    .insert(v.version.clone());
            }
        }
        let mut groupings = known.groupings.clone();
        let mut seen = BTreeSet::new();
        for g in &self.groupings {
            let entry = format!("grouping {}", label(&g.name));
            if let Err(e) = check_name(&g.name) {
                err(format!("{entry}, field name"), e);
            }
            if !seen.insert(&g.name) {
                err(entry.clone(), "declared twice".into());
            }
            if let Err(e) = crate::filter::parse_rules(&Value::Array(g.filter_rules.clone())) {
                err(format!("{entry}, field filter_rules"), e.to_string());
            }
            groupings.insert(g.name.clone());
        }
        let mut seen = BTreeSet::new();
        for p in &self.pipelines {
            let entry = format!("pipeline {}", label(&p.name));
            if let Err(e) = check_name(&p.name) {
                err(format!("{entry}, field name"), e);
            }
            if !seen.insert(&p.name) {
                err(entry.clone(), "declared twice".into());
            }
            if let Some(n) = p.max_active_runs
                && n < 1
            {
                err(
                    format!("{entry}, field max_active_runs"),
                    format!("{n} is not a positive number of runs"),
                );
            }
            if !groupings.contains(&p.grouping) {
                err(
                    format!("{entry}, field grouping"),
                    format!(
                        "no grouping named {:?} in this file or the database",
                        p.grouping
                    ),
                );
            }
            if !known.processing_locations.contains(&p.processing_location) {
                err(
                    format!("{entry}, field processing_location"),
                    format!(
                        "no data location of type PROCESSING named {:?} (known: {})",
                        p.processing_location,
                        known
                            .processing_locations
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            match (p.trigger.as_str(), &p.cron) {
                ("cron", Some(expr)) => {
                    if let Err(e) = cron::parse(expr) {
                        err(format!("{entry}, field cron"), e);
                    }
                }
                ("cron", None) => err(
                    format!("{entry}, field cron"),
                    "a cron pipeline needs a cron expression".into(),
                ),
                ("continuous" | "manual", None) => {}
                ("continuous" | "manual", Some(_)) => err(
                    format!("{entry}, field cron"),
                    "only a cron pipeline has a cron expression".into(),
                ),
                (other, _) => err(
                    format!("{entry}, field trigger"),
                    format!("{other:?} is not continuous, cron or manual"),
                ),
            }
            let mut names: BTreeSet<&String> = BTreeSet::new();
            for s in &p.steps {
                if !names.insert(&s.name) {
                    err(
                        format!("{entry}, step {}", label(&s.name)),
                        "two steps have this name".into(),
                    );
                }
            }
            for s in &p.steps {
                let entry = format!("{entry}, step {}", label(&s.name));
                if let Err(e) = check_name(&s.name) {
                    err(format!("{entry}, field name"), e);
                }
                if s.max_retries < 0 {
                    err(
                        format!("{entry}, field max_retries"),
                        format!("{} is negative", s.max_retries),
                    );
                }
                if s.cooldown_seconds < 0 {
                    err(
                        format!("{entry}, field cooldown_seconds"),
                        format!("{} is negative", s.cooldown_seconds),
                    );
                }
                if s.cpu.is_some_and(|c| c < 1) {
                    err(format!("{entry}, field cpu"), "must be at least 1".into());
                }
                for (field, value) in [("memory_gb", s.memory_gb), ("time_hours", s.time_hours)] {
                    if value.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                        err(format!("{entry}, field {field}"), "must be positive".into());
                    }
                }
                if !versions
                    .get(&s.software)
                    .is_some_and(|v| v.contains(&s.version))
                {
                    err(
                        format!("{entry}, field version"),
                        format!(
                            "no version {:?} of software {:?} in this file or the database",
                            s.version, s.software
                        ),
                    );
                }
                if version::VersionPolicy::from_db(&s.version_policy.to_uppercase()).is_none() {
                    err(
                        format!("{entry}, field version_policy"),
                        format!("{:?} is not exact, compatible or latest", s.version_policy),
                    );
                }
                let group_by =
                    Value::Array(s.group_by.iter().cloned().map(Value::String).collect());
                if let Err(e) = crate::filter::parse_group_by(&group_by) {
                    err(format!("{entry}, field group_by"), e);
                }
                for d in &s.depends_on {
                    if !names.contains(d) || d == &s.name {
                        err(
                            format!("{entry}, field depends_on"),
                            format!("{d:?} is not another step of this pipeline"),
                        );
                    }
                }
            }
            if let Some(cycle) = dependency_cycle(&p.steps) {
                err(
                    format!("{entry}, field depends_on"),
                    format!("the steps depend on each other in a cycle: {cycle}"),
                );
            }
        }
        errors
    }
}

/// A name as error messages show it: quoted and escaped, and cut when very long.
fn label(name: &str) -> String {
    const SHOWN: usize = 60;
    if name.chars().count() <= SHOWN {
        format!("{name:?}")
    } else {
        let head: String = name.chars().take(SHOWN).collect();
        format!("{head:?}… ({} characters)", name.chars().count())
    }
}

/// Longest name of a software, version, grouping, pipeline or step, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// A name as the product uses it: in tables, paths, job names and logs.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a name"));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character U+{:04X}", c as u32));
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "is {chars} characters long; at most {MAX_NAME_CHARS}"
        ));
    }
    Ok(())
}

/// The paths (`pipeline[0].step[1].config.mode`) of strings holding a NUL character.
fn find_nul(value: &Value, path: &str, found: &mut Vec<String>) {
    match value {
        Value::String(s) if s.contains('\0') => found.push(path.to_owned()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_nul(item, &format!("{path}[{i}]"), found);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if key.contains('\0') {
                    found.push(here.clone());
                }
                find_nul(item, &here, found);
            }
        }
        _ => {}
    }
}

/// A cycle among the steps' `depends_on`, as `a -> b -> a`, if there is one.
fn dependency_cycle(steps: &[Step]) -> Option<String> {
    let deps: BTreeMap<&str, Vec<&str>> = steps
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    fn visit<'a>(
        node: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(i) = path.iter().position(|n| *n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node);
            return Some(cycle.join(" -> "));
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for d in deps.get(node).into_iter().flatten() {
            if let Some(c) = visit(d, deps, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for s in steps {
        if let Some(c) = visit(&s.name, &deps, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// One entry `apply` creates or changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// e.g. `pipeline "maps", step "map"`.
    pub entry: String,
    /// `create` or `update`.
    pub action: &'static str,
    /// The fields an update changes.
    pub fields: Vec<String>,
}

/// The fields of two serialisable values that differ (top level, `skip` ignored).
fn changed_fields<T: Serialize>(old: &T, new: &T, skip: &[&str]) -> Vec<String> {
    let (Value::Object(old), Value::Object(new)) = (
        serde_json::to_value(old).expect("serialises"),
        serde_json::to_value(new).expect("serialises"),
    ) else {
        return Vec::new();
    };
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()) && old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// What applying `wanted` to a database holding `current` creates and changes. Entries
/// the file does not mention are left as they are.
pub fn diff(current: &Definitions, wanted: &Definitions) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut push = |entry: String, old: Option<Vec<String>>| match old {
        None => changes.push(Change {
            entry,
            action: "create",
            fields: Vec::new(),
        }),
        Some(fields) if !fields.is_empty() => changes.push(Change {
            entry,
            action: "update",
            fields,
        }),
        Some(_) => {}
    };
    for s in &wanted.software {
        let entry = format!("software {}", label(&s.name));
        let old = current.software.iter().find(|c| c.name == s.name);
        push(
            entry.clone(),
            old.map(|o| changed_fields(o, s, &["version"])),
        );
        for v in &s.versions {
            let old_v = old.and_then(|o| o.versions.iter().find(|c| c.version == v.version));
            push(
                format!("{entry}, version {}", label(&v.version)),
                old_v.map(|o| changed_fields(o, v, &[])),
            );
        }
    }
    for g in &wanted.groupings {
        let old = current.groupings.iter().find(|c| c.name == g.name);
        push(
            format!("grouping {}", label(&g.name)),
            old.map(|o| changed_fields(o, g, &[])),
        );
    }
    for p in &wanted.pipelines {
        let entry = format!("pipeline {}", label(&p.name));
        let old = current.pipelines.iter().find(|c| c.name == p.name);
        let skip: &[&str] = match p.enabled {
            Some(_) => &["step"],
            None => &["step", "enabled"],
        };
        push(entry.clone(), old.map(|o| changed_fields(o, p, skip)));
        for s in &p.steps {
            let old_s = old.and_then(|o| o.steps.iter().find(|c| c.name == s.name));
            push(
                format!("{entry}, step {}", label(&s.name)),
                old_s.map(|o| changed_fields(o, s, &[])),
            );
        }
    }
    changes
}

/// Steps in an order where each comes after those it depends on (validated acyclic).
pub fn step_order(steps: &[Step]) -> Vec<&Step> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(steps.len());
    while order.len() < steps.len() {
        let before = order.len();
        for s in steps {
            if !placed.contains(s.name.as_str())
                && s.depends_on.iter().all(|d| placed.contains(d.as_str()))
            {
                placed.insert(&s.name);
                order.push(s);
            }
        }
        if order.len() == before {
            break; // a cycle: validation reports it
        }
    }
    order
}

#[cfg(test)]
mod tests;
